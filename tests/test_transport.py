"""Compact transport (issue 17, item 3): the global weights and the sites' updates travel in float16, 2 bytes a
parameter; a site sends the change from the global weights it received; the server decodes every update into
float32 weights before it is validated and aggregated (in float32). Tiny hand-computed tensors, then the round core."""
from __future__ import annotations

import pytest
import torch

from nnunetv2_fedkd.federated import SiteUpdate, load_weights, make_strategy, save_weights
from nnunetv2_fedkd.federated.aggregation import UpdateRejected, aggregate_round, decode_update
from nnunetv2_fedkd.federated.round_core import FederationStateError, RoundCore
from nnunetv2_fedkd.federated.site_side import encode_update, transport_weights
from nnunetv2_fedkd.flower.task import read_update, update_content, weights_to_record


def test_float16_sends_the_change_from_the_received_weights_and_decodes_exactly_where_float16_is_exact():
    g = {"w": torch.tensor([0.75, 2.0, -1.0]), "n": torch.tensor(7)}  # n: an integer buffer (num_batches_tracked)
    sent = transport_weights(g, "float16")
    assert sent["w"].dtype == torch.float16 and sent["n"].dtype == torch.int64 and int(sent["n"]) == 7
    trained = {"w": torch.tensor([1.0, 2.5, -1.25]), "n": torch.tensor(9)}
    enc = encode_update(trained, sent, "float16")
    assert enc["w"].dtype == torch.float16 and enc["w"].tolist() == [0.25, 0.5, -0.25]
    assert int(enc["n"]) == 9  # integer tensors travel as they are
    dec = decode_update(SiteUpdate("a", enc, 2), sent, "float16")
    assert dec.weights["w"].dtype == torch.float32 and dec.weights["w"].tolist() == [1.0, 2.5, -1.25]
    assert int(dec.weights["n"]) == 9 and dec.site == "a" and dec.num_examples == 2
    # float32: nothing changes on either side
    assert transport_weights(g, "float32")["w"] is g["w"] and encode_update(trained, g, "float32")["w"] is trained["w"]
    with pytest.raises(ValueError, match="transport dtype must be one of float32, float16, not 'int8'"):
        transport_weights(g, "int8")


def test_a_change_in_float16_keeps_far_more_than_the_weights_in_float16():
    """One round moves a weight by ~1 % of its size: the change in float16 errs by ~2^-11 of the change, the weights
    themselves in float16 would err by ~2^-11 of the weight."""
    torch.manual_seed(0)
    g = {"w": torch.randn(10000) * 0.1}
    trained = {"w": g["w"] + torch.randn(10000) * 1e-3}
    sent = transport_weights(g, "float16")
    site_start = {"w": sent["w"].float()}  # the site trains from what it received
    trained = {"w": site_start["w"] + (trained["w"] - g["w"])}
    dec = decode_update(SiteUpdate("a", encode_update(trained, sent, "float16"), 1), sent, "float16").weights["w"]
    err_change = (dec - trained["w"]).abs().max().item()
    err_weights = (trained["w"].half().float() - trained["w"]).abs().max().item()
    assert err_change < 4e-6 and err_weights > 4e-5 and err_change < err_weights / 10


def test_updates_in_another_precision_or_with_other_keys_are_refused_naming_the_weight():
    sent = transport_weights({"w": torch.zeros(2), "b": torch.zeros(1)}, "float16")
    with pytest.raises(UpdateRejected, match="weight 'w' travels as torch.float32, the federation's transport is "
                                             "float16"):
        decode_update(SiteUpdate("old", {"w": torch.zeros(2), "b": torch.zeros(1, dtype=torch.float16)}, 1), sent,
                      "float16")
    with pytest.raises(UpdateRejected, match="missing weight 'b'"):
        decode_update(SiteUpdate("x", {"w": torch.zeros(2, dtype=torch.float16)}, 1), sent, "float16")
    with pytest.raises(UpdateRejected, match="shape of 'w' is \\(3,\\)"):
        decode_update(SiteUpdate("x", {"w": torch.zeros(3, dtype=torch.float16), "b": torch.zeros(1).half()}, 1),
                      sent, "float16")


