r"""Losses for training one segmentation network from partially labelled datasets, pure torch (no nnU-Net state).

Supervised partial-label losses: :mod:`.partial_label` (marginal, exclusion, masked sigmoid). Knowledge distillation
(KD): :mod:`.region_kd` (MS-KD region logit KD from binary organ teachers), :mod:`.feature_kd` (feature KD),
:mod:`.response_kd` (soft-label KD from an ensemble, partial KD from a previous global model). :mod:`._common`:
shared private helpers.

Every KD loss

* takes the student's raw outputs (logits or features) ``[B, C, *spatial]`` for any number of spatial dims,
* takes teacher outputs of the same batch and spatial size (the trainer resamples them; a mismatch raises
  ``ValueError``) and detaches them: teachers never receive a gradient,
* computes in float32 whatever the input dtype (fp16/bf16 outputs from nnU-Net's autocast are cast with
  ``.float()``),
* returns a scalar float32 tensor that is always connected to the student's graph (an empty region or an
  everything-annotated batch gives ``0`` with an all-zero gradient, never a constant),
* uses the temperature ``T`` as in Hinton et al. 2015: both distributions are softened with ``T`` and the KL is
  multiplied by ``T ** 2`` so that gradient magnitudes do not depend on ``T``.

Notation: :math:`\sigma` the sigmoid, :math:`\mathrm{KL}_2(p \,\|\, q) = p \log\frac{p}{q} + (1-p)\log\frac{1-p}{1-q}`
the binary KL divergence (terms with a zero teacher probability count 0), ``N`` voxels per sample.

References: Hinton et al. 2015 (the temperature); each module lists the sources of its losses (:mod:`.region_kd`:
MS-KD; :mod:`.feature_kd`: MS-KD and dual KD; :mod:`.response_kd`: Noothout et al. 2022, Kim et al. 2024, ConDistFL).
"""
from nnunetv2_fedkd.losses.feature_kd import FeatureKDLoss, feature_kd_loss
from nnunetv2_fedkd.losses.region_kd import (
    RegionLogitKDSigmoidLoss,
    RegionLogitKDSoftmaxLoss,
    binary_teacher_logit,
    region_logit_kd_sigmoid,
    region_logit_kd_softmax,
)
from nnunetv2_fedkd.losses.response_kd import (
    PartialKDSigmoidLoss,
    PartialKDSoftmaxLoss,
    SoftLabelKDLoss,
    partial_kd_sigmoid,
    partial_kd_softmax,
    soft_label_kd_loss,
    teacher_probs_for_student_classes,
)
from nnunetv2_fedkd.losses.partial_label import (
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

__all__ = [
    "labels_to_onehot",
    "marginal_loss",
    "exclusion_loss",
    "marginal_exclusion_loss",
    "masked_sigmoid_loss",
    "MarginalLoss",
    "ExclusionLoss",
    "MarginalExclusionLoss",
    "MaskedSigmoidLoss",
    # knowledge distillation
    "binary_teacher_logit",
    "region_logit_kd_softmax",
    "region_logit_kd_sigmoid",
    "feature_kd_loss",
    "soft_label_kd_loss",
    "partial_kd_softmax",
    "partial_kd_sigmoid",
    "RegionLogitKDSoftmaxLoss",
    "RegionLogitKDSigmoidLoss",
    "FeatureKDLoss",
    "SoftLabelKDLoss",
    "PartialKDSoftmaxLoss",
    "PartialKDSigmoidLoss",
    "teacher_probs_for_student_classes",
]
