"""FedKD's schedule over a federation: no KD from round 0's untrained global model, and a KD ramp that counts
federation epochs (round * local epochs + local epoch), applied to the global-model term too. Fast: the pure
functions, and the real ``_FedKDMixin`` methods on a lightweight stand-in (no nnU-Net trainer, no data)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from nnunetv2_fedkd.losses.response_kd import partial_kd_softmax
from nnunetv2_fedkd.trainers.fedkd import (
    FederationError,
    _FedKDMixin,
    federation_epoch,
    global_kd_weight_for_round,
    kd_ramp,
    nnUNetTrainerFedKD,
    nnUNetTrainerFedKDMultiHead,
    nnUNetTrainerFedNaive,
)


# ----------------------------------------------------------------------------------------------------------------------
# pure functions
# ----------------------------------------------------------------------------------------------------------------------
def test_federation_epoch():
    assert federation_epoch(0, 0, 1) == 0
    assert federation_epoch(3, 0, 1) == 3  # one local epoch per round: the round index
    assert federation_epoch(2, 4, 5) == 14
    with pytest.raises(ValueError):
        federation_epoch(-1, 0, 1)
    with pytest.raises(ValueError):
        federation_epoch(0, 0, 0)
    with pytest.raises(TypeError):
        federation_epoch(1.0, 0, 1)


def test_kd_ramp():
    assert kd_ramp(0, 0) == 1.0 and kd_ramp(5, -1) == 1.0  # no ramp
    assert kd_ramp(0, 4) == 0.25
    assert kd_ramp(2, 4) == 0.75
    assert kd_ramp(3, 4) == 1.0 and kd_ramp(100, 4) == 1.0


def test_global_kd_weight_is_zero_in_round_index_0():
    assert global_kd_weight_for_round(1.5, 0) == 0.0  # default start round 1: round 0's global model is untrained
    assert global_kd_weight_for_round(1.5, 1) == 1.5
    assert global_kd_weight_for_round(1.5, 0, start_round=0) == 1.5  # explicitly asked for
    assert global_kd_weight_for_round(1.5, 2, start_round=3) == 0.0
    assert global_kd_weight_for_round(1.5, 3, start_round=3) == 1.5
    for bad in (-1, 1.0, True, "1"):
        with pytest.raises(ValueError, match="global_kd_start_round"):
            global_kd_weight_for_round(1.0, 1, bad)


def test_setting_is_known_with_default_0():
    for cls in (nnUNetTrainerFedKD, nnUNetTrainerFedKDMultiHead, nnUNetTrainerFedNaive):
        assert cls.config_defaults["global_kd_start_round"] == 0


# ----------------------------------------------------------------------------------------------------------------------
# the mixin's behaviour on a stand-in
# ----------------------------------------------------------------------------------------------------------------------
def test_mixin_ramp_counts_federation_epochs():
    # one local epoch per round, ramp over 4 epochs: round index 3's only epoch is federation epoch 3 -> full weight.
    # Counting the local epoch (which restarts at 0 every round, the old behaviour) gives 1/4 in every round.
    fake = SimpleNamespace(fedkd_config={"round": 3, "kd_rampup_epochs": 4}, current_epoch=0, num_epochs=1)
    assert _FedKDMixin._ramp(fake) == 1.0
    fake.fedkd_config["round"] = 1
    assert _FedKDMixin._ramp(fake) == 0.5
    # 3 local epochs per round: round 1, local epoch 0 is federation epoch 3 of a ramp over 8
    fake = SimpleNamespace(fedkd_config={"round": 1, "kd_rampup_epochs": 8}, current_epoch=0, num_epochs=3)
    assert _FedKDMixin._ramp(fake) == 0.5
    # the FedKD trainers use it (the teacher terms of _MSKDMixin call self._ramp())
    assert "_ramp" in _FedKDMixin.__dict__
    for cls in (nnUNetTrainerFedKD, nnUNetTrainerFedKDMultiHead, nnUNetTrainerFedNaive):
        assert cls._ramp is _FedKDMixin._ramp


class _CountingNet(nn.Module):
    """A fixed 'global model': logits independent of the input; counts its calls."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits, self.calls = logits, 0

    def forward(self, x):
        self.calls += 1
        return [self.logits.clone(), self.logits[..., ::2].clone()]  # deep-supervision list, full res first


