"""Preflight of a federation run (issue 15, item 1): what cannot work is refused before round 1, in both engines
(``prepare_federation`` serves ``federate`` and the Flower ServerApp), with an error that names the argument or the
user's file, and nothing is written to the run folder; after it, bad JSON is named and a refused run leaves nothing
behind (item 6); and the one round loop both engines run (``FederationServer.run_rounds``) with a fake transport."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from nnunetv2_fedkd.workflows.cli import main
from nnunetv2_fedkd.federated.runner import FederateError, preflight, prepare_federation, site_trainer_names
from nnunetv2_fedkd.spec import FederationSpec, Site, save_spec
from nnunetv2_fedkd.spec import TestSet as HeldOutSet  # (pytest would try to collect a name starting with Test)


@pytest.fixture
def spec(tmp_path):
    sites = [Site("liver_site", "Dataset501_A", ["liver"]), Site("kidney_site", "Dataset502_B", ["kidney"])]
    s = FederationSpec(name="f", labels=["liver", "kidney"], sites=sites, test_set=HeldOutSet("Dataset509_T", "btcv"))
    path = save_spec(s, tmp_path / "federation.toml")
    from nnunetv2_fedkd.spec import load_spec
    return load_spec(path)


GOOD = dict(local_epochs=None, local_iterations=5, strategy="fedavg", strategy_options=None,
            trainer="nnUNetTrainerFedKD", settings_file=None, settings=None, min_sites=1, sites=None)


def test_valid_arguments_pass(spec, tmp_path):
    f = tmp_path / "settings.json"
    f.write_text(json.dumps({"initial_lr": 0.03, "trainers": {"nnUNetTrainerFedKD": {"global_kd_weight": 0.5}}}))
    trainer_cls, chosen, settings, strat = preflight(spec, 3, **{**GOOD, "settings_file": f, "min_sites": 2,
                                                                 "strategy": "fedprox",
                                                                 "strategy_options": {"mu": 0.1}})
    assert trainer_cls.__name__ == "nnUNetTrainerFedKD" and [s.name for s in chosen] == ["liver_site", "kidney_site"]
    assert settings["initial_lr"] == 0.03 and strat.name == "fedprox"
    assert site_trainer_names() == ["nnUNetTrainerFedKD", "nnUNetTrainerFedKDMultiHead", "nnUNetTrainerFedNaive"]


@pytest.mark.parametrize("change, message", [
    ({"trainer": "nnUNetTrainer"}, r"'nnUNetTrainer' is not a federated site trainer .* nnUNetTrainerFedKD, "
                                   r"nnUNetTrainerFedKDMultiHead, nnUNetTrainerFedNaive"),
    ({"trainer": "nnUNetTrainerMarginal"}, "'nnUNetTrainerMarginal' is not a federated site trainer"),
    ({"trainer": "nnUNetTrainerFoo"}, "'nnUNetTrainerFoo' does not exist; a federation trains one of"),
    ({"local_iterations": -5}, r"local_iterations must be an integer >= 1, got -5"),
    ({"local_iterations": None, "local_epochs": 0}, r"local_epochs must be an integer >= 1, got 0"),
    ({"local_epochs": 2}, "exactly one of local_epochs and local_iterations"),
    ({"min_sites": 9}, r"min_sites 9 is more than the 2 site\(s\) selected \(liver_site, kidney_site\)"),
    ({"min_sites": 2, "sites": ["liver_site"]}, r"min_sites 2 is more than the 1 site\(s\) selected"),
    ({"min_sites": 0}, "min_sites must be an integer >= 1"),
    ({"sites": ["lung_site"]}, r"sites \['lung_site'\] are not in"),
    ({"strategy": "fedfoo"}, "unknown aggregation strategy 'fedfoo'"),
    ({"strategy": "fedprox", "strategy_options": {"mu": "abc"}}, r"strategy 'fedprox' with options \{'mu': 'abc'\}"),
    ({"strategy": "fedprox", "strategy_options": {"nu": 1}}, "unknown option"),
    ({"settings": {"num_epoch": 3}}, "settings given with the command: unknown setting.* num_epoch"),
])
def test_what_cannot_work_is_refused_before_anything_is_written(spec, tmp_path, change, message):
    with pytest.raises(FederateError, match=message):
        prepare_federation(spec, 3, **{**GOOD, **change}, workdir=tmp_path / "wd")
    assert not (tmp_path / "wd").exists()


@pytest.mark.parametrize("change, message", [
    ({"max_update_ratio": -1.0}, "max_update_ratio must be a finite number > 0 or None, got -1.0"),
    ({"large_updates": "ignore"}, "large_updates must be 'reject' or 'clip', got 'ignore'"),
    ({"max_num_examples": 0}, "max_num_examples must be an integer >= 1, got 0"),
])
def test_update_bounds_that_cannot_work_are_refused_before_anything_is_written(spec, tmp_path, change, message):
    with pytest.raises(FederateError, match=message):
        prepare_federation(spec, 3, **GOOD, **change, workdir=tmp_path / "wd")
    assert not (tmp_path / "wd").exists()


def test_rounds_must_be_positive(spec, tmp_path):
    with pytest.raises(FederateError, match="rounds must be an integer >= 1, got 0"):
        prepare_federation(spec, 0, **GOOD, workdir=tmp_path / "wd")
    assert not (tmp_path / "wd").exists()


@pytest.mark.parametrize("text, message", [("{not json", "is not valid JSON"),
                                           ("[1, 2]", "must hold a JSON object, not list")])
def test_a_settings_file_that_is_not_a_json_object_is_refused_naming_it(spec, tmp_path, text, message):
    f = tmp_path / "my_settings.json"
    f.write_text(text)
    with pytest.raises(FederateError, match=f"trainer settings: {f} {message}"):
        prepare_federation(spec, 3, **{**GOOD, "settings_file": f}, workdir=tmp_path / "wd")
    with pytest.raises(FederateError, match=f"trainer settings: {tmp_path / 'none.json'} does not exist"):
        prepare_federation(spec, 3, **{**GOOD, "settings_file": tmp_path / "none.json"}, workdir=tmp_path / "wd")
    assert not (tmp_path / "wd").exists()


@pytest.mark.parametrize("content, message", [
    ({"num_epoch": 3}, "unknown setting.* num_epoch for nnUNetTrainerFedKD"),
    ({"trainers": {"nnUNetTrainerFedKD": {"exclusion_weigth": 1}}},
     r"unknown setting.* trainers\.nnUNetTrainerFedKD\.exclusion_weigth"),
    ({"trainers": ["x"]}, "'trainers' must map trainer names to settings"),
])
def test_unknown_settings_name_the_users_file(spec, tmp_path, content, message):
    f = tmp_path / "my_settings.json"
    f.write_text(json.dumps(content))
    with pytest.raises(FederateError, match=f"trainer settings {f}: {message}"):
        prepare_federation(spec, 3, **{**GOOD, "settings_file": f}, workdir=tmp_path / "wd")
    assert not (tmp_path / "wd").exists()


def test_the_cli_refuses_with_one_line_and_exit_code_2(spec, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    code = main(["federate", str(spec.path), "--rounds", "2", "--local-iterations", "5", "-tr", "nnUNetTrainer",
                 "-device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "'nnUNetTrainer' is not a federated site trainer" in err[0], err
    assert not (tmp_path / "results").exists()
    code = main(["federate", str(spec.path), "--rounds", "2", "--local-iterations", "5", "--strategy", "fedprox",
                 "--strategy-option", "mu=abc", "-device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "strategy 'fedprox'" in err[0] and "mu" in err[0], err


# ----------------------------------------------------------------------------------------------------------------------
# after the preflight: bad JSON named, and a refused run leaves nothing behind (issue 15, item 6)
# ----------------------------------------------------------------------------------------------------------------------
class _FakeServerModel:
    """Stands in for the nnU-Net trainer that defines the global model (it needs a planned dataset)."""

    fail = None

    def __init__(self, plans_dataset, trainer, plans, config_file, device="cpu"):
        import torch

        if self.fail:
            raise ValueError(self.fail)
        assert json.loads(Path(config_file).read_text())["global_model"] is None
        self.trainer = type("T", (), {})()
        self._w = {"w": torch.ones(3)}

    def initial_weights(self, seed):
        return dict(self._w)

    def write_results_folder(self, weights, completed_rounds):
        return Path("fold_all/checkpoint_final.pth")


def _coordinator(spec, wd, plans=None, dataset_json=None):
    from nnunetv2_fedkd.federated.planning import resolve_layout

    folder = wd / "nnUNet_preprocessed" / resolve_layout(spec, wd).coordinator
    folder.mkdir(parents=True)
    (folder / "nnUNetPlansSmall.json").write_text(plans if plans is not None else json.dumps(
        {"plans_name": "nnUNetPlansSmall", "configurations": {}}))
    (folder / "dataset.json").write_text(dataset_json if dataset_json is not None else json.dumps({"labels": {}}))
    return folder


RUN = dict(GOOD, plans="nnUNetPlansSmall", check_site_plans=False, log=lambda line: None)


@pytest.mark.parametrize("plans, dataset_json, message", [
    ("{not json", None, r"the federation's plans: .*nnUNetPlansSmall.json is not valid JSON"),
    (None, "", r"the plans dataset's dataset.json: .*dataset.json is not valid JSON"),
])
def test_unreadable_plans_dataset_files_are_named(spec, tmp_path, plans, dataset_json, message):
    wd = tmp_path / "wd"
    _coordinator(spec, wd, plans, dataset_json)
    with pytest.raises(FederateError, match=message):
        prepare_federation(spec, 3, **RUN, workdir=wd)
    assert not (wd / "nnUNet_results").exists()


def test_a_run_refused_after_the_preflight_leaves_nothing_behind(spec, tmp_path, monkeypatch):
    from nnunetv2_fedkd.federated import runner
    from nnunetv2_fedkd.federated.round_core import FederationStateError

    monkeypatch.setattr(runner, "ServerModel", _FakeServerModel)
    wd = tmp_path / "wd"
    _coordinator(spec, wd)
    # the plans do not build a model: the folders this call created are gone again
    monkeypatch.setattr(_FakeServerModel, "fail", "the plans build no network")
    with pytest.raises(ValueError, match="build no network"):
        prepare_federation(spec, 3, **RUN, workdir=wd)
    assert not (wd / "nnUNet_results").exists()
    # a run that starts, then a resume with other settings: refused, and the run's files are as they were
    monkeypatch.setattr(_FakeServerModel, "fail", None)
    fs = prepare_federation(spec, 3, **RUN, workdir=wd)
    files = {p.name: p.read_bytes() for p in fs.run_dir.iterdir() if p.is_file()}
    assert {"server_trainer.json", "state.json", "run.json", "global_round_0000.fedkd"} <= set(files)
    pending = fs.core.aggregate([runner.SiteUpdate("liver_site", {"w": __import__("torch").full((3,), 2.0)}, 1)])
    fs.core.commit(pending)
    files = {p.name: p.read_bytes() for p in fs.run_dir.iterdir() if p.is_file()}
    with pytest.raises(FederationStateError, match="settings.num_iterations_per_epoch: 5 -> 7"):
        prepare_federation(spec, 3, **{**RUN, "local_iterations": 7}, workdir=wd)
    assert {p.name: p.read_bytes() for p in fs.run_dir.iterdir() if p.is_file()} == files


def test_a_sites_unreadable_plans_or_dataset_json_is_named(spec, tmp_path, monkeypatch):
    from nnunetv2_fedkd.federated import runner
    from nnunetv2_fedkd.federated.planning import resolve_layout

    monkeypatch.setattr(runner, "ServerModel", _FakeServerModel)
    wd = tmp_path / "wd"
    coordinator = _coordinator(spec, wd)
    view = wd / "nnUNet_preprocessed" / resolve_layout(spec, wd).views["liver_site"]
    view.mkdir(parents=True)
    (view / "nnUNetPlansSmall.json").write_text("<html>not plans</html>")
    with pytest.raises(FederateError, match=r"site 'liver_site': plans: .*nnUNetPlansSmall.json is not valid JSON"):
        prepare_federation(spec, 3, **{**RUN, "check_site_plans": True}, workdir=wd)
    (view / "nnUNetPlansSmall.json").write_text((coordinator / "nnUNetPlansSmall.json").read_text())
    (view / "dataset.json").write_text("{")
    with pytest.raises(FederateError, match=r"site 'liver_site': dataset.json: .*dataset.json is not valid JSON"):
        prepare_federation(spec, 3, **{**RUN, "check_site_plans": True}, workdir=wd)
    assert not (wd / "nnUNet_results").exists()


def test_a_site_names_its_unreadable_json_before_training(tmp_path, monkeypatch):
    """The site side of the same check, in both engines (a Flower SuperNode runs it too): a deterministic error
    naming the site and the file, so the federation stops at once instead of nnU-Net's bare JSONDecodeError."""
    from nnunetv2_fedkd.federated.nnunet_site import NnUNetSite
    from nnunetv2_fedkd.federated.round_core import failure_recurs

    pre = tmp_path / "pre"
    (pre / "Dataset601_A").mkdir(parents=True)
    monkeypatch.setenv("nnUNet_preprocessed", str(pre))
    site = NnUNetSite("liver_site", "Dataset601_A", ["liver"], tmp_path / "site")
    with pytest.raises(FileNotFoundError, match="site 'liver_site': .*Dataset601_A/dataset.json does not exist"):
        site.check_files()
    (pre / "Dataset601_A" / "dataset.json").write_text("{}")
    (pre / "Dataset601_A" / "nnUNetPlansSmall.json").write_text("{}")
    site.check_files()
    (pre / "Dataset601_A" / "splits_final.json").write_text("[{")
    with pytest.raises(ValueError, match="site 'liver_site': .*splits_final.json is not valid JSON") as e:
        site.check_files()
    assert failure_recurs(f"{type(e.value).__name__}: {e.value}")
    with pytest.raises(ValueError, match="splits_final.json"):
        site.fit(tmp_path / "global.fedkd", {"round": 0})


