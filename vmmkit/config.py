"""The VM configuration: ``vm.toml`` parsed into frozen, validated attrs classes.

A file looks like this (every section is optional)::

    [machine]
    vcpus = 2                # 1..255; overcommit is allowed
    memory = "512M"          # bytes, or K/M/G/T (binary); at least 64M, whole MiB
    on_reboot = "exit"       # "exit" or "restart"
    halt_poll_ns = 1000000   # optional: KVM's halt-poll window for this VM (0..100 ms)

    [boot]                   # without kernel, the VMM boots its default guest
    kernel = "bzImage"       # relative to this file's directory; must exist
    initrd = "initrd.img"
    cmdline = "quiet"        # appended to the VMM's own arguments
    mmio_cmdline = false     # also list virtio-mmio devices on the cmdline (no ACPI)

    [serial]
    output = "stdout"        # "stdout", "none" or a file path
    input = "auto"           # "auto" (stdin when it is a terminal) or "none"

    [plugins]
    disable = ["name"]

    [api]
    socket = "vm.sock"       # serve the control API (HTTP + JSON) on this Unix socket

    [[device]]               # zero or more
    kind = "blk"             # resolved through the device-kind registry
    id = "rootfs"            # optional, unique; generated as kind + number
    path = "disk.img"        # ... keys of the kind's own schema class

    [seccomp]                # any other table: a feature, resolved through its registry

The same classes are the Python API: ``VmSpec.build(machine=MachineSpec(vcpus=2,
memory="1G"), devices=[...])`` is validated exactly like the file.
"""

import os
import re
from typing import Any, Dict, Iterable, List, Literal, Mapping, Optional, Sequence, Tuple, Union

import attrs

from vmmkit.schema import (
    MiB,
    ConfigError,
    FieldError,
    Path,
    Size,
    describe,
    format_size,
    in_range,
    parse_size,
    size_at_least,
    size_multiple_of,
    spec,
    suggest,
    table_to_attrs,
)

try:
    import tomllib
except ImportError:  # Python < 3.11
    import tomli as tomllib  # type: ignore[no-redef]

__all__ = [
    "ConfigError",
    "MachineSpec",
    "BootSpec",
    "SerialSpec",
    "PluginsSpec",
    "ApiSpec",
    "DeviceSpec",
    "VmSpec",
    "CORE_TABLES",
    "load_config",
    "parse_config",
    "parse_size",
    "format_size",
]

#: Below this a Linux guest has no room for the kernel, initrd and page tables.
MIN_MEMORY = 64 * MiB
MAX_HALT_POLL_NS = 100_000_000  # a tenth of a second: any longer is a spinning CPU, not a poll


@spec
class MachineSpec:
    """The virtual machine's shape: CPUs, memory, and what a guest reboot does.

    ``memory`` accepts bytes or a size string (``"1G"``) and holds bytes.
    """

    # At most 255: x86 xAPIC ids are 8 bits wide.  Overcommitting the host's CPUs
    # is allowed, so os.cpu_count() is deliberately not a bound.
    vcpus: int = attrs.field(default=1, validator=in_range(1, 255))
    # Whole MiB: guest RAM is mapped with KVM in page-aligned slots and described
    # in the e820 map; MiB granularity keeps both simple and catches typos like "1.0001G".
    memory: Size = attrs.field(
        default="512M", validator=[size_at_least(MIN_MEMORY), size_multiple_of(MiB)]
    )
    on_reboot: Literal["exit", "restart"] = "exit"
    # Guest RAM is private anonymous memory by default. shared: a memfd mapped shared (another
    # process, e.g. a vhost-user backend, can map it); memory_file: a file, or a directory such
    # as a hugetlbfs mount in which each region gets a fresh unlinked file.
    shared: bool = False
    memory_file: Optional[Path] = None
    # The longest KVM may poll for a wake-up before a halted vCPU sleeps (KVM_CAP_HALT_POLL); unset
    # keeps the KVM module's halt_poll_ns. Longer catches more quick wake-ups (lower latency
    # for request/response traffic) at the cost of host CPU spent spinning; 0 turns polling off.
    halt_poll_ns: Optional[int] = attrs.field(default=None, validator=in_range(0, MAX_HALT_POLL_NS))


