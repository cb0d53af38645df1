//! Disk trouble (issue #6): the shipper's state directory full, then read-only. The shipper stops
//! advancing, says why (a log line naming the outbox path and the OS / SQLite error), and once the
//! disk is fixed and it is started again (as systemd's `Restart=on-failure` does) every record
//! arrives at Lago exactly once.
//!
//! Tests run as root, and root ignores permission bits, so the state directory is a small tmpfs
//! mounted for the test (filled to make it full, remounted read-only). Where `mount` is not
//! permitted the test says so on stderr and returns without checking anything.

use std::path::Path;
use std::process::Command;

use crate::reliability_support::{LogWriter, PATIENCE, Rig, figure, good_line, tail};
use crate::support::wait_until;

/// A tmpfs mounted at a directory for the test's lifetime.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Option<Self> {
        std::fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Self(at.to_path_buf()))
    }

    fn remount(&self, opts: &str) {
        let s = Command::new("mount")
            .args(["-o", &format!("remount,{opts}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(s.success(), "remount {opts} failed");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn write_range(writer: &mut LogWriter, from: u64, to: u64) {
    for n in from..to {
        writer.append(good_line(&format!("disk-{n:05}"), n).as_bytes());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_dir_full_then_read_only_stops_the_shipper_loudly_and_loses_nothing() {
    let rig = Rig::new().await;
    let Some(fs) = Tmpfs::mount(&rig.state_dir(), "32m") else {
        eprintln!("SKIPPED reliability_disk: `mount -t tmpfs` is not permitted here");
        return;
    };
    let db = rig.state_dir().join("shipper.db");
    let mut writer = LogWriter::open(&rig.log());
    let mut ship = rig.spawn_ship(&[]);
    write_range(&mut writer, 0, 300);
    rig.wait_stored(300, "before the disk fills").await;

    // Full: a filler takes every free byte of the state directory's filesystem.
    let filler = rig.state_dir().join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 64 << 10];
        while f.write_all(&block).is_ok() {}
        let _ = f.sync_all();
    }
    // Records keep coming; enough that the outbox must grow.
    write_range(&mut writer, 300, 3_000);
    let stopped = wait_until(PATIENCE, || {
        ship.exited().is_some() || rig.stderr_text().contains("full")
    })
    .await;
    assert!(
        stopped,
        "the shipper never noticed the full disk:\n{}",
        tail(&rig.stderr_text(), 30)
    );
    let full_exit = wait_until(PATIENCE, || ship.exited().is_some()).await;
    let log = rig.stderr_text();
    let said = log
        .lines()
        .find(|l| l.starts_with("tally: error:"))
        .unwrap_or_default()
        .to_owned();
    assert!(
        said.contains(&db.display().to_string()) && said.contains("full"),
        "the error does not name the outbox path and the cause: {said}\n{}",
        tail(&log, 20)
    );
    let stored_while_full = rig.lago.event_count();
    assert!(
        stored_while_full < 3_000,
        "the shipper advanced past a full disk"
    );

    // Fixed: room again; started again, it resumes where its last commit left it.
    std::fs::remove_file(&filler).unwrap();
    ship.kill9();
    ship = rig.spawn_ship(&[]);
    rig.wait_stored(3_000, "after the disk was freed").await;
    assert!(ship.terminate().unwrap().success());

    // Read-only: the outbox cannot be opened for writing; the start fails and says why.
    fs.remount("ro");
    write_range(&mut writer, 3_000, 3_500);
    let out = rig
        .command(&["ship", "--poll-interval-ms", "200"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "the shipper ran on a read-only state dir:\n{text}"
    );
    assert!(
        text.contains(&rig.state_dir().display().to_string())
            && text.to_lowercase().contains("read-only"),
        "the error names neither the path nor the cause:\n{text}"
    );
    assert_eq!(
        rig.lago.event_count(),
        3_000,
        "nothing is billed without the outbox"
    );

    // Fixed again: everything arrives once.
    fs.remount("rw");
    let mut ship = rig.spawn_ship(&[]);
    rig.wait_stored(3_500, "after the state dir is writable again")
        .await;
    let drained = wait_until(PATIENCE, || rig.pending() == 0).await;
    assert!(drained);
    assert!(ship.terminate().unwrap().success());
    let ids: Vec<String> = (0..3_500).map(|n| format!("disk-{n:05}")).collect();
    rig.assert_exactly_once(&ids);
    let ro_line = text.lines().last().unwrap_or_default().to_owned();
    figure(
        "disk_trouble",
        format!(
            "full: shipper {} after {stored_while_full} of 3000 stored, said {said:?}; \
             read-only: start refused with {ro_line:?}; 3500 records each stored once after the fixes",
            if full_exit { "exited" } else { "kept running" },
        ),
    );
}
