//! Running the HTTP server: serve a listener until a shutdown signal, let in-flight responses
//! finish within a deadline, then release what the server holds.

use std::future::{Future, IntoFuture};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Notify;

use crate::api::{self, AppState};

/// Serves `state`'s application on `listener` until `shutdown` completes. In-flight requests
/// (streams included) get `drain` to finish; whatever is still open then is dropped.
pub async fn run(listener: TcpListener, state: AppState, shutdown: impl Future<Output = ()> + Send + 'static, drain: Duration) -> std::io::Result<()> {
    let app = api::app(state.clone());
    let stopping = Arc::new(Notify::new());
    let notify = stopping.clone();
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        shutdown.await;
        tracing::info!("shutting down: waiting for in-flight requests");
        notify.notify_one();
    });
    let deadline = async {
        stopping.notified().await;
        tokio::time::sleep(drain).await;
    };
    let outcome = tokio::select! {
        result = server.into_future() => result,
        () = deadline => {
            tracing::warn!(seconds = drain.as_secs(), "in-flight requests did not finish in time; closing them");
            Ok(())
        }
    };
    outcome
}

/// Completes on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}
