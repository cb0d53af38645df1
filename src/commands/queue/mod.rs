//! `tally queue stats|list|show|retry|drop`: inspect and act on the shipper's outbox. Each
//! subcommand is one short SQLite transaction (the reading ones open the file read-only), so all
//! are safe while `tally ship` runs.
//!
//! - [`view`]: what is printed, with stable JSON field names, and its text rendering.

pub mod view;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;

use crate::cli::{OutputFormat, QueueAction, QueueArgs, QueueState, RetryState};
use crate::commands::output::{self, EXIT_NEEDS_ATTENTION};
use crate::ship::outbox::{ListFilter, Outbox, State, now_ms};
use crate::ship::resolve::EventSpec;
use crate::ship::settings::{EventArgs, event_spec};

use view::{DropView, ItemView, ListView, RetryView, ShowView, StatsView, Verdict, item_outcome};

pub async fn run(args: QueueArgs) -> anyhow::Result<ExitCode> {
    let format = args.output_format;
    let state_dir = args.state_dir.clone();
    // SQLite calls block; keep them off the async threads.
    tokio::task::spawn_blocking(move || run_blocking(args.action, &state_dir, format))
        .await
        .context("the queue task failed")?
}

fn run_blocking(
    action: QueueAction,
    state_dir: &Path,
    format: OutputFormat,
) -> anyhow::Result<ExitCode> {
    match action {
        QueueAction::Stats { max_age } => stats(state_dir, max_age, format),
        QueueAction::List { state, limit } => list(state_dir, state, limit, format),
        QueueAction::Show { transaction_id } => show(state_dir, &transaction_id, format),
        QueueAction::Retry {
            state,
            ids,
            charge_by,
            lago_api_event_code,
            precise_amount,
            cost_markup,
        } => {
            let spec = event_spec(
                &EventArgs {
                    code: lago_api_event_code.as_deref(),
                    charge_by: &charge_by,
                    precise_amount,
                    cost_markup: &cost_markup,
                },
                "retry rebuilds the Lago events, so set it as for `tally ship` \
                 (or pass --lago-api-event-code)",
            )?;
            retry(state_dir, state, &ids, &spec, format)
        }
        QueueAction::Drop { ids, reason } => drop_items(state_dir, &ids, &reason, format),
    }
}

fn db_path(state_dir: &Path) -> PathBuf {
    state_dir.join(crate::ship::outbox::DB_FILE)
}

/// The outbox, read-only; a missing one is an error that says where it was looked for.
fn open_reading(state_dir: &Path) -> anyhow::Result<Outbox> {
    Outbox::open_read_only_in(state_dir)?.with_context(|| no_outbox(state_dir))
}

fn open_writing(state_dir: &Path) -> anyhow::Result<Outbox> {
    if !db_path(state_dir).is_file() {
        anyhow::bail!(no_outbox(state_dir));
    }
    Outbox::open_in(state_dir)
        .with_context(|| format!("cannot open the outbox {}", db_path(state_dir).display()))
}

fn no_outbox(state_dir: &Path) -> String {
    format!(
        "no outbox at {}: `tally ship` (or `tally replay`) has not run with this state directory; \
         check TALLY_STATE_DIR / --state-dir",
        db_path(state_dir).display()
    )
}

fn print<T: serde::Serialize>(
    format: OutputFormat,
    value: &T,
    text: impl FnOnce(&T) -> String,
) -> anyhow::Result<()> {
    match format {
        OutputFormat::Json => output::print_json(value)?,
        OutputFormat::Text => output::print_text(&text(value))?,
    }
    Ok(())
}

fn stats(state_dir: &Path, max_age: Option<u64>, format: OutputFormat) -> anyhow::Result<ExitCode> {
    let ob = open_reading(state_dir)?;
    let stats = ob.stats()?;
    let view = StatsView::new(&db_path(state_dir), &stats, now_ms(), max_age);
    print(format, &view, StatsView::to_text)?;
    if view.too_old {
        // The reason goes to stderr too, so a monitoring check's log says why it failed.
        eprintln!("tally: {}", view.age_verdict());
        return Ok(ExitCode::from(EXIT_NEEDS_ATTENTION));
    }
    Ok(ExitCode::SUCCESS)
}

/// The states `list` shows when none is given, most urgent first.
const ATTENTION: [QueueState; 4] = [
    QueueState::Dead,
    QueueState::Held,
    QueueState::Rejected,
    QueueState::Pending,
];

