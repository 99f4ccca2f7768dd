//! The sessions this gateway holds right now, by device id, each with the
//! epoch it was granted. Delivery checks the epoch at the last moment: a
//! command addressed to an older or newer session than ours is refused, so
//! a gateway that lost a device can never deliver to it.
use crate::routing::{Action, Failure, FailureKind, Outcome};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, oneshot};

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
    inbox: Arc<Inbox>,
}

/// Most commands one session may have waiting to be read; more is a client
/// flooding one device, answered at once instead of held in memory.
pub const MAX_QUEUED_COMMANDS: usize = 1024;

/// A session's command queue: commands and closes, read in the order they
/// were submitted. Not a tokio `mpsc` channel: that allocates its shared
/// state (cache-padded) and a first block of 32 slots per session up
/// front, about 0.9 KB that every idle session carried; this is a lock, an
/// empty queue and a `Notify` (~0.1 KB) until a command arrives.
#[derive(Debug, Default)]
pub struct Inbox {
    state: Mutex<InboxState>,
    ready: Notify,
}

#[derive(Debug, Default)]
struct InboxState {
    queue: VecDeque<SessionCommand>,
    closed: bool,
}

/// Why a command was not queued.
#[derive(Debug, PartialEq, Eq)]
pub enum PushError {
    /// The session ended.
    Closed,
    /// [`MAX_QUEUED_COMMANDS`] are already waiting.
    Full,
}

impl Inbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, InboxState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a command. A close is always queued (it bounds nothing: the
    /// session ends on it). A refused command is dropped, so a caller
    /// waiting on its reply learns at once.
    pub fn push(&self, cmd: SessionCommand) -> Result<(), PushError> {
        {
            let mut state = self.lock();
            if state.closed {
                return Err(PushError::Closed);
            }
            if state.queue.len() >= MAX_QUEUED_COMMANDS
                && !matches!(cmd, SessionCommand::Close { .. })
            {
                return Err(PushError::Full);
            }
            state.queue.push_back(cmd);
        }
        // One reader: a permit stored while it is not waiting wakes its
        // next `recv` at once.
        self.ready.notify_one();
        Ok(())
    }

    /// The next command; `None` once closed.
    pub async fn recv(&self) -> Option<SessionCommand> {
        loop {
            {
                let mut state = self.lock();
                if let Some(cmd) = state.queue.pop_front() {
                    if state.queue.is_empty() && state.queue.capacity() > 4 {
                        state.queue = VecDeque::new();
                    }
                    return Some(cmd);
                }
                if state.closed {
                    return None;
                }
            }
            self.ready.notified().await;
        }
    }

    /// No command is taken any more; those still queued are dropped, so
    /// their callers learn at once that the session ended.
    pub fn close(&self) {
        let dropped = {
            let mut state = self.lock();
            state.closed = true;
            std::mem::take(&mut state.queue)
        };
        drop(dropped);
        self.ready.notify_one();
    }
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
        inbox: Arc<Inbox>,
    ) {
        let old = self
            .lock()
            .insert(device_id.to_string(), Handle { epoch, peer, inbox });
        if let Some(old) = old
            && old.epoch < epoch
        {
            let _ = old.inbox.push(SessionCommand::Close {
                reason: "superseded by a newer session".into(),
            });
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
            let _ = h.inbox.push(SessionCommand::Close {
                reason: reason.into(),
            });
        }
    }

    /// Sends a command to every session (one each, made by `make`); a
    /// session whose queue is full misses it.
    pub fn broadcast(&self, make: impl Fn() -> SessionCommand) {
        let handles: Vec<Handle> = self.lock().values().cloned().collect();
        for h in handles {
            let _ = h.inbox.push(make());
        }
    }

    /// Closes the device's session, whatever its epoch; true when one was
    /// held here.
    pub fn close_device(&self, device_id: &str, reason: &str) -> bool {
        let handle = self.lock().get(device_id).cloned();
        match handle {
            Some(h) => {
                let _ = h.inbox.push(SessionCommand::Close {
                    reason: reason.into(),
                });
                true
            }
            None => false,
        }
    }

    /// Closes every session (drain on shutdown).
    pub fn close_all(&self, reason: &str) {
        for h in self.lock().values() {
            let _ = h.inbox.push(SessionCommand::Close {
                reason: reason.into(),
            });
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
        let cmd = SessionCommand::Execute {
            action,
            timeout,
            request: request.map(str::to_string),
            reply: tx,
        };
        match handle.inbox.push(cmd) {
            Ok(()) => {}
            Err(PushError::Closed) => {
                return Err(Failure::new(FailureKind::SessionLost, "the session ended"));
            }
            Err(PushError::Full) => {
                return Err(Failure::new(
                    FailureKind::Internal,
                    format!(
                        "device {device_id} already has {MAX_QUEUED_COMMANDS} commands waiting; try again later"
                    ),
                ));
            }
        }
        Ok(Submitted {
            device_id: device_id.to_string(),
            rx,
            timeout,
        })
    }
}

