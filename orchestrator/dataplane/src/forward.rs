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
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::ResponseFuture;
use h2::server::SendResponse;
use h2::{Reason, RecvStream, SendStream};
use http::header::{CONTENT_TYPE, TE, USER_AGENT};
use http::{HeaderMap, HeaderValue, Method, Request, Response};
use tokio::time::Sleep;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::admission::{Admission, Permit};
use crate::config::{Config, Kind};
use crate::decision::{CallInfo, Decider, Forward, Verdict};
use crate::grpc::{self, code, FirstMessage, FrameError, FrameScanner, Status};
use crate::identity::Peer;
use crate::pool::{InFlight, Pool, Upstream};
use crate::records::{self, now_ns, Attempt, CallIds, Record, Records, TraceIds};
use crate::retry::{Failure, Progress, RetryPolicy};
use crate::spans::{self, Attributes, Rows};

static USER_AGENT_VALUE: HeaderValue = HeaderValue::from_static("sidemesh-dataplane/0.1");
const SHUTTING_DOWN: &str =
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
    fn finished(&self, record: Record<D::Context>) {
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

fn header(text: &str) -> HeaderValue {
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

fn too_large(len: usize, max: usize) -> Status {
    Status::new(
        code::RESOURCE_EXHAUSTED,
        format!("Received message larger than max ({len} vs. {max})"),
    )
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400 * 365)
}

/// What a routed call carries besides the streams.
struct Routed<C> {
    context: C,
    policy: RetryPolicy,
    permit: Permit,
    listener: Arc<str>,
    caller: Arc<str>,
    principal: Arc<str>,
    path: String,
    call_id: String,
    trace: TraceIds,
    start_ns: u64,
    decided_ns: u64,
    current: String,
    span_attributes: Option<Attributes>,
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
    let verdict = dp.decider.decide(CallInfo {
        listener: conn.listener.clone(),
        caller: conn.caller.clone(),
        peer: conn.peer.clone(),
        path: path.clone(),
        kind,
        call_id: call_id.clone(),
        metadata,
        message: first.message.clone(),
        trace: trace.clone(),
    });
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

// -- the event loop --------------------------------------------------------------

enum ClientTx {
    /// Response headers not sent yet.
    Pending(SendResponse<Bytes>),
    Streaming(SendStream<Bytes>),
    Done,
}

/// One attempt on one upstream.
struct Try {
    upstream: Arc<Upstream>,
    _in_flight: InFlight,
    tx: SendStream<Bytes>,
    response: Option<ResponseFuture>,
    body: Option<RecvStream>,
    data_done: bool,
    start_ns: u64,
    span_id: String,
    removed: Pin<Box<WaitForCancellationFutureOwned>>,
    per_try: Option<Pin<Box<Sleep>>>,
    /// END_STREAM sent upstream.
    request_ended: bool,
}

enum Event {
    Shutdown,
    Deadline,
    ClientReset,
    Removed,
    BackoffDone,
    PerTryTimeout,
    UpHeaders(Result<Response<RecvStream>, h2::Error>),
    UpData(Option<Result<Bytes, h2::Error>>),
    UpTrailers(Result<Option<HeaderMap>, h2::Error>),
    UpCapacity(Option<Result<usize, h2::Error>>),
    ClientCapacity(Option<Result<usize, h2::Error>>),
    ClientData(Option<Result<Bytes, h2::Error>>),
}

/// The final word on a call.
struct Outcome {
    code: u32,
    message: String,
}

struct Call<D: Decider> {
    dp: Arc<Shared<D>>,
    /// `None`: an unrouted call (no decision, no retries, no record).
    kind: Option<Kind>,
    path: http::Uri,
    base: HeaderMap,
    deadline: Option<Instant>,
    client_rx: RecvStream,
    /// The client may still send request DATA.
    client_open: bool,
    client: ClientTx,
    /// The first request message, framed (routed calls), replayed on each attempt.
    first: Option<Bytes>,
    routed: Option<Routed<D::Context>>,
    attempt: Option<Try>,
    backoff: Option<(Pin<Box<Sleep>>, String)>,
    /// Response bytes waiting for the client's window.
    to_client: Option<Bytes>,
    /// Request bytes waiting for the upstream's window.
    to_upstream: Option<Bytes>,
    /// Upstream response headers not yet sent to the client (while a retry is possible).
    held: Option<Response<()>>,
    scan_up: FrameScanner,
    scan_req: FrameScanner,
    requests: u64,
    committed: bool,
    sent_beyond_first: bool,
    deadline_sleep: Option<Pin<Box<Sleep>>>,
    hard_stop: Pin<Box<WaitForCancellationFutureOwned>>,
    attempts: Vec<Attempt>,
    outcome: Option<Outcome>,
}

/// How an h2 error from the upstream bears on retrying.
fn classify(error: &h2::Error) -> Failure {
    if error.is_go_away() && error.is_remote() {
        // h2 fails only the streams above the GOAWAY's last stream id at once: unprocessed.
        return Failure::NeverReached;
    }
    if error.is_reset() && error.is_remote() && error.reason() == Some(Reason::REFUSED_STREAM) {
        return Failure::NeverReached;
    }
    Failure::Transport
}

fn describe(error: &h2::Error) -> String {
    if error.is_go_away() && error.is_remote() {
        return format!(
            "the sidecar sent GOAWAY ({})",
            error.reason().unwrap_or(Reason::NO_ERROR)
        );
    }
    if error.is_reset() && error.is_remote() {
        return format!(
            "the sidecar reset the stream ({})",
            error.reason().unwrap_or(Reason::NO_ERROR)
        );
    }
    if error.is_io() {
        return format!("its connection was closed ({error})");
    }
    error.to_string()
}

/// The gRPC status of an upstream response without one (an HTTP error), as grpc maps it.
fn http_status(status: http::StatusCode) -> Status {
    let code = match status.as_u16() {
        400 => code::INTERNAL,
        401 => 16,
        403 => 7,
        404 => code::UNIMPLEMENTED,
        429 | 502..=504 => code::UNAVAILABLE,
        _ => code::UNKNOWN,
    };
    Status::new(
        code,
        format!("the upstream answered HTTP {status} without a gRPC status"),
    )
}

impl<D: Decider> Call<D> {
    fn remaining(&self) -> Option<Duration> {
        self.deadline
            .map(|d| d.saturating_duration_since(Instant::now()))
    }

    /// Runs a routed call from its first attempt on `upstream`.
    async fn run(mut self, upstream: String) {
        if let Some(deadline) = self.deadline {
            self.deadline_sleep = Some(Box::pin(tokio::time::sleep_until(deadline.into())));
        }
        self.start_attempt(upstream).await;
        self.event_loop().await;
    }

    /// Runs an unrouted call on `upstream`.
    async fn run_with(mut self, upstream: Arc<Upstream>) {
        if let Some(deadline) = self.deadline {
            self.deadline_sleep = Some(Box::pin(tokio::time::sleep_until(deadline.into())));
        }
        self.open(upstream).await;
        self.event_loop().await;
    }

    async fn event_loop(mut self) {
        while self.outcome.is_none() {
            if let Some(key) = self.backoff_due() {
                self.start_attempt(key).await;
                continue;
            }
            let event = poll_fn(|cx| self.poll_event(cx)).await;
            self.handle(event);
        }
        self.finish();
    }

    fn backoff_due(&mut self) -> Option<String> {
        let (sleep, _) = self.backoff.as_ref()?;
        if !sleep.is_elapsed() {
            return None;
        }
        self.backoff.take().map(|(_, key)| key)
    }

    async fn start_attempt(&mut self, key: String) {
        if let Some(routed) = &mut self.routed {
            routed.current = key.clone();
        }
        match self.dp.pool.get(&key) {
            Some(upstream) => self.open(upstream).await,
            None => {
                let detail = format!("no replica {key} is known to the data plane");
                self.record_attempt(
                    &key,
                    "never_reached",
                    code::UNAVAILABLE,
                    now_ns(),
                    String::new(),
                    detail.clone(),
                );
                self.failed(Failure::NeverReached, &key, detail, None);
            }
        }
    }

    /// Opens a stream on `upstream` and sends the first message.
    async fn open(&mut self, upstream: Arc<Upstream>) {
        let start_ns = now_ns();
        let dp = self.dp.clone();
        let verify = |key: &str, pid: i32, uid: u32| dp.decider.verify_peer(key, pid, uid);
        let timeout = self
            .remaining()
            .unwrap_or(dp.config.connect_timeout)
            .min(dp.config.connect_timeout);
        let ready = upstream.ready(&dp.config.h2, timeout, &verify).await;
        let key = upstream.key.clone();
        let (mut send, slot) = match ready {
            Ok(ready) => ready,
            Err(error) => {
                upstream.outliers.failure();
                self.record_attempt(
                    &key,
                    "never_reached",
                    code::UNAVAILABLE,
                    start_ns,
                    String::new(),
                    error.0.clone(),
                );
                self.failed(Failure::NeverReached, &key, error.0, None);
                return;
            }
        };
        let mut headers = self.base.clone();
        if let Some(remaining) = self.remaining() {
            headers.insert("grpc-timeout", header(&grpc::format_timeout(remaining)));
        }
        let mut span_id = String::new();
        if let Some(routed) = &self.routed {
            if !routed.trace.server_span_id.is_empty() {
                span_id = if self.attempts.is_empty() && !routed.trace.client_span_id.is_empty() {
                    routed.trace.client_span_id.clone()
                } else {
                    records::new_span_id()
                };
                let parent = records::format_traceparent(
                    &routed.trace.trace_id,
                    &span_id,
                    routed.trace.sampled,
                );
                headers.insert("traceparent", header(&parent));
            }
        }
        let mut uri = http::uri::Parts::default();
        uri.scheme = Some(http::uri::Scheme::HTTP);
        uri.authority = Some(upstream.authority.clone());
        uri.path_and_query = self.path.path_and_query().cloned();
        let mut request = Request::new(());
        *request.method_mut() = Method::POST;
        *request.uri_mut() = http::Uri::from_parts(uri).unwrap_or_default();
        *request.headers_mut() = headers;
        let end_now = self.first.is_some() && !self.client_open;
        let (response, mut tx) = match send.send_request(request, false) {
            Ok(pair) => pair,
            Err(error) => {
                upstream.discard(slot);
                upstream.outliers.failure();
                let detail = describe(&error);
                self.record_attempt(
                    &key,
                    "never_reached",
                    code::UNAVAILABLE,
                    start_ns,
                    String::new(), // no stream was opened: no CLIENT span
                    detail.clone(),
                );
                self.failed(Failure::NeverReached, &key, detail, None);
                return;
            }
        };
        let mut request_ended = false;
        if let Some(first) = &self.first {
            // Already in memory (at most max_message_bytes): h2 queues it within the window.
            let _ = tx.send_data(first.clone(), end_now);
            request_ended = end_now;
        }
        let per_try = self
            .routed
            .as_ref()
            .and_then(|r| r.policy.per_try_timeout)
            .map(|d| Box::pin(tokio::time::sleep(d)));
        let removed = Box::pin(upstream.removed.clone().cancelled_owned());
        self.attempt = Some(Try {
            _in_flight: upstream.enter(),
            upstream,
            tx,
            response: Some(response),
            body: None,
            data_done: false,
            start_ns,
            span_id,
            removed,
            per_try,
            request_ended,
        });
    }

    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Event> {
        if self.hard_stop.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Event::Shutdown);
        }
        if let Some(sleep) = &mut self.deadline_sleep {
            if sleep.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Event::Deadline);
            }
        }
        let reset = match &mut self.client {
            ClientTx::Pending(respond) => respond.poll_reset(cx).is_ready(),
            ClientTx::Streaming(stream) => stream.poll_reset(cx).is_ready(),
            ClientTx::Done => false,
        };
        if reset {
            return Poll::Ready(Event::ClientReset);
        }
        if let Some((sleep, _)) = &mut self.backoff {
            if sleep.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Event::BackoffDone);
            }
        }
        if let Some(attempt) = &mut self.attempt {
            if attempt.removed.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Event::Removed);
            }
            if let Some(sleep) = &mut attempt.per_try {
                if sleep.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Event::PerTryTimeout);
                }
            }
            if let Some(response) = &mut attempt.response {
                if let Poll::Ready(result) = Pin::new(response).poll(cx) {
                    return Poll::Ready(Event::UpHeaders(result));
                }
            } else if let Some(body) = &mut attempt.body {
                if !attempt.data_done {
                    if self.to_client.is_none() {
                        if let Poll::Ready(data) = body.poll_data(cx) {
                            return Poll::Ready(Event::UpData(data));
                        }
                    }
                } else if let Poll::Ready(trailers) = body.poll_trailers(cx) {
                    return Poll::Ready(Event::UpTrailers(trailers));
                }
            }
            if self.to_upstream.is_some() {
                if let Poll::Ready(capacity) = attempt.tx.poll_capacity(cx) {
                    return Poll::Ready(Event::UpCapacity(capacity));
                }
            }
            if self.client_open && self.to_upstream.is_none() && !attempt.request_ended {
                if let Poll::Ready(data) = self.client_rx.poll_data(cx) {
                    return Poll::Ready(Event::ClientData(data));
                }
            }
        }
        if self.to_client.is_some() {
            if let ClientTx::Streaming(stream) = &mut self.client {
                if let Poll::Ready(capacity) = stream.poll_capacity(cx) {
                    return Poll::Ready(Event::ClientCapacity(capacity));
                }
            }
        }
        Poll::Pending
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Shutdown => self
                .abort_upstream_and_end(Status::new(code::UNAVAILABLE, SHUTTING_DOWN), "shutdown"),
            Event::Deadline => self.abort_upstream_and_end(
                Status::new(code::DEADLINE_EXCEEDED, "Deadline Exceeded"),
                "deadline",
            ),
            Event::ClientReset => {
                self.reset_upstream("cancelled", code::CANCELLED, "cancelled by the caller");
                self.client = ClientTx::Done;
                self.outcome = Some(Outcome {
                    code: code::CANCELLED,
                    message: "cancelled by the caller".into(),
                });
            }
            Event::Removed => {
                let detail = "the replica was removed from the mesh".to_string();
                self.transport_failure(detail, Failure::Transport, "removed");
            }
            Event::BackoffDone => {} // started by the loop
            Event::PerTryTimeout => self.per_try_timeout(),
            Event::UpHeaders(Ok(response)) => self.upstream_headers(response),
            Event::UpHeaders(Err(error)) => {
                self.transport_failure(describe(&error), classify(&error), "transport")
            }
            Event::UpData(Some(Ok(chunk))) => self.upstream_data(chunk),
            Event::UpData(Some(Err(error))) => {
                self.transport_failure(describe(&error), classify(&error), "transport")
            }
            Event::UpData(None) => {
                if let Some(attempt) = &mut self.attempt {
                    attempt.data_done = true;
                }
            }
            Event::UpTrailers(Ok(Some(trailers))) => self.upstream_trailers(trailers),
            Event::UpTrailers(Ok(None)) => {
                let status = Status::new(
                    code::INTERNAL,
                    "the upstream ended its response without a gRPC status",
                );
                self.upstream_status(status, None);
            }
            Event::UpTrailers(Err(error)) => {
                self.transport_failure(describe(&error), classify(&error), "transport")
            }
            Event::UpCapacity(Some(Ok(n))) => self.send_upstream(n),
            Event::UpCapacity(None) | Event::UpCapacity(Some(Err(_))) => {
                // The upstream stream is gone; its receive side says why.
                self.to_upstream = None;
                if let Some(attempt) = &mut self.attempt {
                    attempt.request_ended = true;
                }
            }
            Event::ClientCapacity(Some(Ok(n))) => self.send_client(n),
            Event::ClientCapacity(None) | Event::ClientCapacity(Some(Err(_))) => {
                self.reset_upstream("cancelled", code::CANCELLED, "cancelled by the caller");
                self.client = ClientTx::Done;
                self.outcome = Some(Outcome {
                    code: code::CANCELLED,
                    message: "cancelled by the caller".into(),
                });
            }
            Event::ClientData(Some(Ok(chunk))) => self.client_data(chunk),
            Event::ClientData(None) => {
                self.client_open = false;
                self.end_upstream_request();
            }
            Event::ClientData(Some(Err(_))) => self.handle(Event::ClientReset),
        }
    }

    // -- upstream → client ---------------------------------------------------

    fn upstream_headers(&mut self, response: Response<RecvStream>) {
        let (parts, body) = response.into_parts();
        let Some(attempt) = &mut self.attempt else {
            return;
        };
        attempt.response = None;
        if body.is_end_stream() {
            // Trailers-only: the status is in the headers.
            let status = if parts.status == http::StatusCode::OK {
                Status::from_trailers(&parts.headers).unwrap_or_else(|| {
                    Status::new(code::INTERNAL, "the upstream's response has no gRPC status")
                })
            } else {
                http_status(parts.status)
            };
            let mut only = Response::new(());
            *only.headers_mut() = parts.headers;
            self.upstream_status(status, Some(only));
            return;
        }
        attempt.body = Some(body);
        let mut held = Response::new(());
        *held.status_mut() = parts.status;
        *held.headers_mut() = parts.headers;
        self.held = Some(held);
        if !self.retry_possible() {
            self.commit();
        }
    }

    /// Whether a failure of the current attempt after it reached the sidecar could be retried.
    fn retry_possible(&self) -> bool {
        match (&self.routed, self.kind) {
            (Some(routed), Some(kind)) => {
                routed
                    .policy
                    .may_retry(kind, Failure::Transport, self.progress())
            }
            _ => false,
        }
    }

    fn progress(&self) -> Progress {
        Progress {
            attempts: self.attempts.len() as u32 + 1,
            committed: self.committed,
            sent_beyond_first: self.sent_beyond_first,
        }
    }

    /// Sends the held response headers: from now on the call is this attempt's.
    fn commit(&mut self) {
        if self.committed {
            return;
        }
        self.committed = true;
        // No attempt follows a committed one: what a retry would need can go.
        self.base = HeaderMap::new();
        self.first = None;
        let Some(head) = self.held.take() else { return };
        if let ClientTx::Pending(respond) = &mut self.client {
            match respond.send_response(head, false) {
                Ok(stream) => self.client = ClientTx::Streaming(stream),
                Err(_) => self.client = ClientTx::Done,
            }
        }
    }

    fn upstream_data(&mut self, chunk: Bytes) {
        if chunk.is_empty() {
            return;
        }
        if let Err(FrameError::TooLarge(len, max)) = self.scan_up.feed(&chunk) {
            self.abort_upstream_and_end(too_large(len, max), "too_large");
            return;
        }
        if let Some(attempt) = &mut self.attempt {
            if self.scan_up.messages > 0 {
                attempt.per_try = None;
            }
        }
        self.commit();
        if let ClientTx::Streaming(stream) = &mut self.client {
            stream.reserve_capacity(chunk.len());
            let ready = stream.capacity();
            self.to_client = Some(chunk);
            if ready > 0 {
                self.send_client(ready);
            }
        } else if let Some(body) = self.attempt.as_mut().and_then(|a| a.body.as_mut()) {
            let _ = body.flow_control().release_capacity(chunk.len());
        }
    }

    fn send_client(&mut self, capacity: usize) {
        let Some(mut chunk) = self.to_client.take() else {
            return;
        };
        let ClientTx::Streaming(stream) = &mut self.client else {
            return;
        };
        if capacity == 0 {
            self.to_client = Some(chunk);
            return;
        }
        let part = if capacity >= chunk.len() {
            std::mem::take(&mut chunk)
        } else {
            chunk.split_to(capacity)
        };
        let sent = part.len();
        if stream.send_data(part, false).is_err() {
            self.handle(Event::ClientReset);
            return;
        }
        if let Some(body) = self.attempt.as_mut().and_then(|a| a.body.as_mut()) {
            let _ = body.flow_control().release_capacity(sent);
        }
        if !chunk.is_empty() {
            stream.reserve_capacity(chunk.len());
            self.to_client = Some(chunk);
        }
    }

    fn upstream_trailers(&mut self, trailers: HeaderMap) {
        let status = Status::from_trailers(&trailers).unwrap_or_else(|| {
            Status::new(
                code::INTERNAL,
                "the upstream's trailers have no grpc-status",
            )
        });
        if self.committed {
            // The plugin's own ending, passed on untouched.
            if let ClientTx::Streaming(stream) = &mut self.client {
                let _ = stream.send_trailers(trailers);
            }
            self.client = ClientTx::Done;
            self.end_attempt(
                if status.code == code::OK {
                    "ok"
                } else {
                    "status"
                },
                status.code,
                String::new(),
            );
            self.outcome = Some(Outcome {
                code: status.code,
                message: status.message,
            });
            return;
        }
        // Headers held, no message: the response is headers + trailers.
        let head = self.held.take();
        self.upstream_status_with(status, head, Some(trailers));
    }

    /// The upstream ended the attempt with `status` before any message.
    fn upstream_status(&mut self, status: Status, only: Option<Response<()>>) {
        self.upstream_status_with(status, only, None);
    }

    fn upstream_status_with(
        &mut self,
        status: Status,
        head: Option<Response<()>>,
        trailers: Option<HeaderMap>,
    ) {
        let retryable = match (&self.routed, self.kind) {
            (Some(routed), Some(kind)) => {
                status.code != code::OK
                    && routed.policy.retry_on.contains(&status.code)
                    && routed
                        .policy
                        .may_retry(kind, Failure::Status, self.progress())
            }
            _ => false,
        };
        let outcome = if status.code == code::OK {
            "ok"
        } else {
            "status"
        };
        if retryable {
            let key = self.current_key();
            self.end_attempt(outcome, status.code, status.message.clone());
            self.held = None;
            self.schedule_retry(
                &key,
                format!("the plugin answered {}: {}", status.code, status.message),
                Some(status),
            );
            return;
        }
        self.end_attempt(outcome, status.code, String::new());
        // Pass the plugin's answer on as it came.
        match (head, trailers) {
            (Some(head), Some(trailers)) => {
                if let ClientTx::Pending(respond) = &mut self.client {
                    if let Ok(mut stream) = respond.send_response(head, false) {
                        let _ = stream.send_trailers(trailers);
                    }
                } else if let ClientTx::Streaming(stream) = &mut self.client {
                    let _ = stream.send_trailers(trailers);
                }
            }
            (Some(mut only), None) => {
                if let ClientTx::Pending(respond) = &mut self.client {
                    *only.status_mut() = http::StatusCode::OK;
                    if !only.headers().contains_key("grpc-status") {
                        for (name, value) in status.trailers() {
                            if let Some(name) = name {
                                only.headers_mut().insert(name, value);
                            }
                        }
                    }
                    let _ = respond.send_response(only, true);
                } else {
                    self.send_status(&status);
                }
            }
            _ => self.send_status(&status),
        }
        self.client = ClientTx::Done;
        self.outcome = Some(Outcome {
            code: status.code,
            message: status.message,
        });
    }

    // -- client → upstream ---------------------------------------------------

    fn client_data(&mut self, chunk: Bytes) {
        if chunk.is_empty() {
            return;
        }
        let before = self.scan_req.messages;
        if let Err(FrameError::TooLarge(len, max)) = self.scan_req.feed(&chunk) {
            self.abort_upstream_and_end(too_large(len, max), "too_large");
            return;
        }
        self.requests += self.scan_req.messages - before;
        self.sent_beyond_first = true;
        if let Some(attempt) = &mut self.attempt {
            attempt.tx.reserve_capacity(chunk.len());
            let ready = attempt.tx.capacity();
            self.to_upstream = Some(chunk);
            if ready > 0 {
                self.send_upstream(ready);
            }
        }
    }

    fn send_upstream(&mut self, capacity: usize) {
        let Some(mut chunk) = self.to_upstream.take() else {
            return;
        };
        let Some(attempt) = &mut self.attempt else {
            return;
        };
        if capacity == 0 {
            self.to_upstream = Some(chunk);
            return;
        }
        let part = if capacity >= chunk.len() {
            std::mem::take(&mut chunk)
        } else {
            chunk.split_to(capacity)
        };
        let sent = part.len();
        let _ = attempt.tx.send_data(part, false);
        let _ = self.client_rx.flow_control().release_capacity(sent);
        if !chunk.is_empty() {
            attempt.tx.reserve_capacity(chunk.len());
            self.to_upstream = Some(chunk);
        } else if !self.client_open {
            self.end_upstream_request();
        }
    }

    fn end_upstream_request(&mut self) {
        if self.to_upstream.is_some() {
            return; // after the bytes still waiting
        }
        if let Some(attempt) = &mut self.attempt {
            if !attempt.request_ended {
                attempt.request_ended = true;
                let _ = attempt.tx.send_data(Bytes::new(), true);
            }
        }
    }

    // -- failures, retries, endings ------------------------------------------

    fn current_key(&self) -> String {
        match (&self.attempt, &self.routed) {
            (Some(attempt), _) => attempt.upstream.key.clone(),
            (None, Some(routed)) => routed.current.clone(),
            _ => String::new(),
        }
    }

    fn per_try_timeout(&mut self) {
        let timeout = self
            .routed
            .as_ref()
            .and_then(|r| r.policy.per_try_timeout)
            .unwrap_or_default();
        let detail = format!(
            "no response within the per-try timeout of {:.3}s",
            timeout.as_secs_f64()
        );
        let key = self.current_key();
        if let Some(attempt) = &mut self.attempt {
            attempt.tx.send_reset(Reason::CANCEL);
        }
        self.end_attempt("per_try_timeout", code::DEADLINE_EXCEEDED, detail.clone());
        self.held = None;
        let status = Status::new(
            code::DEADLINE_EXCEEDED,
            format!(
                "replica {key} did not answer within the per-try timeout of {:.3}s",
                timeout.as_secs_f64()
            ),
        );
        self.failed(Failure::PerTryTimeout, &key, detail, Some(status));
    }

    /// The transport to the upstream failed under the current attempt.
    fn transport_failure(&mut self, detail: String, failure: Failure, outcome: &'static str) {
        let key = self.current_key();
        if let Some(attempt) = &mut self.attempt {
            attempt.tx.send_reset(Reason::CANCEL);
            attempt.upstream.outliers.failure();
        }
        let failure = if self.held.is_some() || self.committed {
            Failure::Transport
        } else {
            failure
        };
        let outcome = if failure == Failure::NeverReached {
            "never_reached"
        } else {
            outcome
        };
        self.end_attempt(outcome, code::UNAVAILABLE, detail.clone());
        self.held = None;
        self.failed(failure, &key, detail, None);
    }

    /// An attempt failed: retry it elsewhere if that is safe, else end the call.
    /// `status`: what the client gets if not retried (`None`: ask `upstream_failed`).
    fn failed(&mut self, failure: Failure, key: &str, detail: String, status: Option<Status>) {
        let may = match (&self.routed, self.kind) {
            (Some(routed), Some(kind)) => {
                routed
                    .policy
                    .may_retry(kind, failure, self.progress_after())
            }
            _ => false,
        };
        if may {
            self.schedule_retry(key, detail, status);
            return;
        }
        let status = status.unwrap_or_else(|| self.transport_status(key, &detail));
        self.send_status(&status);
        self.client = ClientTx::Done;
        self.outcome = Some(Outcome {
            code: status.code,
            message: status.message,
        });
    }

    /// Progress once the failed attempt is recorded (`attempts` already holds it).
    fn progress_after(&self) -> Progress {
        Progress {
            attempts: self.attempts.len() as u32,
            committed: self.committed,
            sent_beyond_first: self.sent_beyond_first,
        }
    }

    fn transport_status(&self, key: &str, detail: &str) -> Status {
        match &self.routed {
            Some(routed) => self
                .dp
                .decider
                .upstream_failed(&routed.context, key, detail),
            None => Status::new(
                code::UNAVAILABLE,
                format!("the mesh's internal server is unavailable ({detail})"),
            ),
        }
    }

    fn schedule_retry(&mut self, failed: &str, reason: String, status: Option<Status>) {
        let Some(routed) = &self.routed else { return };
        let retry = self.attempts.len() as u32;
        let pause = routed.policy.backoff(retry, &mut rand::rng());
        let next = self.dp.decider.retry_pick(&routed.context, failed, &reason);
        let in_time = self.remaining().is_none_or(|left| left > pause);
        match next {
            Some(key) if in_time => {
                self.dp.stats.retries.fetch_add(1, Ordering::Relaxed);
                self.attempt = None;
                self.to_upstream = None;
                self.scan_up = FrameScanner::new(self.dp.config.max_message_bytes);
                self.backoff = Some((Box::pin(tokio::time::sleep(pause)), key));
            }
            _ => {
                let status = status.unwrap_or_else(|| self.transport_status(failed, &reason));
                self.send_status(&status);
                self.client = ClientTx::Done;
                self.outcome = Some(Outcome {
                    code: status.code,
                    message: status.message,
                });
            }
        }
    }

    fn end_attempt(&mut self, outcome: &'static str, code: u32, detail: String) {
        let Some(attempt) = self.attempt.take() else {
            return;
        };
        if outcome == "ok" || outcome == "status" {
            attempt.upstream.outliers.success();
        }
        if self.routed.is_some() {
            self.attempts.push(Attempt {
                replica: attempt.upstream.key.clone(),
                outcome,
                code,
                start_ns: attempt.start_ns,
                end_ns: now_ns(),
                span_id: attempt.span_id,
                detail,
                attributes: attempt.upstream.attributes.clone(),
            });
        }
        // Keep the stream alive until the response is fully handed over: the body goes
        // with the attempt, so nothing more is read from it.
    }

    fn record_attempt(
        &mut self,
        key: &str,
        outcome: &'static str,
        code: u32,
        start_ns: u64,
        span_id: String,
        detail: String,
    ) {
        if self.routed.is_some() {
            self.attempts.push(Attempt {
                replica: key.to_string(),
                outcome,
                code,
                start_ns,
                end_ns: now_ns(),
                span_id,
                detail,
                attributes: None,
            });
        }
    }

    fn reset_upstream(&mut self, outcome: &'static str, code: u32, detail: &str) {
        if let Some(attempt) = &mut self.attempt {
            attempt.tx.send_reset(Reason::CANCEL);
        }
        self.end_attempt(outcome, code, detail.to_string());
        self.backoff = None;
    }

    /// Ends the call with `status` from the data plane itself, resetting the upstream.
    fn abort_upstream_and_end(&mut self, status: Status, outcome: &'static str) {
        self.reset_upstream(outcome, status.code, &status.message);
        self.send_status(&status);
        self.client = ClientTx::Done;
        self.outcome = Some(Outcome {
            code: status.code,
            message: status.message,
        });
    }

    /// Ends the client's stream with `status`: trailers-only before headers, else trailers.
    fn send_status(&mut self, status: &Status) {
        match &mut self.client {
            ClientTx::Pending(respond) => {
                let _ = respond.send_response(status.trailers_only(), true);
            }
            ClientTx::Streaming(stream) => {
                let _ = stream.send_trailers(status.trailers());
            }
            ClientTx::Done => {}
        }
    }

    fn finish(mut self) {
        let Some(routed) = self.routed.take() else {
            return;
        };
        let outcome = self.outcome.take().unwrap_or(Outcome {
            code: code::UNKNOWN,
            message: String::new(),
        });
        drop(routed.permit);
        self.dp.finished(Record {
            context: Some(routed.context),
            listener: routed.listener,
            caller: routed.caller,
            principal: routed.principal,
            path: routed.path,
            call_id: routed.call_id,
            code: outcome.code,
            message: outcome.message,
            requests: self.requests,
            responses: self.scan_up.messages,
            start_ns: routed.start_ns,
            decided_ns: routed.decided_ns,
            end_ns: now_ns(),
            trace: routed.trace,
            upstream: routed.current,
            attempts: std::mem::take(&mut self.attempts),
            span_attributes: routed.span_attributes,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
