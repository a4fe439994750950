//! What the data plane tells Python about finished calls: one record per routed call,
//! with the trace ids of its SERVER span and of each attempt's CLIENT span, preformatted
//! as hex so that Python builds trace store rows without formatting work.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use rand::Rng;

/// Unix time in nanoseconds.
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// A call's trace ids.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TraceIds {
    /// 32 hex digits; empty when the call is not traced.
    pub trace_id: String,
    /// The data plane's SERVER span (16 hex digits); empty when not tracing.
    pub server_span_id: String,
    /// The caller's span named by its `traceparent`, or empty (the SERVER span is a root).
    pub parent_span_id: String,
    /// The CLIENT span of the first attempt (later attempts get their own).
    pub client_span_id: String,
    pub sampled: bool,
}

/// A W3C `traceparent`: version 00, trace id, parent span id, flags.
pub fn parse_traceparent(value: &str) -> Option<(String, String, bool)> {
    let mut parts = value.trim().split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    if !hex(version, 2) || version == "ff" || !hex(trace, 32) || !hex(span, 16) || !hex(flags, 2) {
        return None;
    }
    if version == "00" && parts.next().is_some() {
        return None;
    }
    if trace.bytes().all(|b| b == b'0') || span.bytes().all(|b| b == b'0') {
        return None;
    }
    let sampled = u8::from_str_radix(flags, 16).ok()? & 1 == 1;
    Some((trace.to_string(), span.to_string(), sampled))
}

pub fn format_traceparent(trace_id: &str, span_id: &str, sampled: bool) -> String {
    format!(
        "00-{trace_id}-{span_id}-{}",
        if sampled { "01" } else { "00" }
    )
}

/// A random non-zero span id, as 16 hex digits.
pub fn new_span_id() -> String {
    let id: u64 = rand::rng().random_range(1..=u64::MAX);
    format!("{id:016x}")
}

/// A random non-zero trace id, as 32 hex digits.
pub fn new_trace_id() -> String {
    let id: u128 = rand::rng().random_range(1..=u128::MAX);
    format!("{id:032x}")
}

impl TraceIds {
    /// The ids of a call with this incoming `traceparent` (if any). Tracing off: the
    /// caller's trace id only (events still name it), no span of the data plane's own.
    pub fn for_call(traceparent: Option<&str>, tracing: bool) -> TraceIds {
        let parent = traceparent.and_then(parse_traceparent);
        if !tracing {
            return TraceIds {
                trace_id: parent.as_ref().map(|p| p.0.clone()).unwrap_or_default(),
                sampled: false,
                ..TraceIds::default()
            };
        }
        match parent {
            Some((trace_id, parent_span_id, sampled)) => TraceIds {
                trace_id,
                server_span_id: new_span_id(),
                parent_span_id,
                client_span_id: new_span_id(),
                sampled,
            },
            None => TraceIds {
                trace_id: new_trace_id(),
                server_span_id: new_span_id(),
                parent_span_id: String::new(),
                client_span_id: new_span_id(),
                sampled: true,
            },
        }
    }
}

/// How one attempt ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attempt {
    pub replica: String,
    /// `ok`, `status` (the plugin's own non-OK status), `never_reached`, `transport`,
    /// `per_try_timeout`, `cancelled` (by the caller), `deadline`, `removed`, `shutdown`,
    /// `too_large`.
    pub outcome: &'static str,
    /// The attempt's gRPC status as the data plane saw it.
    pub code: u32,
    pub start_ns: u64,
    pub end_ns: u64,
    /// The attempt's CLIENT span (empty when not tracing).
    pub span_id: String,
    /// What failed, for failed attempts (for example `connection refused`).
    pub detail: String,
    /// The upstream's CLIENT span attributes (from `set_upstream`).
    pub attributes: Option<crate::spans::Attributes>,
}

/// One finished routed call.
#[derive(Debug)]
pub struct Record<C> {
    /// The decision's context object (`None` for calls refused before or by the decision).
    pub context: Option<C>,
    pub listener: Arc<str>,
    pub caller: Arc<str>,
    pub principal: Arc<str>,
    pub path: String,
    pub call_id: String,
    pub code: u32,
    pub message: String,
    /// Request messages received from the client.
    pub requests: u64,
    /// Response messages forwarded to the client.
    pub responses: u64,
    pub start_ns: u64,
    /// When the decision returned (0: no decision was made).
    pub decided_ns: u64,
    pub end_ns: u64,
    pub trace: TraceIds,
    pub attempts: Vec<Attempt>,
    /// The replica of the last attempt (empty: none was tried).
    pub upstream: String,
    /// The decision's SERVER span attributes.
    pub span_attributes: Option<crate::spans::Attributes>,
}

