"""Secure aggregation between in-process nodes (sync partial mesh over the memory bus and the
embedded broker): each merge equals the plain average of the round's models, a masked model
on the wire shows nothing of its sender's model, a round with a killed sender still completes,
and hostile secagg messages are dropped and counted."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from p2pfl.config import NodeConfig
from p2pfl.identity import Identity
from p2pfl.learning.datasets import Dataset, load_dataset
from p2pfl.learning.learner import EvalResult, FitResult, Learner
from p2pfl.learning.torch_learner import build_learner
from p2pfl.node import Node, RoundReport
from p2pfl.protocol import topics
from p2pfl.protocol.envelope import Envelope, pack_envelope, unpack_envelope
from p2pfl.protocol.model import model_from_envelope
from p2pfl.protocol.reveal import Ask, Seeds, encode_ask, encode_seeds
from p2pfl.topology import make_schedule
from p2pfl.transport.base import LocalBroker, Transport
from p2pfl.transport.memory import MemoryBus, MemoryTransport
from p2pfl.transport.mqtt import MqttOptions, MqttTransport

pytestmark = pytest.mark.timeout(90)

NET = "satest"
BUS = "mqtt://127.0.0.1:1"
IDS = ["s0", "s1", "s2", "s3"]
FAST = MqttOptions(backoff_min=0.05, backoff_max=0.3, connect_timeout=10.0, drain_timeout=10.0)
Weights = dict[str, np.ndarray]


@pytest.fixture(scope="module")
def dataset() -> Dataset:
    return load_dataset("mnist1d", seed=0)


class Recording:
    """A learner that keeps every model it trained (what it sent) and every model it was
    given (what it merged), by round."""

    def __init__(self, inner: Learner, *, stall: Callable[[int], None] | None = None) -> None:
        self.inner = inner
        self.fitted: list[Weights] = []
        self.merged: list[Weights] = []
        self._stall = stall

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def get_weights(self) -> Weights:
        return self.inner.get_weights()

    def set_weights(self, weights: Weights) -> None:
        self.merged.append({k: np.array(v, copy=True) for k, v in weights.items()})
        self.inner.set_weights(weights)

    def fit(self) -> FitResult:
        if self._stall is not None:
            self._stall(len(self.fitted) + 1)
        result = self.inner.fit()
        self.fitted.append({k: np.array(v, copy=True) for k, v in self.get_weights().items()})
        return result

    def evaluate(self) -> EvalResult:
        return self.inner.evaluate()


def learner(dataset: Dataset, index: int, **kw: Any) -> Recording:
    train = np.arange(index * 100, (index + 1) * 100)
    inner = build_learner(
        "mlp", dataset, train, test_indices=np.arange(100), batch_size=32, init_seed=0,
        seed=index, local_epochs=1,
    )  # fmt: skip
    return Recording(inner, **kw)


def config(node_id: str, home: str, **overrides: Any) -> NodeConfig:
    return NodeConfig.model_validate(
        {
            "network": NET, "id": node_id, "model": "mlp", "mode": "sync", "rounds": 3,
            "schedule": "partial-mesh", "degree": 3, "merge": "average",
            "secure_aggregation": True, "discovery": ("static", "presence"),
            "peers": [{"id": p, "broker": home} for p in IDS], "round_timeout": 10.0,
            "trust": "tofu", "telemetry_interval": 0, **overrides,
        }
    )  # fmt: skip


def node(
    dataset: Dataset, transport: Transport, node_id: str, home: str = BUS, **kw: Any
) -> tuple[Node, Recording, list[RoundReport]]:
    rec = kw.pop("learner", None) or learner(dataset, IDS.index(node_id))
    reports: list[RoundReport] = []
    n = Node(
        config(node_id, home, **kw), rec, transport, node_id=node_id, home_broker=home,
        schedule=make_schedule("partial-mesh", degree=3), on_round=reports.append,
    )  # fmt: skip
    return n, rec, reports


def relative_error(got: Weights, want: Weights) -> float:
    num = sum(float(np.sum((got[k].astype(np.float64) - want[k]) ** 2)) for k in want)
    den = sum(float(np.sum(want[k].astype(np.float64) ** 2)) for k in want)
    return (num / den) ** 0.5


def plain_average(models: list[Weights]) -> Weights:
    return {k: sum(m[k].astype(np.float64) for m in models) / len(models) for k in models[0]}


async def test_merge_equals_plain_average_and_masked_models_show_nothing(
    dataset: Dataset,
) -> None:
    bus = MemoryBus()
    spy = MemoryTransport(bus, "spy")
    await spy.connect()
    await spy.subscribe(topics.inbox(NET, "s0"))
    nodes = [node(dataset, MemoryTransport(bus, i), i) for i in IDS]
    async with asyncio.timeout(60):
        await asyncio.gather(*(n.run() for n, _, _ in nodes))
    recs = {n.node_id: rec for n, rec, _ in nodes}
    for n, rec, reports in nodes:
        assert [r.merged for r in reports] == [3, 3, 3], n.node_id
        assert len(rec.merged) == 3
        for r in range(3):
            want = plain_average(
                [rec.fitted[r], *(recs[p].fitted[r] for p in IDS if p != n.node_id)]
            )
            assert relative_error(rec.merged[r], want) < 1e-5
        assert n.counters.rejected_total == 0
    # What s0's inbox saw from s1, s2, s3: masked, uncorrelated with their true models.
    masked, true = [], []
    await spy.close()  # what it received stays readable, then the iterator ends
    async for msg in spy.messages():
        env = unpack_envelope(msg.payload)
        if env.kind != "model":
            continue
        model = model_from_envelope(env)
        assert model.meta["secagg"] == IDS[1:]
        for name, values in model.weights.items():
            masked.append(values.reshape(-1).view(np.uint64).astype(np.float64))
            true.append(recs[env.src].fitted[model.round - 1][name].reshape(-1).astype(np.float64))
            # nothing of the plain model travels
            assert not np.allclose(values.reshape(-1) / 2**32, true[-1], atol=1e-3)
    assert len(masked) >= 9 * 2  # three senders, three rounds, several tensors each
    r = np.corrcoef(np.concatenate(masked), np.concatenate(true))[0, 1]
    assert abs(r) < 0.05, r


async def test_a_sender_killed_mid_round_does_not_stop_the_round(
    dataset: Dataset, wait_until: Any
) -> None:
    """s3 is killed in round 2 after the others sent it, and each other, their round-2
    models masked with s3 among the senders. Its will arrives, the survivors mask again for
    the senders left and send again, and round 2 completes: plain average of the three."""
    bus = MemoryBus()
    training = asyncio.Event()
    loop = asyncio.get_running_loop()

    def stall(r: int) -> None:  # s3 takes long over round 2: it is killed there
        if r == 2:
            loop.call_soon_threadsafe(training.set)
            time.sleep(3.0)

    victim_transport = MemoryTransport(bus, "s3")
    nodes = [node(dataset, MemoryTransport(bus, i), i) for i in IDS[:3]]
    victim, _, _ = node(dataset, victim_transport, "s3", learner=learner(dataset, 3, stall=stall))
    victim_task = asyncio.create_task(victim.run())

    async def kill() -> None:
        await training.wait()
        # every survivor has sent its round-2 model to its three neighbours, s3 included
        await wait_until(lambda: all(n.counters.models_sent >= 6 for n, _, _ in nodes), within=20)
        await victim_transport.abort()  # as a crash: the bus publishes its will
        victim_task.cancel()

    async with asyncio.timeout(60):
        await asyncio.gather(*(n.run() for n, _, _ in nodes), kill())
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await victim_task
    recs = {n.node_id: rec for n, rec, _ in nodes}
    for n, rec, reports in nodes:
        assert [r.round for r in reports] == [1, 2, 3], n.node_id
        assert [r.merged for r in reports] == [3, 2, 2], n.node_id
        want = plain_average(
            [rec.fitted[1], *(recs[p].fitted[1] for p in IDS[:3] if p != n.node_id)]
        )
        assert relative_error(rec.merged[1], want) < 1e-5
        # round 1 to three, round 2 to three then again to the two left, round 3 to two
        assert n.counters.models_sent == 3 + 3 + 2 + 2
        assert n.counters.rejected_total == 0


async def test_over_the_embedded_broker(dataset: Dataset, embedded_broker: LocalBroker) -> None:
    uri = embedded_broker.uri
    nodes = [node(dataset, MqttTransport(uri, f"{i}-sa", FAST), i, home=uri, rounds=2) for i in IDS]
    async with asyncio.timeout(60):
        await asyncio.gather(*(n.run() for n, _, _ in nodes))
    recs = {n.node_id: rec for n, rec, _ in nodes}
    for n, rec, reports in nodes:
        assert [r.merged for r in reports] == [3, 3]
        want = plain_average([rec.fitted[1], *(recs[p].fitted[1] for p in IDS if p != n.node_id)])
        assert relative_error(rec.merged[1], want) < 1e-5


def test_hostile_secagg_messages_are_refused_by_reason() -> None:
    """A node's secure round refuses asks it must not answer and seeds nobody asked for."""
    from p2pfl.protocol.errors import ProtocolError
    from p2pfl.secure_round import SecureRound

    a, b, c = (SecureRound(NET, i) for i in ("a", "b", "c"))
    keys = {"a": a.key.public_raw, "b": b.key.public_raw, "c": c.key.public_raw}
    q = {"t": np.arange(6, dtype=np.int64)}
    # a partner announced a low-order point, or no key yet: nothing is sent to that receiver
    assert a.mask_for("rx", 5, ["a", "b"], {**keys, "b": bytes(32)}, q) is None
    assert a.mask_for("rx", 5, ["a", "b"], {**keys, "b": None}, q) is None
    assert a.mask_for("rx", 5, ["a"], keys, q) is None  # a would be rx's only sender
    assert a.mask_for("rx", 5, ["a", "b", "c"], keys, q) is not None
    never = lambda p, r: False  # noqa: E731
    with pytest.raises(ProtocolError, match="secagg round"):
        a.answer("rx", Ask(4, ("c",)), never)  # a wrong round: nothing was sent for it
    with pytest.raises(ProtocolError, match="secagg round"):
        a.answer("other", Ask(5, ("c",)), never)  # nothing was sent to that receiver
    with pytest.raises(ProtocolError, match="secagg reveal"):
        a.answer("rx", Ask(5, ("c",)), lambda p, r: p == "c" and r >= 5)  # c delivered
    with pytest.raises(ProtocolError, match="secagg reveal"):
        a.answer("rx", Ask(5, ("b", "c")), never)  # a's model would be alone in the sum
    with pytest.raises(ProtocolError, match="secagg reveal"):
        a.answer("rx", Ask(5, ("z",)), never)  # z was no sender
    assert set(a.answer("rx", Ask(5, ("c",)), never).seeds) == {"c"}
    with pytest.raises(ProtocolError, match="secagg reveal"):
        a.answer("rx", Ask(5, ("b",)), never)  # another set for the same receiver and round
    # The receiver side: seeds for a round it is not collecting, or from someone not asked.
    with pytest.raises(ProtocolError, match="secagg round"):
        a.take_seeds("b", Seeds(5, {"c": b"\0" * 32}))


