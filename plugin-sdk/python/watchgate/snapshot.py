"""Read the gateway's current view of the keys the plugin subscribes to
(``[grants] snapshot = true``). Values may be newer than the event being
handled."""

from typing import List, Optional, Tuple

from wit_world.imports import snapshot as _host

from . import _call

__all__ = ["get", "scan"]


def get(source: str, key: str) -> Optional[bytes]:
    """The current value of ``key``; ``None`` when absent.
    Raises :class:`watchgate.HostError` when not granted or not subscribed."""
    return _call(_host.get, source, key)


def scan(source: str, prefix: str) -> List[Tuple[str, bytes]]:
    """Every present key under ``prefix`` in key order (at most 10,000).
    Raises :class:`watchgate.HostError`, naming the limit, past 4 MiB."""
    return _call(_host.scan, source, prefix)
