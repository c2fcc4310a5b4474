"""Distillation benchmark: one MS-KD student vs its single-organ teachers, and what a KD training step costs.

    python benchmarks/distillation.py --out benchmarks/results/distillation [--workdir DIR] [--seed 0]
        [--teacher-iterations 300] [--student-iterations 800] [--prepared [--reuse-teachers]]

On the synthetic federation (4 sites x 5 cases, one organ each, 40x40x32, 0.7x field of view; fully labelled external
test set), every site plans and preprocesses its own dataset with stock nnU-Net and trains a single-organ teacher with
stock ``nnUNetv2_train -tr nnUNetTrainerFedKDBase`` (nnU-Net's trainer, schedule from the settings file). The sites'
data pooled (``nnunetv2_fedkd merge``) then trains, with the same small plans and the same iterations:

* ``stock``: nnU-Net's trainer (unlabelled organs are background) - the reference step time;
* ``marginal``: ``nnUNetTrainerMarginal`` (partial-label loss, no teachers);
* ``mskd_online``: ``nnUNetTrainerMSKD``, teachers run on every patch (logit + feature KD);
* ``mskd_cached``: ``nnUNetTrainerMSKD`` with ``teacher_outputs: cached`` (logit KD from the stored outputs).

Figures, all from this one run: per-organ Dice of every student and of the teachers run one by one and merged
(stock ``nnUNetv2_predict`` / ``nnUNetv2_evaluate_folder``), parameters, inference wall time of the student vs the
K teachers, the mean training-step time of each trainer (nnU-Net's logged epoch times, first epoch excluded, divided
by the iterations per epoch) and the one-off cost of building the teacher cache. Writes ``results.json`` (with the
command, versions and machine), ``results.md`` and ``dice.png`` into ``--out``.
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import dice_bar_plot, machine, versions  # noqa: E402
from nnunetv2_fedkd.trainers.config import SHORT_CPU_RUN  # noqa: E402

POOLED_ID = 510
TEACHER_TRAINER = "nnUNetTrainerFedKDBase"
BASE = {**SHORT_CPU_RUN, "final_validation": False}
STUDENTS = {
    "stock": ("nnUNetTrainerFedKDBase", {}),
    "marginal": ("nnUNetTrainerMarginal", {}),
    "mskd_online": ("nnUNetTrainerMSKD", {"teacher_outputs": "online"}),
    "mskd_cached": ("nnUNetTrainerMSKD", {"teacher_outputs": "cached", "feature_kd_weight": 0.0}),
}


def prepare(workdir: Path, seed: int) -> None:
    from nnunetv2_fedkd.workflows.pipeline import convert_federation, plan_and_preprocess, small_plans
    from nnunetv2_fedkd.data.pooled import merge_sites
    from nnunetv2_fedkd.spec import load_spec
    from nnunetv2_fedkd.data.synthetic import make_federation

    spec = load_spec(make_federation(workdir, seed=seed, size=(40, 40, 32), cases_per_site=5, test_cases=4,
                                     fov_scale=0.7))
    convert_federation(spec, workdir / "nnUNet_raw")
    pooled = merge_sites(spec, POOLED_ID, nnunet_raw=workdir / "nnUNet_raw", overwrite=True)
    plan_and_preprocess([s.dataset_id for s in spec.sites] + [POOLED_ID], workdir, log_dir=workdir / "logs")
    small_plans([s.dataset for s in spec.sites] + [pooled.name], workdir, patch_size=(32, 32, 32))


def schedule(iterations: int) -> Dict[str, int]:
    epochs = max(2, iterations // 100)
    return {"num_epochs": epochs, "num_iterations_per_epoch": max(1, iterations // epochs)}


def step_seconds(fold: Path) -> Dict[str, float]:
    """Mean seconds per training iteration from nnU-Net's own log (epoch times, the first epoch left out)."""
    log = sorted(fold.glob("training_log_*.txt"))[-1].read_text()
    times = [float(x) for x in re.findall(r"Epoch time: ([0-9.]+) s", log)]
    its = json.loads((fold / "fedkd_trainer_config.json").read_text())["settings"]["num_iterations_per_epoch"]
    use = times[1:] if len(times) > 1 else times
    cache = re.search(r"teacher outputs cached in .*?: (\d+) cases predicted now in ([0-9.]+) s", log)
    return {"seconds_per_iteration": float(np.mean(use)) / its, "epochs_timed": len(use),
            "cache_cases_predicted": int(cache.group(1)) if cache else None,
            "cache_build_seconds": float(cache.group(2)) if cache else None}


