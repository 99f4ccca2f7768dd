//! The sessions this gateway holds right now, by device id, each with the
//! epoch it was granted. Delivery checks the epoch at the last moment: a
//! command addressed to an older or newer session than ours is refused, so
//! a gateway that lost a device can never deliver to it.
use crate::routing::{Action, Failure, FailureKind, Outcome};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// What the rest of the gateway can ask of a live session.
#[derive(Debug)]
pub enum SessionCommand {
    Execute {
        action: Action,
        timeout: Duration,
        /// The attempt id recorded as delivered by the fence (`fence.rs`)
        /// when the frame is written; `None`: not tracked.
        request: Option<String>,
        reply: oneshot::Sender<Outcome>,
    },
    Close {
        reason: String,
    },
    /// The current cloud key version changed: tell the device if it holds
    /// an older one (cloud_keys.rs).
    CloudKeyChanged,
}

#[derive(Debug, Clone)]
struct Handle {
    epoch: u64,
    /// The device's address, for the refresher's cross-region clone check.
    peer: std::net::SocketAddr,
    /// Boxed: a channel allocates 32 slots up front, and an idle session
    /// should not hold 32 full-size commands' worth of memory.
    tx: mpsc::Sender<Box<SessionCommand>>,
}

#[derive(Debug, Default)]
pub struct LocalSessions {
    sessions: Mutex<HashMap<String, Handle>>,
}

impl LocalSessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Handle>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a session; an older local session of the same device (same
    /// gateway, reconnect) is told to close.
    pub fn insert(
        &self,
        device_id: &str,
        epoch: u64,
        peer: std::net::SocketAddr,
        tx: mpsc::Sender<Box<SessionCommand>>,
    ) {
        let old = self
            .lock()
            .insert(device_id.to_string(), Handle { epoch, peer, tx });
        if let Some(old) = old
            && old.epoch < epoch
        {
            let _ = old.tx.try_send(Box::new(SessionCommand::Close {
                reason: "superseded by a newer session".into(),
            }));
        }
    }

    /// Removes the entry only if it is still this epoch's.
    pub fn remove(&self, device_id: &str, epoch: u64) {
        let mut map = self.lock();
        if map.get(device_id).is_some_and(|h| h.epoch == epoch) {
            map.remove(device_id);
        }
    }

    /// Whether this gateway holds the device's session at `epoch`.
    pub fn holds(&self, device_id: &str, epoch: u64) -> bool {
        self.lock().get(device_id).is_some_and(|h| h.epoch == epoch)
    }

    /// Every session now: (device, epoch, peer), for one refresh pass.
    pub fn snapshot(&self) -> Vec<(String, u64, std::net::SocketAddr)> {
        self.lock()
            .iter()
            .map(|(d, h)| (d.clone(), h.epoch, h.peer))
            .collect()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn close(&self, device_id: &str, epoch: u64, reason: &str) {
        let handle = self.lock().get(device_id).cloned();
        if let Some(h) = handle
            && h.epoch <= epoch
        {
            let _ = h.tx.try_send(Box::new(SessionCommand::Close {
                reason: reason.into(),
            }));
        }
    }

    /// Sends a command to every session (one each, made by `make`); a
    /// session whose queue is full misses it.
    pub fn broadcast(&self, make: impl Fn() -> SessionCommand) {
        let handles: Vec<Handle> = self.lock().values().cloned().collect();
        for h in handles {
            let _ = h.tx.try_send(Box::new(make()));
        }
    }

    /// Closes the device's session, whatever its epoch; true when one was
    /// held here.
    pub fn close_device(&self, device_id: &str, reason: &str) -> bool {
        let handle = self.lock().get(device_id).cloned();
        match handle {
            Some(h) => {
                let _ = h.tx.try_send(Box::new(SessionCommand::Close {
                    reason: reason.into(),
                }));
                true
            }
            None => false,
        }
    }

    /// Closes every session (drain on shutdown).
    pub fn close_all(&self, reason: &str) {
        for h in self.lock().values() {
            let _ = h.tx.try_send(Box::new(SessionCommand::Close {
                reason: reason.into(),
            }));
        }
    }

    pub async fn execute(
        &self,
        device_id: &str,
        epoch: u64,
        request: Option<&str>,
        action: Action,
        timeout: Duration,
    ) -> Outcome {
        self.submit(device_id, epoch, request, action, timeout)?
            .answer()
            .await
    }

    /// Hands the command to the session now, without waiting: commands and
    /// closes from one inbox reach the session in the order they were
    /// read (a close read after a command must not overtake it, or the
    /// command would miss the delivery fence and its audit record). Wait
    /// for the device's answer with [`Submitted::answer`].
    #[tracing::instrument(name = "device.command", skip(self, action, timeout))]
    pub fn submit(
        &self,
        device_id: &str,
        epoch: u64,
        request: Option<&str>,
        action: Action,
        timeout: Duration,
    ) -> Result<Submitted, Failure> {
        let handle = self.lock().get(device_id).cloned();
        let Some(handle) = handle else {
            return Err(Failure::new(
                FailureKind::SessionLost,
                format!("device {device_id} has no session on this gateway any more"),
            ));
        };
        if handle.epoch != epoch {
            return Err(Failure::new(
                FailureKind::SessionLost,
                format!(
                    "device {device_id}'s session moved (epoch {epoch} asked, {} held here)",
                    handle.epoch
                ),
            ));
        }
        let (tx, rx) = oneshot::channel();
        let cmd = Box::new(SessionCommand::Execute {
            action,
            timeout,
            request: request.map(str::to_string),
            reply: tx,
        });
        let queued = match handle.tx.try_send(cmd) {
            Ok(()) => None,
            Err(mpsc::error::TrySendError::Closed(_)) => {
                return Err(Failure::new(FailureKind::SessionLost, "the session ended"));
            }
            // 32 commands already waiting: queue behind them (order among
            // commands still holds; the session reads its channel in order).
            Err(mpsc::error::TrySendError::Full(cmd)) => Some((handle.tx, cmd)),
        };
        Ok(Submitted {
            device_id: device_id.to_string(),
            queued,
            rx,
            timeout,
        })
    }
}

/// A command handed to a session; its answer is still to come.
pub struct Submitted {
    device_id: String,
    queued: Option<(mpsc::Sender<Box<SessionCommand>>, Box<SessionCommand>)>,
    rx: oneshot::Receiver<Outcome>,
    timeout: Duration,
}

impl Submitted {
    pub async fn answer(self) -> Outcome {
        if let Some((tx, cmd)) = self.queued
            && tx.send(cmd).await.is_err()
        {
            return Err(Failure::new(FailureKind::SessionLost, "the session ended"));
        }
        match tokio::time::timeout(self.timeout + Duration::from_millis(500), self.rx).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_)) => Err(Failure::new(
                FailureKind::SessionLost,
                "the session ended before the device answered",
            )),
            Err(_) => Err(Failure::new(
                FailureKind::Timeout,
                format!(
                    "device {} did not answer within {} ms",
                    self.device_id,
                    self.timeout.as_millis()
                ),
            )),
        }
    }
}
