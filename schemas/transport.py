"""Facts about a WebSocket address that both sides need: is the link private?

The shared token travels inside ``Hello``; over ``ws://`` it crosses the network
in clear. Both the server (at start) and the device (at connect) warn when that
happens anywhere but loopback, where no one else can read it.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

__all__ = ["clear_text_token_warning", "is_loopback"]


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and the loopback ranges (127.0.0.0/8, ::1)."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def clear_text_token_warning(url: str) -> str | None:
    """The warning to show when a token would be sent to ``url`` in clear, else None."""
    parts = urlsplit(url)
    if parts.scheme != "ws" or is_loopback(parts.hostname or ""):
        return None
    return (
        f"the token is sent in clear over {parts.scheme}:// to {parts.hostname}; "
        "serve with --tls-cert/--tls-key and connect with wss:// to keep it secret"
    )
