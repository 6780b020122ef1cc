"""The directory the operator granted (``[grants] files = "DIR"``): write,
read, rename and remove files in it. Paths are relative to it; the host
refuses absolute paths, ``..`` and writes past the grant's quota. ``str``
data is written as UTF-8."""

from typing import Optional, Union

from wit_world.imports import files as _host

from . import _call

__all__ = ["append", "replace", "read", "read_text", "rename", "remove"]


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


def read(path: str) -> Optional[bytes]:
    """A file's contents; ``None`` when it does not exist.
    Raises :class:`watchgate.HostError` with the host's reason."""
    return _call(_host.read, path)


def read_text(path: str) -> Optional[str]:
    """A file's contents as UTF-8 text (undecodable bytes replaced);
    ``None`` when it does not exist."""
    data = read(path)
    return None if data is None else data.decode("utf-8", errors="replace")


def rename(src: str, dst: str) -> None:
    """Rename ``src`` over ``dst`` atomically, both inside the grant
    (render to a temporary name, check it, then put it in place).
    Raises :class:`watchgate.HostError` with the host's reason."""
    _call(_host.rename, src, dst)


def remove(path: str) -> None:
    """Remove a file; one that does not exist is not an error.
    Raises :class:`watchgate.HostError` with the host's reason."""
    _call(_host.remove, path)
