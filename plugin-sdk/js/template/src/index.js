// {{name}}: a watchgate plugin in JavaScript.
//
// Build: ./build.sh (or npm run build; writes {{name}}.wasm). Try it on
// recorded events: watchgate plugin test {{name}}.wasm --events events.jsonl
// Deploy: copy {{name}}.wasm into the gateway's plugin directory, with
// {{name}}.toml beside it (see sidecar.example.toml) for grants and settings.
//
// The manifest (name, version, description, and what the plugin asks for
// under "watchgate" in package.json) is stored in the .wasm by the build.
// The operator's sidecar {{name}}.toml decides what it gets: a manifest never
// grants anything.

import { Plugin, log } from '@watchgate/sdk';

export default class Handler extends Plugin {
  handle(event) {
    const value = event.valueText() ?? '<deleted or binary>';
    log.info(`${event.kind} ${event.source} ${event.key} = ${value}`);
  }
}
