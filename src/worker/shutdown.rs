//! Stopping: [`Shutdown`], the flag every task watches, set once by its
//! [`ShutdownTrigger`]; and [`wait_for_signal`], which turns SIGTERM or
//! SIGINT into that trigger in `triagem worker`.

use tokio::sync::watch;

/// Tells every task to stop: a watch flag that starts false and is set once.
#[derive(Clone)]
pub struct Shutdown {
    rx: watch::Receiver<bool>,
}

/// The sending half of [`Shutdown`].
pub struct ShutdownTrigger {
    tx: watch::Sender<bool>,
}

impl Shutdown {
    /// A new flag and its trigger.
    pub fn new() -> (ShutdownTrigger, Shutdown) {
        let (tx, rx) = watch::channel(false);
        (ShutdownTrigger { tx }, Shutdown { rx })
    }

    /// Resolves once shutdown is triggered (or its trigger is dropped).
    pub async fn wait(&mut self) {
        let _ = self.rx.wait_for(|stop| *stop).await;
    }

    /// Whether shutdown has been triggered.
    pub fn is_triggered(&self) -> bool {
        *self.rx.borrow()
    }
}

impl ShutdownTrigger {
    /// Triggers shutdown.
    pub fn trigger(&self) {
        let _ = self.tx.send(true);
    }
}

/// Set once when the worker cannot go on — a fatal librdkafka error, a
/// consume error librdkafka calls fatal, a panicked task —: [`super::Worker::run`]
/// then stops like on SIGTERM and returns the reason, and `triagem worker`
/// exits non-zero so that its supervisor restarts it.
#[derive(Debug, Default)]
pub struct Fatal {
    /// The first reason given.
    reason: std::sync::Mutex<Option<String>>,
    /// Wakes [`Fatal::wait`].
    notify: tokio::sync::Notify,
}

impl Fatal {
    /// Records `reason` (the first one wins) and wakes the waiter.
    pub fn set(&self, reason: impl Into<String>) {
        let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if r.is_none() {
            let reason = reason.into();
            tracing::error!(reason = %reason, "fatal: the worker stops");
            *r = Some(reason);
            self.notify.notify_one();
        }
    }

    /// The reason, once set.
    pub fn get(&self) -> Option<String> {
        self.reason.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Resolves once a reason is set.
    pub async fn wait(&self) -> String {
        loop {
            if let Some(r) = self.get() {
                return r;
            }
            self.notify.notified().await;
        }
    }
}

/// Resolves on SIGTERM or SIGINT (SIGINT only where there is no SIGTERM).
pub(super) async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM received"),
                    _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
