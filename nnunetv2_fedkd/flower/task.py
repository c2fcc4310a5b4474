"""What travels in the Flower messages, and a site built from a SuperNode's configuration.

Message contents (:class:`flwr.app.RecordDict`), by record name:

* server -> site (``train`` and ``evaluate``): ``"arrays"`` the global weights (:class:`~flwr.app.ArrayRecord`),
  ``"config"`` the round's instructions (:meth:`~nnunetv2_fedkd.federated.round_core.RoundCore.fit_instructions`)
  as one JSON string entry (they hold nested values, e.g. ``teachers``).
* site -> server, ``train`` reply: ``"arrays"`` the site's updated weights, ``"metrics"`` (:class:`~flwr.app.
  MetricRecord`) ``num-examples`` (Flower's name for the case count) and the site's numeric training metrics,
  ``"site"`` (:class:`~flwr.app.ConfigRecord`) the site's name and organs.
* site -> server, ``query`` reply (the server asks which site a SuperNode serves before it draws a round's
  sites): ``"site"`` the site's name and organs.
* site -> server, ``evaluate`` reply: ``"metrics"`` ``num-cases``, ``sampled-patches`` (0: whole volumes),
  ``network-passes``, ``seconds`` and ``dice-<organ>`` per organ with a Dice value, ``"site"`` as above (an organ
  listed there without a Dice entry has Dice None: absent in reference and prediction).

Weights travel as numpy arrays (``np.save``/``np.load`` with ``allow_pickle=False`` inside Flower's ``Array``; the
numeric conversion is :func:`~nnunetv2_fedkd.federated.weights_io.to_numpy_arrays` and ``from_numpy_arrays``, which
refuses object arrays). No pickle anywhere; the server's round core validates every update (keys, shapes, dtypes,
finite values, case counts) before aggregating it.

A SuperNode names its site with ``--node-config`` (:func:`site_from_context`)::

    flower-supernode ... --node-config 'site="liver_site" dataset="Dataset601_SynthLiverFed" organs="liver"
                                        site-dir="/srv/fedkd/site" device="cuda"'

(``fold`` optional, default 0; ``device`` optional, default the run config's ``device``). The site's nnU-Net
variables (``nnUNet_raw``/``nnUNet_preprocessed``/``nnUNet_results``) come from the SuperNode's environment, which
reaches the ClientApp; ``nnUNet_extTrainer`` is set here.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict

from nnunetv2_fedkd.env import CPU_FRIENDLY, CPU_TRAINING, apply_env
from nnunetv2_fedkd.federated.site_side import SiteUpdate, Weights
from nnunetv2_fedkd.federated.nnunet_site import NnUNetSite
from nnunetv2_fedkd.federated.weights_io import from_numpy_arrays, to_numpy_arrays

APP_DIR = Path(__file__).resolve().parent / "app"  # the Flower app project: `flwr run APP_DIR <connection>`

ARRAYS, CONFIG, METRICS, SITE = "arrays", "config", "metrics", "site"
NUM_EXAMPLES, NUM_CASES, DICE = "num-examples", "num-cases", "dice-"
# the other numbers of an evaluate reply: Flower's metric name -> NnUNetSite.evaluate's key
EVALUATION_FIGURES = {"sampled-patches": "sampled_patches", "network-passes": "network_passes", "seconds": "seconds"}


class MessageContentError(ValueError):
    """A message does not hold what this app sends (names the record and what is wrong)."""


# -- weights ----------------------------------------------------------------------------------------------------------
def weights_to_record(weights: Mapping[str, Any]) -> ArrayRecord:
    return ArrayRecord({k: Array.from_numpy_ndarray(a) for k, a in to_numpy_arrays(weights).items()})


def record_to_weights(record: ArrayRecord, like: Optional[Mapping[str, Any]] = None) -> Weights:
    if not isinstance(record, ArrayRecord):
        raise MessageContentError(f"{ARRAYS!r} is a {type(record).__name__}, not an ArrayRecord")
    try:
        return from_numpy_arrays({k: a.numpy() for k, a in record.items()}, like=like)
    except (TypeError, ValueError) as e:  # Array.numpy: not numpy-serialised, or refused (pickled) data
        raise MessageContentError(f"{ARRAYS!r}: {e}") from e


# -- instructions -----------------------------------------------------------------------------------------------------
def instructions_to_record(instructions: Mapping[str, Any]) -> ConfigRecord:
    return ConfigRecord({"instructions": json.dumps(dict(instructions))})


def record_to_instructions(record: ConfigRecord) -> Dict[str, Any]:
    try:
        raw = json.loads(record["instructions"])
    except (KeyError, TypeError, ValueError) as e:
        raise MessageContentError(f"{CONFIG!r} holds no JSON 'instructions' entry ({e})") from e
    if not isinstance(raw, dict) or "round" not in raw:
        raise MessageContentError(f"{CONFIG!r}: the instructions are not a JSON object with a 'round'")
    return raw


def round_content(weights: ArrayRecord, instructions: Mapping[str, Any]) -> RecordDict:
    """Content of a ``train`` or ``evaluate`` message (``weights`` from :func:`weights_to_record`)."""
    return RecordDict({ARRAYS: weights, CONFIG: instructions_to_record(instructions)})


def read_round_content(content: RecordDict) -> Tuple[Weights, Dict[str, Any]]:
    return record_to_weights(_record(content, ARRAYS, ArrayRecord)), \
        record_to_instructions(_record(content, CONFIG, ConfigRecord))


# -- replies ----------------------------------------------------------------------------------------------------------
def _numeric(metrics: Mapping[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def site_record(name: str, organs) -> ConfigRecord:
    return ConfigRecord({"site": str(name), "organs": [str(o) for o in sorted(organs)]})


def update_content(update: SiteUpdate) -> RecordDict:
    """A site's ``train`` reply. Metrics that are not numbers (None for a non-finite loss) are left out."""
    return RecordDict({ARRAYS: weights_to_record(update.weights),
                       METRICS: MetricRecord({NUM_EXAMPLES: int(update.num_examples), **_numeric(update.metrics)}),
                       SITE: site_record(update.site, update.organs)})


