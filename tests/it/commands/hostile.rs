//! The operator commands on hostile input (docs/reliability.md, "Findings"): escape sequences in
//! record text, a `.gz` of blank lines, ids `queue list` prints, a directory given to replay, a
//! closed stdout. The inputs are files in `fixtures/bad/`; everything runs through the real `tally`
//! binary.

use std::path::PathBuf;
use std::process::Stdio;

use super::{Bench, u};
use crate::support::SpendLine;

fn fixture(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/bad")
        .join(name)
        .display()
        .to_string()
}

/// Control characters a terminal acts on (ESC, BEL, the C1 CSI) and the right-to-left override.
fn assert_no_terminal_controls(what: &str, text: &str) {
    for c in ['\u{1b}', '\u{7}', '\u{9b}', '\u{202e}'] {
        assert!(
            !text.contains(c),
            "{what}: {c:?} reached the terminal:\n{text}"
        );
    }
}

/// Regression (docs/reliability.md, "Findings"): `tally replay --dry-run` and `tally queue show`
/// printed ids from the log raw, so escape sequences in a client's `user` reached the operator's
/// terminal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_text_is_escaped_wherever_it_is_printed() {
    let b = Bench::new().await;
    let log = fixture("escape_sequences.jsonl");
    let bad = fixture("escape_in_bad_line.jsonl");

    let dry = b.run(&["replay", "--dry-run", &log, &bad]).await;
    dry.assert_code(0);
    assert_no_terminal_controls("replay --dry-run", &dry.stdout);
    assert!(
        dry.stdout.contains(r"cust\u{1b}]0;pwned\u{7}"),
        "{}",
        dry.stdout
    );

    b.run(&["replay", &log, &bad]).await.assert_code(0);
    let show = b.run(&["queue", "show", "esc-user-1"]).await;
    show.assert_code(0);
    assert_no_terminal_controls("queue show", &show.stdout);
    assert!(show.stdout.contains(r"\u{1b}[2J"), "{}", show.stdout);

    for state in ["pending", "rejected"] {
        let list = b.run(&["queue", "list", "--state", state]).await;
        list.assert_code(0);
        assert_no_terminal_controls(state, &list.stdout);
    }
    let rejected = b.run(&["queue", "show", "rejected:1"]).await;
    rejected.assert_code(0);
    assert_no_terminal_controls("queue show rejected:1", &rejected.stdout);
    assert!(
        rejected.stdout.contains(r"\u{1b}]0;pwned\u{7}"),
        "{}",
        rejected.stdout
    );
    // JSON keeps the real value for scripts (serde escapes it as JSON does).
    let json = b.json(&["queue", "show", "esc-user-1"]).await;
    assert!(
        json["external_subscription_id"]
            .as_str()
            .unwrap()
            .starts_with("cust\u{1b}]0;pwned\u{7}")
    );
}

/// Regression (docs/reliability.md, "Findings"): `tally queue show rejected:1` said "not in the
/// outbox" for an id that `tally queue list` prints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_id_queue_list_prints_can_be_shown() {
    let b = Bench::new().await;
    let log = b.path("mixed.jsonl");
    std::fs::write(
        &log,
        format!(
            "{}not json at all\n{{\"schema\":1}}\n",
            SpendLine::new("s-1")
                .end_time("2026-11-05T10:00:00.000Z")
                .end_user("c-1")
                .team("team-x")
                .tokens(1, 2)
                .cost(0.1)
                .to_line()
        ),
    )
    .unwrap();
    b.run(&["replay", log.to_str().unwrap()])
        .await
        .assert_code(0);
    let list = b.json(&["queue", "list"]).await;
    let ids: Vec<String> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_owned())
        .collect();
    assert!(ids.contains(&"rejected:1".to_owned()), "{ids:?}");
    assert!(ids.contains(&"s-1".to_owned()), "{ids:?}");
    for id in &ids {
        let show = b.run(&["queue", "show", id]).await;
        show.assert_code(0);
        assert!(show.stdout.contains(id.as_str()), "{}", show.stdout);
    }
    let shown = b.json(&["queue", "show", "rejected:1"]).await;
    assert_eq!(shown["state"], "rejected");
    assert_eq!(shown["line"], "not json at all");
    assert!(
        shown["reason"].as_str().unwrap().contains("invalid record"),
        "{shown}"
    );
    assert_eq!(shown["offset"], list["items"][0]["offset"]);
    let missing = b.run(&["queue", "show", "rejected:99"]).await;
    missing.assert_code(1);
    assert!(
        missing.stderr.contains("not in the outbox"),
        "{}",
        missing.stderr
    );
}

