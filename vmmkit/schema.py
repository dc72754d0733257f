"""Typed configuration tables: from a TOML table to a validated attrs instance.

The VM configuration and every plugin's own table are described by attrs classes.
This module turns a TOML table (a ``dict``) into an instance of such a class and,
when anything is wrong, raises a :class:`ConfigError` that names the file, the
table and the key, says what was expected and shows what was found.

Two layers share one set of rules, so that a VM assembled in Python is checked
exactly like one read from TOML:

* :func:`spec` is a drop-in replacement for ``attrs.frozen`` that derives a
  converter from each field's type annotation (``int``, ``str``, ``Size``,
  ``Literal[...]``, ``list[str]``, ...) and tags validator failures with the
  field name.  ``MachineSpec(memory="1G")`` therefore converts ``"1G"`` to bytes,
  and ``MachineSpec(vcpus=True)`` fails.
* :func:`table_to_attrs` adds what only the file-level view knows: unknown keys
  (with a "did you mean"), missing keys, relative paths resolved against the
  TOML file's directory, and the ``file: [table] key:`` prefix of every message.

``table_to_attrs`` also works with plain ``attrs`` classes (it type-checks from
the annotations); they just don't get the checks when built from Python.

Supported annotations: ``int`` (``bool`` is rejected), ``float`` (``int``
accepted), ``str``, ``bool``, ``list[T]``, ``tuple[T, ...]``, ``dict[str, T]``,
``Optional[T]`` and other unions, ``Literal[...]``, nested attrs classes
(sub-tables), ``Any``, and the markers :data:`Size` and :data:`Path` defined
here.  Field metadata ``{"must_exist": True}`` on a ``Path`` field checks that
the path exists.  A field with its own converter receives the raw value and its
converter's output is type-checked.  Fields whose name starts with ``_`` cannot
be set from TOML.
"""

import collections.abc
import os
import re
import sys
import typing
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional

import attrs

from typing import Annotated, Literal, Union, get_args, get_origin

try:  # ``int | None`` style unions (3.10+) have their own origin type.
    from types import UnionType as _UnionType
except ImportError:  # pragma: no cover - Python 3.9
    _UnionType = None

from vmmkit.errors import VmmkitError

__all__ = [
    "ConfigError",
    "FieldError",
    "Size",
    "Path",
    "KiB",
    "MiB",
    "GiB",
    "TiB",
    "parse_size",
    "format_size",
    "describe",
    "suggest",
    "spec",
    "table_to_attrs",
    "in_range",
    "size_at_least",
    "size_multiple_of",
]

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------


class ConfigError(VmmkitError):
    """A configuration mistake, reported as one line that pinpoints it.

    The message always starts with the file name (``"<config>"`` when the
    configuration did not come from a file), then the location (table and key)
    when there is one, then what is wrong, for example
    ``vm.toml: [machine] memory: expected a size like '512M' or '2G', found 'lots'``.

    Attributes: ``source`` (file name or ``"<config>"``), ``location`` (such as
    ``"[machine] memory"`` or ``None``) and ``detail`` (the message without the
    prefix), so that tools can re-render the error.
    """

    def __init__(
        self,
        detail: str,
        *,
        source: Optional[str] = None,
        location: Optional[str] = None,
        joiner: str = ": ",
    ) -> None:
        self.source = source if source is not None else "<config>"
        self.location = location
        self.detail = detail
        prefix = f"{self.source}: "
        if location:
            # ``joiner`` exists because "[machine] unknown key 'x'" reads better
            # than "[machine]: unknown key 'x'", while "[machine] memory: ..." needs the colon.
            prefix += location + joiner
        super().__init__(prefix + detail)


class FieldError(ValueError, TypeError):
    """A bad value for one field of a :func:`spec` class, raised while building it.

    It is both a ``ValueError`` and a ``TypeError`` so that code catching what
    attrs validators traditionally raise keeps working.  ``field`` names the
    attribute and ``message`` says what is wrong (``"expected ..., found ..."``);
    :func:`table_to_attrs` turns it into a :class:`ConfigError` naming the key.
    """

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


