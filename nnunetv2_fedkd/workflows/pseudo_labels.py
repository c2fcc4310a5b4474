"""``nnunetv2_fedkd pseudo-label``: the baseline any nnU-Net user can run today - pseudo-labels from single-organ
teachers, then ONE stock nnU-Net.

Recipe (every step but this one is a stock nnU-Net command)::

    nnUNetv2_train <site dataset> 3d_fullres all          # at each site: one single-organ teacher
    nnunetv2_fedkd pseudo-label federation.toml --teachers <results folder> ... -d 512
    nnUNetv2_plan_and_preprocess -d 512 -c 3d_fullres --verify_dataset_integrity
    nnUNetv2_train 512 3d_fullres all                     # stock nnUNetTrainer
    nnUNetv2_predict ... -d 512 ...; nnUNetv2_evaluate_folder ...

Every teacher (an ordinary nnU-Net results folder ``<nnUNet_results>/DatasetXXX/<trainer>__<plans>__<config>``)
predicts, with stock ``nnUNetv2_predict --save_probabilities``, the training images of every site that does not
label its organ. Per case the teachers' probabilities and the case's own labels are merged into one label map in the
federation's global label set (:func:`merge_pseudo_labels`, the rules are in its docstring) and the result is written
as a new ordinary nnU-Net raw dataset: images hard-linked (or copied), pseudo label maps in ``labelsTr``, and
``dataset.json`` with nnU-Net's ignore label (``"ignore"`` = highest label + 1; stock nnU-Net leaves those voxels
out of its loss, see nnU-Net's documentation/ignore_label.md). It is built in a temporary sibling folder and renamed
when complete.

Thresholds (defaults ``high=0.7``, ``low=0.3``): a teacher is *confident* that a voxel is its organ when
``p >= high`` and that it is not when ``p < low``; between the two it is *unsure*. nnU-Net's own label map is the
argmax, i.e. ``p >= 0.5`` for a 2-class teacher; the symmetric band 0.3..0.7 around that decision is the rim where
a single-organ teacher's errors concentrate (organ borders, partial volume, the neighbouring organ it never saw
labelled), and it is the only place where the two choices differ, so the student is trained on nothing the teacher
is unsure about while keeping almost every organ voxel. ``low == high == 0.5`` gives the plain argmax merge (conflicts
still become ignore).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from nnunetv2_fedkd.data.conversion.common import ConversionError, resolve_nnunet_raw, target_folder
from nnunetv2_fedkd.utils import atomic_output_dir, read_json

FILE_ENDING = ".nii.gz"
DEFAULT_HIGH = 0.7
DEFAULT_LOW = 0.3
PSEUDO_LABELS_RECORD = "pseudo_labels.json"


class PseudoLabelError(ConversionError):
    """The input is wrong (a teacher, a source dataset, a threshold); the message names the file or teacher."""


# ----------------------------------------------------------------------------------------------------------------
# the merge (pure numpy)
# ----------------------------------------------------------------------------------------------------------------

def merge_pseudo_labels(labels: np.ndarray, annotated: Iterable[int], teacher_probabilities: Mapping[int, np.ndarray],
                        ignore_label: int, high: float = DEFAULT_HIGH, low: float = DEFAULT_LOW,
                        counts: Optional[Dict[str, Any]] = None) -> np.ndarray:
    """Merge one case's own (partial) labels and its single-organ teachers' probabilities into one label map.

    ``labels``: the case's label map in the global label set (0 = background or not annotated); ``annotated``: the
    label values the case annotates; ``teacher_probabilities``: label value k -> teacher k's probability of organ k
    (same shape as ``labels``); ``ignore_label``: nnU-Net's ignore value (highest label + 1).

    Rules, in order of precedence:

    1. **The label wins.** A voxel the case labels as an annotated organ keeps that label.
    2. Teachers of the organs the case annotates are **not consulted** at all (their organ is known: the case's
       "not that organ" stays).
    3. Of the other teachers, each is *confident yes* (``p >= high``), *confident no* (``p < low``) or *unsure*
       (``low <= p < high``). A voxel where **two or more teachers say yes** (conflict) or **any teacher is unsure**
       becomes ``ignore_label``.
    4. A voxel where **exactly one teacher says yes** and every other consulted teacher says no becomes that organ.
    5. Everything else (every consulted teacher says no) is background. An organ without a teacher counts as
       background where the case does not label it (what stock nnU-Net would assume).

    Requires ``0 < low <= high <= 1``; ``low == high`` has no unsure band. Returns a uint8 map (uint16 when
    ``ignore_label`` > 255). If ``counts`` is a dict it receives voxel counts: ``labelled`` (rule 1), ``conflict``,
    ``unsure`` (among the rest; a voxel that is both counts as conflict), ``ignore`` and ``pseudo`` (organ value ->
    voxels given by rule 4).
    """
    if not 0 < low <= high <= 1:
        raise ValueError(f"thresholds must satisfy 0 < low <= high <= 1, got low={low}, high={high}")
    labels = np.asarray(labels)
    annotated = sorted({int(a) for a in annotated})
    if any(a == 0 or a == ignore_label for a in annotated):
        raise ValueError(f"annotated label values must be organs, not 0 or the ignore label: {annotated}")
    present = np.unique(labels)
    stray = sorted(set(int(v) for v in present) - {0, *annotated})
    if stray:
        raise ValueError(f"the case's labels contain values {stray} that it does not annotate ({annotated})")
    consulted = sorted(int(k) for k in teacher_probabilities if int(k) not in annotated)
    if ignore_label in consulted or 0 in consulted:
        raise ValueError(f"teacher label values must be organs, not 0 or the ignore label: {consulted}")
    dtype = np.uint8 if ignore_label <= 255 else np.uint16
    out = np.zeros(labels.shape, dtype=dtype)
    n_yes = np.zeros(labels.shape, dtype=np.uint8)
    unsure = np.zeros(labels.shape, dtype=bool)
    for k in consulted:
        p = np.asarray(teacher_probabilities[k])
        if p.shape != labels.shape:
            raise ValueError(f"teacher {k}: probabilities of shape {p.shape}, labels of shape {labels.shape}")
        if not np.isfinite(p).all():
            raise ValueError(f"teacher {k}: probabilities are not all finite")
        yes = p >= high
        n_yes += yes
        out[yes] = k
        unsure |= (p >= low) & ~yes
    conflict = n_yes >= 2
    out[conflict | unsure] = ignore_label
    labelled = labels != 0
    out[labelled] = labels[labelled]
    if counts is not None:
        rest = ~labelled
        counts["labelled"] = int(labelled.sum())
        counts["conflict"] = int((conflict & rest).sum())
        counts["unsure"] = int((unsure & ~conflict & rest).sum())
        counts["ignore"] = int((out == ignore_label).sum())
        counts["pseudo"] = {k: int(((out == k) & rest).sum()) for k in consulted}
    return out


# ----------------------------------------------------------------------------------------------------------------
# teachers
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class Teacher:
    """A single-organ nnU-Net: ``folder`` = ``<nnUNet_results>/DatasetXXX_Name/<trainer>__<plans>__<configuration>``,
    the registry ``organ`` it segments, the ``folds`` to use (several: nnU-Net averages them)."""

    folder: Path
    organ: str
    folds: Tuple[str, ...]

    @property
    def dataset(self) -> str:
        return self.folder.parent.name

    @property
    def results(self) -> Path:
        return self.folder.parent.parent

    @property
    def trainer_plans_configuration(self) -> Tuple[str, str, str]:
        parts = self.folder.name.split("__")
        if len(parts) != 3:
            raise PseudoLabelError(f"teacher {self.folder}: not an nnU-Net results folder "
                                   f"(<trainer>__<plans>__<configuration>)")
        return parts[0], parts[1], parts[2]

    def dataset_json(self) -> dict:
        return _read_json(self.folder / "dataset.json", f"teacher {self.folder}")

    def plans(self) -> dict:
        return _read_json(self.folder / "plans.json", f"teacher {self.folder}")

    def describe(self) -> dict:
        return {"folder": str(self.folder), "organ": self.organ, "folds": list(self.folds)}


def _read_json(path: Path, who: str) -> dict:
    return read_json(path, who, PseudoLabelError)


def _label_value(v) -> Tuple[int, ...]:
    return tuple(int(x) for x in v) if isinstance(v, (list, tuple)) else (int(v),)


def resolve_teacher(teacher: Any, default_results: Optional[Path] = None, organ: Optional[str] = None,
                    folds: Optional[Sequence[str]] = None) -> Teacher:
    """A :class:`Teacher` from a :class:`Teacher`, a :class:`nnunetv2_fedkd.workflows.student_vs_teachers.Model` (its results
    folder under ``default_results`` unless it names its own), a results folder path, or ``"ORGAN=FOLDER"``. The organ
    is the one given, else the only organ the teacher's dataset.json records as annotated (``fedkd.annotated``), else
    its only foreground label; the folds are those given, else every ``fold_*`` with a ``checkpoint_final.pth``."""
    if isinstance(teacher, Teacher):
        return teacher
    if hasattr(teacher, "folder") and hasattr(teacher, "trainer") and hasattr(teacher, "fold"):  # a Model
        if teacher.results is None and default_results is None:
            raise PseudoLabelError(f"teacher {teacher.dataset}/{teacher.trainer}: no nnUNet_results to find it in")
        fold_folder = teacher.folder(default_results)
        return resolve_teacher(fold_folder.parent, organ=organ or teacher.organ, folds=folds or [teacher.fold])
    text = str(teacher)
    if organ is None and "=" in text and not Path(text).exists():
        organ, text = text.split("=", 1)
    folder = Path(text).expanduser().absolute()
    who = f"teacher {folder}"
    if not folder.is_dir():
        raise PseudoLabelError(f"{who}: no such folder (give <nnUNet_results>/DatasetXXX_Name/"
                               f"<trainer>__<plans>__<configuration>)")
    if folder.name.startswith("fold_") and (folder / "checkpoint_final.pth").is_file():  # a fold folder was given
        folds = folds or [folder.name[len("fold_"):]]
        folder = folder.parent
        who = f"teacher {folder}"
    dj = _read_json(folder / "dataset.json", who)
    _read_json(folder / "plans.json", who)
    if len(folder.name.split("__")) != 3:
        raise PseudoLabelError(f"{who}: not an nnU-Net results folder (<trainer>__<plans>__<configuration>)")
    fg = [k for k, v in dj.get("labels", {}).items() if k not in ("background", "ignore")]
    if organ is None:
        annotated = list((dj.get("fedkd") or {}).get("annotated") or [])
        cands = annotated if annotated else fg
        if len(cands) != 1:
            raise PseudoLabelError(f"{who}: {folder / 'dataset.json'} has labels {fg}; say which organ this teacher "
                                   f"segments (ORGAN={folder})")
        organ = cands[0]
    if organ not in fg:
        raise PseudoLabelError(f"{who}: its dataset.json has no label {organ!r} (labels: {fg})")
    if folds:
        folds = tuple(str(f) for f in folds)
        for f in folds:
            if not (folder / f"fold_{f}" / "checkpoint_final.pth").is_file():
                raise PseudoLabelError(f"{who}: {folder / f'fold_{f}' / 'checkpoint_final.pth'} does not exist "
                                       f"(is the teacher trained?)")
    else:
        folds = tuple(sorted(p.parent.name[len("fold_"):] for p in folder.glob("fold_*/checkpoint_final.pth")))
        if not folds:
            raise PseudoLabelError(f"{who}: no fold_*/checkpoint_final.pth (is the teacher trained?)")
    return Teacher(folder, organ, folds)


def teacher_channel(teacher: Teacher) -> int:
    """Index of the teacher's organ in the probabilities nnU-Net saves (``--save_probabilities``): the label's
    position in nnU-Net's label manager (softmax: one channel per label value, background first; sigmoid regions:
    one channel per foreground region)."""
    from nnunetv2.utilities.label_handling.label_handling import LabelManager, get_labelmanager_class_from_plans

    dj, plans = teacher.dataset_json(), teacher.plans()
    cls = get_labelmanager_class_from_plans(plans) if "label_manager" in plans else LabelManager
    lm = cls(label_dict=dj["labels"], regions_class_order=dj.get("regions_class_order"))
    value = _label_value(dj["labels"][teacher.organ])
    if lm.has_regions:
        regions = [_label_value(r) for r in lm.foreground_regions]
        if value not in regions:
            raise PseudoLabelError(f"teacher {teacher.folder}: region {value} of {teacher.organ!r} is not among its "
                                   f"regions {regions}")
        return regions.index(value)
    if len(value) != 1:
        raise PseudoLabelError(f"teacher {teacher.folder}: label {teacher.organ!r} = {list(value)} is not a single "
                               f"value")
    return list(lm.all_labels).index(value[0])


def _teacher_reader(teacher: Teacher) -> str:
    rw = teacher.plans().get("image_reader_writer")
    if not rw:
        raise PseudoLabelError(f"teacher {teacher.folder}: plans.json has no 'image_reader_writer'")
    return rw


def _reader(name: str):
    from nnunetv2.imageio.reader_writer_registry import recursive_find_reader_writer_by_name

    return recursive_find_reader_writer_by_name(name)()


def to_reader_order(probability: np.ndarray, image_files: Sequence[Path], teacher_reader: str, dataset_reader: str,
                    scratch: Path) -> np.ndarray:
    """A teacher's probability map (``[*shape]`` in the array order of the reader the teacher predicted with) in the
    array order of ``dataset_reader`` (nnU-Net's readers differ: SimpleITKIO keeps the file's axes,
    NibabelIOWithReorient reorients to RAS). Same reader: returned unchanged. Otherwise the map goes through the
    files: written as an image (quantised to 1/250) with the teacher's reader and the case image's geometry, read
    back with the dataset's reader."""
    if teacher_reader == dataset_reader:
        return probability
    trw, drw = _reader(teacher_reader), _reader(dataset_reader)
    _, props = trw.read_images([str(f) for f in image_files])
    scratch.mkdir(parents=True, exist_ok=True)
    f = scratch / f"reorient{FILE_ENDING}"
    trw.write_seg(np.rint(np.clip(probability, 0, 1) * 250).astype(np.uint8), str(f), props)
    arr, _ = drw.read_seg(str(f))
    f.unlink()
    return arr[0].astype(np.float32) / 250


