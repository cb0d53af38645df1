//! Writes a synthetic spend log for fixtures and benchmarks.
//!
//! `cargo run --release --example gen_spend_log -- OUT LINES [--customers N] [--rate LINES_PER_SEC] [--ids v7|v4]`
//!
//! Records are valid schema-1 lines with UUIDv7 transaction ids (as tally's proxy writes them;
//! `--ids v4`: random ids, as LiteLLM writes them), spread over `N` end users
//! (default 100), end times one millisecond apart. With `--rate`, lines are appended at that
//! pace (one `write` per line, like the proxy) and each line's append time is printed to stdout
//! as `transaction_id<TAB>unix_micros`, for latency measurements.

use std::io::Write;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tally::spend::SpendRecord;

fn record(
    i: u64,
    customers: u64,
    base: chrono::DateTime<chrono::Utc>,
    random_ids: bool,
) -> SpendRecord {
    let end = base + chrono::Duration::milliseconds(i as i64);
    SpendRecord {
        schema: 1,
        transaction_id: if random_ids {
            uuid::Builder::from_random_bytes(rand::random())
                .into_uuid()
                .to_string()
        } else {
            uuid::Uuid::now_v7().to_string()
        },
        start_time: Some(end - chrono::Duration::milliseconds(420)),
        end_time: end,
        call_type: "chat_completion".into(),
        model: "gpt-4o-mini".into(),
        upstream_model: Some("gpt-4o-mini-2024-07-18".into()),
        input_tokens: 12 + i % 50,
        output_tokens: 30 + i % 200,
        total_tokens: Some(42 + i % 50 + i % 200),
        cache_read_input_tokens: 0,
        cache_creation_input_tokens: 0,
        reasoning_tokens: 0,
        usage_estimated: false,
        response_cost: Some(0.000_015 * (1 + i % 7) as f64),
        end_user_id: Some(format!("customer-{}", i % customers)),
        user_id: Some("user-1".into()),
        team_id: Some("team-a".into()),
        key_alias: Some("team-a-key".into()),
        key_hash: Some("5e".repeat(32)),
        stream: i.is_multiple_of(3),
        status: tally::spend::Status::Success,
        duration_ms: Some(420),
    }
}

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage =
        "usage: gen_spend_log OUT LINES [--customers N] [--rate LINES_PER_SEC] [--ids v7|v4]";
    let (Some(out), Some(lines)) = (
        args.first(),
        args.get(1).and_then(|n| n.parse::<u64>().ok()),
    ) else {
        eprintln!("{usage}");
        std::process::exit(2);
    };
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    let customers = flag("--customers").unwrap_or(100).max(1);
    let rate = flag("--rate");
    let random_ids = match args
        .iter()
        .position(|a| a == "--ids")
        .map(|i| args.get(i + 1))
    {
        None => false,
        Some(Some(v)) if v == "v7" => false,
        Some(Some(v)) if v == "v4" => true,
        Some(_) => {
            eprintln!("--ids takes v7 or v4\n{usage}");
            std::process::exit(2);
        }
    };
    let base: chrono::DateTime<chrono::Utc> = chrono::Utc::now();
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(out)?;
    match rate {
        None => {
            let mut buf = std::io::BufWriter::with_capacity(1 << 20, file);
            for i in 0..lines {
                buf.write_all(&record(i, customers, base, random_ids).to_line())?;
            }
            buf.flush()?;
        }
        Some(rate) => {
            let start = Instant::now();
            let stdout = std::io::stdout();
            let mut stdout = stdout.lock();
            for i in 0..lines {
                let due = start + Duration::from_secs_f64(i as f64 / rate.max(1) as f64);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                let r = record(i, customers, chrono::Utc::now(), random_ids);
                file.write_all(&r.to_line())?;
                let micros = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_micros())
                    .unwrap_or(0);
                writeln!(stdout, "{}\t{micros}", r.transaction_id)?;
            }
        }
    }
    Ok(())
}
