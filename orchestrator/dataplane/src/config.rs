//! The data plane's configuration: routed methods, limits, where unrouted calls go.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use crate::grpc::{code, Status};

/// How a routed method's messages flow (the multicallable kind the sidecar is called with).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    UnaryUnary,
    UnaryStream,
    StreamStream,
}

impl Kind {
    pub fn parse(name: &str) -> Option<Kind> {
        match name {
            "unary_unary" => Some(Kind::UnaryUnary),
            "unary_stream" => Some(Kind::UnaryStream),
            "stream_stream" => Some(Kind::StreamStream),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::UnaryUnary => "unary_unary",
            Kind::UnaryStream => "unary_stream",
            Kind::StreamStream => "stream_stream",
        }
    }

    /// The request is exactly one message (so it can be replayed on another replica).
    pub fn single_request(self) -> bool {
        self != Kind::StreamStream
    }
}

/// Where to connect or listen: `host:port` or `unix:/path`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    Tcp(String),
    Unix(PathBuf),
}

impl Address {
    pub fn parse(text: &str) -> Result<Address, String> {
        if let Some(path) = text.strip_prefix("unix://") {
            return Ok(Address::Unix(PathBuf::from(path)));
        }
        if let Some(path) = text.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(format!("{text:?}: no socket path after unix:"));
            }
            return Ok(Address::Unix(PathBuf::from(path)));
        }
        match text.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                Ok(Address::Tcp(text.to_string()))
            }
            _ => Err(format!("{text:?} is neither host:port nor unix:/path")),
        }
    }

    /// The `:authority` of requests sent to this address.
    pub fn authority(&self) -> &str {
        match self {
            Address::Tcp(host_port) => host_port,
            Address::Unix(_) => "localhost",
        }
    }
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Tcp(a) => f.write_str(a),
            Address::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// HTTP/2 settings of both sides. Windows bound what one stream may buffer:
/// a stream holds at most one window of data per direction in the data plane.
#[derive(Clone, Debug)]
pub struct H2Settings {
    pub stream_window: u32,
    pub connection_window: u32,
    pub max_concurrent_streams: u32,
    pub max_header_list_size: u32,
    /// HTTP/2 connections to each upstream, streams spread over them round robin.
    pub upstream_connections: usize,
}

impl Default for H2Settings {
    fn default() -> Self {
        H2Settings {
            stream_window: 64 * 1024,
            connection_window: 2 * 1024 * 1024,
            max_concurrent_streams: 20_000,
            max_header_list_size: 64 * 1024,
            upstream_connections: 1,
        }
    }
}

/// Everything fixed when the data plane is made.
#[derive(Clone, Debug)]
pub struct Config {
    /// Routed paths (`/sidemesh.v1.ToolService/CallTool`) and their kinds.
    pub routes: HashMap<String, Kind>,
    /// Routed streams whose response contract ends with one message (a `result`): path ->
    /// the first byte of that message. Once it was forwarded, a transport failure before
    /// the trailers leaves the call complete (OK), not failed.
    pub complete_after: HashMap<String, u8>,
    pub max_message_bytes: usize,
    pub max_concurrent_calls: usize,
    /// Where unrouted calls go (the orchestrator's own grpc.aio server).
    pub internal_address: Option<Address>,
    /// What a call over `max_concurrent_calls` gets.
    pub admission_refusal: Status,
    /// The data plane makes spans (SERVER and CLIENT ids, `traceparent` upstream).
    pub tracing: bool,
    /// Finished-call records kept for `take_records` before the oldest are dropped.
    pub max_records: usize,
    pub h2: H2Settings,
    pub connect_timeout: Duration,
}

impl Config {
    pub fn admission_message(limit: usize) -> String {
        format!(
            "the mesh is at its limit of {limit} concurrent calls; retry shortly \
             (operators: raise limits.max_concurrent_calls)"
        )
    }
}

impl Default for Config {
    fn default() -> Self {
        let limit = 1024;
        Config {
            routes: HashMap::new(),
            complete_after: HashMap::new(),
            max_message_bytes: 4 * 1024 * 1024,
            max_concurrent_calls: limit,
            internal_address: None,
            admission_refusal: Status::new(
                code::RESOURCE_EXHAUSTED,
                Config::admission_message(limit),
            ),
            tracing: true,
            max_records: 65_536,
            h2: H2Settings::default(),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse() {
        assert_eq!(
            Address::parse("127.0.0.1:0"),
            Ok(Address::Tcp("127.0.0.1:0".into()))
        );
        assert_eq!(
            Address::parse("[::1]:50051"),
            Ok(Address::Tcp("[::1]:50051".into()))
        );
        assert_eq!(
            Address::parse("unix:/tmp/s.sock"),
            Ok(Address::Unix("/tmp/s.sock".into()))
        );
        assert_eq!(
            Address::parse("unix:///tmp/s.sock"),
            Ok(Address::Unix("/tmp/s.sock".into()))
        );
        assert!(Address::parse("unix:").is_err());
        assert!(Address::parse("localhost").is_err());
        assert!(Address::parse("host:http").is_err());
        assert_eq!(Address::parse("unix:/x").unwrap().to_string(), "unix:/x");
    }

    #[test]
    fn kinds() {
        for name in ["unary_unary", "unary_stream", "stream_stream"] {
            assert_eq!(Kind::parse(name).unwrap().name(), name);
        }
        assert!(Kind::parse("stream_unary").is_none());
        assert!(!Kind::StreamStream.single_request());
    }
}
