"""Write back into a source that supports writes (etcd), under the prefixes
granted with ``[grants] kv``. Writes are queued and performed by the host in
order, with retries; returning means the write was accepted."""

from typing import Union

from wit_world.imports import kv as _host

from . import _call

__all__ = ["put", "delete"]


def put(source: str, key: str, value: Union[bytes, str]) -> None:
    """Set ``key`` to ``value`` in ``source`` (``str`` as UTF-8).
    Raises :class:`watchgate.HostError` with the host's reason."""
    if isinstance(value, str):
        value = value.encode("utf-8")
    _call(_host.put, source, key, bytes(value))


def delete(source: str, key: str) -> None:
    """Remove ``key`` from ``source``.
    Raises :class:`watchgate.HostError` with the host's reason."""
    _call(_host.delete, source, key)
