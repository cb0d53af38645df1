//! Security checks (docs/reliability.md), on the real binaries with every log at `RUST_LOG=trace`:
//! - no raw key (master, virtual, Lago) and no prompt text in the spend log, the state databases
//!   (with their WAL files) or the captured logs;
//! - keys are compared in constant time (`subtle`), and a key differing only in its last byte is
//!   refused;
//! - without a key every route of the router (read from `src/proxy/routes.rs`, so a new route is
//!   covered at once) answers 401, except the two liveness paths; readiness with a key reveals
//!   only health booleans and the version;
//! - malformed, oversized or mistyped request bodies and invalid keys get a clear OpenAI-shaped
//!   error, never a 500;
//! - the spend log and the state files are not readable by other users.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::reliability::proxy::{MASTER, ProxyChild, proxy_config};
use crate::reliability::support::{PATIENCE, Rig, figure};

const PROMPT_MARKER: &str = "zebra-quartz-prompt-7731";

/// `(METHOD, path)` of every `.route("path", method(...))` in the router's source.
fn declared_routes(src: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for piece in src.split(".route(\"").skip(1) {
        let Some((path, rest)) = piece.split_once('"') else {
            continue;
        };
        let rest = rest.trim_start_matches([',', ' ', '\n']);
        let method = rest.split('(').next().unwrap_or_default().trim();
        out.push((method.to_uppercase(), path.to_owned()));
    }
    out
}

