//! Shipper benchmark harness (not a test); driven by `bench/ship.sh`.
//!
//! - `ship_bench ingest FILE STATE_DIR`: the shipper's read path — the tailer, parsing, the
//!   outbox — without sending: lines/s until the whole file is committed.
//! - `ship_bench ingest-direct FILE STATE_DIR`: the outbox write path alone — split FILE into
//!   lines, parse, resolve, and `Outbox::ingest` in chunks — and print lines/s.
//! - `ship_bench parse-only FILE`: parsing and event building alone.
//! - `ship_bench deliver TALLY_BIN FILE STATE_DIR`: end to end. Starts the Lago emulator here,
//!   runs `tally ship` (TALLY_BIN) as a child on FILE, and reports events/s until Lago holds
//!   every line, HTTP requests per event, and the child's peak RSS.
//! - `ship_bench deliver-to URL TALLY_BIN FILE STATE_DIR`: the same against a Lago stand-in
//!   already listening at URL (bench/lago_sink.py), which counts at `GET URL/count`.
//! - `ship_bench replay TALLY_BIN FILE STATE_DIR`: `tally replay FILE` into a fresh outbox, as
//!   a child; lines/s, its CPU and peak RSS.
//! - `ship_bench replay-ship TALLY_BIN FILE STATE_DIR`: `tally replay --ship FILE` into a fresh
//!   outbox, delivering to the Lago emulator started here: lines/s until it exits, its CPU and
//!   peak RSS (which the ids it waits for must not grow).
//! - `ship_bench acked-disk N STATE_DIR v7|v4`: the outbox's own ingest and ack on N synthetic
//!   events, then the size of shipper.db per acked id.
//! - `ship_bench latency TALLY_BIN DIR RATE SECS`: appends RATE lines/s for SECS seconds to a
//!   live log that a `tally ship` child follows; reports append → stored-at-Lago latency
//!   percentiles and the child's peak RSS.
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
        Some("ingest") => ingest(&args[1], &args[2]),
        Some("deliver") => deliver(&args[1], &args[2], &args[3]),
        Some("deliver-to") => deliver_to(&args[1], &args[2], &args[3], &args[4]),
        Some("replay") => replay(&args[1], &args[2], &args[3]),
        Some("replay-ship") => replay_ship(&args[1], &args[2], &args[3]),
        Some("acked-disk") => acked_disk(args[1].parse()?, &args[2], &args[3]),
        Some("latency") => latency(&args[1], &args[2], args[3].parse()?, args[4].parse()?),
        _ => {
            eprintln!(
                "usage: ship_bench ingest|ingest-direct FILE STATE_DIR | parse-only FILE | \
                 deliver TALLY_BIN FILE STATE_DIR | deliver-to URL TALLY_BIN FILE STATE_DIR | \
                 replay|replay-ship TALLY_BIN FILE STATE_DIR | acked-disk N STATE_DIR v7|v4 | \
                 latency TALLY_BIN DIR RATE SECS"
            );
            std::process::exit(2);
        }
    }
}

