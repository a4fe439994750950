//! Forwarding one call: the client's HTTP/2 stream to an upstream's and back.
//!
//! A routed call reads its first request message, asks the decision, then runs
//! attempts until one commits (a response message reaches the client) or the call
//! ends. An unrouted call goes as is to the orchestrator's internal server with the
//! peer's trusted identity added. Both run the same event loop ([`Call::run`]): one
//! task per call polls the client and upstream streams and moves DATA only as fast as
//! the receiving side grants HTTP/2 window, so a slow reader slows the sender and a
//! stream holds at most one window of data per direction.

use std::collections::HashSet;
use std::future::poll_fn;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::server::SendResponse;
use h2::RecvStream;
use http::header::{CONTENT_TYPE, TE, USER_AGENT};
use http::{HeaderMap, HeaderValue, Request};
use tokio_util::sync::CancellationToken;

use crate::admission::{Admission, Permit};
use crate::call::{Call, ClientTx};
use crate::config::{Config, Kind};
use crate::decision::{Batcher, CallInfo, Decider, Forward, Verdict};
use crate::grpc::{self, code, FirstMessage, FrameError, FrameScanner, Status};
use crate::identity::Peer;
use crate::pool::{Pool, Upstream};
use crate::records::{now_ns, CallIds, Record, Records, TraceIds};
use crate::retry::RetryPolicy;
use crate::spans::{self, Attributes, Rows};

static USER_AGENT_VALUE: HeaderValue = HeaderValue::from_static("sidemesh-dataplane/0.1");
pub(crate) const SHUTTING_DOWN: &str =
    "the mesh is shutting down: the call did not finish within the shutdown grace period; retry";

/// Counters for `stats()`.
#[derive(Debug, Default)]
pub struct Stats {
    pub calls: AtomicU64,
    pub refused: AtomicU64,
    pub retries: AtomicU64,
    pub internal_calls: AtomicU64,
}

/// What every call shares.
pub struct Shared<D: Decider> {
    pub config: Config,
    pub decider: D,
    /// Calls waiting for their decision, decided in batches.
    pub batcher: Batcher<D::Context>,
    pub pool: Pool,
    pub internal: Option<Arc<Upstream>>,
    pub admission: Arc<Admission>,
    pub records: Records<D::Context>,
    /// Span rows of sampled calls (when tracing), for the trace store.
    pub rows: Rows,
    /// `service.name` of the data plane's spans.
    pub service: Arc<str>,
    pub ids: CallIds,
    /// Cancelled when the grace period of `stop` is over: calls still running end.
    pub hard_stop: CancellationToken,
    /// Streams being served (routed and not), for `stop` to wait on.
    pub active: AtomicUsize,
    pub stats: Stats,
}

impl<D: Decider> Shared<D> {
    /// Hands a finished call to Python: its record, and its span rows when traced.
    pub(crate) fn finished(&self, record: Record<D::Context>) {
        if self.config.tracing {
            self.rows.extend(spans::rows(&record, &self.service));
        }
        self.records.push(record);
    }
}

/// The connection a call came in on.
#[derive(Debug)]
pub struct ConnInfo {
    pub listener: Arc<str>,
    pub caller: Arc<str>,
    pub peer: Arc<Peer>,
    /// gRPC services this listener serves; `None`: all.
    pub services: Option<Arc<HashSet<String>>>,
}

struct Active<'a>(&'a AtomicUsize);

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// `/pkg.Service/Method` → `pkg.Service`.
pub fn service_of(path: &str) -> &str {
    path.trim_start_matches('/').split('/').next().unwrap_or("")
}

fn refuse(respond: &mut SendResponse<Bytes>, status: &Status) {
    let _ = respond.send_response(status.trailers_only(), true);
}

