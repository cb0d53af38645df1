//! An open-loop, fixed-rate HTTP load generator for `bench/proxy.sh` (not a test).
//!
//! `wrk` is a closed loop: each connection sends its next request when the previous answer
//! arrives, so at 64 connections the target is always saturated and its latency is mostly time in
//! its own queue. To see what a proxy *adds* at a given load, requests must be offered at a fixed
//! rate whatever the answers do, and each latency measured from when the request was *due*
//! (so a stall that delays later sends is charged to them: no coordinated omission).
//!
//! How: one global schedule, request `i` due at `start + i / rate`. Each of `--connections`
//! HTTP/1.1 keep-alive connections takes the next due request, waits for its due time on a
//! timerfd (microsecond precision; Tokio's timer has 1 ms ticks), sends it, reads the whole
//! answer, and records `completion − due`. When every connection is busy, due requests wait and
//! that wait counts in their latency, as it would for a real client.
//!
//!     cargo run --release --example loadgen -- --url http://127.0.0.1:8080/v1/chat/completions \
//!         --rate 5000 --connections 64 --duration 10 --body '{"model":"m"}' \
//!         --header 'content-type: application/json'
//!
//! Prints a human summary and a final `RESULT key=value …` line for scripts. `sustained=no`
//! means the target (or this generator) did not keep up with the offered rate: the achieved rate
//! fell short, or requests went out late; the latency figures are then not an "added latency at
//! this rate" measure.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, Uri};
use hyper_util::rt::TokioIo;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::net::TcpStream;

/// Achieved rate below this share of the offered rate: not sustained.
const MIN_RATE_SHARE: f64 = 0.97;
/// Requests sent later than this after their due time (p99): the generator could not keep the
/// schedule (or every connection was busy), not sustained.
const MAX_SEND_LAG_P99: Duration = Duration::from_millis(5);

struct Args {
    url: Uri,
    rate: f64,
    connections: usize,
    duration: Duration,
    warmup: Duration,
    threads: usize,
    body: Bytes,
    headers: Vec<(String, String)>,
}

