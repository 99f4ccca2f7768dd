//! The bounded pool for RSA private-key operations. An RSA-2048 private
//! operation takes about a millisecond of CPU; run on the async runtime it
//! would stall every other RPC during a reconnect storm. So they run on
//! dedicated OS threads, fed through a bounded queue: when the queue is full
//! a new handshake is refused at once (RESOURCE_EXHAUSTED, and the gateway
//! turns the device away) instead of waiting for ever.
//!
//! Two classes of work share the threads. A decryption starts a handshake
//! (an *admission*); a signature finishes one that was already admitted (a
//! *continuation*). Workers always take continuations first, so under
//! overload the pool finishes the handshakes it started instead of starting
//! new ones it cannot finish. Both queues are bounded.
use crate::backend::{BackendError, PrivateOps};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;
use tokio::sync::oneshot;
use zeroize::Zeroizing;

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error(
        "keyvault is at capacity: {queued} private-key operations are already waiting \
         (keyvault.queue_depth = {depth}); turn the device away and let it retry"
    )]
    Full { queued: usize, depth: usize },
    #[error(
        "keyvault is overloaded: the request waited {waited_ms} ms for a private-key worker, \
         past its deadline (keyvault.max_queue_wait_ms or the caller's gRPC deadline); \
         dropped without RSA work: turn the device away and let it retry"
    )]
    Expired { waited_ms: u64 },
    #[error("keyvault's private-key workers have stopped (shutting down)")]
    Stopped,
    #[error(transparent)]
    Backend(#[from] BackendError),
}

type Job = Box<dyn FnOnce(&dyn PrivateOps) + Send + 'static>;

struct Queues {
    admissions: VecDeque<Job>,
    continuations: VecDeque<Job>,
    stopping: bool,
}

struct Shared {
    queues: Mutex<Queues>,
    ready: Condvar,
    backend: Arc<dyn PrivateOps>,
    depth: usize,
    continuation_depth: usize,
    rejected: AtomicU64,
    expired: AtomicU64,
    /// OpenSessions holding a [`HandshakeSlot`] (decrypt through sign).
    handshakes: AtomicUsize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queues> {
        // A job never panics while the lock is held (jobs run outside it), so
        // a poisoned lock still holds consistent queues.
        self.queues.lock().unwrap_or_else(|p| p.into_inner())
    }
}

struct Threads {
    shared: Arc<Shared>,
    handles: Vec<std::thread::JoinHandle<()>>,
}

impl Drop for Threads {
    fn drop(&mut self) {
        self.shared.lock().stopping = true;
        self.shared.ready.notify_all();
        for handle in self.handles.drain(..) {
            let _ = handle.join();
        }
    }
}

/// Cheap to clone; the threads stop when the last clone is dropped (after
/// finishing the jobs already queued).
#[derive(Clone)]
pub struct Pool {
    shared: Arc<Shared>,
    _threads: Arc<Threads>,
    workers: usize,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("backend", &self.shared.backend.name())
            .field("workers", &self.workers)
            .field("depth", &self.shared.depth)
            .field("queued", &self.queue_depth())
            .finish()
    }
}

enum Class {
    Admission,
    Continuation,
}

