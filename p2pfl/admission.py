"""Whose models a node's inbox takes, and what it keeps of a peer that leaves its view.

Only peers of the view steer a node: they alone get models merged, and what is kept for a peer
goes when it leaves.
"""

from __future__ import annotations

from collections import OrderedDict

from p2pfl.config import NodeConfig
from p2pfl.discovery.membership import Membership
from p2pfl.discovery.peerview import PeerInfo, PeerView
from p2pfl.inbox import Inbox


class Admission:
    """The inbox's `admitted` check and the view's `on_leave`, for one node."""

    def __init__(
        self, config: NodeConfig, view: PeerView, membership: Membership, inbox: Inbox
    ) -> None:
        self.config, self.view, self.membership, self.inbox = config, view, membership, inbox
        # A sampled network: trainers that sent us models though not in our view (a random
        # walk's pick from theirs), the least recently heard forgotten beyond max_peers.
        self.contacts: OrderedDict[str, None] = OrderedDict()

    def admits(self, src: str) -> bool:
        """Whether the inbox may take a model from `src`: a trainer of the view, or a peer
        whose verified presence is being dialled (its first model would race its admission).
        A message of a peer of the view proves it alive, as its presence does."""
        info = self.view.get(src)
        if info is not None:
            self.view.touch(src)
            return info.role == "trainer"
        if self.membership.sampled:
            self.membership.hint(src)
            self.contacts[src] = None
            self.contacts.move_to_end(src)
            while len(self.contacts) > self.config.max_peers:
                gone, _ = self.contacts.popitem(last=False)
                if gone not in self.view:
                    self.inbox.forget(gone)
            return True
        return self.membership.pending(src)

    def peer_left(self, info: PeerInfo) -> None:
        """Drop what is kept for a peer that left the view (`PeerView.on_leave`)."""
        # Its buffered models stay when it finished its rounds (sync rounds up to its last
        # count on them), and with walkers: a token that reached us is ours to carry on.
        # A sampled view swaps members all the time: a model that came stays for the merge.
        keep = (
            info.id in self.membership.finished
            or self.config.walkers > 0
            or self.membership.sampled
        )
        self.inbox.forget(info.id, models=not keep)
        self.membership.forget(info)
