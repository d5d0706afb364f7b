"""`p2pfl sim --broker URI --shard I/P`: one simulation spread over several machines.

Shard I of P runs the scenario's nodes whose index i has i % P == I (on this machine, over its
`--processes` local workers), all on one shared MQTT broker, so the P shards form one network.
The shards meet on that broker under `p2pfl/v1/<net>/sim/` (p2pfl.simulation.shard_board):
each says hello, and each publishes its records of every schedule there, retained.

`<run>` is a digest of the scenario (every flag applied, the topology file's content) and P:
shards started with different scenarios, seeds or flags get different run ids, a shard that
sees another run's shard on the broker refuses to start, and results of another run are never
read. The nodes of each schedule run on a network of their own, `<net>-<nonce>-<schedule>`,
where the nonce is shard 0's (read from its hello): node ids repeat across schedules and runs,
and a node would otherwise meet the retained presence of its namesake from an earlier one.
Shard 0 collects the results, writes the one summary, and clears the retained messages.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
from collections.abc import Callable
from pathlib import Path

from p2pfl.learning.datasets import Dataset, load_dataset
from p2pfl.simulation.engine import Record, ScheduleRun, Simulation
from p2pfl.simulation.procs import run_schedule_in_processes
from p2pfl.simulation.scenario import Scenario
from p2pfl.simulation.shard_board import ResultBoard, Shard, ShardError
from p2pfl.transport.mqtt import MqttTransport

__all__ = ["GATHER_TIMEOUT", "Shard", "ShardError", "parse_shard", "run_id", "run_shard"]

log = logging.getLogger(__name__)

GATHER_TIMEOUT = 300.0
"""Seconds a shard waits, once its own nodes are done, for the other shards' results."""


def parse_shard(text: str, nodes: int) -> Shard:
    """`I/P` with 0 <= I < P <= nodes; ValueError naming `--shard` and the bad value."""
    index, slash, count = text.partition("/")
    if not slash or not index.strip().isdigit() or not count.strip().isdigit():
        raise ValueError(f"--shard {text}: write I/P, e.g. 0/2 (shard I of P)")
    shard = Shard(int(index), int(count))
    if shard.count < 1 or shard.index >= shard.count:
        raise ValueError(f"--shard {text}: need 0 <= I < P and P >= 1")
    if shard.count > nodes:
        raise ValueError(f"--shard {text}: {shard.count} shards for {nodes} nodes; P <= nodes")
    return shard


def run_id(scenario: Scenario, shards: int) -> str:
    """A digest of what every shard must agree on: the scenario, its flags, the shard count."""
    data = scenario.model_dump(mode="json")
    topology = scenario.node.topology_file
    if topology is not None:  # its path differs between machines; its content may not
        data["node"]["topology_file"] = hashlib.sha256(Path(topology).read_bytes()).hexdigest()
    text = json.dumps({"scenario": data, "shards": shards}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_shard(
    scenario: Scenario,
    shard: Shard,
    *,
    broker: str,
    processes: int = 1,
    on_record: Callable[[Record], None] | None = None,
    dataset: Dataset | None = None,
    timeout: float = GATHER_TIMEOUT,
) -> list[ScheduleRun]:
    """Run this machine's shard of every schedule. Shard 0 returns every shard's runs, merged;
    the others return their own. ShardError when the shards cannot finish together."""
    shard_run = _ShardRun(scenario, shard, broker, processes, on_record, dataset, timeout)
    return asyncio.run(shard_run.run())


class _ShardRun:
    """This machine's shard of every schedule, met with the other shards on the broker."""

    def __init__(
        self,
        scenario: Scenario,
        shard: Shard,
        broker: str,
        processes: int,
        on_record: Callable[[Record], None] | None,
        dataset: Dataset | None,
        timeout: float,
    ) -> None:
        self.scenario, self.shard, self.broker = scenario, shard, broker
        self.processes, self.on_record, self.timeout = processes, on_record, timeout
        self.indices = shard.indices(scenario.nodes)
        self.dataset = dataset
        run = run_id(scenario, shard.count)
        transport = MqttTransport(broker, f"sim-shard-{run}-{shard.index}-{secrets.token_hex(3)}")
        self.board = ResultBoard(transport, scenario.node.network, run, shard, scenario.node_ids)

    async def run(self) -> list[ScheduleRun]:
        board = self.board
        await board.open()
        try:
            async with asyncio.TaskGroup() as tg:
                reader = tg.create_task(board.read())
                try:
                    runs = await self._schedules()
                finally:
                    await board.close(clear=self.shard.index == 0)
                    reader.cancel()
        except* ShardError as group:  # one line for the user, not a group of one
            raise group.exceptions[0] from None
        if board.dropped:
            log.warning("dropped shard messages: %s", dict(board.dropped))
        return runs

    async def _schedules(self) -> list[ScheduleRun]:
        board, lead = self.board, self.shard.index == 0
        await board.greeted()
        if lead:
            await board.clear_stale()
        nonce = await board.led()
        if self.dataset is None and self.processes <= 1:
            node = self.scenario.node
            self.dataset = await asyncio.to_thread(load_dataset, node.dataset, seed=node.seed)
        runs = []
        for schedule in self.scenario.compare:
            network = f"{self.scenario.node.network[:24]}-{nonce[:12]}-{schedule}"
            node = self.scenario.node.model_copy(update={"network": network})
            own = await self._local(self.scenario.model_copy(update={"node": node}), schedule)
            await board.publish(own)
            if lead:
                shards = await board.gather(schedule, self.timeout)
                await board.clear_presence(network, self.scenario.node_ids)
                own = self._merge(own, shards[1:])
            runs.append(own)
        return runs

    async def _local(self, scenario: Scenario, schedule: str) -> ScheduleRun:
        """This shard's nodes of one schedule, here or over `processes` local workers."""
        if self.processes <= 1:
            simulation = Simulation(
                scenario, on_record=self.on_record, broker=self.broker, only=set(self.indices),
                dataset=self.dataset,
            )  # fmt: skip
            await simulation.load()
            return await simulation.run_schedule(schedule)
        return await asyncio.to_thread(
            run_schedule_in_processes, scenario, schedule, broker=self.broker,
            indices=self.indices, processes=self.processes, on_record=self.on_record,
        )  # fmt: skip

    def _merge(self, own: ScheduleRun, others: list[ScheduleRun]) -> ScheduleRun:
        """Shard 0's run with the others' records; its wall time is the run's (the others'
        include waiting for shard 0 to start the schedule). A record whose fields differ from
        shard 0's (another version of p2pfl) is dropped and counted."""
        merged = ScheduleRun(own.schedule, list(own.records), own.wall_seconds, dict(own.dropped))
        fields = set(own.records[0]) if own.records else None
        for other in others:
            for record in other.records:
                if fields is not None and set(record) != fields:
                    self.board.dropped["records with other fields"] += 1
                    continue
                merged.records.append(record)
                if self.on_record is not None:
                    self.on_record(record)
            for reason, count in other.dropped.items():
                merged.dropped[reason] = merged.dropped.get(reason, 0) + count
        return merged
