"""``nnunetv2_fedkd demo``: the README's main command, the whole user path on generated data.

Stages (each prints the commands it runs and where its output is):
1. synthesise the federation (4 hospitals, one organ each, in the LiTS / KiTS23 / MSD layouts, plus a fully
   labelled BTCV-layout test set) and its ``federation.toml``;
2. convert every site with ``nnunetv2_fedkd convert`` (to the organ registry) and check them against the spec;
3. plan and preprocess every site with stock ``nnUNetv2_plan_and_preprocess --verify_dataset_integrity``;
4. derive small CPU-sized plans (``nnUNetPlansSmall``) from nnU-Net's plans.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

from nnunetv2_fedkd.env import apply_env, nnunet_env, shell_exports

MARKER = ".nnunetv2_fedkd_demo"

# (size, cases per site, test cases) of the generated federation
FULL = ((64, 64, 48), 8, 6)
QUICK = ((48, 48, 32), 5, 3)  # nnU-Net's 5-fold split needs at least 5 cases per dataset


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
    from nnunetv2_fedkd.pipeline import convert_federation, plan_and_preprocess, small_plans
    from nnunetv2_fedkd.spec import load_spec
    from nnunetv2_fedkd.synthetic import make_federation

    t_start = time.perf_counter()
    workdir = Path(workdir).absolute()
    prepare_workdir(workdir)
    apply_env(workdir, cpu=True)
    logs = workdir / "logs"
    size, n_cases, n_test = QUICK if quick else FULL

    def stage(i: int, text: str) -> None:
        print(f"\n[{i}/4] {text}  ({time.perf_counter() - t_start:.0f} s)", flush=True)

    stage(1, f"synthesising the federation: 4 sites x {n_cases} cases, {n_test} test cases, {size} voxels")
    spec_path = make_federation(workdir, seed=seed, size=size, cases_per_site=n_cases, test_cases=n_test)
    spec = load_spec(spec_path)
    for s in spec.sites:
        print(f"  {s.name:<14} labels {s.organs} as {s.source_format} in {s.source_dir}")

    stage(2, "converting the sites to nnU-Net datasets (organ registry)")
    for out in convert_federation(spec, workdir / "nnUNet_raw"):
        print(f"  wrote {out}")

    stage(3, "planning and preprocessing every site with stock nnU-Net")
    plan_and_preprocess([s.dataset_id for s in spec.sites], workdir, log_dir=logs)

    stage(4, "deriving small CPU plans (nnUNetPlansSmall)")
    for p in small_plans([s.dataset for s in spec.sites], workdir):
        print(f"  wrote {p}")

    print(f"\nDone in {time.perf_counter() - t_start:.0f} s. Outputs are in {workdir}:")
    print(f"  federation spec   {spec_path}")
    print(f"  nnU-Net folders   {workdir / 'nnUNet_raw'}, nnUNet_preprocessed, nnUNet_results; logs in {logs}")
    print("To use stock nnU-Net commands on them, set the environment first:")
    print("  " + shell_exports(nnunet_env(workdir, cpu=True)).replace("\n", "\n  "))
    return 0
