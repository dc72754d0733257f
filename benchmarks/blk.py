"""Block I/O benchmark: vmmkit's virtio-blk against QEMU microvm's, same guest, one run, one table.

    .venv/bin/python benchmarks/blk.py [--rounds 2] [--runtime 8] [--engine native]

On the host it first builds the "bench" variant of the default guest with fio
(VMMKIT_GUEST=bench, `vmmkit guest build --with fio`: once, cached; fio makes
its initramfs about 90 MB bigger, which is why the guest everyone boots does
not carry it). Where the
host's KVM cannot boot a stock kernel it then runs itself inside the KVM lab
with a scratch disk (`vmmkit lab --scratch`); where KVM is real, or inside the
lab, it runs in place (--lab changes that). There it fills a raw image with
data (not sparse: reads hit real blocks) on a real filesystem (the image has
to take O_DIRECT), then, for N rounds, boots the default guest (1 vCPU, 512M unless --memory says) under vmmkit and under QEMU
(alternating which goes first) with the image as /dev/vda, both with host
O_DIRECT (vmmkit: ``cache = "none"``; QEMU: ``cache=none,aio=io_uring``, or
aio=threads where io_uring is refused), and runs fio in the guest on /dev/vda:
direct=1, libaio, iodepth=32, four jobs one after the other (sequential 1 MiB
read and write, random 4 KiB read and write), each for --runtime seconds.
Between the two VMMs of every round, fio runs the same jobs on the image file
itself, where the VMMs run: the limit.

It prints medians over the rounds: MB/s (10^6 bytes) for sequential jobs, IOPS
for random ones, with the ratios vmmkit/QEMU and vmmkit/limit, each the median
of the rounds' own ratios (the host's speed moves between rounds). Absolute
numbers inside the lab mean little (everything is emulated); the ratios from
one run are what to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import stat
import statistics
import subprocess
import sys
import tempfile
import time

from vmmkit.guest import build
from vmmkit.guest.cpio import read_cpio
from vmmkit.hostkvm import in_lab, kvm_status
from vmmkit.testing.pipes import read_until
from vmmkit.testing.qemu import disk_aio, disk_args, run_qemu_exec

import kvmstats

GOAL = "goal: >= 1.2x QEMU on every row, >= 0.8x the lab on sequential rows"
#: Guest memory for both VMMs. Below 512 MiB of RAM (a "512M" guest has a little less) Linux turns
#: transparent huge pages off, and fio's 1 MiB buffers span 256 scattered pages each; a 1G guest
#: has them, but QEMU's guest hung in all three 1G runs tried in the lab (docs/benchmarks.md).
MEMORY = "512M"
# (fio job name, label, fio options, metric): metric is "MB/s" or "IOPS".
JOBS = (
    ("seqread", "seq read 1M", "--rw=read --bs=1M", "MB/s"),
    ("seqwrite", "seq write 1M", "--rw=write --bs=1M", "MB/s"),
    ("randread", "rand read 4K", "--rw=randread --bs=4k", "IOPS"),
    ("randwrite", "rand write 4K", "--rw=randwrite --bs=4k", "IOPS"),
)
# Fields of fio's terse (--minimal, version 3) lines, 1-based as `cut` counts:
# job name, error, read KiB/s, read IOPS, write KiB/s, write IOPS.
TERSE_FIELDS = (3, 5, 7, 8, 48, 49)
#: Runs (one VMM, one round) that may fail and run again before the benchmark gives up: now
#: and then a guest in the lab hangs at boot, and the rounds already measured should not be lost.
RUN_RETRIES = 2
GUEST_DISK = "/dev/vda"
MiB = 1 << 20


def fio_args(filename: str, runtime: int, jobs=JOBS) -> list[str]:
    """fio's arguments for *jobs* on *filename*, run one after the other (stonewall)."""
    args = common_fio_args(filename, runtime)
    for i, (name, _label, opts, _metric) in enumerate(jobs):
        args += [f"--name={name}"] + (["--stonewall"] if i else []) + opts.split()
    return args


