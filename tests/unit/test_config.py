"""Tests for vmmkit.config and vmmkit.schema: parsing vm.toml and its error messages."""

import os
import textwrap
from typing import List, Literal, Optional, Tuple

import attrs
import pytest

from vmmkit.config import (
    BootSpec,
    ConfigError,
    DeviceSpec,
    MachineSpec,
    PluginsSpec,
    SerialSpec,
    VmSpec,
    load_config,
    parse_config,
    parse_size,
)
from vmmkit.errors import VmmkitError
from vmmkit.schema import (
    GiB,
    MiB,
    FieldError,
    Path,
    Size,
    format_size,
    in_range,
    spec,
    table_to_attrs,
)

# --------------------------------------------------------------------------
# Schema classes standing in for plugins
# --------------------------------------------------------------------------


@spec
class BlkSpec:
    """A block device: an image file that must exist."""

    path: Path = attrs.field(metadata={"must_exist": True})
    readonly: bool = False


@spec
class VsockSpec:
    """A vsock device."""

    cid: int = attrs.field(default=3, validator=in_range(3, 0xFFFFFFFF))


@spec
class CacheSpec:
    """A nested sub-table of a plugin's table."""

    size: Size = "1M"
    mode: Literal["writeback", "writethrough"] = "writeback"


@spec
class FancySpec:
    """A plugin table using every kind of field type."""

    mode: Literal["fast", "safe"] = "safe"
    names: List[str] = attrs.field(factory=list)
    ports: Tuple[int, ...] = ()
    limit: Optional[Size] = None
    ratio: float = 1.0
    log: Optional[Path] = None
    cache: CacheSpec = attrs.field(factory=CacheSpec)


@spec
class SeccompSpec:
    """A feature table."""

    mode: Literal["kill", "log", "off"] = "kill"
    allow: Tuple[str, ...] = ()


@attrs.frozen
class PlainSpec:
    """A plugin using plain attrs, without vmmkit.schema.spec."""

    count: int = attrs.field(default=1)
    level: int = attrs.field(default=0)

    @level.validator
    def _check_level(self, attribute, value):
        if value > 9:
            raise ValueError(f"expected a level from 0 to 9, found {value}")


KINDS = {"blk": BlkSpec, "vsock": VsockSpec}
FEATURES = {"seccomp": SeccompSpec}


def write(tmp_path, text, name="vm.toml"):
    """Write a TOML file into tmp_path and return its path."""
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def load(tmp_path, text, **kwargs):
    """Load TOML text from a file in tmp_path, chdir'd there so messages say 'vm.toml'."""
    write(tmp_path, text)
    kwargs.setdefault("device_kinds", KINDS)
    kwargs.setdefault("features", FEATURES)
    return load_config("vm.toml", **kwargs)


def error(tmp_path, text, **kwargs):
    """Load TOML text that must fail; return the message."""
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text, **kwargs)
    return str(info.value)


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    """Run each test from tmp_path so that relative file names are short and stable."""
    monkeypatch.chdir(tmp_path)


# --------------------------------------------------------------------------
# Happy paths
# --------------------------------------------------------------------------


def test_full_file(tmp_path):
    (tmp_path / "bzImage").write_bytes(b"kernel")
    (tmp_path / "initrd.img").write_bytes(b"initrd")
    (tmp_path / "disk.img").write_bytes(b"disk")
    vm = load(
        tmp_path,
        """
        [machine]
        vcpus = 4
        memory = "2G"
        on_reboot = "restart"

        [boot]
        kernel = "bzImage"
        initrd = "initrd.img"
        cmdline = "quiet loglevel=3"
        mmio_cmdline = true

        [serial]
        output = "console.log"
        input = "none"

        [plugins]
        disable = ["metrics", "balloon"]

        [[device]]
        kind = "blk"
        id = "rootfs"
        path = "disk.img"
        readonly = true

        [[device]]
        kind = "vsock"
        cid = 42

        [seccomp]
        mode = "log"
        allow = ["ioctl"]
        """,
    )
    base = str(tmp_path)
    assert vm.machine == MachineSpec(vcpus=4, memory=2 * GiB, on_reboot="restart")
    assert vm.boot.kernel == os.path.join(base, "bzImage")
    assert vm.boot.initrd == os.path.join(base, "initrd.img")
    assert vm.boot.cmdline == "quiet loglevel=3"
    assert vm.boot.mmio_cmdline is True
    assert vm.serial == SerialSpec(output=os.path.join(base, "console.log"), input="none")
    assert vm.plugins.disable == ("metrics", "balloon")
    assert [d.id for d in vm.devices] == ["rootfs", "vsock0"]
    assert vm.devices[0].options == BlkSpec(path=os.path.join(base, "disk.img"), readonly=True)
    assert vm.devices[1].options == VsockSpec(cid=42)
    assert vm.device("rootfs").kind == "blk"
    assert vm.features == {"seccomp": SeccompSpec(mode="log", allow=("ioctl",))}
    assert vm.source == "vm.toml"


