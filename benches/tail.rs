//! Tailer read throughput: a 1,000,000-line spend log (realistic ~420-byte records) read from the
//! page cache through `poll_chunk`, as the outbox would, with peak RSS. Run with
//! `cargo bench --bench tail`. Not a test: numbers depend on the machine.

use std::io::Write;
use std::time::{Duration, Instant};

use tally::ship::tail::{LineContent, TailOptions, Tailer};

const LINES: usize = 1_000_000;

fn main() {
    let dir = tempfile::tempdir().expect("temp dir");
    let live = dir.path().join("spend.jsonl");
    {
        let mut out = std::io::BufWriter::new(std::fs::File::create(&live).expect("create"));
        for i in 0..LINES {
            writeln!(
                out,
                r#"{{"schema":1,"transaction_id":"0193a3c1-0000-7000-8000-{i:012}","start_time":"2026-11-27T10:15:00.000Z","end_time":"2026-11-27T10:15:01.234Z","call_type":"chat_completion","model":"gpt-4o-mini","upstream_model":"gpt-4o-mini-2024-07-18","input_tokens":7,"output_tokens":15,"total_tokens":22,"response_cost":0.0001675,"end_user_id":"customer-{c}","user_id":null,"team_id":"team-a","key_alias":"ci","key_hash":"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08","stream":false,"status":"success","duration_ms":1234}}"#,
                c = i % 97
            )
            .expect("write");
        }
    }
    let size = std::fs::metadata(&live).expect("stat").len();
    // Warm the page cache, as a live tail would find it.
    if let Ok(mut f) = std::fs::File::open(&live) {
        let _ = std::io::copy(&mut f, &mut std::io::sink());
    }
    let options = TailOptions {
        live_path: live,
        poll_interval: Duration::from_millis(200),
        max_line_bytes: 1024 * 1024,
        max_chunk_lines: 1000,
    };
    let mut tailer = Tailer::new(options, Vec::new()).expect("tailer");
    let start = Instant::now();
    let (mut lines, mut bytes) = (0usize, 0usize);
    while let Some(chunk) = tailer.poll_chunk().expect("read") {
        for line in &chunk.lines {
            if let LineContent::Complete(b) = &line.content {
                bytes += b.len();
            }
        }
        lines += chunk.lines.len();
    }
    let elapsed = start.elapsed();
    assert_eq!(lines, LINES);
    println!(
        "tail: {lines} lines ({:.0} MiB, {bytes} payload bytes) in {:.3} s = {:.0} lines/s, {:.0} MiB/s",
        size as f64 / 1048576.0,
        elapsed.as_secs_f64(),
        lines as f64 / elapsed.as_secs_f64(),
        size as f64 / 1048576.0 / elapsed.as_secs_f64()
    );
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        // VmHWM is the peak for the whole process, file generation included.
        for l in status
            .lines()
            .filter(|l| l.starts_with("VmHWM") || l.starts_with("VmRSS"))
        {
            println!("{l}");
        }
    }
}