def run(workdir: Path, out: Path, teacher_its: int, student_its: int, reuse_teachers: bool = False) -> dict:
    from nnunetv2_fedkd.workflows.pipeline import evaluate, predict, train
    from nnunetv2_fedkd.spec import load_spec
    from nnunetv2_fedkd.workflows.student_vs_teachers import Model, compare_student_with_teachers

    spec = load_spec(workdir / "federation.toml")
    logs = workdir / "logs"
    pooled = next(p.name for p in (workdir / "nnUNet_raw").glob(f"Dataset{POOLED_ID}_*"))
    test = workdir / "nnUNet_raw" / spec.test_set.dataset
    record: Dict[str, object] = {"teacher_iterations": teacher_its, "student_iterations": student_its}

    tcfg = out / "settings_teacher.json"
    tcfg.write_text(json.dumps({**BASE, **schedule(teacher_its)}))
    teachers: List[Model] = []
    t0 = time.perf_counter()
    for site in spec.sites:
        model = Model(site.dataset, TEACHER_TRAINER, "all", organ=site.organs[0])
        done = (model.folder(workdir / "nnUNet_results") / "checkpoint_final.pth").is_file()
        if reuse_teachers and done:
            settings = json.loads((model.folder(workdir / "nnUNet_results") / "fedkd_trainer_config.json").read_text())
            record["teacher_iterations"] = settings["settings"]["num_epochs"] * \
                settings["settings"]["num_iterations_per_epoch"]
            print(f"== teacher {site.organs[0]}: reusing {model.folder(workdir / 'nnUNet_results')}", flush=True)
        else:
            print(f"== teacher {site.organs[0]} ({site.dataset})", flush=True)
            train(site.dataset, TEACHER_TRAINER, workdir, tcfg, fold="all", log_dir=logs)
        teachers.append(model)
    record["teacher_training_seconds"] = round(time.perf_counter() - t0, 1)
    entries = [{"results_folder": str(t.folder(workdir / "nnUNet_results").parent), "folds": ["all"],
                "organ": t.organ} for t in teachers]

    steps, dice = {}, {}
    for name, (trainer, extra) in STUDENTS.items():
        print(f"== student {name} ({trainer})", flush=True)
        cfg = out / f"settings_{name}.json"
        cfg.write_text(json.dumps({**BASE, **schedule(student_its), **extra,
                                   **({"teachers": entries} if trainer == "nnUNetTrainerMSKD" else {})}))
        env = {"nnUNet_results": str(workdir / "bench_results" / name)}
        fold = train(pooled, trainer, workdir, cfg, fold="all", log_dir=logs, extra_env=env)
        steps[name] = step_seconds(fold)
        if name == "mskd_cached":
            continue  # scored below, side by side with the teachers
        pred = predict(test / "imagesTr", workdir / "bench_predictions" / name, pooled, trainer, workdir, fold="all",
                       log_dir=logs, extra_env=env)
        dice[name] = evaluate(test / "labelsTr", pred, test / "dataset.json", workdir, log_dir=logs)
    student = Model(pooled, "nnUNetTrainerMSKD", "all", results=workdir / "bench_results" / "mskd_cached")
    cmp_ = compare_student_with_teachers(workdir, student, teachers,
                                         test / "imagesTr", test / "labelsTr", test / "dataset.json",
                                         out / "student_vs_teachers", log_dir=logs)
    dice["mskd_cached"] = cmp_["dice"]["student"]
    dice["teachers_merged"] = cmp_["dice"]["merged_teachers"]
    stock = steps["stock"]["seconds_per_iteration"]
    record.update({
        "dice": dice, "train_step": steps,
        "train_step_ratio_vs_stock": {k: round(v["seconds_per_iteration"] / stock, 3) for k, v in steps.items()},
        "student_vs_teachers": {k: cmp_[k] for k in (
            "inference_seconds", "inference_seconds_teachers_total", "inference_time_ratio_student_over_teachers",
            "parameters", "parameters_teachers_total", "parameter_ratio_student_over_teachers",
            "voxels_claimed_by_several_teachers", "test_cases", "how")},
    })
    return record


