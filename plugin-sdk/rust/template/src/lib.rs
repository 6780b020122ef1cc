//! {{name}}: a watchgate plugin.
//!
//! Build: `./build.sh` (writes `{{name}}.wasm`). Try it on recorded events:
//! `watchgate plugin test {{name}}.wasm --events events.jsonl`. Deploy: copy
//! `{{name}}.wasm` to the gateway's plugin directory, with `{{name}}.toml`
//! beside it (see `sidecar.example.toml`) for grants and settings.

use watchgate_sdk::{Event, Plugin, export, log};

// What the plugin is and what it asks for. The operator's sidecar
// `{{name}}.toml` decides what it gets: a manifest never grants anything.
watchgate_sdk::manifest!(concat!(
    "name = \"{{name}}\"\n",
    "version = \"",
    env!("CARGO_PKG_VERSION"),
    "\"\n",
    "description = \"Logs every change.\"\n",
    "capabilities = []\n",
));

struct Handler;

impl Plugin for Handler {
    fn handle(event: Event) -> Result<(), String> {
        let value = event.value_str().unwrap_or("<deleted or binary>");
        log::info(format!("{} {} {} = {value}", event.kind, event.source, event.key));
        Ok(())
    }
}

export!(Handler);