class _Mismatch(ValueError):
    """The value has the wrong shape for the type (as opposed to a deeper problem).

    Unions use the distinction: when every member is a plain mismatch, the
    message lists all the alternatives; a deeper problem (a missing file) is
    more useful than "expected X or Y" and is reported as is.
    """


# --------------------------------------------------------------------------
# Marker types
# --------------------------------------------------------------------------


class _Marker:
    """A tag inside ``Annotated[...]``: static checkers see the base type, we see the tag."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


_SIZE = _Marker("Size")
_PATH = _Marker("Path")

#: A byte count.  Accepts an ``int`` or a string such as ``"512M"``, ``"2G"`` or
#: ``"1.5G"`` (binary units); the attribute holds an ``int`` number of bytes.
Size = Annotated[int, _SIZE]

#: A filesystem path.  Relative paths are resolved against the TOML file's
#: directory (or the current directory when built from Python); the attribute
#: holds an absolute ``str``.  Field metadata ``must_exist=True`` checks existence.
Path = Annotated[str, _PATH]


# --------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": KiB,
    "kib": KiB,
    "m": MiB,
    "mib": MiB,
    "g": GiB,
    "gib": GiB,
    "t": TiB,
    "tib": TiB,
}
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?|\.\d+)\s*([A-Za-z]*)\s*")
_SIZE_EXPECTED = "expected a size like '512M' or '2G'"


def parse_size(value: Any) -> int:
    """Return the number of bytes that ``value`` denotes.

    Accepts a positive ``int`` (bytes) or a string: digits with an optional
    binary unit ``K``, ``M``, ``G`` or ``T`` (case-insensitive, optionally
    followed by ``iB``), e.g. ``"512M"``, ``"2G"``, ``"1048576"``.  A fraction
    is allowed when it comes out as a whole number of bytes (``"1.5G"``).

    Raises ``ValueError`` with a message of the form ``"expected ..., found ..."``
    for anything else: booleans, floats, negative or zero sizes, unknown units.
    """
    # bool is an int subclass; ``memory = true`` is a mistake, not 1 byte.
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise _Mismatch(f"{_SIZE_EXPECTED}, found {describe(value)}")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"expected a positive size, found {value}")
        return value
    match = _SIZE_RE.fullmatch(value)
    if match is None:
        raise _Mismatch(f"{_SIZE_EXPECTED}, found {value!r}")
    number, unit = match.groups()
    multiplier = _SIZE_UNITS.get(unit.lower())
    if multiplier is None:
        # "MB" is refused rather than guessed: decimal and binary megabytes differ
        # by 5%, and a silent guess would show up as a puzzling guest RAM size.
        raise ValueError(
            f"{_SIZE_EXPECTED}, found {value!r} "
            f"(unknown unit {unit!r}; use K, M, G or T, which are binary: 1K = 1024)"
        )
    if number.isdigit():
        size = int(number) * multiplier
    else:
        # Fraction, not float: "1.1G" must be recognised as a fractional byte count
        # instead of being silently rounded. Imported here: it is a slow import.
        from fractions import Fraction

        size = Fraction(number) * multiplier
    if getattr(size, "denominator", 1) != 1:
        raise ValueError(f"{_SIZE_EXPECTED}, found {value!r}, which is not a whole number of bytes")
    if size <= 0:
        raise ValueError(f"expected a positive size, found {value!r}")
    return int(size)


def format_size(size: int) -> str:
    """Render a byte count in the largest binary unit that divides it exactly.

    ``format_size(512 * MiB) == "512M"``, ``format_size(1536 * MiB) == "1536M"``,
    ``format_size(1000) == "1000"``; the result is accepted by :func:`parse_size`.
    """
    for suffix, unit in (("T", TiB), ("G", GiB), ("M", MiB), ("K", KiB)):
        if size and size % unit == 0:
            return f"{size // unit}{suffix}"
    return str(size)


# --------------------------------------------------------------------------
# Message helpers
# --------------------------------------------------------------------------


def describe(value: Any) -> str:
    """Show a found value the way the user wrote it, briefly.

    Booleans are shown in TOML spelling (``true``), tables and arrays by kind,
    strings quoted, and long representations are cut short.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "a table"
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    if isinstance(value, (list, tuple)):
        return f"an array {text}"
    return text


