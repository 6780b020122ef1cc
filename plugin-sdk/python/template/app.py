"""{{name}}: a watchgate plugin in Python.

Build: ./build.sh (writes {{name}}.wasm). Try it on recorded events:
watchgate plugin test {{name}}.wasm --events events.jsonl
Deploy: copy {{name}}.wasm into the gateway's plugin directory, with
{{name}}.toml beside it (see sidecar.example.toml) for grants and settings.
"""

import watchgate
from watchgate import log

# What the plugin is and what it asks for, stored in the .wasm by the build.
# The operator's sidecar {{name}}.toml decides what it gets: a manifest never
# grants anything.
MANIFEST = """
name = "{{name}}"
version = "0.1.0"
description = "Logs every change."
capabilities = []
"""


class Handler(watchgate.Plugin):
    def handle(self, event):
        value = event.text() or "<deleted or binary>"
        log.info(f"{event.kind} {event.source} {event.key} = {value}")


WitWorld = watchgate.export(Handler)
