"""Reading a transport's messages in tests: a number of them, all within a time, or none."""

from __future__ import annotations

import asyncio
import contextlib

from p2pfl.transport.base import Message, Transport


async def receive(t: Transport, count: int = 1, within: float = 5.0) -> list[Message]:
    """The next `count` messages; TimeoutError if they do not all arrive `within` seconds."""
    out: list[Message] = []
    async with asyncio.timeout(within):
        async for message in t.messages():
            out.append(message)
            if len(out) == count:
                break
    return out


async def collect(t: Transport, seconds: float = 0.3) -> list[Message]:
    """Everything that arrives within `seconds`."""
    out: list[Message] = []
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            async for message in t.messages():
                out.append(message)
    return out


async def nothing_arrives(t: Transport, seconds: float = 0.3) -> bool:
    """Whether no message arrives within `seconds`."""
    try:
        async with asyncio.timeout(seconds):
            await anext(t.messages())
    except TimeoutError:
        return True
    return False