impl Pool {
    /// `workers` threads (0: one per core) and room for `queue_depth` waiting
    /// admissions (at least 1).
    pub fn new(
        backend: Arc<dyn PrivateOps>,
        workers: usize,
        queue_depth: usize,
    ) -> std::io::Result<Self> {
        let workers = if workers == 0 {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        } else {
            workers
        };
        let depth = queue_depth.max(1);
        let shared = Arc::new(Shared {
            queues: Mutex::new(Queues {
                admissions: VecDeque::with_capacity(depth),
                continuations: VecDeque::new(),
                stopping: false,
            }),
            ready: Condvar::new(),
            backend,
            depth,
            // Every continuation comes from a handshake holding a
            // `HandshakeSlot`, and there are at most this many of those: the
            // queue of signatures can never refuse an admitted handshake.
            // Twice the admission queue, so that handshakes waiting on Redis
            // between decrypt and sign do not hold back new admissions.
            continuation_depth: 2 * depth + workers,
            rejected: AtomicU64::new(0),
            expired: AtomicU64::new(0),
            handshakes: AtomicUsize::new(0),
        });
        let mut threads = Threads {
            shared: shared.clone(),
            handles: Vec::with_capacity(workers),
        };
        for i in 0..workers {
            let shared = shared.clone();
            let handle = std::thread::Builder::new()
                .name(format!("keyvault-rsa-{i}"))
                .spawn(move || worker(&shared))?;
            threads.handles.push(handle);
        }
        Ok(Self {
            shared,
            _threads: Arc::new(threads),
            workers,
        })
    }

    /// Private-key operations waiting for a worker now (for metrics).
    pub fn queue_depth(&self) -> usize {
        let q = self.shared.lock();
        q.admissions.len() + q.continuations.len()
    }

    /// The configured bound on waiting admissions.
    pub fn capacity(&self) -> usize {
        self.shared.depth
    }

    pub fn workers(&self) -> usize {
        self.workers
    }

    /// Requests refused because the queue was full, since start.
    pub fn rejected(&self) -> u64 {
        self.shared.rejected.load(Ordering::Relaxed)
    }

    /// Requests dropped unworked because they waited past their deadline.
    pub fn expired(&self) -> u64 {
        self.shared.expired.load(Ordering::Relaxed)
    }

