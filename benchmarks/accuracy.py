"""Accuracy benchmark: the methods users would run, on the synthetic federation, same small plans and same budget.

    python benchmarks/accuracy.py --out benchmarks/results/accuracy [--seeds 0 1 2] [--rounds 8]
        [--local-iterations 120] [--teacher-iterations 3840] [--methods fedkd naive_fedavg ...] [--jobs 2]
        [--workdir DIR] [--prepared]

Per seed it synthesises the federation (4 sites x 12 cases, one organ each, 48x48x40, 0.55x field of view, plus a fully
labelled external test set of 6 cases), converts it, plans it with ``nnunetv2_fedkd plan``, derives ``nnUNetPlansSmall`` and, for
the central methods, pools it with ``nnunetv2_fedkd merge`` (stock ``nnUNetv2_plan_and_preprocess``). Every method is
the command a user runs; federated methods get ``rounds x local_iterations`` iterations per site, central methods the
same total (``rounds x local_iterations x sites``). Every model predicts the test set with stock ``nnUNetv2_predict``
and is scored with ``nnUNetv2_evaluate_folder``.

* ``teachers_alone``: one single-organ teacher per site (stock ``nnUNetv2_train -tr nnUNetTrainerFedKDBase`` on the
  site's view of the federation plans, ``--teacher-iterations``, default the central budget: what a hospital spends on
  its own model), each scored on its own organ only (what each hospital has without this tool).
* ``teachers_merged``: the same teachers, each predicting the test set, label maps merged into one. The methods that
  distil from teachers (``central_mskd``, ``fedkd_teachers``) and the pseudo-label baseline use these teachers,
  trained once per seed (cached outputs, logit KD).
* ``pseudo_label_central``: the baseline any nnU-Net user can run today: the seed's teachers label every other site's
  training images (``nnunetv2_fedkd pseudo-label``: the case's label wins, conflicts and unsure voxels become nnU-Net's
  ignore label), then one stock nnU-Net is trained on them with the central budget.
* ``fedkd_seeded`` / ``fedkd_fp16``: FedKD with ``training_seed`` 0 (every site's training seeded per round:
  reruns repeat), with float32 and with float16 transport (``--transport-dtype float16``): their difference is the
  transport's effect alone, not run-to-run spread.
* ``oracle_central``: the pooled images with every organ labelled (the synthetic generator knows them:
  :mod:`nnunetv2_fedkd.data.synthetic.oracle`), stock nnU-Net's trainer - the upper bound no real federation has.
* ``oracle_fedavg``: the upper bound of the federated rows at their budget: the same sites and images with every organ
  labelled at every site (``nnunetv2_fedkd synth --fully-labelled``, ``benchmarks/federated_oracle.py``), FedAvg of
  the stock loss, the same rounds x local iterations.

Writes ``results.json`` (every number, the command, versions, machine), ``results.md`` (mean +- sd over seeds) and
``dice.png`` into ``--out``.

``--jobs 2`` runs two units of work (a seed's preparation, one teacher, one method) at a time, each with one thread
(``benchmarks/jobs.py``: 1.4x the throughput of one two-thread training on 2 cores); the seconds recorded per method
are then wall times on a shared machine.

Resumable per seed and method: every finished (seed, method) is kept in ``<out>/runs.json`` with its budget, and a
rerun with the same ``--out`` skips those whose budget (rounds, local iterations, settings) is the same; a seed's
workdir records its preparation (``prepared.json``) and is not synthesised again when it matches (``--fresh``: start
over).

``--prepared`` with ``--workdir``: use an existing planned workdir (one seed: the workdir itself, what the smoke test
does; several: its ``seed_<N>`` folders, as a full run leaves them - e.g. to run more methods on the same data, the
teachers trained there being reused).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from nnunetv2_fedkd.trainers.config import SHORT_CPU_RUN

TEACHERS = "<the seed's single-organ teachers>"  # placeholder in settings, replaced by the teacher entries
KD_FROM_TEACHERS = {"teachers": TEACHERS, "teacher_outputs": "cached", "feature_kd_weight": 0.0}
TEACHER_TRAINER = "nnUNetTrainerFedKDBase"  # nnU-Net's own trainer, schedule from the settings file
# method -> (kind, trainer, extra federate args / None, trainer settings)
METHODS: Dict[str, tuple] = {
    "teachers_alone": ("teachers_alone", TEACHER_TRAINER, None, {}),
    "teachers_merged": ("teachers", TEACHER_TRAINER, None, {}),
    "central_naive": ("central", "nnUNetTrainerNaivePartial", None, {}),
    "central_marginal": ("central", "nnUNetTrainerMarginal", None, {}),
    "central_multihead": ("central", "nnUNetTrainerMultiHead", None, {}),
    "central_mskd": ("central", "nnUNetTrainerMSKD", None, KD_FROM_TEACHERS),
    "naive_fedavg": ("federated", "nnUNetTrainerFedNaive", ["--strategy", "fedavg"], {}),
    "fedavg_marginal": ("federated", "nnUNetTrainerFedKD", ["--strategy", "fedavg"], {"global_kd_weight": 0.0}),
    "fedprox_marginal": ("federated", "nnUNetTrainerFedKD", ["--strategy", "fedprox", "--strategy-option", "mu=0.01"],
                         {"global_kd_weight": 0.0}),
    "fedbn_marginal": ("federated", "nnUNetTrainerFedKD", ["--strategy", "fedbn"], {"global_kd_weight": 0.0}),
    "fedkd": ("federated", "nnUNetTrainerFedKD", ["--strategy", "fedavg"], {}),
    "fedkd_teachers": ("federated", "nnUNetTrainerFedKD", ["--strategy", "fedavg"], KD_FROM_TEACHERS),
    # the transport's effect alone: the same seeded FedKD with float32 and with float16 weights and updates
    "fedkd_seeded": ("federated", "nnUNetTrainerFedKD", ["--strategy", "fedavg"], {"training_seed": 0}),
    "fedkd_fp16": ("federated", "nnUNetTrainerFedKD", ["--strategy", "fedavg", "--transport-dtype", "float16"],
                   {"training_seed": 0}),
    "pseudo_label_central": ("pseudo", TEACHER_TRAINER, None, {}),
    "oracle_central": ("oracle", TEACHER_TRAINER, None, {}),
    "oracle_fedavg": ("federated_oracle", "nnUNetTrainerFedNaive", ["--strategy", "fedavg"], {}),
}
BASE_SETTINGS = {**SHORT_CPU_RUN, "final_validation": False}
POOLED_ID = 510
ORACLE_ID = 511
PSEUDO_ID = 512
# the data regime of the benchmark (image size in voxels, field-of-view scale, labelled cases per site, small-plans
# patch); benchmarks/learning_curves.py measures the budget this needs
# 48x48x40 at a 0.55x field of view (about 4.7 mm in-plane, 4.1 mm slices; pancreas about 860 voxels, 43 % of them not
# on its surface): measured (benchmarks/results/learning_curves_48_noda), the fully labelled oracle reaches
# .940/.919/.897/.895 after 1920 iterations and .923/.895/.877/.832 after 960; at 40x40x32 / 0.7 (7.2 mm, pancreas
# about 240 voxels, 24 % inner) it stayed at .90/.80/.81/.62 after 960
# 12 labelled cases per site (was 5): with 5, the single-organ teachers stayed below 0.85 on their own organ
# (seed 0 at 960 iterations, merged: spleen .760, kidney .820, pancreas .797), learning one scanner from 5 bodies
DATA = {"size": (48, 48, 40), "fov_scale": 0.55, "cases_per_site": 12, "test_cases": 6, "patch_size": (32, 32, 32)}
NUM_SITES = 4  # one per organ; the central methods and, by default, each teacher get NUM_SITES x the site budget


def uses_teachers(method: str) -> bool:
    kind, _, _, extra = METHODS[method]
    return kind in ("teachers", "teachers_alone", "pseudo") or extra.get("teachers") == TEACHERS


def prepare(workdir: Path, seed: int, central: bool, size=DATA["size"], patch_size=DATA["patch_size"],
            num_sites: int = 4, fov_scale: float = DATA["fov_scale"], cases_per_site: int = DATA["cases_per_site"],
            test_cases: int = DATA["test_cases"]):
    """Synthesise, convert and plan the federation in ``workdir`` and derive ``nnUNetPlansSmall`` (``patch_size``,
    capped at nnU-Net's planned patch); ``central``: also pool and plan it (dataset ``POOLED_ID``) and its fully
    labelled twin (``ORACLE_ID``). ``num_sites`` > 4 adds a second site per organ (``make_federation(num_sites=)``)."""
    from nnunetv2_fedkd.federated.planning import plan_federation, resolve_layout
    from nnunetv2_fedkd.workflows.pipeline import convert_federation, plan_and_preprocess, small_plans
    from nnunetv2_fedkd.data.pooled import merge_sites
    from nnunetv2_fedkd.spec import load_spec
    from nnunetv2_fedkd.data.synthetic import make_federation
    from nnunetv2_fedkd.data.synthetic.oracle import write_fully_labelled_pool

    spec = load_spec(make_federation(workdir, seed=seed, size=tuple(size), cases_per_site=cases_per_site,
                                     test_cases=test_cases, fov_scale=fov_scale, num_sites=num_sites))
    convert_federation(spec, workdir / "nnUNet_raw")
    plan_federation(spec, workdir, log_dir=workdir / "logs")
    layout = resolve_layout(spec, workdir)
    small_plans([layout.coordinator] + [layout.views[s.name] for s in spec.sites], workdir,
                patch_size=tuple(patch_size))
    if central:
        pooled = merge_sites(spec, POOLED_ID, nnunet_raw=workdir / "nnUNet_raw", overwrite=True)
        oracle = write_fully_labelled_pool(workdir, pooled.name, ORACLE_ID, nnunet_raw=workdir / "nnUNet_raw",
                                           overwrite=True)
        plan_and_preprocess([POOLED_ID, ORACLE_ID], workdir, log_dir=workdir / "logs")
        small_plans([pooled.name, oracle.name], workdir, patch_size=tuple(patch_size))


def method_budget(method: str, rounds: int, iters: int, teacher_iterations: int) -> dict:
    """What a finished run of ``method`` must match to be reused on resume: the budget (the teachers' too, for the
    methods that use them) and the trainer settings."""
    budget = {"rounds": rounds, "local_iterations": iters, "settings": {**BASE_SETTINGS, **METHODS[method][3]},
              "federate_args": METHODS[method][2]}
    if uses_teachers(method):
        budget["teacher_iterations"] = teacher_iterations
    return budget


def schedule(total_iterations: int) -> Dict[str, int]:
    """nnU-Net epochs of about 100 iterations for a total budget."""
    epochs = max(1, total_iterations // 100)
    return {"num_epochs": epochs, "num_iterations_per_epoch": max(1, total_iterations // epochs)}


def trained_with(fold: Path, settings: dict) -> bool:
    """A finished training in ``fold`` (checkpoint_final.pth) whose recorded plugin settings include ``settings``."""
    record = fold / "fedkd_trainer_config.json"
    if not ((fold / "checkpoint_final.pth").is_file() and record.is_file()):
        return False
    try:
        used = json.loads(record.read_text())["settings"]
    except (ValueError, KeyError) as e:
        raise ValueError(f"{record}: not a trainer settings record ({e}); delete {fold} to train it again") from None
    return all(used.get(k) == v for k, v in settings.items())


def train_unless_done(workdir: Path, label: str, dataset: str, trainer: str, fold: str, settings: dict,
                      results: Path, settings_file: str) -> bool:
    """``nnUNetv2_train dataset 3d_fullres fold -tr trainer -p nnUNetPlansSmall`` with ``settings`` (written to
    ``<workdir>/bench_settings/<settings_file>``, one file per training, so that two trainings started together never
    read each other's half-written file) into the results root ``results``, unless a finished training with these
    settings is there (:func:`trained_with`). Returns whether it trained."""
    from nnunetv2_fedkd.workflows.pipeline import train
    from nnunetv2_fedkd.utils import atomic_write_json

    if trained_with(results / dataset / f"{trainer}__nnUNetPlansSmall__3d_fullres" / f"fold_{fold}", settings):
        print(f"   {label}: trained earlier with these settings", flush=True)
        return False
    cfg = workdir / "bench_settings" / settings_file
    cfg.parent.mkdir(exist_ok=True)
    atomic_write_json(cfg, settings)
    print(f"   {label}", flush=True)
    train(dataset, trainer, workdir, cfg, fold=fold, log_dir=workdir / "logs",
          extra_env={"nnUNet_results": str(results)})
    return True


def record_trainings(train_seconds: dict):
    """``run_units``' ``on_done`` for units that return :func:`train_unless_done`'s result: records each unit's wall
    seconds in ``train_seconds``, or ``"reused"`` when a finished training was reused (a rerun's seconds would be
    those of a no-op)."""
    def on_done(unit, trained: bool, seconds: float) -> None:
        train_seconds[unit.key] = round(seconds, 1) if trained else "reused"
        if trained:
            print(f"   {unit.key} trained ({seconds:.0f} s)", flush=True)

    return on_done


def workdir_seed(workdir: Path, seed: Optional[int], prepared: bool) -> int:
    """The seed a benchmark reports: a ``--prepared`` workdir's own (its synthetic federation's ``synth_meta.json``),
    which ``seed`` (``--seed``), when given, must match; otherwise ``seed`` (default 0)."""
    if not prepared:
        return 0 if seed is None else seed
    meta = workdir / "synth_meta.json"
    if not meta.is_file():
        raise SystemExit(f"--prepared: {meta} does not exist; give a workdir the accuracy benchmark synthesised")
    own = int(json.loads(meta.read_text())["seed"])
    if seed is not None and seed != own:
        raise SystemExit(f"--seed {seed}, but {workdir} holds the federation of seed {own} ({meta})")
    return own


def results_for_data(results_root: Path, data: dict) -> Path:
    """``results_root``, started anew when the models in it were trained on other data than ``data`` describes
    (recorded in its ``data.json``), so a rerun reuses finished trainings only on the same data. The old models are
    moved aside to ``<results_root>.other_data_<n>``, never deleted: a marker that differs for another reason (a
    benchmark that records its data differently) must not cost finished trainings."""
    from nnunetv2_fedkd.utils import atomic_write_json

    marker = results_root / "data.json"
    if results_root.exists() and (not marker.is_file() or json.loads(marker.read_text()) != data):
        n = 1
        while results_root.with_name(f"{results_root.name}.other_data_{n}").exists():
            n += 1
        aside = results_root.with_name(f"{results_root.name}.other_data_{n}")
        results_root.rename(aside)
        print(f"   {results_root}: trained on other data ({marker} differs); moved to {aside}, trained again",
              flush=True)
    results_root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(marker, data)
    return results_root


def dataset_name(workdir: Path, dataset_id: int) -> str:
    """The name of raw dataset ``dataset_id`` in ``workdir``'s nnUNet_raw (``Dataset<id>_<name>``)."""
    found = sorted(p.name for p in (workdir / "nnUNet_raw").glob(f"Dataset{dataset_id:03d}_*"))
    if not found:
        raise FileNotFoundError(f"{workdir / 'nnUNet_raw'} has no Dataset{dataset_id:03d}_*")
    return found[0]


def teacher_model(workdir: Path, site) -> "Model":
    from nnunetv2_fedkd.federated.planning import resolve_layout
    from nnunetv2_fedkd.spec import load_spec
    from nnunetv2_fedkd.workflows.student_vs_teachers import Model

    layout = resolve_layout(load_spec(workdir / "federation.toml"), workdir)
    return Model(layout.views[site.name], TEACHER_TRAINER, "all", organ=site.organs[0],
                 results=workdir / "bench_results" / "teachers")


def train_teacher(workdir: Path, site_name: str, iterations: int) -> None:
    """The single-organ teacher of one site (trained unless a finished one with this budget is there): stock
    nnU-Net's trainer on the site's view of the federation plans, ``iterations`` iterations."""
    from nnunetv2_fedkd.spec import load_spec

    site = next(s for s in load_spec(workdir / "federation.toml").sites if s.name == site_name)
    m = teacher_model(workdir, site)
    train_unless_done(workdir, f"teacher {site.organs[0]} ({m.dataset}), {iterations} iterations", m.dataset,
                      TEACHER_TRAINER, "all", {**BASE_SETTINGS, **schedule(iterations)}, m.results,
                      f"teacher_{site.name}_{iterations}.json")


def teachers(workdir: Path, iterations: int) -> list:
    """The seed's single-organ teachers, one per site (each trained on first use, then reused)."""
    from nnunetv2_fedkd.spec import load_spec

    sites = load_spec(workdir / "federation.toml").sites
    for site in sites:
        train_teacher(workdir, site.name, iterations)
    return [teacher_model(workdir, site) for site in sites]


def run_method(name: str, workdir: Path, rounds: int, iters: int, teacher_iterations: int) -> Dict[str, float]:
    from nnunetv2_fedkd.env import subprocess_env
    from nnunetv2_fedkd.federated.planning import resolve_layout
    from nnunetv2_fedkd.workflows.pipeline import evaluate, federate_command, predict, run_command, train
    from nnunetv2_fedkd.spec import load_spec
    from nnunetv2_fedkd.workflows.student_vs_teachers import predict_merged_teachers

    kind, trainer, fed_args, extra = METHODS[name]
    if kind == "federated_oracle":  # a federated run in its own workdir: the seed's sites and images, all labelled
        import federated_oracle

        meta = json.loads((workdir / "synth_meta.json").read_text())
        workdir = workdir / "federated_oracle"
        federated_oracle.prepare(workdir, meta["seed"], tuple(meta["size"]), meta["fov_scale"],
                                 meta["cases_per_site"], meta["test_cases"])
        kind = "federated"
    spec = load_spec(workdir / "federation.toml")
    settings = workdir / "bench_settings" / f"{name}.json"  # per seed: the teacher entries name the seed's folders
    settings.parent.mkdir(exist_ok=True)
    logs = workdir / "logs"
    test = workdir / "nnUNet_raw" / spec.test_set.dataset
    if kind == "teachers_alone":  # each teacher on its own organ
        dice = {}
        for t in teachers(workdir, teacher_iterations):
            pred = predict(test / "imagesTr", workdir / "bench_predictions" / name / t.organ, t.dataset, t.trainer,
                           workdir, fold=t.fold, log_dir=logs, extra_env=t.env(None))
            dice[t.organ] = evaluate(test / "labelsTr", pred, test / "dataset.json", workdir, log_dir=logs)[t.organ]
        return dice
    if kind == "teachers":
        labels = json.loads((test / "dataset.json").read_text())["labels"]
        merged, _, _ = predict_merged_teachers(workdir, teachers(workdir, teacher_iterations), test / "imagesTr",
                                               labels, workdir / "bench_predictions" / name, log_dir=logs)
        return evaluate(test / "labelsTr", merged, test / "dataset.json", workdir, log_dir=logs)
    if extra.get("teachers") == TEACHERS:
        entries = [{"results_folder": str(t.folder(t.results).parent), "folds": ["all"], "organ": t.organ}
                   for t in teachers(workdir, teacher_iterations)]
        extra = {**extra, "teachers": entries}
    # every method trains into its own nnUNet_results, so methods sharing a trainer class do not collide
    results_env = {"nnUNet_results": str(workdir / "bench_results" / name)}
    if (workdir / "bench_results" / name).exists():
        import shutil

        shutil.rmtree(workdir / "bench_results" / name)
    if kind == "pseudo":
        from nnunetv2_fedkd.workflows.pipeline import plan_and_preprocess, small_plans
        from nnunetv2_fedkd.workflows.pseudo_labels import build_pseudo_label_dataset

        ds = build_pseudo_label_dataset(spec, teachers(workdir, teacher_iterations), PSEUDO_ID, workdir,
                                        log_dir=logs, overwrite=True)
        plan_and_preprocess([PSEUDO_ID], workdir, log_dir=logs)
        pre = Path(subprocess_env(workdir)["nnUNet_preprocessed"])
        patch = json.loads((pre / resolve_layout(spec, workdir).coordinator / "nnUNetPlansSmall.json").read_text())[
            "configurations"]["3d_fullres"]["patch_size"]
        small_plans([ds.name], workdir, patch_size=tuple(patch))
    if kind == "federated":
        settings.write_text(json.dumps({**BASE_SETTINGS, **extra}))
        cmd = federate_command(spec.path, trainer, rounds, iters, settings, *fed_args, evaluate=False)
        run_command(cmd, subprocess_env(workdir, cpu=True, training=True, extra=results_env),
                    logs / f"bench_{name}.log")
        dataset, fold = resolve_layout(spec, workdir).coordinator, "all"
    else:
        settings.write_text(json.dumps({**BASE_SETTINGS, **extra, **schedule(rounds * iters * len(spec.sites))}))
        dataset_id = {"oracle": ORACLE_ID, "pseudo": PSEUDO_ID}.get(kind, POOLED_ID)
        dataset = dataset_name(workdir, dataset_id)
        fold = "all"
        train(dataset, trainer, workdir, settings, fold=fold, log_dir=logs, extra_env=results_env)
    pred = predict(test / "imagesTr", workdir / "bench_predictions" / name, dataset, trainer, workdir, fold=fold,
                   log_dir=logs, extra_env=results_env)
    return evaluate(test / "labelsTr", pred, test / "dataset.json", workdir, log_dir=logs)


def versions() -> Dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("nnunetv2", "torch", "flwr", "nnunetv2_fedkd"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    import subprocess

    try:  # which commit of this repository ran
        git = subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), "describe", "--always", "--dirty"],
                             capture_output=True, text=True)
        out["nnunetv2_fedkd_commit"] = git.stdout.strip() if git.returncode == 0 else None
    except OSError:  # no git
        out["nnunetv2_fedkd_commit"] = None
    return out


