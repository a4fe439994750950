//! Upstream connections: pooled, multiplexed HTTP/2 connections per replica (one by
//! default, `upstream_connections` used round robin), to a
//! Unix socket (a sidecar) or a TCP address (a remote plugin), made on first use and
//! again after it closes, with a short backoff after a failed connect (20 ms doubling to
//! 250 ms, as the router's channels had).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::SendRequest;
use http::uri::Authority;
use tokio::net::{TcpStream, UnixStream};
use tokio_util::sync::CancellationToken;

use crate::config::{Address, H2Settings};
use crate::outlier::Outliers;
use crate::spans::Attributes;

const BACKOFF_INITIAL: Duration = Duration::from_millis(20);
const BACKOFF_MAX: Duration = Duration::from_millis(250);

/// Who may serve a Unix upstream.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerCheck {
    /// The peer's uid must be this one.
    pub uid: Option<u32>,
    /// Ask the control plane (`verify_peer`) about the peer's pid and uid.
    pub ask: bool,
}

/// Why no stream could be opened: the request never left the data plane.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectError(pub String);

struct Live {
    send: SendRequest<Bytes>,
    alive: Arc<AtomicBool>,
}

#[derive(Default)]
struct State {
    /// One slot per connection (`H2Settings::upstream_connections`).
    live: Vec<Option<Live>>,
    failures: u32,
    retry_at: Option<Instant>,
    last_error: String,
}

/// One replica's address, connection and counters.
pub struct Upstream {
    pub key: String,
    pub address: Address,
    pub authority: Authority,
    check: PeerCheck,
    state: Mutex<State>,
    connecting: tokio::sync::Mutex<()>,
    in_flight: AtomicUsize,
    /// Round robin over the connections.
    next: AtomicUsize,
    /// Cancelled when the upstream is removed: its connection closes, its calls end.
    pub removed: CancellationToken,
    pub outliers: Outliers,
    /// Attributes of the CLIENT spans of attempts on this upstream.
    pub attributes: Option<Attributes>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("key", &self.key)
            .field("address", &self.address)
            .finish()
    }
}

