"""Federation performance benchmark: round time, the bytes a site sends, memory, Flower vs in-process, scaling.

    python benchmarks/federation_performance.py --out benchmarks/results/federation_performance \\
        [--workdir DIR] [--rounds 2] [--local-iterations 20] [--sizes 40x40x32 56x56x44] [--sites-counts 2 4 8]
        [--flower-sites 2] [--no-flower] [--patch-size 32 32 32 | --patch-size planned] [--smallest] [--prepared]

Per image size it synthesises and plans the federation exactly as ``benchmarks/accuracy.py`` does (its ``prepare``:
4 sites x 5 cases, one organ each - 8 sites, a second per organ, when a sites count asks for more than 4 -
``nnunetv2_fedkd plan``, ``nnUNetPlansSmall`` with a 32^3 patch by default), then
measures, in one run and on the same data:

1. **In-process rounds** for every size x sites count: the command a user runs, ``nnunetv2_fedkd federate SPEC
   --rounds R --local-iterations N -tr nnUNetTrainerFedKD -p nnUNetPlansSmall -device cpu --no-evaluate --sites ...``
   (plus ``--config`` with ``num_val_iterations_per_epoch=1``: nnU-Net's default of 50 validation iterations per
   local epoch would cost more than the 20 training iterations). Round seconds come from the run's
   ``federation/metrics.json``; each site's local training per round is timed from its files (``round_NNNN/
   fedkd_trainer.json`` is written just before nnU-Net's trainer is built, ``round_NNNN/train.log`` is last written
   when its training ends); overhead ratio = round / sum of the round's local trainings.
2. **Bytes a site sends per round**: the size of its ``update.fedkd`` (the only file that leaves a site, fp32),
   the global weights file it receives, the number of tensors and elements (parameters) in the update, and the bytes
   of the same weights as a Flower ``ArrayRecord`` (what the Flower deployment sends; transport framing excluded).
3. **A Flower deployment round** (``--flower-sites`` sites of the first size): ``flower-superlink`` and one
   ``flower-supernode`` per site on 127.0.0.1 and ``flwr run`` of ``nnunetv2_fedkd/flower/app``, started with
   ``nnunetv2_fedkd.flower.loopback`` (as ``tests/test_flower_deployment.py`` does), same sites, rounds, iterations and
   trainer settings as the in-process run, no evaluation. The SuperNodes train at the same time, one thread each (as
   in that test), while the in-process runner trains the sites one after the other; so the in-process run of the
   same sites is also measured with one thread (``OMP_NUM_THREADS=1``) next to torch's default (one per core).
4. **Scaling**: the in-process runs with 2, 4 (and 8) sites, and at 40x40x32 vs 56x56x44 (with the default fixed 32^3
   patch the network does the same work per iteration at both sizes; ``--patch-size planned`` keeps the patch nnU-Net
   planned for each size instead, so compute grows with the image).

Peak memory: ``ru_maxrss`` of the ``federate`` process (``os.wait4``), and for every run the peak of the summed RSS of
all processes this benchmark started (sampled every 0.2 s; a page shared by several processes counts in each). The machine may be
shared: per run, the CPU seconds the machine spent on other work (its busy time from /proc/stat minus this run's
processes) and the 1-minute load average before and after are recorded.

Writes ``results.json`` (every figure, the command, versions of nnunetv2/torch/flwr, the machine), ``results.md``
(tables) and ``performance.png`` into ``--out``. ``--smallest``: 1 round of 2 iterations, 2 sites, the first size, no
Flower (the smoke test). ``--prepared`` with ``--workdir``: use an existing planned federation (its own image size;
what the smoke test does with the test suite's federation).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from accuracy import machine, prepare, versions  # noqa: E402  (the accuracy benchmark's set-up and records)

from nnunetv2_fedkd.data.synthetic import MAX_SITES  # noqa: E402

TRAINER = "nnUNetTrainerFedKD"
PLANS = "nnUNetPlansSmall"
STRATEGY = "fedavg"
# trainer settings of every run (in-process and Flower): one validation iteration per local epoch
SETTINGS = {"num_val_iterations_per_epoch": 1}
DEFAULT_SIZES = ["40x40x32", "56x56x44"]
PLANNED = "planned"


# -- small helpers -----------------------------------------------------------------------------------------------------
def parse_size(text: str) -> List[int]:
    try:
        size = [int(v) for v in text.lower().split("x")]
    except ValueError:
        size = []
    if len(size) != 3 or min(size) < 16:
        raise argparse.ArgumentTypeError(f"image size must be XxYxZ with every side >= 16, got {text!r}")
    return size


def size_tag(size: Sequence[int]) -> str:
    return "x".join(str(v) for v in size)


def loadavg() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def memory_total_mib() -> Optional[int]:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return None


def machine_busy_seconds() -> Optional[float]:
    """CPU seconds the whole machine has been busy since boot (all cores; /proc/stat user+nice+system+irq+softirq+
    steal), to tell how much of a run's wall time other work on this shared machine took."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    except (OSError, ValueError, IndexError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _descendants(pid: int) -> List[int]:
    """Every process below ``pid`` (by parent id; Flower's SuperExec and app processes included)."""
    children: Dict[int, List[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _command(pid: int, length: int = 100) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ").strip()[:length]
    except OSError:
        return "?"


def _cpu_ticks(pid: int) -> Optional[tuple]:
    """(start time, utime + stime) of a process, in clock ticks (the start time tells a reused pid apart)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[19]), int(fields[11]) + int(fields[12])
    except (OSError, IndexError, ValueError):
        return None


class TreeSampler:
    """Samples (every ``interval`` s, in a thread) all processes below this one: the peak of their summed RSS, the peak
    RSS of the largest one (MiB), and their CPU seconds (the last sample of each process: a process that ends loses at
    most its last ``interval``). Also the machine's busy CPU seconds over the same time, so that the CPU other work
    took on this shared machine is on record. Use as a context manager around one run."""

    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self.peak_sum_kib = 0
        self.peak_one_kib = 0
        self.samples = 0
        self.peak_processes: List[dict] = []
        self.cpu_ticks: Dict[tuple, int] = {}
        self.busy = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            pids = _descendants(me)
            rss = [_rss_kib(p) for p in pids]
            for p in pids:
                t = _cpu_ticks(p)
                if t is not None:
                    self.cpu_ticks[(p, t[0])] = t[1]
            if rss and sum(rss) > self.peak_sum_kib:
                self.peak_sum_kib = sum(rss)
                self.peak_processes = [{"command": _command(p), "rss_mib": round(r / 1024, 1)}
                                       for p, r in zip(pids, rss) if r]
            if rss:
                self.peak_one_kib = max(self.peak_one_kib, max(rss))
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> "TreeSampler":
        self._busy0 = machine_busy_seconds()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        busy1 = machine_busy_seconds()
        self.busy = None if self._busy0 is None or busy1 is None else busy1 - self._busy0

    def record(self) -> Dict[str, float]:
        tree_cpu = sum(self.cpu_ticks.values()) / os.sysconf("SC_CLK_TCK")
        return {"sampled_peak_sum_rss_mib": round(self.peak_sum_kib / 1024, 1),
                "sampled_peak_process_rss_mib": round(self.peak_one_kib / 1024, 1),
                "sampled_cpu_seconds": round(tree_cpu, 1),
                "machine_busy_cpu_seconds": None if self.busy is None else round(self.busy, 1),
                "other_work_cpu_seconds": None if self.busy is None else round(max(0.0, self.busy - tree_cpu), 1),
                "samples": self.samples, "processes_at_peak": self.peak_processes}


# -- what a run left behind --------------------------------------------------------------------------------------------
def site_training_seconds(site_dir: Path, round_no: int) -> Optional[float]:
    """Seconds of a site's local training in round ``round_no`` (1-based), from the files NnUNetSite.fit writes: the
    round's settings file (written just before the trainer is built) and its train.log (last written when training
    ends)."""
    folder = site_dir / f"round_{round_no:04d}"
    start, end = folder / "fedkd_trainer.json", folder / "train.log"
    if not (start.is_file() and end.is_file()):
        return None
    return round(end.stat().st_mtime - start.stat().st_mtime, 2)


def round_records(run_dir: Path, sites_dir: Path, sites: Sequence[str]) -> List[dict]:
    """Per round: the round core's seconds (metrics.json), each site's local training seconds, their sum and maximum,
    and round / sum and round / max."""
    rounds = []
    for h in json.loads((run_dir / "metrics.json").read_text()):
        local = {s: site_training_seconds(sites_dir / s, h["round"]) for s in sites}
        known = [v for v in local.values() if v is not None]
        total, longest = (round(sum(known), 2), round(max(known), 2)) if known else (None, None)
        rounds.append({"round": h["round"], "seconds": h["seconds"], "aggregated": h["aggregated"],
                       "accepted": h["accepted"], "site_training_seconds": local, "local_training_sum": total,
                       "local_training_max": longest,
                       "round_over_local_sum": round(h["seconds"] / total, 3) if total else None,
                       "round_over_local_max": round(h["seconds"] / longest, 3) if longest else None})
    return rounds


def payload_bytes(sites_dir: Path, sites: Sequence[str], global_file: Path) -> dict:
    """What a site sends and receives per round: its update file (the last round's; every round's holds the same
    tensors), the global weights file, tensor and element counts, and the weights as a Flower ArrayRecord."""
    import torch

    from nnunetv2_fedkd.federated.weights_io import load_weights

    per_site = {}
    weights = None
    for s in sites:
        f = sites_dir / s / "update.fedkd"
        if f.is_file():
            per_site[s] = f.stat().st_size
            if weights is None:
                weights, _ = load_weights(f)
    out = {"update_file_bytes": per_site,
           "global_file_bytes": global_file.stat().st_size if global_file.is_file() else None}
    if weights is not None:
        out.update(tensors=len(weights), elements=int(sum(v.numel() for v in weights.values())),
                   dtypes=sorted({str(v.dtype).replace("torch.", "") for v in weights.values()}),
                   raw_tensor_bytes=int(sum(v.numel() * v.element_size() for v in weights.values())),
                   floating_point=all(torch.is_floating_point(v) for v in weights.values()))
        try:
            from nnunetv2_fedkd.flower.task import weights_to_record

            out["flower_arrayrecord_bytes"] = int(sum(len(a.data) for a in weights_to_record(weights).values()))
        except ImportError:  # Flower is optional
            out["flower_arrayrecord_bytes"] = None
    return out


def plans_summary(workdir: Path) -> dict:
    """Image size (synthetic generator), and the patch, median image size and network of the small plans used."""
    from nnunetv2_fedkd.federated.planning import resolve_layout
    from nnunetv2_fedkd.spec import load_spec

    spec = load_spec(workdir / "federation.toml")
    plans = json.loads((workdir / "nnUNet_preprocessed" / resolve_layout(spec, workdir).coordinator /
                        f"{PLANS}.json").read_text())
    cfg = plans["configurations"]["3d_fullres"]
    meta = workdir / "synth_meta.json"
    return {"image_size": json.loads(meta.read_text()).get("size") if meta.is_file() else None,
            "patch_size": cfg["patch_size"], "median_image_size_in_voxels": cfg.get("median_image_size_in_voxels"),
            "batch_size": cfg["batch_size"], "features_per_stage": cfg["architecture"]["arch_kwargs"][
                "features_per_stage"], "sites": [s.name for s in spec.sites]}


# -- the two engines ---------------------------------------------------------------------------------------------------
def run_in_process(workdir: Path, sites: Sequence[str], rounds: int, iters: int, run_root: Path,
                   settings_file: Path, threads: Optional[int] = None) -> dict:
    """``nnunetv2_fedkd federate`` for ``sites`` into its own nnUNet_results under ``run_root``; ``threads``: its
    OMP_NUM_THREADS (None: this environment's; without one, torch's default of one thread per core)."""
    import shutil

    from nnunetv2_fedkd.env import subprocess_env
    from nnunetv2_fedkd.federated.planning import resolve_layout
    from nnunetv2_fedkd.workflows.pipeline import federate_command
    from nnunetv2_fedkd.spec import load_spec

    spec = load_spec(workdir / "federation.toml")
    if run_root.exists():
        shutil.rmtree(run_root)
    run_root.mkdir(parents=True)
    results = run_root / "nnUNet_results"
    env = subprocess_env(workdir, cpu=True, training=True, extra={"nnUNet_results": str(results)})
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    threads = int(env["OMP_NUM_THREADS"]) if env.get("OMP_NUM_THREADS", "").isdigit() else None  # as recorded
    cmd = federate_command(spec.path, TRAINER, rounds, iters, settings_file, "--sites", *sites, strategy=STRATEGY,
                           plans=PLANS, evaluate=False)
    log = run_root / "federate.log"
    before = loadavg()
    with TreeSampler() as mem, open(log, "w") as f:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (peak RSS, CPU time)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} exited with {proc.returncode}; log {log}:\n{log.read_text()[-3000:]}")
    run_dir = results / resolve_layout(spec, workdir).coordinator / f"{TRAINER}__{PLANS}__3d_fullres" / "federation"
    state = json.loads((run_dir / "state.json").read_text())
    per_round = round_records(run_dir, run_dir / "sites", sites)
    # the runner's own figure per site (runner.log_update, whole seconds) as a cross-check of the file timings
    logged = [{"round": int(m[1]), "site": m[2], "seconds": int(m[3])} for m in
              re.finditer(r"round (\d+)/\d+ site (\S+): done in (\d+) s", log.read_text())]
    return {"engine": "in-process", "command": shlex.join(cmd), "sites": list(sites), "threads_per_process": threads,
            "rounds": per_round,
            "wall_seconds": round(wall, 1),
            "outside_rounds_seconds": round(wall - sum(r["seconds"] for r in per_round), 1),
            "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
            "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), **mem.record(),
            "runner_logged_site_seconds": logged, "loadavg_before": before, "loadavg_after": loadavg(),
            "bytes": payload_bytes(run_dir / "sites", sites, run_dir / state["global_weights"]),
            "run_dir": str(run_dir), "log": str(log)}


def run_flower(workdir: Path, sites: Sequence[str], rounds: int, iters: int, run_root: Path,
               timeout: float = 3600) -> dict:
    """The same federation as a Flower deployment on 127.0.0.1: SuperLink, one SuperNode per site, ``flwr run`` of the
    package's app, polled until the run has finished. Started and stopped with
    :mod:`nnunetv2_fedkd.flower.loopback` (as in ``tests/test_flower_deployment.py``)."""
    import shutil

    from nnunetv2_fedkd.env import subprocess_env
    from nnunetv2_fedkd.federated.planning import resolve_layout
    from nnunetv2_fedkd.flower import loopback
    from nnunetv2_fedkd.spec import load_spec

    spec = load_spec(workdir / "federation.toml")
    layout = resolve_layout(spec, workdir)
    chosen = [s for s in spec.sites if s.name in sites]
    if run_root.exists():
        shutil.rmtree(run_root)
    results = run_root / "nnUNet_results"
    # the SuperNodes train at the same time: one thread each (loopback.deployment sets OMP_NUM_THREADS=1)
    env = subprocess_env(workdir, cpu=True, training=True, extra={"nnUNet_results": str(results)})
    nodes = {s.name: loopback.node_config(s.name, layout.views[s.name], s.organs, run_root / "sites" / s.name)
             for s in chosen}
    run_config = (f'spec="{spec.path}" rounds={rounds} local-iterations={iters} trainer="{TRAINER}" plans="{PLANS}" '
                  f'strategy="{STRATEGY}" min-sites={len(chosen)} sites="{",".join(s.name for s in chosen)}" '
                  f'device="cpu" evaluate=false wait-for-nodes=300 round-timeout={int(timeout)} '
                  f"settings='{json.dumps(SETTINGS)}'")
    before = loadavg()
    with TreeSampler() as mem:
        t0 = time.perf_counter()
        with loopback.deployment(run_root, env, nodes) as lb:
            run_env, log_files = lb.env, lb.logs
            t_started = time.perf_counter()
            run_id, status = loopback.run_app(run_config, run_env, timeout=timeout, poll=1)
            t_done = time.perf_counter()
            server_log = loopback.flwr(["log", run_id, loopback.CONNECTION, "--show"], run_env, timeout=60)
            (run_root / "serverapp.log").write_text(server_log.stdout + server_log.stderr)
    logs = {name: str(path) for name, path in log_files.items()}
    if status != "finished:completed":
        raise RuntimeError(f"Flower run {run_id}: {status}; logs in {run_root}")
    run_dir = results / layout.coordinator / f"{TRAINER}__{PLANS}__3d_fullres" / "federation"
    state = json.loads((run_dir / "state.json").read_text())
    per_round = round_records(run_dir, run_root / "sites", [s.name for s in chosen])
    return {"engine": "flower", "run_config": run_config, "sites": [s.name for s in chosen], "rounds": per_round,
            "wall_seconds": round(time.perf_counter() - t0, 1),
            "start_seconds": round(t_started - t0, 1),  # SuperLink + SuperNodes listening
            "flwr_run_seconds": round(t_done - t_started, 1),  # flwr run until the run is finished (polled every 1 s)
            "outside_rounds_seconds": round(t_done - t_started - sum(r["seconds"] for r in per_round), 1),
            "threads_per_process": 1, **mem.record(), "loadavg_before": before, "loadavg_after": loadavg(),
            "bytes": payload_bytes(run_root / "sites", [s.name for s in chosen], run_dir / state["global_weights"]),
            "run_dir": str(run_dir), "logs": {**logs, "serverapp": str(run_root / "serverapp.log")}}


# -- outputs -----------------------------------------------------------------------------------------------------------
def mean(values) -> Optional[float]:
    values = [v for v in values if v is not None]
    return round(sum(values) / len(values), 2) if values else None


def summarise(run: dict) -> dict:
    r = run["rounds"]
    return {"mean_round_seconds": mean(x["seconds"] for x in r),
            "mean_local_training_sum": mean(x["local_training_sum"] for x in r),
            "mean_local_training_max": mean(x["local_training_max"] for x in r),
            "mean_round_over_local_sum": mean(x["round_over_local_sum"] for x in r),
            "mean_round_over_local_max": mean(x["round_over_local_max"] for x in r)}


def flower_comparison(runs: List[dict]) -> Optional[dict]:
    """The Flower run against its in-process twins (same sites and size; torch's default threads, and 1 thread)."""
    flower = next((r for r in runs if r["engine"] == "flower"), None)
    if flower is None:
        return None
    out = {"sites": len(flower["sites"]), "image": size_tag(flower["image_size"] or []),
           "flower_mean_round_seconds": flower["summary"]["mean_round_seconds"],
           "flower_wall_seconds": flower["wall_seconds"], "flower_start_seconds": flower["start_seconds"]}
    for threads, key in ((None, "in_process"), (1, "in_process_1thread")):
        twin = next((r for r in runs if r["engine"] == "in-process" and r["sites"] == flower["sites"]
                     and r["image_size"] == flower["image_size"] and r["threads_per_process"] == threads), None)
        if twin is not None:
            a, b = out["flower_mean_round_seconds"], twin["summary"]["mean_round_seconds"]
            out.update({f"{key}_mean_round_seconds": b, f"flower_over_{key}": round(a / b, 2) if a and b else None,
                        f"{key}_wall_seconds": twin["wall_seconds"]})
    return out


def write_outputs(out: Path, record: dict) -> None:
    from nnunetv2_fedkd.utils import atomic_write_json, atomic_write_text

    atomic_write_json(out / "results.json", record)
    runs = record["runs"]

    def fmt(v, spec=".1f"):
        return "-" if v is None else format(v, spec)

    lines = [f"Command: `{record['command']}`", "",
             f"{record['rounds']} round(s) x {record['local_iterations']} local iterations per site, trainer "
             f"{TRAINER}, plans {PLANS}, {STRATEGY}, settings {json.dumps(record['settings'])}, no evaluation. "
             f"Local training = a site's NnUNetSite.fit (trainer built, trained, update written). In-process sites "
             f"train one after the other; Flower SuperNodes train at the same time (1 thread each).", "",
             "| run | engine | sites | image | patch | threads per process | s per round "
             "| mean local training s (sum / max over sites) | round / sum(local) | round / max(local) | wall s "
             "| peak RSS MiB (process / sampled sum) | other work on the machine: CPU s (load avg before-after) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        s = run["summary"]
        rounds = ", ".join(fmt(r["seconds"]) for r in run["rounds"])
        peak = f"{fmt(run.get('peak_rss_mib'), '.0f')} / {fmt(run['sampled_peak_sum_rss_mib'], '.0f')}"
        lines.append(f"| {run['name']} | {run['engine']} | {len(run['sites'])} | {size_tag(run['image_size'] or [])} "
                     f"| {size_tag(run['patch_size'])} | {run['threads_per_process'] or 'default'} | {rounds} "
                     f"| {fmt(s['mean_local_training_sum'])} / "
                     f"{fmt(s['mean_local_training_max'])} | {fmt(s['mean_round_over_local_sum'], '.3f')} "
                     f"| {fmt(s['mean_round_over_local_max'], '.3f')} | {fmt(run['wall_seconds'])} | {peak} "
                     f"| {fmt(run['other_work_cpu_seconds'])} ({run['loadavg_before']}-{run['loadavg_after']}) |")
    lines += ["", "Bytes per site and round (fp32 weights; the update file is the only file that leaves a site):", "",
              "| run | tensors | elements | dtypes | update file bytes | raw tensor bytes | Flower ArrayRecord bytes "
              "| global file bytes (received) | per round, all sites, up + down |",
              "|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        b = run["bytes"]
        up = sorted(set(b["update_file_bytes"].values()))
        total = (sum(b["update_file_bytes"].values()) + len(b["update_file_bytes"]) * (b["global_file_bytes"] or 0))
        lines.append(f"| {run['name']} | {b.get('tensors')} | {b.get('elements')} | {' '.join(b.get('dtypes', []))} "
                     f"| {' / '.join(str(v) for v in up)} | {b.get('raw_tensor_bytes')} "
                     f"| {b.get('flower_arrayrecord_bytes')} | {b['global_file_bytes']} | {total} |")
    if record.get("flower_vs_in_process"):
        c = record["flower_vs_in_process"]
        lines += ["", f"Flower vs in-process ({c['sites']} sites, {c['image']}): mean s per round: Flower "
                      f"{c['flower_mean_round_seconds']}, in-process {c.get('in_process_mean_round_seconds')} "
                      f"(Flower / in-process {c.get('flower_over_in_process')}), in-process with 1 thread "
                      f"{c.get('in_process_1thread_mean_round_seconds')} (Flower / it "
                      f"{c.get('flower_over_in_process_1thread')}). Whole run: Flower {c['flower_wall_seconds']} s "
                      f"(of which SuperLink + SuperNodes start {c['flower_start_seconds']} s), in-process "
                      f"{c.get('in_process_wall_seconds')} s, in-process 1 thread "
                      f"{c.get('in_process_1thread_wall_seconds')} s."]
    prep = "; ".join(f"{k}: {v['seconds']} s" for k, v in record["preparation"].items())
    lines += ["", f"Preparation (synthesise, convert, plan, small plans): {prep}",
              f"Versions: {record['versions']}", f"Machine: {record['machine']}",
              f"Total: {record['seconds']} s"]
    atomic_write_text(out / "results.md", "\n".join(lines) + "\n")
    plot(out / "performance.png", runs)


def plot(path: Path, runs: List[dict]) -> None:
    """Left: mean seconds per round, split into local training (in-process: sum over sites; Flower: the longest
    site) and the rest. Right: peak memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in runs]
    local = [(r["summary"]["mean_local_training_sum"] if r["engine"] == "in-process"
              else r["summary"]["mean_local_training_max"]) or 0 for r in runs]
    total = [r["summary"]["mean_round_seconds"] or 0 for r in runs]
    with plt.style.context("default"):  # not the seaborn style nnU-Net sets globally on import
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(runs) + 4), 4))
        x = range(len(runs))
        a1.bar(x, local, label="local training (in-process: sum of sites; Flower: longest site)", color="tab:blue")
        a1.bar(x, [max(0.0, t - lo) for t, lo in zip(total, local)], bottom=local, label="rest of the round",
               color="tab:orange")
        a1.set_xticks(list(x), names, rotation=30, ha="right", fontsize=8)
        a1.set_ylim(0, max(total + [1.0]) * 1.3)  # room for the legend
        a1.set_ylabel("mean seconds per round")
        a1.legend(fontsize=7)
        a2.bar(x, [r["sampled_peak_sum_rss_mib"] for r in runs], color="tab:gray", label="sampled sum over processes")
        a2.plot(list(x), [r.get("peak_rss_mib") or float("nan") for r in runs], "o", color="k",
                label="federate process ru_maxrss")
        a2.set_xticks(list(x), names, rotation=30, ha="right", fontsize=8)
        a2.set_ylim(0, max([r["sampled_peak_sum_rss_mib"] for r in runs] + [1.0]) * 1.3)
        a2.set_ylabel("peak RSS (MiB)")
        a2.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=90)
        plt.close(fig)


# -- main --------------------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--workdir", type=Path, default=None, help="default: <out>/work")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--local-iterations", type=int, default=20)
    p.add_argument("--sizes", type=parse_size, nargs="+", default=None,
                   help=f"image sizes XxYxZ (default: {' '.join(DEFAULT_SIZES)})")
    p.add_argument("--sites-counts", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--flower-sites", type=int, default=2, help="sites of the Flower run (first size); default 2")
    p.add_argument("--no-flower", action="store_true")
    p.add_argument("--patch-size", nargs="+", default=["32", "32", "32"],
                   help="patch of nnUNetPlansSmall (3 ints, capped at nnU-Net's plan), or 'planned' to keep "
                        "nnU-Net's planned patch for every size")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic federation")
    p.add_argument("--smallest", action="store_true",
                   help="smoke test: 1 round of 2 iterations, 2 sites, the first size, no Flower")
    p.add_argument("--prepared", action="store_true", help="--workdir is an already planned federation (one size)")
    args = p.parse_args(argv)
    if args.smallest:
        args.rounds, args.local_iterations, args.sites_counts, args.no_flower = 1, 2, [2], True
    if args.prepared and (args.workdir is None or args.sizes is not None):
        p.error("--prepared takes --workdir (a planned federation, whose size is used) and no --sizes")
    if args.patch_size == [PLANNED]:
        patch = [10 ** 6] * 3  # small_plans caps the patch at nnU-Net's planned one
    elif len(args.patch_size) == 3 and all(v.isdigit() for v in args.patch_size):
        patch = [int(v) for v in args.patch_size]
    else:
        p.error("--patch-size takes 3 integers or 'planned'")
    sizes = args.sizes or [parse_size(s) for s in DEFAULT_SIZES]
    if args.smallest:
        sizes = sizes[:1]
    if not args.no_flower and importlib.util.find_spec("flwr") is None:
        p.error("Flower is not installed (pip install 'nnunetv2_fedkd[flower]'); or run with --no-flower")
    out = args.out.absolute()
    out.mkdir(parents=True, exist_ok=True)
    base = (args.workdir or out / "work").absolute()
    settings_file = out / "trainer_settings.json"
    settings_file.write_text(json.dumps(SETTINGS))

    wanted = args.sites_counts + ([] if args.no_flower else [args.flower_sites])
    if not args.prepared and max(wanted) > MAX_SITES:
        p.error(f"the synthetic federation has at most {MAX_SITES} sites")
    t0 = time.time()
    preparation: Dict[str, dict] = {}
    runs: List[dict] = []
    for i, size in enumerate([None] if args.prepared else sizes):
        if args.prepared:
            wd = base
            info = plans_summary(wd)
            tag = size_tag(info["image_size"] or ["prepared"])
            preparation[tag] = {"seconds": None, "workdir": str(wd), "prepared_before": True, **info}
        else:
            import shutil

            tag = size_tag(size)
            wd = base / tag
            if wd.exists():
                shutil.rmtree(wd)
            wd.mkdir(parents=True)
            print(f"== {tag}: preparing {wd}", flush=True)
            ts = time.time()
            prepare(wd, args.seed, central=False, size=size, patch_size=patch, num_sites=max(4, *wanted))
            info = plans_summary(wd)
            preparation[tag] = {"seconds": round(time.time() - ts, 1), "workdir": str(wd), **info}
        n_sites = len(info["sites"])
        bad = [n for n in wanted if not 1 <= n <= n_sites]
        if bad:
            p.error(f"sites counts {bad} out of 1..{n_sites} (the federation's sites)")
        # (engine, sites count, OMP threads per process; None: torch's default)
        jobs = [("in-process", n, None) for n in args.sites_counts]
        if i == 0 and not args.no_flower:
            # Flower, its in-process twin (same sites), and the twin with Flower's one thread per process
            if args.flower_sites not in args.sites_counts:
                jobs.append(("in-process", args.flower_sites, None))
            jobs += [("in-process", args.flower_sites, 1), ("flower", args.flower_sites, 1)]
        for engine, n, threads in jobs:
            sites = info["sites"][:n]
            name = f"{engine}_{n}sites_{tag}" + ("_1thread" if engine == "in-process" and threads == 1 else "")
            print(f"== {name}: {', '.join(sites)}", flush=True)
            run_root = wd / "bench_fedperf" / name
            if engine == "in-process":
                run = run_in_process(wd, sites, args.rounds, args.local_iterations, run_root, settings_file, threads)
            else:
                run = run_flower(wd, sites, args.rounds, args.local_iterations, run_root)
            run.update(name=name, image_size=info["image_size"], patch_size=info["patch_size"])
            run["summary"] = summarise(run)
            runs.append(run)
            print(f"   s per round {[r['seconds'] for r in run['rounds']]}, local training sum "
                  f"{[r['local_training_sum'] for r in run['rounds']]}, wall {run['wall_seconds']} s, "
                  f"peak RSS {run.get('peak_rss_mib')} / {run['sampled_peak_sum_rss_mib']} MiB", flush=True)

    comparison = flower_comparison(runs)
    import torch

    record = {"command": shlex.join([sys.executable, *sys.argv]), "rounds": args.rounds,
              "local_iterations": args.local_iterations, "trainer": TRAINER, "plans": PLANS, "strategy": STRATEGY,
              "settings": SETTINGS, "seed": args.seed, "sites_counts": args.sites_counts,
              "flower": not args.no_flower, "preparation": preparation, "runs": runs,
              "flower_vs_in_process": comparison, "versions": versions(),
              "machine": {**machine(), "torch_device": "cpu", "cuda_available": torch.cuda.is_available(),
                          "torch_threads_benchmark_process": torch.get_num_threads(),
                          "memory_total_mib": memory_total_mib(), "loadavg_end": loadavg()},
              "seconds": round(time.time() - t0)}
    write_outputs(out, record)
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'performance.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
