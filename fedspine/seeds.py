"""One root seed, named independent random streams (numpy only).

Every consumer of randomness in a run draws from its own stream, so no two of them see the same
bit sequence and changing how one consumes its stream leaves the others alone. A stream is
``SeedSequence(root, spawn_key=(index,))``: streams 0-3 are exactly the children of
``SeedSequence(root).spawn(4)`` that the simulator used before, so the partition, sampling and
jitter draws did not change when the others were separated.

>>> s = Seeds(0)
>>> s.rng("sampling").random() == s.rng("sampling").random()   # a fresh Generator each call
True
>>> s.integer("fleet") != s.integer("data")
True
"""

from __future__ import annotations

import numbers

import numpy as np

# Order is part of the records: append new streams, never reorder.
STREAMS = (
    "partition",  # which examples each device holds (fedspine.data.partition)
    "sampling",  # which devices take part in a round
    "jitter",  # per-round noise of the device time model
    "strategy",  # the strategy's own randomness: the allocator, random-arm
    "fleet",  # the within-tier spread of device speeds and links
    "data",  # the train / test split and subsampling
    "model",  # the task head's initialisation (torch)
    "init",  # the global adapter's initialisation (the reference peft model)
    "clients",  # the root of every client step's seed (fedspine.fl.client.step_seed)
    "faults",  # injected device faults (fedspine.fl.faults), one draw per (device, round)
)


class Seeds:
    """Named streams from one non-negative integer root seed."""

    def __init__(self, root: int):
        if isinstance(root, bool) or not isinstance(root, numbers.Integral) or root < 0:
            raise ValueError(f"seed must be a non-negative integer, got {root!r}")
        self.root = int(root)

    def sequence(self, name: str) -> np.random.SeedSequence:
        if name not in STREAMS:
            raise ValueError(f"stream must be one of {list(STREAMS)}, got {name!r}")
        return np.random.SeedSequence(self.root, spawn_key=(STREAMS.index(name),))

    def rng(self, name: str) -> np.random.Generator:
        """A new Generator on stream ``name`` (the same draws every time it is asked for)."""
        return np.random.default_rng(self.sequence(name))

    def integer(self, name: str) -> int:
        """An integer seed for APIs that take one (torch, the allocator): 31 bits of the stream."""
        return int(self.sequence(name).generate_state(1)[0] & 0x7FFFFFFF)