# ----------------------------------------------------------------------------------------------------------------------
# the one round loop of both engines (FederationServer.run_rounds) with a fake transport
# ----------------------------------------------------------------------------------------------------------------------
class _Transport:
    """Two sites moving the weights towards 2 and 6; ``kidney_site`` loses its connection in its first attempt."""

    def __init__(self):
        import torch

        self.torch = torch
        self.calls, self.evaluated, self.kidney_failures = [], [], 1

    def before_round(self, core):
        self.calls.append(("before", core.state.completed_rounds))

    def available_sites(self, core):
        return ["liver_site", "kidney_site"]

    def train(self, core, instructions, on_update, sites):
        failures = []
        for site, target in (("liver_site", 2.0), ("kidney_site", 6.0)):
            if site not in sites:
                continue
            if site == "kidney_site" and self.kidney_failures:
                self.kidney_failures -= 1
                failures.append((site, "RuntimeError: connection reset"))
                continue
            w = core.state.weights["w"]
            u = runner_module().SiteUpdate(site, {"w": w + 0.5 * (target - w)}, 2)
            on_update(u, 0.0)
        self.calls.append(("train", int(instructions["round"])))
        return failures

    def evaluate(self, core, weights, instructions, sites):
        self.evaluated.append((int(instructions["round"]), list(sites), instructions["evaluate_patches"]))
        return {s: {"dice": {s.split("_")[0]: 0.5}, "num_cases": 1} for s in sites}


