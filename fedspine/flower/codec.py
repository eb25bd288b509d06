"""The wire schema: fedspine's ``TrainIns`` / ``TrainRes`` as Flower ``RecordDict``\\ s, and back.

Every record key lives here and nowhere else. Arrays travel as ``ArrayRecord`` (dtype and shape
kept, so a round trip is bit-exact), scalars as ``ConfigRecord`` / ``MetricRecord``. Nothing else
is added: the only field without a ``TrainIns`` counterpart is ``held``, a digest of the kept map
the server believes the device holds, so the device can pick the matching state from its own
disk (the state itself never travels).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedspine.config import ClientConfig, from_mapping
from fedspine.fl.messages import TrainIns, TrainRes
from fedspine.pruning.index_map import KeptIndexMap

# record keys, one per record type
INS = "fedspine.ins"  # ConfigRecord: round, device, arm, client config (JSON), seed, held-state digest
ADAPTER = "fedspine.adapter"  # ArrayRecord: the adapter (server -> device: projected; back: the device's)
BASE_DELTA = "fedspine.base-delta"  # ArrayRecord, FLoRA-style rules only
RES = "fedspine.res"  # ConfigRecord: round, device, rank, samples, kept map (JSON)
STATS = "fedspine.stats"  # MetricRecord: losses before/after, achieved ratio, update norm
METRICS = "fedspine.metrics"  # MetricRecord: TrainRes.metrics (train_time_s, ...)
IDENTITY = "fedspine.identity"  # ConfigRecord: the node's partition-id (QUERY reply)


def kept_digest(kept: KeptIndexMap) -> str:
    """A short content hash of a kept map: how server and device name a device state."""
    blob = json.dumps(kept.to_dict(), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# --- server -> device ----------------------------------------------------------------------------
def encode_ins(ins: TrainIns, held: KeptIndexMap) -> RecordDict:
    content = RecordDict(
        {
            INS: ConfigRecord(
                {
                    "round": ins.round,
                    "device-id": ins.device_id,
                    "ratio": float(ins.ratio),
                    "rank": ins.rank,
                    # JSON: keeps ints, floats and None as they are
                    "config": json.dumps(dataclasses.asdict(ins.config)),
                    "seed": ins.seed,
                    "held": kept_digest(held),
                }
            ),
            ADAPTER: _arrays(ins.adapter),
        }
    )
    if ins.base_delta is not None:
        content[BASE_DELTA] = _arrays(ins.base_delta)
    return content


def decode_ins(content: RecordDict) -> tuple[TrainIns, str]:
    """(``TrainIns``, digest of the kept map the server expects the device to hold)."""
    head = _record(content, INS, ConfigRecord)
    base = _numpy(_record(content, BASE_DELTA, ArrayRecord)) if BASE_DELTA in content else None
    ins = TrainIns(
        round=int(head["round"]),
        device_id=str(head["device-id"]),
        ratio=float(head["ratio"]),
        rank=int(head["rank"]),
        adapter=_numpy(_record(content, ADAPTER, ArrayRecord)),
        base_delta=base,
        config=from_mapping(ClientConfig, json.loads(str(head["config"])), "config."),
        seed=int(head["seed"]),
    )
    return ins, str(head["held"])


# --- device -> server ----------------------------------------------------------------------------
def encode_res(res: TrainRes) -> RecordDict:
    return RecordDict(
        {
            RES: ConfigRecord(
                {
                    "round": res.round,
                    "device-id": res.device_id,
                    "rank": res.rank,
                    "num-samples": res.num_samples,
                    "kept-map": json.dumps(res.kept_map),
                }
            ),
            ADAPTER: _arrays(res.adapter),
            STATS: MetricRecord(
                {
                    "loss-before": float(res.loss_before),
                    "loss-after": float(res.loss_after),
                    "achieved-ratio": float(res.achieved_ratio),
                    "update-norm": float(res.update_norm),
                }
            ),
            METRICS: MetricRecord({k: float(v) for k, v in res.metrics.items()}),
        }
    )


def decode_res(content: RecordDict) -> TrainRes:
    head = _record(content, RES, ConfigRecord)
    stats = _record(content, STATS, MetricRecord)
    return TrainRes(
        round=int(head["round"]),
        device_id=str(head["device-id"]),
        rank=int(head["rank"]),
        adapter=_numpy(_record(content, ADAPTER, ArrayRecord)),
        kept_map=json.loads(str(head["kept-map"])),
        num_samples=int(head["num-samples"]),
        loss_before=float(stats["loss-before"]),
        loss_after=float(stats["loss-after"]),
        achieved_ratio=float(stats["achieved-ratio"]),
        update_norm=float(stats["update-norm"]),
        metrics={k: float(v) for k, v in _record(content, METRICS, MetricRecord).items()},
    )


# --- who is this node ----------------------------------------------------------------------------
def encode_identity(partition_id: int) -> RecordDict:
    return RecordDict({IDENTITY: ConfigRecord({"partition-id": partition_id})})


def decode_identity(content: RecordDict) -> int:
    return int(_record(content, IDENTITY, ConfigRecord)["partition-id"])


# --- helpers -------------------------------------------------------------------------------------
def _arrays(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def _numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def _record(content: RecordDict, key: str, kind: type) -> Any:
    if key not in content:
        raise ValueError(f"message has no {key!r} record; has {sorted(content)}")
    record = content[key]
    if not isinstance(record, kind):
        raise ValueError(f"message record {key!r} is a {type(record).__name__}, expected {kind.__name__}")
    return record