@spec
class BootSpec:
    """What to boot.  Without ``kernel`` the VMM boots its default guest.

    ``kernel`` and ``initrd`` are absolute paths once built (relative ones are
    resolved against the TOML file's directory) and must exist.  ``cmdline`` is
    appended to the arguments the VMM itself passes to the kernel.
    """

    kernel: Optional[Path] = attrs.field(default=None, metadata={"must_exist": True})
    initrd: Optional[Path] = attrs.field(default=None, metadata={"must_exist": True})
    cmdline: str = attrs.field(default="")
    # For kernels without ACPI: virtio-mmio devices are then also announced with
    # virtio_mmio.device= arguments, since the kernel can't find them otherwise.
    mmio_cmdline: bool = False

    @cmdline.validator
    def _no_nul(self, attribute: Any, value: str) -> None:
        # The kernel command line is a C string: a NUL would silently truncate it.
        if "\0" in value:
            raise ValueError("expected kernel arguments, found a string containing a NUL character")


@spec
class SerialSpec:
    """Where the guest's serial console goes and where its input comes from.

    ``output`` is ``"stdout"``, ``"none"`` or a file path (absolute once built;
    write ``"./none"`` for a file literally called ``none``).  ``input`` is
    ``"auto"`` (stdin when it is a terminal) or ``"none"``.
    """

    output: Union[Literal["stdout", "none"], Path] = "stdout"
    input: Literal["auto", "none"] = "auto"


def _plugin_names(instance: Any, attribute: Any, value: Tuple[str, ...]) -> None:
    for number, name in enumerate(value, start=1):
        if not name.strip():
            raise ValueError(f"item #{number}: expected a plugin name, found {name!r}")


@spec
class PluginsSpec:
    """Plugin selection: ``disable`` lists plugin names not to load.

    Names are not checked here: only the plugin manager knows which exist.
    """

    # A tuple, not a list, so that the frozen spec is really immutable and hashable.
    disable: Tuple[str, ...] = attrs.field(default=(), validator=_plugin_names)


#: sockaddr_un.sun_path holds 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107


def _socket_path(instance: Any, attribute: Any, value: Optional[str]) -> None:
    if value is None:
        return
    if os.path.isdir(value):
        raise ValueError(f"expected a socket path, found the directory {value!r}")
    if len(os.fsencode(value)) > MAX_SOCKET_PATH:
        raise ValueError(
            f"the socket path {value!r} is {len(os.fsencode(value))} bytes long; "
            f"Unix sockets allow at most {MAX_SOCKET_PATH}: choose a shorter path"
        )


@spec
class ApiSpec:
    """The control API (see docs/api.yaml): HTTP/1.1 with JSON bodies on a Unix socket.

    ``socket`` is the socket's path (absolute once built; relative to the
    TOML file's directory), created owner-only (0600) when the VM starts and
    removed when it exits. ``None`` (the default) serves no API.
    ``vmmkit run --api-sock PATH`` sets it from the command line.
    """

    socket: Optional[Path] = attrs.field(default=None, validator=_socket_path)


# Device ids end up in log lines, file names and kernel command lines, so keep
# them to characters that need no quoting anywhere.
_ID_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def _check_id(instance: Any, attribute: Any, value: Optional[str]) -> None:
    if value is not None and not _ID_RE.fullmatch(value):
        raise ValueError(
            f"expected an id made of letters, digits, '_', '-' and '.', found {value!r}"
        )


def _check_kind(instance: Any, attribute: Any, value: str) -> None:
    if not value:
        raise ValueError("expected a device kind, found an empty string")


def _check_options(instance: Any, attribute: Any, value: Any) -> None:
    if not attrs.has(type(value)):
        raise ValueError(
            f"expected an instance of the kind's attrs schema class, found {describe(value)}"
        )


@spec(kw_only=True)
class DeviceSpec:
    """One ``[[device]]``: its kind, its id, and the kind's own options.

    ``options`` is an instance of the attrs class registered for ``kind``.
    ``id`` may be left ``None`` when building from Python: :class:`VmSpec`
    assigns ``f"{kind}{n}"``, the first such id not already taken.
    """

    kind: str = attrs.field(validator=_check_kind)
    id: Optional[str] = attrs.field(default=None, validator=_check_id)
    options: Any = attrs.field(validator=_check_options)


