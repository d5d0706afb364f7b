"""The engine's own duties: what it changes in the process is put back, and a node that fails
unexpectedly ends the run with its error instead of leaving the others to finish."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

from p2pfl.learning.learner import FitResult
from p2pfl.simulation import engine
from p2pfl.simulation.engine import Simulation
from p2pfl.simulation.faults import DelegatingLearner
from p2pfl.simulation.scenario import load_scenario

pytestmark = pytest.mark.timeout(120)

SMALL = """
name = "small"
nodes = 3
compare = ["ring"]

[node]
mode = "sync"
rounds = {rounds}
model = "logreg"
local_epochs = 1
seed = 0
"""


def scenario(tmp_path: Path, rounds: int) -> Any:
    path = tmp_path / "small.toml"
    path.write_text(SMALL.format(rounds=rounds))
    return load_scenario(path, {})


def worker_name() -> str:
    return threading.current_thread().name


def test_torch_threads_and_the_loops_executor_are_put_back(tmp_path: Path) -> None:
    mine = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mine")
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    seen: list[str] = []

    async def main() -> list[str]:
        simulation = Simulation(scenario(tmp_path, 1), on_record=lambda _: None)
        names = [await asyncio.to_thread(worker_name)]  # the loop's own executor, made now
        await simulation.run()
        names.append(await asyncio.to_thread(worker_name))
        asyncio.get_running_loop().set_default_executor(mine)
        (run,) = await simulation.run()
        seen.extend(r["node"] for r in run.records)
        names.append(await asyncio.to_thread(worker_name))
        return names

    async def fresh() -> str:
        await Simulation(scenario(tmp_path, 1)).run()  # before the loop made an executor
        return await asyncio.to_thread(worker_name)

    try:
        first, after, after_mine = asyncio.run(main())
        assert torch.get_num_threads() == 3
        assert first.startswith("asyncio") and after.startswith("asyncio")
        assert after_mine.startswith("mine")
        assert sorted(seen) == ["n01", "n02", "n03"]  # it did train, in its own threads
        assert asyncio.run(fresh()).startswith("asyncio")
    finally:
        torch.set_num_threads(threads)
        mine.shutdown()


class Broken(DelegatingLearner):
    """A learner with a bug: its second fit raises."""

    fits = 0

    def fit(self) -> FitResult:
        self.fits += 1
        if self.fits == 2:
            raise RuntimeError("learner bug")
        return self.inner.fit()


def test_a_node_failing_unexpectedly_ends_the_run_with_its_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    build = engine.learner_from_config

    def one_broken(config, dataset, indices, **kw):  # type: ignore[no-untyped-def]
        learner = build(config, dataset, indices, **kw)
        return Broken(learner) if config.partition_index == 1 else learner

    monkeypatch.setattr(engine, "learner_from_config", one_broken)
    rounds = 200
    records: list[dict[str, Any]] = []
    simulation = Simulation(scenario(tmp_path, rounds), on_record=records.append)
    with pytest.raises(ExceptionGroup) as caught:
        asyncio.run(simulation.run())
    assert caught.group_contains(RuntimeError, match="learner bug")
    # The run ended when n02 failed: the others were stopped, not left to run their rounds.
    assert [r["round"] for r in records if r["node"] == "n02"] == [1]
    assert max(r["round"] for r in records) < rounds / 4


def run_records(path: Path) -> list[dict[str, Any]]:
    """Run the scenario at `path` (within 90 s): every record its nodes reported."""
    records: list[dict[str, Any]] = []

    async def main() -> None:
        async with asyncio.timeout(90):
            await Simulation(load_scenario(path, {}), on_record=records.append).run()

    asyncio.run(main())
    return records


def test_nodes_run_their_membership_timers_on_the_dilated_clock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`time_dilation`: every node the engine builds has its shuffle interval and presence TTL
    (so its heartbeat) stretched by the factor, and the run trains as usual."""
    built: list[Any] = []
    real_node = engine.Node

    def node(config: Any, *args: Any, **kwargs: Any) -> Any:
        built.append(config)
        return real_node(config, *args, **kwargs)

    monkeypatch.setattr(engine, "Node", node)
    path = tmp_path / "dilated.toml"
    text = SMALL.format(rounds=2).replace(
        'compare = ["ring"]', 'compare = ["ring"]\ntime_dilation = 3'
    )
    path.write_text(text + "presence_ttl = 20.0\nshuffle_interval = 0.5\n")
    records = run_records(path)
    assert sorted(r["node"] for r in records if r["round"] == 2) == ["n01", "n02", "n03"]
    assert len(built) == 3
    assert all((c.presence_ttl, c.shuffle_interval) == (60.0, 1.5) for c in built)


