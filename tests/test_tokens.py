"""Walker token bookkeeping: when a designated node decides that a token was lost."""

from __future__ import annotations

from p2pfl.config import NodeConfig
from p2pfl.discovery.peerview import PeerInfo, PeerView
from p2pfl.inbox import Inbox, NodeCounters
from p2pfl.tokens import Tokens
from p2pfl.topology import initial_token_holders
from tests.helpers import FakeClock

IDS = ["a", "b", "c", "d"]
TIMEOUT = 30.0


def designated_tokens(clock: FakeClock) -> tuple[Tokens, PeerView]:
    """The tokens of the node that would regenerate the one walker, and its view."""
    (me,) = initial_token_holders(IDS, 1)
    config = NodeConfig.model_validate(
        {"id": me, "mode": "async", "walkers": 1, "token_timeout": TIMEOUT}
    )
    view = PeerView(me, ttl=1e9, clock=clock)
    for peer in IDS:
        view.upsert(PeerInfo(id=peer, role="trainer", broker="", source="presence", round=0))
    tokens = Tokens(
        config, Inbox(config, NodeCounters(), clock=clock), view, node_id=me, clock=clock
    )
    tokens.deal()
    tokens.holding = False  # it passed its first token on
    return tokens, view


def announce(view: PeerView, peer: str, round: int) -> None:
    view.upsert(PeerInfo(id=peer, role="trainer", broker="", source="presence", round=round))


def test_silence_for_the_timeout_means_the_token_was_lost() -> None:
    clock = FakeClock()
    tokens, _ = designated_tokens(clock)
    clock.now = TIMEOUT - 1
    assert not tokens.lost()
    clock.now = TIMEOUT + 1
    assert tokens.lost()


def test_rising_rounds_elsewhere_keep_a_wandering_token_alive() -> None:
    """A random walk may stay away from us for long; peers' rounds show that it still moves."""
    clock = FakeClock()
    tokens, view = designated_tokens(clock)
    other = next(p for p in IDS if p != tokens.node_id)
    for step in range(1, 6):
        clock.now = step * (TIMEOUT - 1)
        announce(view, other, step)  # its presence heartbeat carries the round it reached
        assert not tokens.lost(), step
    # The same round heard again is no sign: the token is gone after all.
    clock.now += TIMEOUT + 1
    announce(view, other, 5)
    assert tokens.lost()


def test_only_designated_nodes_regenerate() -> None:
    clock = FakeClock()
    tokens, _ = designated_tokens(clock)
    others = [p for p in IDS if p != tokens.node_id]
    config = tokens.config.model_copy(update={"id": others[0]})
    bystander = Tokens(
        config, tokens.inbox, PeerView(others[0], ttl=1e9, clock=clock), node_id=others[0],
        clock=clock,
    )  # fmt: skip
    for peer in IDS:
        announce(bystander.view, peer, 0)
    bystander.deal()
    assert not bystander.holding
    clock.now = 10 * TIMEOUT
    assert tokens.lost() and not bystander.lost()
