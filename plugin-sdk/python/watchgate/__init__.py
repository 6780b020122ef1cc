"""Write watchgate plugins in Python.

A plugin is a subclass of :class:`Plugin` with a ``handle(event)`` method,
exported from the plugin's ``app.py`` as ``WitWorld``::

    import watchgate
    from watchgate import log

    MANIFEST = '''
    name = "echo"
    version = "0.1.0"
    '''

    class Echo(watchgate.Plugin):
        def handle(self, event):
            log.info(f"{event.source} {event.key} = {event.text()}")

    WitWorld = watchgate.export(Echo)

componentize-py turns that module into a WebAssembly component of the world
``watchgate:plugin/plugin``; ``plugin-sdk/python/build.py`` does that and
stores ``MANIFEST`` in the component's ``watchgate-manifest`` section.

This module owns the mapping between the bindings componentize-py generates
(``wit_world``) and a Python API; limits, grants and retries belong to the
host. An exception raised by ``handle`` becomes the call's error string, so
the gateway counts it, retries the event and finally dead-letters it.
``MemoryError`` is not caught: it traps the instance, which the host
replaces and reports as a memory failure, since a heap that ran out cannot
be trusted for the next event.
"""

from __future__ import annotations

import enum
import traceback
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from wit_world.imports import types as _types
from componentize_py_types import Err as _Err

__all__ = [
    "Event",
    "EventKind",
    "Plugin",
    "PluginError",
    "HostError",
    "BatchError",
    "export",
    "error_message",
    "log",
    "state",
    "settings",
    "files",
    "http",
    "kv",
    "snapshot",
    "commands",
]


class EventKind(str, enum.Enum):
    """What happened to a key; compares equal to ``"put"`` / ``"delete"``."""

    PUT = "put"
    DELETE = "delete"

    def __str__(self) -> str:
        return self.value


@dataclass
class Event:
    """One change of one key in one source."""

    #: Name of the source in the gateway config (``[[source]] name``).
    source: str
    #: Put or delete.
    kind: EventKind
    #: The key, relative to the source.
    key: str
    #: The new value; ``None`` on delete.
    value: Optional[bytes] = None
    #: The value before this change, when the source knows it.
    prev_value: Optional[bytes] = None
    #: The source's revision of this change; never decreases per key.
    revision: int = 0
    #: True when a relist synthesized the event rather than a change.
    resync: bool = False
    #: How many further changes of this key were folded into this one.
    coalesced: int = 0
    #: Source-specific extras, in the order the source gave them.
    metadata: List[Tuple[str, str]] = field(default_factory=list)

    @property
    def is_put(self) -> bool:
        return self.kind is EventKind.PUT

    @property
    def is_delete(self) -> bool:
        return self.kind is EventKind.DELETE

    def text(self) -> Optional[str]:
        """The new value as UTF-8 text; ``None`` on delete or when not UTF-8."""
        return _utf8(self.value)

    def prev_text(self) -> Optional[str]:
        """The previous value as UTF-8 text; ``None`` when unknown or not UTF-8."""
        return _utf8(self.prev_value)

    def meta(self, name: str) -> Optional[str]:
        """The first metadata value stored under ``name``."""
        for k, v in self.metadata:
            if k == name:
                return v
        return None

    @classmethod
    def _from_wit(cls, e: "_types.Event") -> "Event":
        return cls(
            source=e.source,
            kind=EventKind.PUT if e.kind == _types.EventKind.PUT else EventKind.DELETE,
            key=e.key,
            value=e.value,
            prev_value=e.prev_value,
            revision=e.revision,
            resync=e.resync,
            coalesced=e.coalesced,
            metadata=list(e.metadata),
        )


def _utf8(data: Optional[bytes]) -> Optional[str]:
    if data is None:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


class PluginError(Exception):
    """Raise to fail an event with exactly this message (no type name)."""


class HostError(PluginError):
    """A host capability refused a call; the message is the host's."""


@dataclass
class BatchError(Exception):
    """A batch stopped at ``index``: every event before it was handled."""

    index: int
    message: str

    def __str__(self) -> str:
        return f"event {self.index}: {self.message}"


def error_message(exc: BaseException) -> str:
    """The error string the gateway sees for an exception from ``handle``.

    A :class:`PluginError` gives its message as is. Any other exception gives
    its type, message and the innermost line of the plugin's code that was
    running, so a dead letter says where the plugin failed.
    """
    if isinstance(exc, PluginError):
        return str(exc)
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    frames = traceback.extract_tb(exc.__traceback__)
    if frames:
        last = frames[-1]
        text += f" (at {last.filename}:{last.lineno} in {last.name})"
    return text


class Plugin:
    """Base class of a plugin: override :meth:`handle`.

    The host may replace the instance at any time (for example after a
    trap), so keep anything that must outlive it in :mod:`state`.
    """

    def handle(self, event: Event) -> None:
        """Handle one event; raise to fail it."""
        raise NotImplementedError(f"{type(self).__name__} does not define handle(event)")

    def handle_batch(self, events: List[Event]) -> None:
        """Handle several events in order.

        The default calls :meth:`handle` for each event and stops at the
        first exception, raising :class:`BatchError` with its index.
        """
        for index, event in enumerate(events):
            try:
                self.handle(event)
            except MemoryError:
                raise
            except Exception as exc:  # noqa: BLE001 - every failure is the event's error
                raise BatchError(index, error_message(exc)) from exc


def export(plugin_class: type) -> type:
    """The ``WitWorld`` class componentize-py exports, wrapping ``plugin_class``.

    Assign the result to ``WitWorld`` at the top level of ``app.py``. One
    plugin object is made lazily and kept for the life of the instance.
    """
    if not (isinstance(plugin_class, type) and issubclass(plugin_class, Plugin)):
        raise TypeError("watchgate.export() takes a subclass of watchgate.Plugin")
    holder: List[Plugin] = []

    def plugin() -> Plugin:
        if not holder:
            holder.append(plugin_class())
        return holder[0]

    class WitWorld:
        def handle(self, event: "_types.Event") -> None:
            try:
                plugin().handle(Event._from_wit(event))
            except MemoryError:
                raise
            except Exception as exc:  # noqa: BLE001
                raise _Err(error_message(exc)) from None

        def handle_batch(self, events: "List[_types.Event]") -> None:
            try:
                plugin().handle_batch([Event._from_wit(e) for e in events])
            except MemoryError:
                raise
            except BatchError as exc:
                raise _Err(_types.BatchError(index=exc.index, message=exc.message)) from None
            except Exception as exc:  # noqa: BLE001
                # An index equal to the batch length names no event: the host
                # then retries each event on its own.
                raise _Err(
                    _types.BatchError(index=len(events), message=error_message(exc))
                ) from None

    WitWorld.__name__ = WitWorld.__qualname__ = "WitWorld"
    return WitWorld


def _call(fn, *args):
    """Call a host import whose WIT result is ``result<_, string>``."""
    try:
        return fn(*args)
    except _Err as e:
        raise HostError(str(e.value)) from None


from . import commands, files, http, kv, log, settings, snapshot, state  # noqa: E402
