//! Bad input (docs/reliability.md): every file in `fixtures/bad/` (plus an 8 MiB line and a larger
//! binary file generated here) goes through the real `tally ship` between good lines, one case per
//! rotated spend-log file. Each gets its reason in `tally queue list --state rejected`, the good
//! lines around it are billed exactly once, and the shipper keeps running.

use std::path::PathBuf;

use crate::reliability::support::{LogWriter, Rig, figure};
use crate::support::{SpendLine, SplitMix};

/// A case: its name, its bytes, and what its rejection must say (reason, and the first bytes of
/// the rejected line when they are text worth matching).
struct Case {
    name: &'static str,
    bytes: Vec<u8>,
    reasons: Vec<&'static str>,
}

fn fixture(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/bad")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn cases() -> Vec<Case> {
    let mut rng = SplitMix(6);
    // Random bytes without a newline: one "line" over the 1 MiB limit.
    let big_binary: Vec<u8> = (0..(1 << 20) + 4096)
        .map(|_| match rng.below(256) as u8 {
            b'\n' => 0,
            b => b,
        })
        .collect();
    // An 8 MiB line: a record whose key_alias is 8 MiB long.
    let eight_mib = SpendLine::new("bad-8mib-line")
        .end_user("customer-0")
        .key_alias("x".repeat(8 << 20))
        .to_line()
        .into_bytes();
    let c = |name, reasons: &[&'static str]| Case {
        name,
        bytes: fixture(name),
        reasons: reasons.to_vec(),
    };
    vec![
        c("invalid_json.jsonl", &["invalid record"]),
        c(
            "truncated_last_line.jsonl",
            &["invalid record: EOF while parsing"],
        ),
        c("wrong_types.jsonl", &["field `input_tokens`"]),
        c("negative_tokens.jsonl", &["field `output_tokens`"]),
        c("huge_tokens.jsonl", &["input_tokens", "implausibly large"]),
        c("nan_cost.jsonl", &["invalid record: expected value"]),
        c(
            "infinite_cost.jsonl",
            &["field `response_cost`: number out of range"],
        ),
        c("invalid_utf8.jsonl", &["not valid UTF-8"]),
        c("unknown_schema.jsonl", &["unsupported schema version 2"]),
        c("conflicting_duplicate.jsonl", &["conflicting duplicate"]),
        c("empty.jsonl", &[]),
        c("binary.bin", &[]),
        Case {
            name: "generated: 8 MiB line",
            bytes: eight_mib,
            reasons: vec!["over the limit of 1048576 bytes"],
        },
        Case {
            name: "generated: 1 MiB binary without a newline",
            bytes: big_binary,
            reasons: vec!["over the limit of 1048576 bytes"],
        },
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_input_is_rejected_with_its_reason_and_the_good_lines_around_it_are_billed() {
    let rig = Rig::new().await;
    let mut writer = LogWriter::open(&rig.log());
    let mut ship = rig.spawn_ship(&[]);
    let cases = cases();
    // The shipper has the live file open once this line is billed: on a first start it reads
    // the live file only, and the first case's file is rotated right after it is written.
    writer.append(
        SpendLine::new("good-first")
            .end_user("customer-1")
            .to_line()
            .as_bytes(),
    );
    let mut good = vec!["good-first".to_owned()];
    rig.wait_stored_running(&mut ship, 1, "the first line")
        .await;
    // The first line of the conflicting pair is a good record: billed once, with its content.
    let mut extra = 0;
    for (i, case) in cases.iter().enumerate() {
        // good, bad, (rotation), good: the case sits alone at the end of its file, so even a
        // last line without its newline is handed out once the file is rotated away.
        let id = format!("good-before-{i}");
        writer.append(
            SpendLine::new(&id)
                .end_user("customer-1")
                .to_line()
                .as_bytes(),
        );
        good.push(id);
        writer.append(&case.bytes);
        writer.rotate();
        // The shipper must have read past the case before the next one starts: each case's
        // effect is then attributable, and the shipper is seen to survive every one.
        extra += usize::from(case.name.starts_with("conflicting"));
        rig.wait_stored_running(&mut ship, good.len() + extra, case.name)
            .await;
    }
    writer.append(
        SpendLine::new("good-last")
            .end_user("customer-1")
            .to_line()
            .as_bytes(),
    );
    good.push("good-last".into());
    good.push("dup-conflict".into());
    rig.wait_stored_running(&mut ship, good.len(), "the last good line")
        .await;

    rig.assert_exactly_once(&good);
    let dup = rig
        .lago
        .events()
        .into_iter()
        .find(|e| e.transaction_id == "dup-conflict")
        .unwrap();
    assert_eq!(
        dup.properties["input_tokens"], 7,
        "the first content is billed, not the conflicting one: {:?}",
        dup.properties
    );

    // Rejections are committed with the lines around them, but the check is eventual anyway.
    let all_said = |rejected: &[(String, String)]| {
        cases.iter().all(|c| {
            c.reasons
                .iter()
                .all(|want| rejected.iter().any(|(r, _)| r.contains(want)))
        })
    };
    crate::support::wait_until(
        "every case's rejection reasons",
        crate::reliability::support::PATIENCE,
        async || all_said(&rig.rejected()),
    )
    .await;
    let rejected = rig.rejected();
    let reasons: Vec<&str> = rejected.iter().map(|(r, _)| r.as_str()).collect();
    for case in &cases {
        for want in &case.reasons {
            assert!(
                rejected.iter().any(|(reason, _)| reason.contains(want)),
                "{}: no rejected line says {want:?}; reasons: {reasons:#?}",
                case.name
            );
        }
    }
    // Every rejected line of the text cases names its transaction id in its first bytes, so an
    // operator can find it; the binary cases produce only rejections that say why.
    for id in [
        "bad-invalid-json",
        "bad-truncated-last-line",
        "bad-wrong-types",
        "bad-negative-tokens",
        "bad-huge-tokens",
        "bad-nan-cost",
        "bad-infinite-cost",
        "bad-unknown-schema",
    ] {
        assert!(
            rejected.iter().any(|(_, head)| head.contains(id)),
            "{id} is not among the rejected lines: {rejected:#?}"
        );
    }
    let binary_lines = rejected
        .iter()
        .filter(|(r, _)| r.contains("not valid UTF-8") || r.contains("invalid record"))
        .count();
    assert!(binary_lines >= 3, "{rejected:#?}");
    // Nothing rejected is billed: Lago has only the good ids (checked above), and the shipper
    // still runs after all of it.
    assert!(ship.exited().is_none());
    let status = ship.terminate().unwrap();
    assert!(status.success(), "SIGTERM exit: {status}");
    figure(
        "bad_input",
        format!(
            "{} cases, {} rejected lines, {} good lines billed once",
            cases.len(),
            rejected.len(),
            good.len()
        ),
    );
}