/// An attempt's place on an upstream: counts it in flight until dropped.
pub struct InFlight(Arc<Upstream>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Upstream {
    pub fn new(
        key: String,
        address: Address,
        check: PeerCheck,
        attributes: Option<Attributes>,
    ) -> Arc<Upstream> {
        let authority = Authority::try_from(address.authority())
            .unwrap_or_else(|_| Authority::from_static("localhost"));
        Arc::new(Upstream {
            key,
            address,
            authority,
            check,
            state: Mutex::new(State::default()),
            connecting: tokio::sync::Mutex::new(()),
            in_flight: AtomicUsize::new(0),
            next: AtomicUsize::new(0),
            removed: CancellationToken::new(),
            outliers: Outliers::default(),
            attributes,
        })
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn enter(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    fn cached(&self, slot: usize) -> Option<SendRequest<Bytes>> {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match state.live.get(slot) {
            Some(Some(live)) if live.alive.load(Ordering::Acquire) => Some(live.send.clone()),
            _ => None,
        }
    }

    /// Forgets connection `slot` (it failed under a call).
    pub fn discard(&self, slot: usize) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(live) = state.live.get_mut(slot).and_then(Option::take) {
            live.alive.store(false, Ordering::Release);
        }
    }

    /// A handle ready to open one stream, connecting if need be, and its connection's slot.
    pub async fn ready(
        self: &Arc<Self>,
        settings: &H2Settings,
        timeout: Duration,
        verify: &(dyn Fn(&str, i32, u32) -> bool + Sync),
    ) -> Result<(SendRequest<Bytes>, usize), ConnectError> {
        if self.removed.is_cancelled() {
            return Err(ConnectError(format!("replica {} was removed", self.key)));
        }
        let slot = self.next.fetch_add(1, Ordering::Relaxed) % settings.upstream_connections.max(1);
        // A cached connection that turns out closed is replaced once: nothing was sent.
        for _ in 0..2 {
            let send = match self.cached(slot) {
                Some(send) => send,
                None => self.connect(slot, settings, timeout, verify).await?,
            };
            match send.ready().await {
                Ok(send) => return Ok((send, slot)),
                Err(_) => self.discard(slot),
            }
        }
        Err(ConnectError(format!(
            "the connection to {} closed at once",
            self.address
        )))
    }

    async fn connect(
        self: &Arc<Self>,
        slot: usize,
        settings: &H2Settings,
        timeout: Duration,
        verify: &(dyn Fn(&str, i32, u32) -> bool + Sync),
    ) -> Result<SendRequest<Bytes>, ConnectError> {
        let _one_at_a_time = self.connecting.lock().await;
        if let Some(send) = self.cached(slot) {
            return Ok(send); // another call connected meanwhile
        }
        {
            let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(at) = state.retry_at {
                if Instant::now() < at {
                    return Err(ConnectError(state.last_error.clone()));
                }
            }
        }
        let made = tokio::time::timeout(timeout, self.dial(settings, verify)).await;
        let result = match made {
            Ok(result) => result,
            Err(_) => Err(format!(
                "connecting to {} timed out after {timeout:?}",
                self.address
            )),
        };
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match result {
            Ok(live) => {
                let send = live.send.clone();
                if state.live.len() <= slot {
                    state.live.resize_with(slot + 1, || None);
                }
                state.live[slot] = Some(live);
                state.failures = 0;
                state.retry_at = None;
                Ok(send)
            }
            Err(error) => {
                state.failures += 1;
                let pause = BACKOFF_INITIAL
                    .saturating_mul(1 << (state.failures - 1).min(8))
                    .min(BACKOFF_MAX);
                state.retry_at = Some(Instant::now() + pause);
                state.last_error = error.clone();
                Err(ConnectError(error))
            }
        }
    }

    async fn dial(
        &self,
        settings: &H2Settings,
        verify: &(dyn Fn(&str, i32, u32) -> bool + Sync),
    ) -> Result<Live, String> {
        let mut builder = h2::client::Builder::new();
        builder
            .initial_window_size(settings.stream_window)
            .initial_connection_window_size(settings.connection_window)
            .max_send_buffer_size(settings.stream_window as usize)
            .max_header_list_size(settings.max_header_list_size)
            .enable_push(false);
        let alive = Arc::new(AtomicBool::new(true));
        let removed = self.removed.clone();
        let send = match &self.address {
            Address::Unix(path) => {
                let io = UnixStream::connect(path)
                    .await
                    .map_err(|e| format!("cannot connect to unix:{}: {e}", path.display()))?;
                self.check_peer(&io, verify)?;
                let (send, conn) = builder.handshake::<_, Bytes>(io).await.map_err(|e| {
                    format!("HTTP/2 handshake with unix:{} failed: {e}", path.display())
                })?;
                spawn_connection(conn, alive.clone(), removed);
                send
            }
            Address::Tcp(host_port) => {
                let io = TcpStream::connect(host_port.as_str())
                    .await
                    .map_err(|e| format!("cannot connect to {host_port}: {e}"))?;
                let _ = io.set_nodelay(true);
                let (send, conn) = builder
                    .handshake::<_, Bytes>(io)
                    .await
                    .map_err(|e| format!("HTTP/2 handshake with {host_port} failed: {e}"))?;
                spawn_connection(conn, alive.clone(), removed);
                send
            }
        };
        Ok(Live { send, alive })
    }

    fn check_peer(
        &self,
        io: &UnixStream,
        verify: &(dyn Fn(&str, i32, u32) -> bool + Sync),
    ) -> Result<(), String> {
        if self.check == PeerCheck::default() {
            return Ok(());
        }
        let cred = io
            .peer_cred()
            .map_err(|e| format!("cannot read the peer's credentials: {e}"))?;
        let (pid, uid) = (cred.pid().unwrap_or(0), cred.uid());
        if let Some(expected) = self.check.uid {
            if uid != expected {
                return Err(format!(
                    "the process serving {} runs as uid {uid}, not the expected uid {expected}",
                    self.address
                ));
            }
        }
        if self.check.ask && !verify(&self.key, pid, uid) {
            return Err(format!(
                "the process serving {} (pid {pid}, uid {uid}) is not replica {}'s",
                self.address, self.key
            ));
        }
        Ok(())
    }
}

fn spawn_connection<T>(
    conn: h2::client::Connection<T, Bytes>,
    alive: Arc<AtomicBool>,
    removed: CancellationToken,
) where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        tokio::select! {
            _ = conn => {}
            _ = removed.cancelled() => {}
        }
        alive.store(false, Ordering::Release);
    });
}

/// Every upstream by replica key.
#[derive(Default)]
pub struct Pool {
    upstreams: RwLock<HashMap<String, Arc<Upstream>>>,
}

impl Pool {
    pub fn get(&self, key: &str) -> Option<Arc<Upstream>> {
        self.upstreams
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .cloned()
    }