def _record(content: RecordDict, name: str, kind: type):
    rec = content.get(name)
    if not isinstance(rec, kind):
        raise MessageContentError(f"the reply has no {kind.__name__} {name!r}")
    return rec


def reply_site(content: RecordDict) -> Tuple[str, list]:
    """(site name, organs) a reply declares."""
    rec = _record(content, SITE, ConfigRecord)
    name, organs = rec.get("site"), rec.get("organs", [])
    if not isinstance(name, str) or not name or not isinstance(organs, list):
        raise MessageContentError(f"{SITE!r} must hold a site name and a list of organs")
    return name, [str(o) for o in organs]


def read_update(content: RecordDict) -> SiteUpdate:
    """The :class:`SiteUpdate` in a ``train`` reply (not validated here: the round core does that)."""
    name, organs = reply_site(content)
    metrics = dict(_record(content, METRICS, MetricRecord))
    n = metrics.pop(NUM_EXAMPLES, None)
    return SiteUpdate(name, record_to_weights(_record(content, ARRAYS, ArrayRecord)), n, metrics, organs=organs)


def evaluation_content(site: str, organs, evaluation: Mapping[str, Any]) -> RecordDict:
    """A site's ``evaluate`` reply (``evaluation``: :meth:`NnUNetSite.evaluate`'s ``{"dice": ..., "num_cases"}``)."""
    dice = {f"{DICE}{o}": float(d) for o, d in (evaluation.get("dice") or {}).items() if d is not None}
    organs = list(organs) + [o for o in (evaluation.get("dice") or {}) if o not in organs]
    figures = {m: evaluation[k] for m, k in EVALUATION_FIGURES.items() if evaluation.get(k) is not None}
    return RecordDict({METRICS: MetricRecord({NUM_CASES: int(evaluation.get("num_cases", 0)), **figures, **dice}),
                       SITE: site_record(site, organs)})


def read_evaluation(content: RecordDict) -> Tuple[str, Dict[str, Any]]:
    """(site, ``{"dice": {organ: value or None}, "num_cases": n}``) from an ``evaluate`` reply."""
    name, organs = reply_site(content)
    m = _record(content, METRICS, MetricRecord)
    figures = {k: m[f] for f, k in EVALUATION_FIGURES.items() if f in m}
    return name, {"dice": {o: m.get(f"{DICE}{o}") for o in organs}, "num_cases": int(m.get(NUM_CASES, 0)), **figures}


# -- the site of a SuperNode ------------------------------------------------------------------------------------------
def site_from_context(context: Context) -> NnUNetSite:
    """The :class:`NnUNetSite` a SuperNode serves: its ``--node-config`` (``site``, ``dataset``, ``organs``
    comma-separated, ``site-dir``; optional ``device``, ``fold``) and the run config (``trainer``, ``plans``,
    ``device``). Also sets ``nnUNet_extTrainer`` (the plugin trainers) and, on a CPU, the CPU-friendly nnU-Net
    variables unless the environment sets them."""
    nc, rc = context.node_config, context.run_config
    missing = [k for k in ("site", "dataset", "organs", "site-dir") if not str(nc.get(k, "")).strip()]
    if missing:
        raise ValueError(f"this SuperNode's --node-config lacks {', '.join(missing)} (e.g. --node-config "
                         f"'site=\"liver_site\" dataset=\"Dataset601_SynthLiverFed\" organs=\"liver\" "
                         f"site-dir=\"/srv/fedkd/site\"')")
    device = str(nc.get("device") or rc.get("device") or "cpu")
    apply_env()
    if device == "cpu":
        for k, v in {**CPU_FRIENDLY, **CPU_TRAINING}.items():
            os.environ.setdefault(k, v)
    organs = [o.strip() for o in str(nc["organs"]).split(",") if o.strip()]
    return NnUNetSite(str(nc["site"]), str(nc["dataset"]), organs, Path(str(nc["site-dir"])),
                      trainer=str(rc.get("trainer", "nnUNetTrainerFedKD")), plans=str(rc.get("plans", "nnUNetPlans")),
                      fold=int(nc.get("fold", 0)), device=device)
