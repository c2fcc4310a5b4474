"""benchmarks/jobs.py: units of a benchmark run side by side (one thread each), after their dependencies; a failure
stops what has not started and is raised once the running units finish."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from jobs import Unit, run_units  # noqa: E402


def timed(folder: str, name: str, seconds: float, needs: str = "") -> dict:
    """Writes <name> after sleeping; fails if the file <needs> is not there yet."""
    start = time.time()
    if needs and not (Path(folder) / needs).is_file():
        raise AssertionError(f"{name} started before {needs} finished")
    time.sleep(seconds)
    (Path(folder) / name).write_text("done")
    return {"name": name, "start": start, "end": time.time(), "threads": os.environ.get("OMP_NUM_THREADS"),
            "pid": os.getpid()}


def broken(name: str) -> None:
    raise ValueError(f"{name} is broken")


def test_two_jobs_run_side_by_side_after_their_dependencies(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "7")  # the jobs must set one thread themselves, not inherit it
    finished = []
    units = [Unit("a", timed, (str(tmp_path), "a", 1.0)),
             Unit("c", timed, (str(tmp_path), "c", 1.0)),
             Unit("b", timed, (str(tmp_path), "b", 0.1, "a"), deps=("a",))]
    run_units(units, 2, lambda u, r, s: finished.append((u.key, r)))
    got = dict(finished)
    assert set(got) == {"a", "b", "c"}
    assert got["b"]["start"] >= got["a"]["end"]  # after its dependency
    assert got["c"]["start"] < got["a"]["end"] and got["a"]["start"] < got["c"]["end"]  # a and c overlapped
    assert {r["threads"] for r in got.values()} == {"1"}  # one thread each
    assert os.getpid() not in {r["pid"] for r in got.values()}


def test_one_job_runs_in_this_process_in_order(tmp_path):
    finished = []
    units = [Unit("b", timed, (str(tmp_path), "b", 0.0, "a"), deps=("a",)), Unit("a", timed, (str(tmp_path), "a", 0.0))]
    run_units(units, 1, lambda u, r, s: finished.append((u.key, r["pid"])))
    assert finished == [("a", os.getpid()), ("b", os.getpid())]


def test_a_failure_stops_what_has_not_started_and_is_raised_after_the_running_units(tmp_path):
    finished = []
    units = [Unit("slow", timed, (str(tmp_path), "slow", 1.5)),
             Unit("bad", broken, ("bad",)),
             Unit("after_bad", timed, (str(tmp_path), "after_bad", 0.0), deps=("bad",)),
             Unit("later", timed, (str(tmp_path), "later", 0.0), deps=("slow",))]
    with pytest.raises(ValueError, match="bad is broken"):
        run_units(units, 2, lambda u, r, s: finished.append(u.key))
    assert finished == ["slow"]  # the running unit finished and was reported; nothing new started
    assert not (tmp_path / "after_bad").exists() and not (tmp_path / "later").exists()


def test_units_whose_dependencies_never_finish_are_refused(tmp_path):
    with pytest.raises(ValueError, match="never finish"):
        run_units([Unit("x", timed, (str(tmp_path), "x", 0.0), deps=("y",)),
                   Unit("y", timed, (str(tmp_path), "y", 0.0), deps=("x",))], 1, lambda *a: None)
    with pytest.raises(ValueError, match="duplicate"):
        run_units([Unit("x", broken, ("x",)), Unit("x", broken, ("x",))], 2, lambda *a: None)
