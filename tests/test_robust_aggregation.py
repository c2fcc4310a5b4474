"""Update bounds (case counts, size of a site's change) and the robust strategies (coordinate-wise median and
trimmed mean): one broken or hostile site must neither dominate nor destroy the global model (issue 15, item 5)."""
from __future__ import annotations

import math

import pytest
import torch

from nnunetv2_fedkd.federated import (
    DEFAULT_MAX_UPDATE_RATIO,
    CoordinateMedian,
    FedAvg,
    FedBN,
    TrimmedMean,
    SiteUpdate,
    UpdateBounds,
    aggregate_round,
    make_strategy,
    update_ratio,
)


def T(*values):
    return torch.tensor(values, dtype=torch.float32)


def upd(site, n, **weights):
    return SiteUpdate(site, dict(weights), n)


# --- hand-computed strategies ------------------------------------------------------------------------------------------
def test_trimmed_mean_and_median_by_hand():
    g = {"w": T(0.0, 0.0)}
    four = [upd("a", 1, w=T(1.0, -4.0)), upd("b", 1, w=T(2.0, 3.0)), upd("c", 1, w=T(3.0, 0.0)),
            upd("d", 1, w=T(100.0, 1.0))]
    # beta 0.1, n 4: k = min(ceil(0.4), 1) = 1; coordinate 0: (2 + 3) / 2; coordinate 1: sorted -4 0 1 3 -> (0 + 1) / 2
    assert TrimmedMean().aggregate(g, four, 1)["w"].tolist() == [2.5, 0.5]
    # the median of an even count is the mean of the two middle values: the same here
    assert CoordinateMedian().aggregate(g, four, 1)["w"].tolist() == [2.5, 0.5]
    three = four[:2] + four[3:]
    assert CoordinateMedian().aggregate(g, three, 1)["w"].tolist() == [2.0, 1.0]
    # two sites: nothing can be trimmed; the plain (unweighted) mean, whatever the case counts
    two = [upd("a", 1, w=T(1.0, 0.0)), upd("b", 99, w=T(3.0, 2.0))]
    assert TrimmedMean(beta=0.4).aggregate(g, two, 1)["w"].tolist() == [2.0, 1.0]
    assert [TrimmedMean(beta=0.25).trimmed(n) for n in (1, 2, 3, 4, 5, 9)] == [0, 0, 1, 1, 2, 3]


def test_robust_strategies_by_name_and_their_options():
    assert make_strategy("median").hyperparameters()["strategy"] == "median"
    assert make_strategy("trimmed_mean", beta=0.2).hyperparameters()["beta"] == 0.2
    with pytest.raises(ValueError, match="beta"):
        make_strategy("trimmed_mean", beta=0.5)
    with pytest.raises(ValueError, match="unknown option"):
        make_strategy("median", weighting="cases")


# --- bounds -------------------------------------------------------------------------------------------------------------
def test_update_ratio_by_hand():
    g = {"w": T(3.0, 4.0), "n": torch.tensor(7)}
    assert update_ratio({"w": T(3.0, 4.0), "n": torch.tensor(1)}, g) == 0.0
    assert update_ratio({"w": T(6.0, 8.0), "n": torch.tensor(1)}, g) == pytest.approx(1.0)  # |(3, 4)| / |(3, 4)|
    assert update_ratio({"w": T(0.0, 0.0)}, {"w": T(0.0, 0.0)}) == 0.0
    assert math.isinf(update_ratio({"w": T(1.0, 0.0)}, {"w": T(0.0, 0.0)}))
    assert update_ratio({"w": T(9.0, 9.0), "v": T(1.0)}, {"w": T(9.0, 9.0), "v": T(2.0)}, skip={"v"}) == 0.0


