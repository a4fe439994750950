//! Listeners: client TCP (optionally TLS) and Unix sockets, and plugins' callback
//! sockets. Each accepted connection learns its peer's identity once, then serves
//! HTTP/2 streams, each in its own task ([`crate::forward::serve`]).

use std::collections::HashSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::authority::AuthorityFix;
use crate::config::{Address, H2Settings};
use crate::decision::Decider;
use crate::forward::{self, ConnInfo, Shared};
use crate::identity::{self, Peer};
use crate::tls::{self, TlsSettings};

const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How a listener serves its connections.
#[derive(Clone, Debug, Default)]
pub struct ListenerSpec {
    pub id: String,
    /// The plugin a callback socket belongs to ("" for client listeners).
    pub caller: String,
    pub tls: Option<TlsSettings>,
    pub unix_mode: u32,
    pub services: Option<HashSet<String>>,
}

/// A bound listener: cancelling `closed` stops accepting; `drain` asks its connections
/// to finish (GOAWAY).
pub struct Bound {
    pub address: String,
    pub closed: CancellationToken,
    pub drain: watch::Sender<bool>,
    pub unix_path: Option<PathBuf>,
}

fn someone_listens(path: &Path) -> bool {
    std::os::unix::net::UnixStream::connect(path).is_ok()
}

/// Binds `address` (inside the runtime `handle`) and starts accepting.
pub fn listen<D: Decider>(
    dp: Arc<Shared<D>>,
    handle: &tokio::runtime::Handle,
    address: &str,
    spec: ListenerSpec,
) -> std::io::Result<Bound> {
    let parsed = Address::parse(address)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let acceptor = match &spec.tls {
        Some(settings) => Some(TlsAcceptor::from(tls::server_config(settings)?)),
        None => None,
    };
    let closed = CancellationToken::new();
    let (drain, drained) = watch::channel(false);
    let services = spec.services.clone().map(Arc::new);
    let listener: Arc<str> = spec.id.as_str().into();
    let caller: Arc<str> = spec.caller.as_str().into();
    let _enter = handle.enter();
    match parsed {
        Address::Tcp(host_port) => {
            let std_listener = std::net::TcpListener::bind(host_port.as_str()).map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("cannot listen on {address}: {e}; is another mesh running?"),
                )
            })?;
            std_listener.set_nonblocking(true)?;
            let local = std_listener.local_addr()?;
            let tcp = TcpListener::from_std(std_listener)?;
            let (closed2, h2) = (closed.clone(), dp.config.h2.clone());
            handle.spawn(async move {
                loop {
                    let (io, peer) = tokio::select! {
                        _ = closed2.cancelled() => break,
                        accepted = tcp.accept() => match accepted {
                            Ok(pair) => pair,
                            Err(_) => { tokio::time::sleep(Duration::from_millis(10)).await; continue }
                        },
                    };
                    let _ = io.set_nodelay(true);
                    let peer = Peer::tcp(peer);
                    let (dp, h2, drained) = (dp.clone(), h2.clone(), drained.clone());
                    let (listener, caller, services, acceptor) =
                        (listener.clone(), caller.clone(), services.clone(), acceptor.clone());
                    tokio::spawn(async move {
                        match acceptor {
                            None => {
                                let conn = conn_info(listener, caller, peer, services);
                                serve_connection(dp, io, conn, &h2, drained).await
                            }
                            Some(acceptor) => {
                                let Ok(Ok(tls)) = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(io)).await else {
                                    return;
                                };
                                let mut peer = peer;
                                if let Some(cert) = tls.get_ref().1.peer_certificates().and_then(|c| c.first()) {
                                    if let Some(principal) = identity::certificate_principal(cert) {
                                        peer.principal = principal;
                                    }
                                }
                                let conn = conn_info(listener, caller, peer, services);
                                serve_connection(dp, tls, conn, &h2, drained).await
                            }
                        }
                    });
                }
            });
            let host = host_port
                .rsplit_once(':')
                .map(|(h, _)| h)
                .unwrap_or("127.0.0.1");
            Ok(Bound {
                address: format!("{host}:{}", local.port()),
                closed,
                drain,
                unix_path: None,
            })
        }
        Address::Unix(path) => {
            if spec.tls.is_some() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "TLS is for TCP listeners",
                ));
            }
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            if path.exists() {
                if someone_listens(&path) {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::AddrInUse,
                        format!("another process is already serving on {address}"),
                    ));
                }
                std::fs::remove_file(&path)?; // a stale socket from a mesh that died
            }
            let unix = UnixListener::bind(&path).map_err(|e| {
                std::io::Error::new(e.kind(), format!("cannot listen on {address}: {e}"))
            })?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(spec.unix_mode))?;
            let (closed2, h2) = (closed.clone(), dp.config.h2.clone());
            handle.spawn(async move {
                loop {
                    let io = tokio::select! {
                        _ = closed2.cancelled() => break,
                        accepted = unix.accept() => match accepted {
                            Ok((io, _)) => io,
                            Err(_) => { tokio::time::sleep(Duration::from_millis(10)).await; continue }
                        },
                    };
                    let peer = match io.peer_cred() {
                        Ok(cred) => Peer::unix(cred.pid(), cred.uid(), cred.gid()),
                        Err(_) => continue,
                    };
                    let peer = if caller.is_empty() { peer } else { peer.as_plugin(&caller) };
                    let conn = conn_info(listener.clone(), caller.clone(), peer, services.clone());
                    let (dp, h2, drained) = (dp.clone(), h2.clone(), drained.clone());
                    let io = AuthorityFix::new(io);
                    tokio::spawn(async move { serve_connection(dp, io, conn, &h2, drained).await });
                }
            });
            Ok(Bound {
                address: format!("unix:{}", path.display()),
                closed,
                drain,
                unix_path: Some(path),
            })
        }
    }
}

fn conn_info(
    listener: Arc<str>,
    caller: Arc<str>,
    peer: Peer,
    services: Option<Arc<HashSet<String>>>,
) -> Arc<ConnInfo> {
    Arc::new(ConnInfo {
        listener,
        caller,
        peer: Arc::new(peer),
        services,
    })
}

/// Serves one connection's streams until it closes; on `drain`, GOAWAY and finish.
async fn serve_connection<D, T>(
    dp: Arc<Shared<D>>,
    io: T,
    conn: Arc<ConnInfo>,
    h2: &H2Settings,
    mut drain: watch::Receiver<bool>,
) where
    D: Decider,
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = h2::server::Builder::new();
    builder
        .initial_window_size(h2.stream_window)
        .initial_connection_window_size(h2.connection_window)
        .max_concurrent_streams(h2.max_concurrent_streams)
        .max_header_list_size(h2.max_header_list_size)
        .max_send_buffer_size(h2.stream_window as usize);
    let Ok(mut connection) = builder.handshake::<_, Bytes>(io).await else {
        return;
    };
    let mut draining = *drain.borrow();
    if draining {
        connection.graceful_shutdown();
    }
    loop {
        tokio::select! {
            next = connection.accept() => match next {
                Some(Ok((request, respond))) => {
                    tokio::spawn(forward::serve(dp.clone(), conn.clone(), request, respond));
                }
                _ => break,
            },
            changed = drain.changed(), if !draining => {
                if changed.is_err() || *drain.borrow() {
                    draining = true;
                    connection.graceful_shutdown();
                }
            }
        }
    }
}
