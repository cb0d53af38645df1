//! The key routes: `/key/generate`, `/key/info`, `/key/delete`, `/key/update`, `/key/regenerate`,
//! `/key/list`, `/key/block`, `/key/unblock`: LiteLLM's fields, hashing, expiry, refusals.

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::{MASTER, Proxy, WAIT, chat, error_of};
use crate::support::wait_until;

#[tokio::test]
async fn generate_returns_litellm_fields_and_the_hash_as_token() {
    let proxy = Proxy::start().await;
    let k = proxy
        .generate_key(json!({
            "key_alias": "alias-1", "user_id": "u-1", "team_id": "my-unique-id",
            "models": ["gpt-4o"], "metadata": {"env": "ci"}, "duration": "2h",
            "max_budget": null,
        }))
        .await;
    let key = k["key"].as_str().unwrap();
    assert!(key.starts_with("sk-") && key.len() >= 3 + 22, "{key}");
    assert!(
        key[3..]
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    );
    assert_eq!(k["key_name"], format!("sk-...{}", &key[key.len() - 4..]));
    assert_eq!(k["token"], hex::encode(Sha256::digest(key.as_bytes())));
    assert_eq!(k["key_alias"], "alias-1");
    assert_eq!(k["user_id"], "u-1");
    assert_eq!(k["team_id"], "my-unique-id");
    assert_eq!(k["models"], json!(["gpt-4o"]));
    assert_eq!(k["metadata"], json!({"env": "ci"}));
    let expires = chrono::DateTime::parse_from_rfc3339(k["expires"].as_str().unwrap()).unwrap();
    let hours = (expires.with_timezone(&chrono::Utc) - chrono::Utc::now()).num_minutes();
    assert!((115..=120).contains(&hours), "expires in {hours} minutes");
    let other = proxy.generate_key(json!({})).await;
    assert_ne!(other["key"], k["key"]);
    assert_eq!(other["expires"], Value::Null);

    // keys.db holds the hash, never the key.
    let db_dir = proxy
        .spend_log
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("state");
    for name in ["keys.db", "keys.db-wal"] {
        let bytes = std::fs::read(db_dir.join(name)).unwrap_or_default();
        assert!(
            !bytes.windows(key.len()).any(|w| w == key.as_bytes()),
            "{name} holds the key"
        );
    }
}

