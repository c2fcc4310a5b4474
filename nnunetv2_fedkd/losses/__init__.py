"""Loss functions for training one segmentation network from partially labelled datasets."""
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
]
