//! `tally keys list|create|delete|import`: the proxy's key store for operators, without a
//! running proxy. The store is the one the config names (PostgreSQL or the state dir's SQLite).

use std::process::ExitCode;

use anyhow::Context;
use chrono::Utc;
use serde_json::{Value, json};

use super::output::{print_json, print_text, printable, table};
use crate::cli::{KeysAction, KeysArgs, OutputFormat};
use crate::proxy::ProxyConfig;
use crate::proxy::key_api::describe;
use crate::proxy::keys::{NewKey, hash_key, parse_duration};
use crate::proxy::keystore::{KeyStore, ListFilter, import};

pub async fn run(args: KeysArgs) -> anyhow::Result<ExitCode> {
    let path = args
        .config
        .clone()
        .context("tally keys needs the proxy's config: pass --config (or set TALLY_CONFIG)")?;
    let config = ProxyConfig::load(&path)?;
    let store = crate::proxy::open_keys(&config)
        .await
        .with_context(|| format!("cannot open the key store named by {}", path.display()))?;
    let json = args.output_format == OutputFormat::Json;
    match args.action {
        KeysAction::List { page, size } => list(&store, page, size, json).await,
        KeysAction::Create {
            key,
            key_alias,
            user_id,
            team_id,
            models,
            duration,
        } => {
            let expires = duration
                .map(|d| {
                    parse_duration(&d)
                        .filter(|d| *d > chrono::Duration::zero())
                        .map(|d| Utc::now() + d)
                        .with_context(|| {
                            format!("--duration {d:?} is not a positive duration; write e.g. 30s, 10m, 2h, 7d")
                        })
                })
                .transpose()?;
            if let Some(k) = &key
                && !k.starts_with("sk-")
            {
                anyhow::bail!("--key must start with sk- (LiteLLM's key form)");
            }
            let (key, record) = store
                .generate(NewKey {
                    key,
                    key_alias,
                    user_id,
                    team_id,
                    models,
                    metadata: serde_json::Map::new(),
                    expires,
                })
                .await?;
            let mut body = describe(&record);
            body.insert("key".into(), Value::String(key.clone()));
            if json {
                print_json(&Value::Object(body))?;
            } else {
                print_text(&format!(
                    "created {} (token {}); the key is shown once:\n{key}\n",
                    record.key_name,
                    record.token()
                ))?;
            }
            Ok(ExitCode::SUCCESS)
        }
        KeysAction::Delete { keys } => {
            let hashes: Vec<_> = keys.iter().map(|k| identify(k)).collect();
            let deleted = store.delete(&hashes).await?;
            let deleted: Vec<String> = deleted.iter().map(hex::encode).collect();
            let missing: Vec<String> = hashes
                .iter()
                .map(hex::encode)
                .filter(|t| !deleted.contains(t))
                .collect();
            if json {
                print_json(&json!({"deleted_keys": deleted, "not_found": missing}))?;
            } else {
                print_text(&format!(
                    "deleted {} key(s){}\n",
                    deleted.len(),
                    if missing.is_empty() {
                        String::new()
                    } else {
                        format!("; not found: {}", missing.join(", "))
                    }
                ))?;
            }
            Ok(if missing.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(3)
            })
        }
        KeysAction::Import {
            litellm_database_url,
            from,
        } => {
            let rows = match (litellm_database_url, from) {
                (Some(url), _) => import::read_litellm_table(&url)
                    .await
                    .context("cannot read LiteLLM's keys")?,
                (None, Some(file)) => {
                    let text = std::fs::read_to_string(&file)
                        .with_context(|| format!("cannot read {}", file.display()))?;
                    import::parse_export(&text)
                }
                (None, None) => {
                    anyhow::bail!("pass --litellm-database-url URL or --from FILE")
                }
            };
            let report = import::import(&store, rows).await?;
            if json {
                print_json(&report)?;
            } else {
                let mut text = format!(
                    "imported {} key(s), skipped {}\n",
                    report.imported.len(),
                    report.skipped.len()
                );
                for s in &report.skipped {
                    text.push_str(&format!(
                        "  skipped {}: {}\n",
                        printable(&s.token),
                        printable(&s.reason)
                    ));
                }
                print_text(&text)?;
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn list(store: &KeyStore, page: u64, size: u64, json: bool) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(page >= 1, "--page counts from 1");
    anyhow::ensure!((1..=1000).contains(&size), "--size must be 1 to 1000");
    let result = store
        .list(ListFilter::default(), (page - 1) * size, size)
        .await?;
    if json {
        let keys: Vec<Value> = result
            .keys
            .iter()
            .map(|r| Value::Object(describe(r)))
            .collect();
        print_json(&json!({
            "keys": keys,
            "total_count": result.total,
            "current_page": page,
            "total_pages": result.total.div_ceil(size),
        }))?;
    } else {
        let mut t = table(
            &[
                "token", "name", "alias", "team", "user", "expires", "blocked",
            ],
            &[],
        );
        for r in &result.keys {
            t.add_row(vec![
                r.token()[..16].to_owned(),
                printable(&r.key_name),
                printable(r.key_alias.as_deref().unwrap_or("")),
                printable(r.team_id.as_deref().unwrap_or("")),
                printable(r.user_id.as_deref().unwrap_or("")),
                r.expires
                    .as_ref()
                    .map(crate::spend::fmt_millis)
                    .unwrap_or_default(),
                if r.blocked {
                    "yes".into()
                } else {
                    String::new()
                },
            ]);
        }
        print_text(&format!("{t}\n{} key(s) in all\n", result.total))?;
    }
    Ok(ExitCode::SUCCESS)
}

fn identify(key_or_token: &str) -> [u8; 32] {
    let mut hash = [0u8; 32];
    if key_or_token.len() == 64 && hex::decode_to_slice(key_or_token, &mut hash).is_ok() {
        hash
    } else {
        hash_key(key_or_token)
    }
}
