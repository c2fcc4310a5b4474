"""Unit tests for nnunetv2_fedkd.federated (aggregation strategies, update validation, LR schedule, weights I/O) on
tiny hand-computed tensors (CPU, fast)."""
from __future__ import annotations

import logging
import math
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from nnunetv2_fedkd.federated import (
    CorruptCheckpoint,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedBN,
    FedOpt,
    FedProx,
    SiteUpdate,
    UpdateRejected,
    aggregate_round,
    federated_poly_lr,
    from_numpy_arrays,
    is_norm_key,
    load_weights,
    make_strategy,
    merge_local_state,
    norm_keys,
    organ_head_mapper,
    plans_digest,
    proximal_term,
    save_weights,
    split_local_state,
    to_numpy_arrays,
    validate_update,
    weights_digest,
)


def T(*values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


def upd(site, n, organs=(), **weights):
    return SiteUpdate(site, dict(weights), n, organs=frozenset(organs))


# ----------------------------------------------------------------------------------------------------------------------
# FedAvg / FedProx
# ----------------------------------------------------------------------------------------------------------------------
def test_fedavg_case_weighted_exact():
    g = {"w": T(0.0), "b": T(0.0, 0.0)}
    new = FedAvg().aggregate(g, [upd("a", 3, w=T(1.0), b=T(1.0, 2.0)), upd("b", 1, w=T(5.0), b=T(5.0, -2.0))], 0)
    assert new["w"].item() == 2.0  # 3/4 * 1 + 1/4 * 5
    assert new["b"].tolist() == [2.0, 1.0]
    assert new["w"].dtype == torch.float32 and list(new) == ["w", "b"]


def test_fedavg_equal_weighting():
    g = {"w": T(0.0)}
    new = FedAvg(weighting="equal").aggregate(g, [upd("a", 3, w=T(1.0)), upd("b", 1, w=T(5.0))], 0)
    assert new["w"].item() == 3.0


def test_fedavg_keeps_low_precision_dtype_and_copies_integer_buffers_from_first_update():
    g = {"h": T(0.0, dtype=torch.float16), "bf": T(0.0, dtype=torch.bfloat16),
         "count": torch.tensor(0, dtype=torch.int64)}
    ups = [upd("a", 1, h=T(1.0, dtype=torch.float16), bf=T(2.0, dtype=torch.bfloat16), count=torch.tensor(7)),
           upd("b", 1, h=T(2.0, dtype=torch.float16), bf=T(4.0, dtype=torch.bfloat16), count=torch.tensor(9))]
    new = FedAvg().aggregate(g, ups, 0)
    assert new["h"].dtype == torch.float16 and new["h"].item() == 1.5
    assert new["bf"].dtype == torch.bfloat16 and new["bf"].item() == 3.0
    assert new["count"].item() == 7 and new["count"].dtype == torch.int64


def test_aggregate_returns_fresh_tensors():
    g = {"w": T(1.0)}
    u = upd("a", 1, w=T(4.0))
    new = FedAvg().aggregate(g, [u], 0)
    new["w"] += 1
    assert u.weights["w"].item() == 4.0 and g["w"].item() == 1.0


def test_fedprox_server_is_fedavg_and_exposes_mu():
    g = {"w": T(0.0)}
    ups = [upd("a", 3, w=T(1.0)), upd("b", 1, w=T(5.0))]
    s = FedProx(mu=0.1)
    assert s.proximal_mu == 0.1 and FedAvg().proximal_mu == 0.0
    assert torch.equal(s.aggregate(g, ups, 0)["w"], FedAvg().aggregate(g, ups, 0)["w"])


def test_proximal_term_value_and_gradient():
    w = nn.Parameter(T(1.0, 2.0))
    frozen = nn.Parameter(T(10.0), requires_grad=False)
    gw = T(0.0, 0.0).requires_grad_(True)  # gradient must not reach the global copy
    glob = {"w": gw, "frozen": T(0.0)}
    term = proximal_term([("w", w), ("frozen", frozen)], glob, mu=0.5)
    assert term.dtype == torch.float32 and term.ndim == 0
    assert term.item() == pytest.approx(0.25 * (1 + 4))  # mu/2 * ||w - g||^2
    term.backward()
    assert w.grad.tolist() == pytest.approx([0.5, 1.0])  # mu * (w - g)
    assert gw.grad is None


def test_proximal_term_exclude_missing_and_bad_mu():
    w = nn.Parameter(T(3.0))
    assert proximal_term([("w", w)], {"w": T(1.0)}, 1.0, exclude={"w"}).item() == 0.0
    with pytest.raises(KeyError, match="'w'"):
        proximal_term([("w", w)], {}, 1.0)
    with pytest.raises(ValueError, match="mu"):
        proximal_term([("w", w)], {"w": T(1.0)}, -1.0)


def test_proximal_term_on_a_real_module():
    net = nn.Sequential(nn.Linear(3, 2), nn.InstanceNorm1d(2, affine=True))
    glob = {k: v.detach().clone() for k, v in net.state_dict().items()}
    assert proximal_term(net.named_parameters(), glob, 0.1).item() == 0.0
    with torch.no_grad():
        net[0].bias.add_(1.0)
    assert proximal_term(net.named_parameters(), glob, 0.1).item() == pytest.approx(0.05 * 2)


# ----------------------------------------------------------------------------------------------------------------------
# validation and aggregate_round
# ----------------------------------------------------------------------------------------------------------------------
REF = {"a.weight": T(0.0, 0.0), "a.count": torch.tensor(0)}


@pytest.mark.parametrize("weights, key, fragment", [
    ({"a.weight": T(1.0, 1.0)}, "a.count", "missing key"),
    ({**REF, "extra.bias": T(1.0)}, "extra.bias", "unexpected key"),
    ({"a.weight": T(1.0, 1.0, 1.0), "a.count": torch.tensor(0)}, "a.weight", "shape"),
    ({"a.weight": T(1.0, 1.0, dtype=torch.float64), "a.count": torch.tensor(0)}, "a.weight", "dtype"),
    ({"a.weight": T(1.0, float("nan")), "a.count": torch.tensor(0)}, "a.weight", "non-finite"),
    ({"a.weight": T(float("inf"), 1.0), "a.count": torch.tensor(0)}, "a.weight", "non-finite"),
    ({"a.weight": [1.0, 1.0], "a.count": torch.tensor(0)}, "a.weight", "not a tensor"),
])
def test_validate_update_rejects(weights, key, fragment):
    with pytest.raises(UpdateRejected) as info:
        validate_update(weights, REF, "hospital_7")
    msg = str(info.value)
    assert "hospital_7" in msg and key in msg and fragment in msg
    assert info.value.site == "hospital_7" and info.value.key == key


def test_validate_update_accepts_integer_buffers():
    validate_update({"a.weight": T(1.0, 2.0), "a.count": torch.tensor(123456)}, REF, "s")


def test_aggregate_round_drops_bad_updates_and_aggregates_the_rest():
    g = {"w": T(0.0), "cnt": torch.tensor(0)}
    messages = []
    ups = [
        upd("good1", 3, w=T(1.0), cnt=torch.tensor(1)),
        upd("nan", 5, w=T(float("nan")), cnt=torch.tensor(1)),
        upd("missing", 5, w=T(9.0)),
        upd("good2", 1, w=T(5.0), cnt=torch.tensor(2)),
        upd("good1", 1, w=T(100.0), cnt=torch.tensor(1)),  # duplicate
        upd("empty", 0, w=T(100.0), cnt=torch.tensor(1)),
    ]
    res = aggregate_round(FedAvg(), g, ups, 4, messages.append)
    assert res.aggregated and res.accepted == ["good1", "good2"]
    assert res.weights["w"].item() == 2.0 and res.weights["cnt"].item() == 1
    assert [s for s, _ in res.dropped] == ["nan", "missing", "good1", "empty"]
    dropped_msgs = [m for m in messages if "dropped the update" in m]
    assert len(dropped_msgs) == 4
    assert "'nan'" in dropped_msgs[0] and "non-finite" in dropped_msgs[0] and "'w'" in dropped_msgs[0]
    assert "'missing'" in dropped_msgs[1] and "missing key 'cnt'" in dropped_msgs[1]
    assert "duplicate" in dropped_msgs[2] and "num_examples" in dropped_msgs[3]
    rec = res.record()
    assert rec["round"] == 4 and rec["accepted"] == ["good1", "good2"] and len(rec["dropped"]) == 4


def test_aggregate_round_keeps_global_when_nothing_survives(caplog):
    g = {"w": T(1.5)}
    log = logging.getLogger("test_federated")
    with caplog.at_level(logging.INFO, logger="test_federated"):
        res = aggregate_round(FedAdam(), g, [upd("x", 1, w=T(float("inf")))], 2, log)
    assert not res.aggregated and res.accepted == [] and res.weights["w"].item() == 1.5
    assert res.weights["w"] is not g["w"]
    text = caplog.text
    assert "'x'" in text and "kept unchanged" in text


def test_strategy_aggregate_rejects_structural_mismatch_and_empty():
    with pytest.raises(UpdateRejected, match="'s'"):
        FedAvg().aggregate({"w": T(0.0)}, [upd("s", 1, v=T(0.0))], 0)
    with pytest.raises(ValueError, match="no updates"):
        FedAvg().aggregate({"w": T(0.0)}, [], 0)


# ----------------------------------------------------------------------------------------------------------------------
# organ-aware heads
# ----------------------------------------------------------------------------------------------------------------------
H0 = "decoder.seg_layers.0.heads.0.weight"
H1 = "decoder.seg_layers.0.heads.1.weight"
ORGANS = ["liver", "spleen"]


def _head_weights(h0, h1, enc):
    return {H0: T(h0), H1: T(h1), "encoder.w": T(enc)}


def test_organ_head_mapper():
    f = organ_head_mapper(ORGANS)
    assert f(H0) == "liver" and f("_orig_mod." + H1) == "spleen"
    assert f("decoder.seg_layers.1.heads.1.3.bias") == "spleen" and f("encoder.w") is None
    with pytest.raises(ValueError, match="organ head 2"):
        f("decoder.seg_layers.0.heads.2.weight")
    with pytest.raises(ValueError):
        organ_head_mapper(["liver", "liver"])


def test_organ_aware_heads_average_over_labelling_sites_only_and_keep_unlabelled():
    g = _head_weights(0.0, 7.0, 0.0)
    ups = [SiteUpdate("a", _head_weights(1.0, 100.0, 1.0), 3, organs={"liver"}),
           SiteUpdate("b", _head_weights(5.0, 200.0, 5.0), 1, organs={"liver", "kidney"})]
    s = FedAvg(organ_aware_heads=ORGANS)
    new, info = s.aggregate_detailed(g, ups, 0)
    assert new[H0].item() == 2.0 and new["encoder.w"].item() == 2.0
    assert new[H1].item() == 7.0 and info.heads_kept == ("spleen",)
    # a third site that labels spleen: only it defines the spleen head; liver head still over a and b
    ups.append(SiteUpdate("c", _head_weights(1000.0, 10.0, 9.0), 2, organs={"spleen"}))
    new = s.aggregate(g, ups, 1)
    assert new[H1].item() == 10.0 and new[H0].item() == 2.0
    assert new["encoder.w"].item() == pytest.approx((3 * 1 + 1 * 5 + 2 * 9) / 6)
    # without organ awareness every head is a plain average
    assert FedAvg().aggregate(g, ups, 1)[H1].item() == pytest.approx((3 * 100 + 200 + 2 * 10) / 6)


def test_organ_aware_heads_equal_weighting_and_custom_mapping_and_logging():
    g = {"head_liver": T(0.0), "body": T(0.0)}
    ups = [upd("a", 3, {"liver"}, head_liver=T(1.0), body=T(1.0)), upd("b", 1, (), head_liver=T(5.0), body=T(5.0))]
    s = FedAvg(weighting="equal", organ_aware_heads=lambda k: "liver" if k.startswith("head_") else None)
    messages = []
    res = aggregate_round(s, g, ups, 0, messages.append)
    assert res.weights["head_liver"].item() == 1.0 and res.weights["body"].item() == 3.0
    ups2 = [upd("b", 1, (), head_liver=T(5.0), body=T(5.0))]
    res = aggregate_round(s, g, ups2, 1, messages.append)
    assert res.weights["head_liver"].item() == 0.0 and res.heads_kept == ("liver",)
    assert any("'liver'" in m and "keeps the global" in m for m in messages)


def test_organ_aware_heads_misconfiguration_is_an_error():
    with pytest.raises(ValueError, match="no weight key belongs to an organ head"):
        FedAvg(organ_aware_heads=ORGANS).aggregate({"w": T(0.0)}, [upd("a", 1, w=T(1.0))], 0)
    with pytest.raises(TypeError):
        SiteUpdate("a", {}, 1, organs="liver")


def test_organ_aware_heads_with_server_momentum_do_not_drift_when_unlabelled():
    s = FedAvgM(server_lr=1.0, momentum=0.9, organ_aware_heads=ORGANS)
    g = _head_weights(0.0, 0.0, 0.0)
    g = s.aggregate(g, [SiteUpdate("a", _head_weights(1.0, 1.0, 1.0), 1, organs={"liver", "spleen"})], 0)
    assert g[H1].item() == 1.0
    g = s.aggregate(g, [SiteUpdate("b", _head_weights(1.0, 50.0, 1.0), 1, organs={"liver"})], 1)
    assert g[H1].item() == 1.0  # kept, momentum not applied
    assert g[H0].item() == pytest.approx(1.9) and g["encoder.w"].item() == pytest.approx(1.9)  # 1 + (0.9*1 + 0)
    assert s.state_dict()["m/" + H1].item() == 1.0  # moment untouched


# ----------------------------------------------------------------------------------------------------------------------
# FedBN and normalisation keys
# ----------------------------------------------------------------------------------------------------------------------
def _tiny_unet(norm_op, residual=False, heads=0):
    from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet

    from nnunetv2_fedkd.networks import attach_organ_heads

    common = dict(input_channels=1, n_stages=3, features_per_stage=(2, 4, 4), conv_op=nn.Conv3d, kernel_sizes=3,
                  strides=(1, 2, 2), num_classes=3, n_conv_per_stage_decoder=(1, 1), conv_bias=True,
                  norm_op=norm_op, norm_op_kwargs={"affine": True, "eps": 1e-5}, dropout_op=None,
                  nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=True)
    if residual:
        net = ResidualEncoderUNet(n_blocks_per_stage=(1, 1, 1), **common)
    else:
        net = PlainConvUNet(n_conv_per_stage=(1, 1, 1), **common)
    if heads:
        attach_organ_heads(net, 3, heads)
    return net


@pytest.mark.parametrize("norm_op, residual, heads", [
    (nn.InstanceNorm3d, False, 0), (nn.InstanceNorm3d, False, 4), (nn.BatchNorm3d, True, 4)])
def test_norm_keys_by_name_match_module_types_on_nnunet_networks(norm_op, residual, heads):
    net = _tiny_unet(norm_op, residual, heads)
    sd = net.state_dict()
    by_model = norm_keys(sd, net)
    assert by_model == norm_keys(sd)
    assert "encoder.stages.0.0.convs.0.norm.weight" in by_model or residual
    assert any(".all_modules." in k for k in by_model)  # nnU-Net's aliases of the norm
    assert not any(k.endswith("conv.weight") for k in by_model)
    if heads:
        assert "decoder.seg_layers.0.heads.2.1.weight" in by_model
        assert "decoder.seg_layers.0.heads.2.0.weight" not in by_model
    for k in sd:
        assert is_norm_key(k, net) == (k in by_model)


def test_is_norm_key_patterns():
    assert is_norm_key("encoder.stages.0.0.convs.0.norm.weight")
    assert is_norm_key("layer1.0.bn1.running_var") and is_norm_key("x.gn.bias") and is_norm_key("blk.norm2.weight")
    assert is_norm_key("model.anything.num_batches_tracked")
    assert not is_norm_key("encoder.stages.0.0.convs.0.conv.weight")
    assert not is_norm_key("encoder.stages.0.0.convs.0.all_modules.0.weight")
    assert not is_norm_key("decoder.seg_layers.0.heads.1.weight")


def test_fedbn_keeps_norm_keys_and_averages_the_rest():
    net = nn.Sequential()
    net.add_module("conv", nn.Conv1d(1, 1, 1))
    net.add_module("norm", nn.InstanceNorm1d(1, affine=True))
    g = {k: torch.zeros_like(v) for k, v in net.state_dict().items()}
    site = lambda name, n, val: SiteUpdate(name, {k: torch.full_like(v, val) for k, v in g.items()}, n)
    ups = [site("a", 3, 1.0), site("b", 1, 5.0)]
    for s in (FedBN(), FedBN(model=net), FedBN(norm_keys={"norm.weight", "norm.bias"}), make_strategy("fedbn")):
        new, info = s.aggregate_detailed(g, ups, 0)
        assert new["norm.weight"].item() == 0.0 and new["norm.bias"].item() == 0.0
        assert new["conv.weight"].item() == 2.0 and new["conv.bias"].item() == 2.0
        assert info.kept_keys == {"norm.weight", "norm.bias"} == s.local_keys(g)
    with pytest.raises(ValueError, match="no normalisation keys"):
        FedBN().aggregate({"w": T(0.0)}, [upd("a", 1, w=T(1.0))], 0)
    with pytest.raises(ValueError):
        FedBN(model=net, norm_keys={"norm.weight"})


def test_split_and_merge_local_state():
    site_w = {"conv.weight": T(1.0), "norm.weight": T(2.0), "norm.bias": T(3.0)}
    shared, local = split_local_state(site_w, {"norm.weight", "norm.bias"})
    assert list(shared) == ["conv.weight"] and set(local) == {"norm.weight", "norm.bias"}
    merged = merge_local_state({"conv.weight": T(10.0), "norm.weight": T(0.0), "norm.bias": T(0.0)}, local)
    assert list(merged) == ["conv.weight", "norm.weight", "norm.bias"]
    assert [v.item() for v in merged.values()] == [10.0, 2.0, 3.0]
    with pytest.raises(KeyError):
        split_local_state(site_w, {"nope"})
    with pytest.raises(KeyError):
        merge_local_state({"conv.weight": T(0.0)}, {"nope": T(0.0)})
    with pytest.raises(ValueError, match="shape"):
        merge_local_state({"norm.weight": T(0.0)}, {"norm.weight": T(0.0, 1.0)})


# ----------------------------------------------------------------------------------------------------------------------
# FedOpt
# ----------------------------------------------------------------------------------------------------------------------
D = torch.float64


def test_fedavgm_two_steps_by_hand():
    s = FedAvgM(server_lr=1.0, momentum=0.9)
    g = {"w": T(0.0, dtype=D)}
    g = s.aggregate(g, [upd("a", 1, w=T(1.0, dtype=D))], 0)  # delta 1 -> m 1 -> x 1
    assert g["w"].item() == 1.0
    g = s.aggregate(g, [upd("a", 1, w=T(3.0, dtype=D))], 1)  # delta 2 -> m 0.9 + 2 = 2.9 -> x 3.9
    assert g["w"].item() == pytest.approx(3.9, abs=1e-12)
    s2 = FedAvgM(server_lr=0.5, momentum=0.0)
    assert s2.aggregate({"w": T(0.0, dtype=D)}, [upd("a", 1, w=T(1.0, dtype=D))], 0)["w"].item() == 0.5


def test_fedavgm_with_lr_one_and_no_momentum_is_fedavg():
    g = {"w": T(0.5)}
    ups = [upd("a", 3, w=T(1.0)), upd("b", 1, w=T(5.0))]
    assert FedAvgM(server_lr=1.0, momentum=0.0).aggregate(g, ups, 0)["w"].item() == 2.0


def test_fedadam_two_steps_by_hand():
    lr, b1, b2, tau = 1.0, 0.5, 0.5, 0.1
    s = FedAdam(server_lr=lr, beta1=b1, beta2=b2, tau=tau)
    g = {"w": T(0.0, dtype=D), "cnt": torch.tensor(0)}
    # two sites (3 cases at 0.5, 1 case at 2.5): average 1.0, delta 1
    g1 = s.aggregate(g, [upd("a", 3, w=T(0.5, dtype=D), cnt=torch.tensor(4)),
                         upd("b", 1, w=T(2.5, dtype=D), cnt=torch.tensor(5))], 0)
    m1 = (1 - b1) * 1.0
    v1 = b2 * tau ** 2 + (1 - b2) * 1.0
    x1 = lr * m1 / (math.sqrt(v1) + tau)
    assert g1["w"].item() == pytest.approx(x1, abs=1e-12) and g1["cnt"].item() == 4
    g2 = s.aggregate(g1, [upd("a", 1, w=T(x1 + 2.0, dtype=D), cnt=torch.tensor(4))], 1)  # delta 2
    m2 = b1 * m1 + (1 - b1) * 2.0
    v2 = b2 * v1 + (1 - b2) * 4.0
    assert g2["w"].item() == pytest.approx(x1 + lr * m2 / (math.sqrt(v2) + tau), abs=1e-12)
    assert int(s.state_dict()["step"]) == 2


@pytest.mark.parametrize("opt, v1", [("adagrad", 0.01 + 1.0), ("yogi", 0.01 + 0.5 * 1.0)])
def test_fedadagrad_and_fedyogi_one_step(opt, v1):
    s = FedOpt(optimizer=opt, server_lr=1.0, beta1=0.5, beta2=0.5, tau=0.1)
    new = s.aggregate({"w": T(0.0, dtype=D)}, [upd("a", 1, w=T(1.0, dtype=D))], 0)
    assert new["w"].item() == pytest.approx(0.5 / (math.sqrt(v1) + 0.1), abs=1e-12)


def test_fedopt_float32_weights_stay_float32():
    s = FedAdam()
    new = s.aggregate({"w": T(0.0, 1.0)}, [upd("a", 1, w=T(1.0, 0.0))], 0)
    assert new["w"].dtype == torch.float32
    step = 0.1 / (math.sqrt(0.99 * 1e-6 + 0.01) + 1e-3)  # m = (1-b1) delta; v = b2 tau^2 + (1-b2) delta^2
    assert new["w"].tolist() == pytest.approx([1e-2 * step, 1 - 1e-2 * step], rel=1e-6)


@pytest.mark.parametrize("make", [lambda: FedAdam(server_lr=0.1), lambda: FedAvgM(server_lr=1.0),
                                  lambda: FedOpt(optimizer="yogi")])
def test_strategy_state_round_trip_gives_identical_next_step(make, tmp_path):
    g0 = {"w": T(0.0, 1.0, 2.0), "cnt": torch.tensor(0)}
    r0 = [upd("a", 2, w=T(1.0, 1.5, 1.0), cnt=torch.tensor(1)), upd("b", 1, w=T(-1.0, 0.5, 3.0), cnt=torch.tensor(2))]
    s = make()
    g1 = s.aggregate(g0, r0, 0)
    path = save_weights(tmp_path / "server_state.pt", s.state_dict(), {"strategy": s.name})
    state, meta = load_weights(path)
    resumed = make()
    resumed.load_state_dict(state)
    assert meta["strategy"] == s.name
    r1 = [upd("a", 1, w=g1["w"] + T(0.3, -0.2, 0.1), cnt=torch.tensor(1))]
    a, b = s.aggregate(g1, r1, 1), resumed.aggregate(g1, r1, 1)
    assert torch.equal(a["w"], b["w"]) and weights_digest(a) == weights_digest(b)
    assert weights_digest(s.state_dict()) == weights_digest(resumed.state_dict())
    fresh = make().aggregate(g1, r1, 1)  # without the state the step differs
    assert not torch.equal(fresh["w"], a["w"])


def test_load_state_dict_rejects_foreign_state():
    mom = FedAvgM()
    mom.aggregate({"w": T(0.0)}, [upd("a", 1, w=T(1.0))], 0)
    with pytest.raises(ValueError, match="moments"):
        FedAdam().load_state_dict(mom.state_dict())
    adam = FedAdam()
    adam.aggregate({"w": T(0.0)}, [upd("a", 1, w=T(1.0))], 0)
    with pytest.raises(ValueError, match="unexpected server state entry 'v/w'"):
        FedAvgM().load_state_dict(adam.state_dict())
    with pytest.raises(ValueError, match="keeps no server state"):
        FedAvg().load_state_dict(adam.state_dict())
    FedAvg().load_state_dict(FedAvg().state_dict())
    bad = FedAdam()
    bad.load_state_dict({"step": torch.tensor(1), "m/w": T(0.0, 0.0), "v/w": T(1.0, 1.0)})
    with pytest.raises(ValueError, match="shape"):
        bad.aggregate({"w": T(0.0)}, [upd("a", 1, w=T(1.0))], 1)


# ----------------------------------------------------------------------------------------------------------------------
# make_strategy
# ----------------------------------------------------------------------------------------------------------------------
def test_make_strategy_names_and_options():
    assert type(make_strategy("FedAvg")) is FedAvg
    assert make_strategy("fedprox", mu=0.5).proximal_mu == 0.5
    assert make_strategy("fedavgm", momentum=0.5).momentum == 0.5
    a = make_strategy("fedadam", server_lr=0.3, tau=1e-2)
    assert isinstance(a, FedAdam) and a.server_lr == 0.3 and a.tau == 1e-2
    assert make_strategy("fedopt", optimizer="yogi").optimizer == "yogi"
    assert make_strategy("fedbn", weighting="equal").weighting == "equal"
    assert make_strategy("fedavg", organ_aware_heads=ORGANS).hyperparameters()["organ_aware_heads"] == ORGANS
    with pytest.raises(ValueError, match="unknown aggregation strategy 'fedsgd'.*fedavg"):
        make_strategy("fedsgd")
    with pytest.raises(ValueError, match="fedavg: unknown option.*mu"):
        make_strategy("fedavg", mu=0.1)
    with pytest.raises(ValueError, match="unknown option.*beta2"):
        make_strategy("fedavgm", beta2=0.9)
    for name, opts in [("fedavg", {"weighting": "sites"}), ("fedprox", {"mu": -1}), ("fedadam", {"tau": 0}),
                       ("fedavgm", {"momentum": 1.0}), ("fedopt", {"optimizer": "sgd"}),
                       ("fedadam", {"server_lr": float("nan")})]:
        with pytest.raises(ValueError):
            make_strategy(name, **opts)


# ----------------------------------------------------------------------------------------------------------------------
# learning-rate schedule
# ----------------------------------------------------------------------------------------------------------------------
def test_federated_poly_lr_is_one_schedule_over_all_rounds():
    rounds, local_epochs, lr0 = 4, 3, 1e-2
    lrs = [federated_poly_lr(lr0, r, e, rounds, local_epochs) for r in range(rounds) for e in range(local_epochs)]
    assert lrs[0] == lr0
    assert all(b < a for a, b in zip(lrs, lrs[1:]))  # strictly decreasing, no restart at round boundaries
    assert lrs[5] == pytest.approx(lr0 * (1 - 5 / 12) ** 0.9)
    from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr0)
    sched = PolyLRScheduler(opt, lr0, rounds * local_epochs)
    for epoch, lr in enumerate(lrs):
        sched.step(epoch)
        assert opt.param_groups[0]["lr"] == pytest.approx(lr, rel=1e-12)
    with pytest.raises(ValueError):
        federated_poly_lr(lr0, 4, 0, rounds, local_epochs)
    with pytest.raises(ValueError):
        federated_poly_lr(lr0, 0, 3, rounds, local_epochs)


