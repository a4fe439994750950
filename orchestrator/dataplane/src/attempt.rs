//! Attempts: opening a stream on an upstream, how a failed attempt bears on retrying,
//! retries with backoff on the replica the control plane picks, and each attempt's
//! outcome for the record.

use std::sync::Arc;

use h2::Reason;
use http::{Method, Request};

use crate::call::{Call, ClientTx, Outcome, Try};
use crate::decision::Decider;
use crate::forward::header;
use crate::grpc::{self, code, FrameScanner, Status};
use crate::pool::Upstream;
use crate::records::{self, now_ns, Attempt};
use crate::retry::{Failure, Progress};
use std::sync::atomic::Ordering;

/// How an h2 error from the upstream bears on retrying.
pub(crate) fn classify(error: &h2::Error) -> Failure {
    if error.is_go_away() && error.is_remote() {
        // h2 fails only the streams above the GOAWAY's last stream id at once: unprocessed.
        return Failure::NeverReached;
    }
    if error.is_reset() && error.is_remote() && error.reason() == Some(Reason::REFUSED_STREAM) {
        return Failure::NeverReached;
    }
    Failure::Transport
}

pub(crate) fn describe(error: &h2::Error) -> String {
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

impl<D: Decider> Call<D> {
    pub(crate) async fn start_attempt(&mut self, key: String) {
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
    pub(crate) async fn open(&mut self, upstream: Arc<Upstream>) {
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

    // -- failures, retries, endings ------------------------------------------

    pub(crate) fn current_key(&self) -> String {
        match (&self.attempt, &self.routed) {
            (Some(attempt), _) => attempt.upstream.key.clone(),
            (None, Some(routed)) => routed.current.clone(),
            _ => String::new(),
        }
    }

    pub(crate) fn per_try_timeout(&mut self) {
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
    pub(crate) fn transport_failure(
        &mut self,
        detail: String,
        failure: Failure,
        outcome: &'static str,
    ) {
        let key = self.current_key();
        if let Some(attempt) = &mut self.attempt {
            attempt.tx.send_reset(Reason::CANCEL);
            attempt.upstream.outliers.failure();
        }
        if self.result_forwarded() {
            // The sidecar went away after the stream's last message by contract: the
            // caller has all of it. The attempt still counts as the replica's failure.
            self.end_attempt(outcome, code::OK, detail);
            self.held = None;
            let status = Status::new(code::OK, "");
            self.send_status(&status);
            self.client = ClientTx::Done;
            self.outcome = Some(Outcome {
                code: status.code,
                message: status.message,
            });
            return;
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

    /// Whether the response message that ends this route's stream was forwarded whole.
    fn result_forwarded(&self) -> bool {
        let Some(tag) = self.dp.config.complete_after.get(self.path.path()) else {
            return false;
        };
        self.to_client.is_none()
            && self.scan_up.messages > 0
            && self.scan_up.at_boundary()
            && self.scan_up.last_first_byte == Some(*tag)
            && matches!(self.client, ClientTx::Streaming(_))
    }

    /// An attempt failed: retry it elsewhere if that is safe, else end the call.
    /// `status`: what the client gets if not retried (`None`: ask `upstream_failed`).
    pub(crate) fn failed(
        &mut self,
        failure: Failure,
        key: &str,
        detail: String,
        status: Option<Status>,
    ) {
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
    pub(crate) fn progress_after(&self) -> Progress {
        Progress {
            attempts: self.attempts.len() as u32,
            committed: self.committed,
            sent_beyond_first: self.sent_beyond_first,
        }
    }

    pub(crate) fn transport_status(&self, key: &str, detail: &str) -> Status {
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

    pub(crate) fn schedule_retry(&mut self, failed: &str, reason: String, status: Option<Status>) {
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

    pub(crate) fn end_attempt(&mut self, outcome: &'static str, code: u32, detail: String) {
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

    pub(crate) fn record_attempt(
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

    pub(crate) fn reset_upstream(&mut self, outcome: &'static str, code: u32, detail: &str) {
        if let Some(attempt) = &mut self.attempt {
            attempt.tx.send_reset(Reason::CANCEL);
        }
        self.end_attempt(outcome, code, detail.to_string());
        self.backoff = None;
    }
}
