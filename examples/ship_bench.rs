//! Shipper benchmark harness (not a test); driven by `bench/ship.sh`.
//!
//! - `ship_bench ingest-direct FILE STATE_DIR`: the outbox write path alone — split FILE into
//!   lines, parse, resolve, and `Outbox::ingest` in chunks — and print lines/s.
//!
//! Output is one JSON object per measurement on stdout.

use std::io::BufRead;
use std::time::Instant;

use tally::ship::outbox::{Outbox, Source};
use tally::ship::reader::line_to_item;
use tally::ship::resolve::EventSpec;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("ingest-direct") => ingest_direct(&args[1], &args[2]),
        Some("parse-only") => parse_only(&args[1]),
        _ => {
            eprintln!("usage: ship_bench ingest-direct FILE STATE_DIR");
            std::process::exit(2);
        }
    }
}

fn ingest_direct(file: &str, state_dir: &str) -> anyhow::Result<()> {
    let spec = EventSpec {
        code: "llm_usage".into(),
        charge_by: Default::default(),
    };
    let mut outbox = Outbox::open_in(std::path::Path::new(state_dir))?;
    let reader = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(file)?);
    let start = Instant::now();
    let mut offset = 0u64;
    let mut chunk = Vec::with_capacity(tally::ship::CHUNK_LINES);
    let mut total = 0u64;
    for line in reader.split(b'\n') {
        let line = line?;
        let len = line.len() as u64 + 1;
        chunk.push(line_to_item(
            Source {
                file: file.to_owned(),
                offset,
            },
            &line,
            &spec,
        ));
        offset += len;
        if chunk.len() == tally::ship::CHUNK_LINES {
            total += chunk.len() as u64;
            outbox.ingest(&chunk, &[])?;
            chunk.clear();
        }
    }
    total += chunk.len() as u64;
    outbox.ingest(&chunk, &[])?;
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({"measure": "ingest_direct", "lines": total, "secs": secs,
            "lines_per_sec": total as f64 / secs})
    );
    Ok(())
}

/// CPU cost of turning lines into ingest items, without SQLite (for the breakdown).
pub fn parse_only(file: &str) -> anyhow::Result<()> {
    let spec = EventSpec {
        code: "llm_usage".into(),
        charge_by: Default::default(),
    };
    let reader = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(file)?);
    let start = Instant::now();
    let mut n = 0u64;
    let mut bytes = 0usize;
    for line in reader.split(b'\n') {
        let line = line?;
        let item = line_to_item(
            Source {
                file: String::new(),
                offset: 0,
            },
            &line,
            &spec,
        );
        if let tally::ship::outbox::IngestItem::Record { prepared, .. } = item {
            bytes += prepared.transaction_id.len();
        }
        n += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({"measure": "parse_only", "lines": n, "secs": secs, "lines_per_sec": n as f64 / secs, "check": bytes})
    );
    Ok(())
}