# ----------------------------------------------------------------------------------------------------------------------
# weights I/O
# ----------------------------------------------------------------------------------------------------------------------
def _sample_weights():
    torch.manual_seed(0)
    return {"conv.weight": torch.randn(2, 1, 3), "conv.bias": torch.randn(2),
            "bn.num_batches_tracked": torch.tensor(5), "half": torch.randn(3).to(torch.bfloat16)}


def test_save_load_round_trip(tmp_path):
    w = _sample_weights()
    big = torch.arange(100.0)
    w["view"] = big[10:12]  # a view of a larger storage is saved compactly
    path = save_weights(tmp_path / "sub" / "w.pt", w, {"round": 3, "dice": float("nan")})
    assert [p.name for p in path.parent.iterdir()] == ["w.pt"]  # no temporary file left
    loaded, meta = load_weights(path)
    assert list(loaded) == list(w) and all(torch.equal(loaded[k], w[k]) for k in w)
    assert all(loaded[k].dtype == w[k].dtype for k in w)
    assert meta["round"] == 3 and math.isnan(meta["dice"])
    assert weights_digest(loaded) == weights_digest(w)
    with pytest.raises(TypeError, match="JSON"):
        save_weights(tmp_path / "x.pt", w, {"bad": object()})
    assert not (tmp_path / "x.pt").exists()


