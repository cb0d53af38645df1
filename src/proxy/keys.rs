//! Virtual keys: what a key record holds, how keys are minted, hashed and named. Where they are
//! stored, and the in-memory cache that keeps the database off the request path, is
//! [`super::keystore`].

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Random characters after `sk-`: 32 × 6 bits = 192 bits of entropy.
const KEY_RANDOM_CHARS: usize = 32;
const URL_SAFE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

pub type KeyHash = [u8; 32];

/// SHA-256 of a key, the only form in which keys are stored or logged.
pub fn hash_key(key: &str) -> KeyHash {
    Sha256::digest(key.as_bytes()).into()
}

/// Constant-time equality of two key hashes.
pub fn hashes_equal(a: &KeyHash, b: &KeyHash) -> bool {
    a.ct_eq(b).into()
}

/// A fresh key: `sk-` + 32 URL-safe characters from the OS-seeded CSPRNG.
pub fn new_key() -> String {
    let mut bytes = [0u8; KEY_RANDOM_CHARS];
    rand::fill(&mut bytes);
    // 256 is a multiple of 64, so `b % 64` picks every character with equal probability.
    let random: String = bytes
        .iter()
        .map(|b| URL_SAFE[usize::from(*b) % 64] as char)
        .collect();
    format!("sk-{random}")
}

/// LiteLLM's display form of a key: `sk-...` and its last four characters.
pub fn key_name(key: &str) -> String {
    let tail: String = key
        .chars()
        .rev()
        .take(4)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    format!("sk-...{tail}")
}

/// A stored key, without the key itself.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyRecord {
    pub hash: KeyHash,
    pub key_name: String,
    pub key_alias: Option<String>,
    pub user_id: Option<String>,
    pub team_id: Option<String>,
    /// Model names the key may use; empty means all.
    pub models: Vec<String>,
    pub metadata: serde_json::Map<String, serde_json::Value>,
    pub created_at: DateTime<Utc>,
    pub expires: Option<DateTime<Utc>>,
    /// Refused while set (`/key/block`); kept so `/key/unblock` can restore it.
    pub blocked: bool,
}

impl KeyRecord {
    /// The record a new key gets (times truncated to what the stores keep).
    pub fn new(key: &str, new: NewKey) -> Self {
        Self {
            hash: hash_key(key),
            key_name: key_name(key),
            key_alias: new.key_alias,
            user_id: new.user_id,
            team_id: new.team_id,
            models: new.models,
            metadata: new.metadata,
            created_at: to_millis(Utc::now()),
            expires: new.expires.map(to_millis),
            blocked: false,
        }
    }

    /// The hash as lowercase hex: LiteLLM's `token`, and the spend log's `key_hash`.
    pub fn token(&self) -> String {
        // Per request (the spend record's key_hash): a table lookup per digit, where
        // `hex::encode` collects chars one by one.
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut hex = String::with_capacity(64);
        for b in self.hash {
            hex.push(char::from(DIGITS[usize::from(b >> 4)]));
            hex.push(char::from(DIGITS[usize::from(b & 0xf)]));
        }
        hex
    }

    pub fn is_expired(&self, now: DateTime<Utc>) -> bool {
        self.expires.is_some_and(|e| e <= now)
    }

    pub fn allows_model(&self, model: &str) -> bool {
        self.models.is_empty() || self.models.iter().any(|m| m == model)
    }
}

/// What `/key/generate` asks for (already validated).
#[derive(Debug, Clone, Default)]
pub struct NewKey {
    /// A caller-chosen key (LiteLLM's `key`); a fresh random one when absent.
    pub key: Option<String>,
    pub key_alias: Option<String>,
    pub user_id: Option<String>,
    pub team_id: Option<String>,
    pub models: Vec<String>,
    pub metadata: serde_json::Map<String, serde_json::Value>,
    pub expires: Option<DateTime<Utc>>,
}

/// Times are stored with millisecond precision; truncating up front keeps the cached record
/// identical to the one read back from SQLite.
pub fn to_millis(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(t.timestamp_millis()).unwrap_or(t)
}

/// Parses LiteLLM's `duration`: a number and a unit, `s`, `m`, `h`, `d` or `w` (e.g. "30s", "7d").
pub fn parse_duration(text: &str) -> Option<chrono::Duration> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = text.split_at(split);
    let n: i64 = number.parse().ok()?;
    let seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => return None,
    };
    chrono::Duration::try_seconds(n.checked_mul(seconds)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_look_like_litellm_keys() {
        let key = new_key();
        assert!(key.starts_with("sk-"));
        assert_eq!(key.len(), 3 + KEY_RANDOM_CHARS);
        assert!(key[3..].bytes().all(|b| URL_SAFE.contains(&b)));
        assert_ne!(key, new_key());
        assert_eq!(key_name("sk-abcdefgh1234"), "sk-...1234");
    }

    #[test]
    fn the_token_is_the_lowercase_hex_of_the_hash() {
        let record = |hash| KeyRecord {
            hash,
            key_name: String::new(),
            key_alias: None,
            user_id: None,
            team_id: None,
            models: Vec::new(),
            metadata: serde_json::Map::new(),
            created_at: Utc::now(),
            expires: None,
            blocked: false,
        };
        assert_eq!(record([0xa5; 32]).token(), "a5".repeat(32));
        for key in ["sk-1234", &new_key()] {
            let hash = hash_key(key);
            assert_eq!(record(hash).token(), hex::encode(hash));
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Some(chrono::Duration::seconds(30)));
        assert_eq!(parse_duration("10m"), Some(chrono::Duration::minutes(10)));
        assert_eq!(parse_duration("2h"), Some(chrono::Duration::hours(2)));
        assert_eq!(parse_duration("7d"), Some(chrono::Duration::days(7)));
        for bad in ["", "7", "d", "7y", "-1d", "1.5h"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }
}
