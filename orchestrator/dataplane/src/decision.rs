//! The decision boundary: what the control plane is asked per call, and what it answers.
//!
//! The data plane asks once per routed call, when the first request message has
//! arrived ([`Decider::decide`]); again only when an attempt failed in a retryable
//! way ([`Decider::retry_pick`]) or on a transport failure ([`Decider::upstream_failed`]);
//! and once per new upstream connection when asked to verify its peer. The Python
//! implementation is in `python.rs`; tests use plain Rust ones.

use std::sync::Arc;

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

    /// Another replica for a retry after `failed` failed (`reason` says how), or `None`.
    fn retry_pick(&self, context: &Self::Context, failed: &str, reason: &str) -> Option<String>;

    /// The status the client sees when the transport to `replica` failed.
    fn upstream_failed(&self, context: &Self::Context, replica: &str, detail: &str) -> Status;

    /// Whether the process behind a new Unix connection to `replica` is the expected one.
    fn verify_peer(&self, replica: &str, pid: i32, uid: u32) -> bool;
}
