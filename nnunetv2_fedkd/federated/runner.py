"""``nnunetv2_fedkd federate SPEC``: the whole federation on one machine, every site in-process, one after the other.

Per round: every site trains locally from the global weights (:class:`~nnunetv2_fedkd.federated.nnunet_site.
NnUNetSite`, i.e. stock ``nnUNetv2_train <view> 3d_fullres 0 -tr nnUNetTrainerFedKD``), the round core
(:class:`~nnunetv2_fedkd.federated.round_core.RoundCore`) validates and aggregates the updates, every site evaluates
the new global model on its own validation cases, and the round is checkpointed. A crash loses at most the round in
progress; the next call resumes after the last completed round.

Output (the model folder is an ordinary nnU-Net results folder)::

    $nnUNet_results/<plans dataset>/<trainer>__<plans>__3d_fullres/
        plans.json, dataset.json, dataset_fingerprint.json
        fold_all/checkpoint_final.pth      the final global model (nnUNetv2_predict -d <plans dataset> -f all ...)
        federation/                        state.json, global_round_NNNN.fedkd, metrics.json/csv, progress.png,
                                           run.json (settings), sites/<site>/ (local training logs and files)

The plans dataset is the coordinator dataset ``nnunetv2_fedkd plan`` wrote (it holds no images).
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from nnunetv2_fedkd.federated.aggregation import DEFAULT_MAX_UPDATE_RATIO, SiteUpdate, UpdateBounds, make_strategy
from nnunetv2_fedkd.federated.nnunet_site import DEFAULT_EVALUATION_PATCHES, NnUNetSite, _env, quiet
from nnunetv2_fedkd.federated.sampling import SiteSampling
from nnunetv2_fedkd.federated.site_side import check_transport_dtype, transport_weights
from nnunetv2_fedkd.federated.round_core import (DEFAULT_KEEP_CHECKPOINTS, DEFAULT_ROUND_ATTEMPTS, PendingRound,
                                                  RoundCore, plot_progress)
from nnunetv2_fedkd.spec import FederationSpec, Site
from nnunetv2_fedkd.utils import atomic_write_json, read_json


class FederateError(RuntimeError):
    pass


def _fmt_dice(d: Mapping[str, Any]) -> str:
    return " ".join(f"{k} {v:.3f}" for k, v in d.items() if v is not None) or "-"


def load_settings(path: Optional[os.PathLike]) -> Dict[str, Any]:
    if path is None:
        return {}
    return read_json(path, "trainer settings", FederateError, object_only=True)


def site_trainer_names() -> List[str]:
    """The plugin's federated site trainers (:func:`~nnunetv2_fedkd.trainers.fedkd.is_site_trainer`)."""
    import nnunetv2_fedkd.trainers as plugin
    from nnunetv2_fedkd.trainers.fedkd import is_site_trainer

    return sorted(n for n in plugin.__all__ if is_site_trainer(getattr(plugin, n)))


def find_site_trainer(name: str):
    """The site trainer class called ``name`` (the plugin's, else nnU-Net's own lookup, ``nnUNet_extTrainer``
    included); :class:`FederateError` naming the valid ones if there is none or it is not a site trainer."""
    import nnunetv2_fedkd.trainers as plugin
    from nnunetv2_fedkd.trainers.fedkd import is_site_trainer

    cls = getattr(plugin, name, None) if name in plugin.__all__ else None
    if cls is None:
        from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
        try:
            with quiet():
                cls = recursive_find_trainer_class_by_name(name)
        except (RuntimeError, AssertionError, ImportError):
            cls = None
    valid = ", ".join(site_trainer_names())
    if cls is None:
        raise FederateError(f"trainer {name!r} does not exist; a federation trains one of: {valid}")
    if not is_site_trainer(cls):
        raise FederateError(f"trainer {name!r} is not a federated site trainer (it would run its own schedule and "
                            f"never send an update); a federation trains one of: {valid}")
    return cls


