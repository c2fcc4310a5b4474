"""Unit tests for the KD losses (nnunetv2_fedkd.losses: region_kd, feature_kd, response_kd) on tiny hand-computed
tensors (CPU, fast)."""
from __future__ import annotations

import math

import pytest
import torch
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper

from nnunetv2_fedkd.losses import (
    FeatureKDLoss,
    PartialKDSigmoidLoss,
    PartialKDSoftmaxLoss,
    RegionLogitKDSigmoidLoss,
    RegionLogitKDSoftmaxLoss,
    SoftLabelKDLoss,
    binary_teacher_logit,
    feature_kd_loss,
    partial_kd_sigmoid,
    partial_kd_softmax,
    region_logit_kd_sigmoid,
    region_logit_kd_softmax,
    soft_label_kd_loss,
)

LN3, LN4 = math.log(3.0), math.log(4.0)


# ----------------------------------------------------------------------------------------------------------------------
# pure-python references (no torch)
# ----------------------------------------------------------------------------------------------------------------------
def _sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def _bkl(p, q):
    """Binary KL(p || q)."""
    out = 0.0
    if p > 0:
        out += p * math.log(p / q)
    if p < 1:
        out += (1 - p) * math.log((1 - p) / (1 - q))
    return out


def _kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def _temper(probs, t):
    """softmax(log(probs) / t) = probs^(1/t) / sum."""
    w = [pi ** (1.0 / t) for pi in probs]
    return [wi / sum(w) for wi in w]


def _logits(probs_per_voxel):
    """[[p_c at voxel i] per voxel] -> logits [1, C, n_vox] = log p."""
    return torch.log(torch.tensor(probs_per_voxel, dtype=torch.float32)).T[None].contiguous()


# ----------------------------------------------------------------------------------------------------------------------
# region_logit_kd_softmax
# ----------------------------------------------------------------------------------------------------------------------
# 3 voxels, student C = 3 (bg, organ 1, organ 2), teachers for classes [1, 2]
#   voxel 0: t = [ ln3, -ln3] -> sigma = (.75, .25): in R_1
#   voxel 1: t = [-ln3,  ln4] -> sigma = (.25, .80): in R_2
#   voxel 2: t = [-ln3, -ln4] -> sigma = (.25, .20): in R_bg, q_bg = .75 * .80 = .6
T_FG = torch.tensor([[[LN3, -LN3, -LN3], [-LN3, LN4, -LN4]]])
P_STUDENT = [[0.2, 0.5, 0.3], [0.1, 0.3, 0.6], [0.5, 0.25, 0.25]]


def test_region_softmax_hand_values():
    s = _logits(P_STUDENT)
    k1 = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)  # voxel 0: p_1 = .5
    k2 = 0.8 * math.log(0.8 / 0.6) + 0.2 * math.log(0.2 / 0.4)  # voxel 1: p_2 = .6
    bg = 0.6 * math.log(0.6 / 0.5) + 0.4 * math.log(0.4 / 0.5)  # voxel 2: p_0 = .5
    # mean over the B N = 3 voxels of the batch, organ terms summed over the teachers
    assert region_logit_kd_softmax(s, T_FG, [1, 2]).item() == pytest.approx((k1 + k2 + bg) / 3, abs=1e-6)
    assert region_logit_kd_softmax(s, T_FG, [1, 2], weight_background=0.3).item() == \
        pytest.approx((k1 + k2 + 0.3 * bg) / 3, abs=1e-6)
    assert region_logit_kd_softmax(s, T_FG, [1, 2], weight_background=0).item() == \
        pytest.approx((k1 + k2) / 3, abs=1e-6)
    assert RegionLogitKDSoftmaxLoss([1, 2], weight_background=0.3)(s, T_FG).item() == \
        pytest.approx((k1 + k2 + 0.3 * bg) / 3, abs=1e-6)
    # swapped teacher -> class assignment gives a different value
    assert abs(region_logit_kd_softmax(s, T_FG, [2, 1]).item() - (k1 + k2 + bg) / 3) > 1e-2


def test_region_softmax_temperature():
    s = _logits(P_STUDENT)
    tau = 2.0
    p = [_temper(v, tau) for v in P_STUDENT]  # softmax(log p / T)
    k1 = _bkl(_sig(LN3 / tau), p[0][1])
    k2 = _bkl(_sig(LN4 / tau), p[1][2])
    # q_bg = .75 * .8 = .6 at T = 1, then tempered as a binary distribution: logit(q) / T
    bg = _bkl(_sig(math.log(0.6 / 0.4) / tau), p[2][0])
    expected = tau ** 2 * (k1 + k2 + bg) / 3
    assert region_logit_kd_softmax(s, T_FG, [1, 2], temperature=tau).item() == pytest.approx(expected, abs=1e-6)


def test_region_softmax_sums_over_the_region_divides_by_all_voxels():
    # two voxels in R_1 with different KL: their sum over the B N = 3 voxels of the batch (not the region mean)
    t = torch.tensor([[[LN3, LN3, -LN3]]])  # one teacher, class 1; voxels 0, 1 in R_1, voxel 2 in R_bg
    probs = [[0.2, 0.5, 0.3], [0.1, 0.6, 0.3], [0.5, 0.25, 0.25]]
    k = _bkl(0.75, 0.5) + _bkl(0.75, 0.6)
    # q_bg = 1 - sigma(-ln3) = .75; no teacher covers class 2, so the student's side is p_0 + p_2 = .75 (not p_0 = .5)
    bg = _bkl(0.75, 0.75)
    assert region_logit_kd_softmax(_logits(probs), t, [1]).item() == pytest.approx((k + bg) / 3, abs=1e-6)
    # with teachers for both organs the background side is p_0 alone: voxel 2 gets a second teacher saying background
    t2 = torch.cat([t, torch.full_like(t, -50.0)], 1)  # q_bg = .75 * ~1
    assert region_logit_kd_softmax(_logits(probs), t2, [1, 2]).item() == pytest.approx((k + _bkl(0.75, 0.5)) / 3,
                                                                                        abs=1e-6)


