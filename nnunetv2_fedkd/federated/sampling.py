"""Which sites train in a round: all of them, or ``per_round`` of them drawn afresh each round (server side).

A federation of hundreds of hospitals cannot have every site train every round (the round would cost the whole
federation, and the slowest site would set its pace). :class:`SiteSampling` draws ``per_round`` sites per round,
seeded by the federation's seed, the round and the attempt (a round run again after too few updates draws again), so
a rerun or a resume draws the same sites. The round's record lists them (``metrics.json``: ``sampled``).

* ``"uniform"``: ``per_round`` sites drawn uniformly without replacement (FedAvg's client sampling, McMahan et al.
  2017).
* ``"organs"``: organ coverage first. With partial labels an organ is learnt only from the sites that label it, and
  a round without any of them only forgets it (He et al. 2023 and Kim et al. 2024 federate one labelling site per
  organ). The organs of the available sites are taken in an order that rotates every round, and for each organ not
  yet labelled by a drawn site one of its sites is drawn, until ``per_round`` sites are drawn; the rest of the
  ``per_round`` are drawn uniformly. With ``per_round`` >= the number of organs every organ is labelled by a site of
  every round; with fewer, every organ's turn comes within ``ceil(organs / per_round)`` rounds.

A site that is not drawn does not train and keeps its local state (FedBN layers) as it is; when it is drawn again it
continues from its newest local state (:meth:`~nnunetv2_fedkd.federated.nnunet_site.NnUNetSite.latest_local_state`).
"""
from __future__ import annotations

import random
import zlib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence

SAMPLING_MODES = ("uniform", "organs")


@dataclass(frozen=True)
class SiteSampling:
    """``per_round`` sites a round (None: every site), drawn with ``mode`` from the sites available that round;
    ``site_organs``: the organs each site labels (the federation spec's), for ``"organs"``."""

    per_round: Optional[int] = None
    mode: str = "uniform"
    seed: int = 0
    site_organs: Mapping[str, Sequence[str]] = field(default_factory=dict)

    def __post_init__(self):
        if self.mode not in SAMPLING_MODES:
            raise ValueError(f"site sampling must be one of {', '.join(SAMPLING_MODES)}, not {self.mode!r}")
        if self.per_round is not None and (isinstance(self.per_round, bool) or not isinstance(self.per_round, int)
                                           or self.per_round < 1):
            raise ValueError(f"sites per round must be an int >= 1 (or None: every site), not {self.per_round!r}")

    def record(self) -> Dict[str, Any]:
        """What the resume contract records."""
        return {"per_round": self.per_round, "mode": self.mode}

    def _rng(self, round_idx: int, attempt: int) -> random.Random:
        return random.Random(zlib.crc32(f"{self.seed}:{round_idx}:{attempt}".encode("utf-8")))

    def choose(self, round_idx: int, available: Sequence[str], attempt: int = 0) -> List[str]:
        """The sites that train in round ``round_idx`` (0-based) among ``available``, in ``available``'s order."""
        names = sorted(set(available))
        if self.per_round is None or self.per_round >= len(names):
            return [s for s in available if s in names]
        rng = self._rng(round_idx, attempt)
        chosen: List[str] = []
        if self.mode == "organs":
            organs = sorted({o for s in names for o in self.site_organs.get(s, ())})
            if organs:
                shift = (round_idx * self.per_round) % len(organs)
                for organ in organs[shift:] + organs[:shift]:
                    if len(chosen) >= self.per_round:
                        break
                    if any(organ in self.site_organs.get(s, ()) for s in chosen):
                        continue
                    candidates = [s for s in names if organ in self.site_organs.get(s, ()) and s not in chosen]
                    if candidates:
                        chosen.append(rng.choice(candidates))
        rest = [s for s in names if s not in chosen]
        chosen += rng.sample(rest, self.per_round - len(chosen))
        picked = set(chosen)
        return [s for s in available if s in picked]


__all__ = ["SAMPLING_MODES", "SiteSampling"]
