"""pytest plugin: guest tests run where real KVM is, and never silently skip.

Tests marked ``@pytest.mark.guest`` boot a real guest. On a host with
hardware KVM (or inside the lab) they run in place. On a host without it
(PVM, containers, CI runners) the plugin runs all of them in one `vmmkit lab`
session, streams that session's output, and reports each test's lab outcome
under its own name on the host. When neither is possible, each guest test
fails with the reason. Registered through the ``pytest11`` entry point, so a
plugin author's tests get the same behaviour by installing vmmkit, and two
fixtures: ``virtio_harness`` (a device on a test bench, no KVM needed) and
``vmmkit_run`` (boot the default guest with a TOML file).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

import pytest

from ..exitcodes import STOPPED_EARLY
from ..hostkvm import in_lab, kvm_status
from .kvm_debugfs import EMULATION_LIVELOCK

REPORT_OPT = "--vmmkit-lab-report"
#: Fresh labs for the tests a crashed lab took down (the crash is the emulator's, see docs/lab.md).
LAB_RETRIES = 2
#: Fresh labs for the test modules whose guest crashed (see _LabSession.run). Four: on
#: 2026-12-07 the vsock module's guest crashed in about one run of two (docs/lab.md), with
#: the rx change of that day and without it, so two left CI failing one time in six.
GUEST_CRASH_RETRIES = 4
#: What `vmmkit run --exec` prints when the guest rebooted or triple-faulted: no guest
#: test's command reboots, so in a failure's text this means the guest crashed.
GUEST_REBOOTED = STOPPED_EARLY.split("{why}")[0] + "reboot"
#: What a QEMU peer test fails with when QEMU's guest hung in the lab, or ended before its
#: command did (see qemu_guest_crashed): QEMU is not ours, so its guest hanging or rebooting
#: is the emulation failing, as a crash of vmmkit's guest is.
QEMU_GUEST_HUNG = "QEMU's guest hung in the KVM lab"
QEMU_GUEST_ENDED = "QEMU's guest ended in the KVM lab before its command did"
#: A failure whose text holds one of these was the lab's emulation (docs/lab.md), not the test.
LAB_CRASH_SIGNS = (GUEST_REBOOTED, QEMU_GUEST_HUNG, QEMU_GUEST_ENDED, EMULATION_LIVELOCK)


def _lab_crash(failure: str) -> bool:
    return any(sign in failure for sign in LAB_CRASH_SIGNS)


def qemu_guest_crashed(result) -> str | None:
    """For a QEMU peer's ExecResult: a failure message carrying QEMU_GUEST_HUNG when its guest
    was killed at the timeout, or QEMU_GUEST_ENDED when QEMU exited cleanly and the guest
    never reported its command's status (QEMU runs with -no-reboot, so a guest that reboots,
    after a panic or a triple fault, ends it with status 0); else None
    (``if msg := qemu_guest_crashed(r): pytest.fail(msg)``)."""
    tail = result.console.decode(errors="replace")[-1500:]
    if result.timed_out:
        livelock = f" ({result.livelock})" if result.livelock else ""
        return (f"{QEMU_GUEST_HUNG}: killed after {result.seconds:.0f}s with {len(result.output)} bytes of output "
                f"and no exit status{livelock}; console tail:\n{tail}")
    if result.status is None and result.vmm_returncode == 0:
        return (f"{QEMU_GUEST_ENDED}: QEMU exited after {result.seconds:.0f}s with status 0 (a reboot, under "
                f"-no-reboot) and {len(result.output)} bytes of output, no exit status; console tail:\n{tail}")
    return None


def pytest_addoption(parser):
    group = parser.getgroup("vmmkit")
    group.addoption("--lab", choices=("auto", "always", "never"), default="auto",
                    help="where guest tests run: 'auto' uses the KVM lab only when this host's KVM "
                    "cannot boot a stock kernel; 'always' forces the lab; 'never' runs them here")
    group.addoption("--lab-timeout", type=float, default=2400.0, help="seconds before the lab session is killed")
    group.addoption("--lab-stall", type=float, default=720.0,
                    help="seconds without a guest test phase ending before the lab counts as hung and is killed")
    group.addoption(REPORT_OPT, default=None, help=argparse.SUPPRESS)


def pytest_configure(config):
    config.addinivalue_line("markers", "guest: boots a real guest under KVM (runs in the KVM lab when needed)")
    config._vmmkit_lab = None
    path = config.getoption(REPORT_OPT)
    if path:
        config.pluginmanager.register(_LabReporter(path), "vmmkit-lab-reporter")


class _LabReporter:
    """Inside the lab: records each guest test's outcome for the host to replay."""

    def __init__(self, path: str):
        self.path = path
        self.results: dict[str, dict] = {}

    def pytest_runtest_logreport(self, report):
        entry = self.results.setdefault(report.nodeid, {"outcome": "passed", "text": "", "output": ""})
        if report.failed:
            entry["outcome"] = "failed"
            entry["text"] += f"[{report.when}] {report.longreprtext}\n"
        elif report.skipped and entry["outcome"] == "passed":
            entry["outcome"] = "skipped"
            entry["text"] = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        for name, content in report.sections:
            entry["output"] += f"--- {name} ---\n{content}\n"
        if report.when == "teardown":
            entry["done"] = True
        self._save()

    def _save(self):
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.results, f)
        os.replace(tmp, self.path)


