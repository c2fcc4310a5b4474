"""Site sampling at scale: a simulated federation of N sites, K of them training per round.

    python benchmarks/site_sampling.py --out benchmarks/results/site_sampling [--workdir DIR] [--prepared]
        [--runs 100x2 100x4 100x8 20x4] [--rounds 2] [--local-iterations 2] [--sampling organs]

It synthesises and plans a tiny 4-site federation once (24x24x16 phantoms, 2 cases a site), then, for each NxK,
writes a spec of N sites that share those 4 sites' preprocessed data on disk (each simulated site gets its own
nnU-Net view dataset whose plans and dataset.json are copies and whose preprocessed cases are a link to its organ's
site: ids 100+i for the site's dataset, which is never converted, 300+i for its view), and runs ``nnunetv2_fedkd
federate --sites-per-round K`` (FedKD, no per-round evaluation). Each run records, from its ``metrics.json``, the
seconds of every round, the sites drawn and the sum of their local trainings, plus the run's wall time and the
peak RSS of the ``federate`` process. The claim it checks: a round costs what its K drawn sites cost, not what the N
sites would. Writes ``results.json`` and ``results.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy  # noqa: E402  (the same preparation, settings and command builders)

SIZE, CASES = (24, 24, 16), 2


def simulate(workdir: Path, n_sites: int) -> Path:
    """Write ``sim_<n>/federation.toml``: ``n_sites`` sites over the 4 planned sites' preprocessed data."""
    from nnunetv2_fedkd.federated.planning import resolve_layout
    from nnunetv2_fedkd.spec import FederationSpec, Site, load_spec, save_spec

    if not 1 <= n_sites <= 199:
        raise ValueError(f"1 to 199 simulated sites (dataset ids 100+i and 300+i), not {n_sites}")
    base = load_spec(workdir / "federation.toml")
    layout = resolve_layout(base, workdir)
    pre = workdir / "nnUNet_preprocessed"
    sites = []
    for i in range(n_sites):
        b = base.sites[i % len(base.sites)]
        src = pre / layout.views[b.name]
        view = f"Dataset{300 + i:03d}_SimView{i:03d}"
        dst = pre / view
        if not dst.is_dir():
            tmp = pre / f".{view}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            for f in src.iterdir():
                if f.suffix == ".json":
                    data = json.loads(f.read_text())
                    if isinstance(data, dict) and "dataset_name" in data:
                        data["dataset_name"] = view
                    (tmp / f.name).write_text(json.dumps(data, indent=1))
                elif f.is_dir():
                    (tmp / f.name).symlink_to(f.resolve(), target_is_directory=True)
            os.replace(tmp, dst)
        sites.append(Site(f"{b.name}_{i:03d}", f"Dataset{100 + i:03d}_Sim{i:03d}", list(b.organs),
                          federated_dataset=view))
    folder = workdir / f"sim_{n_sites}"
    folder.mkdir(exist_ok=True)
    spec = FederationSpec(name=f"sim{n_sites}", labels=list(base.labels), sites=sites, test_set=None,
                          plans_dataset=layout.coordinator)
    return save_spec(spec, folder / "federation.toml")


def run(workdir: Path, n_sites: int, per_round: int, rounds: int, iters: int, sampling: str, out: Path) -> dict:
    from nnunetv2_fedkd.env import subprocess_env
    from nnunetv2_fedkd.workflows.pipeline import federate_command

    spec = simulate(workdir, n_sites)
    name = f"{n_sites}x{per_round}"
    results = workdir / "sim_results" / name
    shutil.rmtree(results, ignore_errors=True)
    settings = out / "settings.json"
    settings.write_text(json.dumps(accuracy.BASE_SETTINGS))
    cmd = federate_command(spec, "nnUNetTrainerFedKD", rounds, iters, settings, "--sites-per-round",
                           str(per_round), "--sampling", sampling, evaluate=False)
    env = subprocess_env(workdir, cpu=True, training=True, extra={"nnUNet_results": str(results)})
    log = out / f"federate_{name}.log"
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.time() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(map(shlex.quote, cmd))} failed; log: {log}")
    history = json.loads(next(results.glob("*/*/federation/metrics.json")).read_text())
    return {"sites": n_sites, "per_round": per_round, "sampling": sampling, "rounds": rounds,
            "local_iterations": iters, "command": " ".join(map(shlex.quote, cmd)), "wall_seconds": round(wall, 1),
            "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
            "round_seconds": [h["seconds"] for h in history], "sampled": [h.get("sampled") for h in history],
            "local_training_sum": [round(sum(m.get("fit_seconds", 0) for m in h["sites"].values()), 1)
                                   for h in history]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--workdir", type=Path, default=None, help="default: <out>/work")
    p.add_argument("--prepared", action="store_true", help="--workdir already holds the planned 4-site federation")
    p.add_argument("--runs", nargs="+", default=["100x2", "100x4", "100x8", "20x4"], help="NxK: N sites, K a round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--local-iterations", type=int, default=2)
    p.add_argument("--sampling", default="organs", choices=["uniform", "organs"])
    args = p.parse_args(argv)
    out = args.out.absolute()
    out.mkdir(parents=True, exist_ok=True)
    wd = (args.workdir or out / "work").absolute()
    if not args.prepared:
        shutil.rmtree(wd, ignore_errors=True)
        wd.mkdir(parents=True)
        accuracy.prepare(wd, 0, False, size=SIZE, cases_per_site=CASES, test_cases=1, patch_size=(16, 16, 16))
    rows: List[Dict] = []
    for r in args.runs:
        n, k = (int(x) for x in r.lower().split("x"))
        print(f"== {n} sites, {k} a round", flush=True)
        rows.append(run(wd, n, k, args.rounds, args.local_iterations, args.sampling, out))
        print(f"   {json.dumps({x: rows[-1][x] for x in ('round_seconds', 'local_training_sum', 'peak_rss_mib')})}",
              flush=True)
    record = {"command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]), "runs": rows,
              "data": {"size": SIZE, "cases_per_site": CASES}, "versions": accuracy.versions(),
              "machine": accuracy.machine()}
    (out / "results.json").write_text(json.dumps(record, indent=1))
    lines = [f"Command: `{record['command']}`", "",
             f"Simulated sites share 4 planned sites' data ({SIZE}, {CASES} cases each); FedKD, "
             f"{args.rounds} rounds x {args.local_iterations} local iterations, no evaluation.", "",
             "| sites | per round | s per round | sum of local trainings per round | peak RSS MiB | wall s |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['sites']} | {r['per_round']} | {', '.join(map(str, r['round_seconds']))} | "
              f"{', '.join(map(str, r['local_training_sum']))} | {r['peak_rss_mib']} | {r['wall_seconds']} |"
              for r in rows]
    lines += ["", f"Versions: {record['versions']}; machine: {record['machine']}"]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
