"""benchmarks/blk.py keeps the rounds a run in the lab finished when the lab stops later."""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))

import blk  # noqa: E402

HEADER = {"size_mib": 1024, "runtime": 8, "memory": "512M", "release": "6.1.0-test", "engine": None,
          "aio": "io_uring", "where": "lab", "kvm_counters": False}


def _values(scale):
    return {name: scale * (i + 1) for i, (name, *_rest) in enumerate(blk.JOBS)}


def _rows(out):
    """{label: the table row's numbers} from report()'s table."""
    rows = {}
    for label in (f"{lab} ({metric})" for _n, lab, _o, metric in blk.JOBS):
        line = next(line for line in out.splitlines() if line.startswith(label))
        rows[label] = line[len(label):].replace("x", "").split()
    return rows


def test_a_lab_that_stopped_in_round_three_reports_the_two_rounds_before(tmp_path, capsys):
    state = dict(HEADER, doing="round 3 qemu", counters={"vmmkit": [{}, {}, {}], "qemu": [{}, {}]},
                 # Round 3 has vmmkit's run only: it must not count.
                 results={"vmmkit": [_values(200), _values(400), _values(1)], "qemu": [_values(100), _values(100)]},
                 limits=[_values(400), _values(400)])
    progress = tmp_path / "progress.json"
    progress.write_text(json.dumps(state))
    blk.salvage(str(progress), lab_failed=True)
    out, err = capsys.readouterr()
    assert "during round 3 qemu; 2 rounds finished" in err
    assert ", 2 rounds (medians" in out
    first = f"{blk.JOBS[0][1]} ({blk.JOBS[0][3]})"
    # Medians over rounds 1 and 2: QEMU 100, vmmkit 300; ratios 3.00 and 0.75.
    assert _rows(out)[first] == ["100", "300", "3.00", "400", "0.75"]
    assert "KVM counters" not in out


def test_a_lab_that_stopped_before_any_round_ended_says_so(tmp_path, capsys):
    progress = tmp_path / "progress.json"
    progress.write_text(json.dumps(dict(HEADER, doing="round 1 qemu", limits=[_values(1)],
                                        results={"vmmkit": [_values(1)], "qemu": []},
                                        counters={"vmmkit": [{}], "qemu": []})))
    blk.salvage(str(progress), lab_failed=False)
    out, err = capsys.readouterr()
    assert "the benchmark failed in the lab, during round 1 qemu; 0 rounds finished" in err
    assert out == ""


def test_no_progress_file_means_no_run_started(tmp_path, capsys):
    blk.salvage(str(tmp_path / "missing.json"), lab_failed=True)
    out, err = capsys.readouterr()
    assert "before its first run started" in err and out == ""


def test_the_lab_may_go_quiet_for_longer_than_one_run_may_take():
    # A hung VMM run is stopped at run_timeout and the retry saves progress: the lab watch
    # must not stop the lab before that.
    assert blk.stall_seconds(8) > blk.run_timeout(8) + 60
