"""``nnunetv2_fedkd demo``: the README's main command, the whole user path on generated data.

Stages (each prints the commands it runs and where its output is):
1. synthesise the federation (4 hospitals, one organ each, in the LiTS / KiTS23 / MSD layouts, plus a fully
   labelled BTCV-layout test set) and its ``federation.toml``;
2. convert every site with ``nnunetv2_fedkd convert`` (to the organ registry) and check them against the spec;
3. plan the federation once from the sites' merged fingerprints (``nnunetv2_fedkd plan``; every site preprocesses
   locally with stock nnU-Net) and derive small CPU-sized plans (``nnUNetPlansSmall``);
4. train, two at a time (each with half the cores): FedKD (``nnunetv2_fedkd federate ... -tr nnUNetTrainerFedKD``,
   in-process: each site distils from the round's global model on the organs it does not label) and the baseline
   users would run today, naive FedAvg (``-tr nnUNetTrainerFedNaive``), same rounds and budget; with ``--teachers``
   also one single-organ teacher per site, trained where its data is with stock ``nnUNetv2_train`` (nnU-Net's
   trainer);
5. predict the external test set with stock ``nnUNetv2_predict`` (FedKD, naive FedAvg, and every teacher, whose label
   maps are merged into one), evaluate with ``nnUNetv2_evaluate_folder`` and print the per-organ Dice table (also
   ``demo_results.json`` and ``demo_dice.png``).
"""
from __future__ import annotations

import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from nnunetv2_fedkd.env import apply_env, nnunet_env, shell_exports

MARKER = ".nnunetv2_fedkd_demo"

# (size, cases per site, test cases, field-of-view scale, rounds, local iterations) of the demo.
# FULL is the accuracy benchmark's federation (benchmarks/accuracy.py DATA: 48x48x40 voxels, 0.55x field of view,
# 12 cases per site, 6 test cases; with the same seed, the same images). Budget chosen from FedKD runs on the
# benchmark's seed-0 federation (2026-12-07, two runs side by side, one thread each; test Dice liver / spleen / kidney
# / pancreas, training seconds): at initial_lr 0.03, 4 x 120 .799/.372/.633/0 (496 s), 6 x 60 .831/.660/.799/.765,
# 8 x 40 .848/.661/.834/.682, 12 x 25 .827/.658/.827/.744 - the spleen stays under-segmented at about 300 local
# iterations; at initial_lr 0.06, 6 x 40 .808/.579/.798/.731 (266 s), 8 x 30 .854/.720/.815/.795 (266 s), 8 x 40
# .863/.802/.842/.806 (345 s). The benchmark itself (8 x 120 at 0.03): .893/.878/.858/.804. More rounds of fewer
# local iterations learn more than fewer, longer rounds (4 x 120 vs 8 x 40 above). The teachers (--teachers) get the
# local iterations each site spends in the federation (rounds x local iterations).
FULL = ((48, 48, 40), 12, 6, 0.55, 8, 40)
QUICK = ((40, 40, 32), 5, 2, 0.7, 2, 20)
DEMO_LR = 0.06  # every training of the demo (FedKD, naive FedAvg, teachers); the benchmarks keep SHORT_CPU_RUN's 0.03
METHODS = (("FedKD", "nnUNetTrainerFedKD"), ("naive FedAvg", "nnUNetTrainerFedNaive"))
TEACHER_TRAINER = "nnUNetTrainerFedKDBase"  # nnU-Net's own trainer, schedule from the settings file


@dataclass
class Step:
    label: str
    run: Callable[[], object]


def run_side_by_side(lanes: Sequence[Sequence[Step]], t_start: float, shared: Sequence[Step] = ()) -> None:
    """Run each lane's steps in order and the lanes at the same time (each step a subprocess that logs to its own
    file); a lane done with its own steps takes the next of ``shared`` until none is left. Prints when each step
    starts and ends. A failed step stops every lane before its next step; the steps already running finish; then the
    first failure is raised."""
    stop = threading.Event()
    lock = threading.Lock()
    queue = list(shared)

    def say(text: str) -> None:
        with lock:
            print(f"  {text}  ({time.perf_counter() - t_start:.0f} s)", flush=True)

    def next_shared() -> Optional[Step]:
        with lock:
            return queue.pop(0) if queue else None

    def run_lane(steps: Sequence[Step]) -> None:
        own = iter(steps)
        while not stop.is_set():
            step = next(own, None) or next_shared()
            if step is None:
                return
            say(f"start {step.label}")
            t0 = time.perf_counter()
            try:
                step.run()
            except BaseException:
                stop.set()
                say(f"FAILED {step.label.split(':')[0]}")
                raise
            say(f"done in {time.perf_counter() - t0:.0f} s: {step.label.split(':')[0]}")

    with ThreadPoolExecutor(max_workers=len(lanes)) as pool:
        futures = [pool.submit(run_lane, lane) for lane in lanes]
    for f in futures:
        f.result()


