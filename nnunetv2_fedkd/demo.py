"""``nnunetv2_fedkd demo``: the README's main command, the whole user path on generated data.

Stages (each prints the commands it runs and where its output is):
1. synthesise the federation (4 hospitals, one organ each, in the LiTS / KiTS23 / MSD layouts, plus a fully
   labelled BTCV-layout test set) and its ``federation.toml``;
2. convert every site with ``nnunetv2_fedkd convert`` (to the organ registry) and check them against the spec;
3. plan the federation once from the sites' merged fingerprints (``nnunetv2_fedkd plan``; every site preprocesses
   locally with stock nnU-Net) and derive small CPU-sized plans (``nnUNetPlansSmall``);
4. one single-organ teacher per site, trained where its data is with stock ``nnUNetv2_train`` (nnU-Net's trainer);
5. federated training with FedKD (``nnunetv2_fedkd federate ... -tr nnUNetTrainerFedKD``), in-process: each site
   distils from the round's global model on the organs it does not label;
6. the baseline users would run today, naive FedAvg (``-tr nnUNetTrainerFedNaive``), same rounds and budget;
7. predict the external test set with stock ``nnUNetv2_predict`` (FedKD, naive FedAvg, and every teacher, whose label
   maps are merged into one), evaluate with ``nnUNetv2_evaluate_folder`` and print the per-organ Dice table (also
   ``demo_results.json`` and ``demo_dice.png``).
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

from nnunetv2_fedkd.env import apply_env, nnunet_env, shell_exports

MARKER = ".nnunetv2_fedkd_demo"

# (size, cases per site, test cases, field-of-view scale, rounds, local iterations, teacher iterations) of the demo.
# 40x40x32 voxels with a 0.7x field of view is the size the CI tests measure (tests/test_federated_training.py,
# tests/test_distillation_trainers.py). nnU-Net's 5-fold split needs at least 5 cases per dataset. 120 local
# iterations per round: measured on the demo's federation (no augmentation), FedKD's test Dice after 4 rounds of 60
# was liver/spleen/kidney/pancreas .855/0/.756/.018, after 4 rounds of 120 .846/.728/.621/.084 (the spleen is learned
# at one site only and averaged with three that do not label it).
FULL = ((40, 40, 32), 5, 4, 0.7, 4, 120, 150)
QUICK = ((40, 40, 32), 5, 2, 0.7, 2, 20, 20)
METHODS = (("FedKD", "nnUNetTrainerFedKD"), ("naive FedAvg", "nnUNetTrainerFedNaive"))
TEACHER_TRAINER = "nnUNetTrainerFedKDBase"  # nnU-Net's own trainer, schedule from the settings file


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


def run_demo(workdir: Path, quick: bool = False, seed: int = 0) -> int:
    import sys

    from nnunetv2_fedkd.env import subprocess_env
    from nnunetv2_fedkd.federated.planning import plan_federation, resolve_layout
    from nnunetv2_fedkd.pipeline import (convert_federation, evaluate, federate_command, predict, run_command,
                                         small_plans, train)
    from nnunetv2_fedkd.student_vs_teachers import Model, compare_student_with_teachers
    from nnunetv2_fedkd.spec import load_spec
    from nnunetv2_fedkd.synthetic import make_federation
    from nnunetv2_fedkd.utils import atomic_write_json

    t_start = time.perf_counter()
    workdir = Path(workdir).absolute()
    prepare_workdir(workdir)
    apply_env(workdir, cpu=True)
    logs = workdir / "logs"
    size, n_cases, n_test, fov, rounds, iterations, teacher_its = QUICK if quick else FULL
    n_stages = 7

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

    stage(4, f"one single-organ teacher per site: stock nnUNetv2_train -tr {TEACHER_TRAINER}, {teacher_its} iterations")
    from nnunetv2_fedkd.trainers.config import SHORT_CPU_RUN

    base = dict(SHORT_CPU_RUN)
    teacher_settings = atomic_write_json(workdir / "teacher_settings.json",
                                         {**base, "num_epochs": 1, "num_iterations_per_epoch": teacher_its,
                                          "final_validation": False})
    teachers = []
    for s in spec.sites:
        fold = train(layout.views[s.name], TEACHER_TRAINER, workdir, teacher_settings, fold="all", log_dir=logs)
        teachers.append(Model(layout.views[s.name], TEACHER_TRAINER, "all", organ=s.organs[0]))
        print(f"  {s.organs[0]} teacher of {s.name}: {fold}")

    # The teachers are the comparison users have today (K models, one per organ). FedKD here distils from the round's
    # global model only: measured once with these 150-iteration teachers also in FedKD (cached outputs), a teacher
    # that had not learned its organ (the kidney) taught the student background there (kidney Dice 0.78 -> 0).
    settings = {t: atomic_write_json(workdir / f"{t}_settings.json", base) for _, t in METHODS}
    train_env = subprocess_env(workdir, cpu=True, training=True)
    for i, (label, trainer) in enumerate(METHODS):
        stage(5 + i, f"federated training, {label}: {rounds} rounds x {iterations} local iterations per site")
        run_command(federate_command(spec_path, trainer, rounds, iterations, settings[trainer], strategy="fedavg",
                                     evaluate=trainer == "nnUNetTrainerFedKD"), train_env)

    stage(7, "predicting the external test set with stock nnUNetv2_predict (FedKD, naive FedAvg, each teacher; the "
             "teachers' label maps merged); evaluating with nnUNetv2_evaluate_folder")
    test = workdir / "nnUNet_raw" / spec.test_set.dataset
    cmp_ = compare_student_with_teachers(workdir, Model(layout.coordinator, "nnUNetTrainerFedKD", "all"), teachers,
                                         test / "imagesTr", test / "labelsTr", test / "dataset.json",
                                         workdir / "predictions", log_dir=logs)
    dice = {"FedKD": cmp_["dice"]["student"]}
    pred = predict(test / "imagesTr", workdir / "predictions" / "nnUNetTrainerFedNaive", layout.coordinator,
                   "nnUNetTrainerFedNaive", workdir, fold="all", log_dir=logs)
    dice["naive FedAvg"] = evaluate(test / "labelsTr", pred, test / "dataset.json", workdir, log_dir=logs)
    dice["4 teachers merged"] = cmp_["dice"]["merged_teachers"]
    organs = list(spec.labels)
    header = f"  {'method':<18}" + "".join(f"{o:>10}" for o in organs) + f"{'mean':>10}"
    print("\nPer-organ Dice on the external test set (every organ is unlabelled at 3 of the 4 sites):")
    print(header)
    for label, d in dice.items():
        vals = [d.get(o, float("nan")) for o in organs]
        mean = sum(0.0 if v != v else v for v in vals) / len(vals)
        print(f"  {label:<18}" + "".join(f"{v:>10.3f}" for v in vals) + f"{mean:>10.3f}")
    print(f"  (FedKD is one network; the teachers are {len(teachers)}: inference "
          f"{cmp_['inference_seconds']['student']:.1f} s vs {cmp_['inference_seconds_teachers_total']:.1f} s)")
    results = {"dice": dice, "rounds": rounds, "local_iterations": iterations, "teacher_iterations": teacher_its,
               "size": list(size), "cases_per_site": n_cases, "test_cases": n_test,
               "inference_seconds": cmp_["inference_seconds"], "seconds": round(time.perf_counter() - t_start)}
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
