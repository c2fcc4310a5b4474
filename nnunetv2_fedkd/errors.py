"""Errors that mean "the user's input is wrong": the CLI prints them as one clear line and exits 2 (no traceback)."""
from nnunetv2_fedkd.organs import RegistryError
from nnunetv2_fedkd.data.small_plans import PlansError
from nnunetv2_fedkd.spec import SpecError
from nnunetv2_fedkd.trainers.config import TrainerConfigError


def _conversion_error():
    from nnunetv2_fedkd.data.conversion import ConversionError

    return ConversionError


def _checkpoint_error():
    from nnunetv2_fedkd.federated.weights_io import CorruptCheckpoint

    return CorruptCheckpoint


USER_ERRORS = (RegistryError, SpecError, PlansError, TrainerConfigError, FileExistsError, FileNotFoundError,
               _conversion_error(), _checkpoint_error())
