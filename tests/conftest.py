"""Shared fixtures: real MQTT brokers on free loopback ports, and a condition waiter."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from p2pfl.learning.datasets import Dataset
from p2pfl.transport.base import LocalBroker
from p2pfl.transport.embedded import EmbeddedBroker
from p2pfl.transport.mosquitto import MosquittoBroker, find_mosquitto
from tests import helpers

BROKER_KINDS = ("mosquitto", "embedded")

WaitUntil = Callable[..., Awaitable[None]]
MakeBroker = Callable[[str], LocalBroker]


def _new_broker(kind: str) -> LocalBroker:
    if kind == "mosquitto":
        if find_mosquitto() is None:
            pytest.skip("mosquitto binary not found (apt install mosquitto)")
        return MosquittoBroker("127.0.0.1", 0)
    if kind == "embedded":
        return EmbeddedBroker("127.0.0.1", 0)
    raise ValueError(f"unknown broker kind {kind!r}")


@pytest.fixture
def make_broker() -> Iterator[MakeBroker]:
    """Factory: `make_broker("mosquitto" | "embedded")` starts a broker, closed after the test."""
    started: list[LocalBroker] = []

    def make(kind: str) -> LocalBroker:
        broker = _new_broker(kind)
        broker.start()
        started.append(broker)
        return broker

    yield make
    for broker in reversed(started):
        broker.close()


@pytest.fixture
def mosquitto(make_broker: MakeBroker) -> LocalBroker:
    """A private Mosquitto on a free 127.0.0.1 port (skips when mosquitto is not installed)."""
    return make_broker("mosquitto")


@pytest.fixture
def embedded_broker(make_broker: MakeBroker) -> LocalBroker:
    """An in-process amqtt broker on its own thread, on a free 127.0.0.1 port."""
    return make_broker("embedded")


@pytest.fixture(params=BROKER_KINDS)
def broker(request: pytest.FixtureRequest, make_broker: MakeBroker) -> LocalBroker:
    """Each test using it runs once against Mosquitto and once against the embedded broker."""
    return make_broker(request.param)


@pytest.fixture
def wait_until() -> WaitUntil:
    """`await wait_until(lambda: cond, within=5)` polls; AssertionError if it stays false."""
    return helpers.wait_until


@pytest.fixture(scope="module")
def blobs() -> Dataset:
    """Three Gaussian blobs in 8 dimensions: learnable in a few steps."""
    rng = np.random.default_rng(0)
    centers = rng.normal(scale=3.0, size=(3, 8))

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 3, size=n)
        return (centers[y] + rng.normal(size=(n, 8))).astype(np.float32), y.astype(np.int64)

    x_train, y_train = draw(120)
    x_test, y_test = draw(45)
    return Dataset("blobs", x_train, y_train, x_test, y_test, 3)


@pytest.fixture(scope="session")
def default_sim(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """`p2pfl sim` with no arguments (the built-in scenario, the node engine), run once for the
    slow tests that read it: its stdout and its output folder."""
    cwd = tmp_path_factory.mktemp("default-sim")
    result = subprocess.run(
        [sys.executable, "-m", "p2pfl", "sim"], capture_output=True, text=True, cwd=cwd,
        timeout=1700,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout, cwd / "p2pfl-sim"
