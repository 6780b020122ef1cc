"""Checks that config values parse before anything downstream uses them.

Every put under the ``prefix`` setting must be UTF-8 text that parses as
JSON (``.json`` keys, and any key when ``format = "json"``) or TOML
(``.toml`` keys, or ``format = "toml"``); keys ending in neither are
checked as JSON under ``format = "auto"``. Deletes are always fine.
An invalid value is logged at error level, and then the event succeeds
(``on_invalid = "log"``, the default) or fails with the reason
(``"dead-letter"``), so the gateway retries and finally dead-letters it.

While a key's current value is invalid, host state holds
``invalid/<key>`` with the reason, so an operator (or another plugin run)
can see which keys are broken; a later valid put or a delete clears it.

Sidecar ``py-config-guard.toml``::

    [[subscribe]]
    source = "main"
    prefix = "/app/config/"

    [settings]
    prefix = "/app/config/"   # optional, default "" (every key it receives)
    format = "auto"           # "json", "toml" or "auto"
    on_invalid = "log"        # or "dead-letter"
"""

import json
import tomllib

import watchgate
from watchgate import log, settings, state

MANIFEST = """
name = "py-config-guard"
version = "0.1.0"
description = "Validates JSON and TOML config values; logs or dead-letters invalid ones (Python)."
"""

FORMATS = ("auto", "json", "toml")
POLICIES = ("log", "dead-letter")


def setting(name, default, allowed):
    value = settings.get(name, default)
    if value not in allowed:
        raise watchgate.PluginError(
            f"py-config-guard: setting {name} = {value!r} is not one of {', '.join(allowed)}"
        )
    return value


def format_of(key, configured):
    if configured != "auto":
        return configured
    return "toml" if key.endswith(".toml") else "json"


def reject_constant(name):
    raise ValueError(f"{name} is not JSON")


def problem(text, fmt):
    """Why ``text`` is not valid ``fmt``; None when it is."""
    try:
        if fmt == "json":
            # Python's json accepts NaN and Infinity; JSON does not.
            json.loads(text, parse_constant=reject_constant)
        else:
            tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as e:
        return f"invalid {fmt.upper()}: {e}"
    return None


class ConfigGuard(watchgate.Plugin):
    def handle(self, event):
        prefix = settings.get("prefix", "")
        fmt = setting("format", "auto", FORMATS)
        policy = setting("on_invalid", "log", POLICIES)
        if not event.key.startswith(prefix):
            return
        mark = f"invalid/{event.key}"
        if event.is_delete:
            state.delete(mark)
            return
        kind = format_of(event.key, fmt)
        text = event.text()
        reason = "not UTF-8 text" if text is None else problem(text, kind)
        if reason is None:
            state.delete(mark)
            log.debug(f"py-config-guard: {event.source} {event.key}: valid {kind.upper()}")
            return
        state.set(mark, reason)
        message = f"py-config-guard: {event.source} {event.key}: {reason}"
        log.error(message)
        if policy == "dead-letter":
            raise watchgate.PluginError(message)


WitWorld = watchgate.export(ConfigGuard)