    pub fn backend_name(&self) -> &'static str {
        self.shared.backend.name()
    }

    /// Reserves room for one whole handshake (its decryption, and later its
    /// signature), or refuses at once when `2 * queue_depth + workers`
    /// handshakes are already under way. Held for the whole OpenSession,
    /// it guarantees that a handshake whose decryption ran always finds a
    /// place in the signature queue: RSA work is never spent on a handshake
    /// that is then turned away.
    pub fn reserve_handshake(&self) -> Result<HandshakeSlot, PoolError> {
        let limit = self.shared.continuation_depth;
        let before = self.shared.handshakes.fetch_add(1, Ordering::AcqRel);
        let slot = HandshakeSlot {
            shared: self.shared.clone(),
        };
        if before >= limit {
            drop(slot);
            self.shared.rejected.fetch_add(1, Ordering::Relaxed);
            return Err(PoolError::Full {
                queued: before,
                depth: self.shared.depth,
            });
        }
        Ok(slot)
    }

    /// Decrypts a handshake ciphertext (an admission: refused when full).
    pub async fn decrypt(&self, ciphertext: Vec<u8>) -> Result<Zeroizing<Vec<u8>>, PoolError> {
        self.decrypt_by(ciphertext, None).await
    }

    /// Decrypts, unless the request is still waiting for a worker at
    /// `deadline`: then it is dropped without any RSA work
    /// ([`PoolError::Expired`]), because its caller has given up or is about
    /// to, and the worker is better spent on a handshake that can finish.
    pub async fn decrypt_by(
        &self,
        ciphertext: Vec<u8>,
        deadline: Option<Instant>,
    ) -> Result<Zeroizing<Vec<u8>>, PoolError> {
        let started = std::time::Instant::now();
        let r = self
            .run(Class::Admission, deadline, move |ops| {
                ops.decrypt(&ciphertext)
            })
            .await;
        record_op("decrypt", started);
        r
    }

    /// Decrypts with another key than the pool's own (a cloud key version,
    /// `cloud_keys`). The first decryption of a handshake is an admission;
    /// a further one for the same handshake (`admitted`: trying the next
    /// cloud key version) is a continuation, served first.
    pub async fn decrypt_with(
        &self,
        key: std::sync::Arc<dyn PrivateOps>,
        ciphertext: Vec<u8>,
        deadline: Option<Instant>,
        admitted: bool,
    ) -> Result<Zeroizing<Vec<u8>>, PoolError> {
        let started = std::time::Instant::now();
        let class = if admitted {
            Class::Continuation
        } else {
            Class::Admission
        };
        let r = self
            .run(class, deadline, move |_| key.decrypt(&ciphertext))
            .await;
        record_op("decrypt", started);
        r
    }

    /// Signs with another key than the pool's own, for an admitted
    /// handshake (a continuation).
    pub async fn sign_with(
        &self,
        key: std::sync::Arc<dyn PrivateOps>,
        data: Vec<u8>,
    ) -> Result<Vec<u8>, PoolError> {
        let started = std::time::Instant::now();
        let r = self
            .run(Class::Continuation, None, move |_| key.sign_raw(&data))
            .await;
        record_op("sign", started);
        r
    }

    /// Signs for an admitted handshake (a continuation: served first).
    pub async fn sign_raw(&self, data: Vec<u8>) -> Result<Vec<u8>, PoolError> {
        let started = std::time::Instant::now();
        let r = self
            .run(Class::Continuation, None, move |ops| ops.sign_raw(&data))
            .await;
        record_op("sign", started);
        r
    }

    /// A private-key operation with another key (release signing) on the
    /// same threads, as an admission: refused at once when the queue is
    /// full, and never served before handshakes already under way.
    pub async fn run_admission<T, F>(&self, op_name: &'static str, op: F) -> Result<T, PoolError>
    where
        T: Send + 'static,
        F: FnOnce() -> Result<T, BackendError> + Send + 'static,
    {
        let started = std::time::Instant::now();
        let r = self.run(Class::Admission, None, move |_| op()).await;
        record_op(op_name, started);
        r
    }

    async fn run<T, F>(
        &self,
        class: Class,
        deadline: Option<Instant>,
        op: F,
    ) -> Result<T, PoolError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn PrivateOps) -> Result<T, BackendError> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let enqueued = Instant::now();
        let shared = Arc::downgrade(&self.shared);
        let job: Job = Box::new(move |ops| {
            // The caller gave up (RPC cancelled): skip the work.
            if tx.is_closed() {
                return;
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                if let Some(shared) = shared.upgrade() {
                    shared.expired.fetch_add(1, Ordering::Relaxed);
                }
                let waited_ms =
                    u64::try_from(now.duration_since(enqueued).as_millis()).unwrap_or(u64::MAX);
                let _ = tx.send(Err(PoolError::Expired { waited_ms }));
                return;
            }
            let _ = tx.send(op(ops).map_err(PoolError::from));
        });
        {
            let mut q = self.shared.lock();
            if q.stopping {
                return Err(PoolError::Stopped);
            }
            let (queue, bound) = match class {
                Class::Admission => (&mut q.admissions, self.shared.depth),
                Class::Continuation => (&mut q.continuations, self.shared.continuation_depth),
            };
            if queue.len() >= bound {
                let queued = queue.len();
                drop(q);
                self.shared.rejected.fetch_add(1, Ordering::Relaxed);
                return Err(PoolError::Full {
                    queued,
                    depth: self.shared.depth,
                });
            }
            queue.push_back(job);
        }
        self.shared.ready.notify_one();
        match rx.await {
            Ok(result) => result,
            Err(_) => Err(PoolError::Stopped),
        }
    }
}

/// One handshake's place in the pool; released when dropped.
pub struct HandshakeSlot {
    shared: Arc<Shared>,
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        self.shared.handshakes.fetch_sub(1, Ordering::AcqRel);
    }
}

fn worker(shared: &Shared) {
    loop {
        let job = {
            let mut q = shared.lock();
            loop {
                if let Some(job) = q
                    .continuations
                    .pop_front()
                    .or_else(|| q.admissions.pop_front())
                {
                    break job;
                }
                if q.stopping {
                    return;
                }
                q = shared.ready.wait(q).unwrap_or_else(|p| p.into_inner());
            }
        };
        job(shared.backend.as_ref());
    }
}

