"""The in-process simulator: N real `Node`s per schedule over one `MemoryBus`.

Every node is the daemon's own `Node` class with a `TorchLearner` and a `MemoryTransport`; the
bus applies the scenario's network model (latency, bandwidth, loss, partitions) and the engine
applies its fault plan (crashes and restarts from checkpoints, churn, stragglers, Byzantine
peers). The dataset is loaded once and shared. Training runs in a thread pool as wide as the
machine, each torch op on one thread, so N nodes share the cores without oversubscription.

In sync mode with a fixed seed and no faults that depend on timing, two runs give identical
accuracies: every node merges the same models in the same (sorted) order.

One schedule's run is a `_ScheduleRun`: it builds each member's node from the scenario and the
`FaultPlan` (which nodes straggle or attack, which crash when), and its supervisor sleeps until
a node reports a round or a node's task ends, then crashes, restarts, or returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import secrets
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2pfl.config import NodeConfig
from p2pfl.identity import Identity
from p2pfl.learning.datasets import Dataset, load_dataset
from p2pfl.learning.learner import Learner
from p2pfl.learning.models import build_model
from p2pfl.learning.partition import partition
from p2pfl.learning.privacy import check_private_model
from p2pfl.learning.torch_learner import learner_from_config
from p2pfl.node import Node, RoundReport
from p2pfl.simulation.attacks import (
    ByzantineLearner,
    HonestModels,
    WatchedLearner,
    alie_z,
    flip_labels,
)
from p2pfl.simulation.faults import Crash, StragglerLearner
from p2pfl.simulation.network import LinkDelay
from p2pfl.simulation.scenario import Scenario
from p2pfl.store import StateDir
from p2pfl.topology import node_schedule
from p2pfl.transport.base import Transport
from p2pfl.transport.memory import MemoryBus, MemoryTransport
from p2pfl.transport.mqtt import MqttTransport
from p2pfl.trust import Trust

log = logging.getLogger(__name__)

HOME = "memory://sim"
PAUSE_CHECK = 0.1  # seconds between a paused node's checks: simulated rounds are short
Record = dict[str, Any]


@dataclass
class _Member:
    """One simulated participant: its parts, and the task running its current incarnation."""

    index: int
    node_id: str
    honest: bool
    state: StateDir
    node: Node | None = None
    task: asyncio.Task[Any] | None = None
    crashed_at: int | None = None
    restarts: int = 0
    done: bool = False
    # A restarted node's counters start from zero; records add what earlier incarnations had
    # counted by their last round, so the cumulative columns stay cumulative across a crash.
    counted: dict[str, int] = field(default_factory=dict)
    carried: dict[str, int] = field(default_factory=dict)
    # Its key outlives a crash, as a daemon's does in its state dir: peers pinned it.
    identity: Identity = field(default_factory=Identity.generate)

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()

    @property
    def training(self) -> bool:
        """Running and not paused (`[faults] pauses`, `eligible_fraction`)."""
        return self.running and self.node is not None and self.node.pausing.active is None


@dataclass
class ScheduleRun:
    """What one schedule's run produced."""

    schedule: str
    records: list[Record] = field(default_factory=list)
    wall_seconds: float = 0.0
    dropped: dict[str, int] = field(default_factory=dict)


def node_ids(n: int) -> list[str]:
    """`n01`, `n02`, ...: sortable ids, as the shipped topology files use."""
    width = max(2, len(str(n)))
    return [f"n{i + 1:0{width}d}" for i in range(n)]


