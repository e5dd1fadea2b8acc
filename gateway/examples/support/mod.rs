//! Helpers shared by the gateway's examples (each includes this file with `#[path]`).

use std::net::TcpListener;

use yiqiao_gateway::Application;
use yiqiao_gateway::config::Settings;
use yiqiao_gateway::state::AppState;

/// Build a gateway on a free local port and serve it in the background: its base URL and
/// its state.
pub async fn start(settings: Settings) -> (String, AppState) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let app = Application::build_with_listener(settings, listener)
        .await
        .unwrap();
    let base = format!("http://127.0.0.1:{}", app.port());
    let state = app.state().clone();
    tokio::spawn(app.into_server());
    (base, state)
}