    /// Adds or replaces an upstream; a replaced one is removed (its calls end) unless
    /// it is the same (address, check and attributes): setting it again changes nothing.
    pub fn set(
        &self,
        key: &str,
        address: Address,
        check: PeerCheck,
        attributes: Option<Attributes>,
    ) {
        if let Some(old) = self.get(key) {
            if old.address == address && old.check == check && old.attributes == attributes {
                return;
            }
        }
        let upstream = Upstream::new(key.to_string(), address, check, attributes);
        let old = self
            .upstreams
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.to_string(), upstream);
        if let Some(old) = old {
            old.removed.cancel();
        }
    }

    /// Removes an upstream: its connection closes and its calls in flight end.
    pub fn remove(&self, key: &str) -> bool {
        let old = self
            .upstreams
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
        match old {
            Some(old) => {
                old.removed.cancel();
                true
            }
            None => false,
        }
    }

    pub fn all(&self) -> Vec<Arc<Upstream>> {
        self.upstreams
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    pub fn clear(&self) {
        for upstream in
            std::mem::take(&mut *self.upstreams.write().unwrap_or_else(|e| e.into_inner()))
                .into_values()
        {
            upstream.removed.cancel();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yes(_: &str, _: i32, _: u32) -> bool {
        true
    }

    fn no(_: &str, _: i32, _: u32) -> bool {
        false
    }

    #[tokio::test]
    async fn a_refused_connect_is_remembered_for_the_backoff() {
        let dir = std::env::temp_dir().join(format!("dp-pool-{}", std::process::id()));
        let upstream = Upstream::new(
            "r".into(),
            Address::Unix(dir.join("none.sock")),
            PeerCheck::default(),
            None,
        );
        let settings = H2Settings::default();
        let first = upstream
            .ready(&settings, Duration::from_secs(1), &yes)
            .await
            .unwrap_err();
        assert!(first.0.contains("cannot connect to unix:"), "{}", first.0);
        // Within the backoff the same error comes back without a new attempt.
        let again = upstream
            .ready(&settings, Duration::from_secs(1), &yes)
            .await
            .unwrap_err();
        assert_eq!(first, again);
        upstream.removed.cancel();
        let removed = upstream
            .ready(&settings, Duration::from_secs(1), &yes)
            .await
            .unwrap_err();
        assert!(removed.0.contains("was removed"));
    }

    #[tokio::test]
    async fn peers_are_checked_before_any_stream() {
        let dir = std::env::temp_dir().join(format!("dp-pool-peer-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let _ = std::fs::remove_file(&path);
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            while let Ok((io, _)) = listener.accept().await {
                tokio::spawn(async move {
                    if let Ok(mut conn) = h2::server::handshake(io).await {
                        while let Some(Ok((_, mut respond))) = conn.accept().await {
                            let _: Result<h2::SendStream<Bytes>, _> =
                                respond.send_response(http::Response::new(()), true);
                        }
                    }
                });
            }
        });
        let settings = H2Settings::default();
        let uid = std::fs::metadata(&dir)
            .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
            .unwrap();
        let wrong = PeerCheck {
            uid: Some(uid + 1),
            ask: false,
        };
        let refused = Upstream::new("w".into(), Address::Unix(path.clone()), wrong, None);
        let err = refused
            .ready(&settings, Duration::from_secs(1), &yes)
            .await
            .unwrap_err();
        assert!(err.0.contains("not the expected uid"), "{}", err.0);
        let asked = Upstream::new(
            "a".into(),
            Address::Unix(path.clone()),
            PeerCheck {
                uid: None,
                ask: true,
            },
            None,
        );
        let err = asked
            .ready(&settings, Duration::from_secs(1), &no)
            .await
            .unwrap_err();
        assert!(err.0.contains("is not replica a's"), "{}", err.0);
        let fine = Upstream::new(
            "f".into(),
            Address::Unix(path.clone()),
            PeerCheck {
                uid: Some(uid),
                ask: true,
            },
            None,
        );
        assert!(fine
            .ready(&settings, Duration::from_secs(1), &yes)
            .await
            .is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn setting_the_same_upstream_again_keeps_it() {
        let pool = Pool::default();
        pool.set(
            "r",
            Address::Tcp("127.0.0.1:1".into()),
            PeerCheck::default(),
            None,
        );
        let first = pool.get("r").unwrap();
        pool.set(
            "r",
            Address::Tcp("127.0.0.1:1".into()),
            PeerCheck::default(),
            None,
        );
        assert!(Arc::ptr_eq(&first, &pool.get("r").unwrap()));
        pool.set(
            "r",
            Address::Tcp("127.0.0.1:2".into()),
            PeerCheck::default(),
            None,
        );
        assert!(first.removed.is_cancelled());
        assert!(pool.remove("r") && !pool.remove("r"));
    }
}