def test_aggregation_decodes_first_then_drops_bad_updates_and_averages_in_float32():
    g = {"w": torch.tensor([1.0, 1.0])}
    sent = transport_weights(g, "float16")
    a = SiteUpdate("a", encode_update({"w": torch.tensor([1.5, 2.0])}, sent, "float16"), 1)
    b = SiteUpdate("b", encode_update({"w": torch.tensor([2.5, 0.0])}, sent, "float16"), 3)
    inf = SiteUpdate("inf", {"w": torch.tensor([70000.0, 0.0]).half()}, 1)  # beyond float16: inf, not finite
    old = SiteUpdate("old", {"w": torch.tensor([9.0, 9.0])}, 1)  # float32 weights from a site of another version
    res = aggregate_round(make_strategy("fedavg"), g, [a, b, inf, old], 1, log=lambda s: None,
                          decode=lambda u: decode_update(u, sent, "float16"))
    assert res.weights["w"].dtype == torch.float32
    assert res.weights["w"].tolist() == [pytest.approx((1.5 + 3 * 2.5) / 4), pytest.approx(0.5)]
    assert [s for s, _ in res.dropped] == ["inf", "old"]
    assert "non-finite" in res.dropped[0][1] and "travels as torch.float32" in res.dropped[1][1]


def test_float16_updates_are_2_bytes_a_parameter_in_the_site_file_and_the_flower_message(tmp_path):
    w = {"conv.weight": torch.randn(64, 32, 3, 3, 3), "conv.bias": torch.randn(64)}
    n = sum(v.numel() for v in w.values())
    sent = transport_weights(w, "float16")
    enc = encode_update({k: v + 0.01 for k, v in w.items()}, sent, "float16")
    f32 = save_weights(tmp_path / "f32.fedkd", w).stat().st_size
    f16 = save_weights(tmp_path / "f16.fedkd", enc).stat().st_size
    assert f16 / n < 2.05 and f32 / n > 3.99
    msg = update_content(SiteUpdate("a", enc, 3, {"train_loss": 0.5}, organs={"liver"}))
    record = msg["arrays"]
    assert sum(len(a.data) for a in record.values()) / n < 2.05
    back = read_update(msg)  # what the server reads: float16 changes, decoded by the round core
    assert all(back.weights[k].dtype == torch.float16 for k in w)
    assert torch.equal(back.weights["conv.bias"], enc["conv.bias"])
    assert sum(len(a.data) for a in weights_to_record(sent).values()) / n < 2.05  # the global weights sent


class Site:
    """Reads the global weights from the file it is given (as the in-process sites do), moves them half-way to its
    target and sends the update encoded for the round's transport, as NnUNetSite.fit does."""

    def __init__(self, name, target):
        self.name, self.target = name, target

    def fit(self, global_file, instructions):
        received, _ = load_weights(global_file)
        trained = {k: v.float() + 0.5 * (self.target - v.float()) for k, v in received.items()}
        return SiteUpdate(self.name, encode_update(trained, received, instructions["transport_dtype"]), 1)


def _core(tmp_path, dtype, **kw):
    return RoundCore(tmp_path / "run", make_strategy("fedavg"), 2, "ab" * 32, {"num_epochs": 1},
                     log=lambda s: None, transport_dtype=dtype, **kw)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_round_core_sends_decodes_and_checkpoints_in_float32(tmp_path, dtype):
    core = _core(tmp_path, dtype)
    core.start({"w": torch.tensor([0.0, 1.0])})
    sites = [Site("a", 1.0), Site("b", 3.0)]
    while not core.done:
        instr = core.fit_instructions()
        assert instr["transport_dtype"] == dtype
        f = core.sent_weights_file()
        assert load_weights(f)[0]["w"].dtype == getattr(torch, dtype)
        assert (f == core.global_weights_file) == (dtype == "float32")
        pending = core.aggregate([s.fit(f, instr) for s in sites])
        assert core.accept(pending)
        core.commit(pending)
    # round 1: (0,1) -> sites (0.5,1), (1.5,2) -> mean (1, 1.5); round 2: (1,1.5) -> (1,1.25), (2,2.25) -> (1.5, 1.75)
    assert core.state.weights["w"].dtype == torch.float32 and core.state.weights["w"].tolist() == [1.5, 1.75]
    assert load_weights(core.global_weights_file)[0]["w"].dtype == torch.float32
    assert core.contract()["transport_dtype"] == dtype


def test_a_resume_with_another_transport_is_refused(tmp_path):
    core = _core(tmp_path, "float16")
    core.start({"w": torch.zeros(2)})
    pending = core.aggregate([Site("a", 1.0).fit(core.sent_weights_file(), core.fit_instructions())])
    core.accept(pending)
    core.commit(pending)
    with pytest.raises(FederationStateError, match="transport_dtype: 'float16' -> 'float32'"):
        _core(tmp_path, "float32").start({"w": torch.zeros(2)})