/// Finished-call records waiting for Python, at most `limit` (the oldest dropped first).
#[derive(Debug)]
pub struct Records<C> {
    queue: Mutex<VecDeque<Record<C>>>,
    limit: usize,
    dropped: AtomicU64,
}

impl<C> Records<C> {
    pub fn new(limit: usize) -> Self {
        Records {
            queue: Mutex::new(VecDeque::new()),
            limit: limit.max(1),
            dropped: AtomicU64::new(0),
        }
    }

    pub fn push(&self, record: Record<C>) {
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if queue.len() >= self.limit {
            queue.pop_front();
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        queue.push_back(record);
    }

    /// Every record waiting, oldest first.
    pub fn take(&self) -> Vec<Record<C>> {
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::take(&mut *queue).into()
    }

    pub fn len(&self) -> usize {
        self.queue.lock().map(|q| q.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Records dropped because nobody took them in time.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// Short unique call ids: a per-process random prefix and a counter (as the router's).
#[derive(Debug)]
pub struct CallIds {
    prefix: String,
    next: AtomicU64,
}

impl Default for CallIds {
    fn default() -> Self {
        CallIds {
            prefix: format!("{:08x}", rand::rng().random::<u32>()),
            next: AtomicU64::new(1),
        }
    }
}

impl CallIds {
    pub fn next(&self) -> String {
        format!(
            "{}-{}",
            self.prefix,
            self.next.fetch_add(1, Ordering::Relaxed)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    #[test]
    fn traceparent_parses_and_formats() {
        let (trace, span, sampled) = parse_traceparent(TP).unwrap();
        assert_eq!(trace, "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(span, "b7ad6b7169203331");
        assert!(sampled);
        assert_eq!(format_traceparent(&trace, &span, sampled), TP);
        assert!(!parse_traceparent(&TP.replace("-01", "-00")).unwrap().2);
        for bad in [
            "",
            "00-abc-def-01",
            &TP.replace("0af7", "0AF7"),
            &format!("{TP}-x"),
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            &TP.replacen("00", "ff", 1),
        ] {
            assert_eq!(parse_traceparent(bad), None, "{bad}");
        }
    }

    #[test]
    fn server_span_is_a_child_of_the_caller_or_a_root() {
        let child = TraceIds::for_call(Some(TP), true);
        assert_eq!(child.trace_id, "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(child.parent_span_id, "b7ad6b7169203331");
        assert_eq!(child.server_span_id.len(), 16);
        assert!(child.sampled);
        let root = TraceIds::for_call(None, true);
        assert_eq!(
            (
                root.trace_id.len(),
                root.parent_span_id.as_str(),
                root.sampled
            ),
            (32, "", true)
        );
        let off = TraceIds::for_call(Some(TP), false);
        assert_eq!(off.trace_id, child.trace_id);
        assert_eq!((off.server_span_id.as_str(), off.sampled), ("", false));
        assert_eq!(TraceIds::for_call(None, false), TraceIds::default());
        assert_ne!(new_span_id(), new_span_id());
    }

    fn record(n: u64) -> Record<u64> {
        Record {
            context: Some(n),
            listener: "l".into(),
            caller: "".into(),
            principal: "p".into(),
            path: "/s/m".into(),
            call_id: n.to_string(),
            code: 0,
            message: String::new(),
            requests: 1,
            responses: 1,
            start_ns: n,
            decided_ns: n,
            end_ns: n,
            trace: TraceIds::default(),
            attempts: vec![],
            upstream: String::new(),
            span_attributes: None,
        }
    }

    #[test]
    fn records_are_taken_in_order_and_bounded() {
        let records = Records::new(3);
        for n in 0..5 {
            records.push(record(n));
        }
        assert_eq!(records.len(), 3);
        assert_eq!(records.dropped(), 2);
        let taken: Vec<_> = records
            .take()
            .into_iter()
            .map(|r| r.context.unwrap())
            .collect();
        assert_eq!(taken, vec![2, 3, 4]);
        assert!(records.is_empty());
    }

    #[test]
    fn call_ids_are_unique_with_one_prefix() {
        let ids = CallIds::default();
        let (a, b) = (ids.next(), ids.next());
        assert_ne!(a, b);
        assert_eq!(a.split('-').next(), b.split('-').next());
        assert!(a.ends_with("-1") && b.ends_with("-2"));
    }
}
