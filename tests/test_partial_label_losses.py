"""Unit tests for nnunetv2_fedkd.losses.partial_label on tiny hand-computed tensors (CPU, fast)."""
from __future__ import annotations

import math

import pytest
import torch
from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss, DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

from nnunetv2_fedkd.losses import (
    ExclusionLoss,
    MarginalExclusionLoss,
    MarginalLoss,
    MaskedSigmoidLoss,
    exclusion_loss,
    labels_to_onehot,
    marginal_exclusion_loss,
    marginal_loss,
    masked_sigmoid_loss,
)
from nnunetv2_fedkd.losses._common import _log_one_minus_softmax

S = 1e-5  # nnU-Net's smooth


def _nnunet_dc_ce(batch_dice: bool) -> DC_and_CE_loss:
    return DC_and_CE_loss({"batch_dice": batch_dice, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                          weight_ce=1, weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)


def _nnunet_dc_bce(batch_dice: bool) -> DC_and_BCE_loss:
    return DC_and_BCE_loss({}, {"batch_dice": batch_dice, "do_bg": True, "smooth": 1e-5, "ddp": False},
                           use_ignore_label=False, dice_class=MemoryEfficientSoftDiceLoss)


def _logits_from_probs(probs, n_vox: int) -> torch.Tensor:
    """[C] probabilities -> logits [1, C, n_vox] (same distribution at every voxel)."""
    return torch.log(torch.tensor(probs, dtype=torch.float32)).view(1, -1, 1).repeat(1, 1, n_vox)


def _random_case(shape, c, seed, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((shape[0], c, *shape[1:]), generator=g) * scale
    t = torch.randint(0, c, (shape[0], 1, *shape[1:]), generator=g).float()
    return x, t


# ----------------------------------------------------------------------------------------------------------------------
# hand-computed values
# ----------------------------------------------------------------------------------------------------------------------
def test_marginal_hand_values():
    # B=1, C=3, 2 voxels, p = [0.5, 0.3, 0.2] at both voxels, labels [0, 1], annotated {0, 1}
    # merged q = [0.5 + 0.2, 0.3] = [0.7, 0.3]
    # CE   = (-ln 0.7 - ln 0.3) / 2 = (0.3566749 + 1.2039728) / 2 = 0.7803239
    # Dice (class 1): I = 0*0.3 + 1*0.3 = 0.3, S_pred = 0.6, S_gt = 1
    #      dc = (2*0.3 + 1e-5) / (1 + 0.6 + 1e-5) = 0.3750039
    # total = CE - dc = 0.4053200
    x = _logits_from_probs([0.5, 0.3, 0.2], 2)
    t = torch.tensor([[[0.0, 1.0]]])
    a = torch.tensor([[True, True, False]])
    assert marginal_loss(x, t, a, weight_dice=0).item() == pytest.approx(0.7803239, abs=1e-6)
    assert marginal_loss(x, t, a, weight_ce=0).item() == pytest.approx(-0.3750039, abs=1e-6)
    assert marginal_loss(x, t, a).item() == pytest.approx(0.4053200, abs=1e-6)
    assert marginal_loss(x, t, a, batch_dice=True).item() == pytest.approx(0.4053200, abs=1e-6)  # B=1: same
    # long target, [B, *spatial] target and the module give the same
    assert marginal_loss(x, t.long()[:, 0], a).item() == pytest.approx(0.4053200, abs=1e-6)
    assert MarginalLoss()(x, t, a).item() == pytest.approx(0.4053200, abs=1e-6)
    # column 0 given as False is forced to True (background is always annotated)
    assert marginal_loss(x, t, torch.tensor([[False, True, False]])).item() == pytest.approx(0.4053200, abs=1e-6)


def test_exclusion_hand_values():
    x = _logits_from_probs([0.5, 0.3, 0.2], 2)
    # (a) labels [0, 1], annotated {0, 1}: only the unannotated class 2 gets a term, E_2 = {voxel 1}
    #     l_2 = (2*0.2 + 1e-5) / (Σp_2 = 0.4 + |E| = 1 + 1e-5) + (-ln(1 - 0.2)) = 0.2857194 + 0.2231436 = 0.5088629
    t = torch.tensor([[[0.0, 1.0]]])
    a = torch.tensor([[True, True, False]])
    assert exclusion_loss(x, t, a).item() == pytest.approx(0.5088629, abs=1e-6)
    assert exclusion_loss(x, t, a, log_weight=0).item() == pytest.approx(0.2857194, abs=1e-6)
    # (b) labels [1, 2], everything annotated: no class is unannotated, so there is no exclusion term (Shi et al.
    #     define it for the unlabelled organs only; the marginal loss already supervises classes 1 and 2).
    #     [Before the fix this case gave 0.6202709: the mean of l_1 = 0.7316789 and l_2 = 0.5088629.]
    t = torch.tensor([[[1.0, 2.0]]])
    a = torch.ones(1, 3, dtype=torch.bool)
    assert exclusion_loss(x, t, a).item() == 0.0
    assert ExclusionLoss()(x, t, a).item() == 0.0
    # combined: marginal (everything annotated; q = p): CE = (-ln 0.3 - ln 0.2)/2 = (1.2039728 + 1.6094379)/2
    #   = 1.4067054; dice_1 = (0.6+s)/(1.6+s) = 0.3750039, dice_2 = (0.4+s)/(1.4+s) = 0.2857194, mean 0.3303616
    #   marginal = 1.4067054 - 0.3303616 = 1.0763437; + 0.5 * 0 (no unannotated class)
    assert marginal_exclusion_loss(x, t, a, exclusion_weight=0.5).item() == pytest.approx(1.0763437, abs=1e-6)
    mod = MarginalExclusionLoss(exclusion_weight=0.5)
    assert mod(x, t, a).item() == pytest.approx(1.0763437, abs=1e-6)
    assert MarginalExclusionLoss(exclusion_weight=0.5, exclusion=False)(x, t, a).item() == \
        pytest.approx(1.0763437, abs=1e-6)
    # (c) labels [0, 1], class 2 annotated (absent from this patch): both foreground classes are annotated -> 0
    assert exclusion_loss(x, torch.tensor([[[0.0, 1.0]]]), torch.ones(1, 3, dtype=torch.bool)).item() == 0.0


def test_exclusion_counts_only_unannotated_classes():
    # C = 4, 3 voxels, p = [0.4, 0.3, 0.2, 0.1] everywhere, labels [1, 2, 0]; the case annotates organs 1 and 2,
    # not organ 3. Only k = 3 gets a term, with E_3 = {voxel 0, voxel 1} (all labelled foreground):
    #   dice_3 = (2 * (0.1 + 0.1) + 1e-5) / (Σp_3 = 0.3 + |E_3| = 2 + 1e-5) = 0.1739166
    #   ce_3   = -ln(1 - 0.1) = 0.1053605                                 -> loss = 0.2792772
    # The old code also scored the annotated organs (k = 1: E = {voxel 1}, 0.3157907 + 0.3566749; k = 2:
    # E = {voxel 0}, 0.2500016 + 0.2231436) and gave the mean of three terms, 0.4749645.
    x = _logits_from_probs([0.4, 0.3, 0.2, 0.1], 3)
    t = torch.tensor([[[1.0, 2.0, 0.0]]])
    a = torch.tensor([[True, True, True, False]])
    assert exclusion_loss(x, t, a).item() == pytest.approx(0.2792772, abs=1e-6)
    assert exclusion_loss(x, t, a, log_weight=0).item() == pytest.approx(0.1739166, abs=1e-6)
    # with organ 3 annotated too there is nothing left to exclude
    assert exclusion_loss(x, t, torch.ones(1, 4, dtype=torch.bool)).item() == 0.0
    # the same case in a batch with a sample that annotates only organ 3 (labels [3, 3, 0]): E_1 = E_2 = {0, 1}
    #   dice_1 = (2*0.6 + s)/(0.9 + 2 + s) = 0.4137951, ce_1 = -ln 0.7 = 0.3566749 -> 0.7704701
    #   dice_2 = (2*0.4 + s)/(0.6 + 2 + s) = 0.3076950, ce_2 = -ln 0.8 = 0.2231436 -> 0.5308385
    #   mean over the three (b, k) terms = (0.2792772 + 0.7704701 + 0.5308385) / 3 = 0.5268619
    x2 = x.repeat(2, 1, 1)
    t2 = torch.tensor([[[1.0, 2.0, 0.0]], [[3.0, 3.0, 0.0]]])
    a2 = torch.tensor([[True, True, True, False], [True, False, False, True]])
    assert exclusion_loss(x2, t2, a2).item() == pytest.approx(0.5268619, abs=1e-6)


def test_masked_sigmoid_hand_values():
    # B=1, K=2 organ channels, 2 voxels; channel 0 logit 0 (sigma = 0.5), channel 1 logit ln 3 (sigma = 0.75)
    # labels [1, 2] -> region 0 = [1, 0], region 1 = [0, 1]
    x = torch.tensor([[[0.0, 0.0], [math.log(3.0)] * 2]])
    t = torch.tensor([[[1.0, 2.0]]])
    # (a) only channel 0 annotated: BCE = (-ln .5 - ln .5)/2 = 0.6931472
    #     dice_0 = (2*0.5 + 1e-5) / (1 + 1 + 1e-5) = 0.5000025 ; total = 0.1931447
    a = torch.tensor([[True, False]])
    assert masked_sigmoid_loss(x, t, a).item() == pytest.approx(0.1931447, abs=1e-6)
    assert masked_sigmoid_loss(x, t, a, weight_dice=0).item() == pytest.approx(0.6931472, abs=1e-6)
    # (b) both annotated: BCE = (2 ln 2 - ln 0.25 - ln 0.75)/4 = (1.3862944 + 1.3862944 + 0.2876821)/4 = 0.7650677
    #     dice_1 = (2*0.75 + 1e-5)/(1 + 1.5 + 1e-5) = 0.6000016 ; mean dice = 0.5500020 ; total = 0.2150656
    a = torch.ones(1, 2, dtype=torch.bool)
    assert masked_sigmoid_loss(x, t, a).item() == pytest.approx(0.2150656, abs=1e-6)
    assert MaskedSigmoidLoss()(x, t, a).item() == pytest.approx(0.2150656, abs=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# reduction to nnU-Net when everything is annotated
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch_dice", [False, True])
@pytest.mark.parametrize("shape", [(2, 5, 6, 7), (3, 8, 9)])
def test_marginal_equals_nnunet_dc_ce_when_fully_annotated(batch_dice, shape):
    c = 4
    x, t = _random_case(shape, c, seed=1)
    a = torch.ones(shape[0], c, dtype=torch.bool)
    ref = _nnunet_dc_ce(batch_dice)(x, t)
    ours = marginal_loss(x, t, a, batch_dice=batch_dice)
    assert ours.item() == pytest.approx(ref.item(), abs=1e-5)
    # gradients agree too
    xa = x.clone().requires_grad_()
    xb = x.clone().requires_grad_()
    _nnunet_dc_ce(batch_dice)(xa, t).backward()
    marginal_loss(xb, t, a, batch_dice=batch_dice).backward()
    torch.testing.assert_close(xb.grad, xa.grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("batch_dice", [False, True])
@pytest.mark.parametrize("shape", [(2, 5, 6, 7), (3, 8, 9)])
def test_masked_sigmoid_equals_nnunet_dc_bce_when_fully_annotated(batch_dice, shape):
    k = 3
    x, t = _random_case(shape, k + 1, seed=2)
    x = x[:, :k].contiguous()
    regions = labels_to_onehot(t, k + 1)[:, 1:]  # region k = (target == k + 1)
    a = torch.ones(shape[0], k, dtype=torch.bool)
    ref = _nnunet_dc_bce(batch_dice)(x, regions)
    ours = masked_sigmoid_loss(x, t, a, batch_dice=batch_dice)
    assert ours.item() == pytest.approx(ref.item(), abs=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# mixed batches / partial-label semantics
# ----------------------------------------------------------------------------------------------------------------------
def _merged_logits(x: torch.Tensor, annotated_row: torch.Tensor) -> torch.Tensor:
    """Reference: logits of the merged distribution q for ONE sample, [1, C, ...] -> [1, |L|, ...]."""
    keep = [c for c in range(1, x.shape[1]) if annotated_row[c]]
    merge = [0] + [c for c in range(1, x.shape[1]) if not annotated_row[c]]
    z0 = torch.logsumexp(x[:, merge], 1, keepdim=True)
    return torch.cat([z0, x[:, keep]], 1), keep


def _relabel(t: torch.Tensor, keep) -> torch.Tensor:
    out = torch.zeros_like(t)
    for i, c in enumerate(keep):
        out[t == c] = i + 1
    return out


@pytest.mark.parametrize("batch_dice", [False, True])
def test_marginal_mixed_sites(batch_dice):
    # sample 0 annotates {1}, sample 1 annotates {2}; labels of the other organ are 0 in each sample (contract)
    c = 3
    x, t = _random_case((2, 6, 5, 4), c, seed=3)
    t[0][t[0] == 2] = 0
    t[1][t[1] == 1] = 0
    a = torch.tensor([[True, True, False], [True, False, True]])
    ours = marginal_loss(x, t, a, batch_dice=batch_dice)
    # reference: nnU-Net's DC+CE on the merged logits of each sample, averaged (equal voxel counts; one annotated
    # foreground class per sample, and with batch_dice each class comes from exactly one sample)
    per_sample = []
    for b in range(2):
        z, keep = _merged_logits(x[b:b + 1], a[b])
        per_sample.append(_nnunet_dc_ce(batch_dice)(z, _relabel(t[b:b + 1], keep)))
    ref = (per_sample[0] + per_sample[1]) / 2
    assert ours.item() == pytest.approx(ref.item(), abs=1e-5)
    # and it is not the naive (fully supervised) loss
    naive = _nnunet_dc_ce(batch_dice)(x, t)
    assert abs(ours.item() - naive.item()) > 1e-2
    # per-sample composition: the CE part is the voxel mean, the Dice part the mean over annotated pairs
    ce_b = [marginal_loss(x[b:b + 1], t[b:b + 1], a[b:b + 1], weight_dice=0) for b in range(2)]
    assert marginal_loss(x, t, a, weight_dice=0).item() == pytest.approx((ce_b[0] + ce_b[1]).item() / 2, abs=1e-6)


def test_marginal_mixed_sites_general_reference():
    """Random 3D batch, C=5, arbitrary annotated sets: CE == mean of merged-logit CE; Dice == mean over pairs."""
    c = 5
    x, t = _random_case((3, 4, 5, 6), c, seed=4)
    a = torch.tensor([[True, True, False, True, False],
                      [True, False, True, True, True],
                      [True, False, False, False, True]])
    for b in range(3):  # contract: unannotated organs are labelled 0
        for k in range(1, c):
            if not a[b, k]:
                t[b][t[b] == k] = 0
    ce_ref, dices = 0.0, []
    for b in range(3):
        z, keep = _merged_logits(x[b:b + 1], a[b])
        tb = _relabel(t[b:b + 1], keep)
        ce_ref += torch.nn.functional.cross_entropy(z, tb[:, 0].long()).item() / 3
        q = torch.softmax(z, 1)
        for i in range(1, z.shape[1]):
            g = (tb[:, 0] == i).float()
            dices.append(((2 * (q[:, i] * g).sum() + S) / (g.sum() + q[:, i].sum() + S)).item())
    ref = ce_ref - sum(dices) / len(dices)
    assert marginal_loss(x, t, a).item() == pytest.approx(ref, abs=1e-5)


def test_marginal_ignores_unannotated_organ_on_background():
    # sample annotates {0, 1}; moving probability from background to the unannotated class 2 at background
    # voxels (p_1 fixed) leaves the marginal loss unchanged, while the naive CE/DC+CE changes
    t = torch.tensor([[[0.0, 0.0, 1.0]]])
    a = torch.tensor([[True, True, False]])
    probs_1 = torch.tensor([[0.6, 0.6, 0.2], [0.3, 0.3, 0.7], [0.1, 0.1, 0.1]])  # [C, voxels]
    probs_2 = torch.tensor([[0.1, 0.3, 0.2], [0.3, 0.3, 0.7], [0.6, 0.4, 0.1]])
    x1, x2 = torch.log(probs_1)[None], torch.log(probs_2)[None]
    for bd in (False, True):
        assert marginal_loss(x1, t, a, batch_dice=bd).item() == \
            pytest.approx(marginal_loss(x2, t, a, batch_dice=bd).item(), abs=1e-6)
    naive_ce = torch.nn.functional.cross_entropy
    assert abs(naive_ce(x1, t[:, 0].long()).item() - naive_ce(x2, t[:, 0].long()).item()) > 0.1
    assert abs(_nnunet_dc_ce(False)(x1, t).item() - _nnunet_dc_ce(False)(x2, t).item()) > 0.1
    # ... and on a voxel labelled as the annotated organ, stealing mass for class 2 IS penalised
    probs_3 = torch.tensor([[0.6, 0.6, 0.0], [0.3, 0.3, 0.3], [0.1, 0.1, 0.7]]).clamp_min(1e-6)
    assert marginal_loss(torch.log(probs_3)[None], t, a).item() > marginal_loss(x1, t, a).item() + 0.1


def test_label_of_unannotated_class_is_background():
    # contract violation (label 2 present although class 2 is not annotated) behaves like label 0
    c = 3
    x, t = _random_case((2, 5, 5), c, seed=5)
    a = torch.tensor([[True, True, False], [True, True, False]])
    t0 = t.clone()
    t0[t0 == 2] = 0
    torch.testing.assert_close(marginal_loss(x, t, a), marginal_loss(x, t0, a))
    torch.testing.assert_close(exclusion_loss(x, t, a), exclusion_loss(x, t0, a))


# ----------------------------------------------------------------------------------------------------------------------
# exclusion loss
# ----------------------------------------------------------------------------------------------------------------------
def _exclusion_reference(x, t, a, smooth=S, log_weight=1.0):
    """Straight loop over (b, k) in float64 with the direct logsumexp over j != k."""
    x = x.double()
    p = torch.softmax(x, 1)
    lse = torch.logsumexp(x, 1)
    vals = []
    for b in range(x.shape[0]):
        lab = t[b, 0].long()
        for k in range(1, x.shape[1]):
            if a[b, k]:  # annotated classes get no exclusion term (Shi et al. 2021: unlabelled organs only)
                continue
            e = torch.zeros_like(lab, dtype=torch.float64)
            for c in range(1, x.shape[1]):
                if c != k and a[b, c]:
                    e[lab == c] = 1
            if e.sum() == 0:
                continue
            others = [j for j in range(x.shape[1]) if j != k]
            log1m = torch.logsumexp(x[b, others], 0) - lse[b]
            dice = (2 * (p[b, k] * e).sum() + smooth) / (p[b, k].sum() + e.sum() + smooth)
            vals.append(dice + log_weight * (-(log1m * e).sum() / e.sum()))
    return sum(vals) / len(vals) if vals else torch.tensor(0.0)


@pytest.mark.parametrize("shape", [(3, 4, 5, 6), (2, 7, 6)])
def test_exclusion_matches_reference(shape):
    c = 5
    x, t = _random_case(shape, c, seed=6, scale=4.0)
    a = torch.ones(shape[0], c, dtype=torch.bool)
    a[0, 2] = a[0, 4] = False
    a[-1, 1] = False
    for b in range(shape[0]):
        for k in range(1, c):
            if not a[b, k]:
                t[b][t[b] == k] = 0
    for lw in (1.0, 0.3):
        ref = _exclusion_reference(x, t, a, log_weight=lw)
        assert exclusion_loss(x, t, a, log_weight=lw).item() == pytest.approx(ref.item(), abs=1e-5)


def test_exclusion_small_when_exclusive_large_when_not():
    # sample 0 annotates {1}, sample 1 annotates {2}; C = 3
    t = torch.tensor([[[0.0, 1.0, 1.0, 0.0]], [[2.0, 2.0, 0.0, 0.0]]])
    a = torch.tensor([[True, True, False], [True, False, True]])
    onehot = labels_to_onehot(t, 3)
    good = (onehot * 20.0 - 10.0)  # the labelled organ dominates; other organs ~ e^-20
    loss_good = exclusion_loss(good, t, a)
    assert loss_good.item() < 1e-4
    bad = good.clone()
    bad[0, 2, 1:3] = 10.0  # class 2 (unannotated in sample 0) predicted on sample 0's organ-1 voxels
    bad[0, 1, 1:3] = 0.0
    loss_bad = exclusion_loss(bad, t, a)
    assert loss_bad.item() > 1.0
    # the marginal loss alone cannot see this error at background-merged voxels only if the label was 0; here the
    # voxels are labelled 1, so it also rises; the exclusion term adds on top
    assert marginal_exclusion_loss(bad, t, a).item() > marginal_loss(bad, t, a).item() + 1.0


def test_exclusion_masks_select_intended_regions():
    c = 4
    x, t = _random_case((2, 6, 6), c, seed=7)
    a = torch.tensor([[True, True, True, False], [True, False, True, True]])
    for b in range(2):
        for k in range(1, c):
            if not a[b, k]:
                t[b][t[b] == k] = 0

    def log_term(z):
        return exclusion_loss(z, t, a, log_weight=1.0) - exclusion_loss(z, t, a, log_weight=0.0)

    # perturb logits at background voxels (outside every E_{b,k}): the CE-like term does not change
    outside = (t == 0).expand_as(x)
    x2 = x + torch.where(outside, torch.randn_like(x) * 3, torch.zeros_like(x))
    assert log_term(x2).item() == pytest.approx(log_term(x).item(), abs=1e-6)
    # ... but perturbing inside does
    x3 = x + torch.where(~outside, torch.randn_like(x) * 3, torch.zeros_like(x))
    assert abs(log_term(x3).item() - log_term(x).item()) > 1e-3
    # gradient of the CE-like term is non-zero only on labelled (annotated foreground) voxels
    xg = x.clone().requires_grad_()
    log_term(xg).backward()
    # (the two Dice parts cancel only up to float rounding, hence the tolerance)
    assert xg.grad[outside].abs().max() < 1e-6 * xg.grad[~outside].abs().max()
    assert xg.grad[~outside].abs().sum() > 0
    # the Dice-overlap intersection only looks at E: with p_k ~ 0 on E and p_k arbitrary elsewhere, the
    # overlap term is ~ 0
    onehot = labels_to_onehot(t, c)
    z = torch.where(onehot.bool() | outside, torch.zeros_like(x), torch.full_like(x, -30.0))
    z = z + torch.where(outside, torch.randn_like(x) * 3, torch.zeros_like(x))
    assert exclusion_loss(z, t, a).item() < 1e-4


def test_log_one_minus_softmax_stable():
    x = torch.tensor([[50.0, -50.0, 0.0, 49.0], [3.0, 3.0, 3.0, 3.0], [-50.0, 50.0, 50.0, -50.0]]).T[None]  # [1,4,3]
    ours = _log_one_minus_softmax(x)
    xd = x.double()
    lse = torch.logsumexp(xd, 1)
    ref = torch.stack([torch.logsumexp(xd[:, [j for j in range(4) if j != k]], 1) - lse for k in range(4)], 1)
    torch.testing.assert_close(ours.double(), ref, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# degenerate inputs, dtypes, gradients
# ----------------------------------------------------------------------------------------------------------------------
ALL_LOSSES = [
    ("marginal", lambda x, t, a, bd: marginal_loss(x, t, a, batch_dice=bd)),
    ("exclusion", lambda x, t, a, bd: exclusion_loss(x, t, a)),
    ("marginal_exclusion", lambda x, t, a, bd: marginal_exclusion_loss(x, t, a, batch_dice=bd)),
    ("sigmoid", lambda x, t, a, bd: masked_sigmoid_loss(x[:, 1:], t, a[:, 1:], batch_dice=bd)),
]


@pytest.mark.parametrize("name,fn", ALL_LOSSES)
@pytest.mark.parametrize("batch_dice", [False, True])
def test_all_background_batch(name, fn, batch_dice):
    c = 4
    x = torch.randn(2, c, 3, 4, 5, requires_grad=True)
    t = torch.zeros(2, 1, 3, 4, 5)
    a = torch.tensor([[True, True, False, True], [True, False, True, False]])
    loss = fn(x, t, a, batch_dice)
    assert torch.isfinite(loss)
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_empty_terms_are_graph_connected_zeros():
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    t = torch.zeros(2, 1, 4, 4)
    a = torch.ones(2, 3, dtype=torch.bool)
    ex = exclusion_loss(x, t, a)
    assert ex.item() == 0.0 and ex.requires_grad
    ex.backward()
    assert torch.all(x.grad == 0)
    s = masked_sigmoid_loss(x, t, torch.zeros(2, 3, dtype=torch.bool))
    assert s.item() == 0.0 and s.requires_grad
    m = marginal_loss(x, t, torch.tensor([[True, False, False]] * 2), weight_ce=0)  # no annotated foreground
    assert m.item() == 0.0 and m.requires_grad


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name,fn", ALL_LOSSES)
def test_low_precision_and_extreme_logits(dtype, name, fn):
    c = 4
    g = torch.Generator().manual_seed(8)
    t = torch.randint(0, c, (2, 1, 4, 5, 3), generator=g).float()
    a = torch.tensor([[True, True, False, True], [True, False, True, True]])
    base = torch.randn(2, c, 4, 5, 3, generator=g)
    for raw in (base, base.sign() * 50.0, base * 50.0):  # plain, +-50 with ties, wide spread
        x = raw.to(dtype).requires_grad_()
        for bd in (False, True):
            x.grad = None
            loss = fn(x, t, a, bd)
            assert loss.dtype == torch.float32
            assert torch.isfinite(loss), (name, dtype)
            loss.backward()
            assert x.grad.dtype == dtype
            assert torch.isfinite(x.grad.float()).all(), (name, dtype)


@pytest.mark.parametrize("name,fn", ALL_LOSSES)
def test_under_autocast_computes_in_float32(name, fn):
    # nnU-Net runs the loss inside torch.autocast; the result must be the float32 value of the (rounded) logits
    c = 4
    g = torch.Generator().manual_seed(12)
    x = (torch.randn(2, c, 4, 4, 4, generator=g) * 3).to(torch.bfloat16)
    t = torch.randint(0, c, (2, 1, 4, 4, 4), generator=g).float()
    a = torch.tensor([[True, True, False, True], [True, False, True, True]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp = fn(x, t, a, False)
    ref = fn(x.float(), t, a, False)
    assert amp.dtype == torch.float32
    assert amp.item() == pytest.approx(ref.item(), abs=1e-5)


@pytest.mark.parametrize("batch_dice", [False, True])
def test_sigmoid_unannotated_channels_get_zero_grad(batch_dice):
    k = 3
    g = torch.Generator().manual_seed(9)
    x = torch.randn(3, k, 4, 5, 6, generator=g, requires_grad=True)
    t = torch.randint(0, k + 1, (3, 1, 4, 5, 6), generator=g).float()
    a = torch.tensor([[True, False, True], [False, True, False], [False, False, True]])
    masked_sigmoid_loss(x, t, a, batch_dice=batch_dice).backward()
    for b in range(3):
        for ch in range(k):
            if a[b, ch]:
                assert x.grad[b, ch].abs().sum() > 0
            else:
                assert torch.all(x.grad[b, ch] == 0)
    # and the value does not depend on unannotated channels at all
    x2 = x.detach().clone()
    x2[~a] = torch.randn_like(x2[~a]) * 10
    assert masked_sigmoid_loss(x2, t, a, batch_dice=batch_dice).item() == \
        pytest.approx(masked_sigmoid_loss(x.detach(), t, a, batch_dice=batch_dice).item(), abs=1e-6)


def test_sigmoid_mixed_batch_is_mean_over_pairs():
    # BCE is the mean over annotated (b, k) pairs and voxels; Dice the mean over annotated pairs
    k = 2
    g = torch.Generator().manual_seed(10)
    x = torch.randn(2, k, 5, 5, generator=g)
    t = torch.randint(0, k + 1, (2, 1, 5, 5), generator=g).float()
    a = torch.tensor([[True, False], [True, True]])
    pairs = [(0, 0), (1, 0), (1, 1)]
    bce, dc = 0.0, 0.0
    for b, ch in pairs:
        y = (t[b, 0] == ch + 1).float()
        s = torch.sigmoid(x[b, ch])
        bce += torch.nn.functional.binary_cross_entropy_with_logits(x[b, ch], y).item() / 3
        dc += ((2 * (s * y).sum() + S) / (y.sum() + s.sum() + S)).item() / 3
    assert masked_sigmoid_loss(x, t, a).item() == pytest.approx(bce - dc, abs=1e-6)


def test_deep_supervision_wrapper():
    # nnU-Net's wrapper zips every argument: pass the annotated table once per scale
    c = 3
    x, t = _random_case((2, 8, 8), c, seed=11)
    xs = [x, x[:, :, ::2, ::2]]
    ts = [t, t[:, :, ::2, ::2]]  # nearest downsampling
    a = torch.tensor([[True, True, False], [True, False, True]])
    w = DeepSupervisionWrapper(MarginalExclusionLoss(), weight_factors=[0.6, 0.4])
    expected = 0.6 * marginal_exclusion_loss(xs[0], ts[0], a) + 0.4 * marginal_exclusion_loss(xs[1], ts[1], a)
    assert w(xs, ts, [a] * 2).item() == pytest.approx(expected.item(), abs=1e-6)


def test_shape_errors():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError):
        marginal_loss(x, torch.zeros(2, 3, 4, 4), torch.ones(2, 3, dtype=torch.bool))  # one-hot target
    with pytest.raises(ValueError):
        marginal_loss(x, torch.zeros(2, 1, 4, 4), torch.ones(2, 2, dtype=torch.bool))  # wrong annotated
    with pytest.raises(ValueError):
        marginal_loss(x, torch.full((2, 1, 4, 4), 3.0), torch.ones(2, 3, dtype=torch.bool))  # label out of range
    with pytest.raises(ValueError):
        masked_sigmoid_loss(x, torch.full((2, 1, 4, 4), 4.0), torch.ones(2, 3, dtype=torch.bool))


def test_masked_sigmoid_accepts_nnunet_region_onehot_target():
    """nnU-Net's transforms hand region training a [B, K, ...] one-hot target; same value as the label map form."""
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 5, 6)
    label_map = torch.randint(0, 4, (2, 1, 4, 5, 6)).float()
    regions = torch.cat([(label_map == k + 1).float() for k in range(3)], dim=1)
    annotated = torch.tensor([[True, False, True], [False, True, False]])
    for bd in (False, True):
        a = masked_sigmoid_loss(logits, label_map, annotated, batch_dice=bd)
        b = masked_sigmoid_loss(logits, regions, annotated, batch_dice=bd)
        assert torch.allclose(a, b, atol=1e-6)


def test_a_case_annotating_no_organ_adds_no_label_loss():
    """An unlabelled training case (``fedkd.case_annotated`` [], e.g. ``convert --unlabelled-as-training``): every
    class merges into one, so the marginal, marginal+exclusion and masked-sigmoid losses give it neither loss nor
    gradient, and a batch with a labelled case keeps that case's loss unchanged in the CE part (voxel mean over the
    batch: halved with a second, silent case)."""
    c = 3
    x, t = _random_case((2, 6, 5, 4), c, seed=7)
    t[1] = 0  # the unlabelled case's label map is all background
    a = torch.tensor([[True, True, True], [True, False, False]])
    for loss in (marginal_loss, marginal_exclusion_loss):
        xs = x[1:2].clone().requires_grad_(True)
        out = loss(xs, t[1:2], a[1:2])
        out.backward()
        assert out.item() == pytest.approx(0.0, abs=1e-6) and float(xs.grad.abs().max()) < 1e-6, loss.__name__
    ce_labelled = marginal_loss(x[0:1], t[0:1], a[0:1], weight_dice=0)
    assert marginal_loss(x, t, a, weight_dice=0).item() == pytest.approx(ce_labelled.item() / 2, abs=1e-6)
    xs = x[1:2, 1:].clone().requires_grad_(True)  # sigmoid heads: one per organ, none annotated
    out = masked_sigmoid_loss(xs, torch.zeros_like(xs), a[1:2, 1:])
    out.backward()
    assert out.item() == pytest.approx(0.0, abs=1e-6) and float(xs.grad.abs().max()) < 1e-6
