"""Steps of the user's path, shared by the demo, the tests and the benchmarks.

Stock nnU-Net steps run as the stock console scripts in subprocesses (the exact commands a user types, printed
before they run), so the demo proves the same path the README documents.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

from nnunetv2_fedkd.env import subprocess_env
from nnunetv2_fedkd.nnunet_commands import StepError, nnunet_script, run_command  # noqa: F401 (part of this API)
from nnunetv2_fedkd.spec import FederationSpec, check_datasets


def convert_federation(spec: FederationSpec, nnunet_raw: Path, overwrite: bool = False,
                       sites: Optional[Sequence[str]] = None, test_set: bool = True) -> List[Path]:
    """Convert the sites (``sites``: their names; default every site) and, with ``test_set``, the test set restricted
    to the federation's label set, from the spec's ``source_format`` / ``source_dir``, with the converters (each
    dataset validated and written atomically), then check the converted sites against the spec. Every requested site
    is checked for a source before anything is converted."""
    from nnunetv2_fedkd.data.conversion import convert_dataset

    names = [s.name for s in spec.sites]
    unknown = [n for n in (sites or []) if n not in names]
    if unknown:
        raise StepError(f"{spec.path}: no site named {', '.join(map(repr, unknown))}; sites: {', '.join(names)}")
    chosen = [s for s in spec.sites if sites is None or s.name in sites]
    for s in chosen:
        if s.source_format is None or s.source_dir is None:
            raise StepError(f"site {s.name!r} has no source_format/source_dir in {spec.path}: convert it yourself "
                            f"(nnunetv2_fedkd convert FORMAT DIR -d {s.dataset_id})")
    t = spec.test_set if test_set else None
    if t is not None and (t.source_format is None or t.source_dir is None):
        raise StepError(f"the test set has no source_format/source_dir in {spec.path}: convert it yourself or leave "
                        f"it out (--no-test-set)")
    out = []
    for s in chosen:
        name = s.dataset.split("_", 1)[1]
        out.append(convert_dataset(s.source_format, s.source_dir, s.dataset_id, dataset_name=name,
                                   organs=s.organs, overwrite=overwrite, nnunet_raw=nnunet_raw,
                                   unlabelled_as_training=s.unlabelled_as_training))
    if t is not None:
        out.append(convert_dataset(t.source_format, t.source_dir, t.dataset_id,
                                   dataset_name=t.dataset.split("_", 1)[1], organs=spec.labels,
                                   overwrite=overwrite, nnunet_raw=nnunet_raw))
    check_datasets(spec, nnunet_raw, sites=[s.name for s in chosen])
    return out


def plan_and_preprocess(dataset_ids: Sequence[int], workdir: Path, cpu: bool = True,
                        log_dir: Optional[Path] = None, verify: bool = True) -> None:
    """Stock ``nnUNetv2_plan_and_preprocess`` (3d_fullres only) for each dataset."""
    env = subprocess_env(workdir, cpu=cpu)
    cmd = [nnunet_script("nnUNetv2_plan_and_preprocess"), "-d", *[str(i) for i in dataset_ids],
           "-c", "3d_fullres", "-np", "2"]
    if verify:
        cmd.append("--verify_dataset_integrity")
    run_command(cmd, env, None if log_dir is None else log_dir / "plan_and_preprocess.log")


def small_plans(datasets: Sequence[str], workdir: Path, **kwargs) -> List[Path]:
    """Write small plans (:mod:`nnunetv2_fedkd.data.small_plans`) for each dataset (``DatasetXXX_Name``)."""
    from nnunetv2_fedkd.data.small_plans import write_small_plans

    pre = Path(subprocess_env(workdir)["nnUNet_preprocessed"])
    return [write_small_plans(pre / d, **kwargs) for d in datasets]


def train(dataset: str, trainer: str, workdir: Path, config_file: Optional[Path] = None, fold: str = "0",
          plans: str = "nnUNetPlansSmall", cpu: bool = True, log_dir: Optional[Path] = None,
          extra_env: Optional[Dict[str, str]] = None) -> Path:
    """Stock ``nnUNetv2_train DATASET 3d_fullres FOLD -tr TRAINER -p PLANS``; returns the fold folder.
    ``extra_env``: variables to override (e.g. another ``nnUNet_results``)."""
    extra = {"nnUNet_fedkd_config": str(config_file)} if config_file else {}
    extra.update(extra_env or {})
    env = subprocess_env(workdir, cpu=cpu, training=True, extra=extra)
    cmd = [nnunet_script("nnUNetv2_train"), dataset, "3d_fullres", fold, "-tr", trainer, "-p", plans]
    if cpu:
        cmd += ["-device", "cpu"]
    run_command(cmd, env, None if log_dir is None else log_dir / f"train_{dataset}_{trainer}.log")
    return Path(env["nnUNet_results"]) / dataset / f"{trainer}__{plans}__3d_fullres" / f"fold_{fold}"


def federate_command(spec: Path, trainer: str, rounds: int, local_iterations: int, config: Optional[Path] = None,
                     *extra: str, strategy: Optional[str] = None, plans: str = "nnUNetPlansSmall",
                     device: str = "cpu", evaluate: bool = True) -> List[str]:
    """The command line ``nnunetv2_fedkd federate SPEC --rounds R --local-iterations I -tr TRAINER -p PLANS
    -device DEVICE [--strategy S] [--config CONFIG] [--no-evaluate] EXTRA...`` that the demo, the benchmarks and the
    tests run (a user types the same). ``strategy`` None: the command's default (FedAvg); ``extra``: further options
    (``--sites``, ``--seed``, ``--strategy-option``, ...)."""
    cmd = [nnunet_script("nnunetv2_fedkd"), "federate", str(spec), "--rounds", str(rounds), "--local-iterations",
           str(local_iterations), "-tr", trainer, "-p", plans, "-device", device]
    if strategy is not None:
        cmd += ["--strategy", strategy]
    if config is not None:
        cmd += ["--config", str(config)]
    if not evaluate:
        cmd.append("--no-evaluate")
    return cmd + [str(e) for e in extra]


def predict(images: Path, output: Path, dataset: str, trainer: str, workdir: Optional[Path],
            fold: Union[str, Sequence[str]] = "0", plans: str = "nnUNetPlansSmall", cpu: bool = True,
            tta: bool = False, log_dir: Optional[Path] = None, extra_env: Optional[Dict[str, str]] = None,
            save_probabilities: bool = False, configuration: str = "3d_fullres") -> Path:
    """Stock ``nnUNetv2_predict``. ``-npp 0 -nps 0``: nnU-Net's sequential mode (preprocessing and export in the
    predicting process); its worker processes would each start Python and import nnU-Net again, which cost about 5 s
    per call on this 2-core machine (26.2 vs 21.1 s for 4 test cases, same label maps). ``fold``: one fold or
    several (nnU-Net averages them); ``save_probabilities``: also write ``<case>.npz`` (key ``probabilities``,
    ``[C, *shape]`` in the reader's array order) and ``<case>.pkl`` per case. ``workdir`` None: the environment's
    ``nnUNet_*`` folders."""
    env = subprocess_env(workdir, cpu=cpu, extra=extra_env)
    folds = [fold] if isinstance(fold, str) else [str(f) for f in fold]
    cmd = [nnunet_script("nnUNetv2_predict"), "-i", str(images), "-o", str(output), "-d", dataset, "-c",
           configuration, "-f", *folds, "-tr", trainer, "-p", plans, "-npp", "0", "-nps", "0"]
    if cpu:
        cmd += ["-device", "cpu"]
    if not tta:
        cmd.append("--disable_tta")
    if save_probabilities:
        cmd.append("--save_probabilities")
    run_command(cmd, env, None if log_dir is None else log_dir / f"predict_{dataset}_{trainer}.log")
    return output


def evaluate(reference: Path, prediction: Path, dataset_json: Path, workdir: Path,
             log_dir: Optional[Path] = None) -> Dict[str, float]:
    """Stock ``nnUNetv2_evaluate_simple``-style evaluation through ``nnUNetv2_evaluate_folder`` (writes
    ``prediction/summary.json``); returns Dice per label name (NaN where an organ is absent in both)."""
    import json

    env = subprocess_env(workdir)
    pfile = prediction / "plans.json"
    cmd = [nnunet_script("nnUNetv2_evaluate_folder"), str(reference), str(prediction), "-djfile", str(dataset_json),
           "-pfile", str(pfile), "-np", "1"]
    run_command(cmd, env, None if log_dir is None else log_dir / f"evaluate_{prediction.name}.log")
    summary = json.loads((prediction / "summary.json").read_text())
    names = {}
    for name, value in json.loads(dataset_json.read_text())["labels"].items():
        v = value[0] if isinstance(value, list) else value
        if v != 0:
            names[str(v)] = name
    return {names[k]: float(v["Dice"]) for k, v in summary["mean"].items() if k in names}