def test_region_softmax_does_not_erase_organs_no_teacher_knows():
    # one liver teacher (class 1) sure of background; the student says kidney (class 2, no teacher) with p = .75
    t = torch.tensor([[[-20.0]]])
    s = _logits([[0.25, 1e-6, 0.75 - 1e-6]])
    assert region_logit_kd_softmax(s, t, [1]).item() < 1e-4  # "not liver" is all the teacher knows
    s_bg = _logits([[0.25, 0.75 - 1e-6, 1e-6]])  # the student says liver where the liver teacher says background
    assert region_logit_kd_softmax(s_bg, t, [1]).item() == pytest.approx(math.log(4), rel=1e-3)


def _loop_reference_softmax(s, t, classes, tau, w, active, valid):
    """float64 per-voxel loop of the documented formula: organ terms on R_k, background term on R_bg with
    q_bg = prod over the sample's active teachers of (1 - sigma(t_k)) tempered as logit(q) / T, p_rest = background +
    the classes without an active teacher in that sample; sum / (B N), times T^2."""
    b, c = s.shape[:2]
    shape = s.shape[2:]
    p = torch.softmax(s.double() / tau, 1)
    ts = torch.sigmoid(t.double() / tau)
    t1 = torch.sigmoid(t.double())
    total, n = 0.0, 0
    for bi in range(b):
        act = [k for k in range(len(classes)) if active[bi][k]]
        taught = {classes[k] for k in act}
        rest = [cc for cc in range(c) if cc not in taught]
        for idx in torch.cartesian_prod(*[torch.arange(m) for m in shape]).reshape(-1, len(shape)):
            n += 1
            vox = (bi, slice(None), *idx.tolist())
            if not bool(valid[(bi, 0, *idx.tolist())]):
                continue
            tv, t1v, pv = ts[vox].tolist(), t1[vox].tolist(), p[vox].tolist()
            fg = {k: tv[k] > 0.5 for k in act}
            for k in act:
                if fg[k]:
                    total += _bkl(tv[k], pv[classes[k]])
            if act and not any(fg.values()):
                q = math.prod(1 - t1v[k] for k in act)
                q_t = _sig(math.log(q / (1 - q)) / tau)
                total += w * _bkl(q_t, sum(pv[cc] for cc in rest))
    return tau ** 2 * total / n


def test_region_softmax_matches_loop_reference():
    g = torch.Generator().manual_seed(0)
    b, c, shape = 3, 4, (3, 4, 2)
    s = torch.randn(b, c, *shape, generator=g) * 2
    t = torch.randn(b, 2, *shape, generator=g) * 3
    classes, tau, w = [3, 1], 1.5, 0.7
    everything = torch.ones(b, 1, *shape, dtype=torch.bool)
    all_active = [[True, True]] * b
    ref = _loop_reference_softmax(s, t, classes, tau, w, all_active, everything)
    ours = region_logit_kd_softmax(s, t, classes, temperature=tau, weight_background=w)
    assert ours.item() == pytest.approx(ref, abs=1e-5)
    # per-sample active teachers (sample 1: only the teacher of class 1, so class 3 joins its rest set; sample 2: no
    # teacher) and a valid mask
    active = [[True, True], [False, True], [False, False]]
    valid = torch.rand(b, 1, *shape, generator=g) > 0.3
    ref = _loop_reference_softmax(s, t, classes, tau, w, active, valid)
    ours = region_logit_kd_softmax(s, t, classes, temperature=tau, weight_background=w, valid=valid,
                                   active=torch.tensor(active))
    assert ours.item() == pytest.approx(ref, abs=1e-5)


def test_region_softmax_zero_when_student_matches_teachers():
    # student p_{c_k} = sigma(t_k) in R_k, p_0 = q_bg on R_bg
    s = _logits([[0.15, 0.75, 0.10], [0.05, 0.15, 0.80], [0.6, 0.3, 0.1]])
    assert abs(region_logit_kd_softmax(s, T_FG, [1, 2]).item()) < 1e-6


def test_region_softmax_only_looks_at_the_region_class():
    s = _logits(P_STUDENT)
    base = region_logit_kd_softmax(s, T_FG, [1, 2]).item()
    # voxel 0 is in R_1 only: redistributing between classes 0 and 2 (p_1 fixed) changes nothing
    s2 = _logits([[0.4, 0.5, 0.1], P_STUDENT[1], P_STUDENT[2]])
    assert region_logit_kd_softmax(s2, T_FG, [1, 2]).item() == pytest.approx(base, abs=1e-6)
    # ... changing p_1 there does
    s3 = _logits([[0.1, 0.7, 0.2], P_STUDENT[1], P_STUDENT[2]])
    assert abs(region_logit_kd_softmax(s3, T_FG, [1, 2]).item() - base) > 1e-2
    # voxel 2 is background: only p_0 matters
    s4 = _logits([P_STUDENT[0], P_STUDENT[1], [0.5, 0.45, 0.05]])
    assert region_logit_kd_softmax(s4, T_FG, [1, 2]).item() == pytest.approx(base, abs=1e-6)
    s5 = _logits([P_STUDENT[0], P_STUDENT[1], [0.8, 0.1, 0.1]])
    assert abs(region_logit_kd_softmax(s5, T_FG, [1, 2]).item() - base) > 1e-2


def test_region_softmax_empty_regions_and_teacher_no_grad():
    s = torch.randn(2, 3, 4, 4, requires_grad=True)
    t = torch.full((2, 2, 4, 4), -5.0, requires_grad=True)  # no organ anywhere
    loss = region_logit_kd_softmax(s, t, [1, 2], weight_background=0)
    assert loss.item() == 0.0 and loss.requires_grad and loss.dtype == torch.float32
    loss.backward()
    assert torch.all(s.grad == 0) and t.grad is None
    # with the background term it is > 0, and still no gradient into the teacher
    s.grad = None
    loss = region_logit_kd_softmax(s, t, [1, 2])
    loss.backward()
    assert loss.item() > 0 and s.grad.abs().sum() > 0 and t.grad is None


def test_binary_teacher_logit():
    z = torch.tensor([[[0.3, -1.0], [1.2, 2.0]]], requires_grad=True)  # [1, 2, 2]
    fg = binary_teacher_logit(z)
    assert fg.shape == (1, 1, 2) and not fg.requires_grad
    torch.testing.assert_close(torch.sigmoid(fg / 3)[:, 0], torch.softmax(z.detach() / 3, 1)[:, 1])
    with pytest.raises(ValueError):
        binary_teacher_logit(torch.zeros(1, 3, 2))