/// A command handed to a session; its answer is still to come.
pub struct Submitted {
    device_id: String,
    rx: oneshot::Receiver<Outcome>,
    timeout: Duration,
}

impl Submitted {
    pub async fn answer(self) -> Outcome {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn close(reason: &str) -> SessionCommand {
        SessionCommand::Close {
            reason: reason.into(),
        }
    }

    fn reason_of(cmd: Option<SessionCommand>) -> String {
        match cmd {
            Some(SessionCommand::Close { reason }) => reason,
            other => panic!("expected a close, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn inbox_keeps_order_and_wakes_a_waiting_reader() {
        let inbox = Arc::new(Inbox::default());
        let reader = {
            let inbox = Arc::clone(&inbox);
            tokio::spawn(async move {
                let mut got = Vec::new();
                for _ in 0..3 {
                    got.push(reason_of(inbox.recv().await));
                }
                got
            })
        };
        tokio::task::yield_now().await;
        for r in ["a", "b", "c"] {
            inbox.push(close(r)).expect("queued");
        }
        let got = tokio::time::timeout(Duration::from_secs(2), reader)
            .await
            .expect("the reader was woken")
            .expect("reader task");
        assert_eq!(got, ["a", "b", "c"]);
    }

    #[tokio::test]
    async fn a_closed_inbox_refuses_and_drops_what_was_queued() {
        let inbox = Inbox::default();
        let (tx, rx) = oneshot::channel();
        let cmd = SessionCommand::Execute {
            action: Action::GetVariable { name: "t".into() },
            timeout: Duration::from_secs(1),
            request: None,
            reply: tx,
        };
        inbox.push(cmd).expect("queued");
        inbox.close();
        // The queued command's caller learns the session is gone.
        assert!(rx.await.is_err());
        assert_eq!(inbox.recv().await.map(|_| ()), None);
        let refused = inbox.push(close("late"));
        assert_eq!(refused, Err(PushError::Closed));
    }

    #[test]
    fn a_full_inbox_refuses_commands_but_still_takes_a_close() {
        let inbox = Inbox::default();
        for _ in 0..MAX_QUEUED_COMMANDS {
            let (tx, _rx) = oneshot::channel();
            let cmd = SessionCommand::Execute {
                action: Action::GetVariable { name: "t".into() },
                timeout: Duration::from_secs(1),
                request: None,
                reply: tx,
            };
            inbox.push(cmd).expect("queued");
        }
        let (tx, _rx) = oneshot::channel();
        let one_more = SessionCommand::Execute {
            action: Action::GetVariable { name: "t".into() },
            timeout: Duration::from_secs(1),
            request: None,
            reply: tx,
        };
        assert_eq!(inbox.push(one_more), Err(PushError::Full));
        assert!(inbox.push(close("shutdown")).is_ok());
    }
}
