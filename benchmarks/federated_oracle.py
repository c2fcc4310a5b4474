"""The federated oracle: the upper bound of federated training at a given budget.

    python benchmarks/federated_oracle.py --out benchmarks/results/federated_oracle_ci_size \
        [--budgets 4x60 8x60 4x120] [--seed 123] [--size 40 40 32] [--fov-scale 0.7] [--cases-per-site 5] \
        [--test-cases 2] [--trainer nnUNetTrainerFedNaive]

The central oracle (stock nnU-Net on the pooled images, every organ labelled) bounds the central methods; a
federation of averaged local updates learns less from the same number of iterations, so it bounds FedKD only
loosely. This writes the synthetic federation with EVERY organ labelled at every site
(``nnunetv2_fedkd synth --fully-labelled``: the same sites, scanners and images as the partial-label federation of
the same seed), plans it with ``nnunetv2_fedkd plan``, derives small plans (patch 32^3), and for every budget
``ROUNDSxLOCAL_ITERATIONS`` runs ``nnunetv2_fedkd federate`` (FedAvg, no per-round evaluation; with every organ
labelled the naive trainer's loss is the stock one), predicts the external, fully labelled test set with stock
``nnUNetv2_predict`` and scores it with ``nnUNetv2_evaluate_folder``. The defaults are the CI evidence test's
federation (tests/test_federated_training.py). Writes ``results.json`` (Dice per budget, seconds, the command).
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from nnunetv2_fedkd.env import subprocess_env
from nnunetv2_fedkd.federated.planning import resolve_layout
from nnunetv2_fedkd.workflows.pipeline import (convert_federation, evaluate, federate_command, nnunet_script, predict,
                                     small_plans)
from nnunetv2_fedkd.spec import load_spec
from nnunetv2_fedkd.data.synthetic import make_federation
from nnunetv2_fedkd.trainers.config import SHORT_CPU_RUN
from nnunetv2_fedkd.utils import atomic_write_json


def prepare(workdir: Path, seed: int, size, fov_scale: float, cases_per_site: int, test_cases: int):
    """Write (once), convert, plan and small-plan the fully labelled federation in ``workdir``; returns (spec,
    layout)."""
    spec_path = workdir / "federation.toml"
    if not spec_path.exists():
        make_federation(workdir, seed=seed, size=size, cases_per_site=cases_per_site, test_cases=test_cases,
                        fov_scale=fov_scale, fully_labelled=True)
    spec = load_spec(spec_path)
    if not (workdir / "nnUNet_raw" / spec.sites[0].dataset).exists():
        convert_federation(spec, workdir / "nnUNet_raw")
        p = subprocess.run([nnunet_script("nnunetv2_fedkd"), "plan", str(spec_path)],
                           env=subprocess_env(workdir, cpu=True), capture_output=True, text=True)
        if p.returncode:
            raise RuntimeError(f"nnunetv2_fedkd plan {spec_path} failed:\n{p.stdout[-3000:]}{p.stderr[-3000:]}")
        layout = resolve_layout(spec, workdir)
        small_plans([layout.coordinator] + [layout.views[s.name] for s in spec.sites], workdir,
                    patch_size=(32, 32, 32))
    return spec, resolve_layout(spec, workdir)


def run_budget(workdir: Path, spec, layout, trainer: str, rounds: int, iters: int, settings=None) -> dict:
    """Train the federated oracle for ``rounds`` x ``iters`` (trainer ``settings``, default the CPU settings of the
    tests and benchmarks) and score it on the test set: ``{"dice": {organ: Dice}, "seconds": ...}``."""
    cfg = workdir / "settings.json"
    cfg.write_text(json.dumps(dict(SHORT_CPU_RUN) if settings is None else dict(settings)))
    model = workdir / "nnUNet_results" / layout.coordinator / f"{trainer}__nnUNetPlansSmall__3d_fullres"
    shutil.rmtree(model, ignore_errors=True)  # every budget is its own run, not a continuation
    t0 = time.time()
    cmd = federate_command(spec.path, trainer, rounds, iters, cfg, strategy="fedavg", evaluate=False)
    p = subprocess.run(cmd, env=subprocess_env(workdir, cpu=True, training=True), capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(f"{shlex.join(cmd)} failed:\n{p.stdout[-3000:]}{p.stderr[-3000:]}")
    test = workdir / "nnUNet_raw" / spec.test_set.dataset
    pred = predict(test / "imagesTr", workdir / f"pred_{trainer}_{rounds}x{iters}", layout.coordinator, trainer,
                   workdir, fold="all")
    dice = evaluate(test / "labelsTr", pred, test / "dataset.json", workdir)
    return {"dice": {o: round(v, 3) for o, v in dice.items()}, "seconds": round(time.time() - t0)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--workdir", type=Path, help="where the federation is written (default OUT/work)")
    p.add_argument("--budgets", nargs="+", default=["4x60", "8x60", "4x120"], help="ROUNDSxLOCAL_ITERATIONS")
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--size", type=int, nargs=3, default=[40, 40, 32])
    p.add_argument("--fov-scale", type=float, default=0.7)
    p.add_argument("--cases-per-site", type=int, default=5)
    p.add_argument("--test-cases", type=int, default=2)
    p.add_argument("--trainer", default="nnUNetTrainerFedNaive")
    args = p.parse_args(argv)
    budgets = [tuple(int(x) for x in b.split("x")) for b in args.budgets]
    workdir = args.workdir or args.out / "work"
    workdir.mkdir(parents=True, exist_ok=True)
    spec, layout = prepare(workdir, args.seed, tuple(args.size), args.fov_scale, args.cases_per_site,
                           args.test_cases)
    results = {}
    for rounds, iters in budgets:
        results[f"{rounds}x{iters}"] = r = run_budget(workdir, spec, layout, args.trainer, rounds, iters)
        print(f"{args.trainer} {rounds} rounds x {iters} local iterations: {json.dumps(r)}", flush=True)
        atomic_write_json(args.out / "results.json", {
            "command": shlex.join([sys.executable, *sys.argv]), "seed": args.seed, "size": args.size,
            "fov_scale": args.fov_scale, "cases_per_site": args.cases_per_site, "trainer": args.trainer,
            "strategy": "fedavg", "settings": dict(SHORT_CPU_RUN), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
