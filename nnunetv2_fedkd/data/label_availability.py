"""Which organs each training case annotates, from dataset.json, as the per-sample masks the partial-label losses take.

A pooled dataset (``nnunetv2_fedkd merge``) records per case which organs its site labelled::

    "fedkd": {"annotated": ["liver", "spleen", "kidney", "pancreas"],
              "case_annotated": {"liver_site__LiTS_0000": ["liver"], ...}, "case_site": {...}}

A single converted dataset records only ``annotated`` (every case labels the same organs). nnU-Net copies dataset.json
into the preprocessed folder and hands it to the trainer, and every batch carries its case identifiers in
``batch['keys']`` (in sample order, through oversampling, cropping and augmentation), so the lookup below is exact for
every sample of every batch. A dataset without the ``fedkd`` entry counts as fully annotated: the partial-label
losses then reduce to nnU-Net's own.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch


class LabelAvailabilityError(KeyError):
    pass


class LabelAvailability:
    """Lookup case identifier -> annotated foreground labels, for one dataset.json."""

    def __init__(self, dataset_json: dict):
        labels = dataset_json["labels"]
        # foreground label names in label-value order (nnU-Net: background = 0, organs 1..C-1); region-style values
        # (lists) are taken by their first value
        def value(v):
            return v[0] if isinstance(v, (list, tuple)) else v

        fg = sorted(((value(v), k) for k, v in labels.items() if value(v) != 0), key=lambda t: t[0])
        if [v for v, _ in fg] != list(range(1, len(fg) + 1)):
            raise LabelAvailabilityError(f"dataset.json labels must be 0..{len(fg)} without gaps, got {labels}")
        self.label_names: List[str] = [k for _, k in fg]
        meta = dataset_json.get("fedkd", {}) or {}
        default = meta.get("annotated", self.label_names)
        self._default = self._check(default, "fedkd.annotated")
        self._per_case: Dict[str, List[str]] = {
            case: self._check(organs, f"fedkd.case_annotated[{case!r}]")
            for case, organs in (meta.get("case_annotated") or {}).items()
        }

    def _check(self, organs: Sequence[str], where: str) -> List[str]:
        unknown = [o for o in organs if o not in self.label_names]
        if unknown:
            raise LabelAvailabilityError(f"dataset.json {where} names {unknown}, which are not among the labels "
                                         f"{self.label_names}")
        return list(organs)

    @property
    def num_foreground(self) -> int:
        return len(self.label_names)

    def annotated(self, case: str) -> List[str]:
        if self._per_case:
            if case not in self._per_case:
                raise LabelAvailabilityError(f"case {case!r} is not in dataset.json fedkd.case_annotated; was the "
                                             f"dataset changed after nnunetv2_fedkd merge?")
            return self._per_case[case]
        return self._default

    def annotating_nothing(self, keys: Optional[Sequence[str]] = None) -> List[str]:
        """Those of ``keys`` (default: every case the table names) that annotate no organ (``[]``: unlabelled images
        converted with ``--unlabelled-as-training``). A case the per-case table lacks is not counted here
        (:meth:`annotated` refuses it where its labels are used)."""
        if keys is None:
            keys = list(self._per_case)
        if not self._per_case:
            return [] if self._default else [str(k) for k in keys]
        return [str(k) for k in keys if str(k) in self._per_case and not self._per_case[str(k)]]

    def foreground_mask(self, keys: Sequence[str], device=None) -> torch.Tensor:
        """Bool ``[B, K]``: organ k (label value k+1) is annotated in case ``keys[b]`` (the sigmoid heads' mask)."""
        m = torch.zeros(len(keys), self.num_foreground, dtype=torch.bool)
        for b, case in enumerate(keys):
            for organ in self.annotated(str(case)):
                m[b, self.label_names.index(organ)] = True
        return m.to(device) if device is not None else m

    def softmax_mask(self, keys: Sequence[str], device=None) -> torch.Tensor:
        """Bool ``[B, K+1]``: column 0 (background) always True, then :meth:`foreground_mask`."""
        fg = self.foreground_mask(keys)
        m = torch.cat([torch.ones(len(keys), 1, dtype=torch.bool), fg], dim=1)
        return m.to(device) if device is not None else m
