"""The engine-neutral round core: global state, round instructions, aggregation, checkpoints and resume.

No Flower and no nnU-Net import here. The in-process runner (:mod:`nnunetv2_fedkd.federated.runner`) and the Flower
ServerApp (:mod:`nnunetv2_fedkd.flower`) both drive a federation through :class:`RoundCore`:

1. ``instructions = core.fit_instructions()`` - what every selected site receives with the global weights: the round
   index, the number of rounds, the federation's plans digest and the local-training settings (JSON-serialisable).
2. each site trains locally and returns a :class:`~nnunetv2_fedkd.federated.aggregation.SiteUpdate`; a site that
   fails or does not answer is reported as a failure ``(site, reason)``. A deterministic failure (bad data, plans,
   settings: :func:`failure_recurs`) stops the federation at once (:meth:`RoundCore.check_failure`); a transient one
   (a killed site, a timeout, out of memory) leaves the site out of this round only.
3. ``pending = core.aggregate(updates, failures)`` validates the updates (keys, shapes, dtypes, finite values,
   positive case counts, and the :class:`~nnunetv2_fedkd.federated.aggregation.UpdateBounds`: claimed case counts,
   size of the change), drops (or clips) and logs bad ones, and aggregates the rest with the strategy. A round is committed only with at
   least ``min_sites`` accepted updates: with fewer, ``core.accept(pending)`` is False and the engine runs the round
   again (the sites that failed transiently may be back), at most ``round_attempts`` times in a row, then the
   federation stops (:class:`TooFewUpdates`) with nothing of that round committed. When every site of a round failed
   the same way, that is a configuration error: the federation stops at once (:class:`SiteErrorWillRecur`).
4. the sites evaluate the new global weights on their own validation cases (optional).
5. ``core.commit(pending, evaluations)`` writes the round's checkpoint and its record, atomically: the round counts as
   completed exactly when ``state.json`` names it. :meth:`RoundCore.resume` restarts after the last completed round,
   so after a crash no round is lost and none is repeated.

Resume is a contract (:meth:`RoundCore.contract`): ``state.json`` records every setting that shapes training (rounds,
strategy and its options, the sites' training settings, min_sites, update bounds and the engine's run settings:
trainer, plans, sites, seed). A resume with any of them different is refused, listing each difference, unless it is
asked for (``allow_new_settings``); then the differences are recorded in ``settings_changes`` with the round they
apply after, so the earlier rounds' settings are never lost. Another strategy is always refused (its server state
would not carry over).

Checkpoint folder layout (``<run>/``)::

    state.json                 completed_rounds, files of the current global weights and strategy state, history
    global_round_0000.fedkd    the initial weights; global_round_NNNN.fedkd after round NNNN (1-based)
    strategy_round_NNNN.fedkd  the strategy's server state (FedOpt moments)
    metrics.json / metrics.csv per-round records (written at every commit)

Weight files are :func:`~nnunetv2_fedkd.federated.weights_io.save_weights` files (safetensors: no pickle; digest).
"""
from __future__ import annotations

import csv
import io
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from nnunetv2_fedkd.federated.aggregation import (
    TOO_FEW_UPDATES,
    RoundResult,
    SiteUpdate,
    Strategy,
    UpdateBounds,
    RoundAggregation,
    Weights,
    decode_update,
)
from nnunetv2_fedkd.federated.sampling import SiteSampling
from nnunetv2_fedkd.federated.site_side import check_transport_dtype, transport_weights
from nnunetv2_fedkd.federated.weights_io import CorruptCheckpoint, load_weights, save_weights
from nnunetv2_fedkd.utils import atomic_write, atomic_write_json, atomic_write_text

STATE_FORMAT = "nnunetv2_fedkd.federation_state"
STATE_VERSION = 1


class FederationStateError(RuntimeError):
    """The run folder cannot be resumed (names the file and why)."""


class FederationStopped(RuntimeError):
    """The federation cannot go on: nothing of the round in progress is committed, and the same command resumes after
    the last committed round once the cause (named in the message) is fixed."""


class SiteErrorWillRecur(FederationStopped):
    """A site failed with an error that the next round would raise again (bad data, settings, plans, code), or every
    site failed the same way: the federation stops at once instead of leaving sites out of every round."""


class TooFewUpdates(FederationStopped):
    """A round had fewer than ``min_sites`` valid updates in every one of its ``round_attempts`` attempts."""