def prepare_workdir(workdir: Path) -> None:
    """Create ``workdir``; clear it if an earlier demo made it; refuse a non-empty folder the demo did not make."""
    if workdir.exists() and any(workdir.iterdir()):
        if not (workdir / MARKER).exists():
            raise FileExistsError(f"{workdir} is not empty and was not made by the demo; choose another --workdir")
        for child in workdir.iterdir():
            if child.name != MARKER:
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / MARKER).write_text("made by nnunetv2_fedkd demo; the demo clears this folder when it runs again\n")


def run_demo(workdir: Path, quick: bool = False, seed: int = 0, with_teachers: bool = False) -> int:
    import sys

    from nnunetv2_fedkd.env import subprocess_env
    from nnunetv2_fedkd.federated.planning import plan_federation, resolve_layout
    from nnunetv2_fedkd.workflows.pipeline import (convert_federation, evaluate, federate_command, predict, run_command,
                                         small_plans, train)
    from nnunetv2_fedkd.workflows.student_vs_teachers import Model, compare_student_with_teachers
    from nnunetv2_fedkd.spec import load_spec
    from nnunetv2_fedkd.trainers.config import SHORT_CPU_RUN
    from nnunetv2_fedkd.data.synthetic import make_federation
    from nnunetv2_fedkd.utils import atomic_write_json

    t_start = time.perf_counter()
    workdir = Path(workdir).absolute()
    prepare_workdir(workdir)
    apply_env(workdir, cpu=True)
    logs = workdir / "logs"
    size, n_cases, n_test, fov, rounds, iterations = QUICK if quick else FULL
    teacher_its = rounds * iterations
    n_stages = 5

    def stage(i: int, text: str) -> None:
        print(f"\n[{i}/{n_stages}] {text}  ({time.perf_counter() - t_start:.0f} s)", flush=True)

    stage(1, f"synthesising the federation: 4 sites x {n_cases} cases, {n_test} test cases, {size} voxels")
    spec_path = make_federation(workdir, seed=seed, size=size, cases_per_site=n_cases, test_cases=n_test,
                                fov_scale=fov)
    spec = load_spec(spec_path)
    for s in spec.sites:
        print(f"  {s.name:<14} labels {s.organs} as {s.source_format} in {s.source_dir}")

    stage(2, "converting the sites to nnU-Net datasets (organ registry)")
    for out in convert_federation(spec, workdir / "nnUNet_raw"):
        print(f"  wrote {out}")

    stage(3, "planning the federation once from merged fingerprints; every site preprocesses locally")
    print(f"$ nnunetv2_fedkd plan {spec_path}")
    plan_federation(spec, workdir, log_dir=logs)
    layout = resolve_layout(spec, workdir)
    for p in small_plans([layout.coordinator] + [layout.views[s.name] for s in spec.sites], workdir):
        print(f"  wrote {p}")

    settings_ = {**SHORT_CPU_RUN, "initial_lr": DEMO_LR}
    teacher_settings = atomic_write_json(workdir / "teacher_settings.json",
                                         {**settings_, "num_epochs": 1, "num_iterations_per_epoch": teacher_its,
                                          "final_validation": False})
    settings = {t: atomic_write_json(workdir / f"{t}_settings.json", settings_) for _, t in METHODS}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    lanes = max(1, min(2, cores))
    threads = {"OMP_NUM_THREADS": str(max(1, cores // lanes))}
    train_env = subprocess_env(workdir, cpu=True, training=True, extra=threads)
    teachers = [Model(layout.views[s.name], TEACHER_TRAINER, "all", organ=s.organs[0]) for s in spec.sites]

    def federation(label: str, trainer: str) -> Step:
        log = logs / f"federate_{trainer}.log"
        fedkd = trainer == METHODS[0][1]  # the sites validate FedKD halfway and at the end, not the naive run
        extra = ["--evaluate-every", str(max(1, rounds // 2))] if fedkd else []
        cmd = federate_command(spec_path, trainer, rounds, iterations, settings[trainer], *extra, strategy="fedavg",
                               evaluate=fedkd)
        return Step(f"{label}: {' '.join(map(str, cmd))}  (log {log})",
                    lambda: run_command(cmd, train_env, log, quiet=True))

    def teacher(s) -> Step:
        return Step(f"{s.organs[0]} teacher of {s.name}: nnUNetv2_train {layout.views[s.name]} 3d_fullres all -tr "
                    f"{TEACHER_TRAINER}",
                    lambda: train(layout.views[s.name], TEACHER_TRAINER, workdir, teacher_settings, fold="all",
                                  log_dir=logs, extra_env=threads))

    # FedKD on one lane, naive FedAvg on the other (same budget); with --teachers, each lane then takes the next
    # teacher not yet started. FedKD here distils from the round's global model only (the teachers are a comparison,
    # not its teachers).
    (label_kd, kd), (label_naive, naive) = METHODS
    plan = [[federation(label_kd, kd)], [federation(label_naive, naive)]]
    if lanes == 1:
        plan = [plan[0] + plan[1]]
    teacher_steps = [teacher(s) for s in spec.sites] if with_teachers else []
    what = f"{label_kd} and {label_naive} federations, {rounds} rounds x {iterations} local iterations per site"
    if with_teachers:
        what += (f"; one single-organ teacher per site (stock nnUNetv2_train -tr {TEACHER_TRAINER}, {teacher_its} "
                 f"iterations: the local iterations each site spends in the federation)")
    stage(4, f"training, {len(plan)} at a time ({threads['OMP_NUM_THREADS']} thread(s) each): {what}")
    run_side_by_side(plan, t_start, shared=teacher_steps)

    stage(5, "predicting the external test set with stock nnUNetv2_predict (FedKD, naive FedAvg"
             + (", each teacher; the teachers' label maps merged" if with_teachers else "")
             + "); evaluating with nnUNetv2_evaluate_folder")
    test = workdir / "nnUNet_raw" / spec.test_set.dataset
    images, labels, dataset_json = test / "imagesTr", test / "labelsTr", test / "dataset.json"
    dice, inference = {}, {}
    if with_teachers:
        cmp_ = compare_student_with_teachers(workdir, Model(layout.coordinator, kd, "all"), teachers, images, labels,
                                             dataset_json, workdir / "predictions", log_dir=logs)
        dice[label_kd] = cmp_["dice"]["student"]
        inference = cmp_["inference_seconds"]
    else:
        t0 = time.perf_counter()
        pred = predict(images, workdir / "predictions" / kd, layout.coordinator, kd, workdir, fold="all",
                       log_dir=logs)
        inference["student"] = round(time.perf_counter() - t0, 2)
        dice[label_kd] = evaluate(labels, pred, dataset_json, workdir, log_dir=logs)
    pred = predict(images, workdir / "predictions" / naive, layout.coordinator, naive, workdir, fold="all",
                   log_dir=logs)
    dice[label_naive] = evaluate(labels, pred, dataset_json, workdir, log_dir=logs)
    if with_teachers:
        dice[f"{len(teachers)} teachers merged"] = cmp_["dice"]["merged_teachers"]
    organs = list(spec.labels)
    header = f"  {'method':<18}" + "".join(f"{o:>10}" for o in organs) + f"{'mean':>10}"
    print("\nPer-organ Dice on the external test set (every organ is unlabelled at 3 of the 4 sites):")
    print(header)
    for label, d in dice.items():
        vals = [d.get(o, float("nan")) for o in organs]
        mean = sum(0.0 if v != v else v for v in vals) / len(vals)
        print(f"  {label:<18}" + "".join(f"{v:>10.3f}" for v in vals) + f"{mean:>10.3f}")
    if with_teachers:
        print(f"  (FedKD is one network; the teachers are {len(teachers)}: inference "
              f"{cmp_['inference_seconds']['student']:.1f} s vs {cmp_['inference_seconds_teachers_total']:.1f} s)")
    results = {"dice": dice, "rounds": rounds, "local_iterations": iterations, "initial_lr": DEMO_LR,
               "teacher_iterations": teacher_its if with_teachers else None, "size": list(size),
               "fov_scale": fov, "cases_per_site": n_cases, "test_cases": n_test, "seed": seed,
               "inference_seconds": inference, "seconds": round(time.perf_counter() - t_start)}
    atomic_write_json(workdir / "demo_results.json", results)
    plot = _plot(dice, organs, workdir / "demo_dice.png")
    run_dir = (workdir / "nnUNet_results" / layout.coordinator / "nnUNetTrainerFedKD__nnUNetPlansSmall__3d_fullres")

    print(f"\nDone in {time.perf_counter() - t_start:.0f} s. Outputs are in {workdir}:")
    print(f"  federation spec   {spec_path}")
    print(f"  Dice table/plot   {workdir / 'demo_results.json'}, {plot}")
    print(f"  FedKD model       {run_dir} (per-round metrics and progress.png in federation/)")
    print(f"  nnU-Net folders   {workdir / 'nnUNet_raw'}, nnUNet_preprocessed, nnUNet_results; logs in {logs}")
    print("To use stock nnU-Net commands on them, set the environment first:")
    print("  " + shell_exports(nnunet_env(workdir, cpu=True)).replace("\n", "\n  "))
    sys.stdout.flush()
    return 0


def _plot(dice, organs, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    with plt.style.context("default"):  # not the global seaborn style nnU-Net sets on import
        fig, ax = plt.subplots(figsize=(7, 3.5))
        width = 0.8 / max(1, len(dice))
        x = np.arange(len(organs))
        for i, (label, d) in enumerate(dice.items()):
            ax.bar(x + i * width, [np.nan_to_num(d.get(o, np.nan)) for o in organs], width, label=label)
        ax.set_xticks(x + width * (len(dice) - 1) / 2, organs)
        ax.set_ylim(0, 1)
        ax.set_ylabel("Dice, external test set")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=90)
        plt.close(fig)
    return path
