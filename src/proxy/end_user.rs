//! Who a call bills: the end-user id a request names (the body's `user`, else the
//! `x-litellm-end-user-id` / `x-litellm-customer-id` header), checked against its bounds and
//! against the key's end-user guard.
//!
//! By default, as in LiteLLM, any key may name any end user, so with
//! `LAGO_API_CHARGE_BY=end_user_id` any key holder can bill any customer's subscription. A key's `metadata` can restrict that:
//! - `allowed_end_user_ids`: a list of the end-user ids its calls may bill;
//! - `end_user_id_prefix`: a prefix every end-user id its calls bill must start with.
//!
//! With either set, a call must name an end user that matches one of them (either is enough when
//! both are set); any other call, and a call naming none, is refused with 403 naming the rule.

use axum::http::HeaderMap;
use serde_json::{Map, Value};

use super::error::ProxyError;
use super::keys::KeyRecord;
use super::limits;

/// Headers naming the end customer when the body has no `user`, in the order LiteLLM reads them.
pub const END_USER_HEADERS: &[&str] = &["x-litellm-end-user-id", "x-litellm-customer-id"];
/// Metadata member: the end-user ids a key may bill.
pub const ALLOWED_IDS: &str = "allowed_end_user_ids";
/// Metadata member: the prefix of the end-user ids a key may bill.
pub const ID_PREFIX: &str = "end_user_id_prefix";

/// The end-user id of a request: `user` (a string; `""` and `null` count as absent, as OpenAI
/// accepts them) or else the first end-user header that is set.
pub fn of_request(user: Option<Value>, headers: &HeaderMap) -> Result<Option<String>, ProxyError> {
    match user {
        Some(Value::String(u)) if !u.is_empty() => {
            limits::require_id("user", &u)?;
            Ok(Some(u))
        }
        Some(Value::String(_) | Value::Null) | None => from_headers(headers),
        Some(_) => Err(ProxyError::bad_param("user", "`user` must be a string")),
    }
}

/// The end customer named by header. A header that is not UTF-8 is refused rather than skipped:
/// skipping it would bill the call to nobody (or to the next header's id).
pub fn from_headers(headers: &HeaderMap) -> Result<Option<String>, ProxyError> {
    for name in END_USER_HEADERS {
        let Some(value) = headers.get(*name) else {
            continue;
        };
        let text = std::str::from_utf8(value.as_bytes()).map_err(|_| {
            ProxyError::bad_param(
                *name,
                format!("header `{name}` is not valid UTF-8; send the end-user id as UTF-8 text"),
            )
        })?;
        // HTTP's optional whitespace only: Unicode's `trim` would also eat control characters
        // such as U+0085 that the id check must see.
        let text = text.trim_matches([' ', '\t']);
        if text.is_empty() {
            continue;
        }
        limits::require_id(name, text)?;
        return Ok(Some(text.to_owned()));
    }
    Ok(None)
}

/// Checks the shape of a key's guard at `/key/generate` (400 on a wrong type or bound).
pub fn validate_guard(metadata: &Map<String, Value>) -> Result<(), ProxyError> {
    let field = |name: &str| format!("metadata.{name}");
    match metadata.get(ALLOWED_IDS) {
        None | Some(Value::Null) => {}
        Some(Value::Array(ids)) if !ids.is_empty() => {
            for id in ids {
                let Value::String(id) = id else {
                    return Err(ProxyError::bad_param(
                        field(ALLOWED_IDS),
                        format!(
                            "`metadata.{ALLOWED_IDS}` must be a list of end-user ids (strings)"
                        ),
                    ));
                };
                if id.is_empty() {
                    return Err(ProxyError::bad_param(
                        field(ALLOWED_IDS),
                        format!("`metadata.{ALLOWED_IDS}` holds an empty id"),
                    ));
                }
                limits::require_id(&field(ALLOWED_IDS), id)?;
            }
        }
        Some(Value::Array(_)) => {
            return Err(ProxyError::bad_param(
                field(ALLOWED_IDS),
                format!(
                    "`metadata.{ALLOWED_IDS}` is empty, which would refuse every call; list the \
                     end-user ids the key may bill, or leave it out"
                ),
            ));
        }
        Some(_) => {
            return Err(ProxyError::bad_param(
                field(ALLOWED_IDS),
                format!("`metadata.{ALLOWED_IDS}` must be a list of end-user ids (strings)"),
            ));
        }
    }
    match metadata.get(ID_PREFIX) {
        None | Some(Value::Null) => Ok(()),
        Some(Value::String(p)) if !p.is_empty() => limits::require_id(&field(ID_PREFIX), p),
        Some(_) => Err(ProxyError::bad_param(
            field(ID_PREFIX),
            format!("`metadata.{ID_PREFIX}` must be a non-empty string"),
        )),
    }
}

