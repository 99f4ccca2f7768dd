//! Graceful shutdown threaded through every task, as in mini-redis: one
//! signal that every task can wait on, cloned freely.
use tokio::sync::watch;

#[derive(Clone, Debug)]
pub struct Shutdown {
    rx: watch::Receiver<bool>,
}

/// Triggers a [`Shutdown`]; dropping it also triggers it.
#[derive(Debug)]
pub struct ShutdownTrigger {
    tx: watch::Sender<bool>,
}

impl Shutdown {
    pub fn new() -> (ShutdownTrigger, Shutdown) {
        let (tx, rx) = watch::channel(false);
        (ShutdownTrigger { tx }, Shutdown { rx })
    }

    /// A shutdown that never fires unless the process ends.
    pub fn never() -> Shutdown {
        let (trigger, shutdown) = Self::new();
        std::mem::forget(trigger);
        shutdown
    }

    pub fn is_triggered(&self) -> bool {
        *self.rx.borrow()
    }

    /// Resolves when shutdown is triggered (or the trigger is dropped).
    pub async fn wait(&mut self) {
        let _ = self.rx.wait_for(|v| *v).await;
    }

    /// Triggers on SIGINT or SIGTERM.
    pub fn on_signals() -> (ShutdownTrigger, Shutdown) {
        let (trigger, shutdown) = Self::new();
        let tx = trigger.tx.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            let _ = tx.send(true);
        });
        (trigger, shutdown)
    }
}

impl ShutdownTrigger {
    pub fn trigger(&self) {
        let _ = self.tx.send(true);
    }
}

impl Drop for ShutdownTrigger {
    fn drop(&mut self) {
        let _ = self.tx.send(true);
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut int), Ok(mut term)) => {
            tokio::select! { _ = int.recv() => {}, _ = term.recv() => {} }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