def _assign_ids(devices: Any) -> Tuple[DeviceSpec, ...]:
    """Give every device without an id one (``blk0``, ``blk1``, ...); reject duplicates.

    Explicit ids win: generated ids skip those, so that naming one device never
    changes the name of another.
    """
    if not isinstance(devices, (list, tuple)):
        raise ValueError(f"expected an array of DeviceSpec, found {describe(devices)}")
    owners: Dict[str, int] = {}
    for number, device in enumerate(devices, start=1):
        if not isinstance(device, DeviceSpec):
            raise ValueError(f"item #{number}: expected a DeviceSpec, found {describe(device)}")
        if device.id is not None:
            if device.id in owners:
                raise ValueError(
                    f"duplicate device id {device.id!r} (devices #{owners[device.id]} and #{number})"
                )
            owners[device.id] = number
    taken = set(owners)
    counters: Dict[str, int] = {}
    result = []
    for device in devices:
        if device.id is None:
            n = counters.get(device.kind, 0)
            while f"{device.kind}{n}" in taken:
                n += 1
            counters[device.kind] = n + 1
            taken.add(f"{device.kind}{n}")
            device = attrs.evolve(device, id=f"{device.kind}{n}")
        result.append(device)
    return tuple(result)


#: Top-level tables with a fixed meaning; every other table is a feature table.
CORE_TABLES = ("api", "boot", "device", "machine", "plugins", "serial")
_SECTIONS = {
    "machine": MachineSpec,
    "boot": BootSpec,
    "serial": SerialSpec,
    "plugins": PluginsSpec,
    "api": ApiSpec,
}


def _check_features(instance: Any, attribute: Any, value: Dict[str, Any]) -> None:
    for name, options in value.items():
        if name in CORE_TABLES:
            raise ValueError(f"{name!r} is a core table, not a feature")
        if not attrs.has(type(options)):
            raise ValueError(f"{name}: expected an attrs instance, found {describe(options)}")


@spec(kw_only=True)
class VmSpec:
    """A whole VM: the core sections, the devices, and the feature tables.

    ``features`` maps a feature table's name to its parsed options; only tables
    present in the file appear, so plugins can treat presence as "enabled" and
    use ``features.get(name) or TheirSpec()`` for defaults.  ``source`` is the
    file the spec was read from, or ``None``.  Sections may be passed as
    instances or as dicts of keyword arguments.
    """

    machine: MachineSpec = attrs.field(factory=MachineSpec)
    boot: BootSpec = attrs.field(factory=BootSpec)
    serial: SerialSpec = attrs.field(factory=SerialSpec)
    plugins: PluginsSpec = attrs.field(factory=PluginsSpec)
    api: ApiSpec = attrs.field(factory=ApiSpec)
    devices: Tuple[DeviceSpec, ...] = attrs.field(default=(), converter=_assign_ids)
    features: Dict[str, Any] = attrs.field(factory=dict, validator=_check_features)
    source: Optional[str] = None

    def device(self, id: str) -> DeviceSpec:
        """Return the device with this id (raises ``KeyError`` if there is none)."""
        for device in self.devices:
            if device.id == id:
                return device
        raise KeyError(id)

    @classmethod
    def build(
        cls,
        *,
        machine: Union[MachineSpec, Mapping[str, Any], None] = None,
        boot: Union[BootSpec, Mapping[str, Any], None] = None,
        serial: Union[SerialSpec, Mapping[str, Any], None] = None,
        plugins: Union[PluginsSpec, Mapping[str, Any], None] = None,
        api: Union[ApiSpec, Mapping[str, Any], None] = None,
        devices: Iterable[Union[DeviceSpec, Mapping[str, Any]]] = (),
        features: Optional[Mapping[str, Any]] = None,
        device_kinds: Optional[Mapping[str, type]] = None,
        feature_types: Optional[Mapping[str, type]] = None,
        hints: Optional[Mapping[str, str]] = None,
        base_dir: str = ".",
    ) -> "VmSpec":
        """Assemble a VM from Python, with the same checks and messages as a file.

        Each section is an instance or a dict shaped like its TOML table.  A
        device is a :class:`DeviceSpec` or a dict with ``kind`` (and optional
        ``id``) plus the kind's keys, resolved through ``device_kinds``; a feature
        is an attrs instance or a dict resolved through ``feature_types``.
        Errors are :class:`ConfigError` starting with ``"<config>"``.
        """
        ctx = _Parser(None, base_dir, device_kinds, feature_types, hints)
        sections = {}
        given = {"machine": machine, "boot": boot, "serial": serial, "plugins": plugins, "api": api}
        for name, value in given.items():
            if value is None:
                continue
            sections[name] = ctx.section(name, value) if isinstance(value, Mapping) else value
        device_list = list(devices)
        # Dict entries are numbered by their position among all devices, like in a file.
        built = [
            ctx.device(number, entry) if isinstance(entry, Mapping) else entry
            for number, entry in enumerate(device_list, start=1)
        ]
        ctx.check_ids(built)
        feature_values = {}
        for name, value in (features or {}).items():
            if isinstance(value, Mapping):
                if name not in ctx.features:
                    raise ctx.unknown_table(name, value)
                value = table_to_attrs(ctx.features[name], value, where=f"[{name}]", base_dir=base_dir)
            feature_values[name] = value
        return ctx.make_vm(sections, built, feature_values)