def write_outputs(out: Path, record: dict, organs: List[str]) -> None:
    from nnunetv2_fedkd.utils import atomic_write_json, atomic_write_text

    atomic_write_json(out / "results.json", record)
    order = ["teachers_merged", "mskd_cached", "mskd_online", "marginal", "stock"]
    svt = record["student_vs_teachers"]
    lines = [f"Command: `{record['command']}`", "",
             f"Teachers: {record['teacher_iterations']} iterations each on their own site; students: "
             f"{record['student_iterations']} iterations on the pooled sites. Dice on the external test set "
             f"({svt['test_cases']} cases).", "",
             "| model | " + " | ".join(organs) + " | mean | s / training step | x stock step |",
             "|---" * (len(organs) + 4) + "|"]
    for m in order:
        vals = [float(np.nan_to_num(record["dice"][m].get(o, np.nan))) for o in organs]
        st = record["train_step"].get(m)
        step = f"{st['seconds_per_iteration']:.3f} | {record['train_step_ratio_vs_stock'][m]:.2f}" if st else "- | -"
        lines.append(f"| {m} | " + " | ".join(f"{v:.3f}" for v in vals) + f" | {np.mean(vals):.3f} | {step} |")
    st = record["train_step"]["mskd_cached"]
    cache = f"built once in {st['cache_build_seconds']} s" if st.get("cache_cases_predicted") else \
        "reused (built by an earlier run on the same teachers and plans)"
    lines += ["", f"Student vs the {len(organs)} teachers: parameters {svt['parameters']['student']['network']:,} vs "
              f"{svt['parameters_teachers_total']:,} (ratio {svt['parameter_ratio_student_over_teachers']}); "
              f"inference (stock nnUNetv2_predict, wall) {svt['inference_seconds']['student']:.1f} s vs "
              f"{svt['inference_seconds_teachers_total']:.1f} s (ratio "
              f"{svt['inference_time_ratio_student_over_teachers']}). Teacher cache {cache}.", "",
              f"Versions: {record['versions']}; machine: {record['machine']}; {record['seconds']} s in all."]
    atomic_write_text(out / "results.md", "\n".join(lines) + "\n")

    dice = {m: {o: float(np.nan_to_num(record["dice"][m].get(o, np.nan))) for o in organs} for m in order}
    for m in order:
        dice[m]["mean"] = float(np.mean([dice[m][o] for o in organs]))
    dice_bar_plot(out / "dice.png", order, organs + ["mean"], dice)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--workdir", type=Path, default=None, help="default: <out>/work")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--teacher-iterations", type=int, default=300)
    p.add_argument("--student-iterations", type=int, default=800)
    p.add_argument("--prepared", action="store_true", help="--workdir already holds the prepared datasets")
    p.add_argument("--reuse-teachers", action="store_true",
                   help="with --prepared: keep teachers already trained in --workdir (their iterations are recorded)")
    args = p.parse_args(argv)
    out = args.out.absolute()
    out.mkdir(parents=True, exist_ok=True)
    wd = (args.workdir or out / "work").absolute()
    t0 = time.time()
    if not args.prepared:
        if wd.exists():
            import shutil

            shutil.rmtree(wd)
        wd.mkdir(parents=True)
        print(f"== preparing {wd}", flush=True)
        prepare(wd, args.seed)
    from nnunetv2_fedkd.spec import load_spec

    organs = list(load_spec(wd / "federation.toml").labels)
    record = run(wd, out, args.teacher_iterations, args.student_iterations, args.reuse_teachers)
    record.update({"command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]), "seed": args.seed,
                   "versions": versions(), "machine": machine(), "seconds": round(time.time() - t0, 1)})
    write_outputs(out, record, organs)
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
