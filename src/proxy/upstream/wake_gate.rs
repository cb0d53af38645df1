//! Polling something this task drives itself without waking itself.
//!
//! The request task polls its upstream connection, and the connection hands the answer to that
//! same task over hyper's channels, waking it as it does. A task woken while it runs is
//! rescheduled by Tokio as if it had yielded, and that path also wakes an idle worker thread to
//! share the "new" work: per request, a futex or eventfd write and a context switch for nothing.
//! A [`WakeGate`] swallows the wakes raised while its poll runs, and polls again instead when
//! one came in (something changed after it was looked at); wakes from elsewhere (the socket
//! becoming readable) reach the task as usual.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll, Wake, Waker};

use futures::task::AtomicWaker;

const IDLE: u8 = 0;
const POLLING: u8 = 1;
const WOKEN_WHILE_POLLING: u8 = 2;

#[derive(Default)]
pub struct WakeGate {
    state: AtomicU8,
    task: AtomicWaker,
}

impl Wake for WakeGate {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        match self.state.compare_exchange(
            POLLING,
            WOKEN_WHILE_POLLING,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            // Noted: the poll running now looks again before it returns.
            Ok(_) => {}
            Err(WOKEN_WHILE_POLLING) => {}
            Err(_) => self.task.wake(),
        }
    }
}

impl WakeGate {
    /// Runs `step` with the gate's waker until it is ready, or pending with no wake raised while
    /// it ran; the task behind `cx` is woken by any later wake.
    pub fn poll<T>(
        self: &Arc<Self>,
        cx: &mut Context<'_>,
        mut step: impl FnMut(&mut Context<'_>) -> Poll<T>,
    ) -> Poll<T> {
        self.task.register(cx.waker());
        let waker = Waker::from(self.clone());
        let mut inner = Context::from_waker(&waker);
        loop {
            self.state.store(POLLING, Ordering::Release);
            let poll = step(&mut inner);
            if poll.is_ready() {
                self.state.store(IDLE, Ordering::Release);
                return poll;
            }
            if self
                .state
                .compare_exchange(POLLING, IDLE, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return Poll::Pending;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Counts the wakes the task receives.
    #[derive(Default)]
    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn wakes_raised_while_polling_are_swallowed_and_polled_again() {
        let gate = Arc::new(WakeGate::default());
        let count = Arc::new(Count::default());
        let task = Waker::from(count.clone());
        let mut cx = Context::from_waker(&task);

        // Woken while running: looked at again (twice here), the task is not woken.
        let mut steps = 0;
        let poll: Poll<()> = gate.poll(&mut cx, |inner| {
            steps += 1;
            if steps < 3 {
                inner.waker().wake_by_ref();
            }
            Poll::Pending
        });
        assert!(poll.is_pending());
        assert_eq!(steps, 3);
        assert_eq!(count.0.load(Ordering::SeqCst), 0);

        // A wake kept from the poll and raised later (the socket became readable) reaches it.
        let mut kept = None;
        let _: Poll<()> = gate.poll(&mut cx, |inner| {
            kept = Some(inner.waker().clone());
            Poll::Pending
        });
        kept.unwrap().wake();
        assert_eq!(count.0.load(Ordering::SeqCst), 1);

        // Ready is returned as is.
        assert_eq!(gate.poll(&mut cx, |_| Poll::Ready(7)), Poll::Ready(7));
    }

    #[test]
    fn a_wake_from_another_thread_is_never_lost() {
        // Whatever the interleaving, a wake from elsewhere either makes the running poll look
        // again or reaches the task.
        for _ in 0..2_000 {
            let gate = Arc::new(WakeGate::default());
            let count = Arc::new(Count::default());
            let task = Waker::from(count.clone());
            let mut cx = Context::from_waker(&task);
            let flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let mut kept = None;
            let _: Poll<()> = gate.poll(&mut cx, |inner| {
                kept.get_or_insert_with(|| inner.waker().clone());
                Poll::Pending
            });
            let waker = kept.take().unwrap();
            let setter = {
                let flag = flag.clone();
                std::thread::spawn(move || {
                    flag.store(true, Ordering::SeqCst);
                    waker.wake();
                })
            };
            let seen = gate.poll(&mut cx, |_| {
                if flag.load(Ordering::SeqCst) {
                    Poll::Ready(())
                } else {
                    Poll::Pending
                }
            });
            setter.join().unwrap();
            assert!(
                seen.is_ready() || count.0.load(Ordering::SeqCst) == 1,
                "the change was neither seen nor signalled"
            );
        }
    }
}
