"""`p2pfl bench`: the figures that keep the project honest, each a ratio against a baseline
measured in the same run (or a growth factor), with the machine it ran on.

A bench is a module here with `run(options: BenchOptions) -> BenchResult`; register it in
`BENCHES`. Modules are imported only when their bench runs, so `--help` stays fast.
"""

from __future__ import annotations

import importlib

from p2pfl.bench.core import BenchOptions, BenchResult


class Bench:
    """A registered bench: its name on the command line and one line of help."""

    def __init__(self, name: str, summary: str) -> None:
        self.name = name
        self.summary = summary

    def run(self, options: BenchOptions) -> BenchResult:
        """Import the bench's module and run it."""
        module = importlib.import_module(f"p2pfl.bench.{self.name}")
        result: BenchResult = module.run(options)
        return result


BENCHES: dict[str, Bench] = {
    b.name: b
    for b in [
        Bench("overhead", "simulator vs the same training in a bare loop, 16/64(/256) nodes"),
        Bench("scale", "64/256/1,024 simulated nodes: start-up, round, RSS, membership growth"),
        Bench("batched", "a round of 256 (1,024) cnn1d nodes stacked vs one node at a time"),
        Bench("transport", "model transfers through Mosquitto and amqtt vs plain aiomqtt"),
        Bench("daemon", "8 real p2pfl run processes vs the same training in a bare loop"),
        Bench("convergence", "each schedule against centralized training: to 0.80 and 0.90"),
        Bench("footprint", "one idle daemon: CPU % of a core and RSS, alone and monitored"),
        Bench("security", "the default sim signed vs unsigned, and each message's signing cost"),
    ]
}
