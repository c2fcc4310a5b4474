"""The Flower ClientApp: one site's local training (``train``) and evaluation of the global model (``evaluate``).

Flower starts a fresh ClientApp process per message; the site keeps its local state (FedBN layers, logs, the
received global weights) in files under its ``site-dir`` (:class:`~nnunetv2_fedkd.federated.nnunet_site.NnUNetSite`),
so nothing has to survive in memory. A function that raises makes Flower send an error reply, which the server
counts as a failed site for that round. Message contents: :mod:`nnunetv2_fedkd.flower.task`.
"""
from __future__ import annotations

from contextlib import contextmanager

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from nnunetv2_fedkd.federated.weights_io import save_weights
from nnunetv2_fedkd.flower.task import (SITE, evaluation_content, read_round_content, site_from_context,
                                        site_record, update_content)

app = ClientApp()

RECEIVED = "received_global.fedkd"  # the round's global weights, as received (the trainer reads them from a file)


class SiteFailure(RuntimeError):
    """Raised (so Flower sends an error reply) when the site's training or evaluation fails; names the site."""


@contextmanager
def _failing_as(site: str):
    try:
        yield
    except Exception as e:
        raise SiteFailure(f"site {site!r}: {type(e).__name__}: {e}") from e


@app.train()
def train(msg: Message, context: Context) -> Message:
    site = site_from_context(context)
    with _failing_as(site.name):
        weights, instructions = read_round_content(msg.content)
        site.site_dir.mkdir(parents=True, exist_ok=True)
        received = save_weights(site.site_dir / RECEIVED, weights,
                                {"completed_rounds": int(instructions["round"]),
                                 "plans_digest": instructions.get("plans_digest")})
        update = site.fit(received, instructions)
    return Message(update_content(update), reply_to=msg)


@app.query()
def identify(msg: Message, context: Context) -> Message:
    """Which site this SuperNode serves (its ``--node-config``): the server asks before it draws a round's sites."""
    nc = context.node_config
    organs = [o.strip() for o in str(nc.get("organs", "")).split(",") if o.strip()]
    return Message(RecordDict({SITE: site_record(str(nc.get("site", "")), organs)}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    site = site_from_context(context)
    with _failing_as(site.name):
        weights, instructions = read_round_content(msg.content)
        evaluation = site.evaluate(weights, instructions)
    return Message(evaluation_content(site.name, site.organs, evaluation), reply_to=msg)
