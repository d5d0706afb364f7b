"""Scenarios: what a simulation runs, as one validated, immutable pydantic model from TOML.

A scenario file has top-level `name`, `description`, `nodes`, `engine` (`node` or `batched`),
`eval_precision` (the batched engine's evaluation: `auto`, `float32`, `bfloat16`),
`train_precision` (its training steps: `float32`, `bfloat16`), `kernels` (its arithmetic:
`stacked`, or `per-node` for the node engine's results bit for bit) and `compare` (the schedules
to run it with, one run each), optionally `attacks` and `compare_merges` (the attack bench:
every Byzantine behaviour with every merge rule, see `p2pfl.simulation.matrix`),
`compare_dp` (DP budgets to compare, e.g. `[1, 4, 16, "none"]`, in the same table) and
`seeds` (the bench runs every cell once per seed and reports the mean),
a `[node]` table with the knobs of `p2pfl run` (validated by `NodeConfig`
itself, so defaults and messages are the same), a `[network]` table (`NetworkModel`) and a
`[faults]` table (`FaultPlan`). The built-in default is embedded below and shipped as
`sim/default.toml` too.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from p2pfl.config import NodeConfig, ScheduleName
from p2pfl.config_file import load_model, read_toml
from p2pfl.simulation.faults import BEHAVIOURS, Crash, FaultPlan, Pause, resolve_node
from p2pfl.simulation.network import NetworkModel, resolve_groups

__all__ = ["DEFAULT_SCENARIO_TOML", "SIM_EXCLUDED_KEYS", "Attack", "Scenario", "load_scenario"]

Attack = Literal[
    "clean", "scaled", "sign-flip", "random", "alie", "ipm", "label-flip", "free-rider"
]
"""A row of the attack bench: a Byzantine behaviour, or `clean` (no Byzantine node at all)."""
assert get_args(Attack) == ("clean", *BEHAVIOURS), "Attack is clean plus every Behaviour"

_BUS = "every simulated node is on the simulator's in-memory bus"
_PEERS = "the simulator introduces the nodes to each other"

SIM_EXCLUDED_KEYS: Mapping[str, str] = {
    "id": "the simulator names the nodes n01, n02, ...",
    "role": "every simulated node is a trainer",
    "broker": _BUS,
    "listen": _BUS,
    "advertise": _BUS,
    "ca": _BUS,
    "cert": _BUS,
    "key": _BUS,
    "username": _BUS,
    "password": _BUS,
    "tls_cert": _BUS,
    "tls_key": _BUS,
    "password_file": _BUS,
    "ca_key": "simulated nodes have no certificates: use trust = tofu, allowlist or open",
    "interfaces": _BUS,
    "peers": _PEERS,
    "discovery": _PEERS,
    "state_dir": "the simulator keeps each node's checkpoints under its output directory",
    "num_partitions": "the dataset is split into one partition per node; set nodes instead",
    "partition_index": "the dataset is split into one partition per node; set nodes instead",
    "schedule": "list the schedules to run in compare = [...] (or pass --schedule)",
}
"""`NodeConfig` keys a scenario's `[node]` table may not set, and why."""

DEFAULT_SCENARIO_TOML = """\
# default: 16 peers learn MNIST-1D together, once per schedule, to compare the schedules.
#
# Each peer holds a label-skewed slice of the data (Dirichlet 0.5), trains a small 1-D CNN
# (SGD, momentum 0.9, lr 0.05, 3 local epochs) and merges with its neighbours in sync rounds.
# The same scenario runs with ring, random-walk and partial-mesh; the summary compares them.
#
#   p2pfl sim                                   # this scenario (it is built in)
#   p2pfl sim sim/default.toml --schedule ring --rounds 50 --seed 1
name = "default"
description = "16 nodes, MNIST-1D (Dirichlet 0.5), cnn1d, sync rounds; compares the schedules"
nodes = 16
compare = ["ring", "random-walk", "partial-mesh"]

[node]
mode = "sync"
rounds = 25
dataset = "mnist1d"
partition = "dirichlet:0.5"
model = "cnn1d"
optimizer = "sgd"
lr = 0.05
momentum = 0.9
local_epochs = 3
batch_size = 32
degree = 4
merge = "clipped"
seed = 0

[network]
latency_ms = 5.0
jitter_ms = 2.0

[faults]
"""
"""The built-in scenario; `sim/default.toml` holds the same text."""


REAL_TIME_NODES = 128
"""Nodes whose membership timers one event loop keeps up with in real time (`p2pfl bench
scale`: start-up is flat up to 64 nodes, twice as long at 256): `Scenario.dilation`."""