def common_fio_args(filename: str, runtime: int) -> list[str]:
    return ["--minimal", "--direct=1", "--ioengine=libaio", "--iodepth=32", f"--runtime={runtime}",
            "--time_based=1", "--norandommap=1", "--randrepeat=0", f"--filename={filename}"]


def guest_command(runtime: int) -> str:
    """The guest's shell command: wait for the disk, run each fio job, print only the fields we use.

    The console is slow (in the lab especially), so the guest cuts fio's
    ~700-byte lines down to the six fields first. Around each job it prints
    a ``@@kvm`` mark with the disk's I/O counters (:mod:`kvmstats`), so the
    host can read KVM's counters for exactly that job and count its requests.
    """
    fields = ",".join(map(str, TERSE_FIELDS))
    common = " ".join(common_fio_args(GUEST_DISK, runtime))
    jobs = "; ".join(f"m {name}-start; j --name={name} {opts}; m {name}-end" for name, _l, opts, _m in JOBS)
    return (f"i=0; while [ ! -b {GUEST_DISK} ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done; "
            f"set -eo pipefail; m() {{ echo \"{kvmstats.MARK.decode()}$1 $(cat /sys/block/vda/stat)\"; }}; "
            f"j() {{ fio {common} \"$@\" | cut -d';' -f{fields}; }}; {jobs}")


def job_counters(watcher: kvmstats.MarkWatcher) -> dict[str, dict[str, float]]:
    """Per job, KVM's counters and the VMM's CPU milliseconds per request (requests: reads and writes the
    guest's disk completed), and the share of a CPU its vCPU threads and its other threads used."""
    out = {}
    for name, *_ in JOBS:
        try:
            (before, sb), (after, sa) = watcher.marks[f"{name}-start"], watcher.marks[f"{name}-end"]
        except KeyError:
            continue
        b, a = [int(x) for x in sb.split()], [int(x) for x in sa.split()]
        requests = (a[0] - b[0]) + (a[4] - b[4])
        d = kvmstats.delta(after, before)
        out[name] = {"requests": requests, **{k: v / max(requests, 1) for k, v in d.items()}}
        if "wall_ms" in d:
            out[name]["vcpu_busy"], out[name]["vmm_busy"] = kvmstats.busy(d)
    return out


def parse(text: str, *, cut: bool) -> dict[str, float]:
    """{job: MB/s or IOPS} from fio's terse lines (already *cut* to TERSE_FIELDS, or whole)."""
    out = {}
    names = {j[0]: j for j in JOBS}
    for line in text.splitlines():
        f = line.strip().split(";")
        if not cut:
            if len(f) < max(TERSE_FIELDS):
                continue
            f = [f[i - 1] for i in TERSE_FIELDS]
        if len(f) != len(TERSE_FIELDS) or f[0] not in names:
            continue
        name, error, rbw, riops, wbw, wiops = f
        if error != "0":
            raise RuntimeError(f"fio job {name} failed with error {error}")
        is_read = "read" in name
        if names[name][3] == "MB/s":
            out[name] = float(rbw if is_read else wbw) * 1024 / 1e6
        else:
            out[name] = float(riops if is_read else wiops)
    missing = [j[0] for j in JOBS if j[0] not in out]
    if missing:
        raise RuntimeError(f"fio gave no result for {', '.join(missing)}; its output:\n{text[-3000:]}")
    return out


