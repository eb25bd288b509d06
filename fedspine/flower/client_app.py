"""The Flower ``ClientApp``: decode the message, run fedspine's ``client_step``, encode the result.

Two handlers. ``query`` tells the server which fleet device this node is (its ``partition-id``);
it imports no torch, so discovery stays fast. ``train`` runs one round (``DeviceHost.train``),
with the device's state taken from its own memory or disk (``fedspine.flower.device``). Any
error becomes Flower's error reply, which the server records as the device's failure. A node
started with ``--node-config 'corrupt=nan'`` (or inf, shape, keys, norm) corrupts every update it
sends, to test the server's defences on a real deployment.
"""

from __future__ import annotations

import functools
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedspine.flower import codec
from fedspine.flower.options import node_corruption, node_model, node_state_dir, partition_of, read_run_config

app = ClientApp()


@functools.cache
def _host() -> Any:
    """This process's ``DeviceHost`` (imports torch, so only on the first train message)."""
    from fedspine.flower.device import DeviceHost

    return DeviceHost()


@app.query()
def identify(msg: Message, context: Context) -> Message:
    cfg, _ = read_run_config(context.run_config)
    return Message(codec.encode_identity(partition_of(context.node_config, cfg)), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, opts = read_run_config(context.run_config)
    partition = partition_of(context.node_config, cfg)
    ins, held = codec.decode_ins(msg.content)
    res = _host().train(
        node_model(context.node_config, cfg),
        partition,
        ins,
        held,
        run_id=context.run_id,
        store_root=node_state_dir(context.node_config, opts),
        capacity=opts.device_cache,
    )
    how = node_corruption(context.node_config)
    if how:  # a deliberately faulty node (--node-config 'corrupt=nan'), seeded per run, device, round
        import numpy as np

        from fedspine.fl.faults import corrupt

        res = corrupt(res, how, np.random.default_rng([context.run_id, partition, ins.round]))
    return Message(codec.encode_res(res), reply_to=msg)