def suggest(name: str, candidates: Iterable[str], *, fmt: str = "'{}'") -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest candidate, or ``""``.

    ``fmt`` renders the suggestion, e.g. ``"[{}]"`` for table names.
    """
    import difflib  # only on the error path

    matches = difflib.get_close_matches(name, list(candidates), n=1)
    return f" (did you mean {fmt.format(matches[0])}?)" if matches else ""


# --------------------------------------------------------------------------
# Type-driven coercion (shared by spec converters and table_to_attrs)
# --------------------------------------------------------------------------


@attrs.define
class _Context:
    """How to coerce: where relative paths start, and how to build sub-tables."""

    base_dir: str
    must_exist: bool = False
    # Builds a nested attrs instance from a sub-table.  table_to_attrs supplies
    # one that reports errors with the full key path; from Python we call cls(**table).
    nested: Optional[Callable[[type, Any, str], Any]] = None
    key: str = ""


def _is_union(origin: Any) -> bool:
    return origin is Union or (_UnionType is not None and origin is _UnionType)


def _markers(tp: Any) -> tuple:
    return get_args(tp)[1:] if get_origin(tp) is Annotated else ()


# get_origin() gives the runtime class: list for List[str], collections.abc.Sequence for Sequence[str].
_SEQUENCES = (list, tuple, collections.abc.Sequence)
_MAPPINGS = (dict, collections.abc.Mapping)
_PLURALS = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}
_SINGULARS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _expected(tp: Any, plural: bool = False) -> str:
    """Describe what a type accepts, for "expected ..." messages."""
    origin = get_origin(tp)
    if origin is Annotated:
        marks = _markers(tp)
        if _SIZE in marks:
            return "sizes like '512M'" if plural else "a size like '512M' or '2G'"
        if _PATH in marks:
            return "file paths" if plural else "a file path"
        return _expected(get_args(tp)[0], plural)
    if origin is Literal:
        choices = ", ".join(describe(c) for c in get_args(tp))
        return f"values from {choices}" if plural else f"one of {choices}"
    if _is_union(origin):
        members = [a for a in get_args(tp) if a is not type(None)]
        parts = [_expected(a, plural) for a in members]
        return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " or " + parts[-1]
    if origin in _SEQUENCES:
        args = [a for a in get_args(tp) if a is not Ellipsis]
        inner = _expected(args[0], plural=True) if len(args) == 1 else "items"
        return f"arrays of {inner}" if plural else f"an array of {inner}"
    if origin in _MAPPINGS or (isinstance(tp, type) and attrs.has(tp)):
        return "tables" if plural else "a table"
    if tp in _SINGULARS:
        return _PLURALS[tp] if plural else _SINGULARS[tp]
    name = getattr(tp, "__name__", str(tp))
    return f"{name} values" if plural else f"a {name}"


def _mismatch(tp: Any, value: Any) -> _Mismatch:
    return _Mismatch(f"expected {_expected(tp)}, found {describe(value)}")


def _coerce(tp: Any, value: Any, cx: _Context) -> Any:
    """Check ``value`` against annotation ``tp`` and return the normalised value.

    Raises ``ValueError`` (often :class:`_Mismatch`) with an
    ``"expected ..., found ..."`` message.  Must be idempotent: a spec class
    re-runs it on values that table_to_attrs already coerced.
    """
    if tp is Any or tp is object or tp is None or isinstance(tp, str):
        # Unannotated, or an annotation we could not resolve: nothing to check.
        return value
    origin = get_origin(tp)
    if origin is Annotated:
        marks = _markers(tp)
        if _SIZE in marks:
            return parse_size(value)
        if _PATH in marks:
            return _coerce_path(value, cx)
        return _coerce(get_args(tp)[0], value, cx)
    if origin is Literal:
        for choice in get_args(tp):
            # Compare types too: True == 1, but a Literal[1] must not accept true.
            if type(choice) is type(value) and choice == value:
                return choice
        hint = ""
        if isinstance(value, str):
            hint = suggest(value, [c for c in get_args(tp) if isinstance(c, str)])
        raise _Mismatch(f"expected {_expected(tp)}, found {describe(value)}{hint}")
    if _is_union(origin):
        members = [a for a in get_args(tp) if a is not type(None)]
        if value is None and len(members) < len(get_args(tp)):
            return None
        deeper = None
        for member in members:
            try:
                return _coerce(member, value, cx)
            except _Mismatch:
                continue
            except ValueError as exc:
                deeper = deeper or exc
        if deeper is not None:
            raise deeper
        raise _mismatch(tp, value)
    if origin in _SEQUENCES:
        if not isinstance(value, (list, tuple)):
            raise _mismatch(tp, value)
        args = get_args(tp)
        if origin is tuple and args and (len(args) != 2 or args[1] is not Ellipsis):
            # A fixed-shape tuple such as tuple[int, str].
            if len(value) != len(args):
                raise _Mismatch(
                    f"expected an array of {len(args)} items, found {describe(value)}"
                )
            item_types = list(args)
        else:
            item_types = [args[0] if args else Any] * len(value)
        items = []
        for number, (item_type, item) in enumerate(zip(item_types, value), start=1):
            try:
                items.append(_coerce(item_type, item, cx))
            except ValueError as exc:
                # 1-based like "[[device]] #2": TOML users count from one.
                raise type(exc)(f"item #{number}: {exc}") from None
        return list(items) if origin is list else tuple(items)
    if origin in _MAPPINGS:
        if not isinstance(value, Mapping):
            raise _mismatch(tp, value)
        args = get_args(tp)
        value_type = args[1] if len(args) == 2 else Any
        result = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise _Mismatch(f"expected string keys, found {describe(key)}")
            try:
                result[key] = _coerce(value_type, item, cx)
            except ValueError as exc:
                raise type(exc)(f"{key}: {exc}") from None
        return result
    if isinstance(tp, type) and attrs.has(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, Mapping):
            if cx.nested is not None:
                return cx.nested(tp, value, cx.key)
            return tp(**value)
        raise _mismatch(tp, value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _mismatch(tp, value)
    if tp is int:
        # bool is an int subclass, but "vcpus = true" is certainly a mistake.
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _mismatch(tp, value)
    if tp is float:
        # TOML distinguishes 2 from 2.0; requiring "2.0" for a float would be pedantic.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _mismatch(tp, value)
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _mismatch(tp, value)
    return value  # e.g. a TypeVar or a typing construct we don't know: don't guess


def _coerce_path(value: Any, cx: _Context) -> str:
    if not isinstance(value, (str, os.PathLike)) or isinstance(value, bytes):
        raise _Mismatch(f"expected a file path, found {describe(value)}")
    text = os.fspath(value)
    if not text:
        raise _Mismatch("expected a file path, found an empty string")
    # "~" is expanded because users write it by habit and TOML has no shell to do it.
    expanded = os.path.expanduser(text)
    resolved = os.path.normpath(os.path.join(cx.base_dir, expanded))
    if cx.must_exist and not os.path.exists(resolved):
        note = ""
        if not os.path.isabs(expanded):
            note = f" ({text!r} is relative to {cx.base_dir})"
        raise ValueError(f"file not found: {resolved!r}{note}")
    return resolved


# --------------------------------------------------------------------------
# Type resolution
# --------------------------------------------------------------------------


def _resolve_annotation(owner: type, annotation: Any) -> Any:
    """Turn a string annotation (``from __future__ import annotations``) into a type."""
    if not isinstance(annotation, str):
        return annotation
    module = sys.modules.get(owner.__module__)
    namespace = dict(vars(module)) if module is not None else {}
    namespace.setdefault(owner.__name__, owner)
    try:
        return eval(annotation, namespace)  # noqa: S307 - annotations are the program's own code
    except Exception:
        # E.g. a class defined inside a function that names local types: we can't
        # see those names, so we don't check rather than fail on valid input.
        return Any


def _field_types(cls: type) -> Dict[str, Any]:
    """The resolved annotation of every attrs field of ``cls``."""
    try:
        hints = typing.get_type_hints(cls, include_extras=True)
    except Exception:
        hints = {}
    return {
        a.name: hints.get(a.name, _resolve_annotation(cls, a.type) if a.type is not None else Any)
        for a in attrs.fields(cls)
    }


# --------------------------------------------------------------------------
# spec: attrs.frozen with type-driven converters
# --------------------------------------------------------------------------


class _TypeConverter:
    """attrs converter that checks and normalises a value according to the field's type."""

    def __init__(self, owner: type, name: str, annotation: Any, must_exist: bool) -> None:
        self.owner = owner
        self.name = name
        self.annotation = annotation
        self.must_exist = must_exist
        self._resolved: Any = None if isinstance(annotation, str) else annotation
        self._done = not isinstance(annotation, str)

    def __call__(self, value: Any) -> Any:
        if not self._done:
            # Resolved lazily: with postponed annotations the names may not exist
            # yet when the class body is executed.
            self._resolved = _resolve_annotation(self.owner, self.annotation)
            self._done = True
        cx = _Context(base_dir=os.getcwd(), must_exist=self.must_exist)
        try:
            return _coerce(self._resolved, value, cx)
        except FieldError:
            raise
        except (TypeError, ValueError) as exc:
            raise FieldError(self.name, str(exc)) from None