def test_load_rejects_truncated_file(tmp_path):
    path = save_weights(tmp_path / "w.pt", _sample_weights(), {})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpoint, match="w.pt"):
        load_weights(path)


def test_load_rejects_random_bytes_and_empty_files(tmp_path):
    p = tmp_path / "garbage.pt"
    p.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(CorruptCheckpoint, match="garbage.pt"):
        load_weights(p)
    p.write_bytes(b"")
    with pytest.raises(CorruptCheckpoint):
        load_weights(p)
    with pytest.raises(FileNotFoundError):
        load_weights(tmp_path / "absent.pt")


class _Malicious:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))  # would create a file if unpickled unsafely


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["pickle", "torch"])
def test_load_refuses_pickled_objects(tmp_path, writer):
    marker = tmp_path / "pwned"
    p = tmp_path / "evil.pt"
    payload = {"format": "nnunetv2_fedkd.weights", "version": 1, "weights": {"w": _Malicious(str(marker))}}
    if writer == "pickle":
        p.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, p)
    with pytest.raises(CorruptCheckpoint, match="evil.pt"):
        load_weights(p)
    assert not marker.exists()


def _safetensors_file(path, tensors, **metadata):
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    return path


GOOD_META = dict(format="nnunetv2_fedkd.weights", version="2", meta_json="{}", keys_json='["a"]')


