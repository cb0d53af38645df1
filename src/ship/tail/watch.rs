//! Wakes the tailer when something happens in the spend log's directory.
//!
//! The directory is watched rather than the file, so a rename, a new live file and a deletion are
//! all seen. Events only say "look again": the tailer re-reads state from the file system, so a
//! missed or coalesced event costs at most one poll interval, never a line.

use std::ffi::OsString;
use std::path::Path;
use std::sync::Arc;

use notify::event::{AccessKind, AccessMode, EventKind};
use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::Notify;

use super::identity;

/// A directory watch that signals `wake` on events concerning the live file or its siblings.
pub struct DirWatch {
    // Dropping the watcher stops the watch.
    _watcher: RecommendedWatcher,
}

impl DirWatch {
    pub fn start(live_path: &Path, wake: Arc<Notify>) -> Result<Self, String> {
        let dir = identity::parent_dir(live_path)
            .ok_or_else(|| "the spend log path has no directory".to_owned())?;
        let live_name: OsString = live_path
            .file_name()
            .map(OsString::from)
            .unwrap_or_default();
        let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            match res {
                Ok(event) if concerns_us(&event, &live_name) => wake.notify_one(),
                Ok(_) => {}
                // An error (e.g. queue overflow) may hide events: look again.
                Err(_) => wake.notify_one(),
            }
        })
        .map_err(|e| e.to_string())?;
        watcher
            .watch(dir, RecursiveMode::NonRecursive)
            .map_err(|e| e.to_string())?;
        Ok(Self { _watcher: watcher })
    }
}

fn concerns_us(event: &notify::Event, live_name: &OsString) -> bool {
    // Opening or reading a file (our own reads included) changes nothing we read; a close after
    // writing does.
    if let EventKind::Access(kind) = event.kind
        && kind != AccessKind::Close(AccessMode::Write)
    {
        return false;
    }
    // No path means "something happened" (e.g. a rescan is needed).
    event.paths.is_empty()
        || event.paths.iter().any(|p| {
            p.file_name().is_some_and(|name| {
                name == live_name.as_os_str() || identity::is_rotated_name(name, live_name)
            })
        })
}