class Simulation:
    """Run a `Scenario` once per schedule in its `compare` list."""

    def __init__(
        self,
        scenario: Scenario,
        *,
        on_record: Callable[[Record], None] | None = None,
        workers: int | None = None,
        broker: str | None = None,
        only: set[int] | None = None,
        dataset: Dataset | None = None,
    ) -> None:
        """`broker`: run every node on this real MQTT broker instead of the in-memory bus (the
        network model then does not apply). `only`: run just these node indices (the others
        run in other processes on the same broker). `dataset`: the scenario's dataset, already
        loaded (several runs of one scenario share it)."""
        if only is not None and broker is None:
            raise ValueError("a subset of nodes needs a shared real broker")
        self.scenario = scenario
        self.on_record = on_record
        self.workers = workers or os.cpu_count() or 1
        self.broker = broker
        self.only = only
        self._dataset = dataset

    async def load(self) -> None:
        """Load the dataset once for every schedule, and check that DP can train its model."""
        settings = self.scenario.node_config(self.scenario.compare[0], 0, "n01")
        if self._dataset is None:
            self._dataset = await asyncio.to_thread(
                load_dataset, settings.dataset, seed=settings.seed
            )
        check_privacy(self.scenario, self._dataset)

    async def run(self) -> list[ScheduleRun]:
        """Every schedule of the scenario, one after the other."""
        await self.load()
        return [await self.run_schedule(schedule) for schedule in self.scenario.compare]

    async def run_schedule(self, schedule: str) -> ScheduleRun:
        """One schedule: start every node, apply faults, wait for all to finish. `load()` first."""
        assert self._dataset is not None, "load() first"
        # Attackers reading the honest models may wait in a thread for them: one more thread
        # each, so they never hold up the honest nodes' training.
        waiting = len(
            self.scenario.faults.byzantine_ids(self.scenario.node_ids, self.scenario.seed)
        )
        with (
            training_threads(self.workers + waiting),
            tempfile.TemporaryDirectory(prefix="p2pfl-sim-") as tmp,
        ):
            return await _ScheduleRun(self, schedule, self._dataset, Path(tmp)).run()


@contextlib.contextmanager
def training_threads(workers: int) -> Iterator[None]:
    """Within: torch runs each op on one thread and the running loop's `to_thread` work goes to
    a pool of `workers` threads, so N nodes share the cores without oversubscription. Both
    are put back as they were on exit."""
    import torch

    threads = torch.get_num_threads()
    loop = asyncio.get_running_loop()
    # asyncio has no getter for it, and no setter back to "none yet" (created on first use).
    previous = getattr(loop, "_default_executor", None)
    executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="p2pfl-sim")
    torch.set_num_threads(1)  # parallelism comes from nodes training side by side
    loop.set_default_executor(executor)
    try:
        yield
    finally:
        loop._default_executor = previous  # type: ignore[attr-defined]
        executor.shutdown(wait=False, cancel_futures=True)
        torch.set_num_threads(threads)


