"""Test fixture: the event's key picks what the Python plugin does.

``spin`` loops forever, ``alloc`` grows a list until memory runs out,
``error`` raises, ``recurse`` recurses without end, ``count`` (or ``state``,
the key the Rust, JavaScript and Go fixtures use) increments the host-state
counter ``count`` and logs its new value, anything else succeeds.
The tests use it to see the host's limits and the SDK's error path act on a
componentize-py component (outcomes out_of_fuel or timeout, memory, error)
and the next event still served.
"""

import watchgate
from watchgate import log, state

MANIFEST = """
name = "py-fault-by-key"
version = "0.1.0"
description = "Test fixture: the key picks a fault (spin, alloc, error, recurse, count or state)."
"""


def recurse(n):
    return recurse(n + 1) + 1


class FaultByKey(watchgate.Plugin):
    def handle(self, event):
        key = event.key
        if key == "spin":
            while True:
                pass
        elif key == "alloc":
            hoard = []
            while True:
                hoard.append(bytearray(1 << 20))
        elif key == "error":
            raise ValueError(f"asked to fail by key {key!r}")
        elif key == "recurse":
            recurse(0)
        elif key in ("count", "state"):
            n = int(state.get_text("count") or "0") + 1
            state.set("count", str(n))
            log.info(f"count={n}")


WitWorld = watchgate.export(FaultByKey)
