//! The decision boundary: what the control plane is asked per call, and what it answers.
//!
//! The data plane asks once per routed call, when the first request message has
//! arrived ([`Decider::decide`]); again only when an attempt failed in a retryable
//! way ([`Decider::retry_pick`]) or on a transport failure ([`Decider::upstream_failed`]);
//! and once per new upstream connection when asked to verify its peer. The Python
//! implementation is in `python.rs`; tests use plain Rust ones.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{oneshot, Notify};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};

use crate::config::Kind;
use crate::grpc::Status;
use crate::identity::Peer;
use crate::records::TraceIds;
use crate::retry::RetryPolicy;

/// What the decision sees of one call.
#[derive(Debug)]
pub struct CallInfo {
    pub listener: Arc<str>,
    /// The plugin whose callback socket the call came in on ("" on client listeners).
    pub caller: Arc<str>,
    pub peer: Arc<Peer>,
    pub path: String,
    pub kind: Kind,
    pub call_id: String,
    /// The client's metadata, `sidemesh-*` removed.
    pub metadata: HeaderMap,
    /// The first request message's body; `None` when the request ended before one.
    pub message: Option<Bytes>,
    pub trace: TraceIds,
}

/// Forward the call.
#[derive(Debug)]
pub struct Forward<C> {
    pub upstream: String,
    /// The first message to send (rewritten); `None`: the one received.
    pub message: Option<Bytes>,
    /// Extra metadata for the upstream request.
    pub metadata: Vec<(HeaderName, HeaderValue)>,
    pub context: C,
    pub retry: RetryPolicy,
    /// Attributes of the call's SERVER span (for example `sidemesh.target`).
    pub span_attributes: Option<crate::spans::Attributes>,
}

/// The decision's answer.
#[derive(Debug)]
pub enum Verdict<C> {
    Forward(Forward<C>),
    Refuse(Status),
}

/// The control plane, as the data plane calls it. `C` is the call's opaque context.
pub trait Decider: Send + Sync + 'static {
    type Context: Send + Sync + 'static;

    fn decide(&self, call: CallInfo) -> Verdict<Self::Context>;

    /// Decides several calls at once (the Python decider takes the GIL once for all).
    fn decide_all(&self, calls: Vec<CallInfo>) -> Vec<Verdict<Self::Context>> {
        calls.into_iter().map(|call| self.decide(call)).collect()
    }

    /// Another replica for a retry after `failed` failed (`reason` says how), or `None`.
    fn retry_pick(&self, context: &Self::Context, failed: &str, reason: &str) -> Option<String>;

    /// The status the client sees when the transport to `replica` failed.
    fn upstream_failed(&self, context: &Self::Context, replica: &str, detail: &str) -> Status;

    /// Whether the process behind a new Unix connection to `replica` is the expected one.
    fn verify_peer(&self, replica: &str, pid: i32, uid: u32) -> bool;
}

type Waiting<C> = (CallInfo, oneshot::Sender<Verdict<C>>);

/// Calls waiting for their decision, decided in batches.
///
/// A call joins the queue and yields once, so that the calls whose first message is
/// already in hand join it too; then whichever waiting call finds nobody deciding
/// decides the whole queue (one batch, one GIL acquisition) while the others wait for
/// their verdict or for that batch to end. One call alone is decided at once (a yield
/// later). Under load a decision pays for the GIL once per batch, not once per call.
pub struct Batcher<C> {
    waiting: Mutex<Vec<Waiting<C>>>,
    deciding: AtomicBool,
    decided: Notify,
    batches: AtomicU64,
}

impl<C> Default for Batcher<C> {
    fn default() -> Self {
        Batcher {
            waiting: Mutex::new(Vec::new()),
            deciding: AtomicBool::new(false),
            decided: Notify::new(),
            batches: AtomicU64::new(0),
        }
    }
}

