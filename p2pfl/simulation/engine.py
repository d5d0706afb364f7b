"""The in-process simulator: N real `Node`s per schedule over one `MemoryBus`.

Every node is the daemon's own `Node` class with a `TorchLearner` and a `MemoryTransport`; the
bus applies the scenario's network model (latency, bandwidth, loss, partitions) and the engine
applies its fault plan (crashes and restarts from checkpoints, churn, stragglers, Byzantine
peers). The dataset is loaded once and shared. Training runs in a thread pool as wide as the
machine, each torch op on one thread, so N nodes share the cores without oversubscription.

In sync mode with a fixed seed and no faults that depend on timing, two runs give identical
accuracies: every node merges the same models in the same (sorted) order.
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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
from p2pfl.simulation.faults import Crash, StragglerLearner, choose_nodes, churn_events
from p2pfl.simulation.network import LinkDelay
from p2pfl.simulation.scenario import Scenario
from p2pfl.store import StateDir
from p2pfl.topology import load_graph, make_schedule
from p2pfl.transport.base import Transport
from p2pfl.transport.memory import MemoryBus, MemoryTransport
from p2pfl.transport.mqtt import MqttTransport

log = logging.getLogger(__name__)

HOME = "memory://sim"
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
        """Load the dataset once for every schedule (and set up threads for training)."""
        import torch

        # One thread per torch op: parallelism comes from nodes training side by side.
        torch.set_num_threads(1)
        loop = asyncio.get_running_loop()
        # Attackers reading the honest models may wait in a thread for them: one more thread
        # each, so they never hold up the honest nodes' training.
        waiting = len(
            self.scenario.faults.byzantine_ids(self.scenario.node_ids, self.scenario.seed)
        )
        executor = ThreadPoolExecutor(
            max_workers=self.workers + waiting, thread_name_prefix="p2pfl-sim"
        )
        loop.set_default_executor(executor)
        settings = self.scenario.node_config(self.scenario.compare[0], 0, "n01")
        if self._dataset is None:
            self._dataset = await asyncio.to_thread(
                load_dataset, settings.dataset, seed=settings.seed
            )
        check_privacy(self.scenario, self._dataset)

    async def run(self) -> list[ScheduleRun]:
        """Every schedule of the scenario, one after the other."""
        await self.load()
        runs = []
        for schedule in self.scenario.compare:
            runs.append(await self.run_schedule(schedule))
        return runs

    async def run_schedule(self, schedule: str) -> ScheduleRun:
        """One schedule: start every node, apply faults, wait for all to finish."""
        dataset = self._dataset
        assert dataset is not None
        scenario = self.scenario
        n = scenario.nodes
        ids = node_ids(n)
        base = scenario.node_config(schedule, 0, ids[0])
        seed = base.seed
        parts = partition(dataset.y_train, n, base.partition, seed=seed)
        byz = set(choose_nodes(ids, scenario.faults.byzantine, seed=seed, salt="byzantine"))
        attack = scenario.faults.byzantine
        board: HonestModels | None = None
        if byz and attack.behaviour in ("alie", "ipm"):
            # Sync rounds: attackers wait for every honest model of their step (deterministic);
            # walkers train one holder at a time and async nodes never wait: the latest ones.
            wait = base.mode == "sync" and not base.walkers
            board = HonestModels(wait=wait, timeout=base.round_timeout)
        z = attack.z if attack.z is not None else alie_z(n, len(byz))
        poisoned_data = flip_labels(dataset) if byz and attack.behaviour == "label-flip" else None
        slow = set(choose_nodes(ids, scenario.faults.stragglers, seed=seed, salt="stragglers"))
        crashes = [*scenario.faults.crashes]
        if scenario.faults.churn > 0:
            rounds = base.rounds or 100
            crashes += churn_events(
                ids, rounds, scenario.faults.churn, scenario.faults.churn_downtime, seed
            )
        crash_at = _crash_table(crashes, ids)
        started = time.monotonic()
        run = ScheduleRun(schedule)
        clock = time.monotonic
        delay = LinkDelay(
            scenario.network,
            node_of=lambda client: client.partition("#")[0],
            clock=lambda: clock() - started,
            seed=seed,
            nodes=ids,
        )
        bus = MemoryBus(delay=delay if scenario.network.active else None)
        if self.broker is not None and scenario.network.active:
            log.warning("the network model does not apply on a real broker; ignoring it")
        home = self.broker or HOME

        def transport(member: _Member) -> Transport:
            client_id = f"{member.node_id}#{member.restarts}"
            if self.broker is None:
                return MemoryTransport(bus, client_id)
            mqtt_id = f"sim-{member.node_id}-{member.restarts}-{secrets.token_hex(3)}"
            return MqttTransport(self.broker, mqtt_id)

        network_round = 0

        with tempfile.TemporaryDirectory(prefix="p2pfl-sim-") as tmp:
            members = [
                _Member(i, node_id, node_id not in byz, StateDir(Path(tmp) / node_id))
                for i, node_id in enumerate(ids)
                if self.only is None or i in self.only
            ]

            def build(member: _Member) -> Node:
                # One shared bus: presence is the membership; everyone starts together.
                config = scenario.node_config(
                    schedule,
                    member.index,
                    member.node_id,
                    discovery=("presence",),
                    min_peers=n - 1 if member.restarts == 0 else 0,
                    telemetry_interval=0.0,  # nobody watches; the engine records every round
                )
                data = dataset if member.honest or poisoned_data is None else poisoned_data
                # DP noise seeded from the scenario (a reproducible run), per node and restart.
                noise_seed = (seed * 1000 + member.index) * 1000 + member.restarts
                learner: Learner = learner_from_config(
                    config, data, parts[member.index], dp_noise_seed=noise_seed
                )
                if member.node_id in slow:
                    learner = StragglerLearner(learner, scenario.faults.stragglers.slowdown)
                if not member.honest:
                    learner = ByzantineLearner(
                        learner,
                        attack.behaviour,
                        attack.scale,
                        seed + member.index,
                        z=z,
                        epsilon=attack.epsilon,
                        honest=board,
                        node_id=member.node_id,
                    )
                elif board is not None:
                    learner = WatchedLearner(learner, board, member.node_id)
                graph = None
                if schedule == "partial-mesh" and config.topology_file is not None:
                    graph = load_graph(config.topology_file)
                return Node(
                    config,
                    learner,
                    transport(member),
                    node_id=member.node_id,
                    home_broker=home,
                    schedule=make_schedule(
                        schedule,
                        degree=config.degree,
                        seed=config.seed,
                        graph=graph,
                        walkers=config.walkers,
                    ),
                    state=member.state,
                    on_round=functools.partial(on_round, member),
                    identity=member.identity,
                    # Every simulated peer is the user's own and all start together: rationing
                    # new peers would only delay a large run's start by minutes.
                    limit_new_peers=False,
                )

            def on_round(member: _Member, report: RoundReport) -> None:
                nonlocal network_round
                network_round = max(network_round, report.round)
                record = _record(schedule, report, clock() - started, member)
                member.counted = {k: record[k] for k in _CUMULATIVE}
                run.records.append(record)
                if self.on_record is not None:
                    self.on_record(record)
                planned = crash_at.get(member.node_id, {}).get(report.round)
                if planned is not None and member.crashed_at is None:
                    member.crashed_at = report.round
                    pending.append((member, planned))
                    wake.set()  # crash it before it can finish another round

            pending: list[tuple[_Member, Crash]] = []
            wake = asyncio.Event()

            async def supervise(tg: asyncio.TaskGroup) -> None:
                down: list[tuple[_Member, int]] = []
                while True:
                    while pending:
                        member, crash = pending.pop()
                        await _crash(member)
                        if crash.restart_after_rounds is not None:
                            down.append(
                                (member, (member.crashed_at or 0) + crash.restart_after_rounds)
                            )
                    for item in list(down):
                        member, when = item
                        others = any(m.running for m in members if m is not member)
                        if network_round >= when or not others:
                            down.remove(item)
                            member.crashed_at = None
                            member.restarts += 1
                            member.carried = member.counted
                            start(member, tg)
                    if not down and not pending and not any(m.running for m in members):
                        return
                    # Woken at once by a planned crash; otherwise poll for restarts and the end.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(wake.wait(), 0.05)
                    wake.clear()

            def start(member: _Member, tg: asyncio.TaskGroup) -> None:
                member.state.open()
                member.node = build(member)
                if board is not None:
                    board.join(member.node_id, attacker=not member.honest)
                member.task = tg.create_task(_run_member(member, board))

            async with asyncio.TaskGroup() as tg:
                for member in members:
                    start(member, tg)
                await supervise(tg)
        run.wall_seconds = time.monotonic() - started
        run.dropped = dict(delay.stats)
        return run


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


def _crash_table(crashes: list[Crash], ids: list[str]) -> dict[str, dict[int, Crash]]:
    table: dict[str, dict[int, Crash]] = {}
    for crash in crashes:
        node = crash.node if isinstance(crash.node, str) else ids[crash.node]
        table.setdefault(node, {})[crash.at_round] = crash
    return table


_CUMULATIVE = ("models_sent", "models_received", "bytes_sent", "rejected")


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
        "honest": member.honest,
        "restarts": member.restarts,  # how many times this node has crashed and come back
        "epsilon": report.epsilon,  # DP: spent on the node's own samples; None without DP
    }