/// Every file under `dir` (recursively).
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// Asserts an OpenAI-shaped error: `{"error": {"message": "...", "type": "...", ...}}`.
async fn openai_error(resp: reqwest::Response, want_status: u16, what: &str) -> Value {
    let status = resp.status().as_u16();
    let body = resp.text().await.unwrap();
    assert_eq!(status, want_status, "{what}: {body}");
    let v: Value =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {body}"));
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty())
            && v["error"]["type"].is_string(),
        "{what}: not an OpenAI-shaped error: {body}"
    );
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_leaks_keys_are_checked_in_constant_time_and_only_liveness_is_open() {
    let rig = Rig::new().await;
    let lago_key = tally::lago_emulator::EmulatorConfig::default().api_key;
    let config = proxy_config(&rig, 1 << 20);
    let proxy_stderr = rig.path("proxy.stderr");
    std::fs::write(rig.log(), b"").unwrap();
    std::fs::set_permissions(rig.log(), std::fs::Permissions::from_mode(0o640)).unwrap();
    let ship_stderr = std::fs::File::create(rig.stderr_path()).unwrap();
    let mut ship = rig
        .command(&["ship", "--poll-interval-ms", "200", "--linger-ms", "5"])
        .env("RUST_LOG", "trace")
        .stdout(std::process::Stdio::null())
        .stderr(ship_stderr)
        .spawn()
        .unwrap();
    let mut proxy = ProxyChild::start(&rig, &config, &proxy_stderr, "trace").await;
    let http = reqwest::Client::new();
    let url = |p: &str| format!("{}{p}", proxy.base);

    // A virtual key, then a completion with it carrying a recognisable prompt.
    let key: Value = http
        .post(url("/key/generate"))
        .bearer_auth(MASTER)
        .json(&json!({"key_alias": "sec-key"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let vkey = key["key"]
        .as_str()
        .unwrap_or_else(|| panic!("no key in {key}"))
        .to_owned();
    let chat = |k: String| {
        let http = http.clone();
        let u = url("/v1/chat/completions");
        async move {
            http.post(u)
                .bearer_auth(k)
                .json(&json!({"model": "gpt-4o", "user": "customer-sec",
                    "messages": [{"role": "user", "content": format!("tell me about {PROMPT_MARKER}")}]}))
                .send()
                .await
                .unwrap()
        }
    };
    for _ in 0..3 {
        assert_eq!(chat(vkey.clone()).await.status(), 200);
        assert_eq!(chat(MASTER.to_owned()).await.status(), 200);
    }

    // Constant-time comparison: behaviour (a key off by its last byte is refused) ...
    for k in [&vkey, &MASTER.to_owned()] {
        let mut wrong = k.clone();
        let last = wrong.pop().unwrap();
        wrong.push(if last == 'a' { 'b' } else { 'a' });
        openai_error(chat(wrong).await, 401, "a key differing in its last byte").await;
    }
    // ... and code: hashes are compared with `subtle`, and auth uses nothing else.
    let src =
        |p: &str| std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(p)).unwrap();
    let keys_rs = src("src/proxy/keys.rs");
    let auth_rs = src("src/proxy/auth.rs");
    assert!(keys_rs.contains("use subtle::ConstantTimeEq") && keys_rs.contains(".ct_eq("));
    assert!(
        auth_rs.contains("hashes_equal("),
        "auth must compare through keys::hashes_equal"
    );
    assert!(
        !auth_rs.contains("== hash") && !auth_rs.contains("hash =="),
        "a plain == on key hashes in auth.rs"
    );

    // Without a key, only liveness answers: every route the router declares is tried.
    let routes = declared_routes(&src("src/proxy/routes.rs"));
    for must in [
        ("POST", "/v1/chat/completions"),
        ("GET", "/health/readiness"),
        ("GET", "/metrics"),
        ("POST", "/key/generate"),
    ] {
        assert!(
            routes.iter().any(|(m, p)| (m.as_str(), p.as_str()) == must),
            "route list not read from routes.rs: {routes:?}"
        );
    }
    let liveness = ["/health/liveliness", "/health/liveness"];
    let mut open = Vec::new();
    for (method, path) in &routes {
        let req = match method.as_str() {
            "GET" => http.get(url(path)),
            _ => http
                .post(url(path))
                .json(&json!({"model": "gpt-4o", "input": "x",
                "messages": [{"role": "user", "content": "x"}]})),
        };
        let resp = req.send().await.unwrap();
        if liveness.contains(&path.as_str()) {
            assert_eq!(resp.status(), 200, "{method} {path}");
            open.push(path.clone());
        } else {
            openai_error(resp, 401, &format!("{method} {path} without a key")).await;
        }
    }
    assert_eq!(
        open, liveness,
        "exactly the liveness paths answer without a key"
    );
    let ready: Value = http
        .get(url("/health/readiness"))
        .bearer_auth(vkey.clone())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut fields: Vec<&str> = ready
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    fields.sort();
    assert_eq!(
        fields,
        ["key_store", "spend_log", "status", "version"],
        "readiness reveals more: {ready}"
    );

    // Bad requests: a clear OpenAI-shaped 4xx, never a 500.
    let post = |body: Vec<u8>, ctype: &'static str| {
        http.post(url("/v1/chat/completions"))
            .bearer_auth(vkey.clone())
            .header("content-type", ctype)
            .body(body)
            .send()
    };
    let mut answers = Vec::new();
    let cases: Vec<(&str, Vec<u8>, &'static str)> = vec![
        (
            "malformed JSON",
            b"{\"model\": \"gpt-4o\", \"messages\": [".to_vec(),
            "application/json",
        ),
        ("not an object", b"[1,2,3]".to_vec(), "application/json"),
        (
            "messages of the wrong type",
            br#"{"model":"gpt-4o","messages":"hi"}"#.to_vec(),
            "application/json",
        ),
        (
            "no model",
            br#"{"messages":[{"role":"user","content":"x"}]}"#.to_vec(),
            "application/json",
        ),
        (
            "unknown model",
            br#"{"model":"nope","messages":[{"role":"user","content":"x"}]}"#.to_vec(),
            "application/json",
        ),
        (
            "invalid UTF-8",
            b"{\"model\":\"gpt-4o\",\"messages\":[{\"role\":\"user\",\"content\":\"\xff\"}]}"
                .to_vec(),
            "application/json",
        ),
        (
            "wrong content type",
            br#"{"model":"gpt-4o","messages":[{"role":"user","content":"x"}]}"#.to_vec(),
            "text/plain",
        ),
        (
            "form content type",
            b"model=gpt-4o".to_vec(),
            "application/x-www-form-urlencoded",
        ),
        (
            "oversized body",
            {
                let mut b = br#"{"model":"gpt-4o","messages":[{"role":"user","content":""#.to_vec();
                b.extend(std::iter::repeat_n(b'x', 80 << 10)); // over max_body_bytes: 65536
                b.extend_from_slice(br#""}]}"#);
                b
            },
            "application/json",
        ),
    ];
    for (what, body, ctype) in cases {
        // The proxy may answer 413 and close before an oversized body is fully written; the
        // client then sees a broken pipe instead of the answer. Try again until it reads one.
        let mut tries = 0;
        let resp = loop {
            tries += 1;
            match post(body.clone(), ctype).await {
                Ok(r) => break r,
                Err(e) if tries < 20 => {
                    eprintln!("{what}: {e}; again");
                }
                Err(e) => panic!("{what}: no answer in {tries} tries: {e}"),
            }
        };
        let status = resp.status().as_u16();
        assert!((400..500).contains(&status), "{what}: {status}");
        openai_error(resp, status, what).await;
        answers.push(format!("{what}→{status}"));
    }
    for (header, value) in [
        ("authorization", "Bearer ".to_owned()),
        ("authorization", "Basic Zm9vOmJhcg==".to_owned()),
        ("x-api-key", "sk-not-a-key".to_owned()),
        ("authorization", format!("Bearer {vkey}x")),
    ] {
        let resp = http
            .post(url("/v1/chat/completions"))
            .header(header, value.clone())
            .json(&json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}))
            .send()
            .await
            .unwrap();
        openai_error(resp, 401, &format!("invalid key in {header}")).await;
    }

    // Let the shipper bill the 6 completions, then stop both services.
    crate::support::wait_until("the completions to be billed", PATIENCE, async || {
        rig.lago.event_count() >= 6
    })
    .await;
    assert!(proxy.terminate().unwrap().success());
    // SAFETY: signalling our own child.
    unsafe { libc::kill(ship.id() as i32, libc::SIGTERM) };
    assert!(ship.wait().unwrap().success());

    // No secret anywhere on disk or in the trace logs.
    let secrets = [
        ("the master key", MASTER.to_owned()),
        ("the virtual key", vkey.clone()),
        ("the Lago key", lago_key.clone()),
        ("the prompt", PROMPT_MARKER.to_owned()),
    ];
    let files: Vec<PathBuf> = files_under(rig.dir.path())
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n != "config.yaml"))
        .collect();
    let mut checked = 0;
    for f in &files {
        let bytes = std::fs::read(f).unwrap();
        checked += bytes.len();
        for (what, secret) in &secrets {
            assert!(!contains(&bytes, secret), "{what} is in {}", f.display());
        }
    }
    // The check above means something only if both services really logged at trace level.
    let mut logs = 0;
    for (who, path) in [("proxy", &proxy_stderr), ("shipper", &rig.stderr_path())] {
        let text = std::fs::read_to_string(path).unwrap();
        logs += text.len();
        let traces = text.lines().filter(|l| l.contains("TRACE")).count();
        assert!(traces > 0, "the {who} wrote no trace lines:\n{text}");
    }

    // Spend log and state files: nothing for other users.
    let mut modes = Vec::new();
    for f in &files {
        let name = f
            .strip_prefix(rig.dir.path())
            .unwrap()
            .display()
            .to_string();
        let sensitive = name.starts_with("spend.jsonl")
            || name.starts_with("proxy-state")
            || name.starts_with("state");
        if !sensitive {
            continue;
        }
        let mode = std::fs::metadata(f).unwrap().permissions().mode() & 0o777;
        modes.push(format!("{name} {mode:o}"));
        assert_eq!(
            mode & 0o007,
            0,
            "{name} is open to other users (mode {mode:o})"
        );
    }
    for d in [rig.state_dir(), rig.path("proxy-state")] {
        let mode = std::fs::metadata(&d).unwrap().permissions().mode() & 0o777;
        assert_eq!(
            mode & 0o007,
            0,
            "{} is open to other users (mode {mode:o})",
            d.display()
        );
    }
    figure(
        "security",
        format!(
            "{} files ({checked} bytes, {logs} bytes of trace logs) free of 4 secrets; modes: {}; bad requests: {}",
            files.len(),
            modes.join(", "),
            answers.join(", ")
        ),
    );
}