/// Regression (docs/reliability.md, "Findings"): a `.gz` that expands to a gigabyte of empty lines
/// grew `shipper.db` by about 150 bytes per line (each stored as a rejected line). They are
/// counted, not stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blank_lines_of_a_replay_are_counted_not_stored() {
    let b = Bench::new().await;
    let gz = fixture("blank_lines.gz");
    let v = b.json(&["replay", &gz]).await;
    assert_eq!(
        (u(&v, "blank_lines"), u(&v, "new_events"), u(&v, "rejected")),
        (1_002_000, 1, 0),
        "{v}"
    );
    let stats = b.json(&["queue", "stats"]).await;
    assert_eq!((u(&stats, "rejected"), u(&stats, "pending")), (0, 1));
    // A million stored rejections would be well over 100 MB; the file stays small.
    let size = std::fs::metadata(b.db()).unwrap().len();
    assert!(size < 4 << 20, "shipper.db is {size} bytes");
    let text = b.run(&["replay", "--dry-run", &gz]).await;
    assert!(text.stdout.contains("1002000 blank"), "{}", text.stdout);
}

/// Regression (docs/reliability.md, "Findings"): `tally replay DIR` said the directory "matches no
/// file".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_a_directory_says_it_is_one() {
    let b = Bench::new().await;
    let dir = b.path("logs");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("spend.jsonl.1"), b"").unwrap();
    let run = b.run(&["replay", "--dry-run", dir.to_str().unwrap()]).await;
    run.assert_code(1);
    assert!(run.stderr.contains("is a directory"), "{}", run.stderr);
    assert!(run.stderr.contains("/spend.jsonl*'"), "{}", run.stderr);
    assert!(!run.stderr.contains("matches no file"), "{}", run.stderr);
}

/// Regression (docs/reliability.md, "Findings"): `tally … | head` ended with "Broken pipe" as an
/// error (exit 1). A closed stdout ends the command quietly with exit 0, as ripgrep does. Each
/// command writes to a pipe whose reading end is already closed, so the very first write fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_stdout_ends_quietly_with_exit_0() {
    let b = Bench::new().await;
    let log = fixture("escape_sequences.jsonl");
    b.run(&["replay", &log]).await.assert_code(0);
    let cases: &[&[&str]] = &[
        &["queue", "list"],
        &["queue", "list", "--output-format", "json"],
        &["queue", "stats", "--output-format", "json"],
        &["queue", "show", "esc-user-1", "--output-format", "json"],
        &["replay", "--dry-run", &log],
        &["replay", "--dry-run", &log, "--output-format", "json"],
    ];
    for args in cases {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        // Not `output()`: tokio's would replace stdout with a pipe of its own.
        let out = b
            .command(args)
            .stdout(Stdio::from(writer))
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
            .wait_with_output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "tally {args:?}: {stderr}");
        assert!(
            !stderr.to_lowercase().contains("broken pipe"),
            "tally {args:?}: {stderr}"
        );
    }
}

/// Regression (docs/reliability.md, "Findings"): a state directory writable by every user was used
/// silently. The command refuses it, and its one error line (which quotes the path) reaches the
/// terminal with the path's control characters escaped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_world_writable_state_directory_is_refused_with_an_escaped_error() {
    use std::os::unix::fs::PermissionsExt;
    let b = Bench::new().await;
    let state = b.path("state\u{1b}[2J");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).unwrap();
    let log = fixture("escape_sequences.jsonl");
    let run = b
        .run(&["replay", "--state-dir", state.to_str().unwrap(), &log])
        .await;
    run.assert_code(1);
    assert!(
        run.stderr.contains("writable by every user") && run.stderr.contains("chmod o-w"),
        "{}",
        run.stderr
    );
    assert_no_terminal_controls("the error line", &run.stderr);
    assert!(!state.join("shipper.db").exists());
}
