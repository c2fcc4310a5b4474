"""Learning curves: test-set Dice vs training iterations of the fully labelled oracle and of single-organ teachers.

    python benchmarks/learning_curves.py --out benchmarks/results/learning_curves \
        [--budgets 250 500 1000 2000] [--teachers pancreas] [--size 64 64 48] [--fov-scale 0.7] [--seed 0] \
        [--data-augmentation nnunet none] [--jobs 2]

Picks the budget of the accuracy benchmark from measurements instead of guesses: on one synthetic federation
(prepared exactly as ``benchmarks/accuracy.py`` prepares a seed), for every budget it trains, each with its own full
poly learning-rate schedule,

* the oracle: stock nnU-Net's trainer on the pooled images with every organ labelled (the generator knows them,
  :mod:`nnunetv2_fedkd.data.synthetic.oracle`) - the upper bound of every partial-label method;
* one single-organ teacher per ``--teachers`` organ: stock nnU-Net's trainer on that site's view of the federation
  plans (what a hospital without this tool would have);

predicts the external, fully labelled test set with stock ``nnUNetv2_predict`` and scores it with
``nnUNetv2_evaluate_folder``. Each (model, budget) is one run, so a later budget is not a continuation of an earlier
one. ``--data-augmentation`` repeats every run with each value of the trainers' ``data_augmentation`` setting
(nnU-Net's augmentation, or none). Results are kept per run in ``runs.json`` (an interrupted benchmark resumes where
it stopped; ``--workdir`` with ``--prepared`` reuses the prepared data), and summarised in ``results.json``,
``results.md`` and ``curves.png``.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy  # noqa: E402  (the benchmark whose budget this picks: same preparation, settings and commands)
from nnunetv2_fedkd.trainers.config import DATA_AUGMENTATION  # noqa: E402


def train_and_score(workdir: Path, kind: str, organ: str, budget: int, out: Path,
                    augmentation: str = "nnunet") -> Dict[str, object]:
    """Train one model (``kind`` 'oracle' or 'teacher' of ``organ``) for ``budget`` iterations with the trainers'
    ``data_augmentation`` setting ``augmentation``; test-set Dice."""
    from nnunetv2_fedkd.federated.planning import resolve_layout
    from nnunetv2_fedkd.workflows.pipeline import evaluate, predict, train
    from nnunetv2_fedkd.spec import load_spec

    spec = load_spec(workdir / "federation.toml")
    test = workdir / "nnUNet_raw" / spec.test_set.dataset
    if kind == "oracle":
        dataset = next(p.name for p in (workdir / "nnUNet_raw").glob(f"Dataset{accuracy.ORACLE_ID}_*"))
    else:
        site = next(s for s in spec.sites if s.organs == [organ])
        dataset = resolve_layout(spec, workdir).views[site.name]
    tag = (f"{kind}_{organ}_{budget}" if kind == "teacher" else f"{kind}_{budget}") + \
        ("" if augmentation == "nnunet" else f"_da_{augmentation}")
    results = workdir / "curve_results" / tag
    settings = out / f"settings_{tag}.json"
    settings.write_text(json.dumps({**accuracy.BASE_SETTINGS, **accuracy.schedule(budget),
                                    "data_augmentation": augmentation}))
    env = {"nnUNet_results": str(results)}
    t0 = time.time()
    train(dataset, accuracy.TEACHER_TRAINER, workdir, settings, fold="all", log_dir=workdir / "logs",
          extra_env=env)
    t_train = time.time() - t0
    pred = predict(test / "imagesTr", workdir / "curve_predictions" / tag, dataset, accuracy.TEACHER_TRAINER, workdir,
                   fold="all", log_dir=workdir / "logs", extra_env=env)
    t_pred = time.time() - t0 - t_train
    dice = evaluate(test / "labelsTr", pred, test / "dataset.json", workdir, log_dir=workdir / "logs")
    if kind == "teacher":
        dice = {organ: dice.get(organ, float("nan"))}
    return {"kind": kind, "organ": organ, "budget": budget, "data_augmentation": augmentation, "dice": dice,
            "train_seconds": round(t_train, 1), "versions": accuracy.versions(),  # the commit that ran it
            "predict_seconds": round(t_pred, 1)}


def _aug(run: dict) -> str:
    return run.get("data_augmentation", "nnunet")  # runs recorded before the setting existed used nnU-Net's


def write_outputs(out: Path, record: dict) -> None:
    from nnunetv2_fedkd.utils import atomic_write_json, atomic_write_text

    atomic_write_json(out / "results.json", record)
    runs = record["runs"]
    organs = record["organs"]
    budgets = sorted({r["budget"] for r in runs})
    lines = [f"Command: `{record['command']}`", "",
             f"Data: {record['data']}", "",
             "Test-set Dice (stock nnUNetv2_predict + nnUNetv2_evaluate_folder) after each budget of iterations, each "
             "budget its own training run; train / predict wall seconds.", "",
             "| model | augmentation | iterations | " + " | ".join(organs) + " | train s | predict s |",
             "|---|---|---" + "|---" * len(organs) + "|---|---|"]
    for r in sorted(runs, key=lambda r: (r["kind"] != "oracle", r["organ"], _aug(r), r["budget"])):
        cells = [f"{r['dice'][o]:.3f}" if o in r["dice"] else "" for o in organs]
        name = "oracle (all organs labelled)" if r["kind"] == "oracle" else f"teacher {r['organ']}"
        lines.append(f"| {name} | {_aug(r)} | {r['budget']} | " + " | ".join(cells) + f" | {r['train_seconds']} | "
                     f"{r['predict_seconds']} |")
    lines += ["", f"Versions: {record['versions']}; machine: {record['machine']}; {record['seconds']} s in all"]
    atomic_write_text(out / "results.md", "\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with plt.style.context("default"):
        fig, ax = plt.subplots(figsize=(6.5, 3.8))
        for aug, style in (("nnunet", "-"), ("none", "-.")):
            for o in organs:
                pts = [(r["budget"], r["dice"][o]) for r in runs
                       if r["kind"] == "oracle" and o in r["dice"] and _aug(r) == aug]
                if pts:
                    ax.plot(*zip(*sorted(pts)), marker="o", linestyle=style, label=f"oracle {o}, DA {aug}")
        for o in sorted({r["organ"] for r in runs if r["kind"] == "teacher"}):
            pts = sorted((r["budget"], r["dice"][o]) for r in runs if r["kind"] == "teacher" and r["organ"] == o)
            ax.plot(*zip(*pts), marker="s", linestyle="--", label=f"teacher {o}")
        ax.axhline(0.85, color="grey", linewidth=0.8, linestyle=":")
        ax.set_xscale("log")
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.set_xlabel("training iterations (batch 2)")
        ax.set_ylabel("Dice (external test set)")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(out / "curves.png", dpi=90)
        plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--workdir", type=Path, default=None, help="default: <out>/work")
    p.add_argument("--prepared", action="store_true", help="--workdir already holds the prepared federation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budgets", type=int, nargs="+", default=[250, 500, 1000, 2000])
    p.add_argument("--teachers", nargs="*", default=["pancreas"], help="organs whose single-organ teacher to train")
    p.add_argument("--no-oracle", action="store_true")
    p.add_argument("--size", type=int, nargs=3, default=list(accuracy.DATA["size"]))
    p.add_argument("--fov-scale", type=float, default=accuracy.DATA["fov_scale"])
    p.add_argument("--cases-per-site", type=int, default=accuracy.DATA["cases_per_site"])
    p.add_argument("--patch-size", type=int, nargs=3, default=list(accuracy.DATA["patch_size"]))
    p.add_argument("--jobs", type=int, default=1,
                   help="trainings at a time, one thread each when > 1 (benchmarks/jobs.py); train seconds are then "
                        "wall times on a shared machine")
    p.add_argument("--data-augmentation", nargs="+", choices=list(DATA_AUGMENTATION), default=["nnunet"],
                   help="the trainers' data_augmentation setting; several values: every run with each")
    args = p.parse_args(argv)
    out = args.out.absolute()
    out.mkdir(parents=True, exist_ok=True)
    wd = (args.workdir or out / "work").absolute()
    data = {"seed": args.seed, "size": args.size, "fov_scale": args.fov_scale, "cases_per_site": args.cases_per_site,
            "patch_size": args.patch_size, "test_cases": accuracy.DATA["test_cases"]}
    t0 = time.time()
    if not args.prepared:
        if wd.exists():
            import shutil

            shutil.rmtree(wd)
        wd.mkdir(parents=True)
        print(f"== preparing {wd}: {data}", flush=True)
        accuracy.prepare(wd, args.seed, True, size=tuple(args.size), patch_size=tuple(args.patch_size),
                         fov_scale=args.fov_scale, cases_per_site=args.cases_per_site)
    from nnunetv2_fedkd.spec import load_spec

    organs = list(load_spec(wd / "federation.toml").labels)
    runs_file = out / "runs.json"
    runs: List[dict] = json.loads(runs_file.read_text()) if runs_file.is_file() else []
    todo = [(kind, organ, b, aug) for aug in args.data_augmentation for kind, organ, b in
            ([] if args.no_oracle else [("oracle", "all", b) for b in args.budgets]) +
            [("teacher", o, b) for o in args.teachers for b in args.budgets]]
    from nnunetv2_fedkd.utils import atomic_write_json

    from jobs import Unit, run_units

    def on_done(unit, r, seconds) -> None:
        print(f"   {json.dumps(r)}", flush=True)
        runs.append({**r, "jobs": args.jobs})
        atomic_write_json(runs_file, runs)

    run_units([Unit(f"{kind} {organ} {budget} iterations, data_augmentation {aug}", train_and_score,
                    (wd, kind, organ, budget, out, aug))
               for kind, organ, budget, aug in todo
               if not any(r["kind"] == kind and r["organ"] == organ and r["budget"] == budget and _aug(r) == aug
                          for r in runs)], args.jobs, on_done)
    record = {"command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]), "data": data,
              "organs": organs, "runs": runs, "versions": accuracy.versions(), "machine": accuracy.machine(),
              "seconds": round(time.time() - t0)}
    write_outputs(out, record)
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'curves.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
