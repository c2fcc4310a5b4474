"""Streaming aggregation (issue 17, item 2): every weighted-mean strategy folds an update in as it arrives (running
float64 sums), so the server holds O(model) memory whatever the number of sites; a rejected update leaves no trace;
the order statistics (median, trimmed mean) keep the valid updates until the round ends."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

from nnunetv2_fedkd.federated import SiteUpdate, make_strategy
from nnunetv2_fedkd.federated.aggregation import RoundAggregation, aggregate_round

ORGANS = ["liver", "kidney"]
H0, H1 = "decoder.seg_layers.0.heads.0.weight", "decoder.seg_layers.0.heads.1.weight"


def _global():
    return {"enc.conv.weight": torch.tensor([1.0, 2.0]), "enc.norm.weight": torch.tensor([1.0]),
            H0: torch.tensor([0.0]), H1: torch.tensor([10.0]), "steps": torch.tensor(4)}


def _update(site, organs, n, shift):
    g = _global()
    w = {k: (v + shift if v.is_floating_point() else v + 1) for k, v in g.items()}
    return SiteUpdate(site, w, n, organs=organs)


def _sites():
    return [_update("liver_a", ["liver"], 3, 1.0), _update("liver_b", ["liver"], 1, 5.0),
            _update("spleen", ["spleen"], 4, -2.0)]


@pytest.mark.parametrize("name, options", [("fedavg", {}), ("fedavg", {"weighting": "equal"}), ("fedbn", {}),
                                           ("fedadam", {}), ("fedavgm", {})])
def test_folding_one_update_at_a_time_equals_the_mean_of_all_by_hand(name, options):
    g = _global()
    s = make_strategy(name, organ_aware_heads=ORGANS, **options)
    agg = RoundAggregation(s, g, 1)
    for u in _sites():
        assert agg.add(u)
    res = agg.finish()
    w = [3.0, 1.0, 4.0] if options.get("weighting") != "equal" else [1.0, 1.0, 1.0]
    mean_shift = (w[0] * 1 + w[1] * 5 + w[2] * -2) / sum(w)
    liver_shift = (w[0] * 1 + w[1] * 5) / (w[0] + w[1])
    if name in ("fedavg", "fedbn"):
        assert torch.allclose(res.weights["enc.conv.weight"], g["enc.conv.weight"] + mean_shift)
        assert torch.allclose(res.weights[H0], g[H0] + liver_shift)  # only the liver sites label the liver head
        assert torch.equal(res.weights[H1], g[H1]) and res.heads_kept == ("kidney",)  # nobody labels the kidney
        norm = res.weights["enc.norm.weight"]
        assert torch.equal(norm, g["enc.norm.weight"]) if name == "fedbn" else torch.allclose(norm, torch.tensor([1 + mean_shift]))
        assert int(res.weights["steps"]) == 5  # integer buffers: from the first update
    # the same as the strategy aggregating the three updates at once (its server state included)
    s2 = make_strategy(name, organ_aware_heads=ORGANS, **options)
    at_once = s2.aggregate(g, _sites(), 1)
    assert all(torch.allclose(res.weights[k].double(), at_once[k].double()) for k in g)
    assert all(torch.equal(a, b) for a, b in zip(s.state_dict().values(), s2.state_dict().values()))


def test_the_server_keeps_no_update_once_it_is_folded_in():
    g = _global()
    agg = RoundAggregation(make_strategy("fedavg"), g, 1)
    u = _update("a", ["liver"], 2, 1.0)
    ref = weakref.ref(u.weights["enc.conv.weight"])
    agg.add(u)
    del u
    gc.collect()
    assert ref() is None  # released: only the running sums remain
    median = RoundAggregation(make_strategy("median"), g, 1)  # an order statistic needs every value at the end
    u = _update("a", ["liver"], 2, 1.0)
    ref = weakref.ref(u.weights["enc.conv.weight"])
    median.add(u)
    del u
    gc.collect()
    assert ref() is not None
    assert torch.equal(median.finish().weights["enc.conv.weight"], g["enc.conv.weight"] + 1)


def test_a_rejected_update_leaves_no_trace_in_the_sums():
    g = _global()
    good = _sites()
    bad = _update("nan_site", ["liver"], 100, 1.0)
    bad.weights["enc.conv.weight"] = torch.tensor([float("nan"), 0.0])
    dup = _update("liver_a", ["liver"], 100, 50.0)  # a second update of a site: dropped
    with_bad = aggregate_round(make_strategy("fedavg", organ_aware_heads=ORGANS), g,
                               [good[0], bad, good[1], dup, good[2]], 1, log=lambda s: None)
    without = aggregate_round(make_strategy("fedavg", organ_aware_heads=ORGANS), g, good, 1, log=lambda s: None)
    assert [s for s, _ in with_bad.dropped] == ["nan_site", "liver_a"]
    assert all(torch.equal(with_bad.weights[k], without.weights[k]) for k in g)


def test_too_few_updates_leave_the_strategy_state_untouched():
    g = _global()
    s = make_strategy("fedadam")
    agg = RoundAggregation(s, g, 1)
    agg.add(_update("a", [], 1, 1.0))
    res = agg.finish(min_updates=2)
    assert not res.aggregated and res.dropped == [("a", "fewer valid updates than min_sites")]
    assert s.state_dict() == {} or all(float(v.abs().sum()) == 0 for v in s.state_dict().values())
    with pytest.raises(RuntimeError, match="finished"):
        agg.add(_update("b", [], 1, 1.0))


def test_the_round_core_folds_updates_as_they_arrive(tmp_path):
    from nnunetv2_fedkd.federated.round_core import RoundCore

    core = RoundCore(tmp_path / "run", make_strategy("fedavg"), 1, "ab" * 32, {"num_epochs": 1}, log=lambda s: None)
    core.start({"w": torch.zeros(2)})
    core.begin_round()
    for site, n, v in (("a", 1, 1.0), ("b", 3, 5.0)):
        u = SiteUpdate(site, {"w": torch.full((2,), v)}, n, {"train_loss": 0.5})
        assert core.add_update(u)
    pending = core.aggregate((), [("c", "RuntimeError: connection reset")])
    assert pending.result.accepted == ["a", "b"] and torch.allclose(pending.result.weights["w"], torch.full((2,), 4.0))
    assert set(pending.site_metrics) == {"a", "b"} and pending.failures == [("c", "RuntimeError: connection reset")]
