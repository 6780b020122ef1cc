"""The operator's settings for this plugin: the ``[settings]`` table of its
sidecar ``NAME.toml``. Always available."""

from typing import Optional

from wit_world.imports import settings as _host

__all__ = ["get", "require"]


def get(name: str, default: Optional[str] = None) -> Optional[str]:
    """The setting ``name`` as text (strings as written, other TOML values in
    their TOML form); ``default`` when unset."""
    value = _host.get(name)
    return default if value is None else value


def require(name: str) -> str:
    """The setting ``name``; raises :class:`watchgate.PluginError` naming it
    when unset, so the event fails with a message the operator can act on."""
    value = _host.get(name)
    if value is None:
        from . import PluginError

        raise PluginError(f"the setting {name!r} is not set in the plugin's sidecar [settings]")
    return value
