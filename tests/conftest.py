"""Shared fixtures. The expensive one, ``tiny_federation``, builds once per test session what the README's first
command builds: a synthetic federation, converted, planned and preprocessed with stock nnU-Net, with small plans."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict

import pytest

from nnunetv2_fedkd.env import subprocess_env
from nnunetv2_fedkd.spec import FederationSpec
from nnunetv2_fedkd.trainers.config import SHORT_CPU_RUN

TINY_SIZE = (40, 40, 32)
# a tighter abdominal field of view than real scanners (0.7x), so that the small organs get a few hundred voxels at
# this tiny grid (pancreas ~300 instead of ~90) and tiny models can learn them within a CI budget
TINY_FOV_SCALE = 0.7
TINY_SEED, TINY_CASES_PER_SITE, TINY_TEST_CASES = 123, 5, 2


@dataclass
class TinyFederation:
    workdir: Path
    spec: FederationSpec

    def env(self, training: bool = False, **extra: str) -> Dict[str, str]:
        return subprocess_env(self.workdir, cpu=True, training=training, extra=extra)

    @property
    def raw(self) -> Path:
        return self.workdir / "nnUNet_raw"

    @property
    def preprocessed(self) -> Path:
        return self.workdir / "nnUNet_preprocessed"

    @property
    def results(self) -> Path:
        return self.workdir / "nnUNet_results"


@pytest.fixture(scope="session")
def tiny_federation(tmp_path_factory) -> TinyFederation:
    from nnunetv2_fedkd.workflows.pipeline import convert_federation, plan_and_preprocess, small_plans
    from nnunetv2_fedkd.spec import load_spec
    from nnunetv2_fedkd.data.synthetic import make_federation

    workdir = tmp_path_factory.mktemp("tiny_federation")
    spec = load_spec(make_federation(workdir, seed=TINY_SEED, size=TINY_SIZE, cases_per_site=TINY_CASES_PER_SITE,
                                     test_cases=TINY_TEST_CASES, fov_scale=TINY_FOV_SCALE))
    convert_federation(spec, workdir / "nnUNet_raw")
    plan_and_preprocess([s.dataset_id for s in spec.sites], workdir, log_dir=workdir / "logs")
    small_plans([s.dataset for s in spec.sites], workdir, patch_size=(32, 32, 32))
    return TinyFederation(workdir, spec)


@pytest.fixture
def short_training_config(tmp_path) -> Path:
    """A plugin trainer config for a couple of iterations."""
    p = tmp_path / "fedkd_trainer.json"
    p.write_text('{"num_epochs": 1, "num_iterations_per_epoch": 2, "num_val_iterations_per_epoch": 1}')
    return p


@pytest.fixture(scope="session")
def pooled_federation(tiny_federation) -> Path:
    """The tiny federation's sites merged into one partial-label dataset (``nnunetv2_fedkd merge``), planned and
    preprocessed with stock nnU-Net, with small plans. Returns the raw dataset folder (Dataset510_...)."""
    from nnunetv2_fedkd.workflows.pipeline import plan_and_preprocess, small_plans
    from nnunetv2_fedkd.data.pooled import merge_sites

    fed = tiny_federation
    pooled = merge_sites(fed.spec, 510, nnunet_raw=fed.raw)
    plan_and_preprocess([510], fed.workdir, log_dir=fed.workdir / "logs")
    small_plans([pooled.name], fed.workdir, patch_size=(32, 32, 32))
    return pooled


@pytest.fixture(scope="session")
def planned_federation(tiny_federation):
    """The tiny federation planned with the CLI ``nnunetv2_fedkd plan SPEC`` (site views 601-604, plans dataset 600,
    preprocessed at every site), plus small plans derived for the plans dataset and every view. Returns the
    :class:`~nnunetv2_fedkd.federated.planning.FederationLayout`."""
    import subprocess
    import time

    from nnunetv2_fedkd.federated.planning import resolve_layout
    from nnunetv2_fedkd.workflows.pipeline import nnunet_script, small_plans

    fed = tiny_federation
    t0 = time.perf_counter()
    proc = subprocess.run([nnunet_script("nnunetv2_fedkd"), "plan", str(fed.spec.path)], env=fed.env(),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(f"nnunetv2_fedkd plan took {time.perf_counter() - t0:.0f} s")
    layout = resolve_layout(fed.spec, fed.workdir)
    small_plans([layout.coordinator] + [layout.views[s.name] for s in fed.spec.sites], fed.workdir,
                patch_size=(32, 32, 32))
    return layout


# the total budget of the federated evidence test (tests/test_federated_training.py: 4 rounds x 60 local iterations
# x 4 sites), given to the oracle in one central training
ORACLE_ITERATIONS = 960


@pytest.fixture(scope="session")
def ci_oracle(tiny_federation, pooled_federation) -> Dict[str, float]:
    """The upper bound at CI size: stock nnU-Net's trainer on the tiny federation's pooled images with EVERY organ
    labelled (the generator knows them: ``nnunetv2_fedkd.data.synthetic.oracle``), the federated evidence test's total
    budget, scored on the test set with stock predict/evaluate. Evidence tests assert every organ this learns
    (Dice > 0.5), not only the easiest one. Returns Dice per organ."""
    import json

    from nnunetv2_fedkd.workflows.pipeline import evaluate, plan_and_preprocess, predict, small_plans, train
    from nnunetv2_fedkd.data.synthetic.oracle import write_fully_labelled_pool

    fed = tiny_federation
    oracle = write_fully_labelled_pool(fed.workdir, pooled_federation.name, 511, nnunet_raw=fed.raw)
    plan_and_preprocess([511], fed.workdir, log_dir=fed.workdir / "logs")
    small_plans([oracle.name], fed.workdir, patch_size=(32, 32, 32))
    cfg = fed.workdir / "oracle_settings.json"
    cfg.write_text(json.dumps({"num_epochs": ORACLE_ITERATIONS // 80, "num_iterations_per_epoch": 80,
                               **SHORT_CPU_RUN, "final_validation": False}))
    trainer = "nnUNetTrainerFedKDBase"  # nnU-Net's own trainer, the schedule from the settings file
    train(oracle.name, trainer, fed.workdir, cfg, fold="all", log_dir=fed.workdir / "logs")
    test = fed.raw / fed.spec.test_set.dataset
    pred = predict(test / "imagesTr", fed.workdir / "oracle_predictions", oracle.name, trainer, fed.workdir,
                   fold="all", log_dir=fed.workdir / "logs")
    dice = evaluate(test / "labelsTr", pred, test / "dataset.json", fed.workdir, log_dir=fed.workdir / "logs")
    print("CI-size oracle (fully labelled, central, stock trainer):", json.dumps({o: round(v, 3)
                                                                               for o, v in dice.items()}))
    return dice

