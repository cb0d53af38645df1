//! A fixed-answer OpenAI-compatible upstream for `bench/proxy.sh`: every POST to
//! `/v1/chat/completions` gets the same small completion with usage, as fast as hyper can answer.
//!
//!     cargo run --release --example proxy_upstream -- 127.0.0.1:0
//!
//! Prints `listening on <addr>` on stdout once bound.

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::post;
use axum::serve::ListenerExt;

const ANSWER: &str = r#"{"id":"chatcmpl-bench","object":"chat.completion","created":1,"model":"gpt-4o-2024-08-06","choices":[{"index":0,"message":{"role":"assistant","content":"Paris is the capital of France."},"finish_reason":"stop"}],"usage":{"prompt_tokens":7,"completion_tokens":15,"total_tokens":22}}"#;

async fn answer() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], ANSWER)
}

fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".into());
    // One worker thread: the machine has two cores, shared with the proxy and the load generator.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let app = Router::new()
            .route("/v1/chat/completions", post(answer))
            .route("/chat/completions", post(answer));
        let listener = tokio::net::TcpListener::bind(&addr).await?;
        println!("listening on {}", listener.local_addr()?);
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        axum::serve(listener, app).await
    })
}