@pytest.mark.parametrize("metadata, fragment", [
    ({}, "format tag"),
    ({**GOOD_META, "version": "99"}, "version"),
    ({k: v for k, v in GOOD_META.items() if k != "keys_json"}, "missing entry 'keys_json'"),
    ({**GOOD_META, "meta_json": "{", "digest": ""}, "JSON"),
    ({**GOOD_META, "meta_json": "[1]", "digest": ""}, "JSON object"),
    ({**GOOD_META, "keys_json": '["b"]', "digest": ""}, "does not list the stored tensors"),
])
def test_load_rejects_unexpected_structure(tmp_path, metadata, fragment):
    p = _safetensors_file(tmp_path / "odd.fedkd", {"a": torch.zeros(2)}, **metadata)
    with pytest.raises(CorruptCheckpoint, match="odd.fedkd") as info:
        load_weights(p)
    assert fragment in str(info.value)


def test_load_refuses_torch_zip_files_without_unpickling(tmp_path):
    p = tmp_path / "old.fedkd"
    torch.save({"format": "nnunetv2_fedkd.weights", "version": 1, "weights": {"a": torch.zeros(1)}}, p)
    with pytest.raises(CorruptCheckpoint, match="old.fedkd.*torch.save zip.*never unpickles"):
        load_weights(p)


