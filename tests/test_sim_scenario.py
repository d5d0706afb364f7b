"""Scenario files: the shipped ones load, overrides apply, bad values give one line per key."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from p2pfl.config import ConfigError
from p2pfl.simulation.scenario import DEFAULT_SCENARIO_TOML, Scenario, load_scenario

SIM_DIR = Path(__file__).resolve().parent.parent / "sim"
SHIPPED = sorted(SIM_DIR.glob("*.toml"))


def write(tmp_path: Path, text: str, name: str = "s.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_the_required_scenarios_are_shipped() -> None:
    names = {p.stem for p in SHIPPED}
    assert {"default", "churn", "byzantine", "partition", "large", "mesh16", "attacks"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_scenario_loads(path: Path) -> None:
    scenario = load_scenario(path, {})
    assert scenario.name == path.stem
    assert scenario.description
    assert path.read_text().startswith("#")  # a header says what it shows and how to run it
    for schedule in scenario.compare:
        config = scenario.node_config(schedule, scenario.nodes - 1, scenario.node_ids[-1])
        assert config.schedule == schedule
        assert config.partition_index == scenario.nodes - 1
        assert config.num_partitions == scenario.nodes


def test_shipped_scenarios_show_what_they_promise() -> None:
    by_name = {p.stem: load_scenario(p, {}) for p in SHIPPED}
    assert by_name["large"].nodes >= 256
    assert by_name["churn"].faults.churn > 0
    assert by_name["byzantine"].faults.byzantine_ids(by_name["byzantine"].node_ids, 0)
    assert by_name["partition"].network.partitions
    batched = by_name["batched"]
    assert (batched.engine, batched.nodes, batched.node.rounds) == ("batched", 1024, 100)
    assert (batched.node.model, batched.node.dataset) == ("cnn1d", "mnist1d:102400")
    mesh = by_name["mesh16"]
    assert (mesh.nodes, mesh.compare, mesh.node.rounds, mesh.node.mode) == (
        16,
        ("partial-mesh",),
        200,
        "sync",
    )


def test_the_attack_bench_is_the_acceptance_setting() -> None:
    bench = load_scenario(SIM_DIR / "attacks.toml", {})
    assert (bench.nodes, bench.node.partition, bench.node.mode) == (16, "dirichlet:0.5", "sync")
    assert len(bench.faults.byzantine_ids(bench.node_ids, bench.seed)) == 4  # 25%
    assert bench.attacks == ("clean", "scaled", "sign-flip", "random", "alie", "ipm",
                             "label-flip", "free-rider")  # fmt: skip
    assert bench.compare == ("ring", "random-walk", "partial-mesh")
    assert {"average", "clipped"} <= set(bench.compare_merges)
    assert bench.seeds == (0, 1, 2)  # each cell is a mean over three seeds
    # --merge picks one rule, as --schedule picks one schedule
    one = load_scenario(SIM_DIR / "attacks.toml", {"merge": "median", "schedule": "ring"})
    assert (one.compare_merges, one.node.merge, one.compare) == ((), "median", ("ring",))
    assert one.attacks == bench.attacks


def test_the_embedded_default_is_sim_default_toml() -> None:
    assert (SIM_DIR / "default.toml").read_text() == DEFAULT_SCENARIO_TOML
    builtin = load_scenario(None, {})
    assert builtin == load_scenario(SIM_DIR / "default.toml", {})
    assert builtin.nodes == 16
    assert builtin.compare == ("ring", "random-walk", "partial-mesh")
    node = builtin.node
    assert (node.mode, node.dataset, node.partition, node.model) == (
        "sync",
        "mnist1d",
        "dirichlet:0.5",
        "cnn1d",
    )
    assert (node.optimizer, node.lr, node.momentum, node.local_epochs) == ("sgd", 0.05, 0.9, 3)


def test_the_readme_example_is_a_valid_scenario() -> None:
    readme = (SIM_DIR / "README.md").read_text()
    block = re.search(r"```toml\n(.*?)```", readme, re.S)
    assert block is not None
    scenario = Scenario.model_validate(tomllib.loads(block.group(1)))
    assert scenario.faults.crashes[0].node == 3
    assert len(scenario.network.partitions) == 2


def test_cli_overrides_apply() -> None:
    scenario = load_scenario(
        None,
        {"nodes": 5, "schedule": "ring", "rounds": 7, "seed": 9, "merge": "median", "mu": None},
    )
    assert scenario.nodes == 5 and scenario.compare == ("ring",)
    assert (scenario.node.rounds, scenario.seed, scenario.node.merge) == (7, 9, "median")
    assert scenario.node.mu == 0.0  # None means "flag not given"
    assert scenario.node_ids == ["n01", "n02", "n03", "n04", "n05"]
    both = load_scenario(None, {"schedule": ["partial-mesh", "ring"]})
    assert both.compare == ("partial-mesh", "ring")


def test_node_config_is_the_per_node_config() -> None:
    scenario = load_scenario(None, {})
    config = scenario.node_config("partial-mesh", 3, "n04", min_peers=4)
    assert (config.id, config.schedule, config.partition_index, config.num_partitions) == (
        "n04",
        "partial-mesh",
        3,
        16,
    )
    assert config.discovery == ("presence",) and config.min_peers == 4
    assert (config.lr, config.rounds, config.mode) == (0.05, 25, "sync")


def test_the_node_table_sets_the_telemetry_detail_of_every_node(tmp_path: Path) -> None:
    path = write(tmp_path, '[node]\nrounds = 3\ntelemetry_detail = "metrics"\n', "quiet.toml")
    assert load_scenario(path, {}).node_config("ring", 0, "n01").telemetry_detail == "metrics"
    assert load_scenario(None, {}).node_config("ring", 0, "n01").telemetry_detail == "full"


def test_node_ids_sort_in_index_order() -> None:
    ids = load_scenario(SIM_DIR / "large.toml", {}).node_ids
    assert ids == sorted(ids) and ids[0] == "n001" and ids[-1] == "n256" and len(set(ids)) == 256


def test_name_defaults_to_the_file_name(tmp_path: Path) -> None:
    path = write(tmp_path, "[node]\nrounds = 3\n", "tiny.toml")
    scenario = load_scenario(path, {})
    assert scenario.name == "tiny" and scenario.nodes == 16


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("nodes = 1\n[node]\nrounds = 3", "nodes"),
        ('compare = ["star"]\n[node]\nrounds = 3', "compare.0"),
        ('compare = ["ring", "ring"]\n[node]\nrounds = 3', "compare"),
        ("colour = 1\n[node]\nrounds = 3", "colour: unknown key"),
        ("[node]\nrounds = 3\nlr = -1", "node.lr"),
        ('[node]\nrounds = 3\nmerge = "mode"', "node.merge"),
        ('[node]\nrounds = 3\ntelemetry_detail = "some"', "node.telemetry_detail"),
        ('[node]\nrounds = 3\nbroker = "mqtt://x:1883"', "node.broker: not used in simulation"),
        ('[node]\nrounds = 3\nschedule = "ring"', "node.schedule: not used in simulation"),
        ("[node]\nrounds = 3\nstate-dir = '/tmp'", "node.state_dir: not used in simulation"),
        ("[node]\nmode = 'sync'", "node.rounds: set rounds"),
        ("[node]\nrounds = 3\nwalkers = 1", "node: walkers"),
        ("[node]\nrounds = 3\n[network]\nloss = 2", "network.loss"),
        ("[node]\nrounds = 3\n[network]\nspeed = 2", "network.speed: unknown key"),
        (
            "[node]\nrounds = 3\n[network]\npartitions = [{start = 1, end = 2, groups = [[99]]}]",
            "network.partitions.0.groups: node index 99 is out of range",
        ),
        (
            "[node]\nrounds = 3\n[network]\npartitions = [{start = 3, end = 2, split = 0.5}]",
            "network.partitions.0: end",
        ),
        (
            "[node]\nrounds = 3\n[faults]\ncrashes = [{node = 'ghost', at_round = 1}]",
            "faults.crashes.0.node: unknown node id 'ghost'",
        ),
        (
            "[node]\nrounds = 3\n[faults.byzantine]\nbehaviour = 'evil'",
            "faults.byzantine.behaviour",
        ),
        ("[node]\nrounds = 3\n[faults.byzantine]\ncount = 17", "faults.byzantine.count"),
        ("[node]\nrounds = 3\n[faults.byzantine]\nepsilon = 0", "faults.byzantine.epsilon"),
        ("[node]\nrounds = 3\n[faults.byzantine]\nz = -1", "faults.byzantine.z"),
        (
            'attacks = ["alie", "evil"]\n[node]\nrounds = 3\n[faults.byzantine]\ncount = 2',
            "attacks.1: Input should be 'clean', 'scaled'",
        ),
        (
            'attacks = ["ipm", "ipm"]\n[node]\nrounds = 3\n[faults.byzantine]\ncount = 2',
            "attacks: an attack is listed twice",
        ),
        ('attacks = ["alie"]\n[node]\nrounds = 3', "attacks: no node is Byzantine"),
        ('compare_merges = ["average", "mode"]\n[node]\nrounds = 3', "compare_merges: unknown"),
        ('compare_merges = ["median", "median"]\n[node]\nrounds = 3', "compare_merges: a merge"),
        ("[node]\nrounds = 3\n[faults.stragglers]\nslowdown = 0.5", "faults.stragglers.slowdown"),
        ("time_dilation = 0.5\n[node]\nrounds = 3", 'time_dilation: a factor >= 1 or "auto"'),
        ('time_dilation = "fast"\n[node]\nrounds = 3', "time_dilation"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_scenario(write(tmp_path, text), {})
    message = str(caught.value)
    assert len(message.splitlines()) == 1, message
    assert message.startswith(f"config error: {key}"), message


def test_walkers_fail_only_with_the_schedule_that_forbids_them(tmp_path: Path) -> None:
    text = "[node]\nrounds = 3\nwalkers = 1\n"
    assert load_scenario(write(tmp_path, text), {"schedule": "ring"}).node.walkers == 1
    with pytest.raises(ConfigError, match=r"\(schedule partial-mesh\)"):
        load_scenario(write(tmp_path, text), {})


def test_several_problems_give_one_line_each(tmp_path: Path) -> None:
    text = "nodes = 0\n[node]\nrounds = 3\nlr = 0\nbroker = 'x'\npeers = []\n"
    with pytest.raises(ConfigError) as caught:
        load_scenario(write(tmp_path, text), {})
    lines = str(caught.value).splitlines()
    assert len(lines) == 3  # node's bad keys are all reported; then nodes
    assert any(line.startswith("config error: nodes:") for line in lines)
    assert any(line.startswith("config error: node.broker:") for line in lines)
    assert any(line.startswith("config error: node.peers:") for line in lines)


def test_unreadable_or_broken_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_scenario(tmp_path / "missing.toml", {})
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_scenario(write(tmp_path, "nodes = ["), {})


def test_a_topology_file_is_found_beside_the_scenario(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "graph.toml").write_text("edges = []\n")
    text = '[node]\nrounds = 3\ntopology_file = "graph.toml"\n'
    monkeypatch.chdir("/")
    with pytest.raises(ConfigError, match=r"config error: node\.topology_file: a topology file"):
        load_scenario(write(tmp_path, text), {})
    scenario = load_scenario(write(tmp_path, text), {"schedule": "partial-mesh"})
    assert scenario.node.topology_file == tmp_path / "graph.toml"


def test_membership_runs_dilated_past_a_hundred_or_so_nodes(tmp_path: Path) -> None:
    """`time_dilation = "auto"`: real time up to REAL_TIME_NODES nodes, then nodes / that (one
    event loop runs them all); a number is taken as given."""
    small = load_scenario(write(tmp_path, "[node]\nrounds = 3"), {})
    assert small.time_dilation == "auto" and small.dilation == 1.0
    assert load_scenario(write(tmp_path, "[node]\nrounds = 3"), {"nodes": 128}).dilation == 1.0
    assert load_scenario(write(tmp_path, "[node]\nrounds = 3"), {"nodes": 1024}).dilation == 8.0
    given = load_scenario(write(tmp_path, "time_dilation = 2.5\n[node]\nrounds = 3"), {})
    assert given.dilation == 2.5
