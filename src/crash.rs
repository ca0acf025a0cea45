//! Crash points for tests: `HATCH_TEST_CRASH_AT=<point>:<n>` makes the daemon
//! kill itself with SIGKILL the n-th time it reaches `<point>`, so a test can
//! put a kill -9 exactly between two steps of a flow and check what a restart
//! finds. Unset (always, outside tests) it costs one load per call.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

/// Where a flow may be cut, each named after what has happened just before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Point {
    /// A capture uploaded its chunks; nothing of it is committed.
    CaptureUploaded,
    /// Collection removed orphaned chunks' rows, not yet their objects.
    CollectRowsTaken,
    /// A snapshot's deletion removed its device state object, not its row.
    DeleteObjectsGone,
    /// Compression wrote a chunk's compressed copy, not yet recorded.
    RecodeWritten,
}

impl Point {
    fn name(self) -> &'static str {
        match self {
            Point::CaptureUploaded => "capture-uploaded",
            Point::CollectRowsTaken => "collect-rows-taken",
            Point::DeleteObjectsGone => "delete-objects-gone",
            Point::RecodeWritten => "recode-written",
        }
    }
}

struct Armed {
    point: String,
    nth: u32,
    seen: AtomicU32,
}

fn armed() -> Option<&'static Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let v = std::env::var("HATCH_TEST_CRASH_AT").ok()?;
            let (point, nth) = v.split_once(':').unwrap_or((v.as_str(), "1"));
            Some(Armed {
                point: point.to_string(),
                nth: nth.parse().unwrap_or(1),
                seen: AtomicU32::new(0),
            })
        })
        .as_ref()
}

/// Dies here, like a kill -9, when a test armed this point for this time.
pub fn point(p: Point) {
    let Some(a) = armed() else { return };
    if a.point == p.name() && a.seen.fetch_add(1, Ordering::SeqCst) + 1 == a.nth {
        tracing::warn!(point = p.name(), "crash point reached: killing the daemon");
        // SAFETY: kill(2) on our own pid with a constant signal; no memory involved.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
}