def _node_id(index: int, nodes: int) -> str:
    # n01, n02, ...: 1-based like the shipped topology files, zero-padded so ids sort by index
    return f"n{index + 1:0{max(2, len(str(nodes)))}d}"


class Scenario(BaseModel):
    """One simulation: how many nodes, which schedules, node settings, network and faults."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    description: str = ""
    nodes: int = Field(default=16, ge=2)
    # Which simulator runs it: `node` (real daemons on a memory bus) or `batched` (all models
    # as stacked tensors, see `p2pfl.simulation.batched`); None: batched from 128 nodes when
    # it can run the scenario, else node.
    engine: Literal["node", "batched"] | None = None
    # The batched engine's evaluation: "bfloat16" runs the test forward with bfloat16 weights
    # and activations (float32 sums; 1.5x faster where the CPU has bfloat16 instructions, a
    # node's accuracy within about half a point of float32's); "auto": bfloat16 on such CPUs,
    # else float32. Training: `train_precision`; the node engine evaluates in float32.
    eval_precision: Literal["auto", "float32", "bfloat16"] = "auto"
    # The batched engine's training steps: "bfloat16" runs forward and backward in bfloat16
    # (mixed precision: float32 parameters, momentum and updates; ~1.4x faster training where
    # the CPU has bfloat16 instructions, gradients ~5% off float32's). The node engine refuses
    # it.
    train_precision: Literal["float32", "bfloat16"] = "float32"
    # The batched engine's arithmetic: "stacked" trains (and evaluates) the nodes of a chunk
    # together; "per-node" has each node's own learner, the node engine's, train and evaluate
    # it alone (float32), so the batched engine's records are the node engine's bit for bit
    # (sync rounds without crashes, churn, loss or partitions, which the node engine plays on
    # its clock) at about the node engine's training cost: a check of its schedules, merges
    # and Byzantine faults, not a way to go fast.
    kernels: Literal["stacked", "per-node"] = "stacked"
    compare: tuple[ScheduleName, ...] = ("ring", "random-walk", "partial-mesh")
    # The attack bench (`p2pfl sim --matrix`): each behaviour with each merge rule and each
    # schedule, same seed and rounds; empty: the [faults.byzantine] behaviour, the node's merge.
    attacks: tuple[Attack, ...] = ()
    compare_merges: tuple[str, ...] = ()
    # DP budgets (dp_epsilon) to compare in the bench's table; "none": without DP.
    compare_dp: tuple[float | Literal["none"], ...] = ()
    # Seeds the bench runs every cell with (node.seed of each run); its table shows the mean
    # over them. Empty: node.seed alone. A text "0,1,2" (the --seeds flag) is a list too.
    seeds: tuple[int, ...] = ()
    # The node engine stretches its nodes' membership timers by this factor (see `dilation`):
    # "auto" is nodes / REAL_TIME_NODES, at least 1.
    time_dilation: float | Literal["auto"] = "auto"
    node: NodeConfig = Field(default_factory=lambda: NodeConfig.model_validate({}))
    network: NetworkModel = Field(default_factory=NetworkModel)
    faults: FaultPlan = Field(default_factory=FaultPlan)

    @field_validator("compare")
    @classmethod
    def _check_compare(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("list at least one schedule")
        if len(set(value)) != len(value):
            raise ValueError("a schedule is listed twice")
        return value

    @field_validator("attacks")
    @classmethod
    def _check_attacks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(value)) != len(value):
            raise ValueError("an attack is listed twice")
        return value

    @field_validator("compare_merges")
    @classmethod
    def _check_merges(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        from p2pfl.learning.merge import parse_merge

        names = [parse_merge(spec).name for spec in value]  # ValueError names the bad rule
        if len(set(names)) != len(names):
            raise ValueError("a merge rule is listed twice")
        return value

    @field_validator("compare_dp")
    @classmethod
    def _check_dp(cls, value: tuple[float | str, ...]) -> tuple[float | str, ...]:
        for v in value:
            if v != "none" and not (isinstance(v, float | int) and 0 < v < float("inf")):
                raise ValueError(f'each budget is an epsilon > 0 or "none", got {v!r}')
        if len(set(value)) != len(value):
            raise ValueError("a budget is listed twice")
        return value

    @field_validator("time_dilation", mode="before")
    @classmethod
    def _check_dilation(cls, value: Any) -> Any:
        # before the union's own parsing: one line for any bad value, not one per member
        if value == "auto":
            return value
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or not 1 <= value < float("inf"):
            raise ValueError('a factor >= 1 or "auto"')
        return float(value)

    @field_validator("seeds", mode="before")
    @classmethod
    def _split_seeds(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",")]
        return value

    @field_validator("seeds")
    @classmethod
    def _check_seeds(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(v < 0 for v in value):
            raise ValueError("a seed is a whole number >= 0")
        if len(set(value)) != len(value):
            raise ValueError("a seed is listed twice")
        return value

    @field_validator("node", mode="before")
    @classmethod
    def _check_node_keys(cls, value: Any) -> Any:
        if isinstance(value, NodeConfig):
            value = value.model_dump(include=value.model_fields_set)
        if not isinstance(value, Mapping):
            return value
        value = {str(k).replace("-", "_"): v for k, v in value.items()}
        errors = [
            InitErrorDetails(
                type=PydanticCustomError(
                    "sim_excluded", "not used in simulation: {why}", {"why": why}
                ),
                loc=(key,),
                input=value[key],
            )
            for key, why in SIM_EXCLUDED_KEYS.items()
            if key in value
        ]
        if errors:
            raise ValidationError.from_exception_data("node", errors)
        if value.get("secure_aggregation") is True:
            # The schedules come from `compare`, each checked with the node (see below); the
            # table alone is checked as for the one schedule secure aggregation works with.
            value = {**value, "schedule": "partial-mesh"}
        return value

    @model_validator(mode="after")
    def _check_together(self) -> Scenario:
        errors: list[InitErrorDetails] = []

        def problem(loc: tuple[str | int, ...], message: str, value: Any) -> None:
            errors.append(
                InitErrorDetails(
                    # the message as context: braces in it are not a template
                    type=PydanticCustomError("scenario", "{message}", {"message": message}),
                    loc=loc,
                    input=value,
                )
            )

        if self.node.rounds == 0 and self.node.duration is None:
            problem(("node", "rounds"), "set rounds (or duration): a simulation must end", 0)
        if self.kernels == "per-node":
            why = "kernels = 'per-node' computes in float32 (the node engine's learners)"
            for key in ("train_precision", "eval_precision"):
                if getattr(self, key) == "bfloat16":
                    problem((key,), why, "bfloat16")
        if self.node.rounds == 0 and any(v != "none" for v in self.compare_dp):
            problem(
                ("node", "rounds"),
                "compare_dp: a privacy budget needs a planned number of rounds; set rounds",
                0,
            )
        if self.node.topology_file is not None and set(self.compare) != {"partial-mesh"}:
            problem(
                ("node", "topology_file"),
                'a topology file applies to partial-mesh only; set compare = ["partial-mesh"]',
                str(self.node.topology_file),
            )
        ids = self.node_ids
        self._check_fault_nodes(problem)
        for i, partition in enumerate(self.network.partitions):
            try:
                resolve_groups(partition, ids)
            except ValueError as exc:
                problem(("network", "partitions", i, "groups"), str(exc), partition.groups)
        for table in ("stragglers", "byzantine"):
            count = getattr(self.faults, table).count
            if count is not None and count > self.nodes:
                problem(("faults", table, "count"), f"more than the {self.nodes} nodes", count)
        attacked = [a for a in self.attacks if a != "clean"]
        if attacked and not self.faults.byzantine_ids(ids, self.seed):
            problem(
                ("attacks",),
                "no node is Byzantine: set [faults.byzantine] count (or fraction)",
                list(self.attacks),
            )
        if not errors:
            self._check_schedules(problem)
        if errors:
            raise ValidationError.from_exception_data("scenario", errors)
        return self

    def _check_fault_nodes(
        self, problem: Callable[[tuple[str | int, ...], str, Any], None]
    ) -> None:
        """`[faults] crashes` and `pauses`: known nodes, and a pause that ends after it starts."""
        ids = self.node_ids
        scripted: list[tuple[str, Sequence[Crash | Pause]]] = [
            ("crashes", self.faults.crashes), ("pauses", self.faults.pauses),
        ]  # fmt: skip
        for table, entries in scripted:
            for i, entry in enumerate(entries):
                try:
                    resolve_node(entry.node, ids)
                except ValueError as exc:
                    problem(("faults", table, i, "node"), str(exc), entry.node)
        for i, pause in enumerate(self.faults.pauses):
            if pause.to_round <= pause.from_round:
                problem(
                    ("faults", "pauses", i, "to_round"), "must be after from_round", pause.to_round
                )

    def _check_schedules(self, problem: Callable[[tuple[str | int, ...], str, Any], None]) -> None:
        """Schedule-dependent rules (e.g. walkers) are NodeConfig's: check each schedule."""
        for schedule in self.compare:
            try:
                self.node_config(schedule, 0, self.node_ids[0])
            except ValidationError as exc:
                for err in exc.errors():
                    problem(
                        ("node", *err["loc"]),
                        f"{err['msg'].removeprefix('Value error, ')} (schedule {schedule})",
                        err.get("input"),
                    )
                return

    @property
    def node_ids(self) -> list[str]:
        """The nodes' ids, by index; sorted order is index order."""
        return [_node_id(i, self.nodes) for i in range(self.nodes)]

    @property
    def dilation(self) -> float:
        """How many times slower than on its own machine a simulated node's membership runs.

        The node engine runs every node's protocol, and with the GIL much of its training,
        on one event loop, so a round of N nodes lasts about N times as long as on N
        machines. Wall-clock membership timers (shuffles, heartbeats) would then fire about
        N times as often per round as in the network simulated, and past a hundred or so
        nodes their work would crowd out the rest (shuffles held about 40% of the GIL in a
        256-node profile). The engine stretches `shuffle_interval` and `presence_ttl` (a
        heartbeat is a third of it) by this factor: their ratios, so the protocol's
        behaviour, stay as configured, and per round a node does about the membership work
        it would do on its own machine. 1 up to :data:`REAL_TIME_NODES` nodes: small runs
        keep real time.
        """
        if self.time_dilation == "auto":
            return max(1.0, self.nodes / REAL_TIME_NODES)
        return float(self.time_dilation)

    @property
    def seed(self) -> int:
        """The run's seed (`node.seed`): data split, initial model, network and faults."""
        return self.node.seed

    def node_config(
        self,
        schedule: str,
        index: int,
        node_id: str,
        *,
        discovery: tuple[str, ...] = ("presence",),
        **extra: Any,
    ) -> NodeConfig:
        """The config of node `index` (id `node_id`) when running with `schedule`.

        Its partition of the dataset is `index` of `nodes`; `discovery` and `extra` (any other
        `NodeConfig` key, e.g. `peers` or `min_peers`) are the simulator's to choose.
        Raises pydantic's ValidationError when `extra` is invalid.
        """
        data = self.node.model_dump()
        data.update(
            id=node_id,
            schedule=schedule,
            num_partitions=self.nodes,
            partition_index=index,
            discovery=discovery,
            **extra,
        )
        return NodeConfig.model_validate(data)