impl<C: Send + Sync + 'static> Batcher<C> {
    /// The decision on `call`.
    pub async fn decide<D: Decider<Context = C>>(&self, decider: &D, call: CallInfo) -> Verdict<C> {
        let (tx, mut rx) = oneshot::channel();
        self.waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((call, tx));
        tokio::task::yield_now().await;
        loop {
            if let Ok(verdict) = rx.try_recv() {
                return verdict;
            }
            if !self.deciding.swap(true, Ordering::AcqRel) {
                self.decide_batch(decider);
                self.deciding.store(false, Ordering::Release);
                self.decided.notify_waiters();
                continue;
            }
            // Another thread is deciding a batch: wait for it (our call may be in it).
            let ended = self.decided.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            if !self.deciding.load(Ordering::Acquire) {
                continue;
            }
            tokio::select! {
                verdict = &mut rx => {
                    return verdict.unwrap_or_else(|_| {
                        Verdict::Refuse(Status::new(crate::grpc::code::INTERNAL, "the call's decision was lost"))
                    });
                }
                _ = ended => {}
            }
        }
    }

    fn decide_batch<D: Decider<Context = C>>(&self, decider: &D) {
        let batch = std::mem::take(&mut *self.waiting.lock().unwrap_or_else(|e| e.into_inner()));
        if batch.is_empty() {
            return;
        }
        self.batches.fetch_add(1, Ordering::Relaxed);
        let (calls, senders): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
        for (verdict, sender) in decider.decide_all(calls).into_iter().zip(senders) {
            let _ = sender.send(verdict);
        }
    }

    /// Batches decided so far.
    pub fn batches(&self) -> u64 {
        self.batches.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Kind;
    use crate::identity::Peer;
    use std::sync::atomic::AtomicUsize;

    /// Forwards each call to a replica named after its call id; counts its batches.
    #[derive(Default)]
    struct Named {
        batches: AtomicUsize,
    }

    impl Decider for Named {
        type Context = ();
        fn decide(&self, call: CallInfo) -> Verdict<()> {
            Verdict::Forward(Forward {
                upstream: call.call_id,
                message: None,
                metadata: vec![],
                context: (),
                retry: RetryPolicy::default(),
                span_attributes: None,
            })
        }
        fn decide_all(&self, calls: Vec<CallInfo>) -> Vec<Verdict<()>> {
            self.batches.fetch_add(1, Ordering::Relaxed);
            calls.into_iter().map(|call| self.decide(call)).collect()
        }
        fn retry_pick(&self, _: &(), _: &str, _: &str) -> Option<String> {
            None
        }
        fn upstream_failed(&self, _: &(), _: &str, _: &str) -> Status {
            Status::new(14, "")
        }
        fn verify_peer(&self, _: &str, _: i32, _: u32) -> bool {
            true
        }
    }

    fn call(id: usize) -> CallInfo {
        CallInfo {
            listener: "l".into(),
            caller: "".into(),
            peer: Arc::new(Peer::unix(None, 0, 0)),
            path: "/s/m".into(),
            kind: Kind::UnaryUnary,
            call_id: id.to_string(),
            metadata: HeaderMap::new(),
            message: None,
            trace: TraceIds::default(),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_call_gets_its_own_verdict_in_fewer_batches() {
        let shared = Arc::new((Batcher::default(), Named::default()));
        let tasks: Vec<_> = (0..500)
            .map(|i| {
                let shared = shared.clone();
                tokio::spawn(async move {
                    match shared.0.decide(&shared.1, call(i)).await {
                        Verdict::Forward(f) => f.upstream == i.to_string(),
                        Verdict::Refuse(_) => false,
                    }
                })
            })
            .collect();
        for task in tasks {
            assert!(task.await.unwrap());
        }
        let batches = shared.1.batches.load(Ordering::Relaxed);
        assert_eq!(batches as u64, shared.0.batches());
        assert!(batches < 500, "{batches}");
    }

    #[tokio::test]
    async fn a_call_alone_is_decided_at_once() {
        let (batcher, decider) = (Batcher::default(), Named::default());
        for i in 0..3 {
            assert!(matches!(
                batcher.decide(&decider, call(i)).await,
                Verdict::Forward(_)
            ));
        }
        assert_eq!(batcher.batches(), 3);
    }
}