def test_weights_files_are_safetensors_in_the_key_order_of_the_model(tmp_path):
    from safetensors.torch import load_file

    w = {"z": T(1.0), "a": T(2.0, 3.0), "m": torch.tensor(4)}
    p = save_weights(tmp_path / "w.fedkd", w, {"round": 1})
    assert set(load_file(str(p))) == set(w)  # any safetensors reader can read it
    back, meta = load_weights(p)
    assert list(back) == ["z", "a", "m"] and meta == {"round": 1}
    assert all(torch.equal(back[k], w[k]) for k in w)


def test_load_rejects_digest_mismatch(tmp_path):
    from safetensors import safe_open

    w = {"a": T(1.0, 2.0)}
    p = save_weights(tmp_path / "w.fedkd", w, {})
    with safe_open(str(p), framework="pt") as f:
        metadata = f.metadata()
    _safetensors_file(p, {"a": T(9.0, 2.0)}, **metadata)
    with pytest.raises(CorruptCheckpoint, match="digest"):
        load_weights(p)


def test_weights_digest_stable_and_sensitive():
    w = _sample_weights()
    d = weights_digest(w)
    assert d == weights_digest(dict(reversed(list(w.items()))))  # order independent
    assert d == weights_digest({k: v.clone() for k, v in w.items()})
    changed = {k: v.clone() for k, v in w.items()}
    changed["conv.bias"][1] += 1e-6
    assert weights_digest(changed) != d
    renamed = dict(w)
    renamed["conv.bias2"] = renamed.pop("conv.bias")
    assert weights_digest(renamed) != d
    assert weights_digest({"a": T(1.0, 2.0)}) != weights_digest({"a": T(1.0, 2.0, dtype=torch.float64)})
    assert weights_digest({"a": T(1.0, 2.0)}) != weights_digest({"a": T(1.0, 2.0).reshape(2, 1)})
    assert weights_digest({"a": torch.zeros(0)}) != weights_digest({"a": torch.zeros(0, 1)})