def load_scenario(path: Path | None, overrides: Mapping[str, Any] | None = None) -> Scenario:
    """Read a scenario file (None: the built-in default), apply CLI overrides, validate.

    Overrides (None = not given): `nodes`; `engine`; `eval_precision`; `train_precision`;
    `kernels`;
    `schedule` (a name or a list; replaces `compare`); `merge` (replaces `compare_merges`
    too); `dp_epsilon` (replaces `compare_dp`); `seed` (replaces `seeds`); `seeds` (a list,
    or text "0,1,2"); `name`, `description`; any other key (`rounds`, ...) goes to `[node]`.
    Raises ConfigError with one line per problem, naming the key.
    """
    if path is None:
        data = tomllib.loads(DEFAULT_SCENARIO_TOML)
    else:
        data = read_toml(path)
        data.setdefault("name", path.stem)
    node = data.get("node", {})
    if isinstance(node, dict):
        node = {k.replace("-", "_"): v for k, v in node.items()}
        topology = node.get("topology_file")
        if path is not None and isinstance(topology, str) and not Path(topology).is_absolute():
            # Relative to the scenario file, so a scenario runs from any directory.
            node["topology_file"] = str(path.parent / topology)
        data["node"] = node
    return load_model(Scenario, data, overrides, apply=_override)


def _override(data: dict[str, Any], key: str, value: Any) -> None:
    """Place one `p2pfl sim` flag: most are keys of the `[node]` table."""
    if key == "merge":
        # As --schedule replaces compare: one merge rule replaces the list to compare.
        data.pop("compare_merges", None)
    if key == "dp_epsilon":
        data.pop("compare_dp", None)  # likewise, one DP budget
    if key == "seed":
        data.pop("seeds", None)  # and one seed
    if key == "schedule":
        data["compare"] = [value] if isinstance(value, str) else list(value)
    elif key in (
        "nodes", "engine", "name", "description", "compare", "seeds", "eval_precision",
        "train_precision", "kernels",
    ):  # fmt: skip
        data[key] = value
    else:
        if not isinstance(data.get("node"), dict):
            data["node"] = {}
        data["node"] = {**data["node"], key: value}
