"""The server's side of a round over Flower messages: wait for SuperNodes, send ``train``/``evaluate`` messages, turn
the replies into what the round core takes (:class:`~nnunetv2_fedkd.federated.aggregation.SiteUpdate` s and
``(site, reason)`` failures, evaluations by site).

No aggregation here: the round core validates and aggregates (the ServerApp does not use Flower's strategies).

Sites are identified by the name their SuperNode declares (``--node-config site=...``), bound to the SuperNode's node
id at its first reply: a node that later declares another name, a name another connected node holds, or a site that
is not in the federation's spec is refused (the reply counts as a failure). With SuperNode authentication
(``--enable-supernode-auth``) node ids belong to registered keys.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from flwr.app import ArrayRecord, Message, MessageType
from flwr.serverapp import Grid

from nnunetv2_fedkd.federated.aggregation import SiteUpdate
from nnunetv2_fedkd.federated.round_core import FederationStopped
from nnunetv2_fedkd.flower.task import (MessageContentError, read_evaluation, read_update, reply_site,
                                        round_content)


class NoSitesError(FederationStopped):
    """No SuperNode connected within the waiting time."""


def wait_for_nodes(grid: Grid, least: int, timeout: float, log: Callable[[str], Any] = print,
                   select: Callable[[Iterable[int]], List[int]] = list, poll: float = 2.0) -> List[int]:
    """The connected node ids (those ``select`` keeps), once at least ``least`` are connected or after ``timeout``
    seconds (then whatever is connected; :class:`NoSitesError` if none)."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(select(grid.get_node_ids()))
        if len(nodes) >= least:
            return nodes
        if time.monotonic() >= deadline:
            if not nodes:
                raise NoSitesError(f"no SuperNode connected within {timeout:.0f} s")
            log(f"only {len(nodes)} SuperNode(s) connected after {timeout:.0f} s (min-sites {least}); going on")
            return nodes
        time.sleep(poll)


class SiteDirectory:
    """Node id <-> site name, learnt from replies and checked against the spec's (selected) sites. A node that
    declares a site outside them gets no further messages in this run."""

    def __init__(self, sites: Iterable[str]):
        self.allowed = set(sites)
        self.by_node: Dict[int, str] = {}
        self.excluded: Dict[int, str] = {}

    def name(self, node: int) -> str:
        return self.by_node.get(node, f"node {node}")

    def select(self, nodes: Iterable[int]) -> List[int]:
        """The connected ``nodes`` to send messages to; forgets the names of nodes no longer connected (a site whose
        SuperNode restarted under a new node id can rejoin)."""
        nodes = list(nodes)
        for gone in set(self.by_node) - set(nodes):
            del self.by_node[gone]
        return [n for n in nodes if n not in self.excluded]

    def bind(self, node: int, site: str) -> None:
        if site not in self.allowed:
            self.excluded[node] = site
            raise MessageContentError(f"node {node} declares site {site!r}, which is not a site of this federation "
                                      f"({', '.join(sorted(self.allowed))}); it gets no further messages")
        known = self.by_node.get(node)
        if known is not None and known != site:
            raise MessageContentError(f"node {node} was site {known!r} and now declares {site!r}")
        holder = next((n for n, s in self.by_node.items() if s == site and n != node), None)
        if holder is not None:
            raise MessageContentError(f"node {node} declares site {site!r}, which node {holder} already is")
        self.by_node[node] = site


#: seconds between two pulls for replies (Flower's own send_and_receive waits 3 s between pulls)
POLL_S = 0.5


def _exchange(grid: Grid, nodes: Sequence[int], kind: str, weights: ArrayRecord, instructions: Mapping[str, Any],
              timeout: float, on_reply: Optional[Callable[[int, Message], Any]] = None, poll: float = POLL_S
              ) -> Tuple[Dict[int, Message], Dict[int, str]]:
    """Send one message per node and pull the replies as they come (every ``poll`` s, at most ``timeout`` s);
    returns (replies with content by node, failure reason by node). With ``on_reply(node, reply)`` each reply with
    content goes there as soon as it is pulled and is not kept (a round's updates are folded one by one and never
    held together). Pushed and pulled with the Grid's own ``push_messages`` / ``pull_messages``: Flower's
    ``send_and_receive`` does the same with 3 s between pulls and returns the replies only once all are in."""
    group = str(int(instructions["round"]) + 1)
    messages = [Message(round_content(weights, instructions), dst_node_id=n, message_type=kind, group_id=group,
                        ttl=timeout) for n in nodes]
    ids = list(grid.push_messages(messages))
    del messages
    replies: Dict[int, Message] = {}
    failed: Dict[int, str] = {}
    # a reply names the message it answers; its sender is not always the node: for a node that stopped sending
    # heartbeats the SuperLink itself answers (error NODE_UNAVAILABLE, src_node_id = the SuperLink's id)
    to_node = {mid: n for mid, n in zip(ids, nodes) if mid is not None}
    for mid, n in zip(ids, nodes):
        if mid is None:
            failed[n] = f"the {kind} message could not be pushed to the SuperLink"
    pending = set(to_node)
    deadline = time.monotonic() + timeout
    while pending:
        for reply in grid.pull_messages(list(pending)):
            mid = reply.metadata.reply_to_message_id
            if mid not in pending:
                continue
            pending.discard(mid)
            node = to_node[mid]
            if reply.has_error():
                failed[node] = f"error reply (code {reply.error.code}): {reply.error.reason}"
            elif on_reply is not None:
                on_reply(node, reply)
            else:
                replies[node] = reply
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(poll)
    for mid in pending:
        failed[to_node[mid]] = f"no {kind} reply within {timeout:.0f} s"
    return replies, failed


