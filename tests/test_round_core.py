"""The engine-neutral round core with tiny in-memory sites: rounds, failures, validation, min_sites, checkpoints,
resume and corrupt checkpoints."""
from __future__ import annotations

import json

import pytest
import torch

from nnunetv2_fedkd.federated import CorruptCheckpoint, SiteUpdate, load_weights, make_strategy
from nnunetv2_fedkd.federated.round_core import FederationStateError, RoundCore, metrics_csv, organ_dice

DIGEST = "ab" * 32


def init_weights():
    return {"w": torch.zeros(3), "b": torch.zeros(1)}


class ToySite:
    """Moves every weight half-way towards its own target; reports a fake Dice."""

    def __init__(self, name, target, cases=2, fail_rounds=(), nan_rounds=()):
        self.name, self.target, self.cases = name, float(target), cases
        self.fail_rounds, self.nan_rounds = set(fail_rounds), set(nan_rounds)
        self.seen = []

    def fit(self, global_file, instructions):
        r = instructions["round"]
        self.seen.append(r)
        if r in self.fail_rounds:
            raise RuntimeError(f"{self.name} lost its connection")
        weights, meta = load_weights(global_file)
        assert meta["completed_rounds"] == r
        new = {k: v + 0.5 * (self.target - v) for k, v in weights.items()}
        if r in self.nan_rounds:
            new["w"][0] = float("nan")
        return SiteUpdate(self.name, new, self.cases, {"train_loss": 1.0 / (r + 1)}, organs={self.name})

    def evaluate(self, weights, instructions):
        return {"dice": {self.name: float(weights["b"][0]) / 10}, "num_cases": 1}


def engine_round(core, sites, evaluate=False):
    """One round the way both engines drive it: a failure is checked at once (a deterministic one stops), then the
    round is aggregated and committed (with every site's evaluation when ``evaluate``)."""
    instr = core.fit_instructions()
    ups, fails = [], []
    for s in sites:
        try:
            ups.append(s.fit(core.global_weights_file, instr))
        except Exception as e:
            reason = f"{type(e).__name__}: {e}"
            core.check_failure(s.name, reason)
            fails.append((s.name, reason))
    pending = core.aggregate(ups, fails)
    if not core.accept(pending):
        return False
    core.commit(pending, {s.name: s.evaluate(pending.result.weights, instr) for s in sites} if evaluate else None)
    return True


def run(core, sites, stop_after=None):
    while not core.done:
        if stop_after is not None and core.state.completed_rounds >= stop_after:
            return
        engine_round(core, sites, evaluate=True)


def make_core(tmp_path, rounds=3, min_sites=1, strategy="fedavg", digest=DIGEST, log=None, settings=None,
              options=None, run_settings=None, allow_new_settings=False):
    return RoundCore(tmp_path / "run", make_strategy(strategy, **(options or {})), rounds, digest,
                     settings or {"num_epochs": 1}, min_sites=min_sites, log=log or (lambda s: None),
                     run_settings=run_settings or {"trainer": "nnUNetTrainerFedKD", "sites": ["kidney", "liver"]},
                     allow_new_settings=allow_new_settings)


def test_rounds_average_and_record(tmp_path):
    core = make_core(tmp_path)
    core.start(init_weights())
    a, b = ToySite("liver", 2.0, cases=1), ToySite("kidney", 6.0, cases=3)
    run(core, [a, b])
    assert core.state.completed_rounds == 3 and a.seen == [0, 1, 2]
    # case-weighted FedAvg of half-steps: the fixed point is the weighted mean of the targets (5.0)
    w = 0.0
    for _ in range(3):
        w = 0.25 * (w + 0.5 * (2 - w)) + 0.75 * (w + 0.5 * (6 - w))
    assert torch.allclose(core.state.weights["w"], torch.full((3,), w))
    hist = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [h["round"] for h in hist] == [1, 2, 3]
    assert hist[0]["accepted"] == ["liver", "kidney"] and hist[0]["sites"]["kidney"]["num_examples"] == 3
    csv_rows = (tmp_path / "run" / "metrics.csv").read_text().strip().splitlines()
    assert len(csv_rows) == 4 and csv_rows[0].startswith("round,aggregated")
    # the newest two global checkpoints are kept (keep_checkpoints), and state.json names the newest
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["global_weights"] == "global_round_0003.fedkd"
    assert sorted(p.name for p in (tmp_path / "run").glob("global_round_*")) == ["global_round_0002.fedkd",
                                                                                 "global_round_0003.fedkd"]
    assert core.fit_instructions()["plans_digest"] == DIGEST