/// Serves one client stream.
pub async fn serve<D: Decider>(
    dp: Arc<Shared<D>>,
    conn: Arc<ConnInfo>,
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) {
    dp.active.fetch_add(1, Ordering::AcqRel);
    let _active = Active(&dp.active);
    let (parts, body) = request.into_parts();
    let path = parts.uri.path().to_string();
    if let Some(services) = &conn.services {
        let service = service_of(&path);
        if !services.contains(service) {
            let status = Status::new(
                code::UNIMPLEMENTED,
                format!("{service} is not served on this socket"),
            );
            refuse(&mut respond, &status);
            return;
        }
    }
    match dp.config.routes.get(&path).copied() {
        Some(kind) => routed(&dp, &conn, parts, body, respond, path, kind).await,
        None => internal(&dp, &conn, parts, body, respond).await,
    }
}

fn deadline_of(headers: &HeaderMap) -> Option<Instant> {
    headers
        .get("grpc-timeout")
        .and_then(|v| grpc::parse_timeout(v.as_bytes()))
        .map(|d| Instant::now() + d)
}

/// The headers every upstream request of a call starts from.
fn base_headers(client: &HeaderMap, tracing: bool) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(client.len() + 6);
    for (name, value) in client {
        if grpc::is_hop_header(name) || (tracing && name.as_str() == "traceparent") {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    out.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    out.insert(TE, HeaderValue::from_static("trailers"));
    out.insert(USER_AGENT, USER_AGENT_VALUE.clone());
    out
}

pub(crate) fn header(text: &str) -> HeaderValue {
    HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

// -- unrouted calls --------------------------------------------------------------

async fn internal<D: Decider>(
    dp: &Arc<Shared<D>>,
    conn: &Arc<ConnInfo>,
    parts: http::request::Parts,
    body: RecvStream,
    mut respond: SendResponse<Bytes>,
) {
    let Some(upstream) = dp.internal.clone() else {
        let status = Status::new(
            code::UNIMPLEMENTED,
            format!("{} is not served here", parts.uri.path()),
        );
        refuse(&mut respond, &status);
        return;
    };
    dp.stats.internal_calls.fetch_add(1, Ordering::Relaxed);
    let mut headers = base_headers(&parts.headers, false);
    // Everything the internal server trusts comes from here, never from the client.
    headers.insert("sidemesh-principal", header(&conn.peer.principal));
    headers.insert("sidemesh-listener", header(&conn.listener));
    if !conn.peer.address.is_empty() {
        headers.insert("sidemesh-peer", header(&conn.peer.address));
    }
    if !conn.caller.is_empty() {
        headers.insert("sidemesh-caller", header(&conn.caller));
    }
    let call = Call::<D> {
        dp: dp.clone(),
        kind: None,
        path: parts.uri,
        base: headers,
        deadline: deadline_of(&parts.headers),
        client_rx: body,
        client_open: true,
        client: ClientTx::Pending(respond),
        first: None,
        routed: None,
        attempt: None,
        backoff: None,
        to_client: None,
        to_upstream: None,
        held: None,
        scan_up: FrameScanner::new(usize::MAX),
        scan_req: FrameScanner::new(usize::MAX),
        requests: 0,
        committed: false,
        sent_beyond_first: false,
        deadline_sleep: None,
        hard_stop: Box::pin(dp.hard_stop.clone().cancelled_owned()),
        attempts: Vec::new(),
        outcome: None,
    };
    call.run_with(upstream).await;
}

// -- routed calls ----------------------------------------------------------------

/// How reading the first message ended, when it did not yield one.
enum Early {
    Reset,
    Status(Status),
}

struct First {
    message: Option<Bytes>,
    compressed: bool,
    rest: Bytes,
    ended: bool,
}

async fn read_first(
    body: &mut RecvStream,
    respond: &mut SendResponse<Bytes>,
    kind: Kind,
    deadline: Option<Instant>,
    limit: usize,
    hard_stop: &CancellationToken,
) -> Result<First, Early> {
    let mut collector = FirstMessage::default();
    let mut done: Option<grpc::Complete> = None;
    let sleep = tokio::time::sleep_until(deadline.unwrap_or_else(far_future).into());
    tokio::pin!(sleep);
    loop {
        // A single-request call is read to its end; a stream only to its first message.
        if done.is_some() && !kind.single_request() {
            break;
        }
        let next = tokio::select! {
            biased;
            _ = hard_stop.cancelled() => return Err(Early::Status(Status::new(code::UNAVAILABLE, SHUTTING_DOWN))),
            _ = &mut sleep => return Err(Early::Status(Status::new(code::DEADLINE_EXCEEDED, "Deadline Exceeded"))),
            _ = poll_fn(|cx| respond.poll_reset(cx)) => return Err(Early::Reset),
            next = body.data() => next,
        };
        match next {
            None => break,
            Some(Err(_)) => return Err(Early::Reset),
            Some(Ok(chunk)) => {
                let _ = body.flow_control().release_capacity(chunk.len());
                if let Some(complete) = &done {
                    if !chunk.is_empty() || !complete.rest.is_empty() {
                        return Err(Early::Status(Status::new(
                            code::INTERNAL,
                            "more than one request message for a unary method",
                        )));
                    }
                    continue;
                }
                match collector.push(&chunk, limit) {
                    Ok(Some(complete)) => {
                        if kind.single_request() && !complete.rest.is_empty() {
                            return Err(Early::Status(Status::new(
                                code::INTERNAL,
                                "more than one request message for a unary method",
                            )));
                        }
                        done = Some(complete)
                    }
                    Ok(None) => {}
                    Err(FrameError::TooLarge(len, max)) => {
                        return Err(Early::Status(too_large(len, max)))
                    }
                }
            }
        }
    }
    let ended = body.is_end_stream();
    Ok(match done {
        Some(c) => First {
            message: Some(c.body),
            compressed: c.compressed,
            rest: c.rest,
            ended,
        },
        None if collector.is_empty() => First {
            message: None,
            compressed: false,
            rest: Bytes::new(),
            ended: true,
        },
        None => {
            return Err(Early::Status(Status::new(
                code::INTERNAL,
                "the request ended in the middle of a message",
            )))
        }
    })
}

pub(crate) fn too_large(len: usize, max: usize) -> Status {
    Status::new(
        code::RESOURCE_EXHAUSTED,
        format!("Received message larger than max ({len} vs. {max})"),
    )
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400 * 365)
}

/// What a routed call carries besides the streams.
pub(crate) struct Routed<C> {
    pub(crate) context: C,
    pub(crate) policy: RetryPolicy,
    pub(crate) permit: Permit,
    pub(crate) listener: Arc<str>,
    pub(crate) caller: Arc<str>,
    pub(crate) principal: Arc<str>,
    pub(crate) path: String,
    pub(crate) call_id: String,
    pub(crate) trace: TraceIds,
    pub(crate) start_ns: u64,
    pub(crate) decided_ns: u64,
    pub(crate) current: String,
    pub(crate) span_attributes: Option<Attributes>,
}

#[allow(clippy::too_many_arguments)]
async fn routed<D: Decider>(
    dp: &Arc<Shared<D>>,
    conn: &Arc<ConnInfo>,
    parts: http::request::Parts,
    mut body: RecvStream,
    mut respond: SendResponse<Bytes>,
    path: String,
    kind: Kind,
) {
    let start_ns = now_ns();
    dp.stats.calls.fetch_add(1, Ordering::Relaxed);
    let trace = TraceIds::for_call(
        parts
            .headers
            .get("traceparent")
            .and_then(|v| v.to_str().ok()),
        dp.config.tracing,
    );
    let call_id = dp.ids.next();
    let bare = |code: u32, message: &str, decided_ns: u64, requests: u64| Record {
        context: None,
        listener: conn.listener.clone(),
        caller: conn.caller.clone(),
        principal: conn.peer.principal.as_str().into(),
        path: path.clone(),
        call_id: call_id.clone(),
        code,
        message: message.to_string(),
        requests,
        responses: 0,
        start_ns,
        decided_ns,
        end_ns: now_ns(),
        trace: trace.clone(),
        attempts: Vec::new(),
        upstream: String::new(),
        span_attributes: None,
    };
    let Some(permit) = dp.admission.enter() else {
        dp.stats.refused.fetch_add(1, Ordering::Relaxed);
        let status = &dp.config.admission_refusal;
        refuse(&mut respond, status);
        dp.finished(bare(status.code, &status.message, 0, 0));
        return;
    };
    let deadline = deadline_of(&parts.headers);
    let limit = dp.config.max_message_bytes;
    let first = match read_first(
        &mut body,
        &mut respond,
        kind,
        deadline,
        limit,
        &dp.hard_stop,
    )
    .await
    {
        Ok(first) => first,
        Err(Early::Reset) => {
            dp.finished(bare(code::CANCELLED, "cancelled by the caller", 0, 0));
            return;
        }
        Err(Early::Status(status)) => {
            refuse(&mut respond, &status);
            dp.finished(bare(status.code, &status.message, 0, 0));
            return;
        }
    };
    if first.compressed {
        let status = Status::new(
            code::UNIMPLEMENTED,
            "the first request message of a routed call must not be compressed: the mesh reads \
             it to route the call (send it with compression off)",
        );
        refuse(&mut respond, &status);
        dp.finished(bare(status.code, &status.message, 0, 1));
        return;
    }
    let mut metadata = HeaderMap::with_capacity(parts.headers.len());
    for (name, value) in &parts.headers {
        if !name.as_str().starts_with("sidemesh-") {
            metadata.append(name.clone(), value.clone());
        }
    }
    let requests = u64::from(first.message.is_some());
    let verdict = dp
        .batcher
        .decide(
            &dp.decider,
            CallInfo {
                listener: conn.listener.clone(),
                caller: conn.caller.clone(),
                peer: conn.peer.clone(),
                path: path.clone(),
                kind,
                call_id: call_id.clone(),
                metadata,
                message: first.message.clone(),
                trace: trace.clone(),
            },
        )
        .await;
    let decided_ns = now_ns();
    let forward: Forward<D::Context> = match verdict {
        Verdict::Refuse(status) => {
            dp.stats.refused.fetch_add(1, Ordering::Relaxed);
            refuse(&mut respond, &status);
            dp.finished(bare(status.code, &status.message, decided_ns, requests));
            return;
        }
        Verdict::Forward(forward) => forward,
    };
    let Some(original) = first.message else {
        let status = Status::new(
            code::INVALID_ARGUMENT,
            "the call ended before its first request message",
        );
        refuse(&mut respond, &status);
        dp.finished(bare(status.code, &status.message, decided_ns, 0));
        return;
    };
    let message = forward.message.unwrap_or(original);
    let mut base = base_headers(&parts.headers, dp.config.tracing);
    drop(parts.headers); // not kept for the call's life
    base.insert("sidemesh-call-id", header(&call_id));
    if !conn.caller.is_empty() {
        base.insert("sidemesh-caller", header(&conn.caller));
    }
    for (name, value) in forward.metadata {
        base.append(name, value);
    }
    let mut framed = grpc::frame(&message).to_vec();
    framed.extend_from_slice(&first.rest);
    let routed = Routed {
        context: forward.context,
        policy: forward.retry,
        permit,
        listener: conn.listener.clone(),
        caller: conn.caller.clone(),
        principal: conn.peer.principal.as_str().into(),
        path,
        call_id,
        trace,
        start_ns,
        decided_ns,
        current: forward.upstream.clone(),
        span_attributes: forward.span_attributes,
    };
    let call = Call::<D> {
        dp: dp.clone(),
        kind: Some(kind),
        path: parts.uri,
        base,
        deadline,
        client_rx: body,
        client_open: !first.ended,
        client: ClientTx::Pending(respond),
        first: Some(Bytes::from(framed)),
        routed: Some(routed),
        attempt: None,
        backoff: None,
        to_client: None,
        to_upstream: None,
        held: None,
        scan_up: FrameScanner::new(limit),
        scan_req: FrameScanner::new(limit),
        requests: requests + u64::from(!first.rest.is_empty()),
        committed: false,
        sent_beyond_first: !first.rest.is_empty(),
        deadline_sleep: None,
        hard_stop: Box::pin(dp.hard_stop.clone().cancelled_owned()),
        attempts: Vec::new(),
        outcome: None,
    };
    call.run(forward.upstream).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::call::http_status;
    use http::HeaderName;

    #[test]
    fn services_are_the_first_path_segment() {
        assert_eq!(
            service_of("/sidemesh.v1.ToolService/CallTool"),
            "sidemesh.v1.ToolService"
        );
        assert_eq!(
            service_of("/grpc.health.v1.Health/Check"),
            "grpc.health.v1.Health"
        );
        assert_eq!(service_of(""), "");
    }

    #[test]
    fn upstream_headers_drop_the_hop_and_the_forged() {
        let mut client = HeaderMap::new();
        for (k, v) in [
            ("te", "trailers"),
            ("content-type", "application/grpc+proto"),
            ("user-agent", "grpc-python"),
            ("grpc-timeout", "1S"),
            ("grpc-accept-encoding", "gzip"),
            ("sidemesh-principal", "root"),
            ("x-custom", "1"),
            ("traceparent", "00-x"),
            ("tracestate", "a=b"),
        ] {
            client.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        let traced = base_headers(&client, true);
        assert_eq!(traced["content-type"], "application/grpc");
        assert_eq!(traced["te"], "trailers");
        assert_eq!(traced["x-custom"], "1");
        assert_eq!(traced["grpc-accept-encoding"], "gzip");
        assert_eq!(traced["tracestate"], "a=b");
        assert!(!traced.contains_key("grpc-timeout"));
        assert!(!traced.contains_key("sidemesh-principal"));
        assert!(!traced.contains_key("traceparent"));
        assert_eq!(traced["user-agent"], USER_AGENT_VALUE);
        assert_eq!(base_headers(&client, false)["traceparent"], "00-x");
    }

    #[test]
    fn http_errors_map_as_grpc_does() {
        assert_eq!(
            http_status(http::StatusCode::NOT_FOUND).code,
            code::UNIMPLEMENTED
        );
        assert_eq!(
            http_status(http::StatusCode::SERVICE_UNAVAILABLE).code,
            code::UNAVAILABLE
        );
        assert_eq!(
            http_status(http::StatusCode::IM_A_TEAPOT).code,
            code::UNKNOWN
        );
    }
}

#[cfg(test)]
mod size {
    use super::*;
    use crate::call::Try;

    struct Nobody;

    impl Decider for Nobody {
        type Context = ();
        fn decide(&self, _: CallInfo) -> Verdict<()> {
            Verdict::Refuse(Status::new(code::UNIMPLEMENTED, ""))
        }
        fn retry_pick(&self, _: &(), _: &str, _: &str) -> Option<String> {
            None
        }
        fn upstream_failed(&self, _: &(), _: &str, _: &str) -> Status {
            Status::new(code::UNAVAILABLE, "")
        }
        fn verify_peer(&self, _: &str, _: i32, _: u32) -> bool {
            true
        }
    }

    #[test]
    fn a_call_is_small() {
        let call = std::mem::size_of::<Call<Nobody>>();
        let attempt = std::mem::size_of::<Try>();
        println!("Call {call} bytes, Try {attempt} bytes");
        assert!(call < 2048, "{call}");
    }
}
