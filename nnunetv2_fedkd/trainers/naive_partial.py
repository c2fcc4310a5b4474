"""The naive partial-label baseline."""
from nnunetv2_fedkd.trainers.base import nnUNetTrainerFedKDBase


class nnUNetTrainerNaivePartial(nnUNetTrainerFedKDBase):
    """Treats every organ a case does not annotate as background: nnU-Net's own DC+CE loss on the merged label map.

    This is what users do today when they pool partially labelled datasets, and the baseline every partial-label
    method is compared with. It keeps nnU-Net's training unchanged; only the schedule comes from the config file.
    """

    accepts_cases_without_labels = True  # an unlabelled case is all background: the naive assumption itself
