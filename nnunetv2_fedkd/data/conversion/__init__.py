"""Converters from public CT segmentation datasets to nnU-Net v2 raw datasets with registry-mapped labels.

One module per source layout finds the cases (``msd``, ``kits``, ``lits``, ``btcv``, mirroring nnU-Net's own
``nnunetv2/dataset_conversion``); ``common`` validates and writes them case by case and makes dataset.json with
nnU-Net's ``generate_dataset_json`` (plus a ``"fedkd"`` block: label set, merges, source labels, cases).

    from nnunetv2_fedkd.data.conversion import convert_dataset
    convert_dataset("kits23", "/data/kits23", 220)            # -> $nnUNet_raw/Dataset220_KiTS23, labels {kidney: 1}
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Union

from . import btcv, kits, lits, msd
from .common import ConversionError, Source, SourceCase, convert_source, require_dir

FORMATS = ("msd", "kits19", "kits21", "kits23", "lits", "btcv")

_SCANNERS: Dict[str, Callable[[Path, str], Source]] = {
    "msd": msd.scan,
    "kits19": kits.scan,
    "kits21": kits.scan,
    "kits23": kits.scan,
    "lits": lits.scan,
    "btcv": btcv.scan,
}


def convert_dataset(
    fmt: str,
    input_dir: Union[str, os.PathLike],
    dataset_id: int,
    dataset_name: Optional[str] = None,
    keep_tumour: bool = False,
    organs: Optional[Sequence[str]] = None,
    overwrite: bool = False,
    nnunet_raw: Union[str, os.PathLike, None] = None,
    unlabelled_as_training: bool = False,
) -> Path:
    """Convert the public dataset in ``input_dir`` (layout ``fmt``, one of FORMATS) to
    ``<nnunet_raw>/DatasetXXX_<dataset_name>`` and return that folder.

    dataset_name: default from the source (MSD task name, "KiTS23", "LiTS", "BTCV").
    organs: registry keys to label (source labels map to themselves or their nearest listed ancestor, the rest to
        background); default: one binary label per annotated organ, tumours/cysts merged into it unless keep_tumour.
    overwrite: replace an existing target folder (only once the new one is complete).
    nnunet_raw: default: the nnUNet_raw environment variable.
    unlabelled_as_training: the source's unlabelled images become training cases that annotate no organ
        (``fedkd.case_annotated`` ``[]``), for ``nnUNetTrainerDualKD``; default: they go to imagesTs.
    Raises ConversionError with the case, file and problem; on any error nothing is left at the target path.
    """
    if fmt not in _SCANNERS:
        raise ConversionError(f"unknown dataset format {fmt!r}; known formats: {', '.join(FORMATS)}")
    source = _SCANNERS[fmt](require_dir(input_dir, "input folder"), fmt)
    return convert_source(source, dataset_id, dataset_name, keep_tumour, organs, overwrite, nnunet_raw,
                          unlabelled_as_training)


__all__ = ["FORMATS", "ConversionError", "Source", "SourceCase", "convert_dataset"]
