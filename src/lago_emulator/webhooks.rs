//! Lago's post-ingestion checks, as the emulator plays them: with billable metrics configured,
//! a stored event whose `code` matches none is `invalid_code`, one whose metric's aggregation
//! property is missing from `properties` is `missing_aggregation_property`. They are reported in
//! an `events.errors` webhook to the configured URL, signed like Lago signs (HMAC-SHA256 of the
//! body, Base64, in `X-Lago-Signature`). Real Lago checks the last hour's events hourly; the
//! emulator reports each request's events right away so tests and the demo need not wait.

use std::time::Duration;

use serde_json::{Value, json};

use super::validate::ParsedEvent;

/// A billable metric: its code and, for sum/max/... metrics, the property it aggregates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metric {
    pub code: String,
    pub field_name: Option<String>,
}

impl std::str::FromStr for Metric {
    type Err = String;

    /// `CODE` or `CODE:FIELD` (e.g. `llm_usage:total_tokens`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (code, field) = match s.split_once(':') {
            Some((c, f)) => (c.trim(), Some(f.trim())),
            None => (s.trim(), None),
        };
        if code.is_empty() || field.is_some_and(str::is_empty) {
            return Err(format!(
                "metric {s:?}: expected CODE or CODE:AGGREGATION_PROPERTY, e.g. llm_usage:total_tokens"
            ));
        }
        Ok(Self {
            code: code.to_owned(),
            field_name: field.map(str::to_owned),
        })
    }
}

/// Where `events.errors` webhooks go and how they are signed.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    pub url: String,
    /// Lago's HMAC signature token: signs with `hmac`.
    pub hmac_key: Option<String>,
    /// Without an HMAC key: sign with `jwt` (RS256, the emulator's own key pair, whose public
    /// half `GET /api/v1/webhooks/public_key` serves). Neither: unsigned (to test refusal).
    pub jwt: bool,
}

/// The emulator's RSA key pair for `jwt` webhook signatures, made once per emulator.
pub(crate) struct JwtSigner {
    encoding: jsonwebtoken::EncodingKey,
    /// `-----BEGIN PUBLIC KEY-----` (SPKI) PEM, as Lago's `RsaPublicKey.to_s`.
    pub public_pem: String,
}

impl JwtSigner {
    pub fn generate() -> Option<Self> {
        use aws_lc_rs::encoding::{AsDer, Pkcs8V1Der, PublicKeyX509Der};
        use aws_lc_rs::signature::KeyPair as _;
        let pair = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).ok()?;
        let private: Pkcs8V1Der<'_> = pair.as_der().ok()?;
        let public: PublicKeyX509Der<'_> = pair.public_key().as_der().ok()?;
        let encoding = jsonwebtoken::EncodingKey::from_rsa_pem(
            pem("PRIVATE KEY", private.as_ref()).as_bytes(),
        )
        .ok()?;
        Some(Self {
            encoding,
            public_pem: pem("PUBLIC KEY", public.as_ref()),
        })
    }

    /// Lago's JWT: `{"data": <the body as text>, "iss": <Lago's URL>}`, RS256.
    fn sign(&self, body: &[u8], issuer: &str) -> Option<String> {
        let claims = json!({"data": String::from_utf8_lossy(body), "iss": issuer});
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
            &claims,
            &self.encoding,
        )
        .ok()
    }
}

/// PEM text of `der` under `label`, 64 characters a line.
fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// The body of `GET /api/v1/webhooks/public_key`: Base64 of the PEM, in lines of 60 characters
/// as Ruby's `Base64.encode64` writes it.
pub(crate) fn public_key_body(public_pem: &str) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(public_pem.as_bytes());
    let mut out = String::new();
    for chunk in b64.as_bytes().chunks(60) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out
}

/// The transaction_ids of `events` Lago would report, by category (empty when all is fine or
/// no metric is configured).
pub(crate) fn check(metrics: &[Metric], events: &[&ParsedEvent]) -> Value {
    let mut invalid_code = Vec::new();
    let mut missing_property = Vec::new();
    if metrics.is_empty() {
        return Value::Null;
    }
    for e in events {
        match metrics.iter().find(|m| m.code == *e.code) {
            None => invalid_code.push(e.transaction_id.to_string()),
            Some(Metric {
                field_name: Some(field),
                ..
            }) => {
                let has =
                    serde_json::from_str::<serde_json::Map<String, Value>>(&e.properties_json)
                        .is_ok_and(|p| p.get(field).is_some_and(|v| !v.is_null()));
                if !has {
                    missing_property.push(e.transaction_id.to_string());
                }
            }
            Some(_) => {}
        }
    }
    if invalid_code.is_empty() && missing_property.is_empty() {
        return Value::Null;
    }
    json!({
        "invalid_code": invalid_code,
        "missing_aggregation_property": missing_property,
        "missing_group_key": [],
        "invalid_filter_values": [],
    })
}

/// The webhook body Lago sends for `events.errors`.
pub(crate) fn body(errors: Value) -> Vec<u8> {
    json!({
        "webhook_type": "events.errors",
        "object_type": "events_errors",
        "organization_id": "00000000-0000-0000-0000-000000000000",
        "events_errors": errors,
    })
    .to_string()
    .into_bytes()
}

/// Posts one webhook, retrying a few times on failure as Lago does (it retries non-2xx).
pub(crate) async fn deliver(
    config: WebhookConfig,
    body: Vec<u8>,
    jwt: Option<std::sync::Arc<JwtSigner>>,
    issuer: String,
) {
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .redirect(reqwest::redirect::Policy::none())
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "lago emulator: cannot build the webhook client");
            return;
        }
    };
    let unique_key = uuid::Uuid::now_v7().to_string();
    for attempt in 0..3u32 {
        let mut req = client
            .post(&config.url)
            .header("content-type", "application/json")
            .header("x-lago-unique-key", &unique_key)
            .body(body.clone());
        if let Some(key) = &config.hmac_key {
            req = req.header("x-lago-signature-algorithm", "hmac").header(
                "x-lago-signature",
                crate::ship::webhook::hmac_signature(key.as_bytes(), &body),
            );
        } else if let Some(token) = jwt.as_ref().and_then(|j| j.sign(&body, &issuer)) {
            req = req
                .header("x-lago-signature-algorithm", "jwt")
                .header("x-lago-signature", token);
        }
        match req.send().await {
            Ok(r) if r.status().is_success() => return,
            Ok(r) => tracing::warn!(
                status = r.status().as_u16(),
                attempt,
                "lago emulator: webhook refused"
            ),
            Err(e) => tracing::warn!(error = %e, attempt, "lago emulator: webhook not delivered"),
        }
        tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
    }
}
