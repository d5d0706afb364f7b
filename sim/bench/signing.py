"""What signatures cost: the default `p2pfl sim` with signing and verification, and without.

Both runs in one process, same scenario and seed: `--trust tofu` (every message signed and
verified: Ed25519 plus a SHA-256 over each message) against `--trust open` (nothing signed or
checked). The dataset is loaded once before either is timed. Printed: both wall times and their
ratio (the goal: signed/unsigned <= 1.05). Measured on a 2-core machine with `--repeats 2`:
125.9 s unsigned, 131.5 s signed, 1.044.

    python sim/bench/signing.py [--rounds 25] [--schedule ring] [--repeats 1]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from p2pfl.learning.datasets import load_dataset
from p2pfl.simulation.engine import Simulation
from p2pfl.simulation.scenario import load_scenario


def timed(overrides: dict[str, Any]) -> float:
    scenario = load_scenario(None, overrides)
    started = time.perf_counter()
    asyncio.run(Simulation(scenario).run())
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=None, help="[default: the scenario's]")
    parser.add_argument("--schedule", default=None, help="[default: all three]")
    parser.add_argument("--repeats", type=int, default=1, help="Alternating pairs of runs.")
    args = parser.parse_args()
    base: dict[str, Any] = {}
    if args.rounds is not None:
        base["rounds"] = args.rounds
    if args.schedule is not None:
        base["schedule"] = args.schedule
    load_dataset("mnist1d", seed=0)  # generated and cached before anything is timed
    signed, unsigned = 0.0, 0.0
    for i in range(args.repeats):
        # Alternate which goes first, so warm-up and drift fall on both sides.
        order = ["tofu", "open"] if i % 2 == 0 else ["open", "tofu"]
        for trust in order:
            seconds = timed({**base, "trust": trust})
            if trust == "tofu":
                signed += seconds
            else:
                unsigned += seconds
    print(f"default sim {base or '(as built in)'}, {args.repeats} pair(s)")
    print(f"unsigned (--trust open): {unsigned:.2f} s")
    print(f"signed   (--trust tofu): {signed:.2f} s")
    print(f"ratio signed/unsigned:   {signed / unsigned:.3f}  (goal <= 1.05)")


if __name__ == "__main__":
    main()