/// Whether a call with `key` may bill `end_user_id` (403 naming the rule if not).
pub fn check_guard(key: &KeyRecord, end_user_id: Option<&str>) -> Result<(), ProxyError> {
    let allowed = key.metadata.get(ALLOWED_IDS).filter(|v| !v.is_null());
    let prefix = key.metadata.get(ID_PREFIX).filter(|v| !v.is_null());
    if allowed.is_none() && prefix.is_none() {
        return Ok(());
    }
    // Stored before validation existed, or edited by hand: refuse rather than bill unchecked.
    if validate_guard(&key.metadata).is_err() {
        return Err(forbidden(format!(
            "key {} has a malformed end-user rule in its metadata ({ALLOWED_IDS} must be a list \
             of strings, {ID_PREFIX} a string); create a new key",
            key.key_name
        )));
    }
    let ids = allowed.and_then(Value::as_array);
    let prefix = prefix.and_then(Value::as_str);
    let rule = || {
        let mut parts = Vec::new();
        if let Some(ids) = ids {
            parts.push(format!("metadata.{ALLOWED_IDS} ({} ids)", ids.len()));
        }
        if let Some(p) = prefix {
            parts.push(format!("metadata.{ID_PREFIX} {p:?}"));
        }
        parts.join(" or ")
    };
    let Some(id) = end_user_id else {
        return Err(forbidden(format!(
            "key {} may only bill the end users its {} allows, and this call names none; send \
             `user` (or the x-litellm-end-user-id header)",
            key.key_name,
            rule()
        )));
    };
    let listed = ids.is_some_and(|ids| ids.iter().any(|a| a.as_str() == Some(id)));
    let prefixed = prefix.is_some_and(|p| id.starts_with(p));
    if listed || prefixed {
        return Ok(());
    }
    Err(forbidden(format!(
        "key {} may not bill end user {id:?}: it is not allowed by the key's {}",
        key.key_name,
        rule()
    )))
}

fn forbidden(message: String) -> ProxyError {
    ProxyError::Forbidden {
        message,
        param: Some("user"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;
    use serde_json::json;

    fn key(metadata: Value) -> KeyRecord {
        KeyRecord {
            hash: [0; 32],
            key_name: "sk-...abcd".into(),
            key_alias: None,
            user_id: None,
            team_id: None,
            models: Vec::new(),
            metadata: metadata.as_object().cloned().unwrap_or_default(),
            created_at: chrono::Utc::now(),
            expires: None,
            blocked: false,
        }
    }

    #[test]
    fn end_user_header_fallbacks() {
        let mut h = HeaderMap::new();
        h.insert("x-litellm-customer-id", HeaderValue::from_static("c2"));
        assert_eq!(from_headers(&h).unwrap().as_deref(), Some("c2"));
        h.insert("x-litellm-end-user-id", HeaderValue::from_static("c1"));
        assert_eq!(from_headers(&h).unwrap().as_deref(), Some("c1"));
        // `user` wins; an empty `user` is absent.
        let user = |u: Value| of_request(Some(u), &h).map(|o| o.unwrap_or_default());
        assert_eq!(user(json!("b")).unwrap(), "b");
        assert_eq!(user(json!("")).unwrap(), "c1");
        assert_eq!(user(Value::Null).unwrap(), "c1");
        assert!(user(json!(7)).is_err());
    }

    #[test]
    fn a_non_utf8_end_user_header_is_refused_by_name() {
        let mut h = HeaderMap::new();
        h.insert(
            "x-litellm-end-user-id",
            HeaderValue::from_bytes(b"caf\xe9").unwrap(),
        );
        h.insert("x-litellm-customer-id", HeaderValue::from_static("c2"));
        let e = from_headers(&h).unwrap_err().to_string();
        assert!(
            e.contains("x-litellm-end-user-id") && e.contains("UTF-8"),
            "{e}"
        );
        // UTF-8 beyond ASCII is an id like any other.
        h.insert(
            "x-litellm-end-user-id",
            HeaderValue::from_bytes("café".as_bytes()).unwrap(),
        );
        assert_eq!(from_headers(&h).unwrap().as_deref(), Some("café"));
    }

    #[test]
    fn the_guard_allows_listed_and_prefixed_ids_only() {
        let open = key(json!({"env": "ci"}));
        check_guard(&open, Some("anyone")).unwrap();
        check_guard(&open, None).unwrap();

        let listed = key(json!({ALLOWED_IDS: ["acme", "globex"]}));
        check_guard(&listed, Some("acme")).unwrap();
        let e = check_guard(&listed, Some("initech"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("\"initech\"") && e.contains("metadata.allowed_end_user_ids"),
            "{e}"
        );
        let e = check_guard(&listed, None).unwrap_err().to_string();
        assert!(e.contains("names none"), "{e}");

        let prefixed = key(json!({ID_PREFIX: "acme-"}));
        check_guard(&prefixed, Some("acme-42")).unwrap();
        let e = check_guard(&prefixed, Some("globex-1"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("end_user_id_prefix \"acme-\""), "{e}");

        let both = key(json!({ALLOWED_IDS: ["globex"], ID_PREFIX: "acme-"}));
        check_guard(&both, Some("globex")).unwrap();
        check_guard(&both, Some("acme-1")).unwrap();
        assert!(check_guard(&both, Some("initech")).is_err());

        let malformed = key(json!({ALLOWED_IDS: "acme"}));
        assert!(check_guard(&malformed, Some("acme")).is_err());
    }

    #[test]
    fn guard_shapes_are_validated() {
        for good in [
            json!({}),
            json!({ALLOWED_IDS: ["a"]}),
            json!({ID_PREFIX: "p-"}),
            json!({ALLOWED_IDS: null, ID_PREFIX: null}),
        ] {
            validate_guard(good.as_object().unwrap()).unwrap();
        }
        for (bad, says) in [
            (json!({ALLOWED_IDS: "a"}), "must be a list"),
            (json!({ALLOWED_IDS: [1]}), "must be a list"),
            (json!({ALLOWED_IDS: []}), "is empty"),
            (json!({ALLOWED_IDS: [""]}), "empty id"),
            (json!({ALLOWED_IDS: ["a\u{1b}"]}), "control character"),
            (json!({ID_PREFIX: 5}), "non-empty string"),
            (json!({ID_PREFIX: ""}), "non-empty string"),
        ] {
            let e = validate_guard(bad.as_object().unwrap())
                .unwrap_err()
                .to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