def machine() -> Dict[str, object]:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count()}


def summarise(results: Dict[str, Dict[str, Dict[str, float]]], organs: List[str]) -> Dict[str, Dict[str, list]]:
    """method -> organ (and 'mean') -> [mean, sd, n] over seeds (NaN Dice counts as 0: an organ that is present in
    every test case and missing from the prediction)."""
    table = {}
    for method in {m for per_seed in results.values() for m in per_seed}:
        rows = [per_seed[method] for per_seed in results.values() if method in per_seed]
        cols = {o: [float(np.nan_to_num(r.get(o, np.nan))) for r in rows] for o in organs}
        cols["mean"] = [float(np.mean([np.nan_to_num(r.get(o, np.nan)) for o in organs])) for r in rows]
        table[method] = {k: [float(np.mean(v)), float(np.std(v)), len(v)] for k, v in cols.items()}
    return table


def write_outputs(out: Path, record: dict, organs: List[str]) -> None:
    from nnunetv2_fedkd.utils import atomic_write_json, atomic_write_text

    atomic_write_json(out / "results.json", record)
    lines = [f"Command: `{record['command']}`", "",
             f"Seeds: {record['seeds']}; {record['rounds']} rounds x {record['local_iterations']} local iterations "
             f"per site (central: the same total). Dice on the external test set, mean +- sd over the n seeds a "
             f"method was measured on (runs.json: each run's commit and seconds).", "",
             "| method | n | " + " | ".join(organs) + " | mean |", "|---" * (len(organs) + 3) + "|"]
    order = [m for m in METHODS if m in record["summary"]]
    for m in order:
        cells = [f"{record['summary'][m][o][0]:.3f} +- {record['summary'][m][o][1]:.3f}" for o in organs + ["mean"]]
        lines.append(f"| {m} | {record['summary'][m]['mean'][2]} | " + " | ".join(cells) + " |")
    lines += ["", f"Versions: {record['versions']}; machine: {record['machine']}; {record['seconds']} s"]
    atomic_write_text(out / "results.md", "\n".join(lines) + "\n")

    dice_bar_plot(out / "dice.png", order, organs + ["mean"],
                  {m: {o: record["summary"][m][o][0] for o in organs + ["mean"]} for m in order},
                  {m: {o: record["summary"][m][o][1] for o in organs + ["mean"]} for m in order})


