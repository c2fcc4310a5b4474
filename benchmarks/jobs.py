"""Run a benchmark's units of work (a seed's preparation, a teacher, a method) side by side on a small machine.

Each unit is a top-level function with its arguments and the keys of the units it needs first. ``jobs`` 1 runs them
in this process, in order, exactly as a plain loop would. ``jobs`` > 1 runs up to that many at once, each in its own
(spawned) process with ``OMP_NUM_THREADS=1``, which the nnU-Net commands it starts inherit (the plugin trainers honour
it on a CPU: :func:`nnunetv2_fedkd.trainers.base.apply_cpu_threads`). On this project's 2-core machine two trainings
with one thread each finish more work per hour than one with two threads: measured on the accuracy benchmark's data
(48x48x40, 12 cases, patch 32^3, batch 2), an epoch of 96 iterations took 13 s alone with two threads and 18 s with
two one-thread trainings side by side, i.e. 1.4x the throughput. A unit's wall time then includes the other unit's
share of the machine: report throughput, not per-unit seconds, from such a run.

A unit that fails stops the scheduling of every unit not yet started; the units already running finish and are
reported; then the first failure is raised (an interrupted benchmark resumes from what it recorded).
"""
from __future__ import annotations

import os
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import Any, Callable, Dict, List, Sequence, Tuple


@dataclass
class Unit:
    key: str
    fn: Callable[..., Any]
    args: Tuple[Any, ...] = ()
    deps: Tuple[str, ...] = field(default_factory=tuple)
    info: Any = None  # the caller's own record of what the unit is (e.g. its seed and method)


def _one_thread() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"


def run_units(units: Sequence[Unit], jobs: int, on_done: Callable[[Unit, Any, float], None]) -> None:
    """Run ``units`` (each after the units named in its ``deps`` that are in ``units``), ``jobs`` at a time, and call
    ``on_done(unit, result, seconds)`` in this process as each one finishes, in the order they finish."""
    import time

    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, not {jobs}")
    keys = [u.key for u in units]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate unit keys in {keys}")
    pending: List[Unit] = list(units)
    done: set = set()
    known = set(keys)

    def ready(u: Unit) -> bool:
        return all(d in done or d not in known for d in u.deps)

    if jobs == 1:
        while pending:
            u = next((u for u in pending if ready(u)), None)
            if u is None:
                raise ValueError(f"units whose dependencies never finish: {[u.key for u in pending]}")
            pending.remove(u)
            print(f"== {u.key}", flush=True)
            t0 = time.time()
            result = u.fn(*u.args)
            done.add(u.key)
            on_done(u, result, time.time() - t0)
        return
    failure = None
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn"), initializer=_one_thread) as pool:
        running: Dict[Any, Tuple[Unit, float]] = {}
        while pending or running:
            while failure is None and len(running) < jobs:
                u = next((u for u in pending if ready(u)), None)
                if u is None:
                    break
                pending.remove(u)
                print(f"== {u.key} (started)", flush=True)
                running[pool.submit(u.fn, *u.args)] = (u, time.time())
            if not running:
                if pending and failure is None:
                    raise ValueError(f"units whose dependencies never finish: {[u.key for u in pending]}")
                break
            finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in finished:
                u, t0 = running.pop(fut)
                try:
                    result = fut.result()
                except BaseException as e:  # noqa: BLE001 - reported and re-raised once the running units finish
                    print(f"!! {u.key} failed: {type(e).__name__}: {e}", flush=True)
                    failure = failure or e
                    continue
                done.add(u.key)
                on_done(u, result, time.time() - t0)
    if failure is not None:
        raise failure