def fill_image(path: str, size: int) -> None:
    """Write *size* bytes of non-zero data to *path* and make them durable, so every block is allocated."""
    block = os.urandom(MiB)
    with open(path, "wb") as f:
        for i in range(size // MiB):
            # Vary each MiB a little so nothing below could share blocks.
            f.write(i.to_bytes(8, "little") + block[8:])
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def fio_from_guest(dest: str) -> list[str]:
    """Command that runs the default guest's fio here: its binary and libraries, copied out of the initramfs.

    For hosts without fio installed; the guest's userland is Debian's, like the
    lab's, so its own dynamic loader runs it.
    """
    with open(build.show().initrd, "rb") as f:
        entries = read_cpio(f.read())
    libdir = "lib/x86_64-linux-gnu"
    for name, (mode, body) in entries.items():
        if name != "usr/bin/fio" and not name.startswith(libdir + "/"):
            continue
        path = os.path.join(dest, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if stat.S_ISLNK(mode):
            os.symlink(body.decode(), path)
        elif stat.S_ISREG(mode):
            with open(path, "wb") as out:
                out.write(body)
            os.chmod(path, stat.S_IMODE(mode))
    return unpacked_fio(dest)


def unpacked_fio(root: str) -> list[str]:
    """Command that runs the fio that `fio_from_guest` unpacked into *root*."""
    lib = os.path.join(root, "lib/x86_64-linux-gnu")
    return [os.path.join(lib, "ld-linux-x86-64.so.2"), "--library-path", lib, os.path.join(root, "usr/bin/fio")]


def host_fio(tmp: str) -> tuple[list[str], str | None]:
    """How to run fio here: the installed one, else the guest's (unpacked below *tmp*: its root is returned too)."""
    found = shutil.which("fio")
    if found:
        return [found], None
    root = os.path.join(tmp, "fio")
    return fio_from_guest(root), root


def read_output(proc: subprocess.Popen, timeout: float, sink) -> tuple[bytes, bool]:
    """Read *proc*'s stdout to its end, also into *sink* (its ``write``), and wait for it.

    Returns the output and whether *timeout* seconds passed first; the process is
    then killed. The wait is on the pipe, not on the next byte: a guest that hangs
    silently sends nothing.
    """
    out = bytearray()
    ended = False

    def feed(chunk: bytes) -> None:
        out.extend(chunk)
        sink.write(chunk)

    try:
        ended = read_until(proc.stdout, time.monotonic() + timeout, feed)
    finally:
        if not ended:  # timed out, or the sink raised
            proc.kill()
        proc.wait()
    return bytes(out), not ended


def run_vmmkit(config: str, command: str, timeout: float, watcher: kvmstats.MarkWatcher) -> str:
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([sys.executable, "-m", "vmmkit", "run", config, "--exec", command],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err)
        watcher.pid = proc.pid
        out, timed_out = read_output(proc, timeout, watcher)
        err.seek(0)
        if timed_out or proc.returncode != 0:
            why = f"did not end within {timeout:.0f}s" if timed_out else f"exited with {proc.returncode}"
            raise RuntimeError(f"vmmkit {why}:\n{out.decode(errors='replace')[-2000:]}\n"
                               f"{err.read().decode(errors='replace')[-3000:]}")
    return out.decode(errors="replace")


def run_qemu(image: str, aio: str, memory: str, command: str, timeout: float,
             watcher: kvmstats.MarkWatcher) -> str:
    result = run_qemu_exec(command, vcpus=1, memory=memory, timeout=timeout, tee=watcher,
                           extra_args=disk_args(image, cache="none", aio=aio))
    if result.status != 0:
        livelock = f"; {result.livelock}" if result.livelock else ""
        raise RuntimeError(f"QEMU: the guest command ended with {result.status} (QEMU status "
                           f"{result.vmm_returncode}{livelock}):\n{result.output.decode(errors='replace')[-2000:]}\n"
                           f"--- console ---\n{result.console.decode(errors='replace')[-3000:]}")
    return result.output.decode(errors="replace")


def run_limit(fio: list[str], image: str, runtime: int) -> dict[str, float]:
    """The limit: the same fio jobs on the image file itself, where the VMMs run."""
    proc = subprocess.run(fio + fio_args(image, runtime), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"fio on {image} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return parse(proc.stdout, cut=False)


def describe(values: dict[str, float]) -> str:
    return "  ".join(f"{name} {values[name]:.0f} {metric}" for name, _l, _o, metric in JOBS)


def benchmark(opts) -> int:
    files = build.show()
    if not files.built or "fio" not in files.extras:
        raise SystemExit("the default guest needs fio: vmmkit guest build --with fio")
    workdir = opts.dir or ("/scratch" if in_lab() else None)
    with tempfile.TemporaryDirectory(prefix="vmmkit-blkbench-", dir=workdir) as tmp:
        image = os.path.join(tmp, "disk.img")
        size = opts.size_mib * MiB
        started = time.monotonic()
        fill_image(image, size)
        log(f"{image}: {opts.size_mib} MiB of data written in {time.monotonic() - started:.1f}s")
        aio = disk_aio(image, "none")
        config = os.path.join(tmp, "vm.toml")
        with open(config, "w") as f:
            f.write(f'[machine]\nvcpus = 1\nmemory = "{opts.memory}"\n\n[[device]]\nkind = "blk"\n'
                    f'path = {json.dumps(image)}\ncache = "none"\n')
            if opts.engine:
                f.write(f'engine = {json.dumps(opts.engine)}\n')
        command = guest_command(opts.runtime)
        timeout = run_timeout(opts.runtime)
        results: dict[str, list[dict[str, float]]] = {"vmmkit": [], "qemu": []}
        counters: dict[str, list[dict[str, dict[str, float]]]] = {"vmmkit": [], "qemu": []}
        where = "lab" if in_lab() else "host"
        why_not = kvmstats.available()
        if why_not:
            log(f"no KVM counters in this run: {why_not}")
        fio = unpacked_fio(opts.fio_root) if opts.fio_root else host_fio(tmp)[0]
        runners = {"vmmkit": lambda w: run_vmmkit(config, command, timeout, w),
                   "qemu": lambda w: run_qemu(image, aio, opts.memory, command, timeout, w)}
        limits: list[dict[str, float]] = []
        header = {"size_mib": opts.size_mib, "runtime": opts.runtime, "memory": opts.memory,
                  "release": files.release, "engine": opts.engine, "aio": aio, "where": where,
                  "kvm_counters": not why_not}

        def save(doing: str) -> None:
            # Before and after every run: the host's lab watch sees progress, and a lab that
            # wedges later loses none of the rounds already measured (main() prints them).
            if opts.progress:
                with open(opts.progress, "w") as f:
                    json.dump({**header, "doing": doing, "results": results, "limits": limits,
                               "counters": counters}, f)

        failed = 0
        for i in range(opts.rounds):
            # The limit runs between the two VMMs, so each round's three numbers see the same host.
            order = ["vmmkit", "limit", "qemu"] if i % 2 == 0 else ["qemu", "limit", "vmmkit"]
            for name in order:
                save(f"round {i + 1} {name}")
                if name == "limit":
                    limits.append(run_limit(fio, image, opts.runtime))
                    log(f"round {i + 1} {where}: {describe(limits[-1])}")
                    continue
                while True:
                    t0 = time.monotonic()
                    watcher = kvmstats.MarkWatcher(reader=None if why_not else kvmstats.read)
                    try:
                        values = parse(runners[name](watcher), cut=True)
                        break
                    except RuntimeError as exc:
                        failed += 1
                        if failed > RUN_RETRIES:
                            raise
                        log(f"round {i + 1} {name} failed after {time.monotonic() - t0:.0f}s "
                            f"({failed} of {RUN_RETRIES} retries used), running it again:\n{str(exc)[-3000:]}")
                        save(f"round {i + 1} {name} (again)")
                results[name].append(values)
                counters[name].append(job_counters(watcher))
                log(f"round {i + 1} {name}: {describe(results[name][-1])} ({time.monotonic() - t0:.0f}s)")
            log(f"round {i + 1} vmmkit/QEMU, vmmkit/{where}: " + "  ".join(
                f"{job} {results['vmmkit'][-1][job] / results['qemu'][-1][job]:.2f} "
                f"{results['vmmkit'][-1][job] / limits[-1][job]:.2f}" for job, *_ in JOBS))
        save("done")
    report(header, results, limits, counters)
    return 0


def complete_rounds(results: dict[str, list[dict[str, float]]], limits: list[dict[str, float]]) -> int:
    """How many rounds have all three runs (vmmkit, QEMU and the limit)."""
    return min(len(results["vmmkit"]), len(results["qemu"]), len(limits))


def report(header: dict, results: dict[str, list[dict[str, float]]], limits: list[dict[str, float]],
           counters: dict[str, list[dict[str, dict[str, float]]]]) -> None:
    """Print the table (and the KVM counters, when the run had them) over the rounds all three runs finished."""
    n = complete_rounds(results, limits)
    results = {vmm: runs[:n] for vmm, runs in results.items()}
    limits, where = limits[:n], header["where"]

    def med(values, job):
        return statistics.median(r[job] for r in values)

    def ratio(over, job):
        # The median of each round's own ratio: the host's speed moves between rounds
        # (by half in a busy lab), and within a round the three runs are minutes apart.
        return statistics.median(v[job] / o[job] for v, o in zip(results["vmmkit"], over))

    engine = header["engine"]
    print(f"\nblk benchmark: {header['size_mib']} MiB raw image, fio libaio direct=1 iodepth=32, "
          f"{header['runtime']}s per job, {n} round{'s' if n > 1 else ''} (medians; ratios are medians of "
          f"each round's), guest 1 vCPU {header['memory']}, kernel {header['release']}")
    print(f"vmmkit: cache=\"none\"{f', engine={engine!r}' if engine else ''}; "
          f"QEMU microvm: cache=none,aio={header['aio']}; {where}: fio on the image file, between the VMMs in every round")
    print(f"{'job':<22}{'QEMU':>10}{'vmmkit':>10}{'vmmkit/QEMU':>13}{where:>10}{f'vmmkit/{where}':>13}")
    for name, label, _opts, metric in JOBS:
        q, v, lim = med(results["qemu"], name), med(results["vmmkit"], name), med(limits, name)
        print(f"{f'{label} ({metric})':<22}{q:>10.0f}{v:>10.0f}{ratio(results['qemu'], name):>12.2f}x"
              f"{lim:>10.0f}{ratio(limits, name):>12.2f}x")
    print(GOAL)
    if header["kvm_counters"]:
        print_counters({vmm: runs[:n] for vmm, runs in counters.items()})


def print_counters(counters: dict[str, list[dict[str, dict[str, float]]]]) -> None:
    """KVM's counters and the VMM's CPU time per guest request, medians over the rounds (:mod:`kvmstats`):
    what each VMM costs the guest, and whether the guest's CPU was the limit."""
    print("\nKVM counters per request (medians over rounds; requests the guest's disk completed)")
    print(f"{'job':<12}{'VMM':<8}{'requests':>9}" + "".join(f"{kvmstats.LABELS[k]:>9}" for k in kvmstats.FIELDS))
    for name, *_ in JOBS:
        for vmm in ("qemu", "vmmkit"):
            runs = [r[name] for r in counters[vmm] if name in r]
            if not runs:
                continue
            row = {k: statistics.median(r[k] for r in runs) for k in ("requests", *kvmstats.FIELDS)}
            print(f"{name:<12}{vmm:<8}{row['requests']:>9.0f}" + "".join(f"{row[k]:>9.2f}" for k in kvmstats.FIELDS))
    # A vCPU near 1.00 is saturated: the guest's CPU, not the device, bounds the job, and a VMM
    # can only make it faster by costing the guest less per request (exits, interrupts).
    print("\nThe VMM's CPU during each job (medians over rounds): share of one CPU used by the vCPU thread "
          "and by the other threads; milliseconds per request in guest mode, in the vCPU thread outside it, "
          "in the other threads")
    print(f"{'job':<12}{'VMM':<8}{'vCPU':>8}{'others':>8}{'guest ms':>10}{'vCPU host':>11}{'others ms':>11}")
    for name, *_ in JOBS:
        for vmm in ("qemu", "vmmkit"):
            runs = [r[name] for r in counters[vmm] if "vcpu_busy" in r.get(name, {})]
            if not runs:
                continue
            row = {k: statistics.median(r[k] for r in runs)
                   for k in ("vcpu_busy", "vmm_busy", "guest_ms", "vcpu_host_ms", "vmm_ms")}
            print(f"{name:<12}{vmm:<8}{row['vcpu_busy']:>8.2f}{row['vmm_busy']:>8.2f}{row['guest_ms']:>10.3f}"
                  f"{row['vcpu_host_ms']:>11.3f}{row['vmm_ms']:>11.3f}")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="boots of each VMM (default 2)")
    parser.add_argument("--runtime", type=int, default=8, help="seconds per fio job (default 8)")
    parser.add_argument("--engine", default=None, help="the blk device's engine option for vmmkit (e.g. native, python)")
    parser.add_argument("--memory", default=MEMORY, help=f"guest memory for both VMMs (default {MEMORY})")
    parser.add_argument("--size-mib", type=int, default=1024, help="image size in MiB (default 1024)")
    parser.add_argument("--dir", default=None, help="where the image goes (default: /scratch in the lab, else $TMPDIR); "
                        "it must take O_DIRECT")
    parser.add_argument("--lab", choices=("auto", "always", "never"), default="auto",
                        help="run inside the KVM lab: auto (when this host's KVM cannot boot a stock kernel), "
                        "always or never")
    parser.add_argument("--fio-root", default=None, help=argparse.SUPPRESS)  # the guest's fio, unpacked by the host
    parser.add_argument("--progress", default=None, help=argparse.SUPPRESS)  # the lab's state file, for the host
    opts = parser.parse_args()
    if opts.rounds < 1 or opts.runtime < 1:
        parser.error("--rounds and --runtime must be at least 1")

    os.environ.setdefault(build.VARIANT_ENV, "bench")  # inherited by the lab and the VMMs it starts
    if not in_lab():
        build.build(["fio"], progress=lambda s: log(f"vmmkit: {s}"))
    if in_lab() or opts.lab == "never" or (opts.lab == "auto" and kvm_status().usable):
        try:
            return benchmark(opts)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            raise SystemExit(f"blk benchmark failed: {exc}") from None

    from vmmkit.lab.run import LAB_FAILED, run_in_lab
    with tempfile.TemporaryDirectory(prefix="vmmkit-blkbench-fio-") as tmp:
        # The lab sees the host's root, so fio unpacked here (when the host has none) runs there.
        _fio, root = host_fio(tmp)
        progress = os.path.join(tmp, "progress.json")
        argv = ([sys.executable, os.path.abspath(__file__), *sys.argv[1:], f"--progress={progress}"]
                + ([f"--fio-root={root}"] if root else []))
        scratch = f"{opts.size_mib + 512 + opts.size_mib // 4}M"
        # A lab machine that wedges (docs/lab.md) would otherwise hang here for good.
        timeout = 900 + opts.rounds * (2 * (300 + 3 * len(JOBS) * opts.runtime) + 3 * len(JOBS) * opts.runtime)
        log(f"running in the KVM lab with a {scratch} scratch disk")
        status = run_in_lab(argv, scratch=scratch, timeout=timeout, shares=[tmp],
                            stall=(progress, stall_seconds(opts.runtime)))
        if status != 0:
            salvage(progress, status == LAB_FAILED)
        return status


def run_timeout(runtime: int) -> float:
    """Seconds one VMM's run may take: a boot (under a minute even in a busy lab) and the jobs."""
    return 240 + 4 * runtime * len(JOBS)


def stall_seconds(runtime: int) -> float:
    """How long the lab may go without saving progress before the host takes it for wedged: a
    VMM run that hangs is stopped at :func:`run_timeout` and saves as it starts again."""
    return run_timeout(runtime) + 300


def salvage(progress: str, lab_failed: bool) -> None:
    """After a run in the lab that did not finish: say where it stopped, and print the rounds it finished."""
    why = ("the KVM lab itself failed or stopped making progress (see its console above and docs/lab.md)"
           if lab_failed else "the benchmark failed in the lab")
    try:
        with open(progress) as f:
            state = json.load(f)
    except (OSError, ValueError):
        log(f"{why}, before its first run started: run the benchmark again")
        return
    rounds = complete_rounds(state["results"], state["limits"])
    log(f"{why}, during {state['doing']}; {rounds} round{'s' if rounds != 1 else ''} finished before it"
        + (": the table of what finished follows" if rounds else ""))
    if rounds:
        report(state, state["results"], state["limits"], state["counters"])


if __name__ == "__main__":
    sys.exit(main())
