//! The forwarding path end to end in Rust: an h2 client, a listener, a Rust decider
//! and an h2 upstream serving raw gRPC frames.

use std::collections::HashMap;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use sidemesh_dataplane::admission::Admission;
use sidemesh_dataplane::config::{Address, Config, Kind};
use sidemesh_dataplane::decision::{CallInfo, Decider, Forward, Verdict};
use sidemesh_dataplane::forward::{Shared, Stats};
use sidemesh_dataplane::grpc::{self, code, Status};
use sidemesh_dataplane::listener::{self, ListenerSpec};
use sidemesh_dataplane::pool::{PeerCheck, Pool};
use sidemesh_dataplane::records::{CallIds, Records};
use sidemesh_dataplane::retry::RetryPolicy;
use sidemesh_dataplane::spans::Rows;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Routes `/t.S/Echo` to "up" unless the message is `refuse`.
struct Echo;

impl Decider for Echo {
    type Context = String;
    fn decide(&self, call: CallInfo) -> Verdict<String> {
        if call.message.as_deref() == Some(&b"refuse"[..]) {
            return Verdict::Refuse(Status::new(code::UNIMPLEMENTED, "refused"));
        }
        Verdict::Forward(Forward {
            upstream: "up".into(),
            message: call.message.map(|m| [&m[..], b"!"].concat().into()),
            metadata: vec![],
            context: call.call_id,
            retry: RetryPolicy::default(),
            span_attributes: None,
        })
    }
    fn retry_pick(&self, _: &String, _: &str, _: &str) -> Option<String> {
        None
    }
    fn upstream_failed(&self, _: &String, replica: &str, detail: &str) -> Status {
        Status::new(code::UNAVAILABLE, format!("{replica} failed: {detail}"))
    }
    fn verify_peer(&self, _: &str, _: i32, _: u32) -> bool {
        true
    }
}

/// An upstream answering each call with its request body back and a custom trailer.
async fn upstream() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((io, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut conn = h2::server::handshake(io).await.unwrap();
                while let Some(Ok((request, mut respond))) = conn.accept().await {
                    tokio::spawn(async move {
                        let mut body = request.into_body();
                        let mut all = Vec::new();
                        while let Some(Ok(chunk)) = body.data().await {
                            let _ = body.flow_control().release_capacity(chunk.len());
                            all.extend_from_slice(&chunk);
                        }
                        let mut head = Response::new(());
                        head.headers_mut()
                            .insert("content-type", "application/grpc".parse().unwrap());
                        let mut stream = respond.send_response(head, false).unwrap();
                        stream.send_data(Bytes::from(all), false).unwrap();
                        let mut trailers = Status::new(0, "").trailers();
                        trailers.insert("x-trailer", "t".parse().unwrap());
                        stream.send_trailers(trailers).unwrap();
                    });
                }
            });
        }
    });
    address
}

fn data_plane(upstream: &str) -> (Arc<Shared<Echo>>, listener::Bound) {
    let mut routes = HashMap::new();
    routes.insert("/t.S/Echo".to_string(), Kind::UnaryStream);
    let config = Config {
        routes,
        ..Config::default()
    };
    let shared = Arc::new(Shared {
        admission: Admission::new(config.max_concurrent_calls),
        records: Records::new(100),
        rows: Rows::new(100),
        service: "svc".into(),
        internal: None,
        config,
        decider: Echo,
        batcher: Default::default(),
        pool: Pool::default(),
        ids: CallIds::default(),
        hard_stop: CancellationToken::new(),
        active: AtomicUsize::new(0),
        stats: Stats::default(),
    });
    shared.pool.set(
        "up",
        Address::Tcp(upstream.into()),
        PeerCheck::default(),
        None,
    );
    let spec = ListenerSpec {
        id: "l".into(),
        unix_mode: 0o600,
        ..ListenerSpec::default()
    };
    let bound = listener::listen(
        shared.clone(),
        &tokio::runtime::Handle::current(),
        "127.0.0.1:0",
        spec,
    )
    .unwrap();
    (shared, bound) // dropping the Bound drains its connections
}

async fn call(address: &str, path: &str, message: &[u8]) -> (HeaderMap, Vec<u8>, HeaderMap) {
    let io = TcpStream::connect(address).await.unwrap();
    let (client, conn) = h2::client::handshake(io).await.unwrap();
    tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let request = Request::post(format!("http://{address}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", "5S")
        .body(())
        .unwrap();
    let (response, mut stream) = client.send_request(request, false).unwrap();
    stream.send_data(grpc::frame(message), true).unwrap();
    let response = tokio::time::timeout(Duration::from_secs(5), response)
        .await
        .unwrap()
        .unwrap();
    let (parts, mut body) = response.into_parts();
    let mut data = Vec::new();
    while let Some(Ok(chunk)) = body.data().await {
        let _ = body.flow_control().release_capacity(chunk.len());
        data.extend_from_slice(&chunk);
    }
    let trailers = body.trailers().await.unwrap().unwrap_or_default();
    (parts.headers, data, trailers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_routed_call_is_forwarded_with_its_rewritten_message_and_trailers() {
    let (shared, bound) = data_plane(&upstream().await);
    let address = bound.address.clone();
    let (headers, data, trailers) = call(&address, "/t.S/Echo", b"hello").await;
    assert_eq!(headers["content-type"], "application/grpc");
    assert_eq!(data, grpc::frame(b"hello!").to_vec());
    assert_eq!(
        (
            trailers["grpc-status"].to_str().unwrap(),
            trailers["x-trailer"].to_str().unwrap()
        ),
        ("0", "t")
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    let records = shared.records.take();
    assert_eq!(records.len(), 1);
    let record = &records[0];
    assert_eq!(
        (
            record.code,
            record.requests,
            record.responses,
            record.upstream.as_str()
        ),
        (0, 1, 1, "up")
    );
    assert_eq!(record.attempts[0].outcome, "ok");
    assert_eq!(shared.rows.take().len(), 2); // SERVER + CLIENT
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_unrouted_paths_and_dead_upstreams_end_with_a_status() {
    let (shared, bound) = data_plane(&upstream().await);
    let address = bound.address.clone();
    let (headers, data, _) = call(&address, "/t.S/Echo", b"refuse").await;
    assert_eq!(
        Status::from_trailers(&headers),
        Some(Status::new(code::UNIMPLEMENTED, "refused"))
    );
    assert!(data.is_empty());
    let (headers, _, _) = call(&address, "/t.S/Other", b"x").await;
    assert_eq!(
        Status::from_trailers(&headers).unwrap().code,
        code::UNIMPLEMENTED
    ); // no internal server
    shared.pool.set(
        "up",
        Address::Tcp("127.0.0.1:1".into()),
        PeerCheck::default(),
        None,
    );
    let (headers, _, _) = call(&address, "/t.S/Echo", b"x").await;
    let status = Status::from_trailers(&headers).unwrap();
    assert_eq!(status.code, code::UNAVAILABLE);
    assert!(
        status
            .message
            .starts_with("up failed: cannot connect to 127.0.0.1:1"),
        "{}",
        status.message
    );
}