def _honest_sites(n=3, size=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(size, generator=gen)
    sites = [upd(f"honest{i}", 4, w=g + 0.05 * torch.randn(size, generator=gen)) for i in range(n)]
    mean = torch.stack([u.weights["w"] for u in sites]).mean(0)
    spread = float(torch.stack([u.weights["w"] for u in sites]).sub(mean).abs().max())
    return {"w": g}, sites, mean, spread


@pytest.mark.parametrize("make", [FedAvg, CoordinateMedian, TrimmedMean])
def test_a_site_sending_1e30_weights_is_rejected_and_the_global_model_is_the_honest_mean(make):
    g, honest, mean, _ = _honest_sites()
    attack = upd("attacker", 4, w=torch.full((64,), 1e30))
    res = aggregate_round(make(), g, honest + [attack], 3, log=lambda m: None, bounds=UpdateBounds())
    assert [s for s, _ in res.dropped] == ["attacker"]
    assert "times the norm of the global model" in res.dropped[0][1]
    assert res.accepted == ["honest0", "honest1", "honest2"]
    if make is FedAvg:
        assert torch.allclose(res.weights["w"], mean, atol=1e-6)


def test_a_site_claiming_1e9_cases_is_rejected_by_its_planned_count_and_by_the_cap():
    g, honest, mean, _ = _honest_sites()
    liar = upd("honest0", 10 ** 9, w=honest[0].weights["w"] * 0 + 5.0)
    planned = UpdateBounds(site_cases={"honest0": 4, "honest1": 4, "honest2": 4})
    res = aggregate_round(FedAvg(), g, [liar] + honest[1:], 1, log=lambda m: None, bounds=planned)
    assert res.dropped[0][0] == "honest0" and "more than the 4 it had when the federation was planned" in \
        res.dropped[0][1]
    two_mean = torch.stack([u.weights["w"] for u in honest[1:]]).mean(0)
    assert torch.allclose(res.weights["w"], two_mean, atol=1e-6)
    res = aggregate_round(FedAvg(), g, [liar] + honest[1:], 1, log=lambda m: None,
                          bounds=UpdateBounds(max_num_examples=1000))
    assert "max_num_examples=1000" in res.dropped[0][1]
    # without bounds the liar dominates FedAvg: the reason the bounds exist
    res = aggregate_round(FedAvg(), g, [liar] + honest[1:], 1, log=lambda m: None)
    assert torch.allclose(res.weights["w"], torch.full((64,), 5.0), atol=1e-4)


@pytest.mark.parametrize("make", [CoordinateMedian, TrimmedMean])
def test_robust_strategies_without_bounds_stay_near_the_honest_mean(make):
    """No bounds at all: one 1e30 site that also claims 1e9 cases among three honest ones (trimmed mean: beta 0.1,
    k = 1 of 4); every coordinate stays within the honest sites' spread of their mean."""
    g, honest, mean, spread = _honest_sites()
    attack = upd("attacker", 10 ** 9, w=torch.full((64,), 1e30))
    res = aggregate_round(make(), g, honest + [attack], 1, log=lambda m: None)
    assert res.accepted == ["honest0", "honest1", "honest2", "attacker"]
    assert float((res.weights["w"] - mean).abs().max()) <= spread
    fedavg = aggregate_round(FedAvg(), g, honest + [attack], 1, log=lambda m: None)
    assert float(fedavg.weights["w"].abs().max()) > 1e29  # plain FedAvg is destroyed


def test_clip_scales_a_large_change_down_to_the_bound():
    g = {"w": T(3.0, 4.0)}  # norm 5
    big = upd("big", 1, w=T(3.0 + 300.0, 4.0 + 400.0))  # change of norm 500: ratio 100
    notes = []
    res = aggregate_round(FedAvg(), g, [big], 1, log=notes.append,
                          bounds=UpdateBounds(max_update_ratio=2.0, large_updates="clip"))
    assert res.accepted == ["big"] and res.dropped == []
    assert update_ratio(res.weights, g) == pytest.approx(2.0, rel=1e-6)
    assert res.weights["w"].tolist() == pytest.approx([3.0 + 6.0, 4.0 + 8.0])
    assert any("clipped to max_update_ratio=2" in m for m in notes)


def test_a_small_change_passes_and_a_zero_global_model_is_not_bounded():
    g = {"w": T(3.0, 4.0)}
    res = aggregate_round(FedAvg(), g, [upd("a", 1, w=T(3.1, 4.1))], 1, log=lambda m: None, bounds=UpdateBounds())
    assert res.accepted == ["a"]
    zero = {"w": T(0.0, 0.0)}
    res = aggregate_round(FedAvg(), zero, [upd("a", 1, w=T(1e6, 0.0))], 1, log=lambda m: None,
                          bounds=UpdateBounds())
    assert res.accepted == ["a"]
    assert DEFAULT_MAX_UPDATE_RATIO == UpdateBounds().max_update_ratio


def test_fedbn_local_keys_are_not_bounded():
    """A site's own normalisation statistics never reach the global model under FedBN, so their size is its own."""
    g = {"conv.weight": T(1.0, 1.0), "norm.weight": T(1.0, 1.0)}
    u = upd("a", 1, **{"conv.weight": T(1.1, 1.0), "norm.weight": T(1e6, 1e6)})
    res = aggregate_round(FedBN(), g, [u], 1, log=lambda m: None, bounds=UpdateBounds())
    assert res.accepted == ["a"] and res.weights["norm.weight"].tolist() == [1.0, 1.0]
    res = aggregate_round(FedAvg(), g, [u], 1, log=lambda m: None, bounds=UpdateBounds())
    assert res.dropped and res.dropped[0][0] == "a"


def test_bounds_refuse_nonsense_settings():
    for kwargs in ({"max_update_ratio": 0}, {"max_update_ratio": float("nan")}, {"large_updates": "ignore"},
                   {"max_num_examples": 0}, {"site_cases": {"a": -1}}):
        with pytest.raises(ValueError):
            UpdateBounds(**kwargs)


def test_the_round_record_names_each_accepted_sites_update_ratio():
    g = {"w": T(3.0, 4.0)}
    res = aggregate_round(FedAvg(), g, [upd("a", 1, w=T(3.0, 4.5)), upd("b", 1, w=T(1e9, 0.0))], 1,
                          log=lambda m: None, bounds=UpdateBounds())
    assert res.record()["update_ratios"] == {"a": pytest.approx(0.1)}


# --- fewer valid updates than the round needs ---------------------------------------------------------------------------
def test_fewer_valid_updates_than_min_updates_leave_weights_and_server_state_untouched():
    from nnunetv2_fedkd.federated import TOO_FEW_UPDATES, FedOpt

    g = {"w": T(0.0, 0.0)}
    strat = FedOpt(optimizer="momentum", server_lr=1.0, momentum=0.5)
    bad = upd("b", 1, w=T(1.0))  # wrong shape: dropped by validation
    res = aggregate_round(strat, g, [upd("a", 1, w=T(2.0, 2.0)), bad], 1, log=lambda m: None, min_updates=2)
    assert not res.aggregated and res.accepted == [] and res.weights["w"].tolist() == [0.0, 0.0]
    assert res.dropped[1] == ("a", TOO_FEW_UPDATES) and res.dropped[0][0] == "b"
    assert int(strat.state_dict()["step"]) == 0 and not any(k.startswith("m/") for k in strat.state_dict())
    # two valid updates: FedAvgM's first step, m = delta = mean (3, 3) - 0 -> w = 0 + 1.0 * m
    res = aggregate_round(strat, g, [upd("a", 1, w=T(2.0, 2.0)), upd("b", 1, w=T(4.0, 4.0))], 1,
                          log=lambda m: None, min_updates=2)
    assert res.aggregated and res.weights["w"].tolist() == [3.0, 3.0] and int(strat.state_dict()["step"]) == 1


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_min_updates_must_be_a_positive_int(bad):
    with pytest.raises(ValueError, match="min_updates must be an int >= 1"):
        aggregate_round(FedAvg(), {"w": T(0.0)}, [upd("a", 1, w=T(1.0))], 1, log=lambda m: None, min_updates=bad)
