"""The one exception type that decoding a peer's message may raise."""


class ProtocolError(ValueError):
    """A message from a peer is malformed, oversized, or inconsistent with the local model.

    ``reason`` is a short readable sentence suitable for a log line; the node counts and logs it
    once per peer and drops the message.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
