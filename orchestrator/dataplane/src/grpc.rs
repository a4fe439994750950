//! gRPC over HTTP/2 without a codec: length-prefixed message framing, `grpc-timeout`,
//! status codes, `grpc-message` percent-encoding and the trailers that end a call.
//!
//! The data plane never decodes a payload; it only reads the 5-byte prefixes
//! that delimit messages (to count them and enforce the size limit) and, for
//! a routed call, collects the first message for the Python decision.

use std::time::Duration;

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use base64::Engine;
use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};

/// gRPC status codes the data plane produces itself.
pub mod code {
    pub const OK: u32 = 0;
    pub const CANCELLED: u32 = 1;
    pub const UNKNOWN: u32 = 2;
    pub const INVALID_ARGUMENT: u32 = 3;
    pub const DEADLINE_EXCEEDED: u32 = 4;
    pub const RESOURCE_EXHAUSTED: u32 = 8;
    pub const UNIMPLEMENTED: u32 = 12;
    pub const INTERNAL: u32 = 13;
    pub const UNAVAILABLE: u32 = 14;
}

/// The canonical name of a gRPC status code (`NOT_FOUND`).
pub fn code_name(code: u32) -> &'static str {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    NAMES.get(code as usize).copied().unwrap_or("UNKNOWN")
}

/// Bytes of a message's prefix: a compressed-flag byte and a big-endian u32 length.
pub const PREFIX: usize = 5;

/// A status the data plane ends a call with: code, message and optional rich details
/// (an encoded `google.rpc.Status`, sent as `grpc-status-details-bin`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    pub code: u32,
    pub message: String,
    pub details: Option<Bytes>,
}

impl Status {
    pub fn new(code: u32, message: impl Into<String>) -> Self {
        Status {
            code,
            message: message.into(),
            details: None,
        }
    }

    pub fn with_details(mut self, details: Option<Bytes>) -> Self {
        self.details = details.filter(|d| !d.is_empty());
        self
    }

    /// The trailers that carry this status.
    pub fn trailers(&self) -> HeaderMap {
        let mut map = HeaderMap::with_capacity(3);
        self.write_to(&mut map);
        map
    }

    fn write_to(&self, map: &mut HeaderMap) {
        map.insert("grpc-status", HeaderValue::from(self.code));
        if !self.message.is_empty() {
            let encoded = percent_encode(&self.message);
            if let Ok(value) = HeaderValue::from_str(&encoded) {
                map.insert("grpc-message", value);
            }
        }
        if let Some(details) = &self.details {
            if let Ok(value) = HeaderValue::from_str(&STANDARD_NO_PAD.encode(details)) {
                map.insert("grpc-status-details-bin", value);
            }
        }
    }

    /// A trailers-only response (HTTP 200, headers ending the stream) for this status.
    pub fn trailers_only(&self) -> Response<()> {
        let mut response = Response::new(());
        *response.status_mut() = StatusCode::OK;
        let headers = response.headers_mut();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        self.write_to(headers);
        response
    }

    /// The status a trailer map (or the headers of a trailers-only response) carries.
    pub fn from_trailers(map: &HeaderMap) -> Option<Status> {
        let code = map.get("grpc-status")?.to_str().ok()?.trim().parse().ok()?;
        let message = map
            .get("grpc-message")
            .map(|v| percent_decode(v.as_bytes()))
            .unwrap_or_default();
        let details = map
            .get("grpc-status-details-bin")
            .and_then(|v| decode_bin(v.as_bytes()));
        Some(Status {
            code,
            message,
            details,
        })
    }
}

