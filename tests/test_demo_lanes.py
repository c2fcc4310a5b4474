"""The demo's side-by-side runner (nnunetv2_fedkd.demo.run_side_by_side): lanes at the same time, steps in order,
a failure stops what has not started and is raised."""
import threading
import time

import pytest

from nnunetv2_fedkd.demo import Step, run_side_by_side


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
        time.sleep(0.05)
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