def identify_nodes(grid: Grid, nodes: Sequence[int], sites: SiteDirectory, timeout: float,
                   log: Callable[[str], Any] = print) -> None:
    """Ask the ``nodes`` whose site is not known yet which site they are (a ``query`` message; the ClientApp answers
    from its ``--node-config`` without training) and bind their names, so that the round core can draw sites by name
    before anything trains. A node that does not answer or declares a site outside the federation is logged and
    stays unknown (it gets no ``train`` message this round)."""
    unknown = [n for n in nodes if n not in sites.by_node and n not in sites.excluded]
    if not unknown:
        return
    replies, failed = _exchange(grid, unknown, MessageType.QUERY, ArrayRecord(), {"round": -1}, timeout)
    for node, reply in replies.items():
        try:
            sites.bind(node, reply_site(reply.content)[0])
        except MessageContentError as e:
            failed[node] = f"unusable query reply: {e}"
    for node, why in sorted(failed.items()):
        log(f"node {node} did not say which site it is: {why}")


def train_round(grid: Grid, nodes: Sequence[int], weights: ArrayRecord, instructions: Mapping[str, Any],
                sites: SiteDirectory, timeout: float, on_update: Callable[[SiteUpdate], Any]
                ) -> Tuple[List[Tuple[str, str]], List[int]]:
    """One ``train`` message per node; each update goes to ``on_update`` as its reply is pulled (and is not kept).
    Returns (failures, nodes that sent an update)."""
    ok: List[int] = []
    unusable: Dict[int, str] = {}

    def on_reply(node: int, reply: Message) -> None:
        try:
            u = read_update(reply.content)
            sites.bind(node, u.site)
        except MessageContentError as e:
            unusable[node] = f"unusable train reply: {e}"
            return
        ok.append(node)
        on_update(u)

    _, failed = _exchange(grid, nodes, MessageType.TRAIN, weights, instructions, timeout, on_reply=on_reply)
    failed.update(unusable)
    return [(sites.name(n), why) for n, why in sorted(failed.items())], ok


def evaluate_round(grid: Grid, nodes: Sequence[int], weights: ArrayRecord, instructions: Mapping[str, Any],
                   sites: SiteDirectory, timeout: float, log: Callable[[str], Any] = print
                   ) -> Dict[str, Dict[str, Any]]:
    """One ``evaluate`` message per node with the new global weights; returns the evaluations by site (a site that
    fails is logged and left out, as in the in-process runner)."""
    replies, failed = _exchange(grid, nodes, MessageType.EVALUATE, weights, instructions, timeout)
    out: Dict[str, Dict[str, Any]] = {}
    for node, reply in replies.items():
        try:
            site, evaluation = read_evaluation(reply.content)
            if site != sites.name(node):
                raise MessageContentError(f"node {node} ({sites.name(node)!r}) answered as {site!r}")
        except MessageContentError as e:
            failed[node] = f"unusable evaluate reply: {e}"
            continue
        out[site] = evaluation
    r = int(instructions["round"]) + 1
    for node, why in sorted(failed.items()):
        log(f"round {r}: site {sites.name(node)!r} could not evaluate: {why}")
    return out


class FlowerSites:
    """The round loop's transport (:class:`~nnunetv2_fedkd.federated.runner.SiteTransport`) over Flower: before each
    round, wait (``wait_s``) for ``min_sites`` SuperNodes; ``train`` and ``evaluate`` messages to them, replies within
    ``timeout`` s; the sites that sent an update evaluate."""

    def __init__(self, grid: Grid, directory: SiteDirectory, wait_s: float, timeout: float,
                 log: Callable[[str], Any] = print):
        self.grid, self.directory, self.wait_s, self.timeout, self.log = grid, directory, wait_s, timeout, log
        self.nodes: List[int] = []
        self.trained: List[int] = []

    def before_round(self, core) -> None:
        self.nodes = wait_for_nodes(self.grid, core.min_sites, self.wait_s, self.log, select=self.directory.select)
        identify_nodes(self.grid, self.nodes, self.directory, self.timeout, self.log)

    def available_sites(self, core) -> List[str]:
        return [self.directory.by_node[n] for n in self.nodes if n in self.directory.by_node]

    def train(self, core, instructions: Mapping[str, Any], on_update: Callable[[SiteUpdate, float], Any],
              sites: Sequence[str]):
        from nnunetv2_fedkd.flower.task import weights_to_record

        t0 = time.time()
        nodes = [n for n in self.nodes if self.directory.by_node.get(n) in set(sites)]
        self.log(f"round {int(instructions['round']) + 1}/{core.total_rounds}: train messages to {len(nodes)} "
                 f"SuperNode(s)")
        failures, self.trained = train_round(
            self.grid, nodes, weights_to_record(core.sent_weights), instructions, self.directory, self.timeout,
            on_update=lambda u: on_update(u, time.time() - t0))
        return failures

    def evaluate(self, core, weights, instructions: Mapping[str, Any], sites: Sequence[str]):
        from nnunetv2_fedkd.flower.task import weights_to_record

        nodes = [n for n in self.trained if self.directory.name(n) in set(sites)]
        if not nodes:
            return {}
        return evaluate_round(self.grid, nodes, weights_to_record(weights), instructions, self.directory,
                              self.timeout, self.log)


__all__ = ["FlowerSites", "NoSitesError", "SiteDirectory", "evaluate_round", "identify_nodes", "train_round",
           "wait_for_nodes"]