def runner_module():
    from nnunetv2_fedkd.federated import runner

    return runner


def test_one_round_loop_runs_retries_evaluates_and_commits(spec, tmp_path, monkeypatch):
    monkeypatch.setattr(runner_module(), "ServerModel", _FakeServerModel)
    wd = tmp_path / "wd"
    _coordinator(spec, wd)
    fs = prepare_federation(spec, 2, **{**RUN, "min_sites": 2}, workdir=wd)
    t = _Transport()
    summary = fs.run_rounds(t, evaluate=True, evaluate_every=2, evaluate_patches=7)
    # round 1 ran twice (the kidney site failed the first time: 1 update < min_sites 2), round 2 once
    assert [c for c in t.calls if c[0] == "train"] == [("train", 0), ("train", 0), ("train", 1)]
    assert [c for c in t.calls if c[0] == "before"] == [("before", 0), ("before", 0), ("before", 1)]
    history = summary["history"]
    assert [h["round"] for h in history] == [1, 2] and [h["attempts"] for h in history] == [2, 1]
    assert all(h["accepted"] == ["liver_site", "kidney_site"] for h in history)
    assert t.evaluated == [(1, ["liver_site", "kidney_site"], 7)]  # every 2nd round and the last: round 2 only
    assert history[1]["organ_dice"] == {"liver": 0.5, "kidney": 0.5}
    w = 1.0
    for _ in range(2):
        w = 0.5 * (w + 0.5 * (2 - w)) + 0.5 * (w + 0.5 * (6 - w))
    assert abs(float(fs.core.state.weights["w"][0]) - w) < 1e-6