fn ingest_direct(file: &str, state_dir: &str) -> anyhow::Result<()> {
    let spec = EventSpec {
        code: "llm_usage".into(),
        charge_by: Default::default(),
        precise_amount: None,
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
                file: file.into(),
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
        precise_amount: None,
    };
    let reader = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(file)?);
    let start = Instant::now();
    let mut n = 0u64;
    let mut bytes = 0usize;
    for line in reader.split(b'\n') {
        let line = line?;
        let item = line_to_item(
            Source {
                file: "".into(),
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

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// Tailer → reader → outbox, no sender.
fn ingest(file: &str, state_dir: &str) -> anyhow::Result<()> {
    use std::sync::Arc;
    use tally::ship::reader::{ReaderCtx, run_reader};
    use tally::ship::signal::WorkSignal;
    use tally::ship::storage::StorageGate;
    use tally::ship::tail::{TailOptions, Tailer};
    use tokio_util::sync::CancellationToken;

    let size = std::fs::metadata(file)?.len();
    let rt = runtime()?;
    rt.block_on(async {
        let outbox = Outbox::open_in(std::path::Path::new(state_dir))?;
        let tailer = Tailer::new(
            TailOptions {
                live_path: file.into(),
                poll_interval: std::time::Duration::from_millis(1000),
                max_line_bytes: 1 << 20,
                max_chunk_lines: tally::ship::CHUNK_LINES,
            },
            outbox.positions()?,
        )?;
        let spec = Arc::new(EventSpec {
            code: "llm_usage".into(),
            charge_by: Default::default(),
            precise_amount: None,
        });
        let stop = CancellationToken::new();
        let start = Instant::now();
        let storage = Arc::new(StorageGate::new(outbox.path().to_owned(), None));
        let ctx = ReaderCtx {
            outbox: outbox.shared(),
            spec,
            max_line_bytes: 1 << 20,
            signal: Arc::new(WorkSignal::default()),
            metrics: None,
            storage,
        };
        let reader = tokio::spawn(run_reader(tailer, ctx, stop.clone()));
        let watcher = Outbox::open_in(std::path::Path::new(state_dir))?;
        loop {
            let done = watcher.positions()?.iter().any(|p| p.offset >= size);
            if done {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let secs = start.elapsed().as_secs_f64();
        let cpu = cpu_secs(std::process::id());
        stop.cancel();
        let report = reader.await??;
        let lines = report.pending + report.held + report.not_billable + report.rejected;
        println!(
            "{}",
            serde_json::json!({"measure": "ingest_tailer", "lines": lines, "secs": secs,
                "lines_per_sec": lines as f64 / secs, "cpu_secs": cpu,
                "lines_per_cpu_sec": cpu.map(|c| lines as f64 / c),
                "rss_peak_kib": rss_peak_kib(std::process::id())})
        );
        anyhow::Ok(())
    })
}

fn rss_peak_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

fn ship_child(
    tally_bin: &str,
    base_url: &str,
    log: &std::path::Path,
    state_dir: &std::path::Path,
) -> anyhow::Result<std::process::Child> {
    Ok(std::process::Command::new(tally_bin)
        .arg("ship")
        .env("LAGO_API_BASE", base_url)
        .env("LAGO_API_KEY", "bench-key")
        .env("LAGO_API_EVENT_CODE", "llm_usage")
        .env("TALLY_SPEND_LOG", log)
        .env("TALLY_STATE_DIR", state_dir)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()?)
}

/// User + system CPU seconds a process has used so far.
fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the `(comm)`: state is field 3; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf is a plain query.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks / hz)
}

fn stop_child(mut child: std::process::Child) -> anyhow::Result<Option<u64>> {
    let rss = rss_peak_kib(child.id());
    // SAFETY: signalling our own child by pid.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    child.wait()?;
    Ok(rss)
}

/// End to end: FILE through `tally ship` to the emulator.
fn deliver(tally_bin: &str, file: &str, state_dir: &str) -> anyhow::Result<()> {
    let mut lines = 0usize;
    for line in std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(file)?).split(b'\n')
    {
        line?;
        lines += 1;
    }
    let rt = runtime()?;
    rt.block_on(async {
        let emu = emulator().await?;
        let start = Instant::now();
        let child = ship_child(
            tally_bin,
            &emu.base_url(),
            std::path::Path::new(file),
            std::path::Path::new(state_dir),
        )?;
        let mut peak = 0u64;
        while emu.event_count() < lines {
            peak = peak.max(rss_peak_kib(child.id()).unwrap_or(0));
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let secs = start.elapsed().as_secs_f64();
        let ship_cpu = cpu_secs(child.id());
        let emulator_cpu = cpu_secs(std::process::id());
        let rss = stop_child(child)?.unwrap_or(0).max(peak);
        let c = emu.counters();
        println!(
            "{}",
            serde_json::json!({"measure": "deliver_end_to_end", "events": lines, "secs": secs,
                "events_per_sec": lines as f64 / secs,
                "batch_requests": c.batch_requests,
                "requests_per_event": c.batch_requests as f64 / lines as f64,
                "duplicates": c.duplicates,
                "ship_cpu_secs": ship_cpu,
                "emulator_and_harness_cpu_secs": emulator_cpu,
                "ship_rss_peak_kib": rss})
        );
        anyhow::Ok(())
    })
}

/// The Lago emulator on a free loopback port, with the key the shipper child is given.
async fn emulator() -> anyhow::Result<tally::lago_emulator::EmulatorHandle> {
    Ok(tally::lago_emulator::spawn(
        tally::lago_emulator::EmulatorConfig {
            api_key: "bench-key".into(),
            ..Default::default()
        },
        ([127, 0, 0, 1], 0).into(),
    )
    .await?)
}

/// Append at RATE lines/s; measure append → stored at Lago.
fn latency(tally_bin: &str, dir: &str, rate: u64, secs: u64) -> anyhow::Result<()> {
    use std::collections::HashMap;
    use std::io::Write;
    let dir = std::path::Path::new(dir);
    std::fs::create_dir_all(dir)?;
    let log = dir.join("live.jsonl");
    let state = dir.join("state");
    let rt = runtime()?;
    rt.block_on(async {
        let emu = emulator().await?;
        std::fs::File::create(&log)?;
        let child = ship_child(tally_bin, &emu.base_url(), &log, &state)?;
        // Let it start and watch the file.
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        let total = rate * secs;
        let log2 = log.clone();
        let appended = tokio::task::spawn_blocking(move || -> anyhow::Result<HashMap<String, i64>> {
            let mut f = std::fs::OpenOptions::new().append(true).open(&log2)?;
            let mut at = HashMap::with_capacity(total as usize);
            let start = Instant::now();
            let base = chrono::Utc::now();
            for i in 0..total {
                let due = start + std::time::Duration::from_secs_f64(i as f64 / rate as f64);
                if let Some(w) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(w);
                }
                let mut r = tally::spend::SpendRecord::parse_line(
                    br#"{"schema":1,"transaction_id":"x","end_time":"2026-11-27T10:00:00.000Z","model":"gpt-4o-mini","input_tokens":12,"output_tokens":30,"end_user_id":"customer-1","status":"success"}"#,
                )?;
                r.transaction_id = uuid::Uuid::now_v7().to_string();
                r.end_time = base + chrono::Duration::milliseconds(i as i64);
                let line = r.to_line();
                let now_ms = chrono::Utc::now().timestamp_millis();
                f.write_all(&line)?;
                at.insert(r.transaction_id, now_ms);
            }
            Ok(at)
        })
        .await??;
        let n = appended.len();
        while emu.event_count() < n {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let rss = stop_child(child)?;
        let mut lat: Vec<i64> = emu
            .events()
            .iter()
            .filter_map(|e| appended.get(&e.transaction_id).map(|t| e.received_at_millis - t))
            .collect();
        lat.sort_unstable();
        let pct = |p: f64| lat[((lat.len() as f64 * p).ceil() as usize).saturating_sub(1).min(lat.len() - 1)];
        let c = emu.counters();
        println!(
            "{}",
            serde_json::json!({"measure": "latency", "rate": rate, "events": lat.len(),
                "p50_ms": pct(0.50), "p90_ms": pct(0.90), "p99_ms": pct(0.99), "max_ms": lat[lat.len() - 1],
                "batch_requests": c.batch_requests,
                "events_per_request": lat.len() as f64 / c.batch_requests as f64,
                "ship_rss_peak_kib": rss})
        );
        anyhow::Ok(())
    })
}

fn count_lines(file: &str) -> anyhow::Result<usize> {
    let mut lines = 0usize;
    for line in std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(file)?).split(b'\n')
    {
        line?;
        lines += 1;
    }
    Ok(lines)
}

/// End to end against a Lago stand-in that is already running (bench/lago_sink.py).
fn deliver_to(url: &str, tally_bin: &str, file: &str, state_dir: &str) -> anyhow::Result<()> {
    let lines = count_lines(file)?;
    let rt = runtime()?;
    rt.block_on(async {
        let client = reqwest::Client::new();
        // The events the sink has acknowledged, and the CPU seconds it has spent.
        let count = || async {
            let v: serde_json::Value = client
                .get(format!("{url}/count"))
                .send()
                .await?
                .json()
                .await?;
            anyhow::Ok((
                v["events"].as_u64().unwrap_or(0) as usize,
                v["cpu_secs"].as_f64(),
            ))
        };
        let (before, sink_cpu_before) = count().await?;
        let start = Instant::now();
        let child = ship_child(
            tally_bin,
            url,
            std::path::Path::new(file),
            std::path::Path::new(state_dir),
        )?;
        let mut peak = 0u64;
        let sink_cpu_after = loop {
            let (n, cpu) = count().await?;
            if n - before >= lines {
                break cpu;
            }
            peak = peak.max(rss_peak_kib(child.id()).unwrap_or(0));
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        };
        let secs = start.elapsed().as_secs_f64();
        let ship_cpu = cpu_secs(child.id());
        let sink_cpu = sink_cpu_after.zip(sink_cpu_before).map(|(a, b)| a - b);
        let rss = stop_child(child)?.unwrap_or(0).max(peak);
        println!(
            "{}",
            serde_json::json!({"measure": "deliver_to_sink", "sink": url, "events": lines,
                "secs": secs, "events_per_sec": lines as f64 / secs,
                "ship_cpu_secs": ship_cpu,
                "ship_cpu_us_per_event": ship_cpu.map(|c| c * 1e6 / lines as f64),
                "sink_cpu_secs": sink_cpu,
                "sink_cpu_us_per_event": sink_cpu.map(|c| c * 1e6 / lines as f64),
                "ship_rss_peak_kib": rss})
        );
        anyhow::Ok(())
    })
}

/// CPU seconds and peak RSS (KiB) of the waited-for children so far.
fn children_usage() -> (f64, u64) {
    // SAFETY: getrusage fills the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (secs(ru.ru_utime) + secs(ru.ru_stime), ru.ru_maxrss as u64)
}

/// `tally replay FILE` into an empty state directory, as an operator runs it.
fn replay(tally_bin: &str, file: &str, state_dir: &str) -> anyhow::Result<()> {
    let lines = count_lines(file)?;
    let run = run_timed(replay_command(tally_bin, &[file], state_dir))?;
    println!(
        "{}",
        serde_json::json!({"measure": "replay_into_outbox", "lines": lines, "secs": run.secs,
            "lines_per_sec": lines as f64 / run.secs, "cpu_secs": run.cpu,
            "cpu_us_per_line": run.cpu * 1e6 / lines as f64, "rss_peak_kib": run.rss_kib})
    );
    Ok(())
}

/// `tally replay --ship FILE` into an empty state directory, delivering to the emulator.
fn replay_ship(tally_bin: &str, file: &str, state_dir: &str) -> anyhow::Result<()> {
    let lines = count_lines(file)?;
    // The emulator is served by the runtime's workers while this thread waits for the child.
    let rt = runtime()?;
    let emu = rt.block_on(emulator())?;
    let mut replay = replay_command(tally_bin, &["--ship", file], state_dir);
    replay
        .env("LAGO_API_BASE", emu.base_url())
        .env("LAGO_API_KEY", "bench-key");
    let run = run_timed(replay)?;
    println!(
        "{}",
        serde_json::json!({"measure": "replay_ship", "lines": lines, "secs": run.secs,
            "lines_per_sec": lines as f64 / run.secs, "stored_at_lago": emu.event_count(),
            "cpu_secs": run.cpu, "cpu_us_per_line": run.cpu * 1e6 / lines as f64,
            "rss_peak_kib": run.rss_kib})
    );
    Ok(())
}

/// `tally replay ARGS` into STATE_DIR, its output discarded.
fn replay_command(tally_bin: &str, args: &[&str], state_dir: &str) -> std::process::Command {
    let mut cmd = std::process::Command::new(tally_bin);
    cmd.arg("replay")
        .args(args)
        .args(["--output-format", "json"])
        .env("LAGO_API_EVENT_CODE", "llm_usage")
        .env("TALLY_STATE_DIR", state_dir)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null());
    cmd
}

/// What a child run by [`run_timed`] took.
struct ChildRun {
    secs: f64,
    /// User + system CPU seconds.
    cpu: f64,
    rss_kib: u64,
}

/// Runs `cmd` to its end (it must succeed), timing it.
fn run_timed(mut cmd: std::process::Command) -> anyhow::Result<ChildRun> {
    let (cpu_before, _) = children_usage();
    let start = Instant::now();
    let status = cmd.status()?;
    let secs = start.elapsed().as_secs_f64();
    anyhow::ensure!(status.success(), "tally replay failed: {status}");
    let (cpu_after, rss_kib) = children_usage();
    Ok(ChildRun {
        secs,
        cpu: cpu_after - cpu_before,
        rss_kib,
    })
}

/// The outbox's size per acked id: N synthetic events ingested and acked by the outbox's own
/// code, in the chunk and batch sizes the shipper uses, then checkpointed.
fn acked_disk(n: u64, state_dir: &str, ids: &str) -> anyhow::Result<()> {
    use tally::ship::outbox::IngestItem;
    let random = match ids {
        "v4" => true,
        "v7" => false,
        other => anyhow::bail!("ids must be v7 or v4, not {other}"),
    };
    let spec = EventSpec {
        code: "llm_usage".into(),
        charge_by: Default::default(),
        precise_amount: None,
    };
    let dir = std::path::Path::new(state_dir);
    let mut outbox = Outbox::open_in(dir)?;
    let lock = outbox
        .try_lock_sender()?
        .ok_or_else(|| anyhow::anyhow!("another sender holds {state_dir}"))?;
    let template = tally::spend::SpendRecord::parse_line(
        br#"{"schema":1,"transaction_id":"x","end_time":"2026-11-27T10:00:00.000Z","model":"gpt-4o-mini","input_tokens":12,"output_tokens":30,"end_user_id":"customer-1","user_id":"user-1","team_id":"team-a","response_cost":0.000015,"status":"success"}"#,
    )?;
    let base = template.end_time;
    let start = Instant::now();
    let mut done = 0u64;
    let chunk = tally::ship::CHUNK_LINES as u64;
    while done < n {
        let take = chunk.min(n - done);
        let items: Vec<IngestItem> = (done..done + take)
            .map(|i| {
                let mut r = template.clone();
                r.transaction_id = if random {
                    uuid::Builder::from_random_bytes(rand::random()).into_uuid()
                } else {
                    uuid::Uuid::now_v7()
                }
                .to_string();
                r.end_time = base + chrono::Duration::milliseconds(i as i64);
                r.end_user_id = Some(format!("customer-{}", i % 100));
                let line = r.to_line();
                line_to_item(
                    Source {
                        file: "/var/log/tally/spend.jsonl".into(),
                        offset: i * 400,
                    },
                    &line[..line.len() - 1],
                    &spec,
                )
            })
            .collect();
        outbox.ingest(&items, &[])?;
        let (claimed, _) = outbox.claim(take as usize, None, &Default::default(), &lock)?;
        for batch in claimed.chunks(100) {
            let pairs: Vec<(i64, &str)> = batch
                .iter()
                .map(|e| (e.seq, e.transaction_id.as_str()))
                .collect();
            outbox.ack(&pairs, None)?;
        }
        done += take;
    }
    let secs = start.elapsed().as_secs_f64();
    drop(outbox);
    // Closing the last connection checkpoints and removes the WAL: what is left is the file.
    let bytes = std::fs::metadata(dir.join(tally::ship::outbox::DB_FILE))?.len();
    let wal = std::fs::metadata(dir.join("shipper.db-wal")).map_or(0, |m| m.len());
    println!(
        "{}",
        serde_json::json!({"measure": "acked_disk", "ids": ids, "acked": n,
            "db_bytes": bytes, "wal_bytes": wal, "bytes_per_acked_id": (bytes + wal) as f64 / n as f64,
            "gib_per_10m": (bytes + wal) as f64 / n as f64 * 1e7 / (1u64 << 30) as f64,
            "secs": secs})
    );
    Ok(())
}