def test_a_crashed_node_comes_back_when_nobody_else_is_left(tmp_path: Path) -> None:
    """Its restart is due at round 51, which nobody will reach: the supervisor, woken by the
    last other node's end, brings it back to finish its own rounds."""
    path = tmp_path / "alone.toml"
    text = SMALL.format(rounds=3).replace("nodes = 3", "nodes = 2")
    text += "round_timeout = 5.0\n"
    text += '\n[[faults.crashes]]\nnode = "n02"\nat_round = 1\nrestart_after_rounds = 50\n'
    path.write_text(text)
    records = run_records(path)
    n01 = [r["round"] for r in records if r["node"] == "n01"]
    n02 = [(r["restarts"], r["round"]) for r in records if r["node"] == "n02"]
    assert n01 == [1, 2, 3]
    assert n02[0] == (0, 1) and n02[-1] == (1, 3)
    # It came back after n01 had finished: its rounds after the crash start where n01 ended.
    first_back = next(i for i, r in enumerate(records) if r["restarts"] == 1)
    assert [r["node"] for r in records[:first_back]].count("n01") == 3


def test_a_scripted_pause_skips_the_nodes_rounds_and_it_catches_up(tmp_path: Path) -> None:
    """`[faults] pauses`: n03 trains no round 2 to 4 of the network; the others do not wait
    for it (no round of theirs runs into the timeout), and it comes back at the round they
    reached."""
    timeout = 30.0
    path = tmp_path / "pause.toml"
    text = SMALL.format(rounds=6).replace("nodes = 3", "nodes = 4")
    # Far beyond what a round takes: no round, neither while n03 is paused nor as it
    # resumes at a later round than the one its peers wait in, comes near it.
    text += f"round_timeout = {timeout}\n"
    text += '\n[faults]\npauses = [{ node = "n03", from_round = 2, to_round = 5 }]\n'
    path.write_text(text)
    records = run_records(path)
    rounds = {n: [r["round"] for r in records if r["node"] == n] for n in ("n01", "n02", "n04")}
    assert rounds == {n: [1, 2, 3, 4, 5, 6] for n in rounds}
    waited = [r for r in records if r["round_seconds"] >= timeout / 2]
    assert waited == [], waited
    paused = [r["round"] for r in records if r["node"] == "n03"]
    assert paused[0] == 1 and not {2, 3} & set(paused) and paused[-1] == 6
    n03 = [r for r in records if r["node"] == "n03"]
    assert n03[0]["models_sent"] == n03[1]["models_sent"] - 1  # nothing sent while paused


def test_the_batched_engine_refuses_pauses() -> None:
    from p2pfl.simulation.batched import refusal
    from p2pfl.simulation.scenario import Scenario

    base = {"name": "p", "nodes": 4, "node": {"mode": "sync", "rounds": 3}}
    for faults in ({"pauses": [{"node": 1, "from_round": 2, "to_round": 3}]},
                   {"eligible_fraction": 0.5}):  # fmt: skip
        why = refusal(Scenario.model_validate({**base, "faults": faults}))
        assert why is not None and "pauses" in why
    assert refusal(Scenario.model_validate(base)) is None


@pytest.mark.parametrize(
    "pause",
    [{"node": 9, "from_round": 2, "to_round": 3}, {"node": 1, "from_round": 4, "to_round": 3}],
)
def test_a_bad_pause_is_refused_naming_it(pause: dict[str, int]) -> None:
    from pydantic import ValidationError

    from p2pfl.simulation.scenario import Scenario

    scenario = {"name": "p", "nodes": 4, "node": {"rounds": 3}, "faults": {"pauses": [pause]}}
    with pytest.raises(ValidationError, match="pauses"):
        Scenario.model_validate(scenario)