class _FakeSite(_FedKDMixin):
    """Just what ``_FedKDMixin._kd_terms`` reads; no nnU-Net trainer behind it."""

    def __init__(self, round_idx: int, rampup: int = 0, current_epoch: int = 0, num_epochs: int = 1,
                 start_round: int = 1, weight: float = 2.0):
        self.fedkd_config = {**_FedKDMixin.config_extra, "round": round_idx, "kd_rampup_epochs": rampup,
                             "global_kd_start_round": start_round, "global_kd_weight": weight,
                             "global_kd_temperature": 1.0}
        self.fedkd_config_file = "fake_fedkd_trainer.json"
        self.current_epoch, self.num_epochs = current_epoch, num_epochs
        self.teacher_specs = []
        self.device = torch.device("cpu")
        self.is_ddp = False
        self.network = nn.Identity()
        self.label_manager = SimpleNamespace(has_regions=False)
        # background + organ 1 annotated, organ 2 not: the global model speaks on class 2
        self.label_availability = SimpleNamespace(
            softmax_mask=lambda keys: torch.tensor([[True, True, False]] * len(keys)))
        g = torch.Generator().manual_seed(0)
        self._global_net = _CountingNet(torch.randn(2, 3, 8, generator=g) * 2)
        self._global_weights_dev = None
        self._local_keys = frozenset()


def _terms_value(site: _FakeSite, student: torch.Tensor) -> float:
    batch = {"data": torch.zeros(2, 1, 8), "keys": ["a", "b"]}
    return float(site._kd_terms(batch)([student, student[..., ::2]]))


def test_no_global_kd_in_round_index_0():
    student = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(1))
    site0 = _FakeSite(round_idx=0)
    assert _terms_value(site0, student) == 0.0
    assert site0._global_net.calls == 0  # the untrained global model is not even run
    site1 = _FakeSite(round_idx=1)
    v1 = _terms_value(site1, student)
    assert site1._global_net.calls == 1
    annotated = torch.tensor([[True, True, False]] * 2)
    expected = 2.0 * float(partial_kd_softmax(student, site1._global_net.logits, annotated, 1.0))
    assert expected > 0 and v1 == pytest.approx(expected, rel=1e-6)
    # global_kd_start_round 0 restores KD from the initial network, when someone asks for it
    assert _terms_value(_FakeSite(round_idx=0, start_round=0), student) == pytest.approx(expected, rel=1e-6)


def test_ramp_scales_the_global_kd_term():
    student = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(2))
    full = _terms_value(_FakeSite(round_idx=1), student)
    # ramp over 4 federation epochs, one local epoch per round: round index 1 is federation epoch 1 -> 2/4
    half = _terms_value(_FakeSite(round_idx=1, rampup=4), student)
    assert full > 0 and half == pytest.approx(0.5 * full, rel=1e-6)
    assert _terms_value(_FakeSite(round_idx=3, rampup=4), student) == pytest.approx(full, rel=1e-6)


@pytest.mark.parametrize("bad", [-1, 0.5, True, "1"])
def test_bad_global_kd_start_round_is_refused_naming_the_file(bad):
    site = _FakeSite(round_idx=1)
    site.fedkd_config["global_kd_start_round"] = bad
    with pytest.raises(FederationError, match="global_kd_start_round.*fake_fedkd_trainer.json"):
        site._check_settings()


def test_federated_rounds_do_not_compile_unless_asked(monkeypatch):
    """Issue 17, item 7: a site rebuilds its trainer every round; nnU-Net's default torch.compile on a GPU would
    compile again every round, so a federated round does not compile unless nnUNet_compile says so."""
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunetv2_fedkd.trainers.fedkd import nnUNetTrainerFedKD

    log = []
    monkeypatch.setattr(nnUNetTrainer, "_do_i_compile", lambda self: "nnU-Net decides")
    t = nnUNetTrainerFedKD.__new__(nnUNetTrainerFedKD)  # no nnU-Net set-up: only what the decision reads
    t.fedkd_config, t.device = {"global_model": "/run/sent_global.fedkd"}, torch.device("cuda")
    t.print_to_log_file = lambda *a: log.append(" ".join(map(str, a)))
    monkeypatch.delenv("nnUNet_compile", raising=False)
    assert nnUNetTrainerFedKD._do_i_compile(t) is False and nnUNetTrainerFedKD._do_i_compile(t) is False
    assert len(log) == 1 and "nnUNet_compile=true" in log[0]  # said once
    monkeypatch.setenv("nnUNet_compile", "true")  # asked for: nnU-Net's own rule
    assert nnUNetTrainerFedKD._do_i_compile(t) == "nnU-Net decides"
    monkeypatch.delenv("nnUNet_compile")
    t.fedkd_config = {"global_model": None}  # not a federated round (the server's model, a single-site training)
    assert nnUNetTrainerFedKD._do_i_compile(t) == "nnU-Net decides"