class _Pipe:
    """The field's own converter followed by the type check of its result."""

    def __init__(self, first: Callable[[Any], Any], then: _TypeConverter) -> None:
        self.first = first
        self.then = then

    def __call__(self, value: Any) -> Any:
        try:
            value = self.first(value)
        except FieldError:
            raise
        except (TypeError, ValueError) as exc:
            raise FieldError(self.then.name, _exception_text(exc)) from None
        return self.then(value)


class _NamedValidator:
    """Wraps a field's validator so that its failure names the field."""

    def __init__(self, name: str, inner: Callable[[Any, Any, Any], None]) -> None:
        self.name = name
        self.inner = inner

    def __call__(self, instance: Any, attribute: Any, value: Any) -> None:
        try:
            self.inner(instance, attribute, value)
        except FieldError:
            raise
        except (TypeError, ValueError) as exc:
            raise FieldError(self.name, _exception_text(exc)) from None


def _exception_text(exc: BaseException) -> str:
    """The message of a validator exception, without attrs' extra arguments.

    attrs' own validators raise ``TypeError(msg, attribute, expected, value)``;
    ``str()`` of that would print the whole tuple.
    """
    if len(exc.args) > 1 and isinstance(exc.args[1], attrs.Attribute):
        return str(exc.args[0])
    return str(exc)