fn usage() -> ! {
    eprintln!(
        "usage: loadgen --url http://host:port/path --rate REQ_PER_S [--connections 64] \
         [--duration 10] [--warmup 1] [--threads 1] [--body TEXT | --body-file PATH] \
         [--header 'name: value']..."
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut args = std::env::args().skip(1);
    let mut url = None;
    let mut rate = None;
    let mut connections = 64;
    let mut duration = 10.0;
    let mut warmup = 1.0;
    let mut threads = 1;
    let mut body = Bytes::new();
    let mut headers = Vec::new();
    while let Some(flag) = args.next() {
        let Some(value) = args.next() else { usage() };
        let number = |v: &str| v.parse::<f64>().unwrap_or_else(|_| usage());
        match flag.as_str() {
            "--url" => url = Some(value.parse::<Uri>().unwrap_or_else(|_| usage())),
            "--rate" => rate = Some(number(&value)),
            "--connections" => connections = number(&value) as usize,
            "--duration" => duration = number(&value),
            "--warmup" => warmup = number(&value),
            "--threads" => threads = number(&value) as usize,
            "--body" => body = Bytes::from(value),
            "--body-file" => body = Bytes::from(std::fs::read(&value).unwrap_or_else(|_| usage())),
            "--header" => {
                let Some((name, v)) = value.split_once(':') else {
                    usage()
                };
                headers.push((name.trim().to_owned(), v.trim().to_owned()));
            }
            _ => usage(),
        }
    }
    let (Some(url), Some(rate)) = (url, rate) else {
        usage()
    };
    if !(rate > 0.0 && duration > 0.0 && connections > 0 && threads > 0) {
        usage()
    }
    Args {
        url,
        rate,
        connections,
        duration: Duration::from_secs_f64(duration),
        warmup: Duration::from_secs_f64(warmup),
        threads,
        body,
        headers,
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the timebase of the schedule and of the timerfds.
fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A one-shot absolute timer on CLOCK_MONOTONIC, awaited through the runtime's epoll.
struct Timer {
    fd: AsyncFd<OwnedFd>,
}

impl Timer {
    fn new() -> std::io::Result<Self> {
        // SAFETY: plain syscall; the returned descriptor is owned below.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: the OwnedFd stays open and the same descriptor for the AsyncFd's lifetime.
        let fd = unsafe { AsyncFd::register_with_interest(owned, Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        Ok(Self { fd })
    }

    /// Returns at `at_ns` (CLOCK_MONOTONIC), or at once if that has passed.
    async fn wait_until(&self, at_ns: u64) -> std::io::Result<()> {
        if now_ns() >= at_ns {
            return Ok(());
        }
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: (at_ns / 1_000_000_000) as libc::time_t,
                tv_nsec: (at_ns % 1_000_000_000) as libc::c_long,
            },
        };
        let fd = self.fd.get_ref().as_raw_fd();
        // SAFETY: fd is our timerfd; spec lives across the call.
        let rc = unsafe {
            libc::timerfd_settime(fd, libc::TFD_TIMER_ABSTIME, &spec, std::ptr::null_mut())
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        loop {
            let mut guard = self.fd.readable().await?;
            let mut expirations = 0u64;
            // SAFETY: reads 8 bytes into a u64 we own.
            let n = unsafe { libc::read(fd, (&raw mut expirations).cast(), 8) };
            if n == 8 {
                return Ok(());
            }
            guard.clear_ready();
        }
    }
}

/// What one connection measured.
#[derive(Default)]
struct Tally {
    /// Latency from due time to the end of the answer, microseconds (measured requests only).
    latencies_us: Vec<u32>,
    /// How late each measured request went out after its due time, microseconds.
    send_lag_us: Vec<u32>,
    ok: u64,
    non_2xx: u64,
    errors: u64,
    /// Completion time (ns) of the last request this connection finished.
    last_done_ns: u64,
}

struct Plan {
    start_ns: u64,
    interval_ns: f64,
    /// Requests in the warm-up part of the schedule (sent, not measured).
    warmup_requests: u64,
    total_requests: u64,
    /// After this time nothing more is sent (a target far behind schedule).
    give_up_ns: u64,
    next: AtomicU64,
}

impl Plan {
    fn due_ns(&self, i: u64) -> u64 {
        self.start_ns + (i as f64 * self.interval_ns) as u64
    }
}

async fn connect(uri: &Uri) -> Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>> {
    let host = uri.host()?;
    let port = uri.port_u16().unwrap_or(80);
    let stream = TcpStream::connect((host, port)).await.ok()?;
    stream.set_nodelay(true).ok()?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .ok()?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Some(sender)
}

async fn connection(args: Arc<Args>, plan: Arc<Plan>) -> Tally {
    let mut tally = Tally::default();
    let Ok(timer) = Timer::new() else {
        tally.errors += 1;
        return tally;
    };
    let mut sender = None;
    let authority = args
        .url
        .authority()
        .map(|a| a.as_str().to_owned())
        .unwrap_or_default();
    loop {
        let i = plan.next.fetch_add(1, Ordering::Relaxed);
        if i >= plan.total_requests {
            break;
        }
        let due = plan.due_ns(i);
        if timer.wait_until(due).await.is_err() {
            tally.errors += 1;
            continue;
        }
        let sent = now_ns();
        if sent > plan.give_up_ns {
            break;
        }
        if sender.is_none() {
            sender = connect(&args.url).await;
        }
        let Some(s) = sender.as_mut() else {
            tally.errors += 1;
            continue;
        };
        let mut request = Request::builder()
            .method(Method::POST)
            .uri(args.url.path_and_query().map_or("/", |p| p.as_str()))
            .header(hyper::header::HOST, authority.as_str());
        for (name, value) in &args.headers {
            request = request.header(name.as_str(), value.as_str());
        }
        let Ok(request) = request.body(Full::new(args.body.clone())) else {
            tally.errors += 1;
            continue;
        };
        let outcome = async {
            s.ready().await.ok()?;
            let response = s.send_request(request).await.ok()?;
            let status = response.status();
            response.into_body().collect().await.ok()?;
            Some(status)
        }
        .await;
        let done = now_ns();
        tally.last_done_ns = tally.last_done_ns.max(done);
        match outcome {
            Some(status) if status.is_success() => tally.ok += 1,
            Some(_) => tally.non_2xx += 1,
            None => {
                tally.errors += 1;
                sender = None;
                continue;
            }
        }
        if i >= plan.warmup_requests {
            tally
                .latencies_us
                .push(((done - due) / 1000).min(u32::MAX as u64) as u32);
            tally
                .send_lag_us
                .push(((sent.saturating_sub(due)) / 1000).min(u32::MAX as u64) as u32);
        }
    }
    tally
}

/// The `p`-th percentile (0–100) of sorted values, in milliseconds.
fn percentile_ms(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1] as f64 / 1000.0
}

fn main() -> std::io::Result<()> {
    let args = Arc::new(parse_args());
    // The kernel may defer timer wake-ups by the thread's slack (50 µs by default).
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1, 0, 0, 0) };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads)
        .on_thread_start(|| {
            // SAFETY: as above, for each worker thread.
            unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1, 0, 0, 0) };
        })
        .enable_all()
        .build()?;
    runtime.block_on(run(args))
}

