"""Write-only access to the directory the operator granted
(``[grants] files = "DIR"``). Paths are relative to it; the host refuses
absolute paths, ``..`` and writes past the grant's quota. ``str`` data is
written as UTF-8."""

from typing import Union

from wit_world.imports import files as _host

from . import _call

__all__ = ["append", "replace"]


def _bytes(data: Union[bytes, str]) -> bytes:
    return data.encode("utf-8") if isinstance(data, str) else bytes(data)


def append(path: str, data: Union[bytes, str]) -> None:
    """Append to a file, creating it and its parent directories.
    Raises :class:`watchgate.HostError` with the host's reason."""
    _call(_host.append, path, _bytes(data))


def replace(path: str, data: Union[bytes, str]) -> None:
    """Replace a file's contents atomically.
    Raises :class:`watchgate.HostError` with the host's reason."""
    _call(_host.replace, path, _bytes(data))
