//! One call's event loop: the client's stream and the current attempt's upstream
//! stream polled together ([`Call::poll_event`]), DATA moved only as fast as the
//! receiving side grants HTTP/2 window, response headers held while a retry is still
//! possible, and every ending turned into the status the client sees.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::ResponseFuture;
use h2::server::SendResponse;
use h2::{RecvStream, SendStream};
use http::{HeaderMap, Response};
use tokio::time::Sleep;
use tokio_util::sync::WaitForCancellationFutureOwned;

use crate::attempt::{classify, describe};
use crate::config::Kind;
use crate::decision::Decider;
use crate::forward::{too_large, Routed, Shared, SHUTTING_DOWN};
use crate::grpc::{code, FrameError, FrameScanner, Status};
use crate::pool::{InFlight, Upstream};
use crate::records::{now_ns, Attempt, Record};
use crate::retry::{Failure, Progress};

pub(crate) enum ClientTx {
    /// Response headers not sent yet.
    Pending(SendResponse<Bytes>),
    Streaming(SendStream<Bytes>),
    Done,
}

/// One attempt on one upstream.
pub(crate) struct Try {
    pub(crate) upstream: Arc<Upstream>,
    pub(crate) _in_flight: InFlight,
    pub(crate) tx: SendStream<Bytes>,
    pub(crate) response: Option<ResponseFuture>,
    pub(crate) body: Option<RecvStream>,
    pub(crate) data_done: bool,
    pub(crate) start_ns: u64,
    pub(crate) span_id: String,
    pub(crate) removed: Pin<Box<WaitForCancellationFutureOwned>>,
    pub(crate) per_try: Option<Pin<Box<Sleep>>>,
    /// END_STREAM sent upstream.
    pub(crate) request_ended: bool,
}

pub(crate) enum Event {
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
pub(crate) struct Outcome {
    pub(crate) code: u32,
    pub(crate) message: String,
}

pub(crate) struct Call<D: Decider> {
    pub(crate) dp: Arc<Shared<D>>,
    /// `None`: an unrouted call (no decision, no retries, no record).
    pub(crate) kind: Option<Kind>,
    pub(crate) path: http::Uri,
    pub(crate) base: HeaderMap,
    pub(crate) deadline: Option<Instant>,
    pub(crate) client_rx: RecvStream,
    /// The client may still send request DATA.
    pub(crate) client_open: bool,
    pub(crate) client: ClientTx,
    /// The first request message, framed (routed calls), replayed on each attempt.
    pub(crate) first: Option<Bytes>,
    pub(crate) routed: Option<Routed<D::Context>>,
    pub(crate) attempt: Option<Try>,
    pub(crate) backoff: Option<(Pin<Box<Sleep>>, String)>,
    /// Response bytes waiting for the client's window.
    pub(crate) to_client: Option<Bytes>,
    /// Request bytes waiting for the upstream's window.
    pub(crate) to_upstream: Option<Bytes>,
    /// Upstream response headers not yet sent to the client (while a retry is possible).
    pub(crate) held: Option<Response<()>>,
    pub(crate) scan_up: FrameScanner,
    pub(crate) scan_req: FrameScanner,
    pub(crate) requests: u64,
    pub(crate) committed: bool,
    pub(crate) sent_beyond_first: bool,
    pub(crate) deadline_sleep: Option<Pin<Box<Sleep>>>,
    pub(crate) hard_stop: Pin<Box<WaitForCancellationFutureOwned>>,
    pub(crate) attempts: Vec<Attempt>,
    pub(crate) outcome: Option<Outcome>,
}

/// The gRPC status of an upstream response without one (an HTTP error), as grpc maps it.
pub(crate) fn http_status(status: http::StatusCode) -> Status {
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
    pub(crate) fn remaining(&self) -> Option<Duration> {
        self.deadline
            .map(|d| d.saturating_duration_since(Instant::now()))
    }

    /// Runs a routed call from its first attempt on `upstream`.
    pub(crate) async fn run(mut self, upstream: String) {
        if let Some(deadline) = self.deadline {
            self.deadline_sleep = Some(Box::pin(tokio::time::sleep_until(deadline.into())));
        }
        self.start_attempt(upstream).await;
        self.event_loop().await;
    }

    /// Runs an unrouted call on `upstream`.
    pub(crate) async fn run_with(mut self, upstream: Arc<Upstream>) {
        if let Some(deadline) = self.deadline {
            self.deadline_sleep = Some(Box::pin(tokio::time::sleep_until(deadline.into())));
        }
        self.open(upstream).await;
        self.event_loop().await;
    }

    pub(crate) async fn event_loop(mut self) {
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

    pub(crate) fn backoff_due(&mut self) -> Option<String> {
        let (sleep, _) = self.backoff.as_ref()?;
        if !sleep.is_elapsed() {
            return None;
        }
        self.backoff.take().map(|(_, key)| key)
    }

    pub(crate) fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Event> {
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

    pub(crate) fn handle(&mut self, event: Event) {
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

    pub(crate) fn upstream_headers(&mut self, response: Response<RecvStream>) {
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
    pub(crate) fn retry_possible(&self) -> bool {
        match (&self.routed, self.kind) {
            (Some(routed), Some(kind)) => {
                routed
                    .policy
                    .may_retry(kind, Failure::Transport, self.progress())
            }
            _ => false,
        }
    }

    pub(crate) fn progress(&self) -> Progress {
        Progress {
            attempts: self.attempts.len() as u32 + 1,
            committed: self.committed,
            sent_beyond_first: self.sent_beyond_first,
        }
    }

    /// Sends the held response headers: from now on the call is this attempt's.
    pub(crate) fn commit(&mut self) {
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

    pub(crate) fn upstream_data(&mut self, chunk: Bytes) {
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

    pub(crate) fn send_client(&mut self, capacity: usize) {
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

    pub(crate) fn upstream_trailers(&mut self, trailers: HeaderMap) {
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
    pub(crate) fn upstream_status(&mut self, status: Status, only: Option<Response<()>>) {
        self.upstream_status_with(status, only, None);
    }

    pub(crate) fn upstream_status_with(
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

    pub(crate) fn client_data(&mut self, chunk: Bytes) {
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

    pub(crate) fn send_upstream(&mut self, capacity: usize) {
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

    pub(crate) fn end_upstream_request(&mut self) {
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

    /// Ends the call with `status` from the data plane itself, resetting the upstream.
    pub(crate) fn abort_upstream_and_end(&mut self, status: Status, outcome: &'static str) {
        self.reset_upstream(outcome, status.code, &status.message);
        self.send_status(&status);
        self.client = ClientTx::Done;
        self.outcome = Some(Outcome {
            code: status.code,
            message: status.message,
        });
    }

    /// Ends the client's stream with `status`: trailers-only before headers, else trailers.
    pub(crate) fn send_status(&mut self, status: &Status) {
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

    pub(crate) fn finish(mut self) {
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