def test_an_unreadable_settings_path_is_not_turned_into_a_json_error(spec, tmp_path):
    # a directory (or a permission error, a failing disk) is not "invalid JSON": the OSError is raised as it is
    with pytest.raises(IsADirectoryError):
        prepare_federation(spec, 3, **{**GOOD, "settings_file": tmp_path}, workdir=tmp_path / "wd")


def test_the_round_loop_draws_the_sites_of_each_round_and_records_them(spec, tmp_path, monkeypatch):
    """Issue 17, item 1: --sites-per-round 1 of 2 with organ coverage: one site a round, the organs in turn, each
    round's draw in its record and in the run's contract; only the drawn site trains."""
    monkeypatch.setattr(runner_module(), "ServerModel", _FakeServerModel)
    wd = tmp_path / "wd"
    _coordinator(spec, wd)
    with pytest.raises(FederateError, match="sites_per_round 1 is fewer than min_sites 2"):
        prepare_federation(spec, 4, **{**RUN, "min_sites": 2}, workdir=wd, sites_per_round=1)
    fs = prepare_federation(spec, 4, **{**RUN, "min_sites": 1}, workdir=wd, sites_per_round=1, sampling="organs")
    t = _Transport()
    t.kidney_failures = 0
    history = fs.run_rounds(t, evaluate=False)["history"]
    sampled = [h["sampled"] for h in history]
    assert all(len(x) == 1 for x in sampled) and [h["accepted"] for h in history] == sampled
    assert {x[0] for x in sampled[:2]} == {"liver_site", "kidney_site"}  # every organ within ceil(2 / 1) rounds
    assert fs.core.contract()["sampling"] == {"per_round": 1, "mode": "organs"}
    with pytest.raises(FederateError, match="site sampling must be one of"):
        prepare_federation(spec, 4, **RUN, workdir=tmp_path / "wd2", sites_per_round=1, sampling="greedy")