# ----------------------------------------------------------------------------------------------------------------------
# region_logit_kd_sigmoid
# ----------------------------------------------------------------------------------------------------------------------
def test_region_sigmoid_hand_values():
    # student channels: sigma(s) = .5 (logit 0) in channel 0 everywhere, .75 (ln3) in channel 1 everywhere
    s = torch.tensor([[[0.0, 0.0, 0.0], [LN3, LN3, LN3]]])
    k1 = _bkl(0.75, 0.5)  # voxel 0, channel 0
    k2 = _bkl(0.8, 0.75)  # voxel 1, channel 1
    bg = (_bkl(0.25, 0.5) + _bkl(0.2, 0.75)) / 2  # voxel 2, mean over both channels
    # mean over the 3 voxels of the batch, organ terms summed over the channels
    assert region_logit_kd_sigmoid(s, T_FG).item() == pytest.approx((k1 + k2 + bg) / 3, abs=1e-6)
    assert RegionLogitKDSigmoidLoss(weight_background=0.5)(s, T_FG).item() == \
        pytest.approx((k1 + k2 + 0.5 * bg) / 3, abs=1e-6)
    # temperature
    tau = 3.0
    k1 = _bkl(_sig(LN3 / tau), 0.5)
    k2 = _bkl(_sig(LN4 / tau), _sig(LN3 / tau))
    bg = (_bkl(_sig(-LN3 / tau), 0.5) + _bkl(_sig(-LN4 / tau), _sig(LN3 / tau))) / 2
    assert region_logit_kd_sigmoid(s, T_FG, temperature=tau).item() == \
        pytest.approx(tau ** 2 * (k1 + k2 + bg) / 3, abs=1e-6)


def test_region_sigmoid_zero_when_equal_and_region_selection():
    g = torch.Generator().manual_seed(1)
    t = torch.randn(2, 3, 4, 5, generator=g) * 3
    assert abs(region_logit_kd_sigmoid(t.clone(), t, temperature=2.0).item()) < 1e-6
    # channel 0 at voxels that are in some other organ's region but not in R_0 gets no gradient / has no effect
    s = torch.randn(2, 3, 4, 5, generator=g, requires_grad=True)
    region_logit_kd_sigmoid(s, t).backward()
    elsewhere = (t[:, 0] <= 0) & (t[:, 1:] > 0).any(1)
    inside = (t[:, 0] > 0) | ~(t > 0).any(1)
    assert elsewhere.any() and inside.any()
    assert torch.all(s.grad[:, 0][elsewhere] == 0)
    assert torch.all(s.grad[:, 0][inside] != 0)
    s2 = s.detach().clone()
    s2[:, 0][elsewhere] += 5.0
    assert region_logit_kd_sigmoid(s2, t).item() == pytest.approx(region_logit_kd_sigmoid(s.detach(), t).item(),
                                                                  abs=1e-6)
    s3 = s.detach().clone()
    s3[:, 0][inside] += 5.0
    assert abs(region_logit_kd_sigmoid(s3, t).item() - region_logit_kd_sigmoid(s.detach(), t).item()) > 1e-2


def test_region_kd_valid_mask_drops_voxels_from_every_region():
    """Cached teacher outputs are unknown where augmentation moved the patch outside the case: those voxels belong to
    no region. Hand values on the 3-voxel example: dropping voxel 1 empties R_2 (its term becomes 0; the mean still
    divides by all B N = 3 voxels); dropping voxel 2 empties R_bg."""
    s = _logits(P_STUDENT)
    k1 = _bkl(0.75, 0.5)
    k2 = _bkl(0.8, 0.6)
    bg = _bkl(0.6, 0.5)
    every = torch.ones(1, 3, dtype=torch.bool)
    assert region_logit_kd_softmax(s, T_FG, [1, 2], valid=every).item() == \
        pytest.approx(region_logit_kd_softmax(s, T_FG, [1, 2]).item(), abs=1e-7)
    no_v1 = torch.tensor([[True, False, True]])
    assert region_logit_kd_softmax(s, T_FG, [1, 2], valid=no_v1).item() == pytest.approx((k1 + bg) / 3, abs=1e-6)
    no_v2 = torch.tensor([[[1.0, 1.0, 0.0]]])  # [B, 1, S], non-bool: non-zero = valid
    assert region_logit_kd_softmax(s, T_FG, [1, 2], valid=no_v2).item() == pytest.approx((k1 + k2) / 3, abs=1e-6)
    # sigmoid student: same regions
    ss = torch.tensor([[[0.0, 0.0, 0.0], [LN3, LN3, LN3]]])
    bg_sig = (_bkl(0.25, 0.5) + _bkl(0.2, 0.75)) / 2
    assert region_logit_kd_sigmoid(ss, T_FG, valid=no_v1).item() == \
        pytest.approx((_bkl(0.75, 0.5) + bg_sig) / 3, abs=1e-6)
    assert region_logit_kd_sigmoid(ss, T_FG, valid=torch.zeros(1, 3, dtype=torch.bool)).item() == 0.0
    # invalid voxels get no gradient
    sg = s.clone().requires_grad_(True)
    region_logit_kd_softmax(sg, T_FG, [1, 2], valid=no_v1).backward()
    assert torch.all(sg.grad[..., 1] == 0) and torch.any(sg.grad[..., 0] != 0)
    with pytest.raises(ValueError, match="valid mask shape"):
        region_logit_kd_softmax(s, T_FG, [1, 2], valid=torch.ones(1, 4, dtype=torch.bool))