def test_failed_and_nonfinite_sites_are_dropped_and_rejoin(tmp_path):
    lines = []
    core = make_core(tmp_path, log=lines.append)
    core.start(init_weights())
    a = ToySite("liver", 2.0, fail_rounds={1})
    b = ToySite("kidney", 6.0, nan_rounds={2})
    run(core, [a, b])
    hist = core.state.history
    assert hist[0]["accepted"] == ["liver", "kidney"]
    assert hist[1]["accepted"] == ["kidney"] and hist[1]["failed"][0]["site"] == "liver"
    assert hist[2]["accepted"] == ["liver"] and hist[2]["dropped"][0]["site"] == "kidney"
    assert "not finite" in hist[2]["dropped"][0]["reason"] or "finite" in hist[2]["dropped"][0]["reason"]
    assert a.seen == [0, 1, 2]  # the failed site rejoined in the next round
    assert torch.isfinite(core.state.weights["w"]).all()
    assert any("liver" in l and "lost its connection" in l for l in lines)


class FlakySite(ToySite):
    """Loses its connection in its first ``failures`` attempts (whatever the round)."""

    def __init__(self, *args, failures=1, **kwargs):
        super().__init__(*args, **kwargs)
        self.failures = failures

    def fit(self, global_file, instructions):
        if self.failures > 0:
            self.failures -= 1
            self.seen.append(instructions["round"])
            raise RuntimeError(f"{self.name} lost its connection")
        return super().fit(global_file, instructions)


def test_a_round_with_fewer_than_min_sites_updates_is_not_committed_but_run_again(tmp_path):
    lines = []
    core = make_core(tmp_path, rounds=1, min_sites=2, log=lines.append)
    core.start(init_weights())
    flaky, other = FlakySite("kidney", 6.0, failures=1), ToySite("liver", 2.0)
    assert engine_round(core, [other, flaky]) is False  # 1 valid update < min_sites 2: nothing committed
    assert core.state.completed_rounds == 0 and json.loads((tmp_path / "run" / "state.json").read_text())[
        "completed_rounds"] == 0
    assert any("1 valid update(s), fewer than min_sites=2" in l and "round 1 runs again (attempt 2/3)" in l
               and "kidney lost its connection" in l for l in lines)
    with pytest.raises(RuntimeError, match="not committed"):  # the engine cannot commit it by mistake either
        core.commit(core.aggregate([other.fit(core.global_weights_file, core.fit_instructions())],
                                   [("kidney", "RuntimeError: lost")]))
    assert engine_round(core, [other, flaky]) is True  # the site is back: round 1 is committed from both
    rec = core.state.history[0]
    assert rec["aggregated"] and rec["accepted"] == ["liver", "kidney"]
    assert rec["attempts"] == 2 and len(rec["failed_attempts"]) == 1
    assert rec["failed_attempts"][0]["failed"][0]["site"] == "kidney"


def test_too_few_updates_round_after_round_stops_the_federation(tmp_path):
    from nnunetv2_fedkd.federated.round_core import TooFewUpdates

    core = make_core(tmp_path, rounds=2, min_sites=2)
    core.start(init_weights())
    sites = [ToySite("liver", 2.0), FlakySite("kidney", 6.0, failures=10)]
    assert engine_round(core, sites) is False and engine_round(core, sites) is False
    with pytest.raises(TooFewUpdates) as e:
        engine_round(core, sites)
    msg = str(e.value)
    assert "round 1: fewer than min_sites=2 valid updates in 3 attempt(s)" in msg and "kidney" in msg
    assert "resumes after round 0" in msg
    assert core.state.completed_rounds == 0 and not core.state.history
    assert torch.equal(core.state.weights["w"], torch.zeros(3))


