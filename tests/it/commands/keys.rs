//! `tally keys list|create|delete|import` on the SQLite store (the PostgreSQL store's import is
//! in `replicas.rs`): JSON output, a LiteLLM JSON-lines export imported idempotently with the
//! reason for each skip, and exit 3 when a key to delete does not exist.

use std::process::Command;

use serde_json::Value;

use crate::support::tally_bin;

const MASTER: &str = "sk-keys-cli-master-0123456789abcdef";

fn keys(config: &std::path::Path, args: &[&str]) -> (i32, Value, String) {
    let out = Command::new(tally_bin())
        .arg("keys")
        .args(args)
        .args(["--output-format", "json", "--config"])
        .arg(config)
        .env_remove("DATABASE_URL")
        .env_remove("TALLY_STATE_DIR")
        .env_remove("LITELLM_MASTER_KEY")
        .output()
        .unwrap();
    let json = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (
        out.status.code().unwrap_or(-1),
        json,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn keys_are_created_listed_imported_and_deleted_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "general_settings: {{master_key: {MASTER}}}\ntally_settings: {{state_dir: {}, spend_log: {}}}\n",
            dir.path().join("state").display(),
            dir.path().join("spend.jsonl").display()
        ),
    )
    .unwrap();

    let (code, made, err) = keys(
        &config,
        &[
            "create",
            "--team-id",
            "t",
            "--models",
            "gpt-4o,gpt-4o-mini",
            "--duration",
            "7d",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let key = made["key"].as_str().unwrap().to_owned();
    assert!(key.starts_with("sk-"));
    assert_eq!(made["models"], serde_json::json!(["gpt-4o", "gpt-4o-mini"]));
    assert!(made["expires"].is_string());

    // A LiteLLM export: one good row, one expired, one malformed.
    let litellm_key = "sk-from-litellm-export-0001";
    let token = hex::encode(tally::proxy::keys::hash_key(litellm_key));
    let export = dir.path().join("tokens.jsonl");
    std::fs::write(
        &export,
        format!(
            "{{\"token\":\"{token}\",\"key_alias\":\"legacy\",\"team_id\":\"team-l\",\"user_id\":\"user-l\",\"models\":[],\"expires\":null,\"blocked\":false,\"metadata\":{{}},\"spend\":4.2}}\n\
             {{\"token\":\"{}\",\"expires\":\"2001-01-01T00:00:00.000Z\"}}\n\
             {{\"token\": 7}}\n",
            "ab".repeat(32)
        ),
    )
    .unwrap();
    let from = export.display().to_string();
    let (code, report, err) = keys(&config, &["import", "--from", &from]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(report["imported"], serde_json::json!([token]));
    let reasons: Vec<String> = report["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["reason"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(reasons.len(), 2, "{report}");
    assert!(
        reasons[0].contains("expired") && reasons[1].contains("token"),
        "{reasons:?}"
    );
    let (_, again, _) = keys(&config, &["import", "--from", &from]);
    assert_eq!(again["imported"], serde_json::json!([]));
    assert!(
        again["skipped"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("already"),
        "{again}"
    );

    let (code, list, _) = keys(&config, &["list"]);
    assert_eq!(code, 0);
    assert_eq!(list["total_count"], 2);
    let teams: Vec<&str> = list["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["team_id"].as_str().unwrap())
        .collect();
    assert!(teams.contains(&"t") && teams.contains(&"team-l"), "{list}");
    assert!(!list.to_string().contains(&key), "list never shows a key");

    let (code, deleted, _) = keys(&config, &["delete", &key, "sk-not-a-key-we-have"]);
    assert_eq!(code, 3, "one of the keys did not exist");
    assert_eq!(deleted["deleted_keys"].as_array().unwrap().len(), 1);
    assert_eq!(deleted["not_found"].as_array().unwrap().len(), 1);
    let (_, list, _) = keys(&config, &["list"]);
    assert_eq!(list["total_count"], 1);
}