def _add_checks(owner: type, attribute: "attrs.Attribute") -> "attrs.Attribute":
    if not attribute.init:
        return attribute  # not settable, so not user input
    changes: Dict[str, Any] = {}
    converter = attribute.converter
    converter_class = getattr(attrs, "Converter", None)
    if attribute.type is not None and not (
        converter_class is not None and isinstance(converter, converter_class)
    ):
        # attrs.Converter objects may take self/field and are called differently;
        # those fields keep their converter unchanged and are not type-checked.
        check = _TypeConverter(
            owner, attribute.name, attribute.type, bool(attribute.metadata.get("must_exist"))
        )
        changes["converter"] = check if converter is None else _Pipe(converter, check)
    if attribute.validator is not None:
        changes["validator"] = _NamedValidator(attribute.name, attribute.validator)
    return attribute.evolve(**changes) if changes else attribute


def spec(maybe_cls: Optional[type] = None, **kwargs: Any) -> Any:
    """Class decorator: ``attrs.frozen`` plus type-driven conversion and checks.

    Use it like ``attrs.frozen`` (with or without arguments).  Each field's
    annotation becomes a converter that checks and normalises the value (so
    ``Size`` fields accept ``"512M"`` and hold ints, ``int`` fields reject
    ``True``), and failures of the field's validators are re-raised as
    :class:`FieldError` naming the field.  Converters therefore also apply to
    defaults: ``memory: Size = "512M"`` stores ``536870912``.

    Validators should raise ``ValueError("expected ..., found ...")``; the
    message is shown after the key path.
    """
    user_transformer = kwargs.pop("field_transformer", None)

    def transformer(cls: type, fields: List["attrs.Attribute"]) -> List["attrs.Attribute"]:
        if user_transformer is not None:
            fields = user_transformer(cls, fields)
        return [_add_checks(cls, a) for a in fields]

    def wrap(cls: type) -> type:
        return attrs.frozen(cls, field_transformer=transformer, **kwargs)

    return wrap if maybe_cls is None else wrap(maybe_cls)


