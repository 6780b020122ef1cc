//! Fixture plugin that tries to fill the disk through its `files` grant.
//!
//! Every event, in turn: appends 1 MiB chunks to `fill/big.log` until the
//! host refuses one; creates empty files `many/<key>/<n>` until the host
//! refuses one; and replaces `big.conf` with 1 MiB. It logs how each step
//! ended, as `append stopped after <n> MiB: <error>`, `touch stopped after
//! <n> files: <error>` and `replace refused: <error>` (or `replace ok`),
//! then succeeds. Were the host's quota missing, the loops would run until
//! the disk is full; so that a broken host fails a test rather than the
//! machine, the plugin stops by itself after [`MAX_APPEND_MB`] MiB and
//! [`MAX_TOUCH`] files in all (kept in `state`), logging `not stopped`. It
//! must stay a fixture.
//!
//! Settings: none. Grants: `files = "DIR"` (without it every write is
//! refused as not granted).

use watchgate_sdk::{Event, Plugin, export, files, log, manifest, state};

manifest!(concat!(
    "name = \"fault-files-fill\"\n",
    "version = \"",
    env!("CARGO_PKG_VERSION"),
    "\"\n",
    "description = \"Fixture: appends and creates files until the host refuses.\"\n",
    "capabilities = [\"files\"]\n",
));

/// Most MiB it appends in all, whatever the host allows.
const MAX_APPEND_MB: u64 = 256;
/// Most files it creates in all, whatever the host allows.
const MAX_TOUCH: u64 = 10_000;
/// Bytes of the replace.
const REPLACE_BYTES: usize = 1 << 20;

/// A counter kept in `state` across events and restarts.
fn counter(name: &str) -> u64 {
    state::get(name)
        .and_then(|v| String::from_utf8(v).ok())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn set_counter(name: &str, value: u64) -> Result<(), String> {
    state::set(name, Some(value.to_string().as_bytes()))
}

/// Appends, creates files and replaces until refused.
struct FaultFilesFill;

impl Plugin for FaultFilesFill {
    fn handle(event: Event) -> Result<(), String> {
        let chunk = vec![b'x'; 1 << 20];
        let mut appended = counter("appended_mb");
        let mut n = 0u64;
        loop {
            if appended >= MAX_APPEND_MB {
                log::warn(format!("append not stopped after {n} MiB"));
                break;
            }
            if let Err(e) = files::append("fill/big.log", &chunk) {
                log::info(format!("append stopped after {n} MiB: {e}"));
                break;
            }
            n += 1;
            appended += 1;
        }
        set_counter("appended_mb", appended)?;
        let mut touched = counter("touched");
        let mut n = 0u64;
        loop {
            if touched >= MAX_TOUCH {
                log::warn(format!("touch not stopped after {n} files"));
                break;
            }
            if let Err(e) = files::append(&format!("many/{}/{n}", event.key), b"") {
                log::info(format!("touch stopped after {n} files: {e}"));
                break;
            }
            n += 1;
            touched += 1;
        }
        set_counter("touched", touched)?;
        match files::replace("big.conf", &vec![b'r'; REPLACE_BYTES]) {
            Ok(()) => log::info("replace ok"),
            Err(e) => log::info(format!("replace refused: {e}")),
        }
        Ok(())
    }
}

export!(FaultFilesFill);