def _is_table(value: Any) -> bool:
    return isinstance(value, Mapping)


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, Mapping) for v in value)


class _Parser:
    """State for one parse: the file name, base directory and the registries."""

    def __init__(
        self,
        source: Optional[str],
        base_dir: str,
        device_kinds: Optional[Mapping[str, type]],
        features: Optional[Mapping[str, type]],
        hints: Optional[Mapping[str, str]],
    ) -> None:
        self.source = source
        self.base_dir = os.path.abspath(base_dir)
        self.kinds = dict(device_kinds or {})
        self.features = dict(features or {})
        self.hints = dict(hints or {})
        self._check_registries()

    def _check_registries(self) -> None:
        # Registry mistakes are programming errors of a plugin, not user errors:
        # they raise ValueError/TypeError, not ConfigError.
        for kind, schema in self.kinds.items():
            if not (isinstance(schema, type) and attrs.has(schema)):
                raise TypeError(f"device kind {kind!r}: schema must be an attrs class, got {schema!r}")
            clash = {"kind", "id"} & {a.name for a in attrs.fields(schema)}
            if clash:
                raise ValueError(
                    f"device kind {kind!r}: schema field {sorted(clash)[0]!r} clashes with the [[device]] key"
                )
        for name, schema in self.features.items():
            if not (isinstance(schema, type) and attrs.has(schema)):
                raise TypeError(f"feature {name!r}: schema must be an attrs class, got {schema!r}")
            if name in CORE_TABLES:
                raise ValueError(f"feature {name!r}: the name is a core table")

    def error(self, detail: str, location: Optional[str] = None, joiner: str = ": ") -> ConfigError:
        return ConfigError(detail, source=self.source, location=location, joiner=joiner)

    def install_hint(self, name: str) -> str:
        hint = self.hints.get(name)
        if not hint:
            return ""
        return f" ({hint})" if hint.startswith("it ") else f" (install it with: {hint})"

    # -- top level ---------------------------------------------------------

    def known_tables(self) -> List[str]:
        # Core tables first, then features: the user sees what vmmkit itself offers
        # apart from what plugins added.
        return sorted(CORE_TABLES) + sorted(self.features)

    def unknown_table(self, name: str, value: Any) -> ConfigError:
        known = self.known_tables()
        label = f"[[{name}]]" if _is_table_array(value) else f"[{name}]"
        detail = f"unknown table {label}; known tables: {', '.join(known)}"
        if name in self.kinds:
            detail += f" ({name!r} is a device kind: write [[device]] with kind = {name!r})"
        else:
            detail += suggest(name, known, fmt="[{}]") + self.install_hint(name)
        return self.error(detail)

    def unknown_key(self, name: str, value: Any) -> ConfigError:
        # A top-level key usually means a missing [table] header above it.
        owners = [table for table, schema in _SECTIONS.items() if name in attrs.fields_dict(schema)]
        detail = f"unknown top-level key {name!r}; settings belong in a table such as [machine]"
        if owners:
            detail += f" (did you mean [{owners[0]}] {name}?)"
        return self.error(detail)

    def parse(self, data: Any) -> VmSpec:
        if not isinstance(data, Mapping):
            raise self.error(f"expected a table at the top level, found {describe(data)}")
        for name, value in data.items():
            if name in CORE_TABLES or name in self.features:
                continue
            if _is_table(value) or _is_table_array(value):
                raise self.unknown_table(name, value)
            raise self.unknown_key(name, value)
        sections = {name: self.section(name, data[name]) for name in _SECTIONS if name in data}
        devices = self.devices(data.get("device", []))
        features = {
            name: self.feature(name, data[name]) for name in sorted(self.features) if name in data
        }
        return self.make_vm(sections, devices, features)

    def reject_table_array(self, name: str, table: Any) -> None:
        if isinstance(table, list):
            raise self.error(
                f"expected a single table [{name}], found an array of tables [[{name}]]", f"[{name}]"
            )

    def section(self, name: str, table: Any) -> Any:
        self.reject_table_array(name, table)
        return table_to_attrs(
            _SECTIONS[name], table, where=f"[{name}]", source=self.source, base_dir=self.base_dir
        )

    def feature(self, name: str, table: Any) -> Any:
        self.reject_table_array(name, table)
        return table_to_attrs(
            self.features[name], table, where=f"[{name}]", source=self.source, base_dir=self.base_dir
        )

    def make_vm(
        self, sections: Dict[str, Any], devices: List[DeviceSpec], features: Dict[str, Any]
    ) -> VmSpec:
        try:
            return VmSpec(**sections, devices=tuple(devices), features=features, source=self.source)
        except FieldError as exc:
            # Reached from VmSpec.build with a bad instance; files are caught earlier.
            raise self.error(exc.message, exc.field) from None

    # -- devices -----------------------------------------------------------

    def devices(self, entries: Any) -> List[DeviceSpec]:
        if isinstance(entries, Mapping):
            # [device] instead of [[device]]: TOML parses it, so explain the difference.
            raise self.error(
                "expected an array of tables, found a single table; "
                "write [[device]] (double brackets) for each device",
                "[device]",
            )
        if not isinstance(entries, list):
            raise self.error(
                f"expected an array of tables [[device]], found {describe(entries)}", "device"
            )
        devices = [self.device(number, entry) for number, entry in enumerate(entries, start=1)]
        self.check_ids(devices)
        return devices

    def device(self, number: int, entry: Any) -> DeviceSpec:
        where = f"[[device]] #{number}"
        if not isinstance(entry, Mapping):
            raise self.error(f"expected a table, found {describe(entry)}", where)
        if "kind" not in entry:
            raise self.error("required key missing", f"{where} kind")
        kind = entry["kind"]
        if not isinstance(kind, str):
            raise self.error(f"expected a string, found {describe(kind)}", f"{where} kind")
        if kind not in self.kinds:
            known = ", ".join(sorted(self.kinds)) or "none"
            raise self.error(
                f"unknown device kind {kind!r}; known kinds: {known}"
                + suggest(kind, self.kinds)
                + self.install_hint(kind),
                where,
            )
        where = f"{where} (kind {kind!r})"
        device_id = entry.get("id")
        if "id" in entry:
            if not isinstance(device_id, str):
                raise self.error(f"expected a string, found {describe(device_id)}", f"{where} id")
            try:
                _check_id(None, None, device_id)
            except ValueError as exc:
                raise self.error(str(exc), f"{where} id") from None
        options = {key: value for key, value in entry.items() if key not in ("kind", "id")}
        parsed = table_to_attrs(
            self.kinds[kind], options, where=where, source=self.source, base_dir=self.base_dir
        )
        return DeviceSpec(kind=kind, id=device_id, options=parsed)

    def check_ids(self, devices: Sequence[DeviceSpec]) -> None:
        """Reject duplicate explicit ids, naming both devices (ids are generated later)."""
        owners: Dict[str, int] = {}
        for number, device in enumerate(devices, start=1):
            if device.id is None:
                continue
            if device.id in owners:
                raise self.error(
                    f"duplicate id {device.id!r} (already used by [[device]] #{owners[device.id]})",
                    f"[[device]] #{number} (kind {device.kind!r}) id",
                )
            owners[device.id] = number


