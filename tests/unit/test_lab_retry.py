"""The pytest plugin's answer to a lab machine that dies mid-session: unfinished guest tests get a fresh lab."""

import json
import types

import pytest

from vmmkit.lab import run as lab_run
from vmmkit.testing import pytest_plugin
from vmmkit.testing.pytest_plugin import REPORT_OPT, _LabSession


class FakeConfig:
    rootpath = "."

    def __init__(self):
        self.pluginmanager = types.SimpleNamespace(getplugin=lambda name: None)

    def getoption(self, name):
        return 600


def fake_lab(script):
    """A run_in_lab stand-in: each call finishes the listed tests, then returns the status given."""
    calls = []

    def run_in_lab(argv, **kw):
        report = next(a.split("=", 1)[1] for a in argv if a.startswith(REPORT_OPT + "="))
        asked = [a for a in argv if "::" in a]
        finished, half_done, status = script[len(calls)]
        calls.append(asked)
        results = {n: {"outcome": "passed", "text": "", "output": "", "done": True} for n in finished}
        results.update({n: {"outcome": "passed", "text": "", "output": ""} for n in half_done})
        with open(report, "w") as f:
            json.dump(results, f)
        return status
    return run_in_lab, calls


def test_a_crashed_lab_reruns_only_the_unfinished_tests(monkeypatch):
    ids = ["t.py::a", "t.py::b", "t.py::c"]
    # The first lab finishes a, dies inside b (its setup passed, the rest never came).
    fake, calls = fake_lab([(["t.py::a"], ["t.py::b"], lab_run.LAB_FAILED), (["t.py::b", "t.py::c"], [], 0)])
    monkeypatch.setattr(lab_run, "run_in_lab", fake)
    session = _LabSession(FakeConfig(), ids)
    session.run()
    assert calls == [ids, ["t.py::b", "t.py::c"]]
    assert all(session.result(n)["outcome"] == "passed" for n in ids)
    assert len(session.lab_failures) == 1 and "2 guest tests unfinished" in session.lab_failures[0]


def test_a_lab_that_keeps_dying_gives_up_and_says_why(monkeypatch):
    ids = ["t.py::a", "t.py::b"]
    script = [([], [], lab_run.LAB_FAILED)] * (1 + pytest_plugin.LAB_RETRIES)
    fake, calls = fake_lab(script)
    monkeypatch.setattr(lab_run, "run_in_lab", fake)
    session = _LabSession(FakeConfig(), ids)
    session.run()
    assert len(calls) == 1 + pytest_plugin.LAB_RETRIES
    assert session.result("t.py::a") is None
    assert "giving up" in session.failure_text()


def test_failing_tests_are_not_rerun(monkeypatch):
    # Exit status 1 is pytest's "some tests failed": the lab worked, nothing is retried.
    fake, calls = fake_lab([(["t.py::a"], [], 1)])
    monkeypatch.setattr(lab_run, "run_in_lab", fake)
    session = _LabSession(FakeConfig(), ["t.py::a", "t.py::b"])
    session.run()
    assert len(calls) == 1
    assert session.result("t.py::b") is None


def crash_lab(script):
    """A run_in_lab stand-in whose tests fail as given: (failed {nodeid: text}, passed [nodeids]) per call."""
    calls = []

    def run_in_lab(argv, **kw):
        report = next(a.split("=", 1)[1] for a in argv if a.startswith(REPORT_OPT + "="))
        calls.append([a for a in argv if "::" in a])
        failed, passed = script[len(calls) - 1]
        results = {n: {"outcome": "passed", "text": "", "output": "", "done": True} for n in passed}
        results.update({n: {"outcome": "failed", "text": t, "output": "", "done": True} for n, t in failed.items()})
        with open(report, "w") as f:
            json.dump(results, f)
        return 1 if failed else 0
    return run_in_lab, calls


REBOOTED = pytest_plugin.STOPPED_EARLY.format(why="reboot: triple fault") + "; console tail:\n..."


def test_a_module_whose_guest_crashed_runs_once_more_whole(monkeypatch):
    ids = ["v.py::a", "v.py::b", "v.py::c", "w.py::d"]
    fake, calls = crash_lab([({"v.py::b": "AssertionError\n" + REBOOTED, "v.py::c": "no such file"},
                              ["v.py::a", "w.py::d"]),
                             ({}, ["v.py::a", "v.py::b", "v.py::c"])])
    monkeypatch.setattr(lab_run, "run_in_lab", fake)
    session = _LabSession(FakeConfig(), ids)
    session.run()
    assert calls == [ids, ["v.py::a", "v.py::b", "v.py::c"]]
    assert all(session.result(n)["outcome"] == "passed" for n in ids)
    assert len(session.guest_crashes) == 1 and "v.py" in session.guest_crashes[0]


def test_a_guest_that_crashes_again_fails(monkeypatch):
    ids = ["v.py::a", "v.py::b"]
    crashed = ({"v.py::b": REBOOTED}, ["v.py::a"])
    fake, calls = crash_lab([crashed] * (2 + pytest_plugin.GUEST_CRASH_RETRIES))
    monkeypatch.setattr(lab_run, "run_in_lab", fake)
    session = _LabSession(FakeConfig(), ids)
    session.run()
    assert len(calls) == 1 + pytest_plugin.GUEST_CRASH_RETRIES
    assert session.result("v.py::b")["outcome"] == "failed"


def test_failures_without_a_guest_crash_are_not_rerun(monkeypatch):
    # A poweroff before the command's status, a hang, a wrong answer: the test's own failure.
    fake, calls = crash_lab([({"v.py::b": pytest_plugin.STOPPED_EARLY.format(why="poweroff"),
                               "v.py::c": "TimeoutError"}, ["v.py::a"])])
    monkeypatch.setattr(lab_run, "run_in_lab", fake)
    session = _LabSession(FakeConfig(), ["v.py::a", "v.py::b", "v.py::c"])
    session.run()
    assert len(calls) == 1
    assert session.result("v.py::b")["outcome"] == "failed"


def test_a_module_whose_qemu_guest_hung_runs_once_more(monkeypatch):
    hung = "Failed: " + pytest_plugin.QEMU_GUEST_HUNG + ": killed after 300s with 2000 bytes of output"
    fake, calls = crash_lab([({"q.py::b": hung}, ["q.py::a", "v.py::c"]), ({}, ["q.py::a", "q.py::b"])])
    monkeypatch.setattr(lab_run, "run_in_lab", fake)
    session = _LabSession(FakeConfig(), ["q.py::a", "q.py::b", "v.py::c"])
    session.run()
    assert calls[1:] == [["q.py::a", "q.py::b"]]
    assert session.result("q.py::b")["outcome"] == "passed"
