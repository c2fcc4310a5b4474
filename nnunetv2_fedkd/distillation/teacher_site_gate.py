"""Per-site teacher gate: a single-organ teacher speaks only at the sites where its predictions agree with the labels.

``min_teacher_dice`` (:func:`nnunetv2_fedkd.distillation.teachers.gate_teachers`) reads what a teacher recorded about itself while
training, on its own site's data. It cannot see domain shift: measured in this project, the liver teacher (trained at
the liver site) predicts liver on 42-72 % of the labelled kidney voxels of the kidney site's cases, so at that site
its word is worthless, while its recorded pseudo Dice is fine. This module scores every teacher against the labels
that exist at each site, from the teachers' predictions on the training cases (the cache of
:mod:`nnunetv2_fedkd.distillation.teacher_cache`), and turns the figures into a ``[num_sites, K]`` table "teacher ``k`` may speak
at site ``s``" that the MS-KD trainers fold into the ``active`` mask of the region KD.

Counts of one case (:func:`teacher_case_counts`). Teacher ``k`` distils organ ``c_k`` (a student class index,
1-based); the case has label map ``y`` (0 = background or not annotated), annotated organs ``A`` and valid voxels
``V = {i : y_i != ignore}``; the teacher claims ``P_k = {i in V : p_ki >= 0.5}``:

* own organ, if ``c_k in A``: ``tp_k = |P_k ∩ {y = c_k}|``, ``pred_k = |P_k|``, ``ref_k = |{y = c_k}|``
  (0 otherwise; ``own_cases_k`` counts the cases that annotate ``c_k``);
* every other annotated organ ``j in A, j != c_k``: ``claimed_kj = |P_k ∩ {y = j}|``,
  ``labelled_kj = |{y = j}|`` (label maps do not overlap, so every claimed voxel is a false positive).

Counts, not ratios, so they add up over a site's cases (:meth:`TeacherCounts.__add__`). Per site ``s`` (dataset.json
``fedkd.case_site``; a site's own dataset, e.g. a federated view dataset, is one site):

* ``Dice_sk = 2 Σ tp_k / (Σ pred_k + Σ ref_k)``, defined where ``Σ ref_k > 0`` (the site labels ``c_k`` and has some);
* ``FP_skj = Σ claimed_kj / Σ labelled_kj``, defined where ``Σ labelled_kj > 0``.

Rule (:func:`decide_site_gate`):

* ``FP_skj > max_teacher_fp_rate`` for some ``j``: teacher ``k`` is left out **at site s** (where it is wrong about
  the organs the site labels, it will be wrong about the organs the site does not label: same scanner, same
  protocol). Its other sites are not affected.
* ``Dice_sk < min_teacher_site_dice`` at some site ``s``: teacher ``k`` is left out **at every site**. At a site that
  labels ``c_k`` the teacher is silent anyway (the labels win: no KD from a teacher on a case that annotates its
  organ), so "left out at that site" would change nothing; the sites where it speaks are exactly those where its
  organ cannot be checked. A teacher shown not to find its own organ on real labelled data (its home site: it did not
  learn it; another site: it does not transfer) is not trusted where nobody can check it.

``max_teacher_fp_rate`` 1 and ``min_teacher_site_dice`` 0 leave every teacher on everywhere (the trainers then do
not score at all: today's behaviour and cost).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch

GATE_JSON = "teacher_gate.json"
PROB_THRESHOLD = 0.5  # a teacher claims a voxel where its foreground probability is >= this
METRIC_PREFIX = "teacher_gate"


@dataclass
class TeacherCounts:
    """Voxel counts of K teachers over C foreground classes (one case, or summed over a site's cases).

    ``tp``/``pred``/``ref`` ``[K]``: true positives, claimed voxels and labelled voxels of each teacher's own organ,
    over the cases that annotate it (``own_cases`` ``[K]`` of them); ``claimed``/``labelled`` ``[K, C]``: voxels
    labelled as foreground class ``j + 1`` (another organ than teacher ``k``'s, annotated by the case) that teacher
    ``k`` claims / that there are; ``cases``: how many cases were counted."""

    tp: np.ndarray
    pred: np.ndarray
    ref: np.ndarray
    own_cases: np.ndarray
    claimed: np.ndarray
    labelled: np.ndarray
    cases: int = 0

    @classmethod
    def zeros(cls, num_teachers: int, num_classes: int) -> "TeacherCounts":
        k, c = int(num_teachers), int(num_classes)
        z = lambda *s: np.zeros(s, np.int64)  # noqa: E731
        return cls(z(k), z(k), z(k), z(k), z(k, c), z(k, c), 0)

    def __add__(self, other: "TeacherCounts") -> "TeacherCounts":
        if self.claimed.shape != other.claimed.shape:
            raise ValueError(f"TeacherCounts: cannot add counts of shape {self.claimed.shape} and "
                             f"{other.claimed.shape}")
        return TeacherCounts(self.tp + other.tp, self.pred + other.pred, self.ref + other.ref,
                             self.own_cases + other.own_cases, self.claimed + other.claimed,
                             self.labelled + other.labelled, self.cases + other.cases)

    def dice(self) -> List[Optional[float]]:
        """Per teacher ``2 tp / (pred + ref)``; None where ``ref == 0`` (no labelled voxel of its organ)."""
        return [None if r == 0 else 2.0 * float(t) / float(p + r) for t, p, r in zip(self.tp, self.pred, self.ref)]

    def fp_rate(self) -> List[List[Optional[float]]]:
        """``[K][C]``: ``claimed / labelled``; None where nothing of that class is labelled."""
        return [[None if n == 0 else float(c) / float(n) for c, n in zip(cr, nr)]
                for cr, nr in zip(self.claimed, self.labelled)]


def teacher_case_counts(probs, label, teacher_classes: Sequence[int], annotated: Collection[int], num_classes: int,
                        threshold: float = PROB_THRESHOLD, ignore_label: Optional[int] = None) -> TeacherCounts:
    """The counts of one case (formulas in the module docstring).

    Args:
        probs: ``[K, *S]`` each teacher's foreground probability for its organ (numpy, memory-mapped or a tensor;
            read one teacher at a time).
        label: ``[*S]`` or ``[1, *S]`` label map in the student's class indices (0 = background or not annotated;
            nnU-Net's -1 outside the body crop counts as background).
        teacher_classes: ``K`` student class indices ``c_k`` in ``1..num_classes``.
        annotated: the class indices the case annotates.
        num_classes: number of foreground classes ``C``.
        threshold: a teacher claims a voxel where ``p >= threshold``.
        ignore_label: a label value that marks unknown voxels (nnU-Net's ignore label), left out of every count.
    """
    if isinstance(probs, torch.Tensor):
        probs = probs.detach().cpu().numpy()
    y = np.asarray(label)
    probs_shape = tuple(probs.shape)
    if y.ndim == len(probs_shape) and y.shape[0] == 1:
        y = y[0]
    if tuple(y.shape) != probs_shape[1:]:
        raise ValueError(f"teacher_case_counts: probabilities {probs_shape} do not fit the label map {y.shape}")
    K, C = len(teacher_classes), int(num_classes)
    if probs_shape[0] != K:
        raise ValueError(f"teacher_case_counts: {probs_shape[0]} teacher channels for {K} teacher classes")
    for name, values in (("teacher_classes", teacher_classes), ("annotated", annotated)):
        bad = [int(v) for v in values if not 1 <= int(v) <= C]
        if bad:
            raise ValueError(f"teacher_case_counts: {name} {bad} are not foreground classes 1..{C}")
    ann = sorted({int(j) for j in annotated})
    masks = {j: y == j for j in ann}
    sizes = {j: int(m.sum()) for j, m in masks.items()}
    valid = None if ignore_label is None else (y != ignore_label)
    out = TeacherCounts.zeros(K, C)
    out.cases = 1
    for k, ck in enumerate(int(c) for c in teacher_classes):
        claim = np.asarray(probs[k]) >= threshold
        if valid is not None:
            claim &= valid
        if ck in masks:
            out.own_cases[k] = 1
            out.tp[k] = int(np.count_nonzero(claim & masks[ck]))
            out.pred[k] = int(np.count_nonzero(claim))
            out.ref[k] = sizes[ck]
        for j in ann:
            if j != ck:
                out.claimed[k, j - 1] = int(np.count_nonzero(claim & masks[j]))
                out.labelled[k, j - 1] = sizes[j]
    return out


def case_sites(dataset_json: Mapping[str, Any], identifiers: Sequence[str], default_site: str) -> Dict[str, str]:
    """Case -> site: dataset.json ``fedkd.case_site`` (a pooled dataset, a federated view dataset), else
    ``default_site`` (a site's own dataset is one site)."""
    table = ((dataset_json.get("fedkd") or {}).get("case_site")) or {}
    return {str(i): str(table.get(str(i), default_site)) for i in identifiers}


def score_sites(identifiers: Sequence[str], load: Callable[[str], tuple], annotated: Callable[[str], Collection[int]],
                site_of: Mapping[str, str], teacher_classes: Sequence[int], num_classes: int,
                threshold: float = PROB_THRESHOLD, ignore_label: Optional[int] = None) -> Dict[str, TeacherCounts]:
    """Sum :func:`teacher_case_counts` over each site's cases. ``load(case) -> (probs [K, *S], label)``,
    ``annotated(case)`` -> class indices. Returns ``{site: counts}`` in first-seen order."""
    out: Dict[str, TeacherCounts] = {}
    for ident in identifiers:
        probs, label = load(ident)
        counts = teacher_case_counts(probs, label, teacher_classes, annotated(ident), num_classes, threshold,
                                     ignore_label)
        site = site_of[str(ident)]
        out[site] = out[site] + counts if site in out else counts
    return out


@dataclass
class SiteGateDecision:
    """What :func:`decide_site_gate` decided: ``ok[s, k]`` (teacher ``k`` may speak at ``sites[s]``), the figures
    behind it (``figures[site][teacher]``) and one log line per figure."""

    sites: List[str]
    teachers: List[str]
    ok: np.ndarray
    figures: Dict[str, Dict[str, Dict[str, Any]]]
    lines: List[str] = field(default_factory=list)

    def table(self) -> Dict[str, Dict[str, bool]]:
        return {s: {t: bool(self.ok[i, k]) for k, t in enumerate(self.teachers)} for i, s in enumerate(self.sites)}


def _pct(x: float) -> str:
    return f"{100.0 * x:.1f} %"


def decide_site_gate(counts: Mapping[str, TeacherCounts], teachers: Sequence[str], teacher_classes: Sequence[int],
                     class_names: Sequence[str], max_fp_rate: float, min_site_dice: float,
                     describe: Optional[Sequence[str]] = None) -> SiteGateDecision:
    """The rule of the module docstring, over ``{site: counts}``.

    ``teachers``: K unique short names (the keys of the figures, e.g. the organ); ``describe``: how each teacher is
    named in the log lines (default: ``teachers``); ``class_names``: the C foreground class names (index ``j`` is
    class ``j + 1``). A teacher is left out at site ``s`` where it claims more than ``max_fp_rate`` of the labelled
    voxels of another organ there, and at every site when its Dice on its own organ at some site that labels it is
    below ``min_site_dice``."""
    sites = list(counts)
    K = len(teachers)
    describe = list(describe or teachers)
    ok = np.ones((len(sites), K), bool)
    off_everywhere = np.zeros(K, bool)
    figures: Dict[str, Dict[str, Dict[str, Any]]] = {}
    fp_lines, dice_lines = [], []
    for s, site in enumerate(sites):
        cnt = counts[site]
        dice, fp = cnt.dice(), cnt.fp_rate()
        figures[site] = {}
        for k, name in enumerate(teachers):
            own = class_names[int(teacher_classes[k]) - 1]
            fig: Dict[str, Any] = {"cases": int(cnt.cases), "own_organ_cases": int(cnt.own_cases[k]),
                                   "dice": None if dice[k] is None else round(dice[k], 4), "fp_rate": {},
                                   "claimed_voxels": {}, "labelled_voxels": {}}
            for j, rate in enumerate(fp[k]):
                if rate is None:
                    continue
                other = class_names[j]
                fig["fp_rate"][other] = round(rate, 4)
                fig["claimed_voxels"][other] = int(cnt.claimed[k, j])
                fig["labelled_voxels"][other] = int(cnt.labelled[k, j])
                bad = rate > max_fp_rate
                ok[s, k] &= not bad
                fp_lines.append(f"teacher {describe[k]}: at site {site} it claims {_pct(rate)} of the labelled {other} "
                                f"voxels ({int(cnt.claimed[k, j])}/{int(cnt.labelled[k, j])}; max_teacher_fp_rate "
                                f"{max_fp_rate}): {'left out there' if bad else 'may speak there'}")
            if dice[k] is not None:
                bad = dice[k] < min_site_dice
                off_everywhere[k] |= bad
                dice_lines.append(f"teacher {describe[k]}: at site {site}, which labels {own} "
                                  f"({int(cnt.own_cases[k])} cases), its Dice on {own} is {dice[k]:.3f} "
                                  f"(min_teacher_site_dice {min_site_dice}): "
                                  f"{'left out at every site' if bad else 'ok'}")
            figures[site][name] = fig
    ok &= ~off_everywhere[None, :]
    for s, site in enumerate(sites):
        for k, name in enumerate(teachers):
            figures[site][name]["speaks"] = bool(ok[s, k])
    summary = []
    for k in range(K):
        on = [site for s, site in enumerate(sites) if ok[s, k]]
        off = [site for s, site in enumerate(sites) if not ok[s, k]]
        summary.append(f"teacher {describe[k]}: may speak at {on or 'no site'}"
                       + (f"; left out at {off}" if off else ""))
    return SiteGateDecision(sites, list(teachers), ok, figures, dice_lines + fp_lines + summary)


class TeacherSiteGate:
    """The ``[num_sites, K]`` table at training time: :meth:`allowed` maps a batch's case keys to ``[B, K]``."""

    def __init__(self, sites: Sequence[str], ok, case_site: Mapping[str, str], default_site: str):
        self.sites = list(sites)
        self.ok = torch.as_tensor(np.asarray(ok, bool))
        if self.ok.ndim != 2 or self.ok.shape[0] != len(self.sites):
            raise ValueError(f"TeacherSiteGate: table of shape {tuple(self.ok.shape)} for {len(self.sites)} sites")
        self.case_site, self.default_site = dict(case_site), str(default_site)
        self._row = {s: i for i, s in enumerate(self.sites)}

    @property
    def num_teachers(self) -> int:
        return int(self.ok.shape[1])

    def allowed(self, keys: Sequence[str], device=None) -> torch.Tensor:
        """``[B, K]`` bool: may teacher ``k`` speak on case ``keys[b]`` (by its site; a site without figures: yes)."""
        rows = []
        ones = torch.ones(self.num_teachers, dtype=torch.bool)
        for key in keys:
            r = self._row.get(self.case_site.get(str(key), self.default_site))
            rows.append(ones if r is None else self.ok[r])
        out = torch.stack(rows) if rows else torch.zeros(0, self.num_teachers, dtype=torch.bool)
        return out.to(device) if device is not None else out


def unique_teacher_names(organs: Sequence[Optional[str]]) -> List[str]:
    """Short names for the figures: the organ, with ``#k`` where several teachers teach the same organ."""
    names = [o or f"teacher{k}" for k, o in enumerate(organs)]
    return [f"{n}#{k}" if names.count(n) > 1 else n for k, n in enumerate(names)]


def gate_metrics(decision: SiteGateDecision) -> Dict[str, float]:
    """Flat numeric figures for a federated site's update metrics (Flower's ``MetricRecord`` takes numbers only):
    ``teacher_gate.<teacher>.dice``, ``teacher_gate.<teacher>.fp_rate.<organ>``, ``teacher_gate.<teacher>.speaks``
    (1/0); with more than one site in the table the site is named after the prefix
    (``teacher_gate.<site>.<teacher>...``). Undefined figures are left out."""
    out: Dict[str, float] = {}
    for site in decision.sites:
        prefix = METRIC_PREFIX if len(decision.sites) == 1 else f"{METRIC_PREFIX}.{site}"
        for t, fig in decision.figures[site].items():
            if fig.get("dice") is not None and math.isfinite(fig["dice"]):
                out[f"{prefix}.{t}.dice"] = float(fig["dice"])
            for organ, rate in fig["fp_rate"].items():
                out[f"{prefix}.{t}.fp_rate.{organ}"] = float(rate)
            out[f"{prefix}.{t}.speaks"] = int(bool(fig["speaks"]))
    return out
