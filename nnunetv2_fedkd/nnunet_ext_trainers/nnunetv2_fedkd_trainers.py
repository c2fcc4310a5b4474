# Thin re-export shim for nnU-Net's trainer lookup (nnUNet_extTrainer points at this folder).
# nnU-Net imports the modules of this folder as top-level modules; re-exporting keeps ONE identity per class
# (the one in nnunetv2_fedkd.trainers), so checkpoints and multiprocessing pickling stay consistent.
from nnunetv2_fedkd.trainers import *  # noqa: F401,F403
from nnunetv2_fedkd.trainers import __all__  # noqa: F401
