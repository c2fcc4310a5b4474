"""Dual KD benchmark (He et al. 2023, federated few-shot): a hospital with a few labelled and several unlabelled scans
distils a model trained elsewhere, with ``nnUNetTrainerDualKD``, against the same hospital without distillation.

    python benchmarks/dual_kd.py --out benchmarks/results/dual_kd [--workdir DIR] [--seed 0] [--labelled 2]
        [--unlabelled 6] [--held-out 4] [--public-iterations 1920] [--site-iterations 960] [--jobs 2] [--prepared]

Data: the accuracy benchmark's synthetic federation for ``--seed`` (48x48x40, 0.55x field of view; ``--prepared``:
``--workdir`` is a seed folder an accuracy run synthesised and converted, e.g. ``<accuracy workdir>/seed_1``).

* The few-shot hospital is the pancreas site (MSD ``Task07_Pancreas`` layout, its own scanner): an MSD folder with its
  first ``--labelled`` cases labelled and the next ``--unlabelled`` as unlabelled images (``imagesTs``), converted as
  a user would with ``nnunetv2_fedkd convert msd DIR --unlabelled-as-training`` (unlabelled cases annotate no organ);
  its last ``--held-out`` labelled cases are the hospital's own test set (same scanner).
* The public model ("trained elsewhere"): the three other sites' scans (other scanners), every organ labelled (the
  generator knows them: ``nnunetv2_fedkd.data.synthetic.oracle``), stock nnU-Net trainer, ``--public-iterations``.

Trained at the hospital, each ``--site-iterations`` iterations (small plans, no augmentation):

* ``labelled_only``: stock nnU-Net's trainer on the labelled cases alone (what an nnU-Net user trains today);
* ``marginal``: ``nnUNetTrainerMarginal`` on the labelled + unlabelled dataset (the unlabelled cases add no loss):
  DualKD's own loss without distillation;
* ``dual_kd``: ``nnUNetTrainerDualKD`` on the same dataset, the public model distilled (responses on every class a case
  does not annotate, decoder features on the unlabelled cases).

Figures: pancreas Dice on the held-out cases (stock ``nnUNetv2_predict`` / ``nnUNetv2_evaluate_folder``; the public
model's 4-organ prediction relabelled to the hospital's label set with SimpleITK's ``ChangeLabel``). ``--jobs 2``
trains two networks at a time, one thread each. Finished trainings with the same settings are reused on a rerun.
Writes ``results.json`` (command, versions, machine), ``results.md`` and ``dice.png`` into ``--out``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import (BASE_SETTINGS, DATA, TEACHER_TRAINER, dataset_name, dice_bar_plot, machine,  # noqa: E402
                      results_for_data, schedule, record_trainings, train_unless_done, versions,
                      workdir_seed)
from record import add_out_arguments, command_line, out_and_workdir, write_results  # noqa: E402

SITE = "pancreas_site"  # the few-shot hospital (an MSD task: unlabelled images have their place, imagesTs)
FEWSHOT_ID, HELD_OUT_ID, LABELLED_ONLY_ID, PUBLIC_POOL_ID, PUBLIC_ID = 521, 522, 523, 530, 531
PATCH = tuple(DATA["patch_size"])
# row -> (trainer, dataset id, uses the public model)
SITE_MODELS = {"labelled_only": (TEACHER_TRAINER, LABELLED_ONLY_ID, False),
               "marginal": ("nnUNetTrainerMarginal", FEWSHOT_ID, False),
               "dual_kd": ("nnUNetTrainerDualKD", FEWSHOT_ID, True)}
# every model: the public one ("trained elsewhere") and the hospital's
MODELS = {"public": (TEACHER_TRAINER, PUBLIC_ID, False), **SITE_MODELS}


def _msd_subset(src: Path, dst: Path, labelled: List[dict], unlabelled: List[dict]) -> Path:
    """An MSD task folder holding ``labelled`` training entries of ``src`` and ``unlabelled`` of them as imagesTs."""
    if dst.exists():
        shutil.rmtree(dst)
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (dst / sub).mkdir(parents=True)
    meta = json.loads((src / "dataset.json").read_text())
    for e in labelled:
        shutil.copy2(src / e["image"], dst / e["image"])
        shutil.copy2(src / e["label"], dst / e["label"])
    test = []
    for e in unlabelled:
        name = "./imagesTs/" + Path(e["image"]).name
        shutil.copy2(src / e["image"], dst / name)
        test.append(name)
    meta.update({"training": labelled, "test": test, "numTraining": len(labelled), "numTest": len(test)})
    (dst / "dataset.json").write_text(json.dumps(meta, indent=1))
    return dst


def prepare(workdir: Path, seed: int, labelled: int, unlabelled: int, held_out: int, synthesise: bool) -> dict:
    """The hospital's datasets (few-shot with unlabelled cases, labelled-only, held-out) and the public pool, converted
    with the plugin's converters and planned with stock nnU-Net + small plans; skipped when ``dual_kd_prepared.json``
    says they were prepared with these numbers. Returns that record."""
    from nnunetv2_fedkd.utils import atomic_write_json

    marker = workdir / "dual_kd_prepared.json"
    wanted = {"seed": seed, "labelled": labelled, "unlabelled": unlabelled, "held_out": held_out,
              "synthesised": synthesise}
    if marker.is_file():
        done = json.loads(marker.read_text())
        if {k: done.get(k) for k in wanted} == wanted:
            print(f"   {workdir}: prepared earlier with these numbers ({marker})", flush=True)
            return done
    record = {**wanted, **_prepare(workdir, seed, labelled, unlabelled, held_out, synthesise)}
    atomic_write_json(marker, record)
    return record


def _prepare(workdir: Path, seed: int, labelled: int, unlabelled: int, held_out: int, synthesise: bool) -> dict:
    from nnunetv2_fedkd.data.conversion import convert_dataset
    from nnunetv2_fedkd.workflows.pipeline import convert_federation, plan_and_preprocess, small_plans
    from nnunetv2_fedkd.data.pooled import merge_sites
    from nnunetv2_fedkd.spec import FederationSpec, load_spec
    from nnunetv2_fedkd.data.synthetic import make_federation
    from nnunetv2_fedkd.data.synthetic.oracle import write_fully_labelled_pool

    need = labelled + unlabelled + held_out
    if synthesise:
        spec = load_spec(make_federation(workdir, seed=seed, size=tuple(DATA["size"]), cases_per_site=need,
                                         test_cases=DATA["test_cases"], fov_scale=DATA["fov_scale"]))
        convert_federation(spec, workdir / "nnUNet_raw", overwrite=True)
    spec = load_spec(workdir / "federation.toml")
    site = spec.site(SITE)
    entries = json.loads((site.source_dir / "dataset.json").read_text())["training"]
    if len(entries) < need:
        raise ValueError(f"{site.source_dir} has {len(entries)} labelled cases; --labelled + --unlabelled + "
                         f"--held-out need {need}")
    fewshot = _msd_subset(site.source_dir, workdir / "sources" / "pancreas_fewshot", entries[:labelled],
                          entries[labelled:labelled + unlabelled])
    held = _msd_subset(site.source_dir, workdir / "sources" / "pancreas_held_out",
                       entries[labelled + unlabelled:need], [])
    raw = workdir / "nnUNet_raw"
    convert_dataset("msd", fewshot, FEWSHOT_ID, dataset_name="PancreasFewShot", unlabelled_as_training=True,
                    overwrite=True, nnunet_raw=raw)
    convert_dataset("msd", fewshot, LABELLED_ONLY_ID, dataset_name="PancreasLabelledOnly", overwrite=True,
                    nnunet_raw=raw)
    convert_dataset("msd", held, HELD_OUT_ID, dataset_name="PancreasHeldOut", overwrite=True, nnunet_raw=raw)
    others = FederationSpec(spec.name, spec.labels, [s for s in spec.sites if s.name != SITE], path=spec.path)
    pool = merge_sites(others, PUBLIC_POOL_ID, dataset_name="PublicPool", nnunet_raw=raw, overwrite=True)
    public = write_fully_labelled_pool(workdir, pool.name, PUBLIC_ID, dataset_name="PublicFullyLabelled",
                                       nnunet_raw=raw, overwrite=True)
    plan_and_preprocess([FEWSHOT_ID, LABELLED_ONLY_ID, PUBLIC_ID], workdir, log_dir=workdir / "logs")
    small_plans([dataset_name(workdir, i) for i in (FEWSHOT_ID, LABELLED_ONLY_ID, PUBLIC_ID)], workdir,
                patch_size=PATCH)
    return {"public": public.name, "public_sites": [s.name for s in others.sites]}


def results_root(workdir: Path) -> Path:
    return workdir / "bench_results" / "dual_kd"


def results_dir(workdir: Path, model: str) -> Path:
    return results_root(workdir) / model


def _trainer_folder(workdir: Path, model: str, trainer: str, dataset: str) -> Path:
    return results_dir(workdir, model) / dataset / f"{trainer}__nnUNetPlansSmall__3d_fullres"


def train_model(workdir: Path, model: str, iterations: int) -> bool:
    """Train ``model`` (a MODELS row), unless a finished training with these settings is there."""
    trainer, dataset_id, uses_public = MODELS[model]
    dataset = dataset_name(workdir, dataset_id)
    settings = {**BASE_SETTINGS, **schedule(iterations)}
    if uses_public:
        public = _trainer_folder(workdir, "public", TEACHER_TRAINER, dataset_name(workdir, PUBLIC_ID))
        settings["public_model"] = {"results_folder": str(public), "folds": ["all"]}
        settings["min_teacher_dice"] = 0.0  # the public model as it is (also after the smoke test's 2 iterations)
    return train_unless_done(workdir, model, dataset, trainer, "all", settings, results_dir(workdir, model),
                             f"dual_kd_{model}_{iterations}.json")


def held_out_dice(workdir: Path, model: str) -> float:
    """Pancreas Dice of ``model`` on the hospital's held-out cases (stock predict and evaluate)."""
    import SimpleITK as sitk

    from nnunetv2_fedkd.workflows.pipeline import evaluate, predict

    trainer, dataset_id, _ = MODELS[model]
    held = workdir / "nnUNet_raw" / dataset_name(workdir, HELD_OUT_ID)
    out = workdir / "bench_predictions" / "dual_kd" / model
    pred = predict(held / "imagesTr", out, dataset_name(workdir, dataset_id), trainer, workdir, fold="all",
                   log_dir=workdir / "logs", extra_env={"nnUNet_results": str(results_dir(workdir, model))})
    if model == "public":  # its 4-organ label map in the hospital's label set: pancreas -> 1, other organs -> 0
        labels = json.loads((workdir / "nnUNet_raw" / dataset_name(workdir, PUBLIC_ID) / "dataset.json").read_text())[
            "labels"]
        change = {float(v): float(1 if k == "pancreas" else 0) for k, v in labels.items() if v != 0}
        relabelled = out.parent / f"{model}_relabelled"
        if relabelled.exists():
            shutil.rmtree(relabelled)
        relabelled.mkdir()
        shutil.copy2(pred / "plans.json", relabelled / "plans.json")
        for f in sorted(pred.glob("*.nii.gz")):
            sitk.WriteImage(sitk.ChangeLabel(sitk.ReadImage(str(f)), changeMap=change), str(relabelled / f.name))
        pred = relabelled
    dice = evaluate(held / "labelsTr", pred, held / "dataset.json", workdir, log_dir=workdir / "logs")
    if "pancreas" not in dice:
        raise KeyError(f"{pred / 'summary.json'} has no pancreas Dice (labels: {sorted(dice)})")
    return float(np.nan_to_num(dice["pancreas"]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_out_arguments(p)
    p.add_argument("--seed", type=int, default=None,
                   help="default 0; with --prepared, the workdir's own seed (a different --seed is refused)")
    p.add_argument("--labelled", type=int, default=2)
    p.add_argument("--unlabelled", type=int, default=6)
    p.add_argument("--held-out", type=int, default=4)
    p.add_argument("--public-iterations", type=int, default=1920)
    p.add_argument("--site-iterations", type=int, default=960)
    p.add_argument("--jobs", type=int, default=1, help="trainings at a time, one thread each when > 1")
    p.add_argument("--prepared", action="store_true",
                   help="--workdir is a seed folder the accuracy benchmark synthesised and converted")
    args = p.parse_args(argv)
    from jobs import Unit, run_units

    out, wd = out_and_workdir(args)
    args.seed = workdir_seed(wd, args.seed, args.prepared)
    t0 = time.time()
    data = prepare(wd, args.seed, args.labelled, args.unlabelled, args.held_out, synthesise=not args.prepared)
    results_for_data(results_root(wd), data)  # finished trainings are reused only on the same data
    units = [Unit("public", train_model, (wd, "public", args.public_iterations))]
    units += [Unit(m, train_model, (wd, m, args.site_iterations), deps=("public",) if SITE_MODELS[m][2] else ())
              for m in SITE_MODELS]
    train_seconds: Dict[str, object] = {}
    run_units(units, args.jobs, record_trainings(train_seconds))
    dice = {m: held_out_dice(wd, m) for m in MODELS}
    print(f"   held-out pancreas Dice: {json.dumps({m: round(d, 3) for m, d in dice.items()})}", flush=True)
    record = {"command": command_line(), "seed": args.seed,
              "site": SITE, "labelled": args.labelled, "unlabelled": args.unlabelled, "held_out": args.held_out,
              "public_iterations": args.public_iterations, "site_iterations": args.site_iterations,
              "jobs": args.jobs, "public": data["public"], "public_sites": data["public_sites"],
              "pancreas_dice": dice, "train_seconds": train_seconds,
              "settings": BASE_SETTINGS, "versions": versions(), "machine": machine(),
              "seconds": round(time.time() - t0)}
    rows = {"public": "public model (other sites' scanners, every organ labelled), alone",
            "labelled_only": f"stock nnU-Net on the {args.labelled} labelled cases",
            "marginal": f"marginal loss on {args.labelled} labelled + {args.unlabelled} unlabelled (no KD)",
            "dual_kd": f"DualKD on {args.labelled} labelled + {args.unlabelled} unlabelled, from the public model"}
    lines = [f"Seed {args.seed}; the few-shot hospital: {SITE} ({args.labelled} labelled + {args.unlabelled} "
             f"unlabelled cases, {args.site_iterations} iterations each model); public model: "
             f"{', '.join(data['public_sites'])} fully labelled, {args.public_iterations} iterations. Pancreas Dice "
             f"on the hospital's {args.held_out} held-out cases (its own scanner).", "",
             "| model | pancreas Dice | train s |", "|---|---|---|"]
    lines += [f"| {rows[m]} | {d:.3f} | {train_seconds.get(m, '')} |" for m, d in dice.items()]
    lines += ["", f"Dual KD - without (marginal): {dice['dual_kd'] - dice['marginal']:+.3f}; dual KD - labelled "
                  f"only: {dice['dual_kd'] - dice['labelled_only']:+.3f}.", "", f"{record['seconds']} s in all."]
    write_results(out, record, lines)
    dice_bar_plot(out / "dice.png", list(dice), ["pancreas"], {m: {"pancreas": d} for m, d in dice.items()},
                  ylabel="Dice (the hospital's held-out cases)")
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'dice.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