def check_settings_keys(trainer_cls, settings: Mapping[str, Any], source: str) -> None:
    """Every key of ``settings`` (from ``source``: the user's file or the command line) is one the trainer accepts
    (:func:`~nnunetv2_fedkd.trainers.config.check_config_keys`, the rule the trainer applies to its settings file),
    checked here so that the error names the user's file and not the run folder's copy."""
    from nnunetv2_fedkd.trainers.config import TrainerConfigError, check_config_keys

    try:
        check_config_keys(dict(settings), trainer_cls.__name__, trainer_cls.config_defaults,
                          trainer_cls.all_plugin_config_keys(), source)
    except TrainerConfigError as e:
        raise FederateError(str(e)) from None


def _count(value: Any, name: str, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise FederateError(f"{name} must be an integer >= {least}, got {value!r}")
    return value


def preflight(spec: FederationSpec, rounds: int, *, local_epochs: Optional[int], local_iterations: Optional[int],
              strategy: str, strategy_options: Optional[Mapping[str, Any]], trainer: str,
              settings_file: Optional[os.PathLike], settings: Optional[Mapping[str, Any]], min_sites: int,
              sites: Optional[Sequence[str]]):
    """What must hold before anything is written or trained, in both engines: the trainer is a federated site
    trainer, the counts are in range, ``min_sites`` <= the selected sites, every settings key is known (the error
    names the user's file), the strategy and its options build. Returns (trainer class, selected sites, merged
    settings from the file and ``settings``, the strategy). Raises :class:`FederateError` naming the argument or
    file."""
    trainer_cls = find_site_trainer(trainer)
    _count(rounds, "rounds", 1)
    if (local_epochs is None) == (local_iterations is None):
        raise FederateError("give exactly one of local_epochs and local_iterations")
    if local_iterations is not None:
        _count(local_iterations, "local_iterations", 1)
    else:
        _count(local_epochs, "local_epochs", 1)
    unknown = sorted(set(sites or ()) - {s.name for s in spec.sites})
    if unknown:
        raise FederateError(f"sites {unknown} are not in {spec.path} (its sites: {[s.name for s in spec.sites]})")
    chosen = [s for s in spec.sites if sites is None or s.name in sites]
    if not chosen:
        raise FederateError(f"no site of {spec.path} is selected ({sites})")
    _count(min_sites, "min_sites", 1)
    if min_sites > len(chosen):
        raise FederateError(f"min_sites {min_sites} is more than the {len(chosen)} site(s) selected "
                            f"({', '.join(s.name for s in chosen)}): no round could ever be committed")
    from_file = load_settings(settings_file)
    if settings_file is not None:
        check_settings_keys(trainer_cls, from_file, f"trainer settings {settings_file}")
    check_settings_keys(trainer_cls, dict(settings or {}), "settings given with the command")
    try:
        strat = make_strategy(strategy, **dict(strategy_options or {}))
    except (ValueError, TypeError) as e:
        raise FederateError(f"strategy {strategy!r} with options {dict(strategy_options or {})}: {e}") from e
    return trainer_cls, chosen, {**from_file, **dict(settings or {})}, strat


def _json_file(path: Path, what: str) -> Any:
    return read_json(path, what, FederateError)


class ServerModel:
    """The global model's definition: the trainer class instantiated (not initialised: the plans dataset has no
    data) on the image-free plans dataset. It builds the network and writes the final nnU-Net results folder with
    nnU-Net's own ``save_checkpoint``."""

    def __init__(self, plans_dataset: str, trainer: str, plans: str, config_file: Path, device: str = "cpu"):
        from nnunetv2.run.run_training import get_trainer_from_args
        from nnunetv2.utilities.file_path_utilities import get_output_folder
        from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

        fold_dir = Path(get_output_folder(plans_dataset, trainer, plans, "3d_fullres", "all"))
        existed = fold_dir.is_dir()
        before = set(fold_dir.glob("training_log_*.txt"))
        with _env(nnUNet_fedkd_config=str(config_file)), quiet():
            self.trainer = get_trainer_from_args(plans_dataset, "3d_fullres", "all", trainer, plans,
                                                 device=torch.device(device))
        t = self.trainer
        # nnU-Net's trainer starts a training log (its banner) when it is built; this one never trains
        for f in set(fold_dir.glob("training_log_*.txt")) - before:
            f.unlink()
        if not existed and fold_dir.is_dir() and not any(fold_dir.iterdir()):
            fold_dir.rmdir()
        self.num_input_channels = determine_num_input_channels(t.plans_manager, t.configuration_manager,
                                                               t.dataset_json)

    def build_network(self) -> torch.nn.Module:
        t = self.trainer
        return type(t).build_network_architecture(t.plans_manager, t.configuration_manager, self.num_input_channels,
                                                  t.label_manager.num_segmentation_heads, True)

    def initial_weights(self, seed: int) -> Dict[str, torch.Tensor]:
        torch.manual_seed(seed)
        return {k: v.detach().cpu().clone() for k, v in self.build_network().state_dict().items()}

    def write_results_folder(self, weights: Mapping[str, torch.Tensor], completed_rounds: int) -> Path:
        """plans.json, dataset.json, dataset_fingerprint.json and fold_all/checkpoint_final.pth (atomic rename)."""

        from batchgenerators.utilities.file_and_folder_operations import save_json

        t = self.trainer
        t.network = self.build_network().to(t.device)
        t.network.load_state_dict(dict(weights))
        t.optimizer, _ = t.configure_optimizers()
        with quiet():
            t.configure_rotation_dummyDA_mirroring_and_inital_patch_size()  # sets the inference mirroring axes
        t.current_epoch = completed_rounds - 1  # nnU-Net stores current_epoch + 1
        base = Path(t.output_folder_base)
        base.mkdir(parents=True, exist_ok=True)
        save_json(t.plans_manager.plans, str(base / "plans.json"), sort_keys=False)
        save_json(t.dataset_json, str(base / "dataset.json"), sort_keys=False)
        fp = Path(t.preprocessed_dataset_folder_base) / "dataset_fingerprint.json"
        if fp.is_file():
            shutil.copyfile(fp, base / "dataset_fingerprint.json")
        final = Path(t.output_folder) / "checkpoint_final.pth"
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(".checkpoint_final.pth.tmp")
        t.save_checkpoint(str(tmp))
        os.replace(tmp, final)
        return final


@dataclass
class FederationServer:
    """The server side of a federation, set up by :func:`prepare_federation`: what :func:`federate` (sites
    in-process) and the Flower ServerApp (:mod:`nnunetv2_fedkd.flower.server_app`, sites behind messages) share.
    Both drive ``core`` (:class:`~nnunetv2_fedkd.federated.round_core.RoundCore`) and end with
    :meth:`finish_round` per round and :meth:`finish`."""

    spec: FederationSpec
    layout: Any  # FederationLayout
    sites: List[Site]  # the spec's selected sites
    trainer: str
    plans: str
    settings: Dict[str, Any]  # the trainer settings every site receives
    model_dir: Path
    run_dir: Path
    model: ServerModel
    core: RoundCore
    log: Callable[[str], Any] = print

    def site_dir(self, site: str) -> Path:
        """Where :func:`federate` keeps a site's files (training logs, FedBN state)."""
        return self.run_dir / "sites" / site

    def log_update(self, update: SiteUpdate, seconds: float) -> None:
        r, rounds = self.core.state.completed_rounds, self.core.total_rounds
        loss = update.metrics.get("train_loss")
        self.log(f"round {r + 1}/{rounds} site {update.site}: done in {seconds:.0f} s, {update.num_examples} cases"
                 + (f", train loss {loss:.4f}" if loss is not None else ""))

    def finish_round(self, pending: PendingRound, evaluations: Mapping[str, Mapping[str, Any]]) -> Dict[str, Any]:
        """Commit the round (checkpoint + record), redraw progress.png, log the round's summary."""
        record = self.core.commit(pending, evaluations)
        plot_progress(self.core.state.history, self.run_dir / "progress.png")
        n = len(record["accepted"])
        self.log(f"round {record['round']}/{self.core.total_rounds}: "
                 f"{'aggregated ' + str(n) + ' site(s)' if record['aggregated'] else 'NOT aggregated'}"
                 f" in {record['seconds']:.0f} s; validation Dice {_fmt_dice(record['organ_dice'])}")
        return record

    def run_rounds(self, transport: "SiteTransport", *, evaluate: bool = True, evaluate_every: int = 1,
                   evaluate_patches: Optional[int] = None) -> Dict[str, Any]:
        """The round loop of both engines, until the last round is committed; then :meth:`finish`. ``transport``
        reaches the sites (:class:`InProcessSites` for ``federate``, ``flower.strategy.FlowerSites`` for the
        ServerApp). Per round: the sites train from the global weights, the round core validates and aggregates
        their updates (a deterministic site error or too few updates round after round stop the federation:
        :class:`~nnunetv2_fedkd.federated.round_core.FederationStopped`), a round with fewer than ``min_sites``
        valid updates runs again, the sites that sent an update evaluate the new global model (every
        ``evaluate_every`` rounds and after the last, within ``evaluate_patches`` patch passes), and the round is
        committed."""
        core = self.core
        if evaluate_patches is None:
            evaluate_patches = DEFAULT_EVALUATION_PATCHES
        while not core.done:
            transport.before_round(core)
            t0 = time.time()
            instructions = core.fit_instructions()
            available = transport.available_sites(core)
            chosen = core.choose_sites(available)
            sampled = None
            if core.sampling.per_round is not None:
                sampled = chosen
                self.log(f"round {core.state.completed_rounds + 1}/{core.total_rounds}: {len(chosen)} of "
                         f"{len(available)} site(s) drawn ({core.sampling.mode}): {', '.join(chosen)}")
            core.begin_round()
            trained: List[str] = []

            def on_update(update: SiteUpdate, seconds: float) -> None:
                self.log_update(update, seconds)
                trained.append(update.site)
                core.add_update(update)  # folded in at once: no engine holds every site's weights

            failures = transport.train(core, instructions, on_update, chosen)
            pending = core.aggregate((), failures, started=t0, sampled=sampled)
            if not core.accept(pending):
                continue
            evaluations: Dict[str, Dict[str, Any]] = {}
            if evaluate and core.evaluates_this_round(evaluate_every):
                evaluations = transport.evaluate(core, transport_weights(pending.result.weights, core.transport_dtype),
                                                 {**instructions, "evaluate_patches": evaluate_patches}, trained)
            self.finish_round(pending, evaluations)
        return self.finish()

    def finish(self) -> Dict[str, Any]:
        """Write the final nnU-Net results folder; returns the summary :func:`federate` returns."""
        state = self.core.state
        final = self.model.write_results_folder(state.weights, state.completed_rounds)
        plot_progress(state.history, self.run_dir / "progress.png")
        self.log(f"final global model: {final} (check a copy before predicting with it: nnunetv2_fedkd "
                 f"verify-checkpoint {self.model_dir} --run-dir {self.run_dir})")
        self.log(f"metrics: {self.run_dir / 'metrics.json'}, {self.run_dir / 'metrics.csv'}, "
                 f"{self.run_dir / 'progress.png'}")
        return {"model_folder": str(self.model_dir), "checkpoint": str(final), "run_dir": str(self.run_dir),
                "plans_dataset": self.layout.coordinator, "history": state.history}


class SiteTransport:
    """How the round loop (:meth:`FederationServer.run_rounds`) reaches the sites; the engines differ only here.

    ``before_round(core)``: wait until the round can start (Flower: for ``min_sites`` SuperNodes).
    ``available_sites(core) -> [site]``: the sites that could train this round (the round core draws from them).
    ``train(core, instructions, on_update, sites) -> failures``: the ``sites`` train from the round's global
    weights with ``instructions``; each update goes to ``on_update(update, seconds)`` as it arrives (which folds it
    into the round's aggregate; the transport keeps no reference to it); a failure is ``(site, reason)``
    (``"<ExceptionType>: <message>"``), passed to ``core.check_failure`` as soon as it is known where the transport
    can (a deterministic one stops the federation at once).
    ``evaluate(core, weights, instructions, sites) -> {site: evaluation}``: the ``sites`` evaluate ``weights``; a
    site that cannot is logged and left out.
    """

    def before_round(self, core: RoundCore) -> None:
        pass

    def available_sites(self, core: RoundCore) -> List[str]:
        raise NotImplementedError

    def train(self, core: RoundCore, instructions: Mapping[str, Any], on_update: Callable[[SiteUpdate, float], Any],
              sites: Sequence[str]) -> List[Tuple[str, str]]:
        raise NotImplementedError

    def evaluate(self, core: RoundCore, weights: Mapping[str, torch.Tensor], instructions: Mapping[str, Any],
                 sites: Sequence[str]) -> Dict[str, Dict[str, Any]]:
        raise NotImplementedError


class InProcessSites(SiteTransport):
    """The sites in this process, one after the other (:func:`federate`)."""

    def __init__(self, sites: Sequence[NnUNetSite], log: Callable[[str], Any] = print):
        self.sites = list(sites)
        self.log = log

    def available_sites(self, core):
        return [s.name for s in self.sites]

    def train(self, core, instructions, on_update, sites):
        r = int(instructions["round"])
        failures = []
        for site in (s for s in self.sites if s.name in set(sites)):
            ts = time.time()
            self.log(f"round {r + 1}/{core.total_rounds} site {site.name}: local training ({site.dataset}) ...")
            try:
                u = site.fit(core.sent_weights_file(), instructions)
            except Exception as e:  # a transient failure leaves the site out of this round; a deterministic one stops
                reason = f"{type(e).__name__}: {e}"
                core.check_failure(site.name, reason, log_hint=str(site.site_dir / f"round_{r + 1:04d}" / "train.log"))
                failures.append((site.name, reason))
                continue
            on_update(u, time.time() - ts)
            del u  # folded into the round's aggregate: the next site's training does not share memory with it
        return failures

    def evaluate(self, core, weights, instructions, sites):
        out = {}
        for site in (s for s in self.sites if s.name in set(sites)):
            try:
                out[site.name] = site.evaluate(weights, instructions)
            except Exception as e:
                self.log(f"round {int(instructions['round']) + 1}: site {site.name!r} could not evaluate: "
                         f"{type(e).__name__}: {e}")
        return out


def prepare_federation(spec: FederationSpec, rounds: int, *, local_epochs: Optional[int] = None,
                       local_iterations: Optional[int] = None, strategy: str = "fedavg",
                       strategy_options: Optional[Mapping[str, Any]] = None, trainer: str = "nnUNetTrainerFedKD",
                       plans: str = "nnUNetPlansSmall", settings_file: Optional[os.PathLike] = None,
                       settings: Optional[Mapping[str, Any]] = None, device: str = "cpu", min_sites: int = 1,
                       resume: bool = True, seed: int = 0, sites: Optional[Sequence[str]] = None,
                       workdir: Optional[Path] = None, check_site_plans: bool = True,
                       keep_checkpoints: int = DEFAULT_KEEP_CHECKPOINTS,
                       max_update_ratio: Optional[float] = DEFAULT_MAX_UPDATE_RATIO, large_updates: str = "reject",
                       max_num_examples: Optional[int] = None, resume_with_new_settings: bool = False,
                       round_attempts: int = DEFAULT_ROUND_ATTEMPTS, transport_dtype: str = "float32",
                       sites_per_round: Optional[int] = None, sampling: str = "uniform",
                       log=print) -> FederationServer:
    """Everything before the first round (arguments as :func:`federate`): the federation's plans and digest, the
    trainer settings, the global model's definition, the strategy and the round core, started (or resumed) in
    ``$nnUNet_results/<plans dataset>/<trainer>__<plans>__3d_fullres/federation``, and ``run.json``.
    ``check_site_plans``: also check every selected site's plans file here (possible only where the sites' data is
    visible, as in :func:`federate`; a site refuses other plans itself anyway). ``max_update_ratio``,
    ``large_updates``, ``max_num_examples``: the :class:`~nnunetv2_fedkd.federated.aggregation.UpdateBounds` every
    update must keep (None: unbounded); every site's claimed case count is also bounded by the cases it had when the
    federation was planned (the plans record). ``resume_with_new_settings``: resume a run folder trained with other
    settings (recorded in its ``state.json``) instead of refusing it. ``round_attempts``: how many times in a row a
    round with fewer than ``min_sites`` valid updates runs before the federation stops. ``transport_dtype``: what the
    global weights and the updates travel in ("float32", or "float16": 2 bytes a parameter, updates as changes from
    the global weights sent; aggregation and checkpoints stay float32). ``sites_per_round`` K: K of the selected
    sites train each round, drawn with ``sampling`` ("uniform", or "organs": every organ's labelling sites first,
    :mod:`~nnunetv2_fedkd.federated.sampling`), seeded by ``seed``; None: every site."""
    from nnunetv2_fedkd.federated.planning import check_site_plans as check_plans
    from nnunetv2_fedkd.federated.planning import federation_plans_digest, resolve_layout

    _, chosen, trainer_settings, strat = preflight(
        spec, rounds, local_epochs=local_epochs, local_iterations=local_iterations, strategy=strategy,
        strategy_options=strategy_options, trainer=trainer, settings_file=settings_file, settings=settings,
        min_sites=min_sites, sites=sites)
    _count(keep_checkpoints, "keep_checkpoints", 1)
    _count(round_attempts, "round_attempts", 1)
    try:
        check_transport_dtype(transport_dtype)
        site_sampling = SiteSampling(sites_per_round, sampling, seed, {s.name: list(s.organs) for s in chosen})
    except ValueError as e:
        raise FederateError(str(e)) from e
    if sites_per_round is not None and sites_per_round < min_sites:
        raise FederateError(f"sites_per_round {sites_per_round} is fewer than min_sites {min_sites}: no round could "
                            f"ever be committed")
    if max_num_examples is not None:
        _count(max_num_examples, "max_num_examples", 1)
    layout = resolve_layout(spec, workdir)
    pre = Path(os.environ["nnUNet_preprocessed"]) if workdir is None else Path(workdir) / "nnUNet_preprocessed"
    from nnunetv2_fedkd.federated.planning import planned_case_counts
    try:
        bounds = UpdateBounds(site_cases={k: v for k, v in planned_case_counts(pre / layout.coordinator, plans).items()
                                          if k in {s.name for s in chosen}},
                              max_num_examples=max_num_examples, max_update_ratio=max_update_ratio,
                              large_updates=large_updates)
    except ValueError as e:
        raise FederateError(str(e)) from e
    res = Path(os.environ["nnUNet_results"]) if workdir is None else Path(workdir) / "nnUNet_results"
    coord_plans = pre / layout.coordinator / f"{plans}.json"
    if not coord_plans.is_file():
        raise FederateError(f"{coord_plans} does not exist: run `nnunetv2_fedkd plan` (and derive {plans} for every "
                            f"site and the plans dataset) first")
    digest = federation_plans_digest(_json_file(coord_plans, "the federation's plans"))
    _json_file(pre / layout.coordinator / "dataset.json", "the plans dataset's dataset.json")
    for s in chosen if check_site_plans else ():
        f = pre / layout.views[s.name] / f"{plans}.json"
        if not f.is_file():
            raise FederateError(f"site {s.name!r}: {f} does not exist")
        check_plans(s.name, _json_file(f, f"site {s.name!r}: plans"), digest)
        _json_file(f.with_name("dataset.json"), f"site {s.name!r}: dataset.json")

    if local_iterations is not None:
        trainer_settings.update(num_epochs=1, num_iterations_per_epoch=int(local_iterations))
    else:
        trainer_settings["num_epochs"] = int(local_epochs)
    trainer_settings.setdefault("final_validation", False)

    model_dir = res / layout.coordinator / f"{trainer}__{plans}__3d_fullres"
    run_dir = model_dir / "federation"
    # nothing is left behind by a run refused from here on (a resume with other settings, plans that do not build a
    # model): the folders this call creates are removed again, and the server's settings file is renamed into place
    # only once the run has started
    created = [d for d in (res, res / layout.coordinator, model_dir, run_dir) if not d.exists()]
    run_dir.mkdir(parents=True, exist_ok=True)
    server_cfg = run_dir / "server_trainer.json"
    pending_cfg = atomic_write_json(server_cfg.with_name(".server_trainer.json.pending"),
                                    {**trainer_settings, "global_model": None})
    try:
        server = ServerModel(layout.coordinator, trainer, plans, pending_cfg, device)
        core = RoundCore(run_dir, strat, rounds, digest, trainer_settings, min_sites=min_sites, log=log,
                         keep_checkpoints=keep_checkpoints, bounds=bounds,
                         allow_new_settings=resume_with_new_settings, round_attempts=round_attempts,
                         transport_dtype=transport_dtype, sampling=site_sampling, run_settings={"trainer": trainer, "plans": plans,
                                       "sites": sorted(s.name for s in chosen), "seed": seed})
        core.start(server.initial_weights(seed), resume=resume)
    except BaseException:
        pending_cfg.unlink(missing_ok=True)
        for d in reversed(created):
            shutil.rmtree(d, ignore_errors=True)
        raise
    os.replace(pending_cfg, server_cfg)
    server.trainer.fedkd_config_file = server_cfg
    atomic_write_json(run_dir / "run.json", {
        "spec": str(spec.path) if spec.path else None, "plans_dataset": layout.coordinator, "trainer": trainer,
        "plans": plans, "rounds": rounds, "strategy": strat.hyperparameters(), "settings": trainer_settings,
        "sites": {s.name: layout.views[s.name] for s in chosen}, "min_sites": min_sites, "seed": seed,
        "update_bounds": bounds.record(), "transport_dtype": transport_dtype, "sampling": site_sampling.record(),
        "settings_changes": core.settings_changes})
    log(f"federation {spec.name}: {len(chosen)} sites, {rounds} rounds of {strat.name}, trainer {trainer}, "
        f"plans {plans}; run folder {run_dir}")
    return FederationServer(spec, layout, chosen, trainer, plans, trainer_settings, model_dir, run_dir, server, core,
                            log)


def federate(spec: FederationSpec, rounds: int, *, local_epochs: Optional[int] = None,
             local_iterations: Optional[int] = None, strategy: str = "fedavg",
             strategy_options: Optional[Mapping[str, Any]] = None, trainer: str = "nnUNetTrainerFedKD",
             plans: str = "nnUNetPlansSmall", settings_file: Optional[os.PathLike] = None,
             settings: Optional[Mapping[str, Any]] = None, device: str = "cpu", min_sites: int = 1,
             evaluate: bool = True, evaluate_every: int = 1,
             evaluate_patches: Optional[int] = None, resume: bool = True, seed: int = 0,
             sites: Optional[Sequence[str]] = None, workdir: Optional[Path] = None,
             keep_checkpoints: int = DEFAULT_KEEP_CHECKPOINTS,
             max_update_ratio: Optional[float] = DEFAULT_MAX_UPDATE_RATIO, large_updates: str = "reject",
             max_num_examples: Optional[int] = None, resume_with_new_settings: bool = False,
             round_attempts: int = DEFAULT_ROUND_ATTEMPTS, transport_dtype: str = "float32",
             sites_per_round: Optional[int] = None, sampling: str = "uniform", log=print) -> Dict[str, Any]:
    """Run (or resume) the federation; returns a summary (model folder, metrics files, last round's record).

    ``local_iterations`` N: one local epoch of N iterations per round; ``local_epochs`` E: E local epochs of
    ``num_iterations_per_epoch`` (settings, default nnU-Net's 250). The learning rate follows nnU-Net's poly schedule
    over all rounds. ``settings``/``settings_file``: trainer settings (JSON) sent to every site. ``evaluate``: the
    sites validate the global model every ``evaluate_every`` rounds and after the last, each within
    ``evaluate_patches`` network passes of one patch (:meth:`NnUNetSite.evaluate`; <= 0: whole volumes; None:
    :data:`DEFAULT_EVALUATION_PATCHES`)."""
    if evaluate_patches is None:
        evaluate_patches = DEFAULT_EVALUATION_PATCHES
    fs = prepare_federation(spec, rounds, local_epochs=local_epochs, local_iterations=local_iterations,
                            strategy=strategy, strategy_options=strategy_options, trainer=trainer, plans=plans,
                            settings_file=settings_file, settings=settings, device=device, min_sites=min_sites,
                            resume=resume, seed=seed, sites=sites, workdir=workdir,
                            keep_checkpoints=keep_checkpoints, max_update_ratio=max_update_ratio,
                            large_updates=large_updates, max_num_examples=max_num_examples,
                            resume_with_new_settings=resume_with_new_settings, round_attempts=round_attempts,
                            transport_dtype=transport_dtype, sites_per_round=sites_per_round, sampling=sampling,
                            log=log)
    site_objs = [NnUNetSite(s.name, fs.layout.views[s.name], s.organs, fs.site_dir(s.name), trainer, plans,
                            device=device, log=log) for s in fs.sites]
    return fs.run_rounds(InProcessSites(site_objs, log), evaluate=evaluate, evaluate_every=evaluate_every,
                         evaluate_patches=evaluate_patches)