async fn run(args: Arc<Args>) -> std::io::Result<()> {
    let interval_ns = 1e9 / args.rate;
    let warmup_requests = (args.warmup.as_secs_f64() * args.rate).round() as u64;
    let measured_requests = (args.duration.as_secs_f64() * args.rate).round() as u64;
    // Connect everything before the clock starts.
    let start_ns = now_ns() + 200_000_000;
    let schedule_end_ns =
        start_ns + ((warmup_requests + measured_requests) as f64 * interval_ns) as u64;
    let plan = Arc::new(Plan {
        start_ns,
        interval_ns,
        warmup_requests,
        total_requests: warmup_requests + measured_requests,
        give_up_ns: schedule_end_ns + (args.duration.as_nanos() as u64 / 2).max(2_000_000_000),
        next: AtomicU64::new(0),
    });
    let workers: Vec<_> = (0..args.connections)
        .map(|_| tokio::spawn(connection(args.clone(), plan.clone())))
        .collect();
    let mut all = Tally::default();
    for w in workers {
        let t = w.await.map_err(std::io::Error::other)?;
        all.latencies_us.extend(t.latencies_us);
        all.send_lag_us.extend(t.send_lag_us);
        all.ok += t.ok;
        all.non_2xx += t.non_2xx;
        all.errors += t.errors;
        all.last_done_ns = all.last_done_ns.max(t.last_done_ns);
    }
    all.latencies_us.sort_unstable();
    all.send_lag_us.sort_unstable();

    let measured_start_ns = plan.due_ns(warmup_requests);
    let completed = all.latencies_us.len() as u64;
    let span_s = (all.last_done_ns.saturating_sub(measured_start_ns)) as f64 / 1e9;
    let achieved = if span_s > 0.0 {
        completed as f64 / span_s
    } else {
        0.0
    };
    let unsent = measured_requests.saturating_sub(completed);
    let lag_p99 = percentile_ms(&all.send_lag_us, 99.0);
    let failed = all.non_2xx + all.errors;
    let mut reasons = Vec::new();
    if achieved < MIN_RATE_SHARE * args.rate {
        reasons.push(format!(
            "achieved {achieved:.0} req/s is below {:.0}% of the offered {:.0}",
            MIN_RATE_SHARE * 100.0,
            args.rate
        ));
    }
    if lag_p99 > MAX_SEND_LAG_P99.as_secs_f64() * 1000.0 {
        reasons.push(format!(
            "p99 send lag {lag_p99:.3} ms: requests waited for a free connection or the generator fell behind"
        ));
    }
    if unsent > failed {
        reasons.push(format!("{unsent} requests never completed"));
    }
    let sustained = reasons.is_empty();
    let p = |q| percentile_ms(&all.latencies_us, q);
    println!(
        "offered {:.0} req/s over {} connections for {:.1} s (+{:.1} s warm-up): achieved {achieved:.0} req/s, {} ok, {} non-2xx, {} errors",
        args.rate,
        args.connections,
        args.duration.as_secs_f64(),
        args.warmup.as_secs_f64(),
        all.ok,
        all.non_2xx,
        all.errors
    );
    println!(
        "latency from due time (ms): p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}   send lag p50 {:.3} p99 {lag_p99:.3}",
        p(50.0),
        p(90.0),
        p(99.0),
        p(99.9),
        p(100.0),
        percentile_ms(&all.send_lag_us, 50.0),
    );
    if !sustained {
        println!("NOT SUSTAINED: {}", reasons.join("; "));
    }
    println!(
        "RESULT offered={:.0} achieved={achieved:.0} completed={completed} non2xx={} errors={} p50_ms={:.3} p90_ms={:.3} p99_ms={:.3} p999_ms={:.3} max_ms={:.3} lag_p99_ms={lag_p99:.3} sustained={}",
        args.rate,
        all.non_2xx,
        all.errors,
        p(50.0),
        p(90.0),
        p(99.0),
        p(99.9),
        p(100.0),
        if sustained { "yes" } else { "no" }
    );
    Ok(())
}
