//! Fixture plugin whose strings are as long as it can make them.
//!
//! Every call logs one line of [`LOG_BYTES`] through the `log` import,
//! prints one line of [`PRINT_BYTES`] to stdout, then fails with an error
//! message of [`ERROR_BYTES`] (`huge error <key> xxxx…`). Were the host to
//! keep what a plugin hands it whole, each call would put tens of MiB into
//! the gateway log, `/v1/plugins`, the dead letter and its listing. Since
//! every call fails, each event is retried and then dead-lettered, so the
//! fixture also fills its dead letters as fast as the retry policy allows.
//! It must stay a fixture.
//!
//! Settings: none. Grants: none. It declares no capabilities. Its calls
//! need a memory cap above [`ERROR_BYTES`] (the default 64 MiB is enough).

use watchgate_sdk::{Event, Plugin, export, log, manifest};

manifest!(concat!(
    "name = \"fault-huge-error\"\n",
    "version = \"",
    env!("CARGO_PKG_VERSION"),
    "\"\n",
    "description = \"Fixture: fails every event with a 40 MiB error and logs huge lines.\"\n",
    "capabilities = []\n",
));

/// Bytes of each call's error message: over glibc's largest mmap
/// threshold (32 MiB), so the host's copy is a fresh mapping each time.
const ERROR_BYTES: usize = 40 << 20;
/// Bytes of the line logged through the `log` import per call.
const LOG_BYTES: usize = 8 << 20;
/// Bytes of the line printed to stdout per call.
const PRINT_BYTES: usize = 1 << 20;

/// `prefix` padded with `x` to `len` bytes, allocated once and filled a
/// chunk at a time (a copy per chunk, not a loop per byte, so the fill
/// costs little fuel).
fn long(prefix: &str, len: usize) -> String {
    const CHUNK: usize = 64 << 10;
    let chunk = "x".repeat(CHUNK);
    let mut s = String::with_capacity(len.max(prefix.len()));
    s.push_str(prefix);
    while s.len() < len {
        s.push_str(&chunk[..CHUNK.min(len - s.len())]);
    }
    s
}

/// Fails every event with an [`ERROR_BYTES`] message.
struct FaultHugeError;

impl Plugin for FaultHugeError {
    fn handle(event: Event) -> Result<(), String> {
        log::error(long(&format!("huge log {} ", event.key), LOG_BYTES));
        {
            let line = long(&format!("huge print {} ", event.key), PRINT_BYTES);
            println!("{line}");
        }
        Err(long(&format!("huge error {} ", event.key), ERROR_BYTES))
    }
}

export!(FaultHugeError);