/// Private-operation latency as callers see it: queue wait included.
fn record_op(op: &'static str, started: std::time::Instant) {
    trellis_core::metrics::metrics().private_op_duration.record(
        started.elapsed().as_secs_f64(),
        &[trellis_core::metrics::kv("op", op)],
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A backend that takes its time, to fill the queue.
    struct Slow;
    impl PrivateOps for Slow {
        fn name(&self) -> &'static str {
            "slow"
        }
        fn decrypt(&self, c: &[u8]) -> Result<Zeroizing<Vec<u8>>, BackendError> {
            std::thread::sleep(Duration::from_millis(50));
            Ok(Zeroizing::new(c.to_vec()))
        }
        fn sign_raw(&self, d: &[u8]) -> Result<Vec<u8>, BackendError> {
            Ok(d.to_vec())
        }
    }

    #[tokio::test]
    async fn full_queue_refuses_at_once_and_the_rest_complete() {
        let pool = Pool::new(Arc::new(Slow), 1, 1).unwrap();
        let mut tasks = Vec::new();
        for i in 0..10u8 {
            let pool = pool.clone();
            tasks.push(tokio::spawn(async move { pool.decrypt(vec![i]).await }));
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let mut ok = 0;
        let mut full = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(_) => ok += 1,
                Err(PoolError::Full { .. }) => full += 1,
                Err(e) => panic!("{e}"),
            }
        }
        assert!(ok >= 2 && full >= 1, "ok {ok}, full {full}");
        assert_eq!(pool.rejected(), full);
        assert_eq!(pool.queue_depth(), 0);
        assert_eq!(pool.sign_raw(vec![1, 2]).await.unwrap(), vec![1, 2]);
    }

    #[test]
    fn handshake_slots_are_bounded_and_released() {
        let pool = Pool::new(Arc::new(Slow), 1, 1).unwrap();
        // 2 * queue_depth 1 + 1 worker.
        let a = pool.reserve_handshake().unwrap();
        let _b = pool.reserve_handshake().unwrap();
        let _c = pool.reserve_handshake().unwrap();
        assert!(matches!(
            pool.reserve_handshake(),
            Err(PoolError::Full { .. })
        ));
        drop(a);
        assert!(pool.reserve_handshake().is_ok());
    }

    /// A backend that counts the decryptions it really does.
    struct Counting(std::sync::atomic::AtomicUsize);
    impl PrivateOps for Counting {
        fn name(&self) -> &'static str {
            "counting"
        }
        fn decrypt(&self, c: &[u8]) -> Result<Zeroizing<Vec<u8>>, BackendError> {
            self.0.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(100));
            Ok(Zeroizing::new(c.to_vec()))
        }
        fn sign_raw(&self, d: &[u8]) -> Result<Vec<u8>, BackendError> {
            Ok(d.to_vec())
        }
    }

    #[tokio::test]
    async fn a_request_past_its_deadline_is_dropped_without_rsa_work() {
        let backend = Arc::new(Counting(std::sync::atomic::AtomicUsize::new(0)));
        let pool = Pool::new(backend.clone(), 1, 8).unwrap();
        // Occupies the only worker for 100 ms.
        let busy = {
            let pool = pool.clone();
            tokio::spawn(async move { pool.decrypt(vec![0]).await })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        let deadline = Instant::now() + Duration::from_millis(20);
        let r = pool.decrypt_by(vec![1], Some(deadline)).await;
        assert!(matches!(r, Err(PoolError::Expired { .. })), "{r:?}");
        assert!(busy.await.unwrap().is_ok());
        assert_eq!(
            backend.0.load(Ordering::SeqCst),
            1,
            "no RSA for the expired one"
        );
        assert_eq!(pool.expired(), 1);
        // A deadline in the future is no obstacle.
        let later = Instant::now() + Duration::from_secs(5);
        assert!(pool.decrypt_by(vec![2], Some(later)).await.is_ok());
    }
}