async def test_hostile_secagg_messages_to_a_running_node_are_counted(
    dataset: Dataset, wait_until: Any
) -> None:
    bus = MemoryBus()
    slow = {"stall": lambda r: time.sleep(0.3)}  # rounds long enough for heartbeats to pass
    nodes = [
        node(dataset, MemoryTransport(bus, i), i, rounds=8, presence_ttl=3.0,
             learner=learner(dataset, k, **slow))
        for k, i in enumerate(IDS)
    ]  # fmt: skip
    evil = MemoryTransport(bus, "evil")
    await evil.connect()
    s0, s1 = nodes[0][0], nodes[1][0]

    def as_s1(kind_body: Ask | Seeds | dict[str, Any], signer: Any = None) -> bytes:
        seq, key = s1._next_seq(), signer or s1.identity  # s1's own counter: no replay
        if isinstance(kind_body, Ask):
            return encode_ask(kind_body, net=NET, src="s1", seq=seq, signer=key)
        if isinstance(kind_body, Seeds):
            return encode_seeds(kind_body, net=NET, src="s1", seq=seq, signer=key)
        env = Envelope.create("secagg", kind_body, net=NET, src="s1", seq=seq)
        return bytes(pack_envelope(env, key))

    async def attack() -> None:
        # Once s0 has done round 1 and s2's presence says it finished round 1 (delivered).
        def s2_done() -> bool:
            info = s0.view.get("s2")
            return bool(nodes[0][2]) and info is not None and (info.round or 0) >= 1

        await wait_until(s2_done, within=30)
        for m in [
            as_s1(Ask(99, ("s2",))),  # nothing was sent to s1 for round 99
            as_s1(Seeds(1, {"s2": b"\0" * 32})),  # s0 asked nobody for seeds
            as_s1({"op": "x", "round": 1}),  # malformed
            as_s1(Ask(1, ("s2",))),  # s2 delivered round 1
            as_s1(Ask(1, ("s1",))),  # s1 is the receiver, not a sender of its round
            as_s1(Ask(1, ("s3",)), signer=Identity.generate()),  # not s1's key
        ]:
            await evil.publish(topics.inbox(NET, "s0"), m, qos=1)

    async with asyncio.timeout(80):
        await asyncio.gather(*(n.run() for n, _, _ in nodes), attack())
    rejected = s0.counters.rejected
    assert rejected["secagg-round"] == 2
    assert rejected["secagg-payload"] == 1
    assert rejected["secagg-reveal"] == 2
    assert rejected["untrusted"] == 1
    assert [r.merged for r in nodes[0][2]] == [3] * 8  # and s0 kept merging all along
    await evil.close()