# --------------------------------------------------------------------------
# Reusable validators
# --------------------------------------------------------------------------


def in_range(low: Any, high: Any) -> Callable[[Any, Any, Any], None]:
    """Validator: ``low <= value <= high`` (``None`` passes, for Optional fields)."""

    def check(instance: Any, attribute: Any, value: Any) -> None:
        if value is not None and not low <= value <= high:
            raise ValueError(f"expected a value from {low} to {high}, found {describe(value)}")

    return check


def size_at_least(minimum: int) -> Callable[[Any, Any, Any], None]:
    """Validator for Size fields: at least ``minimum`` bytes."""

    def check(instance: Any, attribute: Any, value: Any) -> None:
        if value is not None and value < minimum:
            raise ValueError(f"expected at least {format_size(minimum)}, found {format_size(value)}")

    return check


def size_multiple_of(unit: int) -> Callable[[Any, Any, Any], None]:
    """Validator for Size fields: a whole multiple of ``unit`` bytes."""

    def check(instance: Any, attribute: Any, value: Any) -> None:
        if value is not None and value % unit:
            raise ValueError(
                f"expected a multiple of {format_size(unit)}, found {value} bytes ({format_size(value)})"
            )

    return check


# --------------------------------------------------------------------------
# table_to_attrs
# --------------------------------------------------------------------------


def _toml_fields(cls: type) -> List["attrs.Attribute"]:
    # Private attributes are implementation details, not configuration.
    return [a for a in attrs.fields(cls) if a.init and not a.name.startswith("_")]


def _init_name(attribute: "attrs.Attribute") -> str:
    return getattr(attribute, "alias", None) or attribute.name.lstrip("_")


def _wants_precheck(attribute: "attrs.Attribute") -> bool:
    """Whether table_to_attrs should coerce the raw value before construction.

    Not for fields with their own converter: the annotation describes the
    converter's output, and the TOML value may legitimately be something else.
    """
    return attribute.converter is None or isinstance(attribute.converter, _TypeConverter)


