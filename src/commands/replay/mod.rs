//! `tally replay FILE...`: feeds historical spend logs through the shipper's parsing, dedupe and
//! outbox, so a line already billed (from the live log, an earlier replay or a rotated copy) is
//! never billed again, and usage keeps its own timestamps.
//!
//! - [`input`]: files and globs, plain or gzip, streamed line by line with offsets.
//! - [`litellm`]: LiteLLM `LiteLLM_SpendLogs` rows → spend records (`--format litellm`).
//! - [`window`]: `--since` / `--until`.
//! - [`reader`]: decodes every line of every file, with a progress bar ([`progress`]).
//! - [`feed`]: the shipper's `prepare` + `Outbox::ingest` over those lines (or a dry run).
//! - [`deliver`]: `--ship`, with the shipper's sender; [`new_ids`]: the ids it waits for, on disk.
//! - [`summary`]: the counts and per-customer totals it prints.
//!
//! By default the events are only enqueued: the running `tally ship` delivers them (the same
//! SQLite file in WAL mode, so both can run at once).

pub mod deliver;
pub mod feed;
pub mod input;
pub mod litellm;
pub mod new_ids;
pub mod progress;
pub mod reader;
pub mod summary;
pub mod window;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::cli::{OutputFormat, ReplayArgs};
use crate::commands::output::{self, EXIT_NEEDS_ATTENTION};
use crate::commands::settings::{lago as lago_from_args, tuning as tuning_from_args};
use crate::ship::ShipSettings;
use crate::ship::outbox::Outbox;
use crate::ship::settings::{EventArgs, event_spec};

use deliver::DeliveryReport;
use feed::{FeedOptions, Target};
use summary::ReplaySummary;

/// Event code used for a dry run when `LAGO_API_EVENT_CODE` is not set: the code changes
/// neither who is charged nor whether a line was already billed.
const DRY_RUN_CODE: &str = "dry-run";

/// Everything `tally replay --output-format json` prints.
#[derive(Debug, Serialize)]
struct ReplayOutput {
    #[serde(flatten)]
    summary: ReplaySummary,
    /// Stopped early by SIGINT/SIGTERM; what was recorded up to then stays recorded.
    interrupted: bool,
    /// With `--ship`: what Lago acknowledged of this replay's new events.
    delivery: Option<DeliveryReport>,
}

pub async fn run(args: ReplayArgs, shutdown: CancellationToken) -> anyhow::Result<ExitCode> {
    // Check every setting before reading a byte.
    let window = window::TimeWindow::parse(args.since.as_deref(), args.until.as_deref())?;
    let tuning = tuning_from_args(&args.tuning);
    // A dry run needs no event code: the code changes neither who is charged nor whether a line
    // was already billed.
    let mut event_args = EventArgs::from(&args.lago);
    if args.dry_run && event_args.code.is_none_or(|c| c.trim().is_empty()) {
        event_args.code = Some(DRY_RUN_CODE);
    }
    let spec = event_spec(
        &event_args,
        "replay builds the Lago events it enqueues, so set it (as for `tally ship`) or use --dry-run",
    )?;
    let ship_settings = if args.ship {
        // Its sender hands off to many pool threads, as the shipper's does.
        crate::ship::limit_malloc_arenas();
        let lago = lago_from_args(&args.lago).context("--ship needs the Lago settings")?;
        Some(ShipSettings {
            spend_log: args.shared.spend_log.clone(),
            state_dir: args.shared.state_dir.clone(),
            lago,
            tuning: tuning.clone(),
            metrics_addr: None,
            webhook: None,
        })
    } else {
        None
    };
    let files = input::expand(&args.files)?;
    let options = FeedOptions {
        format: args.format,
        window,
        max_line_bytes: tuning.max_line_bytes,
        spec,
        new_ids_in: args.ship.then(|| args.shared.state_dir.clone()),
    };

    let state_dir = args.shared.state_dir.clone();
    let dry_run = args.dry_run;
    let cancel = shutdown.clone();
    let outcome = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let target =
            if dry_run {
                Target::DryRun(Outbox::open_read_only_in(&state_dir)?)
            } else {
                Target::Write(Outbox::open_in(&state_dir).with_context(|| {
                    format!("cannot open the outbox in {}", state_dir.display())
                })?)
            };
        Ok(feed::feed(files, &options, target, &cancel)?)
    })
    .await
    .context("the replay task failed")??;

    let mut delivery = None;
    if let Some(settings) = &ship_settings
        && !outcome.interrupted
    {
        crate::ship::release_freed_memory();
        let report = deliver::deliver(
            settings,
            outcome
                .new_ids
                .context("--ship keeps the new events' ids")?,
            Duration::from_secs(args.ship_timeout),
            &shutdown,
        )
        .await?;
        delivery = Some(report);
    }
    let incomplete = delivery.as_ref().is_some_and(|d| !d.complete());
    let out = ReplayOutput {
        summary: outcome.summary,
        interrupted: outcome.interrupted,
        delivery,
    };
    match args.output_format {
        OutputFormat::Json => output::print_json(&out)?,
        OutputFormat::Text => output::print_text(&render(&out))?,
    }
    Ok(if incomplete || out.interrupted {
        ExitCode::from(EXIT_NEEDS_ATTENTION)
    } else {
        ExitCode::SUCCESS
    })
}

fn render(out: &ReplayOutput) -> String {
    let mut s = out.summary.to_text();
    if out.interrupted {
        s.push_str("Interrupted: lines read so far are recorded; run the same replay again to finish (nothing is billed twice).\n");
    }
    if let Some(d) = &out.delivery {
        if d.complete() && d.acked == 0 {
            s.push_str("Nothing new to deliver.\n");
        } else if d.complete() {
            s.push_str(&format!(
                "Delivered: Lago acknowledged all {} new event(s).\n",
                d.acked
            ));
        } else {
            s.push_str(&format!(
                "Not all delivered: {} acked, {} still pending, {} held, {} dead.\n",
                d.acked, d.pending, d.held, d.dead
            ));
            for u in &d.undelivered {
                s.push_str(&format!(
                    "  {} ({}, {} attempt(s)): {}\n",
                    output::printable(&u.transaction_id),
                    u.state,
                    u.attempts,
                    output::printable(u.reason.as_deref().unwrap_or("no answer from Lago yet"))
                ));
            }
            s.push_str(
                "See `tally queue stats` and `tally queue list`; pending events are delivered by `tally ship`.\n",
            );
        }
    }
    s
}