def test_empty_file_gives_defaults(tmp_path):
    vm = load(tmp_path, "")
    assert vm.machine.vcpus == 1
    assert vm.machine.memory == 512 * MiB
    assert vm.machine.on_reboot == "exit"
    assert vm.boot == BootSpec(kernel=None, initrd=None, cmdline="", mmio_cmdline=False)
    assert vm.serial.output == "stdout"
    assert vm.serial.input == "auto"
    assert vm.plugins.disable == ()
    assert vm.devices == ()
    assert vm.features == {}
    assert vm == VmSpec(source="vm.toml")


def test_parse_config_from_dict_without_file():
    vm = parse_config({"machine": {"vcpus": 2}})
    assert vm.machine.vcpus == 2
    assert vm.source is None
    with pytest.raises(ConfigError) as info:
        parse_config({"machine": {"vcpus": "two"}})
    assert str(info.value) == "<config>: [machine] vcpus: expected an integer, found 'two'"


def test_config_error_is_a_vmmkit_error():
    assert issubclass(ConfigError, VmmkitError)


# --------------------------------------------------------------------------
# The error messages
# --------------------------------------------------------------------------


def test_bad_size_message(tmp_path):
    message = error(tmp_path, '[machine]\nmemory = "lots"\n')
    assert message == "vm.toml: [machine] memory: expected a size like '512M' or '2G', found 'lots'"


def test_missing_required_device_key(tmp_path):
    (tmp_path / "disk.img").write_bytes(b"")
    message = error(
        tmp_path,
        """
        [[device]]
        kind = "blk"
        path = "disk.img"

        [[device]]
        kind = "blk"
        """,
    )
    assert message == "vm.toml: [[device]] #2 (kind 'blk') path: required key missing"


def test_unknown_key_with_suggestion(tmp_path):
    message = error(tmp_path, "[machine]\nvcpu = 2\n")
    assert message == (
        "vm.toml: [machine] unknown key 'vcpu'; known keys: halt_poll_ns, memory, memory_file, on_reboot, shared, vcpus "
        "(did you mean 'vcpus'?)"
    )


def test_invalid_toml_reports_line_and_column(tmp_path):
    message = error(tmp_path, "[machine]\nvcpus = 2\nmemory = lots\n")
    first = message.splitlines()[0]
    assert first.startswith("vm.toml: line 3, column 10: invalid TOML: ")
    assert "Invalid value" in first
    # The offending line is quoted with a caret under the column.
    assert message.splitlines()[1:] == ["    memory = lots", "             ^"]


def test_invalid_toml_at_end_of_document(tmp_path):
    message = error(tmp_path, '[boot]\ncmdline = "unterminated')
    assert message.startswith("vm.toml: line 2, column ")
    assert "invalid TOML: Unterminated string" in message


def test_unknown_device_kind(tmp_path):
    message = error(tmp_path, '[[device]]\nkind = "bkl"\n')
    assert message == (
        "vm.toml: [[device]] #1: unknown device kind 'bkl'; known kinds: blk, vsock (did you mean 'blk'?)"
    )


