//! Shared helpers for the integration tests.

#![allow(dead_code)]

use std::path::PathBuf;

/// The `tally` binary cargo built for these tests.
pub fn tally_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tally"))
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes; returns whether it held.
/// Generous timeouts keep tests robust on a loaded machine; nothing is timed.
pub async fn wait_until(timeout: std::time::Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// A billable spend record for the shipper's tests: `end_user_id`, `team_id` as given, the
/// end time `end_ms` milliseconds after 2026-11-27T10:00:00Z.
pub fn spend_record(
    transaction_id: &str,
    end_user_id: Option<&str>,
    end_ms: i64,
) -> tally::spend::SpendRecord {
    let base: chrono::DateTime<chrono::Utc> = "2026-11-27T10:00:00Z".parse().unwrap();
    let end = base + chrono::Duration::milliseconds(end_ms);
    tally::spend::SpendRecord {
        schema: 1,
        transaction_id: transaction_id.into(),
        start_time: Some(end - chrono::Duration::milliseconds(250)),
        end_time: end,
        call_type: "chat_completion".into(),
        model: "gpt-4o".into(),
        upstream_model: Some("gpt-4o-2024-08-06".into()),
        input_tokens: 7,
        output_tokens: 15,
        total_tokens: Some(22),
        usage_estimated: false,
        response_cost: Some(0.0001675),
        end_user_id: end_user_id.map(Into::into),
        user_id: Some("user-1".into()),
        team_id: None,
        key_alias: None,
        key_hash: Some("ab".repeat(32)),
        stream: false,
        status: "success".into(),
        duration_ms: Some(250),
    }
}
