//! Test-only switches that break the agent on purpose (feature `fault-injection`).
//!
//! They exist so the power-loss explorer can prove it catches a real bug. Firmware builds
//! never enable the feature, and without it these functions are constant `false`.

use core::sync::atomic::{AtomicBool, Ordering};

static SINGLE_COPY_JOURNAL: AtomicBool = AtomicBool::new(false);

/// Write the journal in place (one copy) instead of alternating between two sectors.
pub fn set_single_copy_journal(on: bool) {
    SINGLE_COPY_JOURNAL.store(on, Ordering::SeqCst);
}

pub fn single_copy_journal() -> bool {
    cfg!(feature = "fault-injection") && SINGLE_COPY_JOURNAL.load(Ordering::SeqCst)
}