# ----------------------------------------------------------------------------------------------------------------------
# region KD: background target, per-voxel normalisation, active teachers (code-review fixes)
# ----------------------------------------------------------------------------------------------------------------------
def test_background_target_is_the_product_at_t1_then_tempered():
    """q_bg = prod_k (1 - sigma(t_k)) at T = 1, then logit(q_bg^T) = logit(q_bg) / T. Four confident teachers
    (sigma(t_k) = .001 each) at T = 2: q_bg^T = .9404; tempering each teacher before the product gave .8829."""
    tau = 2.0
    t = torch.full((1, 4, 1), math.log(0.001 / 0.999))  # sigma(t) = .001
    q1 = 0.999 ** 4
    q_t = _sig(math.log(q1 / (1 - q1)) / tau)
    assert q_t == pytest.approx(0.9404, abs=1e-4)
    old_q = _sig(-math.log(0.001 / 0.999) / tau) ** 4
    assert old_q == pytest.approx(0.8829, abs=1e-4)
    probs = [0.9, 0.025, 0.025, 0.025, 0.025]
    s = _logits([probs])
    p0_t = _temper(probs, tau)[0]
    loss = region_logit_kd_softmax(s, t, [1, 2, 3, 4], temperature=tau)
    assert loss.item() == pytest.approx(tau ** 2 * _bkl(q_t, p0_t), abs=1e-6)
    assert abs(loss.item() - tau ** 2 * _bkl(old_q, p0_t)) > 1e-2  # the old target
    # a student whose tempered background probability is q_bg^T gets 0: logits s / T = (a, 0, 0, 0, 0)
    a = math.log(4 * q_t / (1 - q_t))
    s_match = torch.tensor([[[tau * a], [0.0], [0.0], [0.0], [0.0]]])
    # (float32 rounding of the two KL terms, which cancel to first order, leaves ~1e-6)
    assert abs(region_logit_kd_softmax(s_match, t, [1, 2, 3, 4], temperature=tau).item()) < 1e-5
    # one teacher: logit(1 - sigma(t)) / T = -t / T, the same as tempering the teacher
    t1 = torch.tensor([[[-LN3]]])
    s1 = _logits([[0.6, 0.2, 0.2]])
    p_t = _temper([0.6, 0.2, 0.2], tau)
    assert region_logit_kd_softmax(s1, t1, [1], temperature=tau).item() == \
        pytest.approx(tau ** 2 * _bkl(_sig(LN3 / tau), p_t[0] + p_t[2]), abs=1e-6)


@pytest.mark.parametrize("loss_fn", ["softmax", "sigmoid", "feature"])
def test_region_kd_weighs_a_voxel_the_same_whatever_the_region_size(loss_fn):
    """A voxel of a 50-voxel region and one of a 5,000-voxel region weigh the same: the loss is a sum over the
    region divided by all B N voxels of the batch (the region mean made a small region's voxel weigh 100x)."""
    n_vox = 10_000

    def loss(n_region):
        t = torch.full((1, 1, n_vox), -50.0)
        t[..., :n_region] = LN3  # teacher sigma = .75 on the region
        if loss_fn == "softmax":
            return region_logit_kd_softmax(torch.zeros(1, 3, n_vox), t, [1], weight_background=0).item()
        if loss_fn == "sigmoid":
            return region_logit_kd_sigmoid(torch.zeros(1, 1, n_vox), t, weight_background=0).item()
        return feature_kd_loss(torch.zeros(1, 2, n_vox), torch.ones(1, 2, n_vox), t > 0).item()

    per_voxel = {"softmax": _bkl(0.75, 1 / 3), "sigmoid": _bkl(0.75, 0.5), "feature": 1.0}[loss_fn]
    small, large = loss(50), loss(5_000)
    assert small == pytest.approx(50 * per_voxel / n_vox, rel=1e-4)
    assert large == pytest.approx(5_000 * per_voxel / n_vox, rel=1e-4)
    assert large / small == pytest.approx(100.0, rel=1e-4)


def test_region_kd_organ_terms_sum_over_teachers():
    # two teachers with disjoint one-voxel regions in a 4-voxel batch: each region voxel counts 1 / (B N)
    t = torch.tensor([[[LN3, -50.0, -50.0, -50.0], [-50.0, LN3, -50.0, -50.0]]])
    s = torch.zeros(1, 3, 4)
    assert region_logit_kd_softmax(s, t, [1, 2], weight_background=0).item() == \
        pytest.approx(2 * _bkl(0.75, 1 / 3) / 4, abs=1e-6)


def test_teacher_of_an_annotated_organ_gives_no_kd_on_that_sample():
    g = torch.Generator().manual_seed(11)
    s = (torch.randn(2, 3, 4, 5, generator=g) * 2).requires_grad_()
    t = torch.randn(2, 1, 4, 5, generator=g) * 3  # one liver teacher (class 1), both signs -> R_1 and R_bg
    assert (t > 0).any() and (t <= 0).any()
    # sample 0 annotates liver: the teacher is silent there (organ and background terms)
    active = torch.tensor([[False], [True]])
    loss = region_logit_kd_softmax(s, t, [1], temperature=2.0, active=active)
    loss.backward()
    assert torch.all(s.grad[0] == 0) and torch.any(s.grad[1] != 0)
    # = sample 1 alone, over the voxels of both samples (mean over all B N voxels)
    alone = region_logit_kd_softmax(s[1:].detach(), t[1:], [1], temperature=2.0)
    assert loss.item() == pytest.approx(alone.item() / 2, abs=1e-6)
    # nobody may speak: a graph-connected 0 with zero gradient
    s.grad = None
    z = region_logit_kd_softmax(s, t, [1], active=torch.zeros(2, 1, dtype=torch.bool))
    assert z.item() == 0.0 and z.requires_grad
    z.backward()
    assert torch.all(s.grad == 0)
    # sigmoid student: an inactive (sample, channel) pair gets no gradient anywhere, also not from the background
    ss = (torch.randn(2, 2, 4, 5, generator=g)).requires_grad_()
    tt = torch.randn(2, 2, 4, 5, generator=g) * 3
    act2 = torch.tensor([[False, True], [True, True]])
    region_logit_kd_sigmoid(ss, tt, temperature=2.0, active=act2).backward()
    assert torch.all(ss.grad[0, 0] == 0) and torch.any(ss.grad[0, 1] != 0) and torch.any(ss.grad[1, 0] != 0)
    with pytest.raises(ValueError, match="active must be"):
        region_logit_kd_softmax(s, t, [1], active=torch.ones(2, 2, dtype=torch.bool))


