"""The demo's side-by-side runner (nnunetv2_fedkd.workflows.demo.run_side_by_side): lanes at the same time, steps in order,
a failure stops what has not started and is raised."""
import threading
import time

import pytest

from nnunetv2_fedkd.workflows.demo import Step, run_side_by_side


def test_lanes_run_at_the_same_time_and_steps_in_order():
    other_lane_started = threading.Event()
    order = []

    def wait_for_other_lane():
        # would time out if the lanes ran one after the other
        assert other_lane_started.wait(timeout=10), "the second lane did not start while the first was running"
        order.append("a1")

    lanes = [[Step("a1", wait_for_other_lane), Step("a2", lambda: order.append("a2"))],
             [Step("b1", other_lane_started.set), Step("b2", lambda: order.append("b2"))]]
    run_side_by_side(lanes, time.perf_counter())
    assert order.index("a1") < order.index("a2")
    assert sorted(order) == ["a1", "a2", "b2"]


def test_a_failed_step_stops_the_steps_not_started_and_is_raised():
    ran = []
    failed, b_started = threading.Event(), threading.Event()

    def fail():
        b_started.wait(timeout=10)
        failed.set()
        raise RuntimeError("site exploded")

    def slow():
        b_started.set()
        failed.wait(timeout=10)
        time.sleep(0.5)  # the failing lane stops the others as its step raises: microseconds, given 0.5 s here
        ran.append("b1")

    lanes = [[Step("a1", fail), Step("a2", lambda: ran.append("a2"))],
             [Step("b1", slow), Step("b2", lambda: ran.append("b2"))]]
    with pytest.raises(RuntimeError, match="site exploded"):
        run_side_by_side(lanes, time.perf_counter())
    assert ran == ["b1"]  # the running step finished; nothing after the failure started


def test_one_lane_runs_everything_in_order():
    order = []
    run_side_by_side([[Step(str(i), lambda i=i: order.append(i)) for i in range(4)]], time.perf_counter())
    assert order == [0, 1, 2, 3]


def test_shared_steps_go_to_whichever_lane_is_free_each_exactly_once():
    done = []
    lock = threading.Lock()
    release = threading.Event()

    def record(name):
        with lock:
            done.append((name, threading.current_thread().name))

    def long_step():
        assert release.wait(timeout=10)  # the other lane takes the shared steps meanwhile
        record("long")

    shared = [Step(f"s{i}", lambda i=i: record(f"s{i}")) for i in range(3)]
    shared[-1] = Step("s2", lambda: (record("s2"), release.set()))
    run_side_by_side([[Step("long", long_step)], [Step("short", lambda: record("short"))]], time.perf_counter(),
                     shared=shared)
    names = [n for n, _ in done]
    assert sorted(names) == ["long", "s0", "s1", "s2", "short"]
    assert names.index("s2") < names.index("long")  # taken by the free lane while the long step ran
    threads = {n: th for n, th in done}
    assert threads["s0"] == threads["s1"] == threads["s2"] == threads["short"] != threads["long"]
