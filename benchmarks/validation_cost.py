"""What the sites' per-round validation of the global model costs at a realistic image size (issue 14, item 3).

    python benchmarks/validation_cost.py --out benchmarks/results/validation_cost_256 \\
        [--workdir DIR] [--prepared] [--size 256 256 96] [--sites 2] [--rounds 2] [--local-iterations 250]
        [--smallest]

Synthesises and plans a federation as ``benchmarks/accuracy.py`` does (its ``prepare``: ``--sites`` sites of 5
cases each, one organ per site, here at ``--size`` voxels with the scanners' real fields of view, i.e. about
1.4-1.9 mm in-plane and 2.4-3.1 mm between slices; stock ``nnunetv2_fedkd plan`` and ``nnUNetPlansSmall`` with a
32^3 patch), then runs the same federation three times, each into its own nnUNet_results:

1. ``--no-evaluate``: local training only;
2. the default: every round, each site validates the new global model within ``--evaluate-patches`` 100 patch
   passes (whole volumes when they fit, else 100 of nnU-Net's validation patches);
3. ``--evaluate-patches 0``: each site validates on its whole validation volumes with nnU-Net's sliding window (what
   every round did before the budget existed).

Per round it records the round's seconds (``federation/metrics.json``), each site's local training (``fit_seconds``:
the site's whole ``fit``, building nnU-Net's trainer included) and evaluation seconds and network passes, and the
ratio round / sum of the round's local trainings. The trainer settings: no augmentation and one validation
iteration per local epoch (cheaper local training than nnU-Net's defaults, so evaluation weighs more, not less).
Writes ``results.json`` (every figure, commands, versions, machine) and ``results.md`` into ``--out``.
``--smallest`` (with ``--prepared`` on a planned federation): 1 round of 2 iterations, the smoke test.
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
from typing import List, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from accuracy import machine, prepare, versions  # noqa: E402  (the accuracy benchmark's set-up and records)

TRAINER, PLANS = "nnUNetTrainerFedKD", "nnUNetPlansSmall"
SETTINGS = {"num_val_iterations_per_epoch": 1, "data_augmentation": "none", "initial_lr": 0.03}
MODES = {"no_evaluation": ["--no-evaluate"], "default_budget": [], "whole_volumes": ["--evaluate-patches", "0"]}


def run_mode(mode: str, workdir: Path, sites: List[str], rounds: int, iters: int) -> dict:
    from nnunetv2_fedkd.env import subprocess_env
    from nnunetv2_fedkd.federated.planning import resolve_layout
    from nnunetv2_fedkd.workflows.pipeline import federate_command
    from nnunetv2_fedkd.spec import load_spec

    spec = load_spec(workdir / "federation.toml")
    root = workdir / "validation_cost" / mode
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    settings = root / "settings.json"
    settings.write_text(json.dumps(SETTINGS))
    env = subprocess_env(workdir, cpu=True, training=True, extra={"nnUNet_results": str(root / "nnUNet_results")})
    cmd = federate_command(spec.path, TRAINER, rounds, iters, settings, "--sites", *sites, *MODES[mode], plans=PLANS)
    log = root / "federate.log"
    print(f"[{mode}] {shlex.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} exited with {proc.returncode}; log {log}:\n{log.read_text()[-3000:]}")
    run_dir = root / "nnUNet_results" / resolve_layout(spec, workdir).coordinator / \
        f"{TRAINER}__{PLANS}__3d_fullres" / "federation"
    rounds_out = []
    for h in json.loads((run_dir / "metrics.json").read_text()):
        fit = {s: m.get("fit_seconds") for s, m in (h.get("sites") or {}).items()}
        ev = h.get("evaluation") or {}
        local = sum(v for v in fit.values() if v is not None)
        rounds_out.append({
            "round": h["round"], "seconds": h["seconds"], "fit_seconds": fit, "local_training_sum": round(local, 1),
            "evaluation_seconds": {s: e.get("seconds") for s, e in ev.items()},
            "evaluation_sum": round(sum(e.get("seconds") or 0 for e in ev.values()), 1),
            "network_passes": {s: e.get("network_passes") for s, e in ev.items()},
            "sampled_patches": {s: e.get("sampled_patches") for s, e in ev.items()},
            "dice": {s: e.get("dice") for s, e in ev.items()},
            "round_over_local_sum": round(h["seconds"] / local, 3) if local else None})
    return {"mode": mode, "command": shlex.join(cmd), "wall_seconds": round(wall, 1), "rounds": rounds_out,
            "log": str(log)}


def mean(values) -> Optional[float]:
    values = [v for v in values if v is not None]
    return round(sum(values) / len(values), 3) if values else None


def plans_shapes(workdir: Path, sites: List[str]) -> dict:
    """Spacing and median shape of the plans the sites train with, and the image size in voxels after preprocessing."""
    from nnunetv2_fedkd.federated.planning import resolve_layout
    from nnunetv2_fedkd.spec import load_spec

    spec = load_spec(workdir / "federation.toml")
    layout = resolve_layout(spec, workdir)
    plans = json.loads((workdir / "nnUNet_preprocessed" / layout.views[sites[0]] / f"{PLANS}.json").read_text())
    cfg = plans["configurations"]["3d_fullres"]
    return {"spacing_mm": cfg["spacing"], "median_image_size_in_voxels": cfg["median_image_size_in_voxels"],
            "patch_size": cfg["patch_size"], "batch_size": cfg["batch_size"]}


def write_outputs(out: Path, record: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(record, indent=1))
    lines = [f"# Per-round validation cost at {record['size']} voxels", "", f"Command: `{record['command']}`", "",
             f"Plans: {json.dumps(record['plans'])}; {len(record['sites'])} sites x {record['rounds']} rounds x "
             f"{record['local_iterations']} local iterations; settings {json.dumps(SETTINGS)}.", "",
             "| run | round | round s | sum of local training s | sum of evaluation s | passes per site | "
             "round / local training |", "|---|---|---|---|---|---|---|"]
    for run in record["runs"]:
        for r in run["rounds"]:
            passes = ", ".join(f"{v}" for v in r["network_passes"].values()) or "-"
            lines.append(f"| {run['mode']} | {r['round']} | {r['seconds']} | {r['local_training_sum']} | "
                         f"{r['evaluation_sum']} | {passes} | {r['round_over_local_sum']} |")
    lines += ["", "Mean round / local training: " + ", ".join(
        f"{k} {v}" for k, v in record["summary"]["mean_round_over_local_sum"].items()), ""]
    last = {run["mode"]: run["rounds"][-1]["dice"] for run in record["runs"] if run["rounds"]}
    lines += ["Validation Dice after the last round (per site, organs it labels):", "", "```",
              json.dumps(last, indent=1), "```", ""]
    (out / "results.md").write_text("\n".join(lines))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--workdir", type=Path, default=Path("validation_cost_work"))
    ap.add_argument("--prepared", action="store_true", help="use the planned federation already in --workdir")
    ap.add_argument("--size", type=int, nargs=3, default=[256, 256, 96])
    ap.add_argument("--sites", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--local-iterations", type=int, default=250)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smallest", action="store_true", help="1 round of 2 local iterations (the smoke test)")
    args = ap.parse_args(argv)
    if args.smallest:
        args.rounds, args.local_iterations = 1, 2
    from nnunetv2_fedkd.spec import load_spec

    t0 = time.perf_counter()
    if not args.prepared:
        prepare(args.workdir, args.seed, central=False, size=args.size, patch_size=(32, 32, 32),
                num_sites=args.sites, fov_scale=1.0, cases_per_site=5, test_cases=1)
    prepare_seconds = round(time.perf_counter() - t0, 1)
    sites = [s.name for s in load_spec(args.workdir / "federation.toml").sites][:args.sites]
    runs = [run_mode(m, args.workdir, sites, args.rounds, args.local_iterations) for m in MODES]
    size = args.size if not args.prepared else plans_shapes(args.workdir, sites)["median_image_size_in_voxels"]
    record = {"command": shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(argv),
              "size": "x".join(str(int(v)) for v in size), "sites": sites, "rounds": args.rounds,
              "local_iterations": args.local_iterations, "prepare_seconds": prepare_seconds,
              "plans": plans_shapes(args.workdir, sites), "runs": runs,
              "summary": {"mean_round_over_local_sum": {run["mode"]: mean(r["round_over_local_sum"]
                                                                          for r in run["rounds"]) for run in runs}},
              "versions": versions(), "machine": machine()}
    write_outputs(args.out, record)
    print(json.dumps(record["summary"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