def test_background_term_uses_the_samples_active_teachers_and_rest_set():
    """Hand values, C = 3 (bg, liver, kidney), teachers liver -> 1, kidney -> 2, one voxel per sample, every teacher
    says background (sigma = .25 and .20).
    sample 0 annotates kidney: only the liver teacher speaks; q_bg = .75; p_rest = p_0 + p_kidney.
    sample 1 annotates nothing: q_bg = .75 * .8 = .6; p_rest = p_0."""
    t = torch.tensor([[[-LN3], [-LN4]], [[-LN3], [-LN4]]])
    p_s0, p_s1 = [0.4, 0.3, 0.3], [0.5, 0.25, 0.25]
    s = torch.cat([_logits([p_s0]), _logits([p_s1])], 0)
    active = torch.tensor([[True, False], [True, True]])
    expected = (_bkl(0.75, 0.4 + 0.3) + _bkl(0.6, 0.5)) / 2
    assert region_logit_kd_softmax(s, t, [1, 2], active=active).item() == pytest.approx(expected, abs=1e-6)
    # T = 2: each sample's q_bg tempered as logit / T, student tempered, same per-sample rest sets
    tau = 2.0
    p0, p1 = _temper(p_s0, tau), _temper(p_s1, tau)
    expected_t = tau ** 2 * (_bkl(_sig(LN3 / tau), p0[0] + p0[2]) + _bkl(_sig(math.log(1.5) / tau), p1[0])) / 2
    assert region_logit_kd_softmax(s, t, [1, 2], temperature=tau, active=active).item() == \
        pytest.approx(expected_t, abs=1e-6)
    # the liver teacher's region on sample 0 compares p_liver only; the kidney class gets no organ term there
    t_fg = torch.tensor([[[LN3], [LN4]], [[-LN3], [-LN4]]])  # sample 0: both teachers say organ
    only_liver = (_bkl(0.75, 0.3) + _bkl(0.6, 0.5)) / 2
    assert region_logit_kd_softmax(s, t_fg, [1, 2], active=active).item() == pytest.approx(only_liver, abs=1e-6)
    # sigmoid: the background term averages over the active channels only
    ss = torch.tensor([[[0.0], [LN3]]])  # sigma .5, .75
    tt = torch.tensor([[[-LN3], [-LN4]]])
    assert region_logit_kd_sigmoid(ss, tt, active=torch.tensor([[True, False]])).item() == \
        pytest.approx(_bkl(0.25, 0.5), abs=1e-6)
    assert region_logit_kd_sigmoid(ss, tt).item() == pytest.approx((_bkl(0.25, 0.5) + _bkl(0.2, 0.75)) / 2,
                                                                   abs=1e-6)


def test_region_kd_labelled_voxels_in_valid_get_no_gradient():
    """The trainer removes the voxels a case labels from ``valid``: a liver teacher sure of liver on voxels labelled
    kidney then neither pushes them toward liver nor away from kidney (zero gradient on every class there)."""
    s = torch.zeros(1, 3, 4, requires_grad=True)
    t = torch.tensor([[[4.0, 4.0, -4.0, -4.0]]])  # liver teacher: liver on voxels 0, 1
    labelled_kidney = torch.tensor([[[False, True, False, True]]])
    region_logit_kd_softmax(s, t, [1], valid=~labelled_kidney).backward()
    assert torch.all(s.grad[..., 1] == 0) and torch.all(s.grad[..., 3] == 0)
    assert torch.all(s.grad[:, 1, 0] < 0)  # voxel 0 (unlabelled) is pushed toward liver
    assert torch.any(s.grad[..., 2] != 0)


# ----------------------------------------------------------------------------------------------------------------------
# feature_kd_loss
# ----------------------------------------------------------------------------------------------------------------------
def test_feature_hand_values():
    # F = 2, 3 voxels; student (1,0), (2,2), (0,3); teacher (1,1), (0,0), (0,-3)
    s = torch.tensor([[[1.0, 2.0, 0.0], [0.0, 2.0, 3.0]]])
    t = torch.tensor([[[1.0, 0.0, 0.0], [1.0, 0.0, -3.0]]])
    region = torch.tensor([[[True, False, True]]])
    # squared errors per voxel, mean over channels: (0+1)/2 = .5, (4+4)/2 = 4, (0+36)/2 = 18
    assert feature_kd_loss(s, t).item() == pytest.approx((0.5 + 4 + 18) / 3, abs=1e-6)
    # with a region: sum over the region / all B N = 3 voxels (not the region mean)
    assert feature_kd_loss(s, t, region).item() == pytest.approx((0.5 + 18) / 3, abs=1e-6)
    assert feature_kd_loss(s, t, region[:, 0]).item() == pytest.approx((0.5 + 18) / 3, abs=1e-6)  # [B, *S]
    assert FeatureKDLoss()(s, t, region.float()).item() == pytest.approx((0.5 + 18) / 3, abs=1e-6)
    # cosine: voxel 0: 1 - 1/sqrt2; voxel 1: teacher is zero -> cos 0 -> 1; voxel 2: cos = -1 -> 2
    c0 = 1 - 1 / math.sqrt(2)
    assert feature_kd_loss(s, t, kind="cosine").item() == pytest.approx((c0 + 1 + 2) / 3, abs=1e-6)
    assert feature_kd_loss(s, t, region, kind="cosine").item() == pytest.approx((c0 + 2) / 3, abs=1e-6)
    assert FeatureKDLoss("cosine")(s, t).item() == pytest.approx((c0 + 1 + 2) / 3, abs=1e-6)
    # equal features -> 0 (cosine: also invariant to scaling the teacher)
    assert feature_kd_loss(s, s.clone()).item() == 0.0
    assert abs(feature_kd_loss(s, 3 * s, kind="cosine").item()) < 1e-6


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_feature_region_selection_and_grads(kind):
    g = torch.Generator().manual_seed(2)
    s = torch.randn(2, 4, 3, 3, 2, generator=g, requires_grad=True)
    t = torch.randn(2, 4, 3, 3, 2, generator=g, requires_grad=True)
    region = torch.rand(2, 1, 3, 3, 2, generator=g) > 0.5
    loss = feature_kd_loss(s, t, region, kind=kind)
    loss.backward()
    assert t.grad is None
    m = region.expand_as(s)
    assert torch.all(s.grad[~m] == 0) and torch.all(s.grad[m] != 0)
    s2 = s.detach() + torch.where(m, torch.zeros_like(s), torch.randn_like(s) * 5)
    assert feature_kd_loss(s2, t, region, kind=kind).item() == pytest.approx(loss.item(), abs=1e-6)
    # empty region: graph-connected zero; all-zero student features: finite gradient
    s.grad = None
    z = feature_kd_loss(s, t, torch.zeros_like(region), kind=kind)
    assert z.item() == 0.0 and z.requires_grad
    z.backward()
    assert torch.all(s.grad == 0)
    s0 = torch.zeros(1, 4, 2, 2, requires_grad=True)
    feature_kd_loss(s0, torch.zeros(1, 4, 2, 2), kind=kind).backward()
    assert torch.isfinite(s0.grad).all()