/// `grpc-message` encoding: printable ASCII except `%` as is, every other byte `%XX`.
pub fn percent_encode(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for &b in message.as_bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The inverse of [`percent_encode`]; malformed escapes are kept as they are.
pub fn percent_decode(raw: &[u8]) -> String {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'%' && i + 2 < raw.len() {
            let hex = std::str::from_utf8(&raw[i + 1..i + 3]).ok();
            if let Some(v) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(raw[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A `-bin` metadata value: base64 with or without padding.
pub fn decode_bin(raw: &[u8]) -> Option<Bytes> {
    let trimmed: Vec<u8> = raw.iter().copied().filter(|b| *b != b'=').collect();
    STANDARD_NO_PAD.decode(trimmed).ok().map(Bytes::from)
}

/// Encodes a `-bin` metadata value (padded, as grpc-core sends it).
pub fn encode_bin(value: &[u8]) -> String {
    STANDARD.encode(value)
}

/// Parses `grpc-timeout`: up to 8 digits and a unit (`H M S m u n`).
pub fn parse_timeout(raw: &[u8]) -> Option<Duration> {
    if raw.len() < 2 || raw.len() > 9 {
        return None;
    }
    let (digits, unit) = raw.split_at(raw.len() - 1);
    if !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit[0] {
        b'H' => Duration::from_secs(n.saturating_mul(3600)),
        b'M' => Duration::from_secs(n.saturating_mul(60)),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Formats a `grpc-timeout` value: the finest unit whose count fits in 8 digits.
pub fn format_timeout(d: Duration) -> String {
    const MAX: u128 = 99_999_999;
    let nanos = d.as_nanos();
    for (unit, per) in [
        ('n', 1u128),
        ('u', 1_000),
        ('m', 1_000_000),
        ('S', 1_000_000_000),
    ] {
        // Round up so the upstream never gets more time than the caller has.
        let count = nanos.div_ceil(per);
        if count <= MAX {
            return format!("{}{}", count.max(1), unit);
        }
    }
    let minutes = nanos.div_ceil(60_000_000_000);
    if minutes <= MAX {
        return format!("{minutes}M");
    }
    format!("{}H", nanos.div_ceil(3_600_000_000_000).min(MAX))
}

/// Something wrong with a message's framing.
#[derive(Debug, PartialEq, Eq)]
pub enum FrameError {
    /// A message longer than the limit: (its length, the limit).
    TooLarge(usize, usize),
}

/// Tracks message boundaries in a byte stream without copying it.
///
/// Fed every DATA chunk in order, it counts the messages that started and
/// checks each one's declared length against the limit before its body arrives.
#[derive(Debug)]
pub struct FrameScanner {
    limit: usize,
    header: [u8; PREFIX],
    header_len: usize,
    body_left: usize,
    /// Messages whose prefix has been seen.
    pub messages: u64,
    /// The first byte of the latest message's body (its first field's tag), if it had one.
    pub last_first_byte: Option<u8>,
    want_first: bool,
}

impl FrameScanner {
    pub fn new(limit: usize) -> Self {
        FrameScanner {
            limit,
            header: [0; PREFIX],
            header_len: 0,
            body_left: 0,
            messages: 0,
            last_first_byte: None,
            want_first: false,
        }
    }

    /// Scans one chunk.
    pub fn feed(&mut self, mut chunk: &[u8]) -> Result<(), FrameError> {
        while !chunk.is_empty() {
            if self.body_left > 0 {
                if self.want_first {
                    self.last_first_byte = Some(chunk[0]);
                    self.want_first = false;
                }
                let n = self.body_left.min(chunk.len());
                self.body_left -= n;
                chunk = &chunk[n..];
                continue;
            }
            let n = (PREFIX - self.header_len).min(chunk.len());
            self.header[self.header_len..self.header_len + n].copy_from_slice(&chunk[..n]);
            self.header_len += n;
            chunk = &chunk[n..];
            if self.header_len == PREFIX {
                self.header_len = 0;
                let len = u32::from_be_bytes([
                    self.header[1],
                    self.header[2],
                    self.header[3],
                    self.header[4],
                ]) as usize;
                if len > self.limit {
                    return Err(FrameError::TooLarge(len, self.limit));
                }
                self.messages += 1;
                self.body_left = len;
                self.last_first_byte = None;
                self.want_first = len > 0;
            }
        }
        Ok(())
    }

    /// True between messages (no partial prefix or body pending).
    pub fn at_boundary(&self) -> bool {
        self.header_len == 0 && self.body_left == 0
    }
}

/// Collects the first message of a request: its flag and body, and any bytes after it.
#[derive(Debug, Default)]
pub struct FirstMessage {
    buf: BytesMut,
}

/// The first message, complete.
#[derive(Debug, PartialEq, Eq)]
pub struct Complete {
    pub compressed: bool,
    pub body: Bytes,
    /// Bytes that followed the first message in the same chunks (the next messages).
    pub rest: Bytes,
}

impl FirstMessage {
    /// Adds a chunk; returns the message once it is complete.
    pub fn push(&mut self, chunk: &[u8], limit: usize) -> Result<Option<Complete>, FrameError> {
        self.buf.extend_from_slice(chunk);
        if self.buf.len() < PREFIX {
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if len > limit {
            return Err(FrameError::TooLarge(len, limit));
        }
        if self.buf.len() < PREFIX + len {
            self.buf.reserve(PREFIX + len - self.buf.len());
            return Ok(None);
        }
        let mut all = std::mem::take(&mut self.buf).freeze();
        let compressed = all[0] == 1;
        let mut body = all.split_to(PREFIX + len);
        let _ = body.split_to(PREFIX);
        Ok(Some(Complete {
            compressed,
            body,
            rest: all,
        }))
    }

    /// Bytes buffered so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

/// Frames `body` as one uncompressed message.
pub fn frame(body: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(PREFIX + body.len());
    out.extend_from_slice(&[0]);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(body);
    out.freeze()
}

/// Whether a request header is the transport's own and must not be forwarded as is.
///
/// `te`, `content-type` (re-set), `user-agent`, `grpc-*` (re-derived: `grpc-timeout`
/// from the remaining deadline) except the message encodings, which the upstream needs
/// to read compressed messages, and the mesh's own `sidemesh-*` metadata, which a
/// client must never be able to forge. (h2 keeps pseudo headers apart.)
pub fn is_hop_header(name: &HeaderName) -> bool {
    let n = name.as_str();
    matches!(
        n,
        "te" | "content-type" | "user-agent" | "connection" | "host"
    ) || (n.starts_with("grpc-") && !matches!(n, "grpc-encoding" | "grpc-accept-encoding"))
        || n.starts_with("sidemesh-")
}

/// The W3C trace context headers.
pub fn is_trace_header(name: &HeaderName) -> bool {
    matches!(name.as_str(), "traceparent" | "tracestate" | "baggage")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_parse_in_every_unit() {
        assert_eq!(parse_timeout(b"1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_timeout(b"2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse_timeout(b"3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse_timeout(b"250m"), Some(Duration::from_millis(250)));
        assert_eq!(
            parse_timeout(b"99999999u"),
            Some(Duration::from_micros(99_999_999))
        );
        assert_eq!(parse_timeout(b"5n"), Some(Duration::from_nanos(5)));
    }

    #[test]
    fn malformed_timeouts_are_refused() {
        for raw in [&b""[..], b"S", b"10", b"1x", b"123456789S", b"-1S", b"1.5S"] {
            assert_eq!(parse_timeout(raw), None, "{raw:?}");
        }
    }

    #[test]
    fn timeouts_format_round_up_and_fit_eight_digits() {
        assert_eq!(format_timeout(Duration::from_nanos(1500)), "1500n");
        assert_eq!(format_timeout(Duration::from_millis(250)), "250000u");
        assert_eq!(format_timeout(Duration::from_secs(200)), "200000m");
        assert_eq!(format_timeout(Duration::from_secs(1_000_000)), "1000000S");
        assert_eq!(format_timeout(Duration::ZERO), "1n");
        for d in [
            Duration::from_nanos(123_456_789),
            Duration::from_secs(86_400 * 400),
        ] {
            let text = format_timeout(d);
            assert!(text.len() <= 9, "{text}");
            assert!(parse_timeout(text.as_bytes()).unwrap() >= d);
        }
    }

    #[test]
    fn messages_percent_encode_both_ways() {
        let message = "plugin 'x' 100% gone\néé";
        let encoded = percent_encode(message);
        assert_eq!(encoded, "plugin 'x' 100%25 gone%0A%C3%A9%C3%A9");
        assert_eq!(percent_decode(encoded.as_bytes()), message);
        assert_eq!(percent_decode(b"50%"), "50%");
        assert_eq!(percent_decode(b"%zz"), "%zz");
    }

    #[test]
    fn status_round_trips_through_trailers() {
        let status = Status::new(code::UNAVAILABLE, "gone: retry")
            .with_details(Some(Bytes::from_static(b"\x08\x0e\x12\x01x")));
        let trailers = status.trailers();
        assert_eq!(trailers["grpc-status"], "14");
        assert_eq!(Status::from_trailers(&trailers), Some(status.clone()));
        let only = status.trailers_only();
        assert_eq!(only.headers()["content-type"], "application/grpc");
        assert_eq!(Status::from_trailers(only.headers()), Some(status));
        assert_eq!(Status::new(0, "").trailers().len(), 1);
        assert_eq!(
            Status::new(2, "x").with_details(Some(Bytes::new())).details,
            None
        );
    }

    #[test]
    fn bin_values_decode_with_or_without_padding() {
        assert_eq!(
            decode_bin(b"AAE=").unwrap(),
            Bytes::from_static(b"\x00\x01")
        );
        assert_eq!(decode_bin(b"AAE").unwrap(), Bytes::from_static(b"\x00\x01"));
        assert_eq!(encode_bin(b"\x00\x01"), "AAE=");
        assert!(decode_bin(b"!!").is_none());
    }

    #[test]
    fn scanner_counts_messages_split_anywhere() {
        let mut stream = Vec::new();
        for body in [&b"hello"[..], b"", b"0123456789"] {
            stream.extend_from_slice(&frame(body));
        }
        for split in 0..stream.len() {
            let mut scanner = FrameScanner::new(100);
            scanner.feed(&stream[..split]).unwrap();
            scanner.feed(&stream[split..]).unwrap();
            assert_eq!(scanner.messages, 3);
            assert!(scanner.at_boundary());
        }
        let mut one_by_one = FrameScanner::new(100);
        for b in &stream {
            one_by_one.feed(std::slice::from_ref(b)).unwrap();
        }
        assert_eq!(one_by_one.messages, 3);
    }

    #[test]
    fn scanner_remembers_the_first_byte_of_the_latest_message() {
        let mut stream = Vec::new();
        for body in [&b"\x0aprogress"[..], b"\x1aresult"] {
            stream.extend_from_slice(&frame(body));
        }
        for split in 0..stream.len() {
            let mut scanner = FrameScanner::new(100);
            scanner.feed(&stream[..split]).unwrap();
            scanner.feed(&stream[split..]).unwrap();
            assert_eq!(scanner.last_first_byte, Some(0x1a));
        }
        let mut empty = FrameScanner::new(100);
        empty.feed(&frame(b"\x1ax")).unwrap();
        empty.feed(&frame(b"")).unwrap();
        assert_eq!(empty.last_first_byte, None); // an empty message has no first field
    }

    #[test]
    fn scanner_refuses_a_message_over_the_limit_from_its_prefix() {
        let mut scanner = FrameScanner::new(4);
        assert_eq!(scanner.feed(&frame(b"1234")[..]), Ok(()));
        assert_eq!(scanner.feed(&[0, 0, 0]), Ok(()));
        assert_eq!(scanner.feed(&[0, 5]), Err(FrameError::TooLarge(5, 4)));
    }

    #[test]
    fn first_message_collects_across_chunks_and_keeps_the_rest() {
        let mut stream = frame(b"first").to_vec();
        stream.extend_from_slice(&frame(b"second"));
        let mut first = FirstMessage::default();
        assert_eq!(first.push(&stream[..3], 100), Ok(None));
        assert_eq!(first.push(&stream[3..7], 100), Ok(None));
        let done = first.push(&stream[7..], 100).unwrap().unwrap();
        assert_eq!(done.body, Bytes::from_static(b"first"));
        assert!(!done.compressed);
        assert_eq!(done.rest, frame(b"second"));
        let mut big = FirstMessage::default();
        assert_eq!(
            big.push(&frame(b"toolong"), 3),
            Err(FrameError::TooLarge(7, 3))
        );
    }

    #[test]
    fn hop_headers_are_the_transport_and_the_mesh_own() {
        for name in [
            "te",
            "content-type",
            "user-agent",
            "grpc-timeout",
            "grpc-previous-rpc-attempts",
            "sidemesh-principal",
            "sidemesh-caller",
        ] {
            assert!(is_hop_header(&HeaderName::from_static(name)), "{name}");
        }
        for name in [
            "x-custom",
            "authorization",
            "traceparent",
            "custom-bin",
            "grpc-encoding",
            "grpc-accept-encoding",
        ] {
            assert!(!is_hop_header(&HeaderName::from_static(name)), "{name}");
        }
    }
}