def test_every_site_failing_the_same_way_is_a_configuration_error(tmp_path):
    from nnunetv2_fedkd.federated.round_core import SiteErrorWillRecur

    core = make_core(tmp_path, rounds=2)
    core.start(init_weights())
    same = [("liver", "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB (liver: 3.1 GiB free)"),
            ("kidney", "RuntimeError: CUDA out of memory. Tried to allocate 4.00 GiB (kidney: 1.2 GiB free)")]
    with pytest.raises(SiteErrorWillRecur, match="every site \\(liver, kidney\\) failed the same way"):
        core.aggregate([], same)
    # different transient failures, or one site still training: the round runs again
    assert not core.aggregate([], [same[0], ("kidney", "OSError: connection reset")]).result.aggregated
    assert not core.aggregate([], same[:1]).result.aggregated


def test_resume_after_crash_loses_and_repeats_no_round(tmp_path):
    core = make_core(tmp_path, rounds=4, strategy="fedadam")
    core.start(init_weights())
    sites = [ToySite("liver", 2.0), ToySite("kidney", 6.0)]
    run(core, sites, stop_after=2)
    # a crash in round 3: an update was computed but never committed
    core.aggregate([s.fit(core.global_weights_file, core.fit_instructions()) for s in sites])
    resumed = make_core(tmp_path, rounds=4, strategy="fedadam")
    st = resumed.start(init_weights())  # initial weights are ignored on resume
    assert st.completed_rounds == 2 and torch.equal(st.weights["w"], core.state.weights["w"])
    assert set(resumed.strategy.state_dict()) == set(core.strategy.state_dict())  # FedAdam moments restored
    run(resumed, sites)
    assert [h["round"] for h in resumed.state.history] == [1, 2, 3, 4]

    # the same run done without a crash gives the same weights
    ref = make_core(tmp_path / "ref", rounds=4, strategy="fedadam")
    ref.start(init_weights())
    run(ref, [ToySite("liver", 2.0), ToySite("kidney", 6.0)])
    assert torch.allclose(ref.state.weights["w"], resumed.state.weights["w"])


