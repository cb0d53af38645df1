//! Tasks that must not die quietly. A panic in the reader, a delivery worker, the acker or a
//! background task used to end only that task, and `tally ship` ran on without it: no reading, or
//! events left "in flight" and never resent, with nothing but the panic hook's line on stderr. A
//! panic caught here is logged, stops the shipper through its cancellation token and becomes the
//! run's error, so the process exits 1 and the service manager restarts it; what was not acked
//! is still pending in the outbox.

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};

use futures::FutureExt;
use tokio_util::sync::CancellationToken;

/// The panic message, when the payload is the usual `&str` or `String`.
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(a panic without a message)".to_owned()
    }
}

/// Runs `fut`; `Err` with the panic's message if it panicked.
pub async fn catch<F: Future>(fut: F) -> Result<F::Output, String> {
    AssertUnwindSafe(fut)
        .catch_unwind()
        .await
        .map_err(|payload| panic_message(payload.as_ref()))
}

/// Watches the shipper's tasks: the first panic is kept and `stop` is cancelled.
#[derive(Clone)]
pub struct Supervisor {
    stop: CancellationToken,
    panicked: Arc<Mutex<Option<String>>>,
}

impl Supervisor {
    pub fn new(stop: CancellationToken) -> Self {
        Self {
            stop,
            panicked: Arc::default(),
        }
    }

    /// `fut`, named `task` for the log; `None` if it panicked (the shipper is then stopping).
    pub fn guard<F>(
        &self,
        task: &'static str,
        fut: F,
    ) -> impl Future<Output = Option<F::Output>> + Send + 'static
    where
        F: Future + Send + 'static,
    {
        let me = self.clone();
        async move {
            match catch(fut).await {
                Ok(out) => Some(out),
                Err(message) => {
                    me.panicked(task, &message);
                    None
                }
            }
        }
    }

    /// Records that `task` panicked with `message`, and stops the shipper.
    pub fn panicked(&self, task: &str, message: &str) {
        tracing::error!(
            task,
            panic = message,
            "a tally ship task panicked; stopping, so that the service manager restarts it \
             (nothing is lost: what Lago has not acknowledged stays pending)"
        );
        if let Ok(mut slot) = self.panicked.lock() {
            slot.get_or_insert_with(|| format!("the {task} task panicked: {message}"));
        }
        self.stop.cancel();
    }

    /// The first panic, as the run's error.
    pub fn panic(&self) -> Option<String> {
        self.panicked.lock().ok().and_then(|p| p.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panic_stops_the_shipper_and_the_first_one_is_the_error() {
        let stop = CancellationToken::new();
        let sup = Supervisor::new(stop.clone());
        assert_eq!(sup.guard("quiet", async { 7 }).await, Some(7));
        assert!(!stop.is_cancelled() && sup.panic().is_none());

        let first = tokio::spawn(sup.guard("reader", async { panic!("line {} is odd", 3) }));
        assert_eq!(
            first.await.unwrap(),
            None,
            "the panic is caught, not the task's end"
        );
        assert!(stop.is_cancelled(), "the shipper is told to stop");
        assert!(
            sup.guard("acker", async { panic!("later") })
                .await
                .is_none()
        );
        assert_eq!(
            sup.panic().as_deref(),
            Some("the reader task panicked: line 3 is odd")
        );
    }

    #[tokio::test]
    async fn catch_names_str_and_string_panics() {
        assert_eq!(
            catch(async { panic!("plain") }).await,
            Err::<(), _>("plain".into())
        );
        let owned = catch(async { std::panic::panic_any(String::from("owned")) }).await;
        assert_eq!(owned, Err::<(), _>("owned".into()));
        let other = catch(async { std::panic::panic_any(42u8) }).await;
        assert_eq!(other, Err::<(), _>("(a panic without a message)".into()));
    }
}
