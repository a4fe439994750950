//! The data plane's own spans, as trace store rows made without Python.
//!
//! Each sampled routed call is one SERVER span (child of the caller's `traceparent`,
//! or a root) and one CLIENT span per attempt (children of the SERVER span), with
//! the semantic-convention attributes the router's spans had. A row is the trace
//! store's (`orchestrator/_trace_store.py` `span_rows`): trace id, span id, parent id,
//! name, service, OTLP kind, start/end unix ns, error, status message, attributes as a
//! JSON object of strings.

use std::collections::VecDeque;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::grpc::code_name;
use crate::records::Record;

/// OTLP span kinds.
pub const SERVER: u8 = 2;
pub const CLIENT: u8 = 3;

/// JSON object members (`"k":"v",...`), escaped once and reused by every call.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Attributes(pub Arc<str>);

impl Attributes {
    pub fn new<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        let mut out = String::new();
        for (key, value) in pairs {
            member(&mut out, key, value);
        }
        Attributes(out.into())
    }
}

fn escape(out: &mut String, text: &str) {
    out.push('"');
    if !text.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20) {
        out.push_str(text);
        out.push('"');
        return;
    }
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn member(out: &mut String, key: &str, value: &str) {
    if !out.is_empty() {
        out.push(',');
    }
    escape(out, key);
    out.push(':');
    escape(out, value);
}

/// One trace store row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpanRow {
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: String,
    pub name: Arc<str>,
    pub service: Arc<str>,
    pub kind: u8,
    pub start_ns: u64,
    pub end_ns: u64,
    pub error: bool,
    pub status_message: String,
    pub attributes: String,
}

fn status_message(code: u32, message: &str) -> String {
    if code == 0 {
        String::new()
    } else {
        format!("{}: {message}", code_name(code))
    }
}

/// The rows of one finished call: its SERVER span, then a CLIENT span per attempt.
pub fn rows<C>(record: &Record<C>, service: &Arc<str>) -> Vec<SpanRow> {
    let trace = &record.trace;
    if trace.server_span_id.is_empty() || !trace.sampled {
        return Vec::new();
    }
    let (rpc_service, method) = record
        .path
        .trim_start_matches('/')
        .split_once('/')
        .unwrap_or((&record.path, ""));
    let name: Arc<str> = record.path.trim_start_matches('/').into();
    let code = record.code.to_string();
    let responses = record.responses.to_string();
    let mut common = String::with_capacity(96);
    member(&mut common, "rpc.system", "grpc");
    member(&mut common, "rpc.service", rpc_service);
    member(&mut common, "rpc.method", method);
    member(&mut common, "sidemesh.call_id", &record.call_id);
    let mut server = common.clone();
    if !record.caller.is_empty() {
        member(&mut server, "sidemesh.caller", &record.caller);
    }
    if let Some(extra) = record.span_attributes.as_ref().filter(|a| !a.0.is_empty()) {
        server.push(',');
        server.push_str(&extra.0);
    }
    member(&mut server, "rpc.grpc.status_code", &code);
    member(&mut server, "sidemesh.messages.sent", &responses);
    let mut out = Vec::with_capacity(1 + record.attempts.len());
    out.push(SpanRow {
        trace_id: trace.trace_id.clone(),
        span_id: trace.server_span_id.clone(),
        parent_span_id: trace.parent_span_id.clone(),
        name: name.clone(),
        service: service.clone(),
        kind: SERVER,
        start_ns: record.start_ns,
        end_ns: record.end_ns,
        error: record.code != 0,
        status_message: status_message(record.code, &record.message),
        attributes: format!("{{{server}}}"),
    });
    let last = record.attempts.len().saturating_sub(1);
    for (i, attempt) in record.attempts.iter().enumerate() {
        if attempt.span_id.is_empty() {
            continue; // never left the data plane: no stream, no CLIENT span
        }
        // The last attempt's ending is the call's; earlier ones failed their own way.
        let (code, message, sent) = if i == last {
            (record.code, record.message.as_str(), record.responses)
        } else {
            (attempt.code, attempt.detail.as_str(), 0)
        };
        let mut client = common.clone();
        if let Some(extra) = attempt.attributes.as_ref().filter(|a| !a.0.is_empty()) {
            client.push(',');
            client.push_str(&extra.0);
        }
        member(&mut client, "rpc.grpc.status_code", &code.to_string());
        member(&mut client, "sidemesh.messages.sent", &sent.to_string());
        member(&mut client, "sidemesh.attempt.outcome", attempt.outcome);
        out.push(SpanRow {
            trace_id: trace.trace_id.clone(),
            span_id: attempt.span_id.clone(),
            parent_span_id: trace.server_span_id.clone(),
            name: name.clone(),
            service: service.clone(),
            kind: CLIENT,
            start_ns: attempt.start_ns,
            end_ns: attempt.end_ns,
            error: code != 0,
            status_message: status_message(code, message),
            attributes: format!("{{{client}}}"),
        });
    }
    out
}

/// Rows waiting for Python, at most `limit` (the oldest dropped first).
#[derive(Debug)]
pub struct Rows {
    queue: Mutex<VecDeque<SpanRow>>,
    limit: usize,
    dropped: AtomicU64,
}

