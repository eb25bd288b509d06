"""A Flower ``Grid`` that delivers messages to the real ClientApp in this process: the ServerApp,
the codec and the device side run for real, without a SuperLink, Ray or subprocesses."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable

import pytest

pytest.importorskip("flwr")  # pytest also imports this file to look for doctests

from flwr.app import Context, Error, Message, RecordDict  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402

from fedspine.flower import client_app  # noqa: E402

Fate = Callable[[int, Message], str]  # (partition-id, message) -> "ok" | "drop" | "crash-server"


class LoopbackGrid(Grid):
    def __init__(self, run_config: dict, num_nodes: int, state_dir: str, fate: Fate | None = None):
        self.run_config, self.fate = run_config, fate or (lambda p, m: "ok")
        self.nodes = {1000 + p: p for p in range(num_nodes)}  # node id -> partition-id
        self.contexts = {
            n: Context(
                run_id=1,
                node_id=n,
                node_config={"partition-id": p, "num-partitions": num_nodes, "state-dir": state_dir},
                state=RecordDict(),
                run_config=run_config,
            )
            for n, p in self.nodes.items()
        }
        self.replies: dict[str, Message] = {}  # delivered, not pulled yet
        self.sent: list[Message] = []
        self.produced: list[Message] = []  # every reply a device made, dropped ones included

    def set_run(self, run) -> None: ...

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(
            content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl
        )

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids, crash = [], False
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            ids.append(msg.metadata.message_id)
            self.sent.append(msg)
            n = msg.metadata.dst_node_id
            fate = self.fate(self.nodes[n], msg)
            try:
                reply = client_app.app(msg, self.contexts[n])
            except Exception as exc:  # what the Flower runtime turns into an error reply
                reply = Message(Error(code=2, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
            self.produced.append(reply)
            if fate == "ok":
                self.replies[msg.metadata.message_id] = reply
            crash = crash or fate == "crash-server"
        if crash:
            raise RuntimeError("the server died mid-round")
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def send_and_receive(self, messages, *, timeout=None):
        raise NotImplementedError