class _ScheduleRun:
    """One schedule's run: builds the nodes, applies the fault plan, supervises.

    The supervisor sleeps until something it acts on happens: a node reported a round (a
    planned crash, or a restart that is due) or a node's task ended. A task that fails
    unexpectedly fails the task group, which ends the run at once with its error.
    """

    def __init__(self, sim: Simulation, schedule: str, dataset: Dataset, tmp: Path) -> None:
        scenario = self.scenario = sim.scenario
        faults = scenario.faults
        self.sim, self.schedule, self.dataset = sim, schedule, dataset
        self.ids = ids = node_ids(scenario.nodes)
        base = self.base = scenario.node_config(schedule, 0, ids[0])
        seed = self.seed = base.seed
        # Membership timers run on the scenario's dilated clock (Scenario.dilation).
        dilation = scenario.dilation
        self.stretched: dict[str, float] = (
            {
                "presence_ttl": base.presence_ttl * dilation,
                "shuffle_interval": base.shuffle_interval * dilation,
            }
            if dilation != 1
            else {}
        )
        # Everyone starts together and waits for its peers: all of them, or with a sampled
        # view (view_size, which shuffles keep about full) half a view, then for its ring
        # neighbours to settle.
        everyone = len(ids) - 1
        self.wanted = min(base.view_size // 2, everyone) if base.view_size else everyone
        self.parts = partition(dataset.y_train, scenario.nodes, base.partition, seed=seed)
        self.slow = set(faults.straggler_ids(ids, seed))
        self.attack = faults.byzantine
        byzantine = set(faults.byzantine_ids(ids, seed))
        self.board: HonestModels | None = None
        if byzantine and self.attack.behaviour in ("alie", "ipm"):
            # Sync rounds: attackers wait for every honest model of their step (deterministic);
            # walkers train one holder at a time and async nodes never wait: the latest ones.
            wait = base.mode == "sync" and not base.walkers
            self.board = HonestModels(wait=wait, timeout=base.round_timeout)
        self.z = self.attack.z if self.attack.z is not None else alie_z(len(ids), len(byzantine))
        flipping = byzantine and self.attack.behaviour == "label-flip"
        self.poisoned = flip_labels(dataset) if flipping else None
        # Churn is drawn over the planned rounds; a run without a planned end gets 100.
        crashes = faults.crash_events(ids, base.rounds or 100, seed)
        self.planned = {(str(c.node), c.at_round): c for c in crashes}
        self.started = time.monotonic()
        self.result = ScheduleRun(schedule)
        self.delay = LinkDelay(
            scenario.network,
            node_of=lambda client: client.partition("#")[0],
            clock=self.elapsed,
            seed=seed,
            nodes=ids,
        )
        self.bus = MemoryBus(delay=self.delay if scenario.network.active else None)
        if sim.broker is not None and scenario.network.active:
            log.warning("the network model does not apply on a real broker; ignoring it")
        self.members = [
            _Member(i, node_id, node_id not in byzantine, StateDir(tmp / node_id))
            for i, node_id in enumerate(ids)
            if sim.only is None or i in sim.only
        ]
        self.network_round = 0  # the highest round any node reported
        self.crashing: list[tuple[_Member, Crash]] = []
        self.down: list[tuple[_Member, int]] = []  # crashed, to restart at that network round
        self.changed = asyncio.Event()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    async def run(self) -> ScheduleRun:
        async with asyncio.TaskGroup() as tg:
            for member in self.members:
                self.start(member, tg)
            await self.supervise(tg)
        self.result.wall_seconds = self.elapsed()
        self.result.dropped = dict(self.delay.stats)
        return self.result

    async def supervise(self, tg: asyncio.TaskGroup) -> None:
        """Crash, restart, and return once every node is done and none is to come back."""
        while True:
            self.changed.clear()  # before looking: what happens from here on wakes us again
            while self.crashing:
                member, crash = self.crashing.pop()
                await _crash(member)
                if crash.restart_after_rounds is not None:
                    self.down.append(
                        (member, (member.crashed_at or 0) + crash.restart_after_rounds)
                    )
            for item in [item for item in self.down if self.due(*item)]:
                self.down.remove(item)
                self.restart(item[0], tg)
            if not self.down and not any(m.running for m in self.members):
                return
            await self.changed.wait()

    def due(self, member: _Member, when: int) -> bool:
        """A crashed node comes back once the network reached `when`, or when nobody else
        is left to get there."""
        others = any(m.running for m in self.members if m is not member)
        return self.network_round >= when or not others

    def start(self, member: _Member, tg: asyncio.TaskGroup) -> None:
        member.state.open()
        member.node = self.build(member)
        if self.board is not None:
            self.board.join(member.node_id, attacker=not member.honest)
        member.task = tg.create_task(_run_member(member, self.board))
        member.task.add_done_callback(lambda _: self.changed.set())

    def restart(self, member: _Member, tg: asyncio.TaskGroup) -> None:
        member.crashed_at = None
        member.restarts += 1
        member.carried = member.counted
        self.start(member, tg)

    def on_round(self, member: _Member, report: RoundReport) -> None:
        """Record the round; a node that reached its planned crash goes down before its next."""
        self.network_round = max(self.network_round, report.round)
        record = _record(self.schedule, report, self.elapsed(), member)
        member.counted = {k: record[k] for k in _CUMULATIVE}
        self.result.records.append(record)
        if self.sim.on_record is not None:
            self.sim.on_record(record)
        crash = self.planned.get((member.node_id, report.round))
        if crash is not None and member.crashed_at is None:
            member.crashed_at = report.round
            self.crashing.append((member, crash))
        self.changed.set()  # a crash to do now, or a restart that may be due

    def build(self, member: _Member) -> Node:
        # One shared bus: presence is the membership; everyone starts together.
        config = self.scenario.node_config(
            self.schedule,
            member.index,
            member.node_id,
            discovery=("presence",),
            min_peers=self.wanted if member.restarts == 0 else 0,
            telemetry_interval=0.0,  # nobody watches; the engine records every round
            **self.stretched,
        )
        node = Node(
            config,
            self.learner(member, config),
            self.transport(member),
            node_id=member.node_id,
            home_broker=self.sim.broker or HOME,
            schedule=node_schedule(config),  # a topology file comes with partial-mesh only
            state=member.state,
            on_round=functools.partial(self.on_round, member),
            identity=member.identity,
            # Keys pinned in memory, as a monitor's: the run's state dirs are temporary, and
            # appending them to files is N^2 small writes on the one event loop (64 nodes:
            # 4,032, about 1.5 s of its CPU). A restarted node pins its peers again.
            trust=Trust(
                config.trust,
                max_peers=config.max_peers,
                max_skew=config.max_clock_skew,
                ca_key=config.ca_key,
                # allowlist: the run's nodes are the user's own, the list (their keys
                # outlive crashes); no other key is taken
                keys=(
                    {m.node_id: m.identity.public_raw for m in self.members}
                    if config.trust == "allowlist"
                    else None
                ),
            ),
            # Every simulated peer is the user's own and all start together: rationing
            # new peers would only delay a large run's start by minutes.
            limit_new_peers=False,
            eligible=functools.partial(self.eligible, member),
        )
        node.pausing.interval = PAUSE_CHECK
        return node

    def eligible(self, member: _Member) -> str | None:
        """Why `member` may not train the network's next round (`[faults] pauses`,
        `eligible_fraction`); never once no other node trains: nothing would move the network
        on to a round the node is eligible for."""
        if not any(m.training for m in self.members if m is not member):
            return None
        faults = self.scenario.faults
        return faults.paused(member.node_id, self.network_round + 1, self.ids, self.seed)

    def learner(self, member: _Member, config: NodeConfig) -> Learner:
        """The member's learner, wrapped in its faults (slow, Byzantine) or watched by them."""
        data = self.dataset if member.honest or self.poisoned is None else self.poisoned
        # DP noise seeded from the scenario (a reproducible run), per node and restart.
        noise_seed = (self.seed * 1000 + member.index) * 1000 + member.restarts
        learner: Learner = learner_from_config(
            config, data, self.parts[member.index], dp_noise_seed=noise_seed
        )
        if member.node_id in self.slow:
            learner = StragglerLearner(learner, self.scenario.faults.stragglers.slowdown)
        if not member.honest:
            return ByzantineLearner(
                learner,
                self.attack.behaviour,
                self.attack.scale,
                self.seed + member.index,
                z=self.z,
                epsilon=self.attack.epsilon,
                honest=self.board,
                node_id=member.node_id,
            )
        if self.board is not None:
            return WatchedLearner(learner, self.board, member.node_id)
        return learner

    def transport(self, member: _Member) -> Transport:
        if self.sim.broker is None:
            return MemoryTransport(self.bus, f"{member.node_id}#{member.restarts}")
        mqtt_id = f"sim-{member.node_id}-{member.restarts}-{secrets.token_hex(3)}"
        return MqttTransport(self.sim.broker, mqtt_id)


def check_privacy(scenario: Scenario, dataset: Dataset | None = None) -> None:
    """PrivacyError when some run of `scenario` trains with DP and DP-SGD cannot train its
    model (BatchNorm): a config error, to say before any node starts. Loads the dataset
    (for the model's shapes) unless given."""
    node = scenario.node
    if node.dp_epsilon is None and all(v == "none" for v in scenario.compare_dp):
        return
    if dataset is None:
        dataset = load_dataset(node.dataset, seed=node.seed)
    check_private_model(build_model(node.model, dataset.in_shape, dataset.n_classes))


async def _run_member(member: _Member, board: HonestModels | None) -> None:
    assert member.node is not None
    try:
        await member.node.run()
        member.done = member.crashed_at is None
    except asyncio.CancelledError:
        pass  # a simulated crash
    finally:
        member.state.close()
        if board is not None:
            board.leave(member.node_id)  # finished or crashed: attackers stop waiting for it


async def _crash(member: _Member) -> None:
    """Kill a node as `kill -9` would: its connection drops (the will fires), nothing is saved."""
    assert member.node is not None and member.task is not None
    await member.node.transport.abort()
    member.task.cancel()
    await asyncio.gather(member.task, return_exceptions=True)
    log.info("crashed node=%s round=%s", member.node_id, member.crashed_at)


_CUMULATIVE = (
    "models_sent", "models_received", "bytes_sent", "rejected", "membership_received",
)  # fmt: skip


def _record(schedule: str, report: RoundReport, t: float, member: _Member) -> Record:
    c = report.counters
    return {
        "schedule": schedule,
        "node": report.node_id,
        "round": report.round,
        "t": round(t, 4),
        "accuracy": report.accuracy,
        "test_loss": report.test_loss,
        "train_loss": report.train_loss,
        "merged": report.merged,
        **{k: int(c[k]) + member.carried.get(k, 0) for k in _CUMULATIVE},
        "fit_seconds": report.fit_seconds,
        "eval_seconds": report.eval_seconds,
        "round_seconds": report.seconds,  # the whole round: it began at t - round_seconds
        "honest": member.honest,
        "restarts": member.restarts,  # how many times this node has crashed and come back
        "epsilon": report.epsilon,  # DP: spent on the node's own samples; None without DP
    }
