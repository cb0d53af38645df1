//! Who is calling: the key from the request headers, checked against the master key and the key
//! store, and the identity fields the spend record carries.
//!
//! Keys are compared as SHA-256 digests in constant time, so neither the time to reject a key nor
//! any log line reveals anything about a valid one.

use std::sync::Arc;

use axum::http::HeaderMap;
use chrono::Utc;

use super::error::ProxyError;
use super::keys::{KeyHash, KeyRecord, hash_key, hashes_equal};
use super::keystore::{KeyStore, KeyStoreError};

/// Headers a client may carry its key in, in the order LiteLLM checks them.
const KEY_HEADERS: &[&str] = &["x-litellm-api-key", "api-key", "x-api-key"];

/// An authenticated caller.
#[derive(Debug, Clone)]
pub enum Caller {
    /// The master key: may do anything; carries no identity.
    Master,
    /// A virtual key from `/key/generate`.
    Key(Arc<KeyRecord>),
}

impl Caller {
    pub fn key(&self) -> Option<&KeyRecord> {
        match self {
            Self::Master => None,
            Self::Key(k) => Some(k),
        }
    }

    pub fn is_master(&self) -> bool {
        matches!(self, Self::Master)
    }
}

/// Checks keys; shared by all handlers.
#[derive(Clone)]
pub struct Authenticator {
    master_hash: Option<KeyHash>,
    keys: KeyStore,
}

impl Authenticator {
    pub fn new(master_key: Option<&str>, keys: KeyStore) -> Self {
        Self {
            master_hash: master_key.map(hash_key),
            keys,
        }
    }

    pub fn keys(&self) -> &KeyStore {
        &self.keys
    }

    /// The caller behind the request's key, or 401.
    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<Caller, ProxyError> {
        let Some(key) = presented_key(headers) else {
            return Err(ProxyError::Unauthorized(
                "no API key: send it as `Authorization: Bearer <key>` (or x-api-key, api-key, x-litellm-api-key)".into(),
            ));
        };
        let hash = hash_key(key);
        if let Some(master) = &self.master_hash
            && hashes_equal(master, &hash)
        {
            return Ok(Caller::Master);
        }
        let record = self
            .keys
            .find(&hash)
            .await
            .map_err(store_error)?
            .ok_or_else(|| {
                ProxyError::Unauthorized(
                    "invalid API key: it is unknown or was deleted; create one with /key/generate"
                        .into(),
                )
            })?;
        if record.is_expired(Utc::now()) {
            return Err(ProxyError::Unauthorized(format!(
                "API key {} expired at {}; create a new one with /key/generate",
                record.key_name,
                record
                    .expires
                    .as_ref()
                    .map(crate::spend::fmt_millis)
                    .unwrap_or_default()
            )));
        }
        if record.blocked {
            return Err(ProxyError::Unauthorized(format!(
                "API key {} is blocked; unblock it with /key/unblock",
                record.key_name
            )));
        }
        Ok(Caller::Key(record))
    }

    /// The caller, who must hold the master key (admin routes).
    pub async fn require_master(&self, headers: &HeaderMap) -> Result<(), ProxyError> {
        match self.authenticate(headers).await? {
            Caller::Master => Ok(()),
            Caller::Key(_) => Err(ProxyError::Forbidden {
                message: "this route needs the master key (general_settings.master_key); a virtual key cannot manage keys".into(),
                param: None,
            }),
        }
    }
}

/// A key-store failure as the client sees it: 503 when the database is away (retry later),
/// 500 otherwise.
pub fn store_error(e: KeyStoreError) -> ProxyError {
    if e.is_unavailable() {
        ProxyError::KeyStoreUnavailable(format!("{e}; the key could not be checked, retry shortly"))
    } else {
        ProxyError::Internal(e.to_string())
    }
}

/// The key as sent: `Authorization: Bearer <key>` or one of LiteLLM's key headers.
pub fn presented_key(headers: &HeaderMap) -> Option<&str> {
    let bearer = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        });
    bearer
        .or_else(|| {
            KEY_HEADERS
                .iter()
                .find_map(|name| headers.get(*name).and_then(|v| v.to_str().ok()))
        })
        .map(str::trim)
        .filter(|k| !k.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn finds_the_key_in_any_supported_header() {
        for name in ["authorization", "x-api-key", "api-key", "x-litellm-api-key"] {
            let mut h = HeaderMap::new();
            let value = if name == "authorization" {
                "Bearer sk-abc"
            } else {
                "sk-abc"
            };
            h.insert(name, HeaderValue::from_static(value));
            assert_eq!(presented_key(&h), Some("sk-abc"), "{name}");
        }
        assert_eq!(presented_key(&HeaderMap::new()), None);
    }
}
