"""NetworkState and the global metrics: hand-computed confusion matrices, liveness on a fake
clock, ordering of records that arrive late, twice, or replayed from the retained store."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfl.discovery.presence import PresenceRecord
from p2pfl.monitor import metrics
from p2pfl.monitor.state import DEFAULT_STALE, MIN_STALE, NetworkState
from tests.helpers import MonitorClock


def make_state(**kwargs: Any) -> tuple[NetworkState, MonitorClock]:
    clock = MonitorClock()
    return NetworkState("net", clock=clock.mono, wall=clock.wall, **kwargs), clock


def body(node_id: str, **fields: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"id": node_id, "role": "trainer", "round": 1, "broker": "mqtt://h:1"}
    out.update(fields)
    return out


def online(node_id: str, role: str = "trainer") -> PresenceRecord:
    return PresenceRecord(node_id, online=True, role=role, broker="mqtt://127.0.0.1:1883")


def offline(node_id: str) -> PresenceRecord:
    return PresenceRecord(node_id, online=False, graceful=True)


# ---- global metrics ------------------------------------------------------------------------


def test_global_accuracy_and_macro_f1_from_the_summed_confusion_matrices() -> None:
    state, clock = make_state()
    matrices = {"a": [[3, 1], [0, 4]], "b": [[2, 0], [1, 1]], "c": [[5]]}
    for node_id, confusion in matrices.items():
        state.on_telemetry(node_id, body(node_id, confusion=confusion), sent_at=clock.wall())
    g = state.global_metrics()
    # Sum (c padded to 2x2): [[10, 1], [1, 5]]; 15 right out of 17.
    assert g.accuracy == pytest.approx(15 / 17)
    # Class 0: tp 10, support 11, predicted 11; class 1: tp 5, support 6, predicted 6.
    assert g.macro_f1 == pytest.approx((20 / 22 + 10 / 12) / 2)
    assert (g.nodes, g.stale, g.samples) == (3, 0, 17)


def test_macro_f1_leaves_out_classes_never_seen_nor_predicted() -> None:
    confusion = np.array([[4, 0, 0], [2, 2, 0], [0, 0, 0]])
    # Class 0: 2*4/(4+6); class 1: 2*2/(4+2); class 2 absent from both axes.
    assert metrics.macro_f1(confusion) == pytest.approx((8 / 10 + 4 / 6) / 2)
    # A class predicted but never true still counts (F1 = 0 for it).
    assert metrics.macro_f1(np.array([[0, 1], [0, 0]])) == 0.0
    assert metrics.macro_f1(np.zeros((3, 3), dtype=np.int64)) is None
    assert metrics.accuracy(np.zeros((2, 2), dtype=np.int64)) is None


def test_divergence_is_the_mean_pairwise_distance() -> None:
    assert metrics.divergence([[0, 0], [3, 4], [0, 8]]) == pytest.approx((5 + 8 + 5) / 3)
    assert metrics.divergence([[1.0, 2.0]]) is None
    state, clock = make_state()
    for node_id, projection in (("a", [0.0, 0.0]), ("b", [3.0, 4.0]), ("c", [1.0, 2.0, 3.0])):
        state.on_telemetry(node_id, body(node_id, projection=projection), sent_at=clock.wall())
    # c's sketch has another size: not comparable, left out.
    assert state.global_metrics().divergence == pytest.approx(5.0)


matrices = st.integers(2, 5).flatmap(
    lambda n: st.lists(
        st.lists(st.lists(st.integers(0, 50), min_size=n, max_size=n), min_size=n, max_size=n),
        min_size=1,
        max_size=4,
    )
)


@settings(max_examples=60, deadline=None)
@given(matrices)
def test_global_metrics_match_a_direct_computation(per_node: list[list[list[int]]]) -> None:
    state, clock = make_state()
    for i, confusion in enumerate(per_node):
        state.on_telemetry(f"n{i}", body(f"n{i}", confusion=confusion), sent_at=clock.wall())
    g = state.global_metrics()
    total = np.sum(np.array(per_node), axis=0)
    correct = sum(sum(m[k][k] for k in range(len(m))) for m in per_node)
    count = sum(sum(map(sum, m)) for m in per_node)
    if count == 0:
        assert g.accuracy is None and g.macro_f1 is None
        return
    assert g.accuracy == pytest.approx(correct / count)
    f1s = []
    for k in range(total.shape[0]):
        tp, true, pred = total[k, k], total[k].sum(), total[:, k].sum()
        if true == 0 and pred == 0:
            continue
        precision = tp / pred if pred else 0.0
        recall = tp / true if true else 0.0
        f1s.append(
            0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
        )
    assert g.macro_f1 is not None and 0.0 <= g.macro_f1 <= 1.0
    assert g.macro_f1 == pytest.approx(sum(f1s) / len(f1s))


# ---- liveness -------------------------------------------------------------------------------


def test_a_silent_node_turns_stale_then_is_forgotten() -> None:
    state, clock = make_state(stale_after=3.0, forget_after=10.0)
    state.on_telemetry("a", body("a", confusion=[[1, 0], [0, 1]]), sent_at=clock.wall())
    state.on_telemetry("b", body("b", confusion=[[0, 1], [1, 0]]), sent_at=clock.wall())
    assert state.global_metrics().accuracy == 0.5
    clock.t = 2.0
    state.on_telemetry("b", body("b", confusion=[[0, 1], [1, 0]]), sent_at=clock.wall())
    clock.t = 4.0
    nodes = {n["id"]: n for n in state.snapshot()["nodes"]}
    assert nodes["a"]["stale"] and not nodes["b"]["stale"]
    assert nodes["a"]["last_seen_s"] == 4.0
    g = state.global_metrics()
    assert (g.accuracy, g.nodes, g.stale) == (0.0, 1, 1)  # a's matrix is no longer counted
    clock.t = 10.5
    assert state.expire() == ["a"]
    assert [n["id"] for n in state.snapshot()["nodes"]] == ["b"]


def test_stale_after_adapts_to_the_observed_telemetry_interval() -> None:
    state, clock = make_state()
    state.on_telemetry("a", body("a"), sent_at=clock.wall())
    node = state.get("a")
    assert node is not None and state.stale_after_for(node) == DEFAULT_STALE
    for t in (2.0, 4.0, 6.0):
        clock.t = t
        state.on_telemetry("a", body("a"), sent_at=clock.wall())
    assert state.stale_after_for(node) == pytest.approx(6.0)  # three intervals of 2 s
    state.on_telemetry("a", body("a"), sent_at=clock.wall() + 0.1)
    assert state.stale_after_for(node) >= MIN_STALE


def test_a_crash_marks_the_node_stale_at_once_and_a_bye_removes_it() -> None:
    state, clock = make_state(forget_after=30.0)
    started = clock.wall()
    clock.t = 5.0
    for node_id in ("a", "b"):
        state.on_presence(online(node_id), sent_at=clock.wall())
        state.on_telemetry(node_id, body(node_id), sent_at=clock.wall())
    # a's will was written when it connected, before its latest news: a crash.
    state.on_presence(offline("a"), sent_at=started)
    # b's bye is sent after everything else it published.
    state.on_presence(offline("b"), sent_at=clock.wall() + 1)
    snap = state.snapshot()
    assert [(n["id"], n["stale"], n["offline"]) for n in snap["nodes"]] == [("a", True, True)]
    # A record published before it crashed, arriving late through another broker: still down.
    state.on_telemetry("a", body("a", round=9), sent_at=clock.wall() - 0.5)
    assert state.snapshot()["nodes"][0]["offline"] is True
    # b's last report replayed from the retained store does not bring it back.
    assert not state.on_telemetry("b", body("b"), sent_at=clock.wall(), retained=True)
    clock.t = 36.0
    assert state.snapshot()["nodes"] == []
    # A restarted node is back with its first new record.
    state.on_telemetry("a", body("a", round=10), sent_at=clock.wall())
    assert [(n["id"], n["stale"], n["round"]) for n in state.snapshot()["nodes"]] == [
        ("a", False, 10)
    ]


def test_retained_records_are_aged_by_their_timestamp() -> None:
    state, clock = make_state(stale_after=5.0, forget_after=60.0)
    clock.t = 100.0
    assert not state.on_telemetry("old", body("old"), sent_at=clock.wall() - 61, retained=True)
    assert state.on_telemetry("dead", body("dead"), sent_at=clock.wall() - 20, retained=True)
    assert state.on_telemetry("live", body("live"), sent_at=clock.wall() - 1, retained=True)
    nodes = {n["id"]: n for n in state.snapshot()["nodes"]}
    assert set(nodes) == {"dead", "live"}
    assert nodes["dead"]["stale"] and nodes["dead"]["last_seen_s"] == pytest.approx(20.0)
    assert not nodes["live"]["stale"]
    # A live record is "now" whatever the sender's clock says (clocks of machines differ).
    assert state.on_telemetry("skewed", body("skewed"), sent_at=clock.wall() - 3600)
    assert not state.snapshot()["nodes"][-1]["stale"]


def test_the_same_report_through_two_brokers_counts_once_and_older_ones_never_win() -> None:
    state, clock = make_state()
    assert state.on_telemetry("a", body("a", round=5), sent_at=clock.wall())
    assert not state.on_telemetry("a", body("a", round=5), sent_at=clock.wall())
    assert not state.on_telemetry("a", body("a", round=4), sent_at=clock.wall() - 1)
    assert state.snapshot()["nodes"][0]["round"] == 5


def test_presence_alone_makes_a_node_known_and_monitors_are_not_nodes() -> None:
    state, clock = make_state()
    assert state.on_presence(online("a"), sent_at=clock.wall())
    assert not state.on_presence(online("m", role="monitor"), sent_at=clock.wall())
    assert not state.on_telemetry("m", body("m", role="monitor"), sent_at=clock.wall())
    (node,) = state.snapshot()["nodes"]
    assert (node["id"], node["accuracy"], node["broker"]) == ("a", None, "mqtt://127.0.0.1:1883")


# ---- records --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        {"confusion": [[1, 2], [3]]},
        {"confusion": [[1, -2], [3, 4]]},
        {"confusion": "nope"},
        {"round": -1},
        {"round": "3"},
        {"peers": ["a/b"]},
        {"projection": [1.0, float("nan")]},
        {"rejected": {"x": -1}},
        {"id": "someone-else"},
        {"accuracy": True},
        {"epsilon": -0.5},
        {"epsilon": "8"},
    ],
)
def test_a_bad_telemetry_body_is_rejected_and_counted(bad: dict[str, Any]) -> None:
    state, clock = make_state()
    assert not state.on_telemetry("a", body("a", **bad), sent_at=clock.wall())
    assert "a" not in state
    assert state.snapshot()["rejected"] == {"telemetry": 1}


def test_snapshot_is_plain_json_with_the_documented_keys() -> None:
    state, clock = make_state()
    state.on_telemetry(
        "a",
        body(
            "a",
            loss=float("nan"),  # a diverged loss is shown as unknown, never as NaN
            accuracy=0.75,
            confusion=[[3, 1], [0, 0]],
            models_sent=4,
            models_received=3,
            bytes_out=1000,
            bytes_in=900,
            cpu=12.5,
            rss=1 << 20,
            peers=["b", "c"],
            sent_to=["b"],
            projection=[0.5] * 32,
            rejected={"stale": 2, "digest": 1},
            epsilon=2.5,
        ),
        sent_at=clock.wall(),
    )
    state.on_telemetry("b", body("b", sent_to=["a", "c"]), sent_at=clock.wall())
    for i in range(30):
        log = {"level": "warning", "logger": "p2pfl.node", "msg": f"m{i}\x1b[2J", "time": 1.0}
        state.on_log("a", log, sent_at=clock.wall())
    snap = json.loads(json.dumps(state.snapshot(log_lines=5), allow_nan=False))
    assert set(snap) >= {"time", "network", "nodes", "global", "overlay", "logs"}
    assert set(snap["global"]) >= {"accuracy", "macro_f1", "divergence", "nodes", "stale"}
    a = snap["nodes"][0]
    expected = {"id": "a", "round": 1, "accuracy": 0.75, "loss": None, "peers": 2,
                "models_sent": 4, "models_received": 3, "bytes_in": 900, "bytes_out": 1000,
                "cpu": 12.5, "rss": 1 << 20, "stale": False, "sent_to": ["b"], "rejected": 3,
                "confusion": [[3, 1], [0, 0]], "epsilon": 2.5}  # fmt: skip
    assert {k: a[k] for k in expected} == expected
    assert snap["nodes"][1]["epsilon"] is None  # a node without DP
    assert snap["overlay"] == [["a", "b"], ["b", "a"], ["b", "c"]]
    assert [line["msg"] for line in snap["logs"]] == [f"m{i} [2J" for i in range(25, 30)]
    # Class 0: F1 = 6/7; class 1 is predicted once, never true: F1 = 0.
    assert snap["global"]["accuracy"] == 0.75 and math.isclose(snap["global"]["macro_f1"], 3 / 7)


def test_a_confusion_matrix_counting_more_than_a_node_can_evaluate_is_refused() -> None:
    from p2pfl.monitor.records import MAX_EVAL_SAMPLES, parse_telemetry
    from p2pfl.protocol.errors import ProtocolError

    ghost = [[10**9 if r == c else 0 for c in range(10)] for r in range(10)]  # "perfect"
    with pytest.raises(ProtocolError, match="exceed what a node can evaluate"):
        parse_telemetry("ghost", body("ghost", confusion=ghost))
    fits = [[MAX_EVAL_SAMPLES // 2, 0], [0, MAX_EVAL_SAMPLES // 2]]
    assert parse_telemetry("n1", body("n1", confusion=fits)).confusion is not None
