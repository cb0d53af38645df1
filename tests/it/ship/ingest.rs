//! The ingest path any reader uses (the tailer, `tally replay`): fixture files → parsed or
//! rejected lines → the outbox, with dedupe.

use std::path::{Path, PathBuf};

use tally::ship::outbox::{IngestItem, IngestReport, ListFilter, Outbox, Source, State};
use tally::ship::reader::line_to_item;
use tally::ship::resolve::EventSpec;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/spend")
        .join(name)
}

fn items(path: &Path, spec: &EventSpec) -> Vec<IngestItem> {
    let bytes = std::fs::read(path).unwrap();
    let mut offset = 0u64;
    let mut out = Vec::new();
    for line in bytes.split_inclusive(|b| *b == b'\n') {
        let body = line.strip_suffix(b"\n").unwrap_or(line);
        out.push(line_to_item(
            Source {
                file: path.display().to_string().into(),
                offset,
            },
            body,
            spec,
        ));
        offset += line.len() as u64;
    }
    out
}

fn spec(charge_by: &str) -> EventSpec {
    EventSpec {
        code: "llm_usage".into(),
        charge_by: charge_by.parse().unwrap(),
        precise_amount: None,
    }
}

#[test]
fn malformed_fixture_lines_are_rejected_with_file_offset_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let mut ob = Outbox::open_in(dir.path()).unwrap();
    let path = fixture("malformed.jsonl");
    let report = ob.ingest(&items(&path, &spec("end_user_id")), &[]).unwrap();
    assert_eq!(
        report,
        IngestReport {
            pending: 1,
            held: 1,
            rejected: 6,
            conflicts: 1,
            ..Default::default()
        }
    );
    let rejected = ob.list(ListFilter::Rejected, 100).unwrap();
    assert_eq!(rejected.len(), 7);
    let reasons: Vec<&str> = rejected
        .iter()
        .map(|r| r.reason.as_deref().unwrap())
        .collect();
    assert!(reasons[0].contains("invalid record"), "{reasons:?}");
    assert!(reasons[1].contains("input_tokens"), "{reasons:?}");
    assert!(reasons[2].contains("upgrade tally"), "{reasons:?}");
    assert!(reasons[3].contains("RFC 3339"), "{reasons:?}");
    assert!(reasons[4].contains("missing field"), "{reasons:?}");
    assert!(reasons[5].contains("conflicting duplicate"), "{reasons:?}");
    assert!(reasons[6].contains("UTF-8"), "{reasons:?}");
    // Offsets point at the start of each line in the file.
    let bytes = std::fs::read(&path).unwrap();
    for r in &rejected {
        let off = r.source_offset.unwrap() as usize;
        assert!(off == 0 || bytes[off - 1] == b'\n', "offset {off}");
        assert_eq!(
            r.source_file.as_deref(),
            Some(path.display().to_string().as_str())
        );
    }
    // Reading the same file again changes nothing.
    let again = ob.ingest(&items(&path, &spec("end_user_id")), &[]).unwrap();
    assert_eq!((again.pending, again.rejected, again.conflicts), (0, 0, 0));
    assert_eq!(again.already_seen, 2);
}

#[test]
fn good_fixture_resolves_per_charge_by_and_skips_failures() {
    let dir = tempfile::tempdir().unwrap();
    let mut ob = Outbox::open_in(dir.path()).unwrap();
    let report = ob
        .ingest(&items(&fixture("good.jsonl"), &spec("team_id")), &[])
        .unwrap();
    // Record 3 has no team; record 4 is a failure.
    assert_eq!(
        (report.pending, report.held, report.not_billable),
        (3, 1, 1)
    );
    let shown = ob
        .show("0193a1b2-0000-7000-8000-000000000001")
        .unwrap()
        .unwrap();
    assert_eq!(shown.external_subscription_id.as_deref(), Some("team-a"));
    let held = ob
        .show("0193a1b2-0000-7000-8000-000000000003")
        .unwrap()
        .unwrap();
    assert_eq!(held.state, State::Held);
    assert_eq!(
        held.reason.as_deref(),
        Some("no team_id on this record; LAGO_API_CHARGE_BY=team_id")
    );
    let with_cost = ob
        .show("0193a1b2-0000-7000-8000-000000000005")
        .unwrap()
        .unwrap();
    assert!(
        with_cost
            .event
            .unwrap()
            .contains("\"response_cost\":0.0001675")
    );
}
