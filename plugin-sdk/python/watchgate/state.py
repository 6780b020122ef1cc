"""A small per-plugin key/value store owned by the host.

Values survive instance recycling (after a trap) and plugin replacement, so
this is where a plugin keeps what it must remember between events. Values
are bytes; ``str`` values are stored as UTF-8.
"""

from typing import Optional, Union

from wit_world.imports import state as _host

from . import _call

__all__ = ["get", "get_text", "set", "delete"]


def get(key: str) -> Optional[bytes]:
    """Read a value; ``None`` when the key is unset."""
    return _host.get(key)


def get_text(key: str) -> Optional[str]:
    """Read a value as UTF-8 text; ``None`` when unset (raises if not UTF-8)."""
    value = _host.get(key)
    return None if value is None else value.decode("utf-8")


def set(key: str, value: Optional[Union[bytes, str]]) -> None:  # noqa: A001 - mirrors the WIT name
    """Set a value, or remove it with ``None``.

    Raises :class:`watchgate.HostError` when the state quota would be
    exceeded or no room came before the call's deadline was near.
    """
    if isinstance(value, str):
        value = value.encode("utf-8")
    _call(_host.set, key, value)


def delete(key: str) -> None:
    """Remove a key (``set(key, None)``)."""
    _call(_host.set, key, None)
