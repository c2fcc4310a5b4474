"""Every nnUNetTrainer subclass of the plugin. nnU-Net finds them by class name through ``nnUNet_extTrainer``
(see :mod:`nnunetv2_fedkd.env`)."""
from nnunetv2_fedkd.trainers.base import nnUNetTrainerFedKDBase
from nnunetv2_fedkd.trainers.distillation import (
    nnUNetTrainerDualKD,
    nnUNetTrainerEnsembleKD,
    nnUNetTrainerMSKD,
    nnUNetTrainerMSKDMultiHead,
)
from nnunetv2_fedkd.trainers.fedkd import nnUNetTrainerFedKD, nnUNetTrainerFedKDMultiHead, nnUNetTrainerFedNaive
from nnunetv2_fedkd.trainers.naive_partial import nnUNetTrainerNaivePartial
from nnunetv2_fedkd.trainers.partial_label import nnUNetTrainerMarginal, nnUNetTrainerMultiHead

__all__ = ["nnUNetTrainerFedKDBase", "nnUNetTrainerNaivePartial", "nnUNetTrainerMarginal", "nnUNetTrainerMultiHead",
           "nnUNetTrainerMSKD", "nnUNetTrainerMSKDMultiHead", "nnUNetTrainerEnsembleKD", "nnUNetTrainerDualKD",
           "nnUNetTrainerFedKD", "nnUNetTrainerFedKDMultiHead", "nnUNetTrainerFedNaive"]
