//! Every LiteLLM proxy config of `fixtures/litellm-configs/` (LiteLLM's docs, invented keys)
//! loads, and the proxy starts with it: providers, groups, aliases, fallbacks and wildcards as
//! LiteLLM reads them.

use std::path::Path;

use tally::proxy::{AppState, ProxyConfig};

/// The variables these configs read (`os.environ/...` and the providers' own), with invented
/// values; nothing is read from the test process's environment.
fn env(name: &str) -> Option<String> {
    let value = match name {
        "AZURE_API_BASE" => "https://invented-resource.openai.azure.com/",
        "AZURE_API_KEY" | "AZURE_NORTH_AMERICA_API_KEY" => "invented-azure-key",
        "OPENAI_API_KEY" => "sk-invented-openai-key",
        "HUGGINGFACE_API_KEY" => "hf_invented",
        "TALLY_ALLOW_WEAK_MASTER_KEY" => "1",
        "LITELLM_MASTER_KEY" => "sk-invented-master-key-0123456789",
        _ => return None,
    };
    Some(value.to_owned())
}

fn load(name: &str) -> ProxyConfig {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/litellm-configs")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap();
    ProxyConfig::load_from_str(&text, &path.display().to_string(), &env)
        .unwrap_or_else(|e| panic!("{name} does not load: {e}"))
}

#[tokio::test]
async fn every_litellm_docs_config_loads_and_starts() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/litellm-configs");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    names.sort();
    assert!(names.len() >= 15, "{names:?}");
    for name in &names {
        let state = tempfile::tempdir().unwrap();
        let mut config = load(name)
            .with_spend_log(state.path().join("spend.jsonl"))
            .with_state_dir(state.path().join("state"));
        assert!(!config.deployments.is_empty(), "{name}");
        // A docs config's PostgreSQL (host `db`) is not here: its keys go to SQLite for this
        // check; the PostgreSQL key store has its own tests (keystore, replicas).
        if let Some(url) = config.database_url.take() {
            assert!(url.starts_with("postgresql://"), "{name}: {url}");
        }
        if let Err(e) = AppState::new(&config).await {
            panic!("{name} does not start: {e}");
        }
    }
}

#[test]
fn the_configs_resolve_as_litellm_reads_them() {
    let quick = load("docker-quick-start.yaml");
    let d = &quick.deployments[0];
    assert_eq!(
        (d.provider.as_str(), d.upstream_model.as_str()),
        ("azure", "my_azure_deployment")
    );
    assert_eq!(d.api_base, "https://invented-resource.openai.azure.com");
    assert_eq!(d.api_version.as_deref(), Some("2025-01-01-preview"));

    let params = load("configs-model-specific-params.yaml");
    let team1 = params.deployment("gpt-4-team1").unwrap();
    assert_eq!(team1.azure_ad_token.as_deref(), Some("eyJ0eXAiOiJ"));
    assert_eq!(team1.api_key, None);
    let ollama = params.deployment("mistral-7b").unwrap();
    assert_eq!(ollama.api_base, "http://ollama.internal:11434/v1");
    assert_eq!(ollama.upstream_model, "mistral");

    let embeddings = load("configs-embeddings-openai.yaml");
    assert_eq!(embeddings.deployments.len(), 2);
    assert_eq!(embeddings.model_names(), ["text-embedding-ada-002"]);
    assert_eq!(
        embeddings.deployments[1].api_key.as_deref(),
        Some("your-api-key-2")
    );

    let deepseek = load("configs-custom-tokenizer.yaml");
    assert_eq!(
        deepseek.deployments[0].api_base,
        "https://api.deepseek.com/beta"
    );

    let lb = load("load-balancing.yaml");
    assert_eq!(lb.deployments.len(), 3);
    assert_eq!(lb.deployments[2].rpm, Some(1440));
    assert_eq!(lb.router.num_retries, 2);
    assert_eq!(lb.router.aliases[0].alias, "gpt-4");
    assert_eq!(
        lb.deployments[0].timeout.as_secs(),
        30,
        "router_settings.timeout"
    );

    let hidden = load("load-balancing-hidden-alias.yaml");
    assert!(hidden.router.aliases[0].hidden);

    let fallbacks = load("reliability-fallbacks.yaml");
    assert_eq!(
        fallbacks.router.fallbacks_of("gpt-3.5-turbo"),
        ["gpt-4".to_owned()]
    );

    let wildcard = load("reliability-wildcard-fallbacks.yaml");
    assert_eq!(
        wildcard.router.fallbacks_of("gpt-4o"),
        ["azure/gpt-4o".to_owned()]
    );

    let pre_call = load("reliability-pre-call-checks.yaml");
    assert_eq!(
        pre_call.deployments[0].base_model.as_deref(),
        Some("azure/gpt-4-1106-preview")
    );
}