def test_plans_digest():
    p = {"plans_name": "x", "configurations": {"3d_fullres": {"patch_size": [32, 32, 32], "batch_size": 2}}}
    q = {"configurations": {"3d_fullres": {"batch_size": 2, "patch_size": [32, 32, 32]}}, "plans_name": "x"}
    assert plans_digest(p) == plans_digest(q) and len(plans_digest(p)) == 64
    q["configurations"]["3d_fullres"]["batch_size"] = 3
    assert plans_digest(p) != plans_digest(q)
    with pytest.raises(ValueError):
        plans_digest({"a": object()})


def test_numpy_round_trip():
    w = _sample_weights()
    arrays = to_numpy_arrays(w)
    assert all(isinstance(a, np.ndarray) for a in arrays.values())
    assert arrays["half"].dtype == np.float32 and arrays["bn.num_batches_tracked"].shape == ()
    arrays["conv.bias"][0] = 123.0  # a copy: the tensors are untouched
    assert w["conv.bias"][0].item() != 123.0
    arrays = to_numpy_arrays(w)
    back = from_numpy_arrays(arrays, like=w)
    assert list(back) == list(w)
    assert all(torch.equal(back[k], w[k]) and back[k].dtype == w[k].dtype for k in w)
    assert from_numpy_arrays(arrays)["half"].dtype == torch.float32
    with pytest.raises(ValueError, match="'conv.bias'"):
        from_numpy_arrays({**arrays, "conv.bias": arrays["conv.bias"].astype(np.float64)}, like=w)
    with pytest.raises(ValueError, match="missing array 'half'"):
        from_numpy_arrays({k: v for k, v in arrays.items() if k != "half"}, like=w)
    with pytest.raises(ValueError, match="shape"):
        from_numpy_arrays({**arrays, "conv.bias": np.zeros(3, np.float32)}, like=w)
    swapped = from_numpy_arrays({"a": np.arange(3, dtype=">f4")})
    assert swapped["a"].tolist() == [0.0, 1.0, 2.0]


