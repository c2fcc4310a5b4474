"""Site sampling (issue 17, item 1): K sites a round, drawn afresh every round, seeded and recorded; organ coverage
first with partial labels; a site not drawn keeps its local state; both engines draw through the round core."""
from __future__ import annotations

import math

import pytest
import torch

from nnunetv2_fedkd.federated.sampling import SiteSampling

ORGANS = {f"liver_{i}": ["liver"] for i in range(30)}
ORGANS.update({f"kidney_{i}": ["kidney"] for i in range(5)})
ORGANS.update({"spleen_0": ["spleen"], "pancreas_0": ["pancreas"], "pancreas_1": ["pancreas"]})
SITES = sorted(ORGANS)


def test_uniform_draws_k_sites_seeded_by_round_and_attempt():
    s = SiteSampling(5, "uniform", seed=3)
    draws = [s.choose(r, SITES) for r in range(20)]
    assert all(len(d) == 5 and len(set(d)) == 5 and set(d) <= set(SITES) for d in draws)
    assert draws == [SiteSampling(5, "uniform", seed=3).choose(r, SITES) for r in range(20)]  # a rerun draws alike
    assert len({tuple(d) for d in draws}) > 15  # afresh every round
    assert SiteSampling(5, seed=4).choose(0, SITES) != draws[0] and s.choose(0, SITES, attempt=1) != draws[0]
    assert s.choose(0, list(reversed(SITES))) == [x for x in reversed(SITES) if x in draws[0]]  # the order given
    counts = {x: sum(x in d for d in (s.choose(r, SITES) for r in range(400))) for x in SITES}
    assert min(counts.values()) > 0.5 * 400 * 5 / len(SITES)  # every site gets its turns
    # uniformly, the lone spleen site is in few rounds: the spleen is then learnt in few rounds only
    assert counts["spleen_0"] < 0.25 * 400


def test_organ_coverage_puts_every_organ_in_every_round_when_k_allows():
    s = SiteSampling(5, "organs", seed=3, site_organs=ORGANS)
    for r in range(50):
        d = s.choose(r, SITES)
        assert len(d) == 5 and {o for x in d for o in ORGANS[x]} == {"liver", "kidney", "spleen", "pancreas"}
    # fewer sites a round than organs: every organ's turn comes within ceil(organs / K) rounds
    s2 = SiteSampling(3, "organs", seed=1, site_organs=ORGANS)
    window = math.ceil(4 / 3)
    for r in range(0, 40):
        seen = {o for q in range(r, r + window) for x in s2.choose(q, SITES) for o in ORGANS[x]}
        assert seen == {"liver", "kidney", "spleen", "pancreas"}, r


def test_every_site_or_bad_settings():
    assert SiteSampling().choose(0, ["b", "a"]) == ["b", "a"]
    assert SiteSampling(10).choose(0, ["b", "a"]) == ["b", "a"]  # more than available: all
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="sites per round must be an int >= 1"):
            SiteSampling(bad)
    with pytest.raises(ValueError, match="site sampling must be one of uniform, organs"):
        SiteSampling(2, "greedy")
    assert SiteSampling(2, "organs").record() == {"per_round": 2, "mode": "organs"}


def test_a_site_not_drawn_continues_from_its_newest_local_state(tmp_path):
    from nnunetv2_fedkd.federated.nnunet_site import NnUNetSite

    site = NnUNetSite("liver_0", "Dataset601_X", ["liver"], tmp_path)
    assert site.latest_local_state(3) == site.local_state_after(3)  # none yet
    site.local_state_after(1).write_bytes(b"x")
    assert site.latest_local_state(3) == site.local_state_after(1)  # drawn in round 1 only
    site.local_state_after(3).write_bytes(b"x")
    assert site.latest_local_state(3) == site.local_state_after(3)
    assert site.latest_local_state(2) == site.local_state_after(1)


def test_flower_asks_unknown_nodes_their_site_and_sends_train_messages_to_the_drawn_ones(monkeypatch):
    from nnunetv2_fedkd.flower import strategy

    class Reply:
        def __init__(self, content):
            self.content = content

    from nnunetv2_fedkd.flower.task import SITE, site_record

    asked, trained = [], []

    def exchange(grid, nodes, kind, weights, instructions, timeout):
        asked.append((kind, list(nodes)))
        names = {1: "liver_0", 2: "kidney_0", 3: "stranger"}
        replies = {n: Reply({SITE: site_record(names[n], [])}) for n in nodes if n != 4}
        return replies, ({4: "no query reply within 5 s"} if 4 in nodes else {})

    monkeypatch.setattr(strategy, "_exchange", exchange)
    monkeypatch.setattr(strategy, "wait_for_nodes", lambda grid, least, t, log, select: select([1, 2, 3, 4]))
    monkeypatch.setattr(strategy, "train_round", lambda grid, nodes, *a, **k: (trained.append(list(nodes)) or
                                                                             ([], list(nodes))))
    logs = []
    fs = strategy.FlowerSites(None, strategy.SiteDirectory(["liver_0", "kidney_0"]), 5, 5, logs.append)
    core = type("Core", (), {"min_sites": 1, "total_rounds": 2, "sent_weights": {"w": torch.zeros(1)}})()
    fs.before_round(core)
    assert asked == [("query", [1, 2, 3, 4])]
    assert fs.available_sites(core) == ["liver_0", "kidney_0"]  # the stranger and the silent node are not drawn
    assert any("node 3" in x and "stranger" in x for x in logs) and any("node 4" in x for x in logs)
    fs.train(core, {"round": 0}, lambda u, s: None, ["kidney_0"])
    assert trained == [[2]]
    fs.before_round(core)  # known nodes are not asked again; the silent one is, the excluded stranger is not
    assert asked[-1] == ("query", [4])
