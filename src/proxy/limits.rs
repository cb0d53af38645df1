//! Bounds on everything a client controls that the proxy stores or writes to the spend log.
//!
//! A spend record longer than the shipper's line limit (`TALLY_MAX_LINE_BYTES`, 1 MiB by default)
//! is rejected by the shipper, so a call that was served would never be billed. Each identity a
//! client can choose — the request's `user`, the end-user headers, a key's alias and ids — is
//! therefore bounded here, and a request or key over a bound is refused with 400 naming the field
//! and the limit. With every field bounded, the largest record the proxy can write stays a few
//! KiB (see the test at the end).
//!
//! The bounds follow OpenAI's (a `user` of a few hundred characters), and ids may not contain
//! control characters: they end up in Lago, in logs and on operators' terminals.

use serde_json::{Map, Value};

use super::error::ProxyError;
use super::keys::KeyRecord;

/// Longest id (characters): `user`, the end-user headers, `key_alias`, `user_id`, `team_id`,
/// each entry of `allowed_end_user_ids`, `end_user_id_prefix`, and a model name in `models`.
pub const MAX_ID_CHARS: usize = 256;
/// Largest key `metadata`, as compact JSON (bytes).
pub const MAX_METADATA_BYTES: usize = 8 * 1024;
/// Most entries in a key's `models`.
pub const MAX_KEY_MODELS: usize = 256;

/// Why an id was refused, for the caller to put in context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdProblem {
    TooLong { chars: usize },
    ControlCharacter { at: usize },
}

impl std::fmt::Display for IdProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::TooLong { chars } => write!(
                f,
                "is {chars} characters long; at most {MAX_ID_CHARS} are accepted"
            ),
            Self::ControlCharacter { at } => write!(
                f,
                "contains a control character (at character {at}); ids must be printable text"
            ),
        }
    }
}

/// Checks an id's length and characters.
pub fn check_id(value: &str) -> Result<(), IdProblem> {
    // Bytes bound characters from above: the common short id needs no count.
    if value.len() > MAX_ID_CHARS {
        let chars = value.chars().count();
        if chars > MAX_ID_CHARS {
            return Err(IdProblem::TooLong { chars });
        }
    }
    if let Some(at) = value.chars().position(char::is_control) {
        return Err(IdProblem::ControlCharacter { at });
    }
    Ok(())
}

/// [`check_id`] as a 400 naming `field` (a body member or a header).
pub fn require_id(field: &str, value: &str) -> Result<(), ProxyError> {
    check_id(value).map_err(|problem| ProxyError::BadRequest {
        message: format!("`{field}` {problem}"),
        param: Some(field.to_owned()),
        code: "invalid_request",
    })
}

/// Checks a key's `metadata` size.
pub fn require_metadata(metadata: &Map<String, Value>) -> Result<(), ProxyError> {
    let bytes = serde_json::to_vec(metadata).map_or(usize::MAX, |v| v.len());
    if bytes > MAX_METADATA_BYTES {
        return Err(ProxyError::bad_param(
            "metadata",
            format!(
                "`metadata` is {bytes} bytes as JSON; at most {MAX_METADATA_BYTES} are accepted"
            ),
        ));
    }
    Ok(())
}

/// Checks a key's `models` list.
pub fn require_models(models: &[String]) -> Result<(), ProxyError> {
    if models.len() > MAX_KEY_MODELS {
        return Err(ProxyError::bad_param(
            "models",
            format!(
                "`models` lists {} models; at most {MAX_KEY_MODELS} are accepted",
                models.len()
            ),
        ));
    }
    for model in models {
        require_id("models", model)?;
    }
    Ok(())
}

/// A key minted before these bounds existed may carry an identity too long to bill; its calls are
/// refused (403) rather than served unbilled. A byte bound: 4 bytes per character at most.
pub fn require_billable_key(key: &KeyRecord) -> Result<(), ProxyError> {
    for (field, value) in [
        ("key_alias", &key.key_alias),
        ("user_id", &key.user_id),
        ("team_id", &key.team_id),
    ] {
        if value.as_ref().is_some_and(|v| v.len() > 4 * MAX_ID_CHARS) {
            return Err(ProxyError::Forbidden {
                message: format!(
                    "key {} has a {field} longer than {MAX_ID_CHARS} characters (it was created \
                     before tally bounded ids), so its calls could not be billed; create a new key \
                     with /key/generate and delete this one",
                    key.key_name
                ),
                param: None,
            });
        }
    }
    Ok(())
}