class _Builder:
    """One table_to_attrs call: carries the file name, table label and base directory."""

    def __init__(self, source: Optional[str], where: str, base_dir: str) -> None:
        self.source = source
        self.where = where
        self.base_dir = os.path.abspath(base_dir)

    def error(self, detail: str, key: str = "", joiner: str = ": ") -> ConfigError:
        location = f"{self.where} {key}" if key else self.where
        return ConfigError(detail, source=self.source, location=location or None, joiner=joiner)

    def build(self, cls: type, table: Any, prefix: str = "") -> Any:
        # ``prefix`` is the dotted path of a sub-table ("cache." for [x] cache.size).
        here = prefix[:-1]
        if not isinstance(table, Mapping):
            raise self.error(f"expected a table, found {describe(table)}", here)
        fields = _toml_fields(cls)
        by_name = {a.name: a for a in fields}
        for key in table:
            if key not in by_name:
                known = ", ".join(sorted(by_name)) or "none"
                raise self.error(
                    f"unknown key {key!r}; known keys: {known}{suggest(str(key), by_name)}",
                    here,
                    joiner=": " if here else " ",
                )
        types = _field_types(cls)
        kwargs: Dict[str, Any] = {}
        for attribute in fields:
            key = attribute.name
            if key not in table:
                if attribute.default is attrs.NOTHING:
                    raise self.error("required key missing", prefix + key)
                continue
            value = table[key]
            if _wants_precheck(attribute):
                cx = _Context(
                    base_dir=self.base_dir,
                    must_exist=bool(attribute.metadata.get("must_exist")),
                    nested=lambda sub_cls, sub_table, sub_key: self.build(
                        sub_cls, sub_table, sub_key + "."
                    ),
                    key=prefix + key,
                )
                try:
                    value = _coerce(types.get(key, Any), value, cx)
                except ValueError as exc:
                    raise self.error(str(exc), prefix + key) from None
            kwargs[_init_name(attribute)] = value
        return self.construct(cls, kwargs, fields, prefix)

    def construct(
        self, cls: type, kwargs: Dict[str, Any], fields: List["attrs.Attribute"], prefix: str
    ) -> Any:
        """Call the class (running its converters and validators), naming the key on failure."""
        try:
            return cls(**kwargs)
        except FieldError as exc:
            raise self.error(exc.message, prefix + exc.field) from None
        except (TypeError, ValueError) as exc:
            # attrs' built-in validators pass the Attribute along: use its name.
            if len(exc.args) > 1 and isinstance(exc.args[1], attrs.Attribute):
                raise self.error(str(exc.args[0]), prefix + exc.args[1].name) from None
            key = self._find_culprit(fields, kwargs, exc)
            if key is not None:
                raise self.error(_exception_text(exc), prefix + key) from None
            # A check spanning several keys (e.g. in __attrs_post_init__): name the table.
            raise self.error(_exception_text(exc), prefix[:-1]) from None

    @staticmethod
    def _find_culprit(
        fields: List["attrs.Attribute"], kwargs: Dict[str, Any], exc: BaseException
    ) -> Optional[str]:
        """For plain attrs classes: which field's validator rejects its value on its own?

        Plain attrs validators don't say which field failed.  Re-running each one
        without an instance finds it when the check depends on the value alone;
        a validator that needs the instance just fails differently and is skipped.
        """
        for attribute in fields:
            name = _init_name(attribute)
            if attribute.validator is None or attribute.converter is not None or name not in kwargs:
                continue
            try:
                attribute.validator(None, attribute, kwargs[name])
            except type(exc):
                return attribute.name
            except Exception:
                continue
        return None


def table_to_attrs(
    cls: type,
    table: Mapping[str, Any],
    *,
    where: str,
    source: Optional[str] = None,
    base_dir: str = ".",
) -> Any:
    """Build an instance of attrs class ``cls`` from a TOML table, or raise ConfigError.

    ``where`` labels the table in messages (``"[machine]"``,
    ``"[[device]] #2 (kind 'blk')"``), ``source`` is the file name (``None``
    gives ``"<config>"``), and ``base_dir`` is the directory relative ``Path``
    values are resolved against (the TOML file's directory).

    Reports, naming the key: unknown keys (with the known keys and a "did you
    mean"), missing required keys, values of the wrong type, ``Path`` fields with
    ``must_exist`` metadata that don't exist, and failures of the class's own
    validators.  Sub-tables for nested attrs classes are built recursively and
    their keys shown dotted (``[seccomp] filter.mode: ...``).
    """
    return _Builder(source, where, base_dir).build(cls, table)