# Exception types whose failure repeats when the same site runs the same code on the same data and settings. Anything
# else (RuntimeError, e.g. CUDA out of memory; OSError, e.g. a full disk or a lost connection; a killed site process;
# a Flower timeout) is taken as transient: the site is left out of the round and asked again in the next.
DETERMINISTIC_ERRORS = ("ValueError", "KeyError", "TypeError", "IndexError", "AttributeError", "AssertionError",
                        "FileNotFoundError", "NotADirectoryError", "IsADirectoryError", "ImportError",
                        "ModuleNotFoundError", "NotImplementedError", "ZeroDivisionError", "TrainerConfigError",
                        "PlansMismatch", "SpecError", "CorruptCheckpoint", "JSONDecodeError")
_DETERMINISTIC_RE = re.compile(r"(?<![A-Za-z0-9_])(" + "|".join(DETERMINISTIC_ERRORS) + r"): ")


def failure_recurs(reason: str) -> bool:
    """Whether a site failure ``reason`` (``"<ExceptionType>: <message>"``, as both engines report it; a Flower error
    reply carries the same text) is deterministic: raised by an exception type of :data:`DETERMINISTIC_ERRORS`."""
    return bool(_DETERMINISTIC_RE.search(str(reason)))


@dataclass
class PendingRound:
    """An aggregated but not yet committed round."""

    round_idx: int  # 0-based
    result: RoundResult
    failures: List[Tuple[str, str]]
    site_metrics: Dict[str, Dict[str, Any]]
    started: float
    sampled: Optional[List[str]] = None  # the sites drawn to train (None: every available site)


@dataclass
class FederationState:
    completed_rounds: int
    weights: Weights
    history: List[Dict[str, Any]] = field(default_factory=list)


#: the newest global checkpoints kept in a run folder (``--keep-checkpoints``)
DEFAULT_KEEP_CHECKPOINTS = 2
#: how many times in a row a round with fewer than min_sites valid updates is run before the federation stops
DEFAULT_ROUND_ATTEMPTS = 3


_SITE_EXCEPTION_RE = re.compile(r"(?<![A-Za-z0-9_])[A-Za-z_][A-Za-z0-9_]*(?:Error|Exception): ")


def _same_failure(site: str, reason: str) -> Optional[str]:
    """The exception a site reported (``"<Type>Error: <message>"``, also inside a Flower error reply), with the
    site's own name and every number taken out, to compare failures across sites; None for a failure of the
    transport (no reply, a node the SuperLink reports unavailable), which is never a configuration error."""
    m = _SITE_EXCEPTION_RE.search(str(reason))
    if m is None:
        return None
    text = re.sub(rf"(?<![A-Za-z0-9_]){re.escape(site)}(?![A-Za-z0-9_])", "<site>", str(reason)[m.start():])
    return re.sub(r"\d+", "#", text).strip()


def _global_file(run: Path, completed: int) -> Path:
    return run / f"global_round_{completed:04d}.fedkd"


def _strategy_file(run: Path, completed: int) -> Path:
    return run / f"strategy_round_{completed:04d}.fedkd"


