"""Appends every event to ``events.jsonl`` in the plugin's files grant.

The Python twin of the Rust ``event-log`` plugin, writing the same bytes for
the same event: one JSON object per line, fields in the order
``source, kind, key, value | value_b64, revision, resync, coalesced,
fencing_token``, in one ``files.append`` call so lines never interleave.
``value`` holds UTF-8 text; other bytes go to ``value_b64`` (standard base64
with padding); a delete has neither. ``fencing_token`` appears when the
event's metadata carries one that reads as an unsigned 64-bit integer.
"""

import base64
import json
import re

import watchgate
from watchgate import files

MANIFEST = """
name = "py-event-log"
version = "0.1.0"
description = "Appends every event as one JSON line to events.jsonl (Python)."
capabilities = ["files"]
"""

LOG_PATH = "events.jsonl"

# What Rust's `u64::from_str` accepts: ASCII digits with an optional `+`.
_U64 = re.compile(r"\+?[0-9]+\Z", re.ASCII)
_U64_MAX = (1 << 64) - 1


def fencing_token(text):
    """The token as an int, or None where the Rust plugin would skip it."""
    if text is None or not _U64.match(text):
        return None
    n = int(text)
    return n if n <= _U64_MAX else None


def json_line(event):
    """``event`` as one compact JSON object followed by a newline."""
    line = {"source": event.source, "kind": event.kind.value, "key": event.key}
    if event.value is not None:
        text = event.text()
        if text is not None:
            line["value"] = text
        else:
            line["value_b64"] = base64.b64encode(event.value).decode("ascii")
    line["revision"] = event.revision
    line["resync"] = event.resync
    line["coalesced"] = event.coalesced
    token = fencing_token(event.meta("fencing_token"))
    if token is not None:
        line["fencing_token"] = token
    # serde_json's output: no spaces, non-ASCII kept as UTF-8.
    return json.dumps(line, separators=(",", ":"), ensure_ascii=False) + "\n"


class EventLog(watchgate.Plugin):
    def handle(self, event):
        try:
            files.append(LOG_PATH, json_line(event))
        except watchgate.HostError as e:
            raise watchgate.PluginError(f"py-event-log: append to {LOG_PATH} failed: {e}") from None


WitWorld = watchgate.export(EventLog)