/// The upstream's reported model, if it passes the id bounds (else the caller records the
/// configured upstream model instead).
pub fn bounded_upstream_model(model: Option<String>) -> Option<String> {
    model.filter(|m| check_id(m).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spend::{SCHEMA_VERSION, SpendRecord, Status};

    #[test]
    fn ids_are_bounded_in_characters_and_refuse_control_characters() {
        assert_eq!(check_id(""), Ok(()));
        assert_eq!(check_id(&"a".repeat(MAX_ID_CHARS)), Ok(()));
        // 256 four-byte characters: 1 KiB, still 256 characters.
        assert_eq!(check_id(&"😀".repeat(MAX_ID_CHARS)), Ok(()));
        assert_eq!(bounded_upstream_model(Some("x\u{1b}".into())), None);
        assert_eq!(
            check_id(&"a".repeat(MAX_ID_CHARS + 1)),
            Err(IdProblem::TooLong {
                chars: MAX_ID_CHARS + 1
            })
        );
        for bad in ["a\u{1b}[31m", "a\nb", "a\u{7f}", "a\u{85}", "\0"] {
            assert!(
                matches!(check_id(bad), Err(IdProblem::ControlCharacter { .. })),
                "{bad:?}"
            );
        }
        let e = require_id("user", &"x".repeat(1 << 20)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "`user` is 1048576 characters long; at most 256 are accepted"
        );
    }

    /// The largest record the proxy can write: every client-controlled field at its bound, made
    /// of the characters that take the most bytes once written (4-byte UTF-8, or `"` escaped).
    #[test]
    fn the_largest_allowed_record_is_far_below_the_shippers_line_limit() {
        let widest = |c: &str| Some(c.repeat(MAX_ID_CHARS));
        for filler in ["😀", "\"", "\\"] {
            let record = SpendRecord {
                schema: SCHEMA_VERSION,
                transaction_id: uuid::Uuid::now_v7().to_string(),
                start_time: Some(chrono::Utc::now()),
                end_time: chrono::Utc::now(),
                call_type: "chat_completion".into(),
                // From the operator's config, not the client; a long name for good measure.
                model: "m".repeat(MAX_ID_CHARS),
                upstream_model: bounded_upstream_model(widest(filler)),
                input_tokens: crate::spend::MAX_TOKENS,
                output_tokens: crate::spend::MAX_TOKENS,
                total_tokens: Some(crate::spend::MAX_TOKENS),
                cache_read_input_tokens: crate::spend::MAX_TOKENS,
                cache_creation_input_tokens: crate::spend::MAX_TOKENS,
                reasoning_tokens: crate::spend::MAX_TOKENS,
                usage_estimated: true,
                response_cost: Some(crate::spend::MAX_COST_USD),
                end_user_id: widest(filler),
                user_id: widest(filler),
                team_id: widest(filler),
                key_alias: widest(filler),
                key_hash: Some("f".repeat(64)),
                stream: true,
                status: Status::Success,
                duration_ms: Some(u64::MAX),
            };
            for (field, value) in [
                ("end_user_id", &record.end_user_id),
                ("user_id", &record.user_id),
            ] {
                check_id(value.as_deref().unwrap_or_default())
                    .unwrap_or_else(|e| panic!("{field} {e}"));
            }
            assert!(record.upstream_model.is_some());
            let line = record.to_line();
            eprintln!("widest record with {filler:?}: {} bytes", line.len());
            // The default of `tally ship --max-line-bytes`.
            let shipper_limit = crate::ship::settings::defaults::MAX_LINE_BYTES;
            assert!(
                line.len() * 64 < shipper_limit,
                "the largest record is {} bytes: not far below the shipper's {shipper_limit}",
                line.len()
            );
            SpendRecord::parse_line(&line[..line.len() - 1]).unwrap();
        }
    }
}
