"""The batched engine (`p2pfl sim --engine batched`): every node as a row of stacked tensors.

Where the node engine runs N real `Node`s, this one keeps N models of one architecture as one
`[N, P]` tensor (`p2pfl.simulation.stacked`) and plays sync rounds as the daemon's nodes do:

1. every live node trains its own shard (one `vmap`ped SGD step for all nodes at a time);
2. what each node sends: its model, or its Byzantine replacement (`p2pfl.simulation.attacks`);
3. who sends to whom: the daemon's schedule, `schedule.plan(own_id, live view, round)` per
   node; the network's loss and partitions (`LinkDelay`, the same draws) drop edges;
4. merges: each node merges its own model with what reached it (sorted by sender, as a sync
   node's inbox yields them), with the daemon's merge rule from `p2pfl.learning.merge`.
   For `average` that is one sparse mixing-matrix product over all nodes; any other rule is
   called per node on that node's received models (`clipped` keeps its state per node);
5. every live node is evaluated on the test set (at most `TEST_SAMPLES` of it, the same
   samples for every node and round) and reports a record, the same fields as the node
   engine's; in bfloat16 where the CPU computes it natively (scenario key `eval_precision`).

With `kernels = "per-node"` each node trains and is evaluated by its own learner, the node
engine's (`NodeLearners`), one model at a time, and `average` is the rule called per node:
steps 2-4 are then checked bit for bit against the node engine (the same records, without
crashes or network faults, which the node engine plays on its clock), which the stacked
arithmetic's float rounding hides.

Crashes and churn come from the same `FaultPlan`: a crashed node neither trains nor sends nor
receives, drops out of everyone's view (so the plans re-form without it), and comes back with
its last model and fresh optimizer state, as a daemon restarted from its checkpoint.

What it does not model is refused (`refusal`) before any work: async mode, walkers, DP,
secure aggregation, Adam, lossy codecs, runs without a number of rounds, a real broker, and
models `vmap` cannot take (buffers such as BatchNorm's). Latency, jitter, bandwidth and
stragglers change when things happen, not what a sync round computes, and are not modelled
(a straggler is as fast as the others); network partitions follow the run's wall clock, as in
the node engine, and this engine gets through rounds much faster.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from p2pfl.discovery import sampling
from p2pfl.learning.datasets import Dataset, load_dataset
from p2pfl.learning.merge import Merge, Weights, parse_merge
from p2pfl.learning.models import build_model
from p2pfl.learning.partition import partition
from p2pfl.learning.torch_learner import TorchLearner, learner_from_config
from p2pfl.protocol.model import encode_model
from p2pfl.simulation.attacks import alie, alie_z, flip_labels, ipm, poison
from p2pfl.simulation.engine import Record, ScheduleRun, node_ids
from p2pfl.simulation.network import LinkDelay
from p2pfl.simulation.scenario import Scenario
from p2pfl.simulation.stacked import (
    StackedModels,
    bfloat16_is_fast,
    keep_freed_memory,
    unbatchable,
)
from p2pfl.topology import PartialMesh, mesh_graph, node_schedule

__all__ = ["BATCHED_FROM", "BatchedSimulation", "engine_for", "model_refusal", "refusal"]

log = logging.getLogger(__name__)


def refusal(scenario: Scenario, *, broker: str | None = None, matrix: bool = False) -> str | None:
    """Why the batched engine cannot run `scenario` (one line), or None when it can.

    Checks the settings only; `model_refusal` checks the model once the data is loaded.
    """
    node = scenario.node
    reasons = [
        (
            node.mode != "sync",
            f'node.mode = {node.mode!r}: it runs sync rounds only (mode = "sync" under [node])',
        ),
        (node.walkers > 0, "node.walkers: it does not run walker tokens"),
        (
            node.dp_epsilon is not None or any(v != "none" for v in scenario.compare_dp),
            "node.dp_epsilon: it does not train with DP-SGD",
        ),
        (node.secure_aggregation, "node.secure_aggregation: it does not mask models"),
        (
            bool(scenario.faults.pauses) or scenario.faults.eligible_fraction < 1,
            "faults.pauses / faults.eligible_fraction: it does not pause nodes",
        ),
        (
            node.optimizer != "sgd",
            f'node.optimizer = {node.optimizer!r}: it trains with sgd only (optimizer = "sgd")',
        ),
        (
            node.codec != "raw",
            f'node.codec = {node.codec!r}: it sends models uncompressed only (codec = "raw")',
        ),
        (node.rounds == 0, "node.rounds: it needs a number of rounds (not a duration)"),
        (node.duration is not None, "node.duration: it stops after rounds, not seconds"),
        (broker is not None, "--broker: it runs in one process, on no bus"),
        (matrix, "--matrix (attacks, compare_merges, compare_dp): the bench runs the node engine"),
    ]
    for refused, why in reasons:
        if refused:
            return f"--engine batched cannot run this scenario: {why}; use --engine node"
    return None


def model_refusal(scenario: Scenario, dataset: Dataset) -> str | None:
    """Why the batched engine cannot train the scenario's model on `dataset` (one line)."""
    model = build_model(scenario.node.model, dataset.in_shape, dataset.n_classes, seed=0)
    why = unbatchable(model, dataset.in_shape, dataset.n_classes)
    if why is None:
        return None
    return f"--engine batched cannot train model {scenario.node.model!r}: {why}; use --engine node"


