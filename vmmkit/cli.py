"""The `vmmkit` command."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .errors import VmmkitError


def _terminal_columns() -> int:
    """What shutil.get_terminal_size() says: $COLUMNS, else stdout's terminal width, else 80."""
    try:
        columns = int(os.environ.get("COLUMNS", ""))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's help formatter, told the terminal width so that it need not import shutil.

    argparse makes a formatter for every add_argument call, and the default one
    imports shutil (and with it zlib, bz2 and lzma) for the width: modules that
    `vmmkit run` would otherwise load only for that, each a file read at start-up.
    """

    def __init__(self, prog, **kwargs):
        if kwargs.get("width") is None:
            kwargs["width"] = _terminal_columns() - 2  # as argparse does with shutil's answer
        super().__init__(prog, **kwargs)


class _ArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose subparsers (made with its own type) use :class:`_HelpFormatter`."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


def _progress(msg: str) -> None:
    print(f"vmmkit: {msg}", file=sys.stderr, flush=True)


def cmd_lab(args) -> int:
    from .lab.run import run_in_lab
    argv = list(args.command)
    if argv and argv[0] == "--":
        argv = argv[1:]
    return run_in_lab(argv, shares=args.share, memory=args.memory, cpus=args.cpus, timeout=args.timeout,
                      scratch=args.scratch)


def cmd_run(args) -> int:
    from .config import load_config
    from .plugins import Plugins
    from .vm import Vm
    plugins = Plugins()
    spec = load_config(args.config, device_kinds=plugins.device_schemas(), features=plugins.feature_schemas(),
                       hints=plugins.hints())
    if spec.plugins.disable:
        # Read the file again without the disabled plugins, so that using one of their kinds is an error here.
        plugins = Plugins(disable=spec.plugins.disable)
        spec = load_config(args.config, device_kinds=plugins.device_schemas(),
                           features=plugins.feature_schemas(), hints=plugins.hints())
    plugins.warn_broken()
    spec = _with_api_sock(spec, args.api_sock)
    server = None
    if spec.api.socket:
        # Before anything boots: a socket that a live VM serves is an error now, not after the boot.
        from .api import make_server
        server = make_server(spec.api.socket, plugins)
    try:
        while True:
            vm = Vm(spec, plugins=plugins, exec_command=args.exec_, progress=_progress)
            if server is not None:
                server.start(vm)  # the same socket across guest reboots; each boot is a new Vm
            try:
                status = vm.run()
            finally:
                vm.close()
            if vm.stop_reason == "reboot" and spec.machine.on_reboot == "restart":
                _progress("the guest rebooted: starting it again ([machine] on_reboot = \"restart\")")
                continue
            return status
    finally:
        if server is not None:
            server.close()


def _with_api_sock(spec, path):
    """The spec with ``--api-sock PATH`` in its [api] table (the command line wins over the file)."""
    if not path:
        return spec
    import attrs
    from .config import ApiSpec
    from .schema import ConfigError, FieldError
    try:
        return attrs.evolve(spec, api=ApiSpec(socket=path))
    except FieldError as exc:
        raise ConfigError(f"--api-sock: {exc.message}") from None


# ----- vmmkit ctl -----

def _format_size(n: int) -> str:
    from .config import format_size
    return format_size(n)


def _print_info(info: dict) -> None:
    config = info.get("config") or {}
    boot = config.get("boot") or {}
    print(f"state:    {info['state']}")
    print(f"vcpus:    {info['vcpus']}")
    print(f"memory:   {_format_size(info['memory'])}")
    print(f"config:   {config.get('source') or '(built in Python)'}")
    print(f"kernel:   {boot.get('kernel') or '(the default guest)'}")
    if info.get("shutdown_requested_at"):
        import time
        ago = max(0.0, time.time() - info["shutdown_requested_at"])
        print(f"shutdown: power button pressed {ago:.0f} s ago")
    print(f"pid:      {info['pid']}")
    devices = info.get("devices") or []
    if not devices:
        print("devices:  (none)")
    for number, dev in enumerate(devices):
        label = "devices:" if number == 0 else ""
        kind = dev.get("kind") or "?"
        where = ""
        if dev.get("mmio_base") is not None:
            where = f"  {dev['transport']} {dev['mmio_base']:#x}+{dev['mmio_size']:#x}  gsi {dev['gsi']}"
        print(f"{label:<10}{dev['id']} ({kind}){where}")


def _ctl_info(client, args) -> int:
    info = client.call("GET", "/vm")
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _print_info(info)
    return 0


def _ctl_inspect(client, args) -> int:
    print(json.dumps(client.call("GET", "/vm/inspect"), indent=2))
    return 0


def _ctl_action(method: str, path: str, done: str):
    def run(client, args) -> int:
        result = client.call(method, path)
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print(done.format(**result) if isinstance(result, dict) else done)
        return 0
    return run


def _ctl_call(client, args) -> int:
    body = None
    if args.body is not None:
        try:
            body = json.loads(args.body)
        except ValueError as exc:
            raise VmmkitError(f"ctl call: the body is not JSON: {exc}") from None
    path = args.path if args.path.startswith("/") else "/" + args.path
    result = client.call(args.method.upper(), path, body)
    print(json.dumps(result, indent=2 if args.json else None))
    return 0


def cmd_ctl(args) -> int:
    from .api.client import ApiClient, ApiClientError
    if not args.api_sock:
        raise ApiClientError("ctl: give the VM's API socket with --api-sock PATH")
    client = ApiClient(args.api_sock, timeout=args.timeout)
    return args.ctl_func(client, args)


def _add_ctl_parser(sub, plugins=None) -> None:
    ctl = sub.add_parser("ctl", help="control a running VM through its API socket (vmmkit run --api-sock)",
                         description="Talk to a running VM's control API (docs/api.yaml). Exit status 0 on "
                         "success, 1 when the API is unreachable or refuses the request.")

    def common(p, suppress: bool) -> None:
        default = argparse.SUPPRESS if suppress else None
        p.add_argument("--api-sock", metavar="PATH", default=default,
                       help="the socket given to vmmkit run --api-sock (or [api] socket)")
        p.add_argument("--json", action="store_true", default=argparse.SUPPRESS if suppress else False,
                       help="print the API's JSON answer")
        p.add_argument("--timeout", type=float, metavar="SECONDS", default=argparse.SUPPRESS if suppress else 30.0,
                       help="give up on an answer after this long (default 30)")

    common(ctl, suppress=False)
    csub = ctl.add_subparsers(dest="ctl_verb", required=True, metavar="COMMAND")
    verbs = [
        ("info", "the VM's state, configuration and devices", _ctl_info),
        ("inspect", "a paused VM's vCPUs (where, halted, pending interrupts) and virtqueues, as JSON",
         _ctl_inspect),
        ("pause", "stop every vCPU and device (the guest notices nothing when resumed)",
         _ctl_action("PUT", "/vm/pause", "{state}")),
        ("resume", "continue a paused VM where it stopped", _ctl_action("PUT", "/vm/resume", "{state}")),
        ("shutdown", "press the ACPI power button: the guest shuts itself down",
         _ctl_action("PUT", "/vm/shutdown", "power button pressed: the guest is shutting down")),
        ("stop", "stop the VM at once (no guest shutdown)", _ctl_action("PUT", "/vm/stop", "{state}")),
    ]
    for name, help_text, func in verbs:
        p = csub.add_parser(name, help=help_text, description=help_text)
        common(p, suppress=True)
        p.set_defaults(ctl_func=func)
    call = csub.add_parser("call", help="send any request (plugin routes): METHOD PATH [JSON-BODY]",
                           description="Send one request to the API and print the JSON answer.")
    common(call, suppress=True)
    call.add_argument("method", help="GET, PUT, ...")
    call.add_argument("path", help="e.g. /vm")
    call.add_argument("body", nargs="?", help="a JSON request body")
    call.set_defaults(ctl_func=_ctl_call)
    if plugins is not None:
        plugins.call("vmmkit_ctl_commands", subparsers=csub)
    ctl.set_defaults(func=cmd_ctl)


def cmd_plugins(args) -> int:
    from .plugins import Plugins
    plugins = Plugins()
    rows = []
    for name, info in sorted(plugins.infos.items()):
        kinds = sorted(k for k, owner in plugins.kind_owner.items() if owner == name)
        module = plugins.pm.get_plugin(name)
        hooks = sorted(h.name for h in plugins.pm.get_hookcallers(module)) if module is not None else []
        rows.append({"name": name, "module": info.module, "distribution": info.distribution, "version": info.version,
                     "kinds": kinds, "hooks": hooks, "error": info.error})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        origin = f"{row['distribution']} {row['version']}" if row["distribution"] else "registered directly"
        print(f"{row['name']}  ({row['module']}, {origin})")
        if row["error"]:
            print(f"    BROKEN: {row['error']}")
        if row["kinds"]:
            print(f"    device kinds: {', '.join(row['kinds'])}")
        print(f"    hooks: {', '.join(row['hooks']) or '(none)'}")
    return 0


def cmd_guest_build(args) -> int:
    from .guest import build
    extras = [p for item in args.with_ or [] for p in item.split(",") if p]
    files = build.build(extras, progress=_progress, force=args.force, reset=args.reset)
    print(files.directory)
    return 0


def cmd_guest_show(args) -> int:
    from .guest import build
    files = build.show()
    if args.json:
        print(json.dumps(files.as_dict(), indent=2))
        return 0
    print(f"built:     {'yes' if files.built else 'no (run: vmmkit guest build)'}")
    print(f"directory: {files.directory}")
    print(f"kernel:    {files.kernel}")
    print(f"initrd:    {files.initrd}")
    print(f"rootfs:    {files.rootfs or '(none: the initramfs is the root)'}")
    if files.built:
        print(f"release:   {files.release} ({files.kernel_package} {files.kernel_version})")
        print(f"extras:    {', '.join(files.extras) or '(none)'}")
    return 0


def make_parser(ctl_plugins=None) -> argparse.ArgumentParser:
    """The argument parser, with one subcommand per verb (*ctl_plugins*: add the plugins' ctl commands)."""
    parser = _ArgumentParser(prog="vmmkit", description="A KVM virtual machine monitor built from plugins.")
    sub = parser.add_subparsers(dest="verb", required=True)

    run = sub.add_parser("run", help="boot a VM described by a TOML file",
                         description="Boot the VM that CONFIG describes, on this host's KVM. With --exec, the "
                         "default guest runs CMD, its output streams to stdout, and vmmkit exits with CMD's status. "
                         "Exit statuses: 0 guest powered off (or stopped with vmmkit ctl stop), 2 the VM could not start, 3 guest rebooted, "
                         "1 the VM failed while running, 125 the guest stopped before --exec reported a status.")
    run.add_argument("config", help="the VM's TOML file (see examples/minimal.toml)")
    run.add_argument("--exec", dest="exec_", metavar="CMD", help="run CMD (a shell command line) in the guest and exit with its status")
    run.add_argument("--api-sock", metavar="PATH", default=None,
                     help="serve the control API on this Unix socket (see vmmkit ctl; overrides [api] socket)")
    run.set_defaults(func=cmd_run)

    _add_ctl_parser(sub, ctl_plugins)

    lab = sub.add_parser("lab", help="run a command inside the KVM lab (an emulated machine with real KVM)",
                         description="Run CMD inside the KVM lab: an emulated x86 machine whose /dev/kvm is "
                         "ordinary KVM. Needed on hosts without hardware virtualization (PVM hosts, "
                         "containers, CI runners). The host's root is visible read-only with a scratch "
                         "overlay; --share makes host directories writable inside; --scratch adds an empty "
                         "ext4 disk at /scratch (a real filesystem, e.g. for O_DIRECT).")
    lab.add_argument("--share", action="append", default=[], metavar="DIR", help="host directory writable inside the lab")
    lab.add_argument("--scratch", metavar="SIZE", default=None,
                     help="attach a fresh ext4 disk of SIZE (e.g. 4G) mounted at /scratch inside; "
                     "a sparse file on the host, deleted afterwards")
    lab.add_argument("--memory", default="8G", help="lab memory (default 8G)")
    lab.add_argument("--cpus", type=int, default=2, help="lab vCPUs (default 2)")
    lab.add_argument("--timeout", type=float, default=None, help="kill the lab after this many seconds")
    lab.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")
    lab.set_defaults(func=cmd_lab)

    plug = sub.add_parser("plugins", help="list the installed plugins, what they provide and which hooks they implement")
    plug.add_argument("--json", action="store_true")
    plug.set_defaults(func=cmd_plugins)

    guest = sub.add_parser("guest", help="the default guest (kernel and initramfs from Debian packages)")
    gsub = guest.add_subparsers(dest="guest_verb", required=True)
    gb = gsub.add_parser("build", help="build the default guest into the cache (once)")
    gb.add_argument("--with", dest="with_", action="append", metavar="PKG,...",
                    help="add Debian packages' programs with their libraries (e.g. socat,fio,e2fsprogs)")
    gb.add_argument("--force", action="store_true", help="rebuild even if the cache is current")
    gb.add_argument("--reset", action="store_true", help="drop the packages added by earlier --with")
    gb.set_defaults(func=cmd_guest_build)
    gs = gsub.add_parser("show", help="where the default guest's files are")
    gs.add_argument("--json", action="store_true")
    gs.set_defaults(func=cmd_guest_show)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `vmmkit` command; user errors print one line, no traceback."""
    if argv is None:
        argv = sys.argv[1:]
    ctl_plugins = None
    if "ctl" in argv:
        from .plugins import Plugins
        ctl_plugins = Plugins()  # only ctl needs them at parse time: for their ctl commands
    parser = make_parser(ctl_plugins)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except VmmkitError as exc:
        print(f"vmmkit: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
