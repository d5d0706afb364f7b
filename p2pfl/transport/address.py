"""Broker addresses: `mqtt://host:port` and `mqtts://host:port`, parsed once at the edge."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    """Where a broker listens; `tls` for `mqtts://`."""

    host: str
    port: int
    tls: bool = False

    @property
    def uri(self) -> str:
        """The canonical URI, e.g. `mqtt://127.0.0.1:1883` or `mqtts://[::1]:8883`."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'mqtts' if self.tls else 'mqtt'}://{host}:{self.port}"

    def __str__(self) -> str:
        return self.uri


@dataclass(frozen=True, slots=True)
class TlsOptions:
    """TLS files for `mqtts://` brokers: CA bundle (None = system CAs), client cert and key."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("TLS client cert and key must be given together")


def parse_broker_uri(uri: str) -> BrokerAddress:
    """Parse `mqtt://host[:port]` or `mqtts://host[:port]`; ValueError says what is wrong."""
    if not isinstance(uri, str) or not uri.strip():
        raise ValueError(f"broker URI must be a non-empty string, got {uri!r}")
    text = uri.strip()
    if "://" not in text:
        raise ValueError(f"broker URI {uri!r} has no scheme: write mqtt://{text} or mqtts://{text}")
    try:
        parts = urlsplit(text)
    except ValueError as exc:
        raise ValueError(f"broker URI {uri!r} is malformed: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise ValueError(f"broker URI {uri!r} has scheme {parts.scheme!r}: use mqtt:// or mqtts://")
    if parts.username is not None or parts.password is not None:
        raise ValueError(
            f"broker URI {uri!r} contains credentials: give the username and password "
            "in the configuration, not in the URI (URIs are advertised to peers)"
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"broker URI {uri!r} must be scheme://host:port, with no path or query")
    host = parts.hostname
    if not host:
        raise ValueError(f"broker URI {uri!r} has no host")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"broker URI {uri!r} has an invalid port (expected 1-65535)") from None
    if port is None:
        if parts.netloc.endswith(":"):
            raise ValueError(f"broker URI {uri!r} has an empty port")
        port = DEFAULT_PORTS[scheme]
    if not 1 <= port <= 65535:
        raise ValueError(f"broker URI {uri!r} has an invalid port {port} (expected 1-65535)")
    return BrokerAddress(host=host, port=port, tls=scheme == "mqtts")