def predict_teacher(teacher: Teacher, images: Path, out: Path, workdir: Optional[Path], cpu: bool = True,
                    tta: bool = False, log_dir: Optional[Path] = None) -> Path:
    """Stock ``nnUNetv2_predict --save_probabilities`` of ``teacher`` on ``images`` into ``out``."""
    from nnunetv2_fedkd.workflows.pipeline import predict

    trainer, plans, configuration = teacher.trainer_plans_configuration
    if out.exists():
        shutil.rmtree(out)
    return predict(images, out, teacher.dataset, trainer, workdir, fold=list(teacher.folds), plans=plans, cpu=cpu,
                   tta=tta, log_dir=log_dir, extra_env={"nnUNet_results": str(teacher.results)},
                   save_probabilities=True, configuration=configuration)


# ----------------------------------------------------------------------------------------------------------------
# the source: a federation spec (its sites' datasets) or a pooled dataset written by `merge`
# ----------------------------------------------------------------------------------------------------------------

def _stage_source(source, raw: Path, tmp: Path) -> Tuple[Dict[str, int], Dict[str, List[str]], Dict[str, str],
                                                       Dict[str, str], str, str]:
    """Write the source's training cases into ``tmp/imagesTr`` (links) and ``tmp/labelsTr`` (labels in the global
    label set). Returns (organ -> label value, case -> annotated organs, case -> site, channel_names, reader name,
    a description of the source)."""
    from nnunetv2_fedkd.data.pooled import (_link_or_copy, common_channel_names, global_label_values,
                                               write_remapped_cases)
    from nnunetv2_fedkd.spec import FederationSpec, check_datasets

    (tmp / "imagesTr").mkdir()
    (tmp / "labelsTr").mkdir()
    if isinstance(source, FederationSpec):
        from nnunetv2_fedkd.data.conversion.common import IMAGE_READER

        check_datasets(source, raw)
        values = global_label_values(source)
        channel_names = common_channel_names(source, raw)
        case_annotated, case_site = {}, {}
        for site in source.sites:
            for case, organs in write_remapped_cases(site, raw, tmp, values, case_prefix=f"{site.name}__").items():
                case_annotated[case] = organs
                case_site[case] = site.name
        return values, case_annotated, case_site, channel_names, IMAGE_READER, f"federation spec {source.path}"
    folder = Path(source)
    if not folder.is_absolute() and not folder.exists():
        folder = raw / folder
    dj_file = folder / "dataset.json"
    dj = _read_json(dj_file, f"source dataset {folder}")
    meta = dj.get("fedkd") or {}
    case_annotated = meta.get("case_annotated")
    if not case_annotated:
        raise PseudoLabelError(f"{dj_file} has no fedkd.case_annotated: give a pooled dataset written by "
                               f"'nnunetv2_fedkd merge', or the federation spec")
    if dj.get("file_ending", FILE_ENDING) != FILE_ENDING:
        raise PseudoLabelError(f"{dj_file}: file ending {dj.get('file_ending')} ({FILE_ENDING} expected)")
    labels = dj["labels"]
    if "ignore" in labels:
        raise PseudoLabelError(f"{dj_file} already has an ignore label")
    values = {k: int(v) for k, v in labels.items() if k != "background"}
    if sorted(values.values()) != list(range(1, len(values) + 1)):
        raise PseudoLabelError(f"{dj_file}: labels must be 0..n without gaps and without regions, got {labels}")
    n_channels = len(dj["channel_names"])
    for case, organs in case_annotated.items():
        unknown = [o for o in organs if o not in values]
        if unknown:
            raise PseudoLabelError(f"{dj_file}: case {case} annotates {unknown}, which are not among its labels")
        lab = folder / "labelsTr" / f"{case}{FILE_ENDING}"
        if not lab.is_file():
            raise PseudoLabelError(f"{dj_file} lists case {case}, but {lab} does not exist")
        shutil.copy2(lab, tmp / "labelsTr" / lab.name)
        for ch in range(n_channels):
            img = folder / "imagesTr" / f"{case}_{ch:04d}{FILE_ENDING}"
            if not img.is_file():
                raise PseudoLabelError(f"case {case}: {img} is missing")
            _link_or_copy(img, tmp / "imagesTr" / img.name)
    reader = dj.get("overwrite_image_reader_writer")
    if not reader or reader == "None":
        from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_file_ending

        example = next(iter((tmp / "labelsTr").glob(f"*{FILE_ENDING}")))
        reader = determine_reader_writer_from_file_ending(FILE_ENDING, str(example), verbose=False).__name__
    return (values, {c: list(o) for c, o in case_annotated.items()}, dict(meta.get("case_site") or {}),
            dj["channel_names"], reader, f"pooled dataset {folder}")


