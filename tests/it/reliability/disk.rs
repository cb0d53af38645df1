//! Disk trouble (docs/reliability.md): the shipper's state directory full, then read-only, then
//! fixed, while ONE shipper process keeps running. It stops advancing, says why (a log line naming
//! the outbox path and the OS / SQLite reason, the `tally_ship_storage_blocked` gauge), `tally
//! queue stats` shows the backlog, and once the disk is fixed it resumes by itself: every record
//! arrives at Lago exactly once. A stop (SIGTERM) during the trouble exits 0 at once and loses
//! nothing.
//!
//! Tests run as root, and root ignores permission bits, so the state directory is a small ext4
//! image mounted for the test (filled to make it full, failed to read-only, see [`Disk`]). Where
//! `mount` is not permitted the test says so on stderr and returns without checking anything.

use std::path::{Path, PathBuf};
use std::process::Command;

use tally::lago_emulator::Fault;

use crate::reliability::support::{LogWriter, PATIENCE, Rig, figure, tail};
use crate::support::{Later, SpendLine, wait_until};

/// The log line the shipper writes when the outbox cannot be written.
const BLOCKED: &str = "cannot write the outbox";
/// The log line when it can again.
const RESUMED: &str = "can be written again";

/// A small ext4 filesystem (a loop-mounted image with no reserved blocks) mounted at the state
/// directory for the test's lifetime. ext4 because it can be made read-only under a running
/// writer: the kernel refuses `remount,ro` while files are open for writing, but an ext4 error
/// with `errors=remount-ro` turns it read-only at once, as on a real failing disk. Undoing it takes
/// an unmount, which the shipper's open files only allow lazily, and the kernel then keeps the
/// failed filesystem (same loop device, same superblock) for as long as they stay open: so the
/// fix mounts a checked copy of the image at the same place, as when the state disk is replaced.
/// The shipper's old connection keeps failing on the old filesystem until it reopens the outbox.
struct Disk {
    image: PathBuf,
    at: PathBuf,
    repairs: u32,
}

