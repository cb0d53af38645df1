//! Hostile input, proxy side (docs/reliability.md, "Findings"): the files the proxy owns. A spend
//! log that is a symbolic link is refused (the real binary says which path and what to do), a
//! world-writable state directory is refused, and files found more open than tally creates them are
//! tightened.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use tally::proxy::{AppState, ProxyConfig};

use super::MASTER;
use crate::support::{Later, wait_for};

const CONFIG: &str =
    "model_list:\n  - model_name: m\n    litellm_params: {model: openai/m, mock_response: hi}\n";

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap()
        .permissions()
        .mode()
        & 0o7777
}

/// Runs `tally proxy` until it exits; returns its stderr (it must fail).
fn proxy_refuses(dir: &Path, spend_log: &Path, state_dir: &Path) -> String {
    let config = dir.join("config.yaml");
    std::fs::write(&config, CONFIG).unwrap();
    // Outside `dir`, whose files the tests look at.
    let stderr = tempfile::NamedTempFile::new().unwrap();
    let child = std::process::Command::new(crate::support::tally_bin())
        .args(["proxy", "--port", "0", "--config"])
        .arg(&config)
        .arg("--spend-log")
        .arg(spend_log)
        .arg("--state-dir")
        .arg(state_dir)
        .env("LITELLM_MASTER_KEY", MASTER)
        .current_dir(dir)
        .stdout(std::process::Stdio::null())
        .stderr(stderr.reopen().unwrap())
        .spawn()
        .unwrap();
    // A proxy that accepted the setup would serve forever: killed when the wait gives up.
    let mut child = KillOnDrop(child);
    let stderr_text = || std::fs::read_to_string(stderr.path()).unwrap();
    let what = Later(|| format!("the proxy to exit; it started: {}", stderr_text()));
    let status = wait_for(what, Duration::from_secs(20), || {
        child.0.try_wait().unwrap()
    });
    let stderr = stderr_text();
    assert!(!status.success(), "the proxy exited 0: {stderr}");
    stderr
}

/// A child process killed when dropped: a failed test leaves nothing running.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_spend_log_that_is_a_symlink_is_refused_with_the_path_and_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("elsewhere.jsonl");
    std::fs::write(&target, "").unwrap();
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o666)).unwrap();
    let link = dir.path().join("spend.jsonl");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let stderr = proxy_refuses(dir.path(), &link, &dir.path().join("state"));
    assert!(
        stderr.contains(&format!("spend log {} is a symbolic link", link.display()))
            && stderr.contains("TALLY_SPEND_LOG"),
        "{stderr}"
    );
    // The link's target was not touched.
    assert_eq!(mode(&target), 0o666);
}

#[test]
fn a_world_writable_state_directory_is_refused_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).unwrap();
    let stderr = proxy_refuses(dir.path(), &dir.path().join("spend.jsonl"), &state);
    assert!(
        stderr.contains(&format!("state directory {}", state.display()))
            && stderr.contains("writable by every local user")
            && stderr.contains("chmod o-w"),
        "{stderr}"
    );
    assert!(!state.join("keys.db").exists(), "a key store was created");
}

#[tokio::test]
async fn files_found_more_open_than_tally_creates_them_are_tightened() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let spend_log = dir.path().join("spend.jsonl");
    let keys = state.join("keys.db");
    for (file, loose) in [(&spend_log, 0o666), (&keys, 0o644)] {
        std::fs::write(file, "").unwrap();
        std::fs::set_permissions(file, std::fs::Permissions::from_mode(loose)).unwrap();
    }
    let config = ProxyConfig::from_yaml_str(
        &format!("{CONFIG}general_settings: {{master_key: {MASTER}}}\n"),
        "test",
    )
    .unwrap()
    .with_spend_log(&spend_log)
    .with_state_dir(&state);
    let state_handle = AppState::new(&config)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(mode(&spend_log), 0o640);
    assert_eq!(mode(&keys), 0o600);
    state_handle.shutdown().await;
}
