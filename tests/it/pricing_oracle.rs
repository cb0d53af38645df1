//! tally's cost of every case in tests/pricing/cases.json equals LiteLLM's own `completion_cost`
//! (the pinned `litellm` package, tests/pricing/requirements.txt, run by tests/pricing/oracle.py)
//! to 1e-9 relative, both pricing from the same table: the built-in prices.json plus
//! tests/pricing/extra_prices.json. tally reads each case's usage with the proxy's own usage
//! parser, LiteLLM with its own provider transformations.
//!
//! Needs `TALLY_PYTHON`: an interpreter with the pinned litellm (scripts/test.sh sets it up).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use serde::Deserialize;
use tally::proxy::pricing::PriceTable;
use tally::proxy::usage::Usage;

#[derive(Deserialize)]
struct Case {
    name: String,
    provider: String,
    model: String,
    usage: serde_json::Value,
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The built-in table with the oracle's extra models, as one JSON file both sides read.
fn combined_prices(dir: &Path) -> std::path::PathBuf {
    let read = |p: &str| -> serde_json::Map<String, serde_json::Value> {
        let text = std::fs::read_to_string(root().join(p)).unwrap();
        serde_json::from_str(&text).unwrap()
    };
    let mut prices = read("src/proxy/prices.json");
    prices.extend(read("tests/pricing/extra_prices.json"));
    let path = dir.join("prices.json");
    std::fs::write(&path, serde_json::to_vec(&prices).unwrap()).unwrap();
    path
}

fn tally_costs(prices: &Path, cases: &[Case]) -> BTreeMap<String, f64> {
    let table = PriceTable::from_json(&std::fs::read_to_string(prices).unwrap()).unwrap();
    cases
        .iter()
        .map(|c| {
            let usage: Usage = serde_json::from_value(c.usage.clone()).unwrap();
            let price = table
                .price_of(&c.provider, &c.model)
                .unwrap_or_else(|| panic!("{}: {}/{} is not priced", c.name, c.provider, c.model));
            (c.name.clone(), price.cost(&usage))
        })
        .collect()
}

#[test]
fn tally_bills_what_litellm_bills() {
    let cases_path = root().join("tests/pricing/cases.json");
    let cases: Vec<Case> =
        serde_json::from_str(&std::fs::read_to_string(&cases_path).unwrap()).unwrap();
    assert!(
        cases.len() >= 30,
        "the oracle table keeps at least 30 cases"
    );

    let Some(python) = std::env::var_os("TALLY_PYTHON") else {
        eprintln!(
            "SKIPPED tally_bills_what_litellm_bills: TALLY_PYTHON is not set (scripts/test.sh \
             sets it to a venv with the pinned litellm from tests/pricing/requirements.txt)"
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let prices = combined_prices(dir.path());
    let out = Command::new(&python)
        .arg(root().join("tests/pricing/oracle.py"))
        .arg(&prices)
        .arg(&cases_path)
        .output()
        .expect("run TALLY_PYTHON");
    assert!(
        out.status.success(),
        "the LiteLLM oracle failed (is the pinned litellm installed? \
         {python:?} -m pip install -r tests/pricing/requirements.txt):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let litellm: BTreeMap<String, f64> = serde_json::from_slice(&out.stdout).unwrap();
    let tally = tally_costs(&prices, &cases);

    let mut wrong = Vec::new();
    for (name, ours) in &tally {
        let theirs = litellm[name];
        let scale = ours.abs().max(theirs.abs());
        if scale > 0.0 && (ours - theirs).abs() / scale > 1e-9 || scale == 0.0 && ours != &theirs {
            wrong.push(format!("{name}: tally {ours} vs LiteLLM {theirs}"));
        }
    }
    assert!(wrong.is_empty(), "costs differ:\n{}", wrong.join("\n"));
    // The cases do exercise prices: no two-case table of zeros passes by accident.
    assert!(tally.values().filter(|c| **c > 0.0).count() >= 30);
}
