"""The environment stock nnU-Net needs to work with this plugin.

nnU-Net 2.8 finds trainers outside its own package through ``nnUNet_extTrainer``: a folder whose modules it imports
as top-level modules. We point it at ``nnunet_ext_trainers/``, a folder of thin re-export shims, never at the package
root (that would load a second copy of every class). ``nnunetv2_fedkd env`` prints the exports::

    eval "$(nnunetv2_fedkd env --workdir ~/nnunet_work)"
"""
from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Dict, Optional

EXT_TRAINER_DIR = Path(__file__).resolve().parent / "nnunet_ext_trainers"

# settings that make nnU-Net usable on a small CPU machine (see the README); a GPU user leaves them out
CPU_FRIENDLY = {"nnUNet_def_n_proc": "2", "PYTHONUNBUFFERED": "1"}
# for training processes only: data augmentation in the main process is faster than worker processes on 2 cores.
# (Not exported by `env --cpu`: nnU-Net's planner calls torch.set_num_threads(nnUNet_n_proc_DA) and fails on 0.)
CPU_TRAINING = {"nnUNet_n_proc_DA": "0"}


def ext_trainer_path(existing: Optional[str] = None) -> str:
    """``nnUNet_extTrainer`` value with our shim folder first, keeping any folders the user already listed."""
    parts = [str(EXT_TRAINER_DIR)]
    for p in (existing or "").split(os.pathsep):
        if p and p not in parts:
            parts.append(p)
    return os.pathsep.join(parts)


def nnunet_env(workdir: Optional[os.PathLike] = None, cpu: bool = False,
               base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The variables to set: nnUNet_extTrainer always; nnUNet_raw/preprocessed/results under ``workdir`` when given
    (otherwise whatever ``base`` already has); the CPU-friendly knobs when ``cpu``."""
    base = dict(os.environ if base is None else base)
    env = {"nnUNet_extTrainer": ext_trainer_path(base.get("nnUNet_extTrainer"))}
    if workdir is not None:
        w = Path(workdir).absolute()
        env.update(nnUNet_raw=str(w / "nnUNet_raw"), nnUNet_preprocessed=str(w / "nnUNet_preprocessed"),
                   nnUNet_results=str(w / "nnUNet_results"))
    if cpu:
        env.update(CPU_FRIENDLY)
    return env


def subprocess_env(workdir: Optional[os.PathLike] = None, cpu: bool = False, training: bool = False,
                   extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """A full environment for running stock ``nnUNetv2_*`` commands as subprocesses (``training``: for
    nnUNetv2_train on a CPU machine, adds :data:`CPU_TRAINING`)."""
    env = dict(os.environ)
    env.update(nnunet_env(workdir, cpu))
    if cpu and training:
        env.update(CPU_TRAINING)
    elif env.get("nnUNet_n_proc_DA") == "0":
        env.pop("nnUNet_n_proc_DA")  # planning/preprocessing/prediction fail or gain nothing with 0
    if extra:
        env.update(extra)
    return env


def apply_env(workdir: Optional[os.PathLike] = None, cpu: bool = False) -> None:
    """Set the variables in this process (nnU-Net 2.8 reads its path variables at each use)."""
    os.environ.update(nnunet_env(workdir, cpu))


def shell_exports(env: Dict[str, str]) -> str:
    return "\n".join(f"export {k}={shlex.quote(v)}" for k, v in env.items())
