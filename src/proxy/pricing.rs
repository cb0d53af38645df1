//! What a call costs: per-token USD prices from, in order of precedence, the deployment's own
//! `input_cost_per_token` / `output_cost_per_token`, an optional price file in LiteLLM's
//! `model_prices_and_context_window.json` format, and the built-in table (`prices.json`).

use std::collections::HashMap;
use std::path::Path;

use serde::Deserialize;

use super::config::Deployment;

/// The built-in table, compiled in so a fresh install prices the common models.
const BUILT_IN: &str = include_str!("prices.json");

/// USD per token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Price {
    pub input_per_token: f64,
    pub output_per_token: f64,
}

impl Price {
    /// Cost of one call, rounded to 1e-12 USD so `7 × 2.5e-6 + 15 × 1e-5` prints as 0.0001675
    /// instead of carrying binary floating-point noise into the bill.
    pub fn cost(&self, input_tokens: u64, output_tokens: u64) -> f64 {
        let raw = input_tokens as f64 * self.input_per_token
            + output_tokens as f64 * self.output_per_token;
        (raw * 1e12).round() / 1e12
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PriceFileError {
    #[error(
        "cannot read price file {path}: {source}; fix tally_settings.price_file / TALLY_PRICE_FILE"
    )]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "price file {path} is not LiteLLM's model_prices_and_context_window.json format: {message}"
    )]
    Format { path: String, message: String },
}

/// Prices by model name (as the provider names it, with or without a `provider/` prefix).
#[derive(Debug, Clone, Default)]
pub struct PriceTable {
    prices: HashMap<String, Price>,
}

#[derive(Deserialize)]
struct Entry {
    input_cost_per_token: Option<f64>,
    output_cost_per_token: Option<f64>,
}

impl PriceTable {
    /// The built-in table, with the price file (if any) layered over it.
    pub fn load(price_file: Option<&Path>) -> Result<Self, PriceFileError> {
        let mut table = Self::default();
        table
            .merge_json(BUILT_IN)
            .map_err(|message| PriceFileError::Format {
                path: "built-in prices.json".into(),
                message,
            })?;
        if let Some(path) = price_file {
            let text = std::fs::read_to_string(path).map_err(|source| PriceFileError::Read {
                path: path.display().to_string(),
                source,
            })?;
            table
                .merge_json(&text)
                .map_err(|message| PriceFileError::Format {
                    path: path.display().to_string(),
                    message,
                })?;
        }
        Ok(table)
    }

    /// Adds every entry of a LiteLLM price map that has both token prices; entries without
    /// them (e.g. LiteLLM's `sample_spec`, image models) are skipped, not errors.
    fn merge_json(&mut self, text: &str) -> Result<(), String> {
        let map: HashMap<String, serde_json::Value> =
            serde_json::from_str(text).map_err(|e| e.to_string())?;
        for (name, value) in map {
            let Ok(entry) = serde_json::from_value::<Entry>(value) else {
                continue;
            };
            if let (Some(input), Some(output)) =
                (entry.input_cost_per_token, entry.output_cost_per_token)
                && input.is_finite()
                && output.is_finite()
                && input >= 0.0
                && output >= 0.0
            {
                self.prices.insert(
                    name,
                    Price {
                        input_per_token: input,
                        output_per_token: output,
                    },
                );
            }
        }
        Ok(())
    }

    /// The price of a deployment, or `None` when it is unpriced.
    pub fn price_for(&self, d: &Deployment) -> Option<Price> {
        let listed = self
            .lookup(&d.upstream_model)
            .or_else(|| self.lookup(&d.model_name));
        match (d.input_cost_per_token, d.output_cost_per_token, listed) {
            (Some(i), Some(o), _) => Some(Price {
                input_per_token: i,
                output_per_token: o,
            }),
            // One side set on the deployment: the other side comes from the table, or is free.
            (Some(i), None, l) => Some(Price {
                input_per_token: i,
                output_per_token: l.map_or(0.0, |p| p.output_per_token),
            }),
            (None, Some(o), l) => Some(Price {
                input_per_token: l.map_or(0.0, |p| p.input_per_token),
                output_per_token: o,
            }),
            (None, None, l) => l,
        }
    }

    fn lookup(&self, model: &str) -> Option<Price> {
        self.prices
            .get(model)
            .or_else(|| self.prices.get(&format!("openai/{model}")))
            .copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn deployment(name: &str, upstream: &str) -> Deployment {
        Deployment {
            model_name: name.into(),
            upstream_model: upstream.into(),
            api_base: "http://x".into(),
            api_key: None,
            timeout: Duration::from_secs(1),
            input_cost_per_token: None,
            output_cost_per_token: None,
            mock_response: None,
            ..Deployment::default()
        }
    }

    #[test]
    fn gpt_4o_list_price_bills_7_plus_15_tokens_at_0_0001675() {
        let table = PriceTable::load(None).unwrap();
        let price = table.price_for(&deployment("my-gpt", "gpt-4o")).unwrap();
        assert_eq!(price.cost(7, 15), 0.0001675);
    }

    #[test]
    fn deployment_prices_win_and_unknown_models_are_unpriced() {
        let table = PriceTable::load(None).unwrap();
        let mut d = deployment("gpt-4o", "gpt-4o");
        d.input_cost_per_token = Some(0.000001);
        d.output_cost_per_token = Some(0.000002);
        assert_eq!(table.price_for(&d).unwrap().cost(10, 10), 0.00003);
        assert_eq!(table.price_for(&deployment("x", "my-local-llama")), None);
        // Looked up by model_name when the upstream name is not listed.
        assert!(
            table
                .price_for(&deployment("claude-sonnet-4-5", "local"))
                .is_some()
        );
    }

    #[test]
    fn a_price_file_overrides_the_built_in_table() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("prices.json");
        std::fs::write(
            &path,
            r#"{"sample_spec": {"max_tokens": "set to max"},
                "gpt-4o": {"input_cost_per_token": 1e-6, "output_cost_per_token": 1e-6},
                "my-local-llama": {"input_cost_per_token": 1e-7, "output_cost_per_token": 2e-7}}"#,
        )
        .unwrap();
        let table = PriceTable::load(Some(&path)).unwrap();
        assert_eq!(
            table
                .price_for(&deployment("a", "gpt-4o"))
                .unwrap()
                .cost(1, 1),
            0.000002
        );
        assert!(
            table
                .price_for(&deployment("b", "my-local-llama"))
                .is_some()
        );
        std::fs::write(&path, "not json").unwrap();
        let err = PriceTable::load(Some(&path)).unwrap_err().to_string();
        assert!(err.contains("prices.json"), "{err}");
    }
}