def dice_bar_plot(path: Path, methods: List[str], columns: List[str], values: Dict[str, Dict[str, float]],
                  errors: Dict[str, Dict[str, float]] = None, ylabel: str = "Dice (external test set)") -> None:
    """Grouped bars: one group per method, one bar per column (organ or 'mean'), optional error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with plt.style.context("default"):  # not the global seaborn style nnU-Net sets on import
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(methods)), 3.8))
        x = np.arange(len(methods))
        width = 0.8 / len(columns)
        for i, c in enumerate(columns):
            ax.bar(x + i * width, [values[m][c] for m in methods], width, label=c,
                   yerr=None if errors is None else [errors[m][c] for m in methods])
        ax.set_xticks(x + width * (len(columns) - 1) / 2, methods, rotation=30, ha="right")
        ax.set_ylim(0, 1)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7, ncol=3)
        fig.tight_layout()
        fig.savefig(path, dpi=90)
        plt.close(fig)


def finished_run(runs: List[dict], seed: int, method: str, budget: dict) -> Optional[dict]:
    """The last finished run of ``method`` on ``seed`` at ``budget`` in runs.json's list, or None."""
    done = [r for r in runs if r["seed"] == seed and r["method"] == method and r["budget"] == budget]
    return done[-1] if done else None