def parse_config(
    data: Mapping[str, Any],
    *,
    source: Optional[str] = None,
    base_dir: str = ".",
    device_kinds: Optional[Mapping[str, type]] = None,
    features: Optional[Mapping[str, type]] = None,
    hints: Optional[Mapping[str, str]] = None,
) -> VmSpec:
    """Build a :class:`VmSpec` from an already-parsed TOML document.

    ``source`` names the file in messages (``None`` gives ``"<config>"``),
    ``base_dir`` is where relative paths start, ``device_kinds`` maps a
    ``[[device]]`` kind to its attrs schema class, ``features`` maps a feature
    table name to its attrs schema class, and ``hints`` maps a kind or feature
    name that may be missing to an install command (``"pip install vmmkit-foo"``)
    that is shown when the user names it but no plugin registered it.

    Raises :class:`ConfigError` for any mistake in the document, and
    ``TypeError``/``ValueError`` for malformed registries (a plugin bug).
    """
    return _Parser(source, base_dir, device_kinds, features, hints).parse(data)


_TOML_POSITION = re.compile(r"^(.*) \(at (?:line (\d+), column (\d+)|end of document)\)$", re.S)


def _toml_error(exc: Exception, text: str, source: str) -> ConfigError:
    """Reformat tomllib's "msg (at line L, column C)" as "line L, column C: invalid TOML: msg"."""
    message = str(exc)
    line = getattr(exc, "lineno", None)  # Python 3.14+ has structured attributes
    column = getattr(exc, "colno", None)
    match = _TOML_POSITION.match(message)
    if match:
        message = match.group(1)
        if match.group(2):
            line, column = int(match.group(2)), int(match.group(3))
        else:
            lines = text.splitlines() or [""]
            line, column = len(lines), len(lines[-1]) + 1
    else:
        message = getattr(exc, "msg", message)
    if line is None:
        return ConfigError(f"invalid TOML: {message}", source=source)
    detail = f"invalid TOML: {message}"
    lines = text.splitlines()
    if 1 <= line <= len(lines):
        # Show the offending line with a caret, keeping tabs so the caret lines up.
        shown = lines[line - 1]
        pad = "".join("\t" if ch == "\t" else " " for ch in shown[: max(column - 1, 0)])
        detail += f"\n    {shown}\n    {pad}^"
    return ConfigError(detail, source=source, location=f"line {line}, column {column}")