class BatchedSimulation:
    """Run a `Scenario` with the batched engine, once per schedule in its `compare` list."""

    def __init__(
        self,
        scenario: Scenario,
        *,
        on_record: Callable[[Record], None] | None = None,
        dataset: Dataset | None = None,
    ) -> None:
        self.scenario = scenario
        self.on_record = on_record
        self._dataset = dataset

    def run(self) -> list[ScheduleRun]:
        """Every schedule of the scenario, one after the other (ValueError: `refusal`)."""
        why = refusal(self.scenario)
        if why is not None:
            raise ValueError(why)
        node = self.scenario.node
        dataset = self._dataset or load_dataset(node.dataset, seed=node.seed)
        why = model_refusal(self.scenario, dataset)
        if why is not None:
            raise ValueError(why)
        return [
            _BatchedRun(self.scenario, schedule, dataset, self.on_record).run()
            for schedule in self.scenario.compare
        ]


class _BatchedRun:
    """One schedule's run: the stacked models, the per-node state, the round loop."""

    def __init__(
        self,
        scenario: Scenario,
        schedule: str,
        dataset: Dataset,
        on_record: Callable[[Record], None] | None,
        *,
        written_out: bool = True,
    ) -> None:
        """`written_out=False`: every model through `vmap` (`StackedModels`)."""
        self.scenario, self.on_record = scenario, on_record
        ids = self.ids = node_ids(scenario.nodes)
        self.position = {node_id: i for i, node_id in enumerate(ids)}
        config = self.config = scenario.node_config(schedule, 0, ids[0])
        seed = config.seed
        self.schedule = node_schedule(config)
        self.result = ScheduleRun(schedule)
        parts = partition(dataset.y_train, len(ids), config.partition, seed=seed)
        model = build_model(config.model, dataset.in_shape, dataset.n_classes, seed=config.seed)
        faults = scenario.faults
        self.attack = faults.byzantine
        self.byzantine = {self.position[b] for b in faults.byzantine_ids(ids, seed)}
        keep_freed_memory()
        self.models = self._models(schedule, dataset, parts, model, written_out)
        z = self.attack.z
        self.z = z if z is not None else alie_z(len(ids), len(self.byzantine))
        # Each node's batch order seeded as `learner_from_config` seeds its loader.
        seeds = [seed * 1000 + i for i in range(len(ids))]
        self.models.set_data(dataset.x_train, self._labels(dataset, parts), parts, seeds)
        tested = _test_subset(len(dataset.y_test), seed)
        self.x_test = torch.tensor(np.asarray(dataset.x_test[tested]))
        self.y_test = torch.tensor(np.asarray(dataset.y_test[tested]), dtype=torch.long)
        self.rngs = [np.random.default_rng(seed + i) for i in range(len(ids))]
        initial = self.models.flat[0].clone()
        self.stale = initial  # what a free rider re-sends: the first model it had
        start = self.models.weights(initial.numpy().copy())  # read by every rule, never written
        self.rules = [self._rule(start) for _ in ids]
        self.samples = np.array([len(p) for p in parts]) * config.local_epochs
        self.model_bytes = len(
            encode_model(
                self.models.weights(initial.numpy()), net=config.network, src=ids[0], seq=0,
                round=1, age=0.0, codec=config.codec,
            )
        )  # fmt: skip
        self.counters = {k: np.zeros(len(ids), dtype=np.int64)
                         for k in ("models_sent", "models_received", "bytes_sent")}  # fmt: skip
        self.restarts = np.zeros(len(ids), dtype=np.int64)
        crashes = faults.crash_events(ids, config.rounds, seed)
        self.crashes = [(self.position[str(c.node)], c) for c in crashes]
        self._mesh: tuple[list[str], dict[str, Sequence[str]]] | None = None
        self.back_at: dict[int, int | None] = {}  # down node -> round it comes back (None: never)
        self.started = time.monotonic()
        self.delay = (
            LinkDelay(scenario.network, node_of=lambda c: c, clock=self.elapsed, seed=seed,
                      nodes=ids)
            if scenario.network.active else None
        )  # fmt: skip

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def _models(
        self,
        schedule: str,
        dataset: Dataset,
        parts: list[np.ndarray],
        model: torch.nn.Module,
        written_out: bool,
    ) -> StackedModels:
        """The stacked models, or with `kernels = "per-node"` the node engine's learners."""
        scenario = self.scenario
        if scenario.kernels == "stacked":
            return StackedModels(
                model, len(self.ids), eval_dtype=eval_dtype(scenario), written_out=written_out,
                train_dtype=torch.bfloat16 if scenario.train_precision == "bfloat16" else None,
            )  # fmt: skip
        flipped = flip_labels(dataset) if self.attack.behaviour == "label-flip" else dataset

        def learner(i: int) -> TorchLearner:  # as the node engine builds node i's
            data = flipped if i in self.byzantine else dataset
            return learner_from_config(
                scenario.node_config(schedule, i, self.ids[i]), data, parts[i]
            )

        return NodeLearners(model, len(self.ids), learner)

    def _labels(self, dataset: Dataset, parts: list[np.ndarray]) -> np.ndarray:
        """The training labels as each sample's owner sees them: a label-flipping attacker's
        flipped (shards are disjoint, so one array holds them all)."""
        y = np.array(dataset.y_train)
        if self.byzantine and self.attack.behaviour == "label-flip":
            flipped = flip_labels(dataset).y_train
            for i in self.byzantine:
                y[parts[i]] = flipped[parts[i]]
        return y

    def _rule(self, start: Weights) -> Merge:
        """A node's merge rule, anchored at the model it starts from (clipped remembers it)."""
        rule = parse_merge(self.config.merge)
        rule.anchor(start)
        return rule

    # ---- the round loop --------------------------------------------------------------------------

    def run(self) -> ScheduleRun:
        for r in range(1, self.config.rounds + 1):
            self._come_back(r)
            self._round(r)
            self._go_down(r)
        self.result.wall_seconds = self.elapsed()
        self.result.dropped = dict(self.delay.stats) if self.delay is not None else {}
        return self.result

    def _round(self, r: int) -> None:
        started = time.perf_counter()
        live = [i for i in range(len(self.ids)) if i not in self.back_at]
        riders = self.byzantine if self.attack.behaviour == "free-rider" else set()
        training = [i for i in live if i not in riders]  # a free rider never trains
        c = self.config
        losses = self.models.fit(
            torch.tensor(training, dtype=torch.long), epochs=c.local_epochs,
            batch_size=c.batch_size, lr=c.lr, momentum=c.momentum, mu=c.mu,
            max_grad_norm=c.max_grad_norm,
        )  # fmt: skip
        fit_seconds = time.perf_counter() - started
        trained = set(training)
        sent = self._sent(live)
        inbound = self._deliver(live, r)
        merged = self._merge(live, sent, inbound)
        eval_started = time.perf_counter()
        nodes = torch.tensor(live, dtype=torch.long)
        accuracy, test_loss = self.models.evaluate(nodes, self.x_test, self.y_test)
        eval_seconds = time.perf_counter() - eval_started
        now, took = round(self.elapsed(), 4), time.perf_counter() - started
        for k, i in enumerate(live):
            record: Record = {
                "schedule": self.result.schedule,
                "node": self.ids[i],
                "round": r,
                "t": now,
                "accuracy": float(accuracy[k]),
                "test_loss": float(test_loss[k]),
                "train_loss": float(losses[i]),
                "merged": merged[i],
                **{name: int(values[i]) for name, values in self.counters.items()},
                "rejected": 0,
                "membership_received": 0,  # no presence traffic: membership is the engine's
                # the shared steps' time, split evenly between the nodes that took part
                "fit_seconds": fit_seconds / max(1, len(training)) if i in trained else 0.0,
                "eval_seconds": eval_seconds / len(live),
                "round_seconds": took,
                "honest": i not in self.byzantine,
                "restarts": int(self.restarts[i]),
                "epsilon": None,
            }
            self.result.records.append(record)
            if self.on_record is not None:
                self.on_record(record)

    def _sent(self, live: list[int]) -> torch.Tensor:
        """Every node's outgoing model this round: its own, or its Byzantine replacement."""
        sent = self.models.flat.clone()
        attackers = [i for i in live if i in self.byzantine]
        behaviour = self.attack.behaviour
        if not attackers or behaviour == "label-flip":
            return sent
        weights = self.models.weights
        honest_models: list[Weights] = []
        if behaviour in ("alie", "ipm"):  # omniscient: this round's trained honest models
            honest_models = [weights(sent[i].numpy()) for i in live if i not in self.byzantine]
        for i in attackers:
            own = weights(sent[i].numpy())
            if behaviour == "free-rider":
                bad = weights(self.stale.numpy())
            elif behaviour == "alie":
                bad = alie(honest_models, self.z, like=own)
            elif behaviour == "ipm":
                bad = ipm(honest_models, self.attack.epsilon, like=own)
            else:
                bad = poison(own, behaviour, scale=self.attack.scale, rng=self.rngs[i])
            sent[i] = self.models.row(bad)
        return sent

    def _deliver(self, live: list[int], r: int) -> dict[int, list[int]]:
        """Who receives whose round-r model: the schedule's plans over the live view, less the
        edges the network drops. Receivers map to sorted senders."""
        targets = self._targets([self.ids[i] for i in live], r)
        inbound: dict[int, list[int]] = {i: [] for i in live}
        for i in live:
            for target in targets[self.ids[i]]:
                j = self.position[target]
                self.counters["models_sent"][i] += 1
                self.counters["bytes_sent"][i] += self.model_bytes
                if self._lost(self.ids[i], target):
                    continue
                inbound[j].append(i)
                self.counters["models_received"][j] += 1
        return {j: sorted(senders) for j, senders in inbound.items()}

    def _lost(self, src: str, dst: str) -> bool:
        """Whether the network model drops this model on its way (loss, partition)."""
        return self.delay is not None and self.delay(src, dst, self.model_bytes) is None

    def _targets(self, view: list[str], r: int) -> dict[str, Sequence[str]]:
        """Each live node's `send_to` this round: `plan()` per node, or, for the seeded
        k-regular mesh, the one graph every node's plan reads (`mesh_graph`), built once per
        round instead of sorting the view once per node (minutes per round at 10,000 nodes)."""
        schedule = self.schedule
        if isinstance(schedule, PartialMesh) and schedule.sampled:  # the hashed rings
            if self._mesh is None or self._mesh[0] != view:
                rings = sampling.mesh_adjacency(view, schedule.degree, schedule.seed)
                self._mesh = (view, dict(rings))
            return self._mesh[1]
        if isinstance(schedule, PartialMesh) and schedule.graph is None:
            graph = mesh_graph(view, schedule.degree, schedule.seed, r)
            return {node: sorted(graph.neighbors(node)) for node in view}
        return {node: schedule.plan(node, view, r).send_to for node in view}

    def _merge(
        self, live: list[int], sent: torch.Tensor, inbound: dict[int, list[int]]
    ) -> dict[int, int]:
        """Merge each live node's (sent) model with what reached it; how many each merged.

        A node that received nothing keeps what it trained, as a daemon's node does.
        """
        receivers = [i for i in live if inbound[i]]
        # Per-node kernels merge per node too: the mixing matrix sums in float32, the rule
        # (`merge.average`) in float64.
        mixed_at_once = self.rules[0].name == "average" and self.scenario.kernels == "stacked"
        if receivers and mixed_at_once:
            # Row k: receiver k's own model and each received one, weighted equally.
            rows, cols, values = [], [], []
            for k, i in enumerate(receivers):
                share = 1.0 / (len(inbound[i]) + 1)
                for j in (i, *inbound[i]):
                    rows.append(k)
                    cols.append(j)
                    values.append(share)
            mixing = torch.sparse_coo_tensor(
                torch.tensor([rows, cols]), torch.tensor(values, dtype=torch.float32),
                (len(receivers), len(self.ids)), check_invariants=False,
            )  # fmt: skip
            # float32 (merge.average sums in float64): at 10,000 nodes a float64 copy of every
            # model costs 2.4 GB, for differences in the 7th digit of a mean of a few models.
            mixed = torch.sparse.mm(mixing, sent)
            self.models.flat[torch.tensor(receivers)] = mixed
        elif receivers:
            array = sent.numpy()
            weights = self.models.weights
            for i in receivers:
                models = [weights(array[i]), *(weights(array[j]) for j in inbound[i])]
                ages = [float(self.samples[i]), *(float(self.samples[j]) for j in inbound[i])]
                senders = [self.ids[j] for j in inbound[i]]
                self.models.flat[i] = self.models.row(self.rules[i](models, ages, senders=senders))
        return {i: len(inbound[i]) for i in live}

    # ---- crashes -----------------------------------------------------------------------------

    def _go_down(self, r: int) -> None:
        """Nodes whose crash is planned after round `r` go down until their restart round."""
        for i, crash in self.crashes:
            if crash.at_round == r and i not in self.back_at:
                after = crash.restart_after_rounds
                self.back_at[i] = None if after is None else r + after + 1
                log.info("crashed node=%s round=%d", self.ids[i], r)

    def _come_back(self, r: int) -> None:
        """Down nodes due at round `r` restart from their last model with fresh SGD state."""
        for i, due in list(self.back_at.items()):
            if due is not None and due <= r:
                del self.back_at[i]
                self.restarts[i] += 1
                self.models.momentum[i] = 0.0
                self.models.reseed(i)
                self.rules[i] = self._rule(self.models.weights(self.models.flat[i].numpy().copy()))


