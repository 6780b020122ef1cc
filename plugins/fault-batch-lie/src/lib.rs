//! Fixture plugin whose `handle-batch` lies about how far it got.
//!
//! Every batch call fails with an index past the end of the batch, which
//! the old reading took for "all handled". It exists to test that the
//! gateway counts such an error as a failure of the whole batch and hands
//! the events to `handle` one by one, which always succeeds.

use watchgate_sdk::{BatchError, Event, Plugin, export};

/// The message of every batch error, for the tests to look for.
const LIE: &str = "fault-batch-lie: deliberate out-of-range batch error";

/// Handles single events; fails every batch with an out-of-range index.
struct FaultBatchLie;

impl Plugin for FaultBatchLie {
    fn handle(_event: Event) -> Result<(), String> {
        Ok(())
    }

    fn handle_batch(events: Vec<Event>) -> Result<(), BatchError> {
        Err(BatchError {
            index: u32::MAX,
            message: format!("{LIE} ({} events)", events.len()),
        })
    }
}

export!(FaultBatchLie);
