"""`security`: what signing every message costs.

Two measurements, each against a baseline taken in the same run:

- The default simulation (`p2pfl sim`, one schedule, fewer rounds at the smaller sizes) with
  signatures on (`trust = tofu`, the default: every message and chunk signed with Ed25519 over
  a SHA-256 of the message, and checked by `p2pfl.trust` on arrival) against the same run with
  `trust = open` (nothing signed or checked). The dataset is loaded and a learner built (torch's
  lazy imports) before anything is timed; signed and unsigned runs alternate, so drift falls on
  both sides. Figures: the ratio of wall times, and of the CPU time the process used (steadier
  on a machine shared with other work).
- One message at a time, with the real encoder and checks: the default model's message
  (encoded, its signature checked, decoded against the local layout) and a small presence-sized
  message, signed against unsigned. Figures: the model message's cost ratio, and the
  microseconds that signing and verifying add to it.
"""

from __future__ import annotations

import asyncio
import time
import timeit
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from p2pfl.bench.core import BenchOptions, BenchResult, Figure, ratio, stopwatch
from p2pfl.config import NodeConfig
from p2pfl.identity import Identity
from p2pfl.learning.datasets import Dataset, load_dataset
from p2pfl.learning.partition import partition
from p2pfl.learning.torch_learner import learner_from_config
from p2pfl.protocol.envelope import Envelope, Signer, pack_envelope, unpack_envelope
from p2pfl.protocol.model import decode_model, encode_model, layout
from p2pfl.simulation.engine import Simulation
from p2pfl.simulation.scenario import Scenario, load_scenario
from p2pfl.trust import Policy, Trust

SCHEDULE = "partial-mesh"  # every node sends to and hears from its mesh neighbours
SIM_GOAL = "<= 1.05"
SIGNED: Policy = "tofu"
UNSIGNED: Policy = "open"


def run(options: BenchOptions) -> BenchResult:
    """The default sim signed and unsigned, then one model and one small message at a time."""
    nodes, rounds, pairs = options.pick((4, 1, 1), (16, 3, 2), (16, 25, 2))
    # tiny: one local epoch instead of the scenario's, so the tests take seconds
    overrides: dict[str, Any] = options.pick({"local_epochs": 1}, {}, {})
    calls: int = options.pick(20, 200, 1000)
    result = BenchResult(
        "security",
        "Signatures on (trust tofu) against off (trust open)",
        ["measure", "unit", "unsigned", "signed", "ratio"],
    )
    options.progress("security: loading the dataset")
    config = _scenario(nodes, rounds, UNSIGNED, overrides).node_config(SCHEDULE, 0, "n01")
    data = load_dataset(config.dataset, seed=config.seed)
    # Also the warm-up: torch imports torch._dynamo when the first optimizer is made (seconds),
    # which would otherwise fall on the first timed run.
    parts = partition(data.y_train, nodes, config.partition, seed=config.seed)
    weights = learner_from_config(config, data, parts[0]).get_weights()
    wall, cpu = asyncio.run(_simulations(nodes, rounds, pairs, overrides, data, options))
    sim = f"default sim, {SCHEDULE}, {nodes} nodes x {rounds} rounds"
    sim_row = _row(f"{sim}: wall", "s", *wall, digits=2)
    cpu_row = _row(f"{sim}: CPU (all threads)", "s", *cpu, digits=2)
    options.progress("security: one message at a time")
    model = _model_message(weights, config, calls)
    small = _small_message(config, calls)
    result.rows += [sim_row, cpu_row, model.row, small.row]
    result.figures += [
        Figure("default sim wall, signed / unsigned", sim_row["ratio"], goal=SIM_GOAL),
        Figure("default sim CPU, signed / unsigned", cpu_row["ratio"]),
        Figure("model message cost, signed / unsigned", model.row["ratio"]),
        Figure("sign + verify, model message", model.added, unit="µs"),
    ]
    epochs = f", local_epochs {overrides['local_epochs']}" if overrides else ""
    result.notes.append(
        f"Sim{epochs}: {pairs} alternating pair(s) of runs, dataset loaded and a learner built "
        f"before; message costs: the best of 3 x {calls} calls each."
    )
    return result