class NodeLearners(StackedModels):
    """`kernels = "per-node"`: the rows of `flat` are still the models the batched engine
    sends and merges, but each node trains and is evaluated by its own `TorchLearner`, built
    as the node engine builds it (same loader seed, SGD state kept across rounds, a fresh one
    on a restart), on the worker threads one node at a time. So a round computes what the node
    engine's nodes compute, bit for bit. `fit`'s hyperparameters are the learners' own (from
    the same node config); `evaluate` tests on each learner's own test set (the whole one)."""

    def __init__(self, model: torch.nn.Module, n: int, learner: Callable[[int], TorchLearner]):
        super().__init__(model, n, written_out=False)
        self._learner = learner
        self.learners = [learner(i) for i in range(n)]

    def fit(self, nodes: torch.Tensor, **_hyper: Any) -> torch.Tensor:
        def one(i: int) -> float:
            learner = self._loaded(i)
            loss = learner.fit().loss
            self.flat[i] = self.row(learner.get_weights())
            return loss

        order = nodes.tolist()
        losses = torch.full((self.n,), float("nan"), dtype=torch.float64)
        losses[order] = torch.tensor(self._map(one, order), dtype=torch.float64)
        return losses

    def evaluate(
        self, nodes: torch.Tensor, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        def one(i: int) -> tuple[float, float]:
            result = self._loaded(i).evaluate()
            return result.accuracy, result.loss

        done = self._map(one, nodes.tolist())
        accuracy = torch.tensor([a for a, _ in done], dtype=torch.float64)
        return accuracy, torch.tensor([loss for _, loss in done], dtype=torch.float64)

    def _loaded(self, i: int) -> TorchLearner:
        """Node `i`'s learner holding its row of `flat` (merges change the rows)."""
        learner = self.learners[i]
        learner.set_weights(self.weights(self.flat[i].numpy()))
        return learner

    def reseed(self, i: int) -> None:
        """A restarted node: a new learner (fresh SGD state, its loader's order from the start)."""
        super().reseed(i)
        self.learners[i] = self._learner(i)


def _test_subset(n: int, seed: int) -> np.ndarray:
    """The test samples every node is evaluated on: all, or `TEST_SAMPLES` drawn once."""
    if n <= TEST_SAMPLES:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, TEST_SAMPLES, replace=False))


def eval_dtype(scenario: Scenario) -> torch.dtype:
    """What the batched engine evaluates in: the scenario's `eval_precision`, "auto" being
    bfloat16 where the CPU computes it natively (`bfloat16_is_fast`)."""
    precision = scenario.eval_precision
    if precision == "auto":
        precision = "bfloat16" if bfloat16_is_fast() else "float32"
    return torch.bfloat16 if precision == "bfloat16" else torch.float32


def engine_for(scenario: Scenario, **context: Any) -> str:
    """The engine a scenario runs with: its `engine` key, else `batched` from
    `BATCHED_FROM` nodes when the batched engine can run it, else `node`."""
    if scenario.engine is not None:
        return scenario.engine
    if scenario.nodes >= BATCHED_FROM and refusal(scenario, **context) is None:
        return "batched"
    return "node"


TEST_SAMPLES = 1000
"""At most this many test samples per evaluation (MNIST-1D's default test set is 1,000): with
thousands of nodes and a test set grown with `mnist1d:N`, evaluating every node on all of it
would cost many times the training; a fixed subset keeps the mean accuracy unbiased."""

BATCHED_FROM = 128
"""From this many nodes the batched engine is the default (when it can run the scenario)."""