#[tokio::test]
async fn info_accepts_key_or_hash_and_never_returns_the_key() {
    let proxy = Proxy::start().await;
    let k = proxy.generate_key(json!({"team_id": "t"})).await;
    let key = k["key"].as_str().unwrap();
    let token = k["token"].as_str().unwrap();
    for id in [key, token] {
        let r = proxy
            .http
            .get(proxy.url(&format!("/key/info?key={id}")))
            .bearer_auth(MASTER)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let text = r.text().await.unwrap();
        assert!(!text.contains(key), "info leaked the key: {text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["info"]["team_id"], "t");
        assert_eq!(v["info"]["token"], token);
    }
    let r = proxy
        .http
        .get(proxy.url("/key/info?key=sk-unknown-key-aaaaaaaaaaaa"))
        .bearer_auth(MASTER)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    error_of(r).await;
    let r = proxy
        .http
        .get(proxy.url("/key/info"))
        .bearer_auth(MASTER)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}

#[tokio::test]
async fn deleted_and_expired_keys_get_401() {
    let proxy = Proxy::start().await;
    let by_key = proxy.generate_key(json!({})).await;
    let by_hash = proxy.generate_key(json!({})).await;
    let keep = proxy.generate_key(json!({})).await;
    for k in [&by_key, &by_hash, &keep] {
        let r = proxy
            .post(
                "/chat/completions",
                k["key"].as_str().unwrap(),
                &chat("mock"),
            )
            .await;
        assert_eq!(r.status(), 200);
    }
    let r = proxy
        .post(
            "/key/delete",
            MASTER,
            &json!({"keys": [by_key["key"], by_hash["token"]]}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v["deleted_keys"],
        json!([by_key["token"], by_hash["token"]])
    );
    for k in [&by_key, &by_hash] {
        let r = proxy
            .post(
                "/chat/completions",
                k["key"].as_str().unwrap(),
                &chat("mock"),
            )
            .await;
        assert_eq!(r.status(), 401);
    }
    let r = proxy
        .post(
            "/chat/completions",
            keep["key"].as_str().unwrap(),
            &chat("mock"),
        )
        .await;
    assert_eq!(r.status(), 200);
    // Deleting what is not there is a 404, and deletes nothing.
    let r = proxy
        .post(
            "/key/delete",
            MASTER,
            &json!({"keys": [keep["key"], by_key["key"]]}),
        )
        .await;
    assert_eq!(r.status(), 404);
    let r = proxy
        .post(
            "/chat/completions",
            keep["key"].as_str().unwrap(),
            &chat("mock"),
        )
        .await;
    assert_eq!(r.status(), 200);

    let short = proxy.generate_key(json!({"duration": "1s"})).await;
    let short_key = short["key"].as_str().unwrap().to_owned();
    let error = wait_until("the 1s key to expire", WAIT, async || {
        let r = proxy
            .post("/chat/completions", &short_key, &chat("mock"))
            .await;
        (r.status() == 401).then_some(r)
    })
    .await;
    assert!(
        error_of(error).await["message"]
            .as_str()
            .unwrap()
            .contains("expired")
    );
}

#[tokio::test]
async fn unenforced_and_unknown_fields_are_refused_by_name() {
    let proxy = Proxy::start().await;
    for (field, value) in [
        ("max_budget", json!(10.0)),
        ("budget_duration", json!("30d")),
        ("tpm_limit", json!(1000)),
        ("rpm_limit", json!(10)),
        ("max_parallel_requests", json!(2)),
        ("soft_budget", json!(5)),
        ("model_max_budget", json!({"gpt-4o": 1})),
        ("spend", json!(0)),
        ("colour", json!("blue")),
    ] {
        let r = proxy
            .post(
                "/key/generate",
                MASTER,
                &json!({"team_id": "t", field: value}),
            )
            .await;
        assert_eq!(r.status(), 400, "{field}");
        let e = error_of(r).await;
        assert_eq!(e["param"], field);
        assert!(e["message"].as_str().unwrap().contains(field), "{e}");
    }
    for (field, value) in [
        ("duration", json!("7 years")),
        ("models", json!("gpt-4o")),
        ("team_id", json!(7)),
    ] {
        let r = proxy
            .post("/key/generate", MASTER, &json!({field: value}))
            .await;
        assert_eq!(r.status(), 400, "{field}");
        assert_eq!(error_of(r).await["param"], field);
    }
    let r = proxy
        .post("/key/delete", MASTER, &json!({"keys": "sk-x"}))
        .await;
    assert_eq!(r.status(), 400);
}

#[tokio::test]
async fn only_the_master_key_manages_keys() {
    let proxy = Proxy::start().await;
    let k = proxy.generate_key(json!({})).await;
    let key = k["key"].as_str().unwrap();
    let r = proxy.post("/key/generate", key, &json!({})).await;
    assert_eq!(r.status(), 403);
    error_of(r).await;
    let r = proxy
        .post("/key/delete", key, &json!({"keys": [key]}))
        .await;
    assert_eq!(r.status(), 403);
    let r = proxy
        .http
        .get(proxy.url(&format!("/key/info?key={key}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = proxy
        .http
        .post(proxy.url("/key/generate"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

/// POSTs to a key route with the master key; the status and the JSON body.
async fn admin(proxy: &Proxy, path: &str, body: Value) -> (u16, Value) {
    let r = proxy.post(path, MASTER, &body).await;
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn chat_status(proxy: &Proxy, key: &str) -> u16 {
    proxy
        .post("/v1/chat/completions", key, &super::chat("gpt-4o"))
        .await
        .status()
        .as_u16()
}

#[tokio::test]
async fn a_caller_chosen_key_works_and_a_taken_or_malformed_one_is_refused() {
    let proxy = Proxy::start().await;
    let chosen = "sk-team-chosen-key-0001";
    let (status, k) = admin(
        &proxy,
        "/key/generate",
        json!({"key": chosen, "team_id": "t"}),
    )
    .await;
    assert_eq!(status, 200, "{k}");
    assert_eq!(k["key"], chosen);
    assert_eq!(k["token"], hex::encode(Sha256::digest(chosen.as_bytes())));
    assert_eq!(chat_status(&proxy, chosen).await, 200);
    let (status, e) = admin(&proxy, "/key/generate", json!({"key": chosen})).await;
    assert_eq!(status, 400, "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("already exists"),
        "{e}"
    );
    for bad in ["not-sk", "sk-a b c d e", "sk-"] {
        let (status, e) = admin(&proxy, "/key/generate", json!({"key": bad})).await;
        assert_eq!(status, 400, "{bad}: {e}");
        assert_eq!(e["error"]["param"], "key");
    }
}

#[tokio::test]
async fn update_changes_only_what_is_sent_and_keeps_the_generate_bounds() {
    let proxy = Proxy::start().await;
    let k = proxy
        .generate_key(json!({"team_id": "t1", "user_id": "u1", "models": ["gpt-4o"]}))
        .await;
    let key = k["key"].as_str().unwrap();
    let (status, u) = admin(
        &proxy,
        "/key/update",
        json!({"key": key, "team_id": "t2", "metadata": {"env": "prod"}}),
    )
    .await;
    assert_eq!(status, 200, "{u}");
    assert_eq!(
        (u["team_id"].clone(), u["user_id"].clone()),
        (json!("t2"), json!("u1"))
    );
    assert_eq!(u["models"], json!(["gpt-4o"]));
    assert_eq!(u["metadata"], json!({"env": "prod"}));
    assert_eq!(chat_status(&proxy, key).await, 200);
    let records = proxy.records();
    assert_eq!(records.last().unwrap().team_id.as_deref(), Some("t2"));
    // The same bounds as /key/generate (limits.rs).
    for (field, value) in [
        ("user_id", json!("u".repeat(257))),
        ("metadata", json!({"big": "x".repeat(9000)})),
        ("metadata", json!({"allowed_end_user_ids": "not-a-list"})),
        ("max_budget", json!(5)),
    ] {
        let (status, e) = admin(&proxy, "/key/update", json!({"key": key, field: value})).await;
        assert_eq!(status, 400, "{field}: {e}");
        assert!(
            e["error"]["param"].as_str().unwrap().starts_with(field),
            "{e}"
        );
    }
    let (status, _) = admin(
        &proxy,
        "/key/update",
        json!({"key": "sk-nobody-has-this", "team_id": "x"}),
    )
    .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn block_unblock_and_regenerate_take_effect_at_once() {
    let proxy = Proxy::start().await;
    let k = proxy
        .generate_key(json!({"team_id": "t", "key_alias": "a"}))
        .await;
    let key = k["key"].as_str().unwrap().to_owned();
    let (status, b) = admin(&proxy, "/key/block", json!({"key": key})).await;
    assert_eq!((status, b["blocked"].clone()), (200, json!(true)), "{b}");
    let r = proxy
        .post("/v1/chat/completions", &key, &super::chat("gpt-4o"))
        .await;
    assert_eq!(r.status(), 401);
    assert!(
        error_of(r).await["message"]
            .as_str()
            .unwrap()
            .contains("blocked")
    );
    let (status, b) = admin(&proxy, "/key/unblock", json!({"key": k["token"]})).await;
    assert_eq!((status, b["blocked"].clone()), (200, json!(false)), "{b}");
    assert_eq!(chat_status(&proxy, &key).await, 200);

    // /key/{key}/regenerate: a new key with the same settings; the old one is refused.
    let (status, r) = admin(&proxy, &format!("/key/{key}/regenerate"), json!({})).await;
    assert_eq!(status, 200, "{r}");
    let second = r["key"].as_str().unwrap().to_owned();
    assert_ne!(second, key);
    assert_eq!(
        (r["team_id"].clone(), r["key_alias"].clone()),
        (json!("t"), json!("a"))
    );
    assert_eq!(chat_status(&proxy, &key).await, 401);
    assert_eq!(chat_status(&proxy, &second).await, 200);
    // /key/regenerate with a chosen new key.
    let (status, r) = admin(
        &proxy,
        "/key/regenerate",
        json!({"key": second, "new_key": "sk-rotated-by-the-team-01"}),
    )
    .await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["key"], "sk-rotated-by-the-team-01");
    assert_eq!(chat_status(&proxy, &second).await, 401);
    assert_eq!(chat_status(&proxy, "sk-rotated-by-the-team-01").await, 200);
}

#[tokio::test]
async fn list_is_paginated_as_litellm_and_filters() {
    let proxy = Proxy::start().await;
    let mut tokens = Vec::new();
    for i in 0..5 {
        let team = if i % 2 == 0 { "even" } else { "odd" };
        tokens.push(proxy.generate_key(json!({"team_id": team})).await["token"].clone());
    }
    let get = |q: &'static str| {
        let req = proxy
            .http
            .get(proxy.url(&format!("/key/list{q}")))
            .bearer_auth(MASTER);
        async move {
            let r = req.send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let (status, page) = get("?page=2&size=2").await;
    assert_eq!(status, 200);
    assert_eq!(page["total_count"], 5);
    assert_eq!(page["current_page"], 2);
    assert_eq!(page["total_pages"], 3);
    assert_eq!(page["keys"].as_array().unwrap().len(), 2);
    assert!(page["keys"][0].is_string(), "tokens by default: {page}");
    let (_, odd) = get("?team_id=odd&return_full_object=true").await;
    assert_eq!(odd["total_count"], 2);
    assert!(
        odd["keys"]
            .as_array()
            .unwrap()
            .iter()
            .all(|k| k["team_id"] == "odd")
    );
    let (status, _) = get("?size=101").await;
    assert_eq!(status, 400);
    // Master only.
    let key = proxy.generate_key(json!({})).await["key"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = proxy
        .http
        .get(proxy.url("/key/list"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    for path in [
        "/key/update",
        "/key/block",
        "/key/unblock",
        "/key/regenerate",
    ] {
        let r = proxy.post(path, &key, &json!({"key": key})).await;
        assert_eq!(r.status(), 403, "{path}");
    }
}