class LabItem(pytest.Item):
    """Stands in on the host for a guest test that ran in the lab."""

    def __init__(self, *, original_nodeid: str, lab, reason: str | None = None, **kw):
        super().__init__(**kw)
        self._original_nodeid = original_nodeid
        self._lab = lab
        self._reason = reason

    def runtest(self):
        if self._reason is not None:
            pytest.fail(f"guest test cannot run: {self._reason}", pytrace=False)
        result = self._lab.result(self._original_nodeid)
        if result is None:
            pytest.fail(f"the KVM lab session reported nothing for this test:\n{self._lab.failure_text()}", pytrace=False)
        if result["outcome"] == "failed":
            pytest.fail(f"failed in the KVM lab:\n{result['text']}\n{result['output']}", pytrace=False)
        if result["outcome"] == "skipped":
            pytest.skip(f"skipped in the KVM lab: {result['text']}")

    def reportinfo(self):
        return self.path, None, f"{self.name} (in the KVM lab)"


class _LabSession:
    """Runs the selected guest tests in one lab session, lazily, and keeps their results."""

    def __init__(self, config, nodeids: list[str]):
        self.config = config
        self.nodeids = nodeids
        self.results: dict[str, dict] | None = None
        self.status: int | None = None
        self.lab_failures: list[str] = []
        self.guest_crashes: list[str] = []  # the modules run again because their guest crashed

    def run(self):
        """Run the guest tests, again where the emulated machine failed them.

        The emulated machine's kernel occasionally crashes under nested KVM
        (docs/lab.md): that is the lab failing, not the test, so the tests it
        took down get another lab, up to LAB_RETRIES times, and say so. The
        same emulation occasionally crashes the guests inside the lab under
        heavy interrupt load (a triple fault, or a fault in the interrupt
        entry and a panic), and once hung QEMU's own guest: a test module
        whose failures say the guest rebooted, its vCPU was caught in KVM's
        instruction emulator, or QEMU's guest hung, runs again, whole (its
        tests share one guest), in a fresh lab, up to GUEST_CRASH_RETRIES
        times, and the output says so. Its last result is the one reported;
        a failure that is not a crash is never run again.
        """
        tr = self.config.pluginmanager.getplugin("terminalreporter")
        self.results = {}
        self._run_retrying_the_lab(list(self.nodeids), tr)
        for _ in range(GUEST_CRASH_RETRIES):
            modules = sorted({n.split("::")[0] for n, r in self.results.items()
                              if r["outcome"] == "failed" and _lab_crash(r["text"] + r["output"])})
            if not modules:
                return
            again = [n for n in self.nodeids if n.split("::")[0] in modules]
            note = (f"the guest crashed in the KVM lab (rebooted, livelocked in KVM's emulator, or hung under "
                    f"QEMU) during {', '.join(modules)}: running its {len(again)} tests once more in a fresh lab")
            if tr is not None:
                tr.write_sep("!", note)
            self.guest_crashes.append(note)
            for n in again:
                self.results.pop(n, None)
            self._run_retrying_the_lab(again, tr)

    def _run_retrying_the_lab(self, pending: list[str], tr) -> None:
        from ..lab.run import LAB_FAILED
        for attempt in range(1 + LAB_RETRIES):
            self._run_once(pending, tr)
            pending = [n for n in pending if n not in self.results]
            if self.status != LAB_FAILED or not pending:
                return
            note = (f"the KVM lab failed (status {self.status}) with {len(pending)} guest tests unfinished; "
                    + ("running them in a fresh lab" if attempt < LAB_RETRIES else "giving up"))
            if tr is not None:
                tr.write_sep("!", note)
            self.lab_failures.append(note)

    def _run_once(self, nodeids: list[str], tr) -> None:
        from ..lab.run import LAB_FAILED, LabError, run_in_lab
        outdir = tempfile.mkdtemp(prefix="vmmkit-pytest-")
        report = os.path.join(outdir, "report.json")
        color = "yes" if tr is not None and tr.hasmarkup else "no"
        argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfE", f"--color={color}",
                f"{REPORT_OPT}={report}", "--lab=never"] + nodeids

        class Out:
            def write(self, data: bytes):
                text = data.decode(errors="replace")
                if tr is not None:
                    tr.write(text)
                else:
                    sys.stdout.write(text)

            def flush(self):
                if tr is not None:
                    tr.flush()

        if tr is not None:
            tr.write_sep("=", f"running {len(nodeids)} guest tests in the KVM lab")
        try:
            # The lab's pytest rewrites the report at every test phase: a lab whose processes hang
            # (seen: the lab idle, a test waiting for ever) stops writing it, and is stopped.
            self.status = run_in_lab(argv, shares=[outdir], timeout=self.config.getoption("--lab-timeout"),
                                     cwd=str(self.config.rootpath), stdout=Out(), stderr=Out(),
                                     stall=(report, self.config.getoption("--lab-stall")))
        except LabError as exc:
            self.status = -1
            self.error = str(exc)
        if tr is not None:
            tr.write_sep("=", f"KVM lab session ended (status {self.status})")
        try:
            with open(report) as f:
                results = json.load(f)
        except (OSError, ValueError):
            results = {}
        if self.status == LAB_FAILED:
            # The test that was running when the lab died has a partial entry, or none.
            results = {n: r for n, r in results.items() if r.get("done")}
        self.results.update(results)
        shutil.rmtree(outdir, ignore_errors=True)

    def result(self, nodeid: str):
        if self.results is None:
            self.run()
        return self.results.get(nodeid)

    def failure_text(self) -> str:
        text = getattr(self, "error", f"lab session status {self.status}; see its output above")
        return "\n".join(self.lab_failures + [text])