class RoundCore:
    """Server side of a federation, engine-neutral.

    Args:
        run_dir: checkpoint folder (created).
        strategy: an aggregation :class:`~nnunetv2_fedkd.federated.aggregation.Strategy`.
        total_rounds: R.
        plans_digest: the federation's plans digest; travels with every round (sites refuse other plans).
        settings: JSON-serialisable local-training settings sent to every site each round.
        min_sites: the least number of accepted updates a round needs to be aggregated.
        keep_checkpoints: how many of the newest global checkpoints (and strategy states) stay on disk; a resume
            whose newest checkpoint is damaged goes back to the newest intact one, saying so.
        bounds: plausibility bounds on every update (:class:`~nnunetv2_fedkd.federated.aggregation.UpdateBounds`);
            None: form checks only.
        run_settings: the engine's other settings that shape training (JSON: trainer, plans, sites, seed, ...),
            part of the resume contract.
        allow_new_settings: resume a run folder whose contract differs (recorded in ``settings_changes``) instead of
            refusing it.
        round_attempts: how many times in a row a round with fewer than ``min_sites`` valid updates is run before
            the federation stops (:class:`TooFewUpdates`).
        sampling: which sites train each round (:class:`~nnunetv2_fedkd.federated.sampling.SiteSampling`; None:
            every site).
        transport_dtype: what the global weights and the updates travel in (``site_side.TRANSPORT_DTYPES``):
            "float16" sends :attr:`sent_weights` (2 bytes a parameter) and decodes each update
            (:func:`~nnunetv2_fedkd.federated.aggregation.decode_update`) before it is validated; aggregation and
            checkpoints stay float32.
        log: callable taking one line (progress and warnings).
    """

    def __init__(self, run_dir: Path, strategy: Strategy, total_rounds: int, plans_digest: str,
                 settings: Optional[Mapping[str, Any]] = None, min_sites: int = 1,
                 log: Callable[[str], Any] = print, keep_checkpoints: int = DEFAULT_KEEP_CHECKPOINTS,
                 bounds: Optional[UpdateBounds] = None, run_settings: Optional[Mapping[str, Any]] = None,
                 allow_new_settings: bool = False, round_attempts: int = DEFAULT_ROUND_ATTEMPTS,
                 transport_dtype: str = "float32", sampling: Optional[SiteSampling] = None):
        check_transport_dtype(transport_dtype)
        if sampling is not None and sampling.per_round is not None and sampling.per_round < min_sites:
            raise ValueError(f"{sampling.per_round} sites per round can never give min_sites={min_sites} updates")
        if total_rounds < 1:
            raise ValueError(f"total_rounds must be >= 1, got {total_rounds}")
        if min_sites < 1:
            raise ValueError(f"min_sites must be >= 1, got {min_sites}")
        if keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {keep_checkpoints}")
        if round_attempts < 1:
            raise ValueError(f"round_attempts must be >= 1, got {round_attempts}")
        self.round_attempts = int(round_attempts)
        self._failed_attempts: List[Dict[str, Any]] = []  # of the round in progress
        self.keep_checkpoints = int(keep_checkpoints)
        self.run_dir = Path(run_dir)
        self.strategy = strategy
        self.total_rounds = int(total_rounds)
        self.plans_digest = plans_digest
        self.settings = dict(settings or {})
        self.min_sites = int(min_sites)
        self.bounds = bounds
        self.run_settings = dict(run_settings or {})
        self.allow_new_settings = bool(allow_new_settings)
        self.settings_changes: List[Dict[str, Any]] = []
        self.log = log
        self.transport_dtype = transport_dtype
        self.sampling = sampling or SiteSampling()
        self._round: Optional[RoundAggregation] = None  # the round being aggregated (begin_round .. aggregate)
        self._round_metrics: Dict[str, Dict[str, Any]] = {}
        self._sent: Optional[Tuple[int, Dict[str, torch.Tensor]]] = None  # (completed rounds, weights as sent)
        self.state: Optional[FederationState] = None
        json.dumps(self.settings)  # must travel as JSON
        json.dumps(self.run_settings)

    # -- state --------------------------------------------------------------------------------------------------------
    @property
    def state_file(self) -> Path:
        return self.run_dir / "state.json"

    def start(self, initial_weights: Mapping[str, torch.Tensor], resume: bool = True) -> FederationState:
        """Resume from ``state.json`` when it exists (and ``resume``), else start at round 0 from
        ``initial_weights`` (written as ``global_round_0000.fedkd``)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.state_file.exists():
            if not resume:
                raise FederationStateError(f"{self.state_file} exists: resume it, or use a new run folder")
            return self.resume(initial_weights)
        leftovers = sorted(p.name for p in self.run_dir.glob("global_round_*.fedkd")) + \
            [n for n in ("metrics.json",) if (self.run_dir / n).exists()]
        if leftovers == [_global_file(self.run_dir, 0).name]:
            leftovers = []  # a crash between the initial checkpoint and the first state.json: nothing was trained
        if leftovers:  # a run that lost its state file must not silently start again over its records
            raise FederationStateError(
                f"{self.run_dir} holds the files of an earlier run ({', '.join(leftovers[-3:])}) but no state.json: "
                f"restore {self.state_file.name} to resume it, or move the folder away to start a new run")
        return self._fresh_start(initial_weights)

    def _fresh_start(self, initial_weights: Mapping[str, torch.Tensor]) -> FederationState:
        weights = {k: v.detach().cpu().clone() for k, v in initial_weights.items()}
        save_weights(_global_file(self.run_dir, 0), weights, self._meta(0))
        self.state = FederationState(0, weights, [])
        self._write_state()
        return self.state

    def contract(self) -> Dict[str, Any]:
        """Every setting that shapes training, as recorded in ``state.json``: a resume must match it (or be asked
        to continue with new settings)."""
        return {"total_rounds": self.total_rounds, "strategy": self.strategy.hyperparameters(),
                "settings": self.settings, "min_sites": self.min_sites,
                "update_bounds": self.bounds.record() if self.bounds is not None else None,
                "transport_dtype": self.transport_dtype, "sampling": self.sampling.record(), **self.run_settings}

    def _contract_changes(self, raw: Mapping[str, Any]) -> Dict[str, Dict[str, Any]]:
        """``{dotted key: {"was": ..., "now": ...}}`` between the recorded contract and this one. A state file from
        before the contract is compared on what it recorded."""
        was = raw.get("contract")
        if not isinstance(was, dict):
            was = {"total_rounds": raw.get("total_rounds"), "strategy": raw.get("strategy_hyperparameters"),
                   "settings": raw.get("settings"), "min_sites": raw.get("min_sites")}
            was = {k: v for k, v in was.items() if v is not None}
        now = json.loads(json.dumps(self.contract()))  # as it reads back from the file (tuples are lists, ...)
        a, b = _flatten(was), _flatten({k: v for k, v in now.items() if k in was})
        missing = object()
        return {k: {"was": a.get(k), "now": b.get(k)} for k in sorted(set(a) | set(b))
                if not _same_value(a.get(k, missing), b.get(k, missing))}

    def resume(self, initial_weights: Optional[Mapping[str, torch.Tensor]] = None) -> FederationState:
        """Continue after the last completed round recorded in ``state.json`` (see the module's resume contract).
        With ``initial_weights``, a run folder that completed no round yet starts again with the new settings
        instead of refusing them (nothing was trained under the old ones)."""
        f = self.state_file
        try:
            raw = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            raise FederationStateError(f"cannot read {f}: {e}") from e
        if not isinstance(raw, dict) or raw.get("format") != STATE_FORMAT:
            raise FederationStateError(f"{f} is not a federation state file")
        for key, kind, what in (("completed_rounds", int, "an integer"), ("total_rounds", int, "an integer"),
                                ("strategy", str, "a string"), ("plans_digest", str, "a string"),
                                ("global_weights", str, "a file name"), ("history", list, "a list")):
            if isinstance(raw.get(key), bool) or not isinstance(raw.get(key), kind):
                raise FederationStateError(f"{f} is damaged: {key!r} must be {what}, got "
                                           f"{raw.get(key, '<missing>')!r}")
        if not 0 <= raw["completed_rounds"] <= raw["total_rounds"]:
            raise FederationStateError(f"{f} is damaged: completed_rounds {raw['completed_rounds']} is not within "
                                       f"0..{raw['total_rounds']}")
        if raw.get("strategy_state") is not None and not isinstance(raw.get("strategy_state"), str):
            raise FederationStateError(f"{f} is damaged: 'strategy_state' must be a file name or null")
        if raw["completed_rounds"] == 0 and not raw["history"] and initial_weights is not None:
            changes = self._contract_changes(raw)
            if changes or raw["plans_digest"] != self.plans_digest or raw["strategy"] != self.strategy.name:
                listed = "; ".join(f"{k}: {v['was']!r} -> {v['now']!r}" for k, v in changes.items())
                self.log(f"{f} completed no round yet: starting again with the new settings ({listed or 'plans'})")
                return self._fresh_start(initial_weights)
        if raw.get("plans_digest") != self.plans_digest:
            raise FederationStateError(f"{f} belongs to a federation with other plans (digest "
                                       f"{str(raw.get('plans_digest'))[:12]}..., now {self.plans_digest[:12]}...)")
        if raw["strategy"] != self.strategy.name:
            raise FederationStateError(
                f"{f} is a run of strategy {raw['strategy']!r}, not {self.strategy.name!r}: its server state does not "
                f"carry over to another strategy; resume it with {raw['strategy']!r} or use a new run folder")
        if raw["completed_rounds"] > self.total_rounds:
            raise FederationStateError(f"{f} has completed {raw['completed_rounds']} rounds, more than the "
                                       f"{self.total_rounds} asked")
        changes = self._contract_changes(raw)
        listed = "; ".join(f"{k}: {v['was']!r} -> {v['now']!r}" for k, v in changes.items())
        if changes and not self.allow_new_settings:
            raise FederationStateError(
                f"{f} was trained with other settings ({listed}). Resume it with the same settings, or continue "
                f"with the new ones on purpose (`--resume-with-new-settings`; Flower run config "
                f"resume-with-new-settings=true: recorded in its settings_changes), or use a new run folder")
        past = raw.get("settings_changes") or []
        if not isinstance(past, list):
            raise FederationStateError(f"{f} is damaged: 'settings_changes' must be a list")
        self.settings_changes = list(past)
        done = int(raw["completed_rounds"])
        history = list(raw.get("history", []))
        stateful = bool(raw.get("strategy_state"))
        try:
            weights, sstate = self._load_round(done, raw["global_weights"], raw.get("strategy_state"))
        except (CorruptCheckpoint, FileNotFoundError) as damaged:
            older = self._newest_intact_round(below=done, stateful=stateful)
            if older is None:
                raise
            k, weights, sstate = older
            self.log(f"{damaged}; resuming from round {k}, the newest intact checkpoint: round(s) {k + 1}-{done} "
                     f"will be trained again")
            history = [h for h in history if int(h.get("round", 0)) <= k]
            done = k
        if sstate is not None:
            self.strategy.load_state_dict(sstate)
        self.state = FederationState(done, weights, history)
        if changes:
            self.settings_changes.append({"after_round": done, "changes": changes})
            self.log(f"resuming with new settings after round {done}: {listed} (recorded in {f.name})")
        if changes or done != int(raw["completed_rounds"]):
            self._write_state()  # state.json names the round resumed from and the settings from now on
        self.log(f"resuming {self.run_dir} after round {done}/{self.total_rounds}")
        return self.state

    def _load_round(self, completed: int, weights_name: str, strategy_name: Optional[str]):
        """(global weights, strategy state or None) checkpointed after round ``completed``; CorruptCheckpoint if a
        file is damaged or holds another round."""
        weights, meta = load_weights(self.run_dir / weights_name)
        if meta.get("completed_rounds") != completed:
            raise CorruptCheckpoint(self.run_dir / weights_name,
                                    f"holds round {meta.get('completed_rounds')}, expected {completed}")
        sstate = load_weights(self.run_dir / strategy_name)[0] if strategy_name else None
        return weights, sstate

    def _newest_intact_round(self, below: int, stateful: bool):
        """(round, weights, strategy state) of the newest intact checkpoint before round ``below``, or None."""
        for k in range(below - 1, -1, -1):
            g = _global_file(self.run_dir, k)
            if not g.exists():
                continue
            try:
                return (k, *self._load_round(k, g.name, _strategy_file(self.run_dir, k).name if stateful else None))
            except (CorruptCheckpoint, FileNotFoundError) as e:
                self.log(f"{e}; trying an older checkpoint")
        return None

    def _meta(self, completed: int) -> Dict[str, Any]:
        return {"completed_rounds": completed, "plans_digest": self.plans_digest, "strategy": self.strategy.name}

    def _write_state(self) -> None:
        s = self.state
        sstate = self.strategy.state_dict()
        sfile = None
        if sstate:
            sfile = _strategy_file(self.run_dir, s.completed_rounds).name
            save_weights(self.run_dir / sfile, sstate, self._meta(s.completed_rounds))
        atomic_write_json(self.run_dir / "metrics.json", s.history)
        atomic_write_text(self.run_dir / "metrics.csv", metrics_csv(s.history))
        atomic_write_json(self.state_file, {
            "format": STATE_FORMAT, "version": STATE_VERSION, "completed_rounds": s.completed_rounds,
            "total_rounds": self.total_rounds, "strategy": self.strategy.name, "plans_digest": self.plans_digest,
            # the settings themselves are in the contract only (state files before it had them at the top level)
            "contract": self.contract(), "settings_changes": self.settings_changes,
            "global_weights": _global_file(self.run_dir, s.completed_rounds).name, "strategy_state": sfile,
            "history": s.history,
        })
        # only the newest keep_checkpoints checkpoints stay, once state.json names the new ones
        for old in range(0, s.completed_rounds - self.keep_checkpoints + 1):
            for p in (_global_file(self.run_dir, old), _strategy_file(self.run_dir, old)):
                if p.exists():
                    p.unlink()

    # -- rounds -------------------------------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.state is not None and self.state.completed_rounds >= self.total_rounds

    @property
    def global_weights_file(self) -> Path:
        return _global_file(self.run_dir, self._need_state().completed_rounds)

    @property
    def sent_weights(self) -> Dict[str, torch.Tensor]:
        """The round's global weights as they travel to the sites (``transport_dtype``)."""
        s = self._need_state()
        if self._sent is None or self._sent[0] != s.completed_rounds:
            self._sent = (s.completed_rounds, transport_weights(s.weights, self.transport_dtype))
        return self._sent[1]

    def sent_weights_file(self) -> Path:
        """A weights file holding :attr:`sent_weights`, for sites that read the global weights from a file (the
        in-process engine): the round's checkpoint when they travel in float32, else ``sent_global.fedkd`` (written
        once per round)."""
        if self.transport_dtype == "float32":
            return self.global_weights_file
        done = self._need_state().completed_rounds
        f = self.run_dir / "sent_global.fedkd"
        try:
            if f.is_file() and load_weights(f)[1].get("completed_rounds") == done:
                return f
        except CorruptCheckpoint:
            pass
        save_weights(f, self.sent_weights, {**self._meta(done), "transport_dtype": self.transport_dtype})
        return f

    def _need_state(self) -> FederationState:
        if self.state is None:
            raise RuntimeError("call start() first")
        return self.state

    def evaluates_this_round(self, every: int) -> bool:
        """Whether the sites evaluate the global model of the round now in progress: every ``every``-th round and
        always the last one (``every`` <= 0: never). Validating full volumes at every site in every round can cost
        more than the round's training at real image sizes."""
        n = self._need_state().completed_rounds + 1
        return every > 0 and (n % every == 0 or n == self.total_rounds)

    def choose_sites(self, available: Sequence[str]) -> List[str]:
        """The sites that train in the round now in progress, among ``available`` (:attr:`sampling`; an attempt run
        again after too few updates draws again)."""
        s = self._need_state()
        return self.sampling.choose(s.completed_rounds, available, attempt=len(self._failed_attempts))

    def fit_instructions(self) -> Dict[str, Any]:
        """What every site receives for the next round (besides the global weights)."""
        s = self._need_state()
        return {"round": s.completed_rounds, "total_rounds": self.total_rounds, "plans_digest": self.plans_digest,
                "strategy": self.strategy.name, "transport_dtype": self.transport_dtype,
                **self.strategy.site_settings(), **self.settings}

    def check_failure(self, site: str, reason: str, log_hint: Optional[str] = None) -> None:
        """Stop the federation (:class:`SiteErrorWillRecur`, nothing of this round is committed) when ``site``'s
        failure is deterministic (:func:`failure_recurs`); a transient one returns, and the site is left out of this
        round only. Engines call it as soon as a site fails; :meth:`aggregate` calls it for every failure too."""
        if not failure_recurs(reason):
            return
        r = self._need_state().completed_rounds
        raise SiteErrorWillRecur(
            f"round {r + 1}: site {site!r} failed with an error that would recur in every round: {reason}. "
            f"The federation stops here (round {r + 1} is not committed). Fix the site's data, plans or settings "
            f"that the message names{f' (site log: {log_hint})' if log_hint else ''}, then run the same command: "
            f"it resumes after round {r}.")

    def begin_round(self) -> None:
        """Start aggregating the round now in progress (:meth:`add_update` as the updates arrive, then
        :meth:`aggregate`). Called by :meth:`add_update` when needed; an earlier unfinished attempt is discarded."""
        s = self._need_state()
        decode = None
        if self.transport_dtype != "float32":
            sent, dtype = self.sent_weights, self.transport_dtype
            decode = lambda u: decode_update(u, sent, dtype)  # noqa: E731
        self._round = RoundAggregation(self.strategy, s.weights, s.completed_rounds + 1, log=self.log,
                                       bounds=self.bounds, decode=decode)
        self._round_metrics: Dict[str, Dict[str, Any]] = {}

    def add_update(self, update: SiteUpdate) -> bool:
        """Validate one site's update as it arrives and fold it into the round's aggregate (the engines call this
        from their ``on_update``, so no engine holds every site's weights: the server's memory is O(model)); True if
        it was accepted. A rejected update is logged, listed as dropped, and leaves no trace in the aggregate."""
        if getattr(self, "_round", None) is None:
            self.begin_round()
        self._round_metrics[update.site] = {"num_examples": update.num_examples, **_jsonable(update.metrics)}
        return self._round.add(update)

    def aggregate(self, updates: Sequence[SiteUpdate] = (), failures: Sequence[Tuple[str, str]] = (),
                  started: Optional[float] = None, sampled: Optional[Sequence[str]] = None) -> PendingRound:
        """Finish the round's aggregation: ``updates`` (if any were not added with :meth:`add_update`) are added
        first; a deterministic failure stops the federation; with at least ``min_sites`` valid updates the strategy
        aggregates them (with fewer it is not called, so an uncommitted round leaves no trace)."""
        s = self._need_state()
        r = s.completed_rounds
        if getattr(self, "_round", None) is None:
            self.begin_round()
        for u in updates:
            self.add_update(u)
        try:
            for site, reason in failures:
                self.check_failure(site, reason)
        except SiteErrorWillRecur:
            self._round = None  # nothing of this attempt is kept
            raise
        same = {_same_failure(a, b) for a, b in failures}
        if len(failures) >= 2 and not self._round_metrics and len(same) == 1 and None not in same:
            self._round = None
            raise SiteErrorWillRecur(
                f"round {r + 1}: every site ({', '.join(a for a, _ in failures)}) failed the same way: "
                f"{failures[0][1]}. "
                f"That is a configuration error, not a site's bad luck: the federation stops here (round {r + 1} is "
                f"not committed). Fix the cause and run the same command: it resumes after round {r}.")
        for site, reason in failures:
            self.log(f"round {r + 1}: site {site!r} failed and is left out of this round: {reason}")
        result = self._round.finish(self.min_sites)
        metrics, self._round, self._round_metrics = self._round_metrics, None, {}
        return PendingRound(r, result, list(failures), metrics, started if started is not None else time.time(),
                            None if sampled is None else list(sampled))

    def accept(self, pending: PendingRound) -> bool:
        """Whether ``pending`` can be committed (at least ``min_sites`` valid updates). If not, the attempt is logged
        and remembered (the committed round's record lists it) and the engine runs the round again; after
        ``round_attempts`` such attempts in a row, :class:`TooFewUpdates` stops the federation."""
        if pending.result.aggregated:
            return True
        r = pending.round_idx + 1
        self._failed_attempts.append({"failed": [{"site": a, "reason": b} for a, b in pending.failures],
                                      "dropped": [{"site": a, "reason": b} for a, b in pending.result.dropped]})
        n = len(self._failed_attempts)
        valid = [a for a, b in pending.result.dropped if b == TOO_FEW_UPDATES]
        why = "; ".join([f"{a}: {b}" for a, b in pending.failures] + [f"{a} dropped: {b}" for a, b in
                                                                       pending.result.dropped if b != TOO_FEW_UPDATES])
        why = why or "no site answered"
        if n >= self.round_attempts:
            self._failed_attempts = []
            raise TooFewUpdates(
                f"round {r}: fewer than min_sites={self.min_sites} valid updates in {n} attempt(s) ({why}). The "
                f"federation stops here (round {r} is not committed); when enough sites can train again, run the same "
                f"command: it resumes after round {r - 1}.")
        self.log(f"round {r}: {len(valid)} valid update(s), fewer than min_sites={self.min_sites} ({why}): not committed; round {r} runs again (attempt {n + 1}/"
                 f"{self.round_attempts})")
        return False

    def commit(self, pending: PendingRound, evaluations: Optional[Mapping[str, Mapping[str, Any]]] = None,
               extra: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
        """Checkpoint the round and append its record; returns the record. Only a round that :meth:`accept` took
        (at least ``min_sites`` valid updates) is committed."""
        s = self._need_state()
        if pending.round_idx != s.completed_rounds:
            raise RuntimeError(f"round {pending.round_idx + 1} cannot be committed after round {s.completed_rounds}")
        if not pending.result.aggregated:
            raise RuntimeError(f"round {pending.round_idx + 1} has fewer than min_sites={self.min_sites} valid "
                               f"updates: it is not committed (check core.accept(pending) and run it again)")
        done = s.completed_rounds + 1
        evaluations = {k: _jsonable(v) for k, v in (evaluations or {}).items()}
        record = {**pending.result.record(), "round": done, "failed": [{"site": a, "reason": b}
                                                                       for a, b in pending.failures],
                  "sites": pending.site_metrics, "evaluation": evaluations,
                  "organ_dice": organ_dice(evaluations), "seconds": round(time.time() - pending.started, 1),
                  "attempts": 1 + len(self._failed_attempts), "failed_attempts": self._failed_attempts,
                  **({} if pending.sampled is None else {"sampled": pending.sampled}), **_jsonable(extra or {})}
        self._failed_attempts = []
        save_weights(_global_file(self.run_dir, done), pending.result.weights, self._meta(done))
        self.state = FederationState(done, pending.result.weights, s.history + [record])
        self._write_state()
        return record


def _same_value(a: Any, b: Any) -> bool:
    """Equality of JSON values for the resume contract (10 == 10.0, and NaN equals NaN)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    return a == b


def _flatten(d: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _jsonable(d: Mapping[str, Any]) -> Dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out[k] = _jsonable(v)
        elif isinstance(v, float) and not math.isfinite(v):
            out[k] = None
        elif isinstance(v, (str, int, float, bool, list)) or v is None:
            out[k] = v
        else:
            out[k] = float(v)
    return out


def organ_dice(evaluations: Mapping[str, Mapping[str, Any]]) -> Dict[str, Optional[float]]:
    """Per-organ Dice of the global model over the sites that evaluated it: the case-weighted mean of each site's
    Dice for the organs it labels (``{"dice": {organ: value}, "num_cases": n}`` per site)."""
    sums: Dict[str, float] = {}
    counts: Dict[str, int] = {}
    for ev in evaluations.values():
        n = int(ev.get("num_cases", 1) or 0)
        for organ, d in (ev.get("dice") or {}).items():
            if d is None or n == 0:
                continue
            sums[organ] = sums.get(organ, 0.0) + float(d) * n
            counts[organ] = counts.get(organ, 0) + n
    return {o: round(sums[o] / counts[o], 4) for o in sums}


def metrics_csv(history: Sequence[Mapping[str, Any]]) -> str:
    """One row per round: round, aggregated, accepted/dropped/failed sites, seconds, mean train loss, organ Dice."""
    organs = sorted({o for r in history for o in (r.get("organ_dice") or {})})
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["round", "aggregated", "accepted", "dropped", "failed", "seconds", "mean_train_loss",
                *[f"dice_{o}" for o in organs]])
    for r in history:
        losses = [m.get("train_loss") for m in (r.get("sites") or {}).values() if m.get("train_loss") is not None]
        w.writerow([r["round"], r["aggregated"], " ".join(r["accepted"]),
                    " ".join(d["site"] for d in r["dropped"]), " ".join(d["site"] for d in r.get("failed", [])),
                    r.get("seconds"), round(sum(losses) / len(losses), 4) if losses else "",
                    *[(r.get("organ_dice") or {}).get(o, "") for o in organs]])
    return buf.getvalue()


def plot_progress(history: Sequence[Mapping[str, Any]], path: Path) -> Optional[Path]:
    """PNG of per-organ validation Dice and mean local training loss per round (like nnU-Net's progress.png)."""
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in history]
    organs = sorted({o for r in history for o in (r.get("organ_dice") or {})})
    losses = []
    for r in history:
        ls = [m.get("train_loss") for m in (r.get("sites") or {}).values() if m.get("train_loss") is not None]
        losses.append(sum(ls) / len(ls) if ls else float("nan"))
    buf = io.BytesIO()
    # nnU-Net's logger sets a global seaborn style with a large font scale when imported: plot in matplotlib's own
    with plt.style.context("default"):
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
        for o in organs:
            a1.plot(rounds, [(r.get("organ_dice") or {}).get(o, float("nan")) for r in history], marker="o", label=o)
        a1.set_xlabel("round")
        a1.set_ylabel("validation Dice (sites' own organs)")
        a1.set_ylim(0, 1)
        if organs:
            a1.legend()
        a2.plot(rounds, losses, marker="o", color="k")
        a2.set_xlabel("round")
        a2.set_ylabel("mean local train loss")
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=90)
        plt.close(fig)
    data = buf.getvalue()
    return atomic_write(path, lambda f: f.write(data), binary=True)