async def test_a_model_lost_on_the_way_is_replaced_by_the_survivors_seeds(
    dataset: Dataset, caplog: pytest.LogCaptureFixture
) -> None:
    """s3 stays live, but its models never reach s0. Round 1: at the deadline s0 asks s1 and
    s2 for their seeds with s3 (one ask each) and merges the plain average of what came.
    Round 2, the last: s3 announced it finished the round (it delivered, as far as anyone
    can tell), so s1 and s2 refuse to reveal and s0 keeps its own model."""

    def lossy(src: str, dst: str, size: int) -> float | None:
        return None if (src, dst) == ("s3", "s0") and size > 10_000 else 0.0

    bus = MemoryBus(delay=lossy)
    # Heartbeats rarely: in round 1 nobody has heard that s3 finished it. s0 gives up on s3
    # after 2 s; the others wait longer for s0, which is that much behind them in round 2.
    nodes = [
        node(dataset, MemoryTransport(bus, i), i, rounds=2, presence_ttl=60.0,
             round_timeout=2.0 if i == "s0" else 15.0)
        for i in IDS
    ]  # fmt: skip
    caplog.set_level("INFO", logger="p2pfl.secure_round")
    async with asyncio.timeout(60):
        await asyncio.gather(*(n.run() for n, _, _ in nodes))
    recs = {n.node_id: rec for n, rec, _ in nodes}
    s0, rec0, reports0 = nodes[0]
    assert [r.merged for r in reports0] == [2, 0]
    want = plain_average([rec0.fitted[0], recs["s1"].fitted[0], recs["s2"].fitted[0]])
    assert relative_error(rec0.merged[0], want) < 1e-5
    assert len(rec0.merged) == 1  # round 2: nothing merged
    revealed = [m for m in caplog.messages if m.startswith("secagg: revealed seeds receiver=s0")]
    assert revealed == ["secagg: revealed seeds receiver=s0 round=1 dropped=s3"] * 2
    for n, _, reports in nodes[1:]:
        assert [r.merged for r in reports] == [3, 3], n.node_id
    assert [n.counters.rejected["secagg-reveal"] for n, _, _ in nodes] == [0, 1, 1, 0]
    assert s0.counters.rejected_total == 0