def _scenario(nodes: int, rounds: int, trust: Policy, overrides: dict[str, Any]) -> Scenario:
    settings = {"nodes": nodes, "rounds": rounds, "schedule": SCHEDULE, "trust": trust}
    return load_scenario(None, settings | overrides)


async def _simulations(
    nodes: int,
    rounds: int,
    pairs: int,
    overrides: dict[str, Any],
    data: Dataset,
    options: BenchOptions,
) -> tuple[tuple[float, float], tuple[float, float]]:
    """Total (unsigned, signed) wall seconds, and CPU seconds of this process: on a machine
    shared with other work, CPU time is the steadier of the two."""
    wall = {SIGNED: 0.0, UNSIGNED: 0.0}
    cpu = {SIGNED: 0.0, UNSIGNED: 0.0}
    for i in range(pairs):
        # Alternate which goes first, so warm-up and drift fall on both sides.
        for trust in (SIGNED, UNSIGNED) if i % 2 == 0 else (UNSIGNED, SIGNED):
            options.progress(f"security: sim with trust {trust}, pair {i + 1}/{pairs}")
            scenario = _scenario(nodes, rounds, trust, overrides)
            sim = Simulation(scenario, dataset=data)
            await sim.load()
            started = time.process_time()
            with stopwatch() as elapsed:
                await sim.run_schedule(SCHEDULE)
                wall[trust] += elapsed()
            cpu[trust] += time.process_time() - started
    return (wall[UNSIGNED], wall[SIGNED]), (cpu[UNSIGNED], cpu[SIGNED])


@dataclass(frozen=True)
class _Measured:
    """A message's row, and the microseconds signing and verifying add to it."""

    row: dict[str, Any]
    added: float


def _model_message(weights: dict[str, np.ndarray], config: NodeConfig, calls: int) -> _Measured:
    """The model encoded (`Gossip.encode`), checked (`Inbox.accept`: `Trust.check`), decoded."""
    identity, net, expected = Identity.generate(), config.network, layout(weights)

    def encode(signer: Signer | None) -> bytearray:
        return encode_model(
            weights, net=net, src="n01", seq=1, round=1, age=1.0, codec=config.codec,
            signer=signer,
        )  # fmt: skip

    signed, unsigned = encode(identity), encode(None)
    trust = Trust(SIGNED)
    encoding = _micros(partial(encode, None), calls)
    signing = _micros(partial(encode, identity), calls)
    checking = _micros(partial(trust.check, signed, replay=False), calls)
    decoding = _micros(partial(decode_model, unsigned, expected=expected, net=net), calls)
    plain, full = encoding + decoding, signing + checking + decoding
    name = f"model message ({config.model}, {len(unsigned) / 1000:.1f} kB): encode, check, decode"
    return _Measured(_row(name, "µs", plain, full), full - plain)


def _small_message(config: NodeConfig, calls: int) -> _Measured:
    """A presence-sized message packed, checked and unpacked (Ed25519 dominates)."""
    identity, trust = Identity.generate(), Trust(SIGNED)
    body = {"role": "trainer", "mqtt": "mqtt://192.168.1.20:1883", "round": 12, "online": True}
    env = Envelope.create("presence", body, net=config.network, src="n01", seq=1)
    signed, unsigned = pack_envelope(env, identity), pack_envelope(env)
    packing = _micros(partial(pack_envelope, env), calls)
    signing = _micros(partial(pack_envelope, env, identity), calls)
    checking = _micros(partial(trust.check, signed, replay=False), calls)
    unpacking = _micros(partial(unpack_envelope, unsigned), calls)
    plain, full = packing + unpacking, signing + checking + unpacking
    name = f"small message ({len(signed)} B signed): pack, check, unpack"
    return _Measured(_row(name, "µs", plain, full), full - plain)


def _micros(call: Callable[[], object], calls: int) -> float:
    """Microseconds per call, the best of 3 batches (the least disturbed by other work)."""
    return min(timeit.repeat(call, number=calls, repeat=3)) / calls * 1e6


def _row(
    measure: str, unit: str, unsigned: float, signed: float, digits: int = 1
) -> dict[str, Any]:
    r = ratio(signed, unsigned)
    return {
        "measure": measure,
        "unit": unit,
        "unsigned": round(unsigned, digits),
        "signed": round(signed, digits),
        "ratio": None if r is None else round(r, 3),
    }