def _decide(config) -> tuple[str, str | None]:
    """Where guest tests run: ('here', None), ('lab', None) or ('fail', reason)."""
    mode = config.getoption("--lab")
    status = kvm_status()
    if mode == "never" or in_lab() or (mode == "auto" and status.usable):
        if status.usable or in_lab():
            return "here", None
        return "fail", status.reason
    if shutil.which("qemu-system-x86_64") is None:
        return "fail", f"{status.reason}; and the KVM lab needs QEMU (apt-get install qemu-system-x86)"
    return "lab", None


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items):
    guest = [i for i in items if i.get_closest_marker("guest") is not None]
    if not guest or config.getoption(REPORT_OPT):
        return
    where, reason = _decide(config)
    if where == "here":
        return
    lab = _LabSession(config, [i.nodeid for i in guest]) if where == "lab" else None
    config._vmmkit_lab = lab
    for idx, item in enumerate(items):
        if item.get_closest_marker("guest") is None:
            continue
        proxy = LabItem.from_parent(item.parent, name=item.name, original_nodeid=item.nodeid, lab=lab, reason=reason)
        # Module- and class-level marks come through the shared parent.
        proxy.own_markers.extend(item.own_markers)
        proxy.keywords.update(item.keywords)
        items[idx] = proxy


@pytest.hookimpl(tryfirst=True)
def pytest_runtestloop(session):
    """Run the lab session before the tests, outside output capture, so it streams live."""
    lab = getattr(session.config, "_vmmkit_lab", None)
    if lab is not None and not session.config.option.collectonly and lab.results is None:
        lab.run()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Say again, at the end, which guest tests ran twice because the lab or its guest crashed."""
    lab = getattr(config, "_vmmkit_lab", None)
    notes = (lab.lab_failures + lab.guest_crashes) if lab is not None and lab.results is not None else []
    if notes:
        terminalreporter.write_sep("!", "KVM lab reruns")
        for note in notes:
            terminalreporter.write_line(note)


# ----- fixtures for plugin authors -----

@pytest.fixture
def virtio_harness():
    """A factory: ``virtio_harness(device, **options)`` puts *device* on a test bench
    (:class:`vmmkit.testing.harness.VirtioHarness`: fake guest memory, the virtio-MMIO
    transport, a Linux-like driver). Benches are closed when the test ends."""
    from .harness import VirtioHarness
    benches = []

    def make(device, **options):
        bench = VirtioHarness(device, **options)
        benches.append(bench)
        return bench
    yield make
    for bench in benches:
        bench.close()


@pytest.fixture
def vmmkit_run(tmp_path):
    """Boots the default guest with your TOML: ``vmmkit_run.exec(toml_text, "shell command")``
    returns the finished `vmmkit run --exec` process. Mark the test ``@pytest.mark.guest``
    so that it runs in the KVM lab on hosts without hardware KVM."""
    from .runner import VmmkitRunner
    return VmmkitRunner(tmp_path)