def _default_name(source) -> str:
    from nnunetv2_fedkd.data.pooled import federation_dataset_name
    from nnunetv2_fedkd.spec import FederationSpec

    if isinstance(source, FederationSpec):
        return federation_dataset_name(source, "PseudoLabels")
    name = Path(source).name.split("_", 1)[-1]
    return (name[: -len("Pooled")] if name.endswith("Pooled") else name) + "PseudoLabels"


# ----------------------------------------------------------------------------------------------------------------
# the dataset
# ----------------------------------------------------------------------------------------------------------------

Predictor = Callable[[Teacher, Path, Path], Path]


def build_pseudo_label_dataset(
        source, teachers: Sequence[Any], dataset_id: int, workdir: Optional[os.PathLike] = None, *,
        high: float = DEFAULT_HIGH, low: float = DEFAULT_LOW, dataset_name: Optional[str] = None,
        nnunet_raw: Optional[os.PathLike] = None, predictions_dir: Optional[os.PathLike] = None,
        overwrite: bool = False, cpu: bool = True, tta: bool = False, log_dir: Optional[os.PathLike] = None,
        predictor: Optional[Predictor] = None) -> Path:
    """Write ``$nnUNet_raw/DatasetXXX_<name>``: the source's training cases with pseudo label maps from
    ``teachers`` (rules: :func:`merge_pseudo_labels`), nnU-Net's ignore label in dataset.json. Returns the folder.

    ``source``: a :class:`~nnunetv2_fedkd.spec.FederationSpec` (its sites' converted datasets, as ``merge`` pools
    them; case ids ``<site>__<case>``) or a pooled dataset folder written by ``nnunetv2_fedkd merge`` (a path, or a
    folder name under nnUNet_raw). ``teachers``: single-organ teachers, each a results folder path,
    ``"ORGAN=FOLDER"``, a :class:`Teacher` or a :class:`~nnunetv2_fedkd.workflows.student_vs_teachers.Model`; at most one per
    organ of the federation. ``workdir``: nnU-Net folders under it (``nnUNet_raw``, ``nnUNet_results`` as the
    benchmarks lay them out); None: the ``nnUNet_*`` environment variables. ``predictions_dir``: where the teachers'
    predictions (``<organ>/<case>.npz``) go and stay; None: a temporary folder, deleted at the end. ``cpu``/``tta``:
    passed to ``nnUNetv2_predict`` (``-device cpu``; test-time mirroring). ``predictor(teacher, images, out)``
    replaces stock prediction (tests). Nothing appears at the target until every case is written.

    dataset.json records under ``fedkd.pseudo_labels`` the teachers, thresholds and ignore value, and the source
    cases' annotated organs; ``pseudo_labels.json`` in the dataset folder has the per-case voxel counts.
    """
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    from nnunetv2_fedkd import organs as reg
    from nnunetv2_fedkd.env import subprocess_env

    if not 0 < low <= high <= 1:
        raise PseudoLabelError(f"thresholds must satisfy 0 < low <= high <= 1, got low={low}, high={high}")
    t_start = time.perf_counter()
    workdir = None if workdir is None else Path(workdir).absolute()
    env = subprocess_env(workdir)
    raw = resolve_nnunet_raw(nnunet_raw if nnunet_raw is not None else env.get("nnUNet_raw"))
    default_results = Path(env["nnUNet_results"]) if env.get("nnUNet_results") else None
    resolved = [resolve_teacher(t, default_results) for t in teachers]
    by_organ: Dict[str, Teacher] = {}
    for t in resolved:
        if t.organ in by_organ:
            raise PseudoLabelError(f"two teachers for organ {t.organ!r}: {by_organ[t.organ].folder} and {t.folder} "
                                   f"(train one model with several folds and pass it once, or pick one)")
        by_organ[t.organ] = t
    channels = {o: teacher_channel(t) for o, t in by_organ.items()}
    readers = {o: _teacher_reader(t) for o, t in by_organ.items()}
    final = target_folder(dataset_id, dataset_name or _default_name(source), raw)
    log_dir = None if log_dir is None else Path(log_dir)
    predict_fn = predictor or (lambda t, images, out: predict_teacher(t, images, out, workdir, cpu=cpu, tta=tta,
                                                                      log_dir=log_dir))
    own_predictions = predictions_dir is None
    pred_root = Path(tempfile.mkdtemp(prefix="fedkd_pseudo_", dir=workdir)) if own_predictions \
        else Path(predictions_dir).absolute()
    record: Dict[str, Any] = {}
    try:
        with atomic_output_dir(final, overwrite) as tmp:
            values, case_annotated, case_site, channel_names, reader, described = _stage_source(source, raw, tmp)
            for organ, t in by_organ.items():
                if organ not in values:
                    raise PseudoLabelError(f"teacher {t.folder} segments {organ!r}, which is not among the "
                                           f"federation's labels {list(values)}")
                n_ch = len(t.dataset_json().get("channel_names", {}))
                if n_ch != len(channel_names):
                    raise PseudoLabelError(f"teacher {t.folder} takes {n_ch} input channels, the dataset has "
                                           f"{len(channel_names)} ({channel_names})")
            untaught = [o for o in values if o not in by_organ]
            if untaught:
                print(f"  no teacher for {untaught}: background wherever a case does not label it", flush=True)
            ignore = len(values) + 1
            n_ch = len(channel_names)
            # every teacher predicts the cases that do not label its organ (stock nnUNetv2_predict)
            predicted: Dict[str, Path] = {}
            seconds: Dict[str, float] = {}
            for organ, t in by_organ.items():
                cases = [c for c, a in case_annotated.items() if organ not in a]
                if not cases:
                    continue
                inputs = pred_root / f"input_{organ}"
                if inputs.exists():
                    shutil.rmtree(inputs)
                inputs.mkdir(parents=True)
                for c in cases:
                    for ch in range(n_ch):
                        name = f"{c}_{ch:04d}{FILE_ENDING}"
                        os.symlink(tmp / "imagesTr" / name, inputs / name)
                print(f"  teacher {organ} ({t.folder}, folds {list(t.folds)}): {len(cases)} cases", flush=True)
                t0 = time.perf_counter()
                predicted[organ] = Path(predict_fn(t, inputs, pred_root / organ))
                seconds[organ] = round(time.perf_counter() - t0, 2)
                shutil.rmtree(inputs)
            # per case: merge (labels win; conflicts and unsure voxels -> ignore)
            rw = _reader(reader)
            per_case: Dict[str, Any] = {}
            scratch = pred_root / "scratch"
            for case in sorted(case_annotated):
                lab_file = tmp / "labelsTr" / f"{case}{FILE_ENDING}"
                seg, props = rw.read_seg(str(lab_file))
                seg = np.rint(seg[0]).astype(np.int64)
                annotated = [values[o] for o in case_annotated[case]]
                probs = {}
                for organ, folder in predicted.items():
                    if organ in case_annotated[case]:
                        continue
                    npz = folder / f"{case}.npz"
                    if not npz.is_file():
                        raise PseudoLabelError(f"teacher {by_organ[organ].folder}: its prediction {npz} is missing")
                    with np.load(npz) as z:
                        p = z["probabilities"][channels[organ]].astype(np.float32)
                    images = [tmp / "imagesTr" / f"{case}_{ch:04d}{FILE_ENDING}" for ch in range(n_ch)]
                    p = to_reader_order(p, images, readers[organ], reader, scratch)
                    if p.shape != seg.shape:
                        raise PseudoLabelError(f"teacher {by_organ[organ].folder}: {npz} has shape {p.shape}, the "
                                               f"label map {lab_file.name} has {seg.shape}")
                    probs[values[organ]] = p
                counts: Dict[str, Any] = {}
                try:
                    out = merge_pseudo_labels(seg, annotated, probs, ignore, high=high, low=low, counts=counts)
                except ValueError as e:
                    raise PseudoLabelError(f"case {case} ({lab_file.name}): {e}") from None
                rw.write_seg(out, str(lab_file), props)
                names = {v: o for o, v in values.items()}
                per_case[case] = {"annotated": case_annotated[case], "voxels": int(out.size),
                                  "labelled": counts["labelled"], "conflict": counts["conflict"],
                                  "unsure": counts["unsure"], "ignore": counts["ignore"],
                                  "pseudo": {names[k]: v for k, v in counts["pseudo"].items()}}
            settings = {
                "method": "single-organ teachers' probabilities merged; the case's own labels win; two teachers "
                          "claiming a voxel or one unsure -> ignore",
                "source": described, "high": high, "low": low, "ignore_label": ignore,
                "teachers": {o: t.describe() for o, t in by_organ.items()},
                "teachers_missing": untaught, "prediction": {"tta": tta, "device": "cpu" if cpu else "default"},
                "source_case_annotated": case_annotated,
            }
            labels = dict(reg.nnunet_labels(list(values)))
            labels["ignore"] = ignore
            generate_dataset_json(
                str(tmp), channel_names=channel_names, labels=labels, num_training_cases=len(case_annotated),
                file_ending=FILE_ENDING, dataset_name=final.name, overwrite_image_reader_writer=reader,
                description=f"pseudo labels from single-organ teachers ({described}), built by nnunetv2_fedkd "
                            f"pseudo-label; 'ignore' voxels are conflicts or unsure teachers",
                converted_by="nnunetv2_fedkd",
                fedkd={"registry_version": reg.REGISTRY_VERSION, "annotated": list(values),
                       "case_site": case_site, "pseudo_labels": settings})
            total = sum(c["voxels"] for c in per_case.values())
            record = {"settings": {k: v for k, v in settings.items() if k != "source_case_annotated"},
                      "teacher_prediction_seconds": seconds,
                      "summary": {"cases": len(per_case), "voxels": total,
                                  "labelled_fraction": _frac(per_case, "labelled", total),
                                  "ignore_fraction": _frac(per_case, "ignore", total),
                                  "conflict_fraction": _frac(per_case, "conflict", total),
                                  "unsure_fraction": _frac(per_case, "unsure", total),
                                  "pseudo_fraction": {o: round(sum(c["pseudo"].get(o, 0) for c in per_case.values())
                                                               / max(total, 1), 6) for o in by_organ}},
                      "cases": per_case}
            (tmp / PSEUDO_LABELS_RECORD).write_text(json.dumps(record, indent=1))
    except FileExistsError as e:
        raise PseudoLabelError(str(e)) from None
    finally:
        if own_predictions:
            shutil.rmtree(pred_root, ignore_errors=True)
    s = record["summary"]
    print(f"  wrote {final}: {s['cases']} cases, labelled {s['labelled_fraction']:.4f}, ignore "
          f"{s['ignore_fraction']:.4f} (conflict {s['conflict_fraction']:.4f}, unsure {s['unsure_fraction']:.4f}), "
          f"pseudo {s['pseudo_fraction']} of the voxels; {time.perf_counter() - t_start:.1f} s", flush=True)
    return final


def _frac(per_case: Dict[str, Any], key: str, total: int) -> float:
    return round(sum(c[key] for c in per_case.values()) / max(total, 1), 6)