def test_resume_refuses_other_plans_settings_and_corrupt_checkpoints(tmp_path):
    core = make_core(tmp_path)
    core.start(init_weights())
    run(core, [ToySite("liver", 2.0)], stop_after=1)
    with pytest.raises(FederationStateError, match="other plans"):
        make_core(tmp_path, digest="cd" * 32).start(init_weights())
    with pytest.raises(FederationStateError, match="total_rounds: 3 -> 5"):
        make_core(tmp_path, rounds=5).start(init_weights())
    with pytest.raises(FederationStateError, match="exists"):
        make_core(tmp_path).start(init_weights(), resume=False)
    for n in (1, 0):  # every kept checkpoint truncated on disk: nothing to resume from
        g = tmp_path / "run" / f"global_round_{n:04d}.fedkd"
        g.write_bytes(g.read_bytes()[: g.stat().st_size // 2])
    with pytest.raises(CorruptCheckpoint, match="global_round_0001.fedkd"):
        make_core(tmp_path).start(init_weights())


@pytest.mark.parametrize("strategy", ["fedavg", "fedadam"])
def test_a_damaged_newest_checkpoint_resumes_from_the_one_before(tmp_path, strategy):
    lines = []
    core = make_core(tmp_path, rounds=5, strategy=strategy)
    core.start(init_weights())
    sites = [ToySite("liver", 2.0), ToySite("kidney", 6.0)]
    run(core, sites, stop_after=3)
    before = core.state.history
    round_2 = load_weights(tmp_path / "run" / "global_round_0002.fedkd")[0]
    g = tmp_path / "run" / "global_round_0003.fedkd"
    g.write_bytes(g.read_bytes()[: g.stat().st_size // 2])  # the crash hit while the disk lost the newest file
    resumed = make_core(tmp_path, rounds=5, strategy=strategy, log=lines.append)
    st = resumed.start(init_weights())
    assert st.completed_rounds == 2 and torch.equal(st.weights["w"], round_2["w"])
    assert any("global_round_0003.fedkd" in l and "resuming from round 2" in l and "3-3 will be trained again" in l
               for l in lines), lines
    assert st.history == before[:2]  # round 3's record goes with its checkpoint
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["completed_rounds"] == 2 and state["global_weights"] == "global_round_0002.fedkd"
    assert [h["round"] for h in json.loads((tmp_path / "run" / "metrics.json").read_text())] == [1, 2]
    run(resumed, sites)
    assert [h["round"] for h in resumed.state.history] == [1, 2, 3, 4, 5]
    # the same run done without the damage gives the same weights (FedAdam's moments came from round 2's state)
    ref = make_core(tmp_path / "ref", rounds=5, strategy=strategy)
    ref.start(init_weights())
    run(ref, [ToySite("liver", 2.0), ToySite("kidney", 6.0)])
    assert torch.allclose(ref.state.weights["w"], resumed.state.weights["w"])


def test_keep_checkpoints(tmp_path):
    core = RoundCore(tmp_path / "run", make_strategy("fedadam"), 4, DIGEST, {}, keep_checkpoints=3,
                     log=lambda s: None)
    core.start(init_weights())
    run(core, [ToySite("liver", 2.0)])
    names = sorted(p.name for p in (tmp_path / "run").glob("*_round_*"))
    assert names == [f"{kind}_round_{n:04d}.fedkd" for kind in ("global", "strategy") for n in (2, 3, 4)]
    with pytest.raises(ValueError, match="keep_checkpoints"):
        RoundCore(tmp_path / "r2", make_strategy("fedavg"), 4, DIGEST, {}, keep_checkpoints=0)


def test_organ_dice_is_case_weighted_and_csv_has_organs():
    ev = {"a": {"dice": {"liver": 0.5}, "num_cases": 1}, "b": {"dice": {"liver": 1.0, "kidney": None},
                                                                 "num_cases": 3}}
    assert organ_dice(ev) == {"liver": 0.875}
    text = metrics_csv([{"round": 1, "aggregated": True, "accepted": ["a"], "dropped": [], "failed": [],
                         "seconds": 1.0, "sites": {"a": {"train_loss": 0.5}}, "organ_dice": {"liver": 0.875}}])
    assert text.splitlines()[1] == "1,True,a,,,1.0,0.5,0.875"


@pytest.mark.parametrize("reason, recurs", [
    ("ValueError: Cannot have number of splits n_splits=5 greater than the number of samples: n_samples=2.", True),
    ("FileNotFoundError: [Errno 2] No such file or directory: '.../nnUNetPlansSmall.json'", True),
    ("TrainerConfigError: trainer config x.json: unknown setting 'lr'", True),
    ("IndexError: list index out of range", True),
    # a Flower error reply carries the ClientApp's exception text
    ("error reply (code 0): <class 'nnunetv2_fedkd.flower.client_app.SiteFailure'>:<'site 'liver_site': "
     "KeyError: 'fedkd''>", True),
    ("RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB", False),
    ("OSError: [Errno 28] No space left on device", False),
    ("ConnectionResetError: [Errno 104] Connection reset by peer", False),
    ("no train reply within 600 s", False),
    ("error reply (code 0): <class 'nnunetv2_fedkd.flower.client_app.SiteFailure'>:<'site 'liver_site': "
     "RuntimeError: DataLoader worker (pid 4242) is killed by signal: Killed.'>", False),
    ("MyValueError: not one of ours", False),
])
def test_failure_recurs_tells_deterministic_from_transient(reason, recurs):
    from nnunetv2_fedkd.federated.round_core import failure_recurs

    assert failure_recurs(reason) is recurs


class BrokenSite(ToySite):
    """Raises a deterministic error (its data is broken) from round ``broken_from`` on."""

    def __init__(self, *args, broken_from=1, **kwargs):
        super().__init__(*args, **kwargs)
        self.broken_from, self.fixed = broken_from, False

    def fit(self, global_file, instructions):
        if instructions["round"] >= self.broken_from and not self.fixed:
            self.seen.append(instructions["round"])
            raise FileNotFoundError(f"{self.name}: nnUNetPlansSmall.json does not exist")
        return super().fit(global_file, instructions)


def test_a_deterministic_site_error_stops_the_federation_at_once_and_resumes_after_the_fix(tmp_path):
    from nnunetv2_fedkd.federated.round_core import SiteErrorWillRecur

    core = make_core(tmp_path, rounds=3)
    core.start(init_weights())
    broken, other = BrokenSite("liver", 2.0, broken_from=1), ToySite("kidney", 6.0)
    engine_round(core, [broken, other])  # round 1 is fine
    with pytest.raises(SiteErrorWillRecur) as e:
        engine_round(core, [broken, other])
    msg = str(e.value)
    assert "round 2" in msg and "'liver'" in msg and "nnUNetPlansSmall.json does not exist" in msg
    assert "resumes after round 1" in msg
    assert other.seen == [0]  # the federation stopped at the failing site: nobody trained on after it
    assert json.loads((tmp_path / "run" / "state.json").read_text())["completed_rounds"] == 1
    # the same error reported by aggregate() (Flower collects failures first) stops it too
    with pytest.raises(SiteErrorWillRecur):
        core.aggregate([], [("liver", "FileNotFoundError: gone")])
    # after the fix, the same run resumes with round 2
    broken.fixed = True
    core2 = make_core(tmp_path, rounds=3)
    core2.resume()
    while not core2.done:
        engine_round(core2, [broken, other])
    assert [h["round"] for h in core2.state.history] == [1, 2, 3]


def test_a_transient_site_error_leaves_the_site_out_of_one_round(tmp_path):
    core = make_core(tmp_path, rounds=2)
    core.start(init_weights())
    flaky, other = ToySite("liver", 2.0, fail_rounds={0}), ToySite("kidney", 6.0)  # RuntimeError: lost connection
    engine_round(core, [flaky, other])
    engine_round(core, [flaky, other])
    hist = core.state.history
    assert hist[0]["accepted"] == ["kidney"] and hist[0]["failed"][0]["site"] == "liver"
    assert hist[1]["accepted"] == ["liver", "kidney"]


def test_evaluates_every_k_rounds_and_after_the_last(tmp_path):
    core = make_core(tmp_path, rounds=5)
    core.start(init_weights())
    seen = {1: [], 2: [], 0: []}
    sites = [ToySite("liver", 2.0)]
    while not core.done:
        for k in seen:
            seen[k].append(core.evaluates_this_round(k))
        engine_round(core, sites)
    assert seen[1] == [True] * 5
    assert seen[2] == [False, True, False, True, True]  # rounds 2, 4 and the last (5)
    assert seen[0] == [False] * 5


@pytest.mark.parametrize("damage, message", [
    (lambda st: [st], "is not a federation state file"),
    (lambda st: {k: v for k, v in st.items() if k != "completed_rounds"}, "'completed_rounds' must be an integer, got "
                                                                         "'<missing>'"),
    (lambda st: {**st, "completed_rounds": "two"}, "'completed_rounds' must be an integer, got 'two'"),
    (lambda st: {**st, "global_weights": None}, "'global_weights' must be a file name, got None"),
    (lambda st: {**st, "history": {}}, "'history' must be a list"),
    (lambda st: {**st, "completed_rounds": 7}, "completed_rounds 7 is not within 0..3"),
])
def test_a_damaged_state_file_is_refused_naming_it(tmp_path, damage, message):
    core = make_core(tmp_path)
    core.start(init_weights())
    run(core, [ToySite("liver", 2.0)], stop_after=1)
    f = tmp_path / "run" / "state.json"
    f.write_text(json.dumps(damage(json.loads(f.read_text()))))
    with pytest.raises(FederationStateError, match=f"state.json.*{message}"):
        make_core(tmp_path).start(init_weights())


def test_a_run_folder_without_its_state_file_is_not_restarted_silently(tmp_path):
    core = make_core(tmp_path)
    core.start(init_weights())
    run(core, [ToySite("liver", 2.0)], stop_after=2)
    (tmp_path / "run" / "state.json").unlink()
    metrics = (tmp_path / "run" / "metrics.json").read_text()
    with pytest.raises(FederationStateError, match="global_round_0002.fedkd.*metrics.json.*but no state.json"):
        make_core(tmp_path).start(init_weights())
    assert (tmp_path / "run" / "metrics.json").read_text() == metrics  # nothing wiped


# ----------------------------------------------------------------------------------------------------------------------
# the resume contract
# ----------------------------------------------------------------------------------------------------------------------
def test_a_resume_with_other_settings_is_refused_listing_every_difference(tmp_path):
    core = make_core(tmp_path)
    core.start(init_weights())
    run(core, [ToySite("liver", 2.0)], stop_after=1)
    before = (tmp_path / "run" / "state.json").read_text()
    changed = dict(settings={"num_epochs": 2, "initial_lr": 0.1}, min_sites=2,
                   run_settings={"trainer": "nnUNetTrainerFedKD", "sites": ["liver"]})
    with pytest.raises(FederationStateError) as e:
        make_core(tmp_path, **changed).start(init_weights())
    msg = str(e.value)
    for diff in ("settings.num_epochs: 1 -> 2", "settings.initial_lr: None -> 0.1", "min_sites: 1 -> 2",
                 "sites: ['kidney', 'liver'] -> ['liver']", "--resume-with-new-settings"):
        assert diff in msg, (diff, msg)
    with pytest.raises(FederationStateError, match="strategy 'fedavg', not 'fedprox'"):
        make_core(tmp_path, strategy="fedprox").start(init_weights())
    with pytest.raises(FederationStateError, match=r"strategy.mu: 0.01 -> 0.1"):
        core2 = make_core(tmp_path / "prox", strategy="fedprox")
        core2.start(init_weights())
        run(core2, [ToySite("liver", 2.0)], stop_after=1)
        make_core(tmp_path / "prox", strategy="fedprox", options={"mu": 0.1}).start(init_weights())
    assert (tmp_path / "run" / "state.json").read_text() == before  # a refused resume writes nothing


def test_resume_with_new_settings_on_purpose_records_them_per_round(tmp_path):
    core = make_core(tmp_path, rounds=3)
    core.start(init_weights())
    run(core, [ToySite("liver", 2.0)], stop_after=1)
    with pytest.raises(FederationStateError, match="strategy"):  # never another strategy, even when asked
        make_core(tmp_path, rounds=3, strategy="fedadam", allow_new_settings=True).start(init_weights())
    lines = []
    more = make_core(tmp_path, rounds=4, settings={"num_epochs": 2}, allow_new_settings=True, log=lines.append)
    more.start(init_weights())
    assert more.state.completed_rounds == 1
    assert any("resuming with new settings after round 1" in line for line in lines)
    state = json.loads((tmp_path / "run" / "state.json").read_text())  # recorded at once, before any training
    assert state["settings_changes"] == [{"after_round": 1, "changes": {
        "settings.num_epochs": {"was": 1, "now": 2}, "total_rounds": {"was": 3, "now": 4}}}]
    assert state["contract"]["settings"] == {"num_epochs": 2}
    run(more, [ToySite("liver", 2.0)])
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["completed_rounds"] == 4 and len(state["settings_changes"]) == 1  # kept by every later commit
    # the new settings are the contract now: resuming with them needs no flag, with the old ones is refused
    assert make_core(tmp_path, rounds=4, settings={"num_epochs": 2}).start(init_weights()).completed_rounds == 4
    with pytest.raises(FederationStateError, match="settings.num_epochs: 2 -> 1"):
        make_core(tmp_path, rounds=4).start(init_weights())
    with pytest.raises(FederationStateError, match="completed 4 rounds, more than the 3 asked"):
        make_core(tmp_path, rounds=3, settings={"num_epochs": 2}, allow_new_settings=True).start(init_weights())


def test_a_state_file_from_before_the_contract_is_compared_on_what_it_recorded(tmp_path):
    core = make_core(tmp_path)
    core.start(init_weights())
    run(core, [ToySite("liver", 2.0)], stop_after=1)
    f = tmp_path / "run" / "state.json"
    new = json.loads(f.read_text())
    c = new["contract"]
    # what state files before the contract held: the settings at the top level
    old = {**{k: v for k, v in new.items() if k not in ("contract", "settings_changes")},
           "strategy_hyperparameters": c["strategy"], "settings": c["settings"], "min_sites": c["min_sites"]}
    f.write_text(json.dumps(old))
    assert make_core(tmp_path, run_settings={"trainer": "other"}).start(init_weights()).completed_rounds == 1
    with pytest.raises(FederationStateError, match="settings.num_epochs: 1 -> 5"):
        make_core(tmp_path, settings={"num_epochs": 5}).start(init_weights())


def test_a_run_that_completed_no_round_starts_again_with_new_settings(tmp_path):
    core = make_core(tmp_path)
    core.start(init_weights())  # then a crash (or a deterministic site error) in round 1
    lines = []
    again = make_core(tmp_path, settings={"num_epochs": 3}, strategy="fedadam", log=lines.append)
    assert again.start({k: v + 1 for k, v in init_weights().items()}).completed_rounds == 0
    assert any("completed no round yet" in line for line in lines)
    assert float(again.state.weights["w"][0]) == 1.0
    assert json.loads((tmp_path / "run" / "state.json").read_text())["contract"]["settings"] == {"num_epochs": 3}
    # a crash between the initial checkpoint and the first state.json leaves only round 0: not an earlier run
    (tmp_path / "run" / "state.json").unlink()
    (tmp_path / "run" / "metrics.json").unlink()
    assert make_core(tmp_path).start(init_weights()).completed_rounds == 0


def test_a_round_that_is_not_committed_leaves_the_server_state_untouched(tmp_path):
    """FedAvgM's momentum must not move on an attempt that is run again: the run would differ from its resume."""
    core = make_core(tmp_path, rounds=1, min_sites=2, strategy="fedavgm")
    core.start(init_weights())
    before = {k: v.clone() for k, v in core.strategy.state_dict().items()}
    site = ToySite("liver", 2.0)
    pending = core.aggregate([site.fit(core.global_weights_file, core.fit_instructions())],
                             [("kidney", "RuntimeError: lost")])
    assert not core.accept(pending)
    after = core.strategy.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_transport_failures_at_every_site_are_not_a_configuration_error(tmp_path):
    from nnunetv2_fedkd.federated.round_core import SiteErrorWillRecur

    core = make_core(tmp_path, rounds=2)
    core.start(init_weights())
    for failures in ([("a", "no train reply within 3600 s"), ("b", "no train reply within 3600 s")],
                     [("a", "error reply (code 5): Error: Node Unavailable"),
                      ("b", "error reply (code 5): Error: Node Unavailable")]):
        assert not core.aggregate([], failures).result.aggregated
    # the same exception reported by the ClientApps of sites called a and b (one-letter names are not substrings)
    oom = "error reply (code 0): <class 'SiteFailure'>:<'site '{s}': RuntimeError: CUDA out of memory at layer 3'>"
    with pytest.raises(SiteErrorWillRecur, match="failed the same way"):
        core.aggregate([], [("a", oom.format(s="a")), ("b", oom.format(s="b"))])


def test_nan_in_the_settings_does_not_block_a_resume(tmp_path):
    core = make_core(tmp_path, settings={"num_epochs": 1, "x": float("nan")})
    core.start(init_weights())
    run(core, [ToySite("liver", 2.0)], stop_after=1)
    again = make_core(tmp_path, settings={"num_epochs": 1, "x": float("nan")})
    assert again.start(init_weights()).completed_rounds == 1