fn run(cmd: &str, args: &[&str]) -> bool {
    Command::new(cmd)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl Disk {
    fn mount(image: &Path, at: &Path) -> Option<Self> {
        std::fs::create_dir_all(at).unwrap();
        let f = std::fs::File::create(image).unwrap();
        f.set_len(96 << 20).unwrap();
        let img = image.to_str().unwrap();
        if !run("mkfs.ext4", &["-q", "-F", "-m", "0", img]) {
            return None;
        }
        let disk = Self {
            image: image.to_path_buf(),
            at: at.to_path_buf(),
            repairs: 0,
        };
        disk.attach().then_some(disk)
    }

    fn attach(&self) -> bool {
        run(
            "mount",
            &[
                "-o",
                "loop,errors=remount-ro",
                self.image.to_str().unwrap(),
                self.at.to_str().unwrap(),
            ],
        )
    }

    /// The filesystem turns read-only under the running shipper (an ext4 error, remount-ro).
    fn fail_read_only(&self) {
        let source = Command::new("findmnt")
            .args(["-n", "-o", "SOURCE"])
            .arg(&self.at)
            .output()
            .unwrap();
        let source = String::from_utf8_lossy(&source.stdout).trim().to_owned();
        let dev = source.rsplit('/').next().unwrap_or_default().to_owned();
        assert!(run("sync", &[]));
        std::fs::write(format!("/sys/fs/ext4/{dev}/trigger_fs_error"), "1\n")
            .expect("ext4 trigger_fs_error");
    }

    /// The fix: unmount, check, and mount a copy of the checked image at the same place.
    fn repair(&mut self) {
        assert!(run("umount", &["-l", self.at.to_str().unwrap()]));
        self.repairs += 1;
        let copy = self
            .image
            .with_extension(format!("repaired{}", self.repairs));
        std::fs::copy(&self.image, &copy).unwrap();
        self.image = copy;
        // 0: clean, 1: errors corrected.
        let fsck = Command::new("e2fsck")
            .args(["-f", "-y"])
            .arg(&self.image)
            .output()
            .unwrap();
        assert!(
            fsck.status.code().is_some_and(|c| c <= 1),
            "e2fsck: {fsck:?}"
        );
        assert!(self.attach(), "mounting the repaired state disk failed");
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        let _ = run("umount", &["-l", self.at.to_str().unwrap()]);
    }
}

/// Takes every free byte of the filesystem holding `path` (down to the last page).
fn fill(path: &Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    for size in [64 << 10, 4 << 10, 512, 1] {
        let block = vec![0u8; size];
        while f.write_all(&block).is_ok() {}
    }
    let _ = f.sync_all();
}

fn write_range(writer: &mut LogWriter, from: u64, to: u64) {
    for n in from..to {
        let line = SpendLine::new(format!("disk-{n:05}"))
            .end_user(format!("customer-{}", n % 7))
            .to_line();
        writer.append(line.as_bytes());
    }
}

fn count(text: &str, what: &str) -> usize {
    text.lines().filter(|l| l.contains(what)).count()
}

/// The `tally_ship_storage_blocked` gauge, read from the shipper's metrics listener.
async fn storage_blocked(metrics: &str) -> Option<f64> {
    let body = reqwest::get(format!("http://{metrics}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    body.lines()
        .find_map(|l| l.strip_prefix("tally_ship_storage_blocked "))
        .and_then(|v| v.trim().parse().ok())
}

/// The metrics address the shipper logged at start.
fn metrics_addr(log: &str) -> Option<String> {
    let at = log.find("metrics=Some(")? + "metrics=Some(".len();
    let end = log[at..].find(')')?;
    Some(log[at..at + end].to_owned())
}

/// `tally queue stats` while the trouble lasts: pending events, and how many bytes of the spend
/// log are not yet committed (`lag_bytes`, summed over the files it follows).
fn backlog(rig: &Rig) -> (u64, u64) {
    let stats = rig.queue_json(&["stats"]);
    let pending = stats["pending"].as_u64().unwrap();
    let lag = stats["files"]
        .as_array()
        .unwrap_or_else(|| panic!("no files in {stats}"))
        .iter()
        .filter_map(|f| f["lag_bytes"].as_u64())
        .sum();
    (pending, lag)
}

/// One episode of trouble: pending events in the outbox (Lago failing), then `break_disk`, then
/// Lago accepts again and more records are written. Checks the shipper says why, keeps running,
/// does not advance, and shows the backlog; returns the log line and the backlog seen.
async fn trouble(
    rig: &Rig,
    ship: &mut crate::reliability::support::Shipper,
    writer: &mut LogWriter,
    range: (u64, u64, u64),
    break_disk: impl FnOnce(),
    metrics: &str,
) -> (String, (u64, u64)) {
    let (from, mid, to) = range;
    let blocked_before = count(&rig.stderr_text(), BLOCKED);
    // Lago fails, so the next records wait in the outbox as pending.
    rig.lago.inject(Fault::ServerError {
        status: 503,
        count: 1_000_000_000,
    });
    write_range(writer, from, mid);
    wait_until(
        "the records as pending in the outbox",
        PATIENCE,
        async || rig.pending() >= mid - from,
    )
    .await;
    break_disk();
    // Lago takes them again: the shipper may send, but cannot record the acks; more records come.
    rig.lago.clear_faults();
    write_range(writer, mid, to);
    let what = Later(|| {
        format!(
            "the shipper to say it cannot write the outbox; its stderr:\n{}",
            tail(&rig.stderr_text(), 30)
        )
    });
    wait_until(what, PATIENCE, async || {
        count(&rig.stderr_text(), BLOCKED) > blocked_before
    })
    .await;
    let line = rig
        .stderr_text()
        .lines()
        .filter(|l| l.contains(BLOCKED))
        .nth(blocked_before)
        .unwrap_or_default()
        .to_owned();
    // While it lasts: still running, not advancing, the backlog visible, the gauge up.
    let seen = backlog(rig);
    assert!(
        seen.0 > 0 && seen.1 > 0,
        "tally queue stats shows no backlog (pending, unread bytes) = {seen:?}"
    );
    assert!(
        rig.lago.event_count() < to as usize,
        "the shipper advanced with its outbox unwritable"
    );
    let gauge = storage_blocked(metrics).await;
    assert_eq!(
        gauge,
        Some(1.0),
        "tally_ship_storage_blocked while the outbox cannot be written:\n{}",
        tail(&rig.stderr_text(), 30)
    );
    assert!(
        ship.exited().is_none(),
        "the shipper exited on disk trouble:\n{}",
        tail(&rig.stderr_text(), 30)
    );
    (line, seen)
}

/// Needs root (`mount -o loop`) and mkfs.ext4, so it is ignored by default rather than passing
/// without having run: `scripts/test.sh` runs it when it is root (as CI is), and so does
/// `cargo nextest run --test it --run-ignored only -E 'test(/reliability::disk/)'`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "mounts a loop filesystem: needs root and mkfs.ext4 (scripts/test.sh runs it as root)"]
async fn state_dir_full_then_read_only_is_ridden_through_by_one_shipper() {
    let rig = Rig::new().await;
    let Some(mut disk) = Disk::mount(&rig.path("state.img"), &rig.state_dir()) else {
        panic!(
            "reliability::disk needs mkfs.ext4 and `mount -o loop` (root); neither is available here"
        );
    };
    let db = rig.state_dir().join("shipper.db").display().to_string();
    let mut writer = LogWriter::open(&rig.log());
    let mut ship = rig.spawn_ship(&["--metrics-addr", "127.0.0.1:0"]);
    write_range(&mut writer, 0, 300);
    rig.wait_stored(300, "before the trouble").await;
    let metrics = metrics_addr(&rig.stderr_text()).expect("the shipper logs its metrics address");
    assert_eq!(storage_blocked(&metrics).await, Some(0.0));

    // Full: a filler takes every free byte of the state directory's filesystem.
    let filler = rig.state_dir().join("filler");
    let (full_line, full_backlog) = trouble(
        &rig,
        &mut ship,
        &mut writer,
        (300, 600, 2_000),
        || fill(&filler),
        &metrics,
    )
    .await;
    assert!(
        full_line.contains(&db) && full_line.contains("full"),
        "the error does not name the outbox path and the cause: {full_line}"
    );
    std::fs::remove_file(&filler).unwrap();
    rig.wait_stored(2_000, "after the disk was freed").await;
    assert!(count(&rig.stderr_text(), RESUMED) >= 1);

    // Read-only: the same process, the same connection.
    let (ro_line, ro_backlog) = trouble(
        &rig,
        &mut ship,
        &mut writer,
        (2_000, 2_300, 3_000),
        || disk.fail_read_only(),
        &metrics,
    )
    .await;
    let lower = ro_line.to_lowercase();
    assert!(
        ro_line.contains(&db) && (lower.contains("read-only") || lower.contains("readonly")),
        "the error does not name the outbox path and the cause: {ro_line}"
    );
    disk.repair();
    rig.wait_stored(3_000, "after the state dir is writable again")
        .await;
    wait_until("no events pending after the fixes", PATIENCE, async || {
        rig.pending() == 0
    })
    .await;
    assert!(count(&rig.stderr_text(), RESUMED) >= 2);
    assert_eq!(storage_blocked(&metrics).await, Some(0.0));
    assert!(ship.exited().is_none(), "the shipper restarted or exited");
    let ids: Vec<String> = (0..3_000).map(|n| format!("disk-{n:05}")).collect();
    rig.assert_exactly_once(&ids);
    let reopened = count(&rig.stderr_text(), "reopened it");

    // A stop during the trouble exits 0 without waiting for the disk, and loses nothing.
    fill(&filler);
    let blocked_before = count(&rig.stderr_text(), BLOCKED);
    write_range(&mut writer, 3_000, 3_200);
    let what = Later(|| {
        format!(
            "the shipper to say it cannot write the outbox; its stderr:\n{}",
            tail(&rig.stderr_text(), 30)
        )
    });
    wait_until(what, PATIENCE, async || {
        count(&rig.stderr_text(), BLOCKED) > blocked_before
    })
    .await;
    let status = ship.terminate().unwrap();
    assert!(
        status.success(),
        "SIGTERM during the wait: {status}\n{}",
        tail(&rig.stderr_text(), 20)
    );
    std::fs::remove_file(&filler).unwrap();
    let mut ship = rig.spawn_ship(&[]);
    rig.wait_stored(
        3_200,
        "after a restart that followed a stop during the trouble",
    )
    .await;
    wait_until("no events pending", PATIENCE, async || rig.pending() == 0).await;
    assert!(ship.terminate().unwrap().success());
    let ids: Vec<String> = (0..3_200).map(|n| format!("disk-{n:05}")).collect();
    rig.assert_exactly_once(&ids);

    // Started on a read-only state directory, the shipper waits for it (it used to exit, and
    // systemd gives up after five quick failed starts), says why, and starts once it is fixed.
    disk.fail_read_only();
    let mut ship = rig.spawn_ship(&[]);
    write_range(&mut writer, 3_200, 3_400);
    let what = Later(|| {
        format!(
            "the shipper to say it cannot open the outbox; its stderr:\n{}",
            tail(&rig.stderr_text(), 20)
        )
    });
    wait_until(what, PATIENCE, async || {
        rig.stderr_text()
            .lines()
            .any(|l| l.contains("cannot open the outbox") && l.contains("Read-only file system"))
            || ship.exited().is_some()
    })
    .await;
    assert!(
        ship.exited().is_none(),
        "a start on a read-only state dir did not wait:\n{}",
        tail(&rig.stderr_text(), 20)
    );
    assert_eq!(
        rig.lago.event_count(),
        3_200,
        "nothing is billed without the outbox"
    );
    let start_line = rig
        .stderr_text()
        .lines()
        .find(|l| l.contains("cannot open the outbox"))
        .unwrap_or_default()
        .to_owned();
    disk.repair();
    rig.wait_stored_running(
        &mut ship,
        3_400,
        "after the state dir was fixed under a waiting start",
    )
    .await;
    wait_until("no events pending", PATIENCE, async || rig.pending() == 0).await;
    assert!(ship.terminate().unwrap().success());
    let ids: Vec<String> = (0..3_400).map(|n| format!("disk-{n:05}")).collect();
    rig.assert_exactly_once(&ids);
    let resent = rig.lago.counters().duplicates;
    figure(
        "disk_trouble",
        format!(
            "one shipper rode through full then read-only: full said {full_line:?} with backlog \
             {full_backlog:?} (pending, unread bytes); read-only said {ro_line:?} with backlog \
             {ro_backlog:?}; connection reopened {reopened} time(s); SIGTERM during the wait \
             exited 0; a start on a read-only state dir waited ({start_line:?}) and started when fixed; 3400 records \
             each stored once, {resent} duplicate answers absorbed"
        ),
    );
}