def test_unknown_device_kind_with_install_hint(tmp_path):
    message = error(tmp_path, '[[device]]\nkind = "gpu"\n', hints={"gpu": "pip install vmmkit-gpu"})
    assert message == (
        "vm.toml: [[device]] #1: unknown device kind 'gpu'; known kinds: blk, vsock "
        "(install it with: pip install vmmkit-gpu)"
    )


def test_unknown_table(tmp_path):
    message = error(tmp_path, "[secomp]\n")
    assert message.startswith(
        "vm.toml: unknown table [secomp]; known tables: api, boot, device, machine, plugins, serial, seccomp"
    )
    assert message.endswith("(did you mean [seccomp]?)")


def test_unknown_feature_table_with_install_hint(tmp_path):
    message = error(tmp_path, "[gpu]\n", hints={"gpu": "pip install vmmkit-gpu"})
    assert message.startswith("vm.toml: unknown table [gpu]; known tables: ")
    assert message.endswith("(install it with: pip install vmmkit-gpu)")


def test_device_kind_written_as_a_table(tmp_path):
    message = error(tmp_path, "[blk]\n")
    assert "unknown table [blk]" in message
    assert "write [[device]] with kind = 'blk'" in message


def test_top_level_key_points_at_its_table(tmp_path):
    message = error(tmp_path, "vcpus = 2\n")
    assert message.startswith("vm.toml: unknown top-level key 'vcpus'")
    assert "(did you mean [machine] vcpus?)" in message


def test_single_bracket_device_table(tmp_path):
    message = error(tmp_path, '[device]\nkind = "blk"\n')
    assert message.startswith("vm.toml: [device]: expected an array of tables")
    assert "[[device]]" in message


def test_device_without_kind(tmp_path):
    message = error(tmp_path, '[[device]]\nid = "x"\n')
    assert message == "vm.toml: [[device]] #1 kind: required key missing"


def test_device_unknown_option_key(tmp_path):
    message = error(tmp_path, '[[device]]\nkind = "vsock"\ncld = 5\n')
    assert message == (
        "vm.toml: [[device]] #1 (kind 'vsock') unknown key 'cld'; known keys: cid (did you mean 'cid'?)"
    )


def test_device_option_validator_names_the_key(tmp_path):
    message = error(tmp_path, '[[device]]\nkind = "vsock"\ncid = 2\n')
    assert message == (
        "vm.toml: [[device]] #1 (kind 'vsock') cid: expected a value from 3 to 4294967295, found 2"
    )


def test_literal_choices(tmp_path):
    message = error(tmp_path, '[machine]\non_reboot = "reboot"\n')
    assert message == "vm.toml: [machine] on_reboot: expected one of 'exit', 'restart', found 'reboot'"
    message = error(tmp_path, '[machine]\non_reboot = "restar"\n')
    assert message.endswith("found 'restar' (did you mean 'restart'?)")


def test_bool_is_not_an_int(tmp_path):
    message = error(tmp_path, "[machine]\nvcpus = true\n")
    assert message == "vm.toml: [machine] vcpus: expected an integer, found true"
    with pytest.raises(FieldError, match="vcpus: expected an integer, found true"):
        MachineSpec(vcpus=True)


def test_vcpus_range(tmp_path):
    assert load(tmp_path, "[machine]\nvcpus = 255\n").machine.vcpus == 255
    message = error(tmp_path, "[machine]\nvcpus = 256\n")
    assert message == "vm.toml: [machine] vcpus: expected a value from 1 to 255, found 256"
    message = error(tmp_path, "[machine]\nvcpus = 0\n")
    assert message == "vm.toml: [machine] vcpus: expected a value from 1 to 255, found 0"


def test_halt_poll_ns(tmp_path):
    assert load(tmp_path, "").machine.halt_poll_ns is None  # the kvm module's own setting
    assert load(tmp_path, "[machine]\nhalt_poll_ns = 0\n").machine.halt_poll_ns == 0
    assert load(tmp_path, "[machine]\nhalt_poll_ns = 1000000\n").machine.halt_poll_ns == 1_000_000
    message = error(tmp_path, "[machine]\nhalt_poll_ns = -1\n")
    assert message == "vm.toml: [machine] halt_poll_ns: expected a value from 0 to 100000000, found -1"
    message = error(tmp_path, "[machine]\nhalt_poll_ns = 200000000\n")
    assert message == "vm.toml: [machine] halt_poll_ns: expected a value from 0 to 100000000, found 200000000"
    message = error(tmp_path, '[machine]\nhalt_poll_ns = "1ms"\n')
    assert message == "vm.toml: [machine] halt_poll_ns: expected an integer, found '1ms'"