# ----------------------------------------------------------------------------------------------------------------------
# engine neutrality
# ----------------------------------------------------------------------------------------------------------------------
def test_importing_the_federated_core_does_not_import_flwr():
    code = ("import sys\n"
            "import nnunetv2_fedkd.federated, nnunetv2_fedkd.federated.aggregation, "
            "nnunetv2_fedkd.federated.weights_io\n"
            "bad = sorted(m for m in sys.modules if m == 'flwr' or m.startswith('flwr.'))\n"
            "assert not bad, bad\n")
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


def test_a_run_folder_of_format_1_files_is_upgraded_in_place(tmp_path):
    from nnunetv2_fedkd.workflows.cli import main
    from nnunetv2_fedkd.federated.weights_io import upgrade_weights_file

    w = {"b": T(1.0, 2.0), "a": torch.tensor(3)}
    old = tmp_path / "run" / "global_round_0001.fedkd"
    old.parent.mkdir()
    torch.save({"format": "nnunetv2_fedkd.weights", "version": 1, "weights": w, "meta_json": '{"completed_rounds": 1}',
                "digest": weights_digest(w)}, old)
    (tmp_path / "run" / "sites").mkdir()
    save_weights(tmp_path / "run" / "sites" / "update.fedkd", w, {})
    with pytest.raises(CorruptCheckpoint, match="upgrade-weights"):
        load_weights(old)
    assert main(["upgrade-weights", str(tmp_path / "run")]) == 0
    back, meta = load_weights(old)
    assert list(back) == ["b", "a"] and meta == {"completed_rounds": 1} and torch.equal(back["b"], w["b"])
    assert upgrade_weights_file(old) is False  # already safetensors
    bad = tmp_path / "bad.fedkd"
    torch.save({"format": "nnunetv2_fedkd.weights", "version": 1, "weights": w, "meta_json": "{}", "digest": "x"},
               bad)
    with pytest.raises(CorruptCheckpoint, match="digest"):
        upgrade_weights_file(bad)


