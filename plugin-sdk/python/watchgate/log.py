"""Log lines into the gateway's own log, tagged with the plugin name.

The host rate-limits logging per plugin; this module only forwards.
"""

from wit_world.imports import log as _host

__all__ = ["trace", "debug", "info", "warn", "error", "log", "Level"]

Level = _host.Level


def log(level: "_host.Level", message: str) -> None:
    """Write one line at ``level`` (a :class:`Level`)."""
    _host.log(level, str(message))


def trace(message: str) -> None:
    _host.log(_host.Level.TRACE, str(message))


def debug(message: str) -> None:
    _host.log(_host.Level.DEBUG, str(message))


def info(message: str) -> None:
    _host.log(_host.Level.INFO, str(message))


def warn(message: str) -> None:
    _host.log(_host.Level.WARN, str(message))


def error(message: str) -> None:
    _host.log(_host.Level.ERROR, str(message))