def test_memory_minimum_and_granularity(tmp_path):
    message = error(tmp_path, '[machine]\nmemory = "32M"\n')
    assert message == "vm.toml: [machine] memory: expected at least 64M, found 32M"
    message = error(tmp_path, "[machine]\nmemory = 67109888\n")  # 64M + 1K
    assert message.startswith("vm.toml: [machine] memory: expected a multiple of 1M, found 67109888 bytes")


def test_wrong_table_type(tmp_path):
    message = error(tmp_path, "machine = 3\n")
    assert message == "vm.toml: [machine]: expected a table, found 3"
    message = error(tmp_path, "[[machine]]\nvcpus = 2\n")
    assert message == "vm.toml: [machine]: expected a single table [machine], found an array of tables [[machine]]"


def test_serial_output_type(tmp_path):
    message = error(tmp_path, "[serial]\noutput = 1\n")
    assert message == "vm.toml: [serial] output: expected one of 'stdout', 'none' or a file path, found 1"


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"^nope\.toml: file not found$"):
        load_config("nope.toml")
    (tmp_path / "dir.toml").mkdir()
    with pytest.raises(ConfigError, match=r"^dir\.toml: is a directory"):
        load_config("dir.toml")
    (tmp_path / "bin.toml").write_bytes(b"[machine]\n\xff\xfe = 1\n")
    with pytest.raises(ConfigError, match=r"^bin\.toml: line 2: invalid TOML: the file is not UTF-8"):
        load_config("bin.toml")


# --------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("512M", 512 * MiB),
        ("2G", 2 * GiB),
        (1048576, MiB),
        ("1.5G", 1536 * MiB),
        ("1048576", MiB),
        ("4k", 4096),
        ("64MiB", 64 * MiB),
        ("1T", 1 << 40),
        (" 8 M ", 8 * MiB),
    ],
)
def test_parse_size_accepts(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "value, fragment",
    [
        ("12Q", "found '12Q' (unknown unit 'Q'"),
        ("512MB", "unknown unit 'MB'"),
        (-1, "expected a positive size, found -1"),
        ("0", "expected a positive size, found '0'"),
        (0, "expected a positive size, found 0"),
        (True, "expected a size like '512M' or '2G', found true"),
        (1.5, "expected a size like '512M' or '2G', found 1.5"),
        ("lots", "expected a size like '512M' or '2G', found 'lots'"),
        ("", "found ''"),
        ("1.1K", "not a whole number of bytes"),
        ("-5M", "found '-5M'"),
    ],
)
def test_parse_size_rejects(value, fragment):
    with pytest.raises(ValueError) as info:
        parse_size(value)
    assert fragment in str(info.value)


def test_size_in_a_file(tmp_path):
    assert load(tmp_path, '[machine]\nmemory = "1.5G"\n').machine.memory == 1536 * MiB
    assert load(tmp_path, "[machine]\nmemory = 1073741824\n").machine.memory == GiB
    message = error(tmp_path, '[machine]\nmemory = "12Q"\n')
    assert message.startswith("vm.toml: [machine] memory: expected a size like '512M' or '2G', found '12Q'")
    message = error(tmp_path, "[machine]\nmemory = -1\n")
    assert message == "vm.toml: [machine] memory: expected a positive size, found -1"
    message = error(tmp_path, "[machine]\nmemory = true\n")
    assert message == "vm.toml: [machine] memory: expected a size like '512M' or '2G', found true"


def test_format_size():
    assert format_size(512 * MiB) == "512M"
    assert format_size(1536 * MiB) == "1536M"
    assert format_size(2 * GiB) == "2G"
    assert format_size(1000) == "1000"
    assert parse_size(format_size(3 * 1024 + 0)) == 3 * 1024


