"""The `vmmkit` command."""

from __future__ import annotations

import argparse
import json
import sys

from .errors import VmmkitError


def _progress(msg: str) -> None:
    print(f"vmmkit: {msg}", file=sys.stderr, flush=True)


def cmd_lab(args) -> int:
    from .lab.run import run_in_lab
    argv = list(args.command)
    if argv and argv[0] == "--":
        argv = argv[1:]
    return run_in_lab(argv, shares=args.share, memory=args.memory, cpus=args.cpus, timeout=args.timeout)


def cmd_run(args) -> int:
    from .config import load_config
    from .plugins import Plugins
    from .vm import Vm
    plugins = Plugins()
    spec = load_config(args.config, device_kinds={k: v.schema for k, v in plugins.kinds.items()},
                       features={k: v.schema for k, v in plugins.features.items()})
    if spec.plugins.disable:
        plugins = Plugins(disable=spec.plugins.disable)
    plugins.warn_broken()
    while True:
        vm = Vm(spec, plugins=plugins, exec_command=args.exec_, progress=_progress)
        try:
            status = vm.run()
        finally:
            vm.close()
        if vm.stop_reason == "reboot" and spec.machine.on_reboot == "restart":
            _progress("the guest rebooted: starting it again ([machine] on_reboot = \"restart\")")
            continue
        return status


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


def make_parser() -> argparse.ArgumentParser:
    """The argument parser, with one subcommand per verb."""
    parser = argparse.ArgumentParser(prog="vmmkit", description="A KVM virtual machine monitor built from plugins.")
    sub = parser.add_subparsers(dest="verb", required=True)

    run = sub.add_parser("run", help="boot a VM described by a TOML file",
                         description="Boot the VM that CONFIG describes, on this host's KVM. With --exec, the "
                         "default guest runs CMD, its output streams to stdout, and vmmkit exits with CMD's status. "
                         "Exit statuses: 0 guest powered off, 2 the VM could not start, 3 guest rebooted, "
                         "1 the VM failed while running, 125 the guest stopped before --exec reported a status.")
    run.add_argument("config", help="the VM's TOML file (see examples/minimal.toml)")
    run.add_argument("--exec", dest="exec_", metavar="CMD", help="run CMD (a shell command line) in the guest and exit with its status")
    run.set_defaults(func=cmd_run)

    lab = sub.add_parser("lab", help="run a command inside the KVM lab (an emulated machine with real KVM)",
                         description="Run CMD inside the KVM lab: an emulated x86 machine whose /dev/kvm is "
                         "ordinary KVM. Needed on hosts without hardware virtualization (PVM hosts, "
                         "containers, CI runners). The host's root is visible read-only with a scratch "
                         "overlay; --share makes host directories writable inside.")
    lab.add_argument("--share", action="append", default=[], metavar="DIR", help="host directory writable inside the lab")
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
    parser = make_parser()
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