def preparation_covers(have: dict, want: dict) -> bool:
    """Whether a workdir prepared as ``have`` serves a run that needs ``want``: the same seed and data, and the pooled
    datasets if ``want`` needs them (a workdir prepared with them also serves federated-only methods; preparing it
    again would delete the models trained there, e.g. the seed's teachers)."""
    return (have.get("seed") == want["seed"] and have.get("data") == want["data"]
            and (bool(have.get("central")) or not want["central"]))


def prepare_seed(wd: Path, preparation: dict) -> None:
    """Synthesise, convert and plan one seed's federation in a new ``wd``, then write its ``prepared.json``."""
    import shutil

    from nnunetv2_fedkd.utils import atomic_write_json

    if wd.exists():
        shutil.rmtree(wd)
    wd.mkdir(parents=True)
    print(f"== seed {preparation['seed']}: preparing {wd}", flush=True)
    prepare(wd, preparation["seed"], preparation["central"])
    atomic_write_json(wd / "prepared.json", preparation)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--workdir", type=Path, default=None, help="default: <out>/work")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--local-iterations", type=int, default=120)
    p.add_argument("--teacher-iterations", type=int, default=None,
                   help="each single-organ teacher's budget (default: the central budget, rounds x local iterations "
                        f"x {NUM_SITES} sites)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--jobs", type=int, default=1, help="units of work at a time, one thread each when > 1")
    p.add_argument("--fresh", action="store_true", help="ignore runs.json and prepare every seed again")
    p.add_argument("--prepared", action="store_true",
                   help="--workdir is already planned (one seed) or holds planned seed_<N> folders (several)")
    args = p.parse_args(argv)
    from jobs import Unit, run_units

    out = args.out.absolute()
    out.mkdir(parents=True, exist_ok=True)
    base = (args.workdir or out / "work").absolute()
    teacher_iterations = args.teacher_iterations or args.rounds * args.local_iterations * NUM_SITES
    t0 = time.time()
    results: Dict[str, Dict[str, Dict[str, float]]] = {str(seed): {} for seed in args.seeds}
    central = any(METHODS[m][0] in ("central", "oracle", "pseudo") for m in args.methods)
    from nnunetv2_fedkd.utils import atomic_write_json

    runs_file = out / "runs.json"
    runs: List[dict] = [] if args.fresh or not runs_file.is_file() else json.loads(runs_file.read_text())
    units: List[Unit] = []
    workdirs: Dict[int, Path] = {}
    for seed in args.seeds:
        # --prepared: one seed in --workdir itself, several in the seed_<N> folders an earlier run left there
        wd = workdirs[seed] = base if args.prepared and len(args.seeds) == 1 else base / f"seed_{seed}"
        deps: tuple = ()
        if not args.prepared:
            preparation = {"seed": seed, "central": central, "data": {k: list(v) if isinstance(v, tuple) else v
                                                                       for k, v in DATA.items()}}
            marker = wd / "prepared.json"
            if args.fresh or not marker.is_file() or not preparation_covers(json.loads(marker.read_text()),
                                                                            preparation):
                units.append(Unit(f"prepare seed {seed}", prepare_seed, (wd, preparation)))
                deps = (f"prepare seed {seed}",)
            else:
                print(f"== seed {seed}: {wd} already prepared", flush=True)
        todo = []
        for m in args.methods:
            budget = method_budget(m, args.rounds, args.local_iterations, teacher_iterations)
            done = finished_run(runs, seed, m, budget)
            if done:
                results[str(seed)][m] = done["dice"]
                print(f"== seed {seed}: {m} done earlier ({runs_file})", flush=True)
            else:
                todo.append((m, budget))
        teacher_keys: tuple = ()
        if any(uses_teachers(m) for m, _ in todo):  # one unit per teacher, before the methods that use them
            from nnunetv2_fedkd.data.synthetic.federation import SITES

            teacher_keys = tuple(f"teacher {site.name} seed {seed}" for site in SITES[:NUM_SITES])
            units += [Unit(k, train_teacher, (wd, site.name, teacher_iterations), deps)
                      for k, site in zip(teacher_keys, SITES[:NUM_SITES])]
        for m, budget in todo:
            units.append(Unit(f"{m} seed {seed}", run_method,
                              (m, wd, args.rounds, args.local_iterations, teacher_iterations),
                              deps + (teacher_keys if uses_teachers(m) else ()), info=(seed, m, budget)))

    def on_done(unit: Unit, result, seconds: float) -> None:
        nonlocal runs
        if unit.info is None:
            print(f"   {unit.key} done ({seconds:.0f} s)", flush=True)
            return
        seed, m, budget = unit.info
        results[str(seed)][m] = result
        runs = [r for r in runs if not (r["seed"] == seed and r["method"] == m)]
        runs.append({"seed": seed, "method": m, "budget": budget, "dice": result, "seconds": round(seconds),
                     "jobs": args.jobs, "versions": versions()})
        atomic_write_json(runs_file, runs)
        print(f"   {m} seed {seed}: {json.dumps({k: round(v, 3) for k, v in result.items()})} ({seconds:.0f} s)",
              flush=True)

    run_units(units, args.jobs, on_done)
    # the outputs show every method measured on these seeds at this budget, also those an earlier invocation ran
    # (runs.json keeps each row's commit and seconds)
    for seed in args.seeds:
        for m in METHODS:
            done = finished_run(runs, seed, m, method_budget(m, args.rounds, args.local_iterations, teacher_iterations))
            if m not in results[str(seed)] and done:
                results[str(seed)][m] = done["dice"]
    shown = [m for m in METHODS if m in args.methods or any(m in per_seed for per_seed in results.values())]
    from nnunetv2_fedkd.spec import load_spec

    organs = list(load_spec(workdirs[args.seeds[0]] / "federation.toml").labels)
    record = {"command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
              "seeds": args.seeds, "rounds": args.rounds, "local_iterations": args.local_iterations,
              "teacher_iterations": teacher_iterations, "jobs": args.jobs,
              "methods": {m: {"kind": METHODS[m][0], "trainer": METHODS[m][1], "federate_args": METHODS[m][2],
                              "settings": {**BASE_SETTINGS, **METHODS[m][3]}} for m in shown},
              "per_seed": results, "summary": summarise(results, organs), "versions": versions(),
              "machine": machine(), "seconds": round(time.time() - t0)}
    write_outputs(out, record, organs)
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'dice.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