# --------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------


def test_relative_paths_resolve_against_the_toml_directory(tmp_path, monkeypatch):
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "images").mkdir()
    (conf / "images" / "vmlinux").write_bytes(b"")
    write(conf, '[boot]\nkernel = "images/vmlinux"\n[serial]\noutput = "../logs/serial.log"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    vm = load_config(conf / "vm.toml")
    assert vm.boot.kernel == str(conf / "images" / "vmlinux")
    assert vm.serial.output == str(tmp_path / "logs" / "serial.log")


def test_absolute_paths_are_kept(tmp_path):
    kernel = tmp_path / "k"
    kernel.write_bytes(b"")
    vm = load(tmp_path, f'[boot]\nkernel = "{kernel}"\n')
    assert vm.boot.kernel == str(kernel)


def test_missing_kernel_file(tmp_path):
    message = error(tmp_path, '[boot]\nkernel = "nowhere/bzImage"\n')
    assert message.startswith("vm.toml: [boot] kernel: file not found: ")
    assert repr(str(tmp_path / "nowhere" / "bzImage")) in message
    assert f"('nowhere/bzImage' is relative to {tmp_path})" in message


def test_missing_device_image(tmp_path):
    message = error(tmp_path, '[[device]]\nkind = "blk"\npath = "missing.img"\n')
    assert message.startswith("vm.toml: [[device]] #1 (kind 'blk') path: file not found: ")


def test_paths_from_python_resolve_against_cwd(tmp_path):
    (tmp_path / "vmlinux").write_bytes(b"")
    assert BootSpec(kernel="vmlinux").kernel == str(tmp_path / "vmlinux")
    with pytest.raises(FieldError, match="kernel: file not found"):
        BootSpec(kernel="missing")


# --------------------------------------------------------------------------
# Devices
# --------------------------------------------------------------------------


def test_duplicate_device_ids(tmp_path):
    message = error(
        tmp_path,
        """
        [[device]]
        kind = "vsock"
        id = "v"

        [[device]]
        kind = "vsock"
        id = "v"
        cid = 4
        """,
    )
    assert message == "vm.toml: [[device]] #2 (kind 'vsock') id: duplicate id 'v' (already used by [[device]] #1)"


def test_generated_ids_skip_explicit_ones(tmp_path):
    vm = load(
        tmp_path,
        """
        [[device]]
        kind = "vsock"

        [[device]]
        kind = "vsock"
        id = "vsock0"
        cid = 4

        [[device]]
        kind = "vsock"
        cid = 5
        """,
    )
    assert [d.id for d in vm.devices] == ["vsock1", "vsock0", "vsock2"]


def test_bad_device_id(tmp_path):
    message = error(tmp_path, '[[device]]\nkind = "vsock"\nid = "my disk"\n')
    assert message.startswith("vm.toml: [[device]] #1 (kind 'vsock') id: expected an id made of")
    message = error(tmp_path, '[[device]]\nkind = "vsock"\nid = 7\n')
    assert message == "vm.toml: [[device]] #1 (kind 'vsock') id: expected a string, found 7"


def test_device_entry_must_be_a_table():
    with pytest.raises(ConfigError) as info:
        parse_config({"device": [3]}, device_kinds=KINDS)
    assert str(info.value) == "<config>: [[device]] #1: expected a table, found 3"


def test_registry_mistakes_are_programming_errors():
    @attrs.frozen
    class Clashing:
        id: str = "x"

    with pytest.raises(ValueError, match="clashes"):
        parse_config({}, device_kinds={"c": Clashing})
    with pytest.raises(TypeError):
        parse_config({}, device_kinds={"c": dict})
    with pytest.raises(ValueError, match="core table"):
        parse_config({}, features={"machine": SeccompSpec})


# --------------------------------------------------------------------------
# Plugin schemas
# --------------------------------------------------------------------------


def test_plugin_schema_with_all_field_kinds(tmp_path):
    vm = load(
        tmp_path,
        """
        [fancy]
        mode = "fast"
        names = ["a", "b"]
        ports = [80, 443]
        limit = "2M"
        ratio = 2
        log = "fancy.log"
        cache.size = "4M"
        """,
        features={"fancy": FancySpec},
    )
    fancy = vm.features["fancy"]
    assert fancy == FancySpec(
        mode="fast",
        names=["a", "b"],
        ports=(80, 443),
        limit=2 * MiB,
        ratio=2.0,
        log=str(tmp_path / "fancy.log"),
        cache=CacheSpec(size=4 * MiB),
    )
    assert isinstance(fancy.ratio, float)
    assert load(tmp_path, "[fancy]\n", features={"fancy": FancySpec}).features["fancy"] == FancySpec()


@pytest.mark.parametrize(
    "body, expected",
    [
        ('mode = "turbo"', "[fancy] mode: expected one of 'fast', 'safe', found 'turbo'"),
        ('names = "a"', "[fancy] names: expected an array of strings, found 'a'"),
        ('names = ["a", 1]', "[fancy] names: item #2: expected a string, found 1"),
        ("ports = [80, true]", "[fancy] ports: item #2: expected an integer, found true"),
        ('limit = "x"', "[fancy] limit: expected a size like '512M' or '2G', found 'x'"),
        ('ratio = "1"', "[fancy] ratio: expected a number, found '1'"),
        ("log = 5", "[fancy] log: expected a file path, found 5"),
        ('cache.mode = "x"', "[fancy] cache.mode: expected one of 'writeback', 'writethrough', found 'x'"),
        ("cache.sise = 1", "[fancy] cache: unknown key 'sise'; known keys: mode, size (did you mean 'size'?)"),
        ("cache = 3", "[fancy] cache: expected a table, found 3"),
    ],
)
def test_plugin_schema_errors(tmp_path, body, expected):
    message = error(tmp_path, f"[fancy]\n{body}\n", features={"fancy": FancySpec})
    assert message == f"vm.toml: {expected}"


def test_plain_attrs_class_is_checked_by_table_to_attrs():
    assert table_to_attrs(PlainSpec, {"count": 2}, where="[plain]") == PlainSpec(count=2)
    with pytest.raises(ConfigError) as info:
        table_to_attrs(PlainSpec, {"count": False}, where="[plain]", source="x.toml")
    assert str(info.value) == "x.toml: [plain] count: expected an integer, found false"
    # A plain attrs validator doesn't name its field; table_to_attrs finds it anyway.
    with pytest.raises(ConfigError) as info:
        table_to_attrs(PlainSpec, {"level": 10}, where="[plain]")
    assert str(info.value) == "<config>: [plain] level: expected a level from 0 to 9, found 10"


def test_attrs_builtin_validators_name_the_key():
    @attrs.frozen
    class WithBuiltin:
        name: str = attrs.field(default="a", validator=attrs.validators.in_(["a", "b"]))

    with pytest.raises(ConfigError) as info:
        table_to_attrs(WithBuiltin, {"name": "c"}, where="[w]")
    assert str(info.value).startswith("<config>: [w] name: ")


def test_cross_field_check_names_the_table():
    @spec
    class Window:
        low: int = 0
        high: int = 10

        def __attrs_post_init__(self):
            if self.low > self.high:
                raise ValueError("expected low <= high")

    with pytest.raises(ConfigError) as info:
        table_to_attrs(Window, {"low": 11}, where="[window]", source="vm.toml")
    assert str(info.value) == "vm.toml: [window]: expected low <= high"


def test_features_table(tmp_path):
    vm = load(tmp_path, '[seccomp]\nmode = "off"\n')
    assert vm.features == {"seccomp": SeccompSpec(mode="off")}
    message = error(tmp_path, '[seccomp]\nmode = "of"\n')
    assert message == "vm.toml: [seccomp] mode: expected one of 'kill', 'log', 'off', found 'of' (did you mean 'off'?)"
    # Feature tables absent from the file are absent from features.
    assert load(tmp_path, "").features == {}


def test_disable_list(tmp_path):
    vm = load(tmp_path, '[plugins]\ndisable = ["balloon", "metrics"]\n')
    assert vm.plugins == PluginsSpec(disable=("balloon", "metrics"))
    message = error(tmp_path, '[plugins]\ndisable = "balloon"\n')
    assert message == "vm.toml: [plugins] disable: expected an array of strings, found 'balloon'"
    message = error(tmp_path, '[plugins]\ndisable = [""]\n')
    assert message == "vm.toml: [plugins] disable: item #1: expected a plugin name, found ''"


# --------------------------------------------------------------------------
# Building from Python
# --------------------------------------------------------------------------


def test_python_construction_validates():
    machine = MachineSpec(vcpus=2, memory="1G")
    assert machine.memory == GiB
    with pytest.raises(ValueError, match="memory: expected a size"):
        MachineSpec(memory="lots")
    with pytest.raises(TypeError):  # FieldError is also a TypeError
        SerialSpec(input="tty")
    assert attrs.evolve(machine, memory="2G").memory == 2 * GiB
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        machine.vcpus = 3


def test_vmspec_build(tmp_path):
    vm = VmSpec.build(
        machine=MachineSpec(vcpus=2, memory="1G"),
        serial={"output": "none"},
        devices=[
            DeviceSpec(kind="vsock", options=VsockSpec()),
            {"kind": "vsock", "cid": 9},
            DeviceSpec(kind="vsock", id="vsock0", options=VsockSpec(cid=4)),
        ],
        features={"seccomp": {"mode": "log"}},
        device_kinds=KINDS,
        feature_types=FEATURES,
    )
    assert vm.machine.memory == GiB
    assert vm.serial.output == "none"
    assert [d.id for d in vm.devices] == ["vsock1", "vsock2", "vsock0"]
    assert vm.devices[1].options == VsockSpec(cid=9)
    assert vm.features == {"seccomp": SeccompSpec(mode="log")}
    assert vm.source is None


def test_vmspec_build_errors():
    with pytest.raises(ConfigError) as info:
        VmSpec.build(machine={"vcpus": 0})
    assert str(info.value) == "<config>: [machine] vcpus: expected a value from 1 to 255, found 0"
    with pytest.raises(ConfigError) as info:
        VmSpec.build(devices=[{"kind": "nope"}], device_kinds=KINDS)
    assert str(info.value).startswith("<config>: [[device]] #1: unknown device kind 'nope'")
    with pytest.raises(ConfigError) as info:
        VmSpec.build(
            devices=[
                DeviceSpec(kind="vsock", id="a", options=VsockSpec()),
                DeviceSpec(kind="vsock", id="a", options=VsockSpec()),
            ]
        )
    assert "duplicate id 'a'" in str(info.value)


def test_vmspec_direct_construction_checks_devices():
    with pytest.raises(ValueError, match="duplicate device id 'x'"):
        VmSpec(
            devices=[
                DeviceSpec(kind="vsock", id="x", options=VsockSpec()),
                DeviceSpec(kind="vsock", id="x", options=VsockSpec()),
            ]
        )
    with pytest.raises(ValueError, match="expected a DeviceSpec"):
        VmSpec(devices=["blk"])
    with pytest.raises(ValueError, match="options: expected an instance"):
        DeviceSpec(kind="blk", options={"path": "x"})
    assert VmSpec(machine={"vcpus": 3}).machine.vcpus == 3


def test_cmdline_rejects_nul(tmp_path):
    message = error(tmp_path, '[boot]\ncmdline = "a\\u0000b"\n')
    assert message == "vm.toml: [boot] cmdline: expected kernel arguments, found a string containing a NUL character"


def test_memory_backing_options(tmp_path):
    (tmp_path / "hugepages").mkdir()
    path = tmp_path / "vm.toml"
    path.write_text('[machine]\nshared = true\nmemory_file = "hugepages"\n')
    vm = load_config(str(path))
    assert vm.machine.shared is True
    assert vm.machine.memory_file == str(tmp_path / "hugepages")  # relative to the TOML file
    assert error(tmp_path, "[machine]\nshared = \"yes\"\n") == \
        "vm.toml: [machine] shared: expected true or false, found 'yes'"