def load_config(
    path: Union[str, "os.PathLike[str]"],
    *,
    device_kinds: Optional[Mapping[str, type]] = None,
    features: Optional[Mapping[str, type]] = None,
    hints: Optional[Mapping[str, str]] = None,
) -> VmSpec:
    """Read a TOML file and return its :class:`VmSpec`.

    Messages name the file as given (``vm.toml``, not an absolute path) because
    that is what the user typed; relative paths inside the file are resolved
    against the file's directory.  See :func:`parse_config` for the registries.
    Raises :class:`ConfigError` when the file can't be read, isn't valid TOML,
    or describes an invalid VM.
    """
    source = os.fspath(path)
    try:
        with open(source, "rb") as handle:
            raw = handle.read()
    except FileNotFoundError:
        raise ConfigError("file not found", source=source) from None
    except IsADirectoryError:
        raise ConfigError("is a directory, expected a TOML file", source=source) from None
    except OSError as exc:
        raise ConfigError(f"cannot read the file: {exc.strerror or exc}", source=source) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(
            "invalid TOML: the file is not UTF-8 text", source=source, location=f"line {line}"
        ) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _toml_error(exc, text, source) from None
    base_dir = os.path.dirname(os.path.abspath(source))
    return parse_config(
        data, source=source, base_dir=base_dir, device_kinds=device_kinds, features=features, hints=hints
    )