fn filter(state: QueueState) -> ListFilter {
    ListFilter::State(match state {
        QueueState::Rejected => return ListFilter::Rejected,
        QueueState::Pending => State::Pending,
        QueueState::Held => State::Held,
        QueueState::Dead => State::Dead,
        QueueState::Acked => State::Acked,
        QueueState::Dropped => State::Dropped,
        QueueState::NotBillable => State::NotBillable,
        QueueState::LagoError => State::LagoError,
    })
}

fn list(
    state_dir: &Path,
    state: Option<QueueState>,
    limit: usize,
    format: OutputFormat,
) -> anyhow::Result<ExitCode> {
    let ob = open_reading(state_dir)?;
    let states: Vec<QueueState> = match state {
        Some(s) => vec![s],
        None => ATTENTION.to_vec(),
    };
    let mut items = Vec::new();
    for s in &states {
        let room = limit.saturating_sub(items.len());
        if room == 0 {
            break;
        }
        for item in ob.list(filter(*s), room)? {
            let head = if *s == QueueState::Rejected {
                ob.rejected_head(&item.id)?
            } else {
                None
            };
            items.push(ItemView::new(item, head));
        }
    }
    let view = ListView {
        states: states.iter().map(|s| view::state_name(*s)).collect(),
        limit,
        items,
    };
    print(format, &view, ListView::to_text)?;
    Ok(ExitCode::SUCCESS)
}

fn show(state_dir: &Path, id: &str, format: OutputFormat) -> anyhow::Result<ExitCode> {
    let ob = open_reading(state_dir)?;
    // Every id `list` prints can be shown: a rejected line's too.
    let view = match ob.show_rejected(id)? {
        Some(line) => Some(ShowView::rejected(line)),
        None => ob.show(id)?.map(ShowView::new),
    };
    let Some(view) = view else {
        anyhow::bail!(
            "transaction_id {} is not in the outbox {}: it was never read (check the id, or \
             `tally queue list`), or its acked id was forgotten after TALLY_ACKED_RETENTION_DAYS",
            output::printable(&format!("{id:?}")),
            db_path(state_dir).display()
        );
    };
    print(format, &view, ShowView::to_text)?;
    Ok(ExitCode::SUCCESS)
}

fn retry(
    state_dir: &Path,
    state: Option<RetryState>,
    ids: &[String],
    spec: &EventSpec,
    format: OutputFormat,
) -> anyhow::Result<ExitCode> {
    let mut ob = open_writing(state_dir)?;
    let state = state.map(|s| match s {
        RetryState::Held => State::Held,
        RetryState::Dead => State::Dead,
    });
    let report = ob.retry(ids, state, spec)?;
    // Say per item what happened, in the outbox's own words.
    let mut items = Vec::new();
    for id in &report.requeued {
        let detail = ob.show(id)?;
        items.push(item_outcome(id, Verdict::Requeued, detail));
    }
    for id in &report.still_held {
        items.push(item_outcome(id, Verdict::StillHeld, ob.show(id)?));
    }
    for id in &report.skipped {
        items.push(item_outcome(id, Verdict::Skipped, ob.show(id)?));
    }
    let view = RetryView {
        charge_by: spec.charge_by.to_string(),
        requeued: report.requeued.len() as u64,
        still_held: report.still_held.len() as u64,
        skipped: report.skipped.len() as u64,
        items,
    };
    print(format, &view, RetryView::to_text)?;
    Ok(ExitCode::SUCCESS)
}

fn drop_items(
    state_dir: &Path,
    ids: &[String],
    reason: &str,
    format: OutputFormat,
) -> anyhow::Result<ExitCode> {
    if reason.trim().is_empty() {
        anyhow::bail!("--reason is empty; say why these events leave without being billed");
    }
    let mut ob = open_writing(state_dir)?;
    let dropped = ob.drop_items(ids, reason)?;
    let mut items = Vec::new();
    for id in ids {
        let verdict = if dropped.contains(id) {
            Verdict::Dropped
        } else {
            Verdict::NotDropped
        };
        let detail = if id.starts_with("rejected:") {
            None
        } else {
            ob.show(id)?
        };
        items.push(item_outcome(id, verdict, detail));
    }
    let view = DropView {
        reason: reason.to_owned(),
        dropped: dropped.len() as u64,
        not_dropped: (ids.len() - dropped.len()) as u64,
        items,
    };
    print(format, &view, DropView::to_text)?;
    // Asking to drop something that cannot be dropped is worth a non-zero exit for scripts.
    Ok(if view.not_dropped > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