impl Rows {
    pub fn new(limit: usize) -> Self {
        Rows {
            queue: Mutex::new(VecDeque::new()),
            limit: limit.max(1),
            dropped: AtomicU64::new(0),
        }
    }

    pub fn extend(&self, rows: Vec<SpanRow>) {
        if rows.is_empty() {
            return;
        }
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        for row in rows {
            if queue.len() >= self.limit {
                queue.pop_front();
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
            queue.push_back(row);
        }
    }

    pub fn take(&self) -> Vec<SpanRow> {
        std::mem::take(&mut *self.queue.lock().unwrap_or_else(|e| e.into_inner())).into()
    }

    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::{Attempt, TraceIds};

    fn record(code: u32, attempts: Vec<Attempt>) -> Record<()> {
        Record {
            context: None,
            listener: "clients".into(),
            caller: "files".into(),
            principal: "plugin:files".into(),
            path: "/sidemesh.v1.ToolService/CallTool".into(),
            call_id: "ab-1".into(),
            code,
            message: if code == 0 {
                String::new()
            } else {
                "gone \"now\"".into()
            },
            requests: 1,
            responses: 2,
            start_ns: 10,
            decided_ns: 11,
            end_ns: 20,
            trace: TraceIds {
                trace_id: "t".repeat(32),
                server_span_id: "s".repeat(16),
                parent_span_id: "p".repeat(16),
                client_span_id: String::new(),
                sampled: true,
            },
            attempts,
            upstream: "a".into(),
            span_attributes: Some(Attributes::new([("sidemesh.target", "files/read")])),
        }
    }

    fn attempt(replica: &str, outcome: &'static str, code: u32, span: &str) -> Attempt {
        Attempt {
            replica: replica.into(),
            outcome,
            code,
            start_ns: 12,
            end_ns: 19,
            span_id: span.into(),
            detail: "refused".into(),
            attributes: Some(Attributes::new([
                ("server.address", "unix:/a.sock"),
                ("sidemesh.replica", "0"),
            ])),
        }
    }

    #[test]
    fn one_server_span_and_a_client_span_per_attempt_that_left() {
        let service: Arc<str> = "sidemesh-orchestrator".into();
        let attempts = vec![
            attempt("a", "never_reached", 14, ""),
            attempt("b", "status", 14, &"1".repeat(16)),
            attempt("c", "ok", 0, &"2".repeat(16)),
        ];
        let rows = rows(&record(0, attempts), &service);
        assert_eq!(rows.len(), 3);
        let server = &rows[0];
        assert_eq!(
            (server.kind, server.parent_span_id.as_str(), &*server.name),
            (
                SERVER,
                "pppppppppppppppp",
                "sidemesh.v1.ToolService/CallTool"
            )
        );
        assert_eq!(
            server.attributes,
            r#"{"rpc.system":"grpc","rpc.service":"sidemesh.v1.ToolService","rpc.method":"CallTool","sidemesh.call_id":"ab-1","sidemesh.caller":"files","sidemesh.target":"files/read","rpc.grpc.status_code":"0","sidemesh.messages.sent":"2"}"#
        );
        assert!(!server.error && server.status_message.is_empty());
        let (failed, ok) = (&rows[1], &rows[2]);
        assert_eq!(
            (failed.kind, failed.parent_span_id.as_str()),
            (CLIENT, "ssssssssssssssss")
        );
        assert!(failed.error && failed.status_message == "UNAVAILABLE: refused");
        assert!(failed
            .attributes
            .contains(r#""server.address":"unix:/a.sock""#));
        assert!(ok.attributes.ends_with(r#""rpc.grpc.status_code":"0","sidemesh.messages.sent":"2","sidemesh.attempt.outcome":"ok"}"#));
    }

    #[test]
    fn errors_name_their_code_and_unsampled_calls_have_no_rows() {
        let service: Arc<str> = "svc".into();
        let rows_ = rows(&record(5, vec![]), &service);
        assert_eq!(rows_[0].status_message, "NOT_FOUND: gone \"now\"");
        let mut unsampled = record(0, vec![]);
        unsampled.trace.sampled = false;
        assert!(rows(&unsampled, &service).is_empty());
    }

    #[test]
    fn json_is_escaped() {
        let a = Attributes::new([("k\"", "a\\b\n\u{1}é")]);
        assert_eq!(&*a.0, r#""k\"":"a\\b\n\u0001é""#);
    }

    #[test]
    fn rows_are_cheap() {
        let service: Arc<str> = "svc".into();
        let record = record(0, vec![attempt("c", "ok", 0, &"2".repeat(16))]);
        let started = std::time::Instant::now();
        for _ in 0..10_000 {
            assert_eq!(rows(&record, &service).len(), 2);
        }
        // A generous bound (debug build, shared CI machine); release builds take ~1 us.
        let per_call = started.elapsed() / 10_000;
        println!("span rows: {per_call:?} per call");
        assert!(
            per_call < std::time::Duration::from_micros(200),
            "{per_call:?}"
        );
    }

    #[test]
    fn rows_are_bounded() {
        let rows_ = Rows::new(2);
        let service: Arc<str> = "svc".into();
        rows_.extend(rows(
            &record(
                0,
                vec![attempt("c", "ok", 0, "x"), attempt("d", "ok", 0, "y")],
            ),
            &service,
        ));
        assert_eq!((rows_.take().len(), rows_.dropped()), (2, 1));
    }
}
