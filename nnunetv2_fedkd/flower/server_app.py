"""The Flower ServerApp: the same federation as ``nnunetv2_fedkd federate``, with the sites behind SuperNodes.

Set-up, the round loop, checkpoints, resume, aggregation, records and the final nnU-Net results folder are the
in-process runner's (:func:`~nnunetv2_fedkd.federated.runner.prepare_federation`,
:meth:`~nnunetv2_fedkd.federated.runner.FederationServer.run_rounds`, :class:`~nnunetv2_fedkd.federated.round_core.
RoundCore`); only the transport that reaches the sites differs (:class:`~nnunetv2_fedkd.flower.strategy.
FlowerSites`). Per round:

1. wait (bounded: ``wait-for-nodes`` s) until at least ``min-sites`` SuperNodes are connected, and ask the ones not
   known yet which site they serve (a ``query`` message);
2. the round core draws the round's sites (``sites-per-round``; default every connected site); ``train`` message
   with the global weights and the round's instructions to their SuperNodes (pushed, then the replies pulled every
   0.5 s until ``round-timeout``); each update is validated and folded into the round's aggregate as its reply
   arrives (``core.add_update``: the server never holds every site's weights); error replies and missing replies
   are failed sites;
3. ``core.aggregate`` (strategy, ``min_sites``); a round with fewer than ``min-sites`` valid updates is not
   committed and runs again (``core.accept``; at most ``round-attempts`` times in a row);
4. ``evaluate`` message with the new global weights to every site that sent an update;
5. ``core.commit`` (checkpoint + record), ``progress.png``.

Then ``$nnUNet_results/<plans dataset>/<trainer>__<plans>__3d_fullres/fold_all/checkpoint_final.pth``. The server
needs the plans dataset (``nnUNet_preprocessed``/``nnUNet_raw`` of the coordinator) and ``nnUNet_results`` in the
SuperLink's environment (it reaches the ServerApp), and the spec file; no site data. Run config: the app's
``pyproject.toml`` (``[tool.flwr.app.config]``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Mapping

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from nnunetv2_fedkd.env import apply_env
from nnunetv2_fedkd.federated.aggregation import DEFAULT_MAX_UPDATE_RATIO
from nnunetv2_fedkd.federated.nnunet_site import DEFAULT_EVALUATION_PATCHES
from nnunetv2_fedkd.federated.round_core import DEFAULT_KEEP_CHECKPOINTS, DEFAULT_ROUND_ATTEMPTS
from nnunetv2_fedkd.flower.strategy import FlowerSites, SiteDirectory

app = ServerApp()


def _log(line: str) -> None:
    print(line, flush=True)


def _json_object(rc: Mapping[str, Any], key: str) -> Dict[str, Any]:
    text = str(rc.get(key, "") or "").strip()
    try:
        value = json.loads(text) if text else {}
    except ValueError as e:
        raise ValueError(f"run config {key} must be a JSON object: {e}") from e
    if not isinstance(value, dict):
        raise ValueError(f"run config {key} must be a JSON object, got {text!r}")
    return value


def federation_arguments(rc: Mapping[str, Any]) -> Dict[str, Any]:
    """Keyword arguments of :func:`~nnunetv2_fedkd.federated.runner.prepare_federation` from the run config.
    ``local-epochs`` > 0 means E local epochs per round, else ``local-iterations`` N (one local epoch of N)."""
    epochs, iterations = int(rc.get("local-epochs", 0)), int(rc.get("local-iterations", 0))
    if epochs <= 0 and iterations <= 0:
        raise ValueError("set local-iterations (or local-epochs) > 0 in the run config")
    sites = [s.strip() for s in str(rc.get("sites", "")).split(",") if s.strip()]
    return dict(local_epochs=epochs if epochs > 0 else None, local_iterations=None if epochs > 0 else iterations,
                strategy=str(rc.get("strategy", "fedavg")), strategy_options=_json_object(rc, "strategy-options"),
                trainer=str(rc.get("trainer", "nnUNetTrainerFedKD")), plans=str(rc.get("plans", "nnUNetPlans")),
                settings_file=str(rc["settings-file"]) if rc.get("settings-file") else None,
                settings=_json_object(rc, "settings"),
                device=str(rc.get("device", "cpu")), min_sites=int(rc.get("min-sites", 1)),
                resume=bool(rc.get("resume", True)), seed=int(rc.get("seed", 0)), sites=sites or None,
                keep_checkpoints=int(rc.get("keep-checkpoints", DEFAULT_KEEP_CHECKPOINTS)),
                max_update_ratio=float(rc.get("max-update-ratio", DEFAULT_MAX_UPDATE_RATIO)) or None,
                large_updates=str(rc.get("large-updates", "reject")),
                max_num_examples=int(rc.get("max-num-examples", 0)) or None,
                resume_with_new_settings=bool(rc.get("resume-with-new-settings", False)),
                round_attempts=int(rc.get("round-attempts", DEFAULT_ROUND_ATTEMPTS)),
                transport_dtype=str(rc.get("transport-dtype", "float32")),
                sites_per_round=int(rc.get("sites-per-round", 0)) or None,
                sampling=str(rc.get("sampling", "uniform")))


@app.main()
def main(grid: Grid, context: Context) -> None:
    from nnunetv2_fedkd.federated.round_core import FederationStopped
    from nnunetv2_fedkd.federated.runner import prepare_federation
    from nnunetv2_fedkd.spec import load_spec

    rc = context.run_config
    if not rc.get("spec"):
        raise ValueError("set the federation spec in the run config: --run-config 'spec=\"/path/federation.toml\"'")
    apply_env()  # nnUNet_extTrainer: the plugin trainers
    fs = prepare_federation(load_spec(Path(str(rc["spec"]))), int(rc["rounds"]), check_site_plans=False, log=_log,
                            **federation_arguments(rc))
    sites = FlowerSites(grid, SiteDirectory(s.name for s in fs.sites), float(rc.get("wait-for-nodes", 300)),
                        float(rc.get("round-timeout", 3600)), _log)
    try:
        fs.run_rounds(sites, evaluate=bool(rc.get("evaluate", True)), evaluate_every=int(rc.get("evaluate-every", 1)),
                      evaluate_patches=int(rc.get("evaluate-patches", DEFAULT_EVALUATION_PATCHES)))
    except FederationStopped as e:  # a deterministic site error, or too few updates round after round
        _log(f"stopping the federation: {e}")
        raise