def test_a_safetensors_file_whose_header_length_spells_pk_still_loads(tmp_path):
    """A safetensors file starts with its header length (8 bytes, little endian): a length of 0x4B50 mod 65536
    makes it start with b"PK", like a zip. It must load, not be taken for a torch zip."""
    w = {"a": T(1.0, 2.0)}
    for n in range(19000, 19400):
        p = save_weights(tmp_path / "pk.fedkd", w, {"pad": "x" * n})
        if p.read_bytes()[:2] == b"PK":
            break
    else:
        pytest.fail("no padding gave a header starting with PK")
    back, meta = load_weights(p)
    assert torch.equal(back["a"], w["a"]) and len(meta["pad"]) == n


def test_loaded_weights_do_not_read_from_the_file_afterwards(tmp_path):
    p = save_weights(tmp_path / "w.fedkd", {"a": T(1.0, 2.0)}, {})
    back, _ = load_weights(p)
    data = bytearray(p.read_bytes())
    data[-8:] = b"\x00" * 8  # the tensor's bytes, rewritten in place after the load
    with open(p, "r+b") as f:
        f.write(bytes(data))
    assert back["a"].tolist() == [1.0, 2.0]


def test_keys_that_are_not_strings_are_refused(tmp_path):
    p = _safetensors_file(tmp_path / "odd.fedkd", {"a": torch.zeros(2)}, **{**GOOD_META, "keys_json": "[1]",
                                                                              "digest": ""})
    with pytest.raises(CorruptCheckpoint, match="keys_json"):
        load_weights(p)