def test_feature_shape_errors():
    s = torch.randn(2, 4, 6, 6)
    with pytest.raises(ValueError):
        feature_kd_loss(s, torch.randn(2, 4, 3, 3))  # spatial size differs
    with pytest.raises(ValueError):
        feature_kd_loss(s, torch.randn(2, 5, 6, 6))  # channels differ
    with pytest.raises(ValueError):
        feature_kd_loss(s, torch.randn(2, 4, 6, 6), torch.ones(2, 2, 6, 6, dtype=torch.bool))
    with pytest.raises(ValueError):
        feature_kd_loss(s, torch.randn(2, 4, 6, 6), torch.ones(2, 1, 5, 6, dtype=torch.bool))
    with pytest.raises(ValueError):
        feature_kd_loss(s, s, kind="l1")


# ----------------------------------------------------------------------------------------------------------------------
# soft_label_kd_loss
# ----------------------------------------------------------------------------------------------------------------------
def test_soft_label_hand_values():
    teacher = [[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]
    student = [[0.5, 0.3, 0.2], [0.2, 0.2, 0.6]]
    s, p = _logits(student), torch.tensor(teacher).T[None]
    ref1 = (_kl(teacher[0], student[0]) + _kl(teacher[1], student[1])) / 2
    assert soft_label_kd_loss(s, p).item() == pytest.approx(ref1, abs=1e-6)
    assert SoftLabelKDLoss()(s, p).item() == pytest.approx(ref1, abs=1e-6)
    tau = 2.0
    ref2 = tau ** 2 * sum(_kl(_temper(tv, tau), _temper(sv, tau)) for tv, sv in zip(teacher, student)) / 2
    assert soft_label_kd_loss(s, p, temperature=tau).item() == pytest.approx(ref2, abs=1e-6)
    # student == teacher -> 0 (at every temperature)
    for tt in (1.0, 4.0):
        assert abs(soft_label_kd_loss(torch.log(p), p, temperature=tt).item()) < 1e-6
    # zero teacher probabilities are clamped to 1e-8 (finite)
    p0 = torch.tensor([[[1.0], [0.0]]])
    assert soft_label_kd_loss(torch.zeros(1, 2, 1), p0).item() == pytest.approx(math.log(2), abs=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# partial_kd_softmax
# ----------------------------------------------------------------------------------------------------------------------
def test_partial_softmax_hand_values():
    # C = 3, sample annotates {0, 1}: bins {0,1} and {2}
    tp = [[0.5, 0.2, 0.3], [0.1, 0.1, 0.8]]
    sp = [[0.6, 0.3, 0.1], [0.3, 0.3, 0.4]]
    t, s = _logits(tp), _logits(sp)
    a = torch.tensor([[True, True, False]])
    ref = (_kl([0.7, 0.3], [0.9, 0.1]) + _kl([0.2, 0.8], [0.6, 0.4])) / 2
    assert partial_kd_softmax(s, t, a).item() == pytest.approx(ref, abs=1e-6)
    assert PartialKDSoftmaxLoss()(s, t, a).item() == pytest.approx(ref, abs=1e-6)
    # column 0 given False is forced True
    assert partial_kd_softmax(s, t, torch.tensor([[False, True, False]])).item() == pytest.approx(ref, abs=1e-6)
    # nothing but background annotated: full KL over all classes
    ref_all = (_kl(tp[0], sp[0]) + _kl(tp[1], sp[1])) / 2
    assert partial_kd_softmax(s, t, torch.tensor([[True, False, False]])).item() == pytest.approx(ref_all, abs=1e-6)
    # temperature: merge AFTER tempering
    tau = 2.0
    tt, st = [_temper(v, tau) for v in tp], [_temper(v, tau) for v in sp]
    ref_t = tau ** 2 * sum(_kl([x[0] + x[1], x[2]], [y[0] + y[1], y[2]]) for x, y in zip(tt, st)) / 2
    assert partial_kd_softmax(s, t, a, temperature=tau).item() == pytest.approx(ref_t, abs=1e-6)


def test_partial_softmax_all_annotated_is_exact_zero():
    g = torch.Generator().manual_seed(3)
    s = (torch.randn(2, 4, 3, 5, generator=g) * 10).requires_grad_()
    t = torch.randn(2, 4, 3, 5, generator=g) * 10
    loss = partial_kd_softmax(s, t, torch.ones(2, 4, dtype=torch.bool), temperature=2.0)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.all(s.grad == 0)


def test_partial_softmax_mixed_batch_and_merged_bin_invariance():
    g = torch.Generator().manual_seed(4)
    s = torch.randn(3, 4, 3, 4, generator=g) * 2
    t = torch.randn(3, 4, 3, 4, generator=g) * 2
    a = torch.tensor([[True, True, False, False], [True, False, False, True], [True, True, True, True]])
    per = [partial_kd_softmax(s[b:b + 1], t[b:b + 1], a[b:b + 1], temperature=1.5) for b in range(3)]
    assert per[2].item() == 0.0 and per[0].item() > 0 and per[1].item() > 0
    ours = partial_kd_softmax(s, t, a, temperature=1.5)
    assert ours.item() == pytest.approx(sum(p.item() for p in per) / 3, abs=1e-6)
    # float64 reference for sample 0: bins {0, 1}, {2}, {3}
    ps, pt = torch.softmax(s[0].double() / 1.5, 0), torch.softmax(t[0].double() / 1.5, 0)
    ms = torch.stack([ps[0] + ps[1], ps[2], ps[3]])
    mt = torch.stack([pt[0] + pt[1], pt[2], pt[3]])
    ref0 = 1.5 ** 2 * (mt * (mt.log() - ms.log())).sum(0).mean()
    assert per[0].item() == pytest.approx(ref0.item(), abs=1e-6)
    # moving probability between the annotated classes of sample 0 (0 <-> 1) leaves the loss unchanged
    p0 = torch.softmax(s[0], 0)
    shift = 0.5 * torch.minimum(p0[0], p0[1])
    p0 = torch.stack([p0[0] - shift, p0[1] + shift, p0[2], p0[3]])
    s2 = s.clone()
    s2[0] = torch.log(p0)
    assert partial_kd_softmax(s2, t, a).item() == pytest.approx(partial_kd_softmax(s, t, a).item(), abs=1e-6)
    # ... moving it into the unannotated class 2 changes it
    s3 = s.clone()
    s3[0, 2] += 2.0
    assert abs(partial_kd_softmax(s3, t, a).item() - partial_kd_softmax(s, t, a).item()) > 1e-3
    # student == teacher -> 0
    assert abs(partial_kd_softmax(t.clone(), t, a, temperature=3.0).item()) < 1e-6


# ----------------------------------------------------------------------------------------------------------------------
# partial_kd_sigmoid
# ----------------------------------------------------------------------------------------------------------------------
def test_partial_sigmoid_hand_values_and_mixed_batch():
    # B = 2, K = 2, 2 voxels; student sigma .5 (logit 0) everywhere; teacher channel 0: .75, channel 1: .8 / .2
    s = torch.zeros(2, 2, 2)
    t = torch.tensor([[[LN3, LN3], [LN4, -LN4]]] * 2)
    a = torch.tensor([[True, False], [False, False]])
    # unannotated pairs: (0,1), (1,0), (1,1) -> mean over their 6 voxels
    ref = (_bkl(0.8, 0.5) + _bkl(0.2, 0.5) + 2 * _bkl(0.75, 0.5) + _bkl(0.8, 0.5) + _bkl(0.2, 0.5)) / 6
    assert partial_kd_sigmoid(s, t, a).item() == pytest.approx(ref, abs=1e-6)
    assert PartialKDSigmoidLoss()(s, t, a).item() == pytest.approx(ref, abs=1e-6)
    tau = 2.0
    ref_t = tau ** 2 * (2 * _bkl(_sig(LN4 / tau), 0.5) + 2 * _bkl(_sig(LN3 / tau), 0.5)
                        + 2 * _bkl(_sig(-LN4 / tau), 0.5)) / 6
    assert partial_kd_sigmoid(s, t, a, temperature=tau).item() == pytest.approx(ref_t, abs=1e-6)
    # mixed batch == per-pair combination (sum over pairs / number of pairs)
    per0 = partial_kd_sigmoid(s[:1], t[:1], a[:1]).item()  # 1 pair
    per1 = partial_kd_sigmoid(s[1:], t[1:], a[1:]).item()  # 2 pairs
    assert partial_kd_sigmoid(s, t, a).item() == pytest.approx((per0 * 1 + per1 * 2) / 3, abs=1e-6)


def test_partial_sigmoid_annotated_channels_get_no_grad():
    g = torch.Generator().manual_seed(5)
    s = torch.randn(3, 3, 4, 5, generator=g, requires_grad=True)
    t = (torch.randn(3, 3, 4, 5, generator=g) * 3).requires_grad_()
    a = torch.tensor([[True, False, True], [False, True, False], [True, True, True]])
    partial_kd_sigmoid(s, t, a, temperature=2.0).backward()
    assert t.grad is None
    for b in range(3):
        for k in range(3):
            if a[b, k]:
                assert torch.all(s.grad[b, k] == 0)
            else:
                assert torch.all(s.grad[b, k] != 0)
    # everything annotated: exactly 0, connected
    s.grad = None
    z = partial_kd_sigmoid(s, t, torch.ones(3, 3, dtype=torch.bool))
    assert z.item() == 0.0 and z.requires_grad
    z.backward()
    assert torch.all(s.grad == 0)
    # student == teacher -> 0
    assert partial_kd_sigmoid(t.detach().clone(), t, a).item() == 0.0


# ----------------------------------------------------------------------------------------------------------------------
# all losses: dtypes, extreme logits, teacher gradients, autocast, shape errors, deep supervision
# ----------------------------------------------------------------------------------------------------------------------
def _cases():
    a4 = torch.tensor([[True, True, False, False], [True, False, True, True]])
    a3 = a4[:, 1:]
    return [
        ("region_softmax", 4, 3, lambda s, t: region_logit_kd_softmax(s, t, [1, 2, 3], temperature=2.0)),
        ("region_softmax_active", 4, 3, lambda s, t: region_logit_kd_softmax(s, t, [1, 2, 3], temperature=2.0,
                                                                            active=a3)),
        ("region_sigmoid", 3, 3, lambda s, t: region_logit_kd_sigmoid(s, t, temperature=2.0)),
        ("region_sigmoid_active", 3, 3, lambda s, t: region_logit_kd_sigmoid(s, t, temperature=2.0, active=a3)),
        ("feature_mse", 4, 4, lambda s, t: feature_kd_loss(s, t, t[:, :1] > 0)),
        ("feature_cos", 4, 4, lambda s, t: feature_kd_loss(s, t, t[:, :1] > 0, kind="cosine")),
        ("soft_label", 4, 4, lambda s, t: soft_label_kd_loss(s, torch.softmax(t.float(), 1), temperature=2.0)),
        ("partial_softmax", 4, 4, lambda s, t: partial_kd_softmax(s, t, a4, temperature=2.0)),
        ("partial_sigmoid", 3, 3, lambda s, t: partial_kd_sigmoid(s, t, a3, temperature=2.0)),
    ]


CASES = _cases()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name,cs,ct,fn", CASES)
def test_low_precision_and_extreme_logits(dtype, name, cs, ct, fn):
    g = torch.Generator().manual_seed(6)
    base_s = torch.randn(2, cs, 3, 4, 2, generator=g)
    base_t = torch.randn(2, ct, 3, 4, 2, generator=g)
    for rs, rt in ((base_s, base_t), (base_s.sign() * 50, base_t.sign() * 50), (base_s * 50, -base_t * 50),
                   (base_s.sign() * 50, -base_t.sign() * 50)):
        s = rs.to(dtype).requires_grad_()
        t = rt.to(dtype).requires_grad_()
        loss = fn(s, t)
        assert loss.dtype == torch.float32 and loss.ndim == 0
        assert torch.isfinite(loss), (name, dtype)
        loss.backward()
        assert s.grad.dtype == dtype and torch.isfinite(s.grad.float()).all(), (name, dtype)
        assert t.grad is None, name


@pytest.mark.parametrize("name,cs,ct,fn", CASES)
def test_under_autocast_computes_in_float32(name, cs, ct, fn):
    g = torch.Generator().manual_seed(7)
    s = (torch.randn(2, cs, 4, 4, generator=g) * 3).to(torch.bfloat16)
    t = (torch.randn(2, ct, 4, 4, generator=g) * 3).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp = fn(s, t)
    ref = fn(s.float(), t.float())
    assert amp.dtype == torch.float32
    assert amp.item() == pytest.approx(ref.item(), abs=1e-5)


def test_extreme_background_teachers_are_finite():
    # q_bg rounds to 1 in float32 (log(1 - q_bg) = -inf): value and gradient stay finite
    s = torch.tensor([[[50.0, -50.0], [-50.0, 50.0], [0.0, 0.0]]], requires_grad=True)
    t = torch.full((1, 2, 2), -200.0)
    loss = region_logit_kd_softmax(s, t, [1, 2])
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(s.grad).all()
    # voxel 0: logits (50, -50, 0), p_0 ~ 1 matches -> ~0; voxel 1: logits (-50, 50, 0), p_0 ~ e^-100 vs teacher 1
    # -> KL ~ -log p_0 = 100; mean over the two background voxels ~ 50
    assert loss.item() == pytest.approx(50.0, abs=1e-3)


def test_shape_and_argument_errors():
    s = torch.randn(2, 3, 4, 4)
    t2 = torch.randn(2, 2, 4, 4)
    with pytest.raises(ValueError):
        region_logit_kd_softmax(s, t2, [1])  # 1 class for 2 teachers
    with pytest.raises(ValueError):
        region_logit_kd_softmax(s, t2, [0, 1])  # background as a teacher class
    with pytest.raises(ValueError):
        region_logit_kd_softmax(s, t2, [1, 3])  # out of range
    with pytest.raises(ValueError):
        region_logit_kd_softmax(s, torch.randn(2, 2, 2, 2), [1, 2])  # spatial mismatch
    with pytest.raises(ValueError):
        region_logit_kd_softmax(s, t2, [1, 2], temperature=0)
    with pytest.raises(ValueError):
        region_logit_kd_softmax(torch.randn(2, 3), torch.randn(2, 2), [1, 2])  # no spatial dim
    with pytest.raises(ValueError):
        region_logit_kd_sigmoid(s, t2)  # channels differ
    with pytest.raises(ValueError):
        soft_label_kd_loss(s, torch.rand(2, 3, 4, 5))
    with pytest.raises(ValueError):
        soft_label_kd_loss(s, torch.rand(1, 3, 4, 4))  # batch differs
    with pytest.raises(ValueError):
        partial_kd_softmax(s, s, torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError):
        partial_kd_sigmoid(s, s, torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError):
        partial_kd_sigmoid(s, torch.randn(2, 3, 4, 4, 1), torch.ones(2, 3, dtype=torch.bool))


def test_deep_supervision_wrapper():
    g = torch.Generator().manual_seed(8)
    s = torch.randn(2, 3, 8, 8, generator=g)
    t = torch.randn(2, 3, 8, 8, generator=g)
    a = torch.tensor([[True, True, False], [True, False, True]])
    ss, ts = [s, s[:, :, ::2, ::2]], [t, t[:, :, ::2, ::2]]
    w = DeepSupervisionWrapper(PartialKDSoftmaxLoss(temperature=2.0), weight_factors=[0.6, 0.4])
    expected = 0.6 * partial_kd_softmax(ss[0], ts[0], a, 2.0) + 0.4 * partial_kd_softmax(ss[1], ts[1], a, 2.0)
    assert w(ss, ts, [a] * 2).item() == pytest.approx(expected.item(), abs=1e-6)


def test_teacher_probs_for_student_classes_fold_the_organs_the_student_lacks_into_background():
    """A public model with 5 classes (bg, liver, spleen, kidney, pancreas) taught to a pancreas-only student: at a
    voxel where the teacher is sure of the liver, the student's target is background, not a renormalised split of
    the two kept columns (the old DualKD mapping gave pancreas .005 / (.01 + .005) = .33 there)."""
    from nnunetv2_fedkd.losses.response_kd import teacher_probs_for_student_classes

    p = torch.tensor([[.01, .97, .01, .005, .005],   # liver voxel
                      [.10, .00, .00, .10, .80],     # pancreas voxel
                      [.90, .05, .05, .00, .00]])     # background voxel
    probs = p.T.reshape(1, 5, 3, 1, 1)  # [B, C, 3 voxels]
    out = teacher_probs_for_student_classes(probs, [4])
    assert out.shape == (1, 2, 3, 1, 1)
    assert torch.allclose(out[0, :, :, 0, 0].T, torch.tensor([[.995, .005], [.20, .80], [1.0, 0.0]]), atol=1e-6)
    assert torch.allclose(out.sum(1), torch.ones(1, 3, 1, 1))
    two = teacher_probs_for_student_classes(probs, [1, 4])  # student (bg, liver, pancreas)
    assert two[0, :, 0, 0, 0].tolist() == pytest.approx([.025, .97, .005], abs=1e-6)
    for bad in ([], [0], [5], [4, 4]):
        with pytest.raises(ValueError, match="channels"):
            teacher_probs_for_student_classes(probs, bad)


def test_binary_kl_hand_value_and_a_zero_teacher_probability():
    """The binary KL (torch's kl_div on both outcomes): 0.25 vs 0.5 by hand; a teacher probability of exactly 0
    (log -inf) counts 0 with a finite, zero gradient (no 0 * -inf)."""
    from nnunetv2_fedkd.losses._common import _binary_kl

    s = torch.tensor([math.log(0.5), math.log(0.5)], requires_grad=True)
    t_logp = torch.tensor([math.log(0.25), float("-inf")])
    t_log1mp = torch.tensor([math.log(0.75), 0.0])
    kl = _binary_kl(t_logp, t_log1mp, s[:1].expand(2), torch.log1p(-torch.exp(s)))
    ref = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)  # 0.130812
    assert kl[0].item() == pytest.approx(ref, abs=1e-6)
    assert kl[1].item() == pytest.approx(math.log(1 / 0.5), abs=1e-6)  # p_t = 0: only the (1 - p) outcome
    kl.sum().backward()
    assert torch.isfinite(s.grad).all()
