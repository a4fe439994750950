//! The PyO3 boundary: the `sidemesh_dataplane` module, its `DataPlane` and the small
//! value classes the Python decision reads and returns. See `sidemesh_dataplane.pyi`.
//!
//! Threading: `decide`, `retry_pick`, `upstream_failed` and `verify_peer` are called
//! on the data plane's tokio threads, holding the GIL only for the call itself.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use pyo3::exceptions::{PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyString};

use crate::admission::Admission;
use crate::config::{Address, Config, H2Settings, Kind};
use crate::decision::{self, CallInfo, Decider, Verdict};
use crate::forward::{Shared, Stats};
use crate::grpc::{self, code, Status};
use crate::listener::{self, Bound as Listening, ListenerSpec};
use crate::pool::{PeerCheck, Pool, Upstream};
use crate::records::{CallIds, Records};
use crate::retry;
use crate::spans::{Attributes, Rows};
use crate::tls::TlsSettings;

// -- values ------------------------------------------------------------------------

/// One routed call, as the decision sees it.
#[pyclass(frozen, module = "sidemesh_dataplane")]
struct Call {
    info: CallInfo,
}

fn header_value<'py>(py: Python<'py>, name: &HeaderName, value: &HeaderValue) -> Bound<'py, PyAny> {
    if name.as_str().ends_with("-bin") {
        if let Some(raw) = grpc::decode_bin(value.as_bytes()) {
            return PyBytes::new(py, &raw).into_any();
        }
    }
    PyString::new(py, &String::from_utf8_lossy(value.as_bytes())).into_any()
}

#[pymethods]
impl Call {
    #[getter]
    fn listener(&self) -> &str {
        &self.info.listener
    }
    #[getter]
    fn caller(&self) -> &str {
        &self.info.caller
    }
    #[getter]
    fn principal(&self) -> &str {
        &self.info.peer.principal
    }
    #[getter]
    fn peer(&self) -> &str {
        &self.info.peer.address
    }
    #[getter]
    fn peer_pid(&self) -> Option<i32> {
        self.info.peer.pid
    }
    #[getter]
    fn peer_uid(&self) -> Option<u32> {
        self.info.peer.uid
    }
    #[getter]
    fn peer_gid(&self) -> Option<u32> {
        self.info.peer.gid
    }
    #[getter]
    fn path(&self) -> &str {
        &self.info.path
    }
    #[getter]
    fn kind(&self) -> &'static str {
        self.info.kind.name()
    }
    #[getter]
    fn call_id(&self) -> &str {
        &self.info.call_id
    }
    #[getter]
    fn message<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyBytes>> {
        self.info.message.as_ref().map(|m| PyBytes::new(py, m))
    }
    #[getter]
    fn metadata<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let list = PyList::empty(py);
        for (name, value) in &self.info.metadata {
            list.append((name.as_str(), header_value(py, name, value)))?;
        }
        Ok(list)
    }
    /// The value of one metadata key (the last one sent), or `None`.
    fn header<'py>(&self, py: Python<'py>, key: &str) -> Option<Bound<'py, PyAny>> {
        let name = HeaderName::from_bytes(key.as_bytes()).ok()?;
        let value = self.info.metadata.get_all(&name).iter().next_back()?;
        Some(header_value(py, &name, value))
    }
    #[getter]
    fn trace_id(&self) -> &str {
        &self.info.trace.trace_id
    }
    #[getter]
    fn server_span_id(&self) -> &str {
        &self.info.trace.server_span_id
    }
    #[getter]
    fn parent_span_id(&self) -> &str {
        &self.info.trace.parent_span_id
    }
    #[getter]
    fn client_span_id(&self) -> &str {
        &self.info.trace.client_span_id
    }
    #[getter]
    fn sampled(&self) -> bool {
        self.info.trace.sampled
    }
    fn __repr__(&self) -> String {
        format!(
            "Call({:?}, call_id={:?}, principal={:?})",
            self.info.path, self.info.call_id, self.info.peer.principal
        )
    }
}

/// How a forwarded call may be retried.
#[pyclass(frozen, skip_from_py_object, module = "sidemesh_dataplane")]
#[derive(Clone)]
struct RetryPolicy {
    policy: retry::RetryPolicy,
}

fn duration(seconds: f64, what: &str) -> PyResult<Duration> {
    Duration::try_from_secs_f64(seconds)
        .map_err(|_| PyValueError::new_err(format!("{what} must be >= 0 seconds")))
}

#[pymethods]
impl RetryPolicy {
    #[new]
    #[pyo3(signature = (max_attempts=1, *, idempotent=false, per_try_timeout=None, backoff_base=0.025, backoff_max=0.25, retry_on=vec![14]))]
    fn new(
        max_attempts: u32,
        idempotent: bool,
        per_try_timeout: Option<f64>,
        backoff_base: f64,
        backoff_max: f64,
        retry_on: Vec<u32>,
    ) -> PyResult<Self> {
        if max_attempts == 0 {
            return Err(PyValueError::new_err("max_attempts must be at least 1"));
        }
        Ok(RetryPolicy {
            policy: retry::RetryPolicy {
                max_attempts,
                idempotent,
                per_try_timeout: per_try_timeout
                    .map(|s| duration(s, "per_try_timeout"))
                    .transpose()?,
                backoff_base: duration(backoff_base, "backoff_base")?,
                backoff_max: duration(backoff_max, "backoff_max")?,
                retry_on,
            },
        })
    }
    #[getter]
    fn max_attempts(&self) -> u32 {
        self.policy.max_attempts
    }
    #[getter]
    fn idempotent(&self) -> bool {
        self.policy.idempotent
    }
    #[getter]
    fn per_try_timeout(&self) -> Option<f64> {
        self.policy.per_try_timeout.map(|d| d.as_secs_f64())
    }
    fn __repr__(&self) -> String {
        format!("{:?}", self.policy)
    }
}

fn metadata_pairs(items: &Bound<'_, PyAny>) -> PyResult<Vec<(HeaderName, HeaderValue)>> {
    let mut out = Vec::new();
    for item in items.try_iter()? {
        let (key, value): (String, Bound<'_, PyAny>) = item?.extract()?;
        let name = HeaderName::from_bytes(key.as_bytes())
            .map_err(|_| PyValueError::new_err(format!("{key:?} is not a valid metadata key")))?;
        let value = if let Ok(raw) = value.cast::<PyBytes>() {
            if !key.ends_with("-bin") {
                return Err(PyValueError::new_err(format!(
                    "metadata {key:?}: bytes values need a -bin key"
                )));
            }
            HeaderValue::from_str(&grpc::encode_bin(raw.as_bytes()))
        } else {
            HeaderValue::from_str(&value.extract::<String>()?)
        }
        .map_err(|_| PyValueError::new_err(format!("metadata {key:?}: the value is not valid")))?;
        out.push((name, value));
    }
    Ok(out)
}

/// Span attributes, serialized once (make one per catalog entry and reuse it).
#[pyclass(frozen, name = "SpanAttributes", module = "sidemesh_dataplane")]
struct PySpanAttributes {
    attributes: Attributes,
}

fn attributes_of(mapping: &Bound<'_, PyAny>) -> PyResult<Attributes> {
    let mut pairs: Vec<(String, String)> = Vec::new();
    for item in mapping.call_method0("items")?.try_iter()? {
        let (key, value): (String, Bound<'_, PyAny>) = item?.extract()?;
        // As the trace store keeps them: strings as they are, anything else as JSON.
        let text = match value.extract::<String>() {
            Ok(text) => text,
            Err(_) if value.is_instance_of::<pyo3::types::PyBool>() => {
                if value.is_truthy()? {
                    "true".into()
                } else {
                    "false".into()
                }
            }
            Err(_) => value.str()?.to_string(),
        };
        pairs.push((key, text));
    }
    Ok(Attributes::new(
        pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())),
    ))
}

#[pymethods]
impl PySpanAttributes {
    #[new]
    fn new(attributes: &Bound<'_, PyAny>) -> PyResult<Self> {
        Ok(PySpanAttributes {
            attributes: attributes_of(attributes)?,
        })
    }
    fn __repr__(&self) -> String {
        format!("SpanAttributes({{{}}})", self.attributes.0)
    }
}

/// Forward the call to `upstream`.
#[pyclass(frozen, module = "sidemesh_dataplane")]
struct Decision {
    upstream: String,
    message: Option<Bytes>,
    metadata: Vec<(HeaderName, HeaderValue)>,
    context: Py<PyAny>,
    retry: retry::RetryPolicy,
    span_attributes: Option<Attributes>,
}

#[pymethods]
impl Decision {
    #[new]
    #[pyo3(signature = (upstream, *, message=None, metadata=None, context=None, retry=None, span_attributes=None))]
    fn new(
        py: Python<'_>,
        upstream: String,
        message: Option<&Bound<'_, PyBytes>>,
        metadata: Option<&Bound<'_, PyAny>>,
        context: Option<Py<PyAny>>,
        retry: Option<PyRef<'_, RetryPolicy>>,
        span_attributes: Option<PyRef<'_, PySpanAttributes>>,
    ) -> PyResult<Self> {
        Ok(Decision {
            upstream,
            message: message.map(|m| Bytes::copy_from_slice(m.as_bytes())),
            metadata: match metadata {
                Some(items) => metadata_pairs(items)?,
                None => Vec::new(),
            },
            context: context.unwrap_or_else(|| py.None()),
            retry: retry.map(|r| r.policy.clone()).unwrap_or_default(),
            span_attributes: span_attributes.map(|a| a.attributes.clone()),
        })
    }
    #[getter]
    fn upstream(&self) -> &str {
        &self.upstream
    }
    #[getter]
    fn context(&self, py: Python<'_>) -> Py<PyAny> {
        self.context.clone_ref(py)
    }
}

/// End the call now with this status (sent as a trailers-only response).
#[pyclass(frozen, module = "sidemesh_dataplane")]
struct Refusal {
    status: Status,
}

#[pymethods]
impl Refusal {
    #[new]
    #[pyo3(signature = (code, message, details=None))]
    fn new(code: u32, message: String, details: Option<&Bound<'_, PyBytes>>) -> PyResult<Self> {
        if code == 0 || code > 16 {
            return Err(PyValueError::new_err(format!(
                "{code} is not a gRPC error code"
            )));
        }
        let details = details.map(|d| Bytes::copy_from_slice(d.as_bytes()));
        Ok(Refusal {
            status: Status::new(code, message).with_details(details),
        })
    }
    #[getter]
    fn code(&self) -> u32 {
        self.status.code
    }
    #[getter]
    fn message(&self) -> &str {
        &self.status.message
    }
}

/// A TLS listener's certificate, key and optional client CA (mTLS), as PEM paths.
#[pyclass(frozen, module = "sidemesh_dataplane")]
struct TlsConfig {
    settings: TlsSettings,
}

#[pymethods]
impl TlsConfig {
    #[new]
    #[pyo3(signature = (cert, key, *, client_ca=None, require_client_cert=true))]
    fn new(
        cert: String,
        key: String,
        client_ca: Option<String>,
        require_client_cert: bool,
    ) -> Self {
        TlsConfig {
            settings: TlsSettings {
                cert_path: cert,
                key_path: key,
                client_ca_path: client_ca,
                require_client_cert,
            },
        }
    }
}

type AttemptTuple = (String, &'static str, u32, u64, u64, String, String);

/// One finished routed call.
#[pyclass(frozen, get_all, module = "sidemesh_dataplane")]
struct Record {
    context: Py<PyAny>,
    listener: String,
    caller: String,
    principal: String,
    path: String,
    call_id: String,
    code: u32,
    message: String,
    requests: u64,
    responses: u64,
    start_ns: u64,
    decided_ns: u64,
    end_ns: u64,
    trace_id: String,
    server_span_id: String,
    parent_span_id: String,
    sampled: bool,
    upstream: String,
    /// (replica, outcome, code, start_ns, end_ns, client span id, detail) per attempt.
    attempts: Vec<AttemptTuple>,
}

#[pymethods]
impl Record {
    fn __repr__(&self) -> String {
        format!(
            "Record({:?}, code={}, upstream={:?}, attempts={})",
            self.path,
            self.code,
            self.upstream,
            self.attempts.len()
        )
    }
}

// -- the decider -------------------------------------------------------------------

struct PyDecider {
    decide: Py<PyAny>,
    retry_pick: Py<PyAny>,
    upstream_failed: Py<PyAny>,
    verify_peer: Option<Py<PyAny>>,
}

fn internal_error(py: Python<'_>, what: &str, err: PyErr) -> Status {
    let message = format!("the mesh failed to route the call ({what} raised {err})");
    err.display(py);
    Status::new(code::INTERNAL, message)
}

impl Decider for PyDecider {
    type Context = Py<PyAny>;

    fn decide(&self, call: CallInfo) -> Verdict<Py<PyAny>> {
        Python::attach(|py| {
            let result =
                Py::new(py, Call { info: call }).and_then(|c| self.decide.bind(py).call1((c,)));
            let answer = match result {
                Ok(answer) => answer,
                Err(err) => return Verdict::Refuse(internal_error(py, "decide", err)),
            };
            if let Ok(decision) = answer.cast::<Decision>() {
                let d = decision.get();
                return Verdict::Forward(decision::Forward {
                    upstream: d.upstream.clone(),
                    message: d.message.clone(),
                    metadata: d.metadata.clone(),
                    context: d.context.clone_ref(py),
                    retry: d.retry.clone(),
                    span_attributes: d.span_attributes.clone(),
                });
            }
            if let Ok(refusal) = answer.cast::<Refusal>() {
                return Verdict::Refuse(refusal.get().status.clone());
            }
            Verdict::Refuse(Status::new(
                code::INTERNAL,
                format!("the mesh failed to route the call (decide returned {}, not a Decision or a Refusal)",
                        answer.get_type().name().map(|n| n.to_string()).unwrap_or_default()),
            ))
        })
    }

    fn retry_pick(&self, context: &Py<PyAny>, failed: &str, reason: &str) -> Option<String> {
        Python::attach(|py| {
            match self
                .retry_pick
                .bind(py)
                .call1((context.clone_ref(py), failed, reason))
            {
                Ok(answer) => answer.extract::<Option<String>>().ok().flatten(),
                Err(err) => {
                    err.display(py);
                    None
                }
            }
        })
    }

    fn upstream_failed(&self, context: &Py<PyAny>, replica: &str, detail: &str) -> Status {
        Python::attach(|py| {
            let answer = self
                .upstream_failed
                .bind(py)
                .call1((context.clone_ref(py), replica, detail))
                .and_then(|a| a.extract::<(u32, String, Option<Vec<u8>>)>());
            match answer {
                Ok((code, message, details)) => {
                    Status::new(code, message).with_details(details.map(Bytes::from))
                }
                Err(err) => {
                    err.display(py);
                    Status::new(
                        code::UNAVAILABLE,
                        format!("replica {replica} failed during the call ({detail})"),
                    )
                }
            }
        })
    }

    fn verify_peer(&self, replica: &str, pid: i32, uid: u32) -> bool {
        let Some(verify) = &self.verify_peer else {
            return true;
        };
        Python::attach(|py| match verify.bind(py).call1((replica, pid, uid)) {
            Ok(answer) => answer.is_truthy().unwrap_or(false),
            Err(err) => {
                err.display(py);
                false
            }
        })
    }
}

// -- the data plane ------------------------------------------------------------------

/// The native data plane: its own tokio runtime, listeners, upstream pool and records.
#[pyclass(frozen, module = "sidemesh_dataplane")]
struct DataPlane {
    runtime: Mutex<Option<tokio::runtime::Runtime>>,
    handle: tokio::runtime::Handle,
    shared: Arc<Shared<PyDecider>>,
    listeners: Mutex<HashMap<String, Vec<Listening>>>,
}

fn os_error(err: std::io::Error) -> PyErr {
    PyOSError::new_err((err.raw_os_error().unwrap_or(0), err.to_string()))
}

#[pymethods]
impl DataPlane {
    #[new]
    #[pyo3(signature = (
        decide, *, upstream_failed, retry_pick, routes, verify_peer=None,
        max_message_bytes=4 * 1024 * 1024, max_concurrent_calls=1024, internal_address=None,
        admission_refusal=None, tracing=true, worker_threads=1, max_records=65_536,
        stream_window=65_536, connection_window=2 * 1024 * 1024, max_concurrent_streams=20_000,
        service_name=String::from("sidemesh-orchestrator"), max_span_rows=262_144,
        upstream_connections=1,
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        decide: Py<PyAny>,
        upstream_failed: Py<PyAny>,
        retry_pick: Py<PyAny>,
        routes: Vec<(String, String)>,
        verify_peer: Option<Py<PyAny>>,
        max_message_bytes: usize,
        max_concurrent_calls: usize,
        internal_address: Option<String>,
        admission_refusal: Option<(String, Option<Vec<u8>>)>,
        tracing: bool,
        worker_threads: usize,
        max_records: usize,
        stream_window: u32,
        connection_window: u32,
        max_concurrent_streams: u32,
        service_name: String,
        max_span_rows: usize,
        upstream_connections: usize,
    ) -> PyResult<Self> {
        let mut table = HashMap::new();
        for (path, kind) in routes {
            let kind = Kind::parse(&kind).ok_or_else(|| {
                PyValueError::new_err(format!(
                    "route {path}: kind {kind:?} is not unary_unary, unary_stream or stream_stream"
                ))
            })?;
            table.insert(path, kind);
        }
        let internal = internal_address
            .map(|a| Address::parse(&a).map_err(PyValueError::new_err))
            .transpose()?;
        let admission_refusal = match admission_refusal {
            Some((message, details)) => Status::new(code::RESOURCE_EXHAUSTED, message)
                .with_details(details.map(Bytes::from)),
            None => Status::new(
                code::RESOURCE_EXHAUSTED,
                Config::admission_message(max_concurrent_calls),
            ),
        };
        let config = Config {
            routes: table,
            max_message_bytes,
            max_concurrent_calls,
            internal_address: internal.clone(),
            admission_refusal,
            tracing,
            max_records,
            h2: H2Settings {
                stream_window,
                connection_window: connection_window.max(stream_window),
                max_concurrent_streams,
                upstream_connections: upstream_connections.max(1),
                ..H2Settings::default()
            },
            connect_timeout: Duration::from_secs(5),
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(worker_threads.max(1))
            .thread_name("sidemesh-dataplane")
            .on_thread_start(keep_thread_state)
            .enable_all()
            .build()
            .map_err(|e| {
                PyRuntimeError::new_err(format!("cannot start the data plane's runtime: {e}"))
            })?;
        let shared = Arc::new(Shared {
            admission: Admission::new(config.max_concurrent_calls),
            records: Records::new(config.max_records),
            rows: Rows::new(max_span_rows),
            service: service_name.into(),
            internal: internal
                .map(|a| Upstream::new("internal".into(), a, PeerCheck::default(), None)),
            config,
            decider: PyDecider {
                decide,
                retry_pick,
                upstream_failed,
                verify_peer,
            },
            pool: Pool::default(),
            ids: CallIds::default(),
            hard_stop: tokio_util::sync::CancellationToken::new(),
            active: Default::default(),
            stats: Stats::default(),
        });
        Ok(DataPlane {
            handle: runtime.handle().clone(),
            runtime: Mutex::new(Some(runtime)),
            shared,
            listeners: Mutex::new(HashMap::new()),
        })
    }

    /// Binds a listener; returns the address bound (TCP port 0 replaced by the real one).
    #[pyo3(signature = (address, *, listener_id, caller=String::new(), tls=None, unix_mode=0o600, services=None))]
    fn listen(
        &self,
        address: &str,
        listener_id: String,
        caller: String,
        tls: Option<PyRef<'_, TlsConfig>>,
        unix_mode: u32,
        services: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<String> {
        let services = match services {
            Some(items) => {
                let mut set = HashSet::new();
                for item in items.try_iter()? {
                    set.insert(item?.extract::<String>()?);
                }
                Some(set)
            }
            None => None,
        };
        if self.shared.hard_stop.is_cancelled() {
            return Err(PyRuntimeError::new_err("the data plane is stopped"));
        }
        let spec = ListenerSpec {
            id: listener_id.clone(),
            caller,
            tls: tls.map(|t| t.settings.clone()),
            unix_mode,
            services,
        };
        let bound =
            listener::listen(self.shared.clone(), &self.handle, address, spec).map_err(os_error)?;
        let address = bound.address.clone();
        self.listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(listener_id)
            .or_default()
            .push(bound);
        Ok(address)
    }

    /// Stops accepting on a listener's addresses; its connections get GOAWAY and finish
    /// the calls they have. Returns False when no listener has that id.
    fn close_listener(&self, listener_id: &str) -> bool {
        let bound = self
            .listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(listener_id);
        match bound {
            Some(bound) => {
                bound.iter().for_each(close);
                true
            }
            None => false,
        }
    }

    /// Adds (or replaces) an upstream replica.
    #[pyo3(signature = (replica_key, address, *, expected_uid=None, verify=false, span_attributes=None))]
    fn set_upstream(
        &self,
        replica_key: &str,
        address: &str,
        expected_uid: Option<u32>,
        verify: bool,
        span_attributes: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let attributes = span_attributes.map(attributes_of).transpose()?;
        let address = Address::parse(address).map_err(PyValueError::new_err)?;
        if verify && self.shared.decider.verify_peer.is_none() {
            return Err(PyValueError::new_err(
                "verify=True needs DataPlane(verify_peer=...)",
            ));
        }
        self.shared.pool.set(
            replica_key,
            address,
            PeerCheck {
                uid: expected_uid,
                ask: verify,
            },
            attributes,
        );
        Ok(())
    }

    /// Removes an upstream: its connection closes; its calls in flight end UNAVAILABLE
    /// (through `upstream_failed`). Returns False when it was not there.
    fn remove_upstream(&self, replica_key: &str) -> bool {
        self.shared.pool.remove(replica_key)
    }

    /// Attempts in flight on one replica, or routed calls in flight in all (no key).
    #[pyo3(signature = (replica_key=None))]
    fn in_flight(&self, replica_key: Option<&str>) -> usize {
        match replica_key {
            None => self.shared.admission.in_flight(),
            Some(key) => self
                .shared
                .pool
                .get(key)
                .map(|u| u.in_flight())
                .unwrap_or(0),
        }
    }

    /// (in flight, consecutive failures, successes, failures) of one replica, or None.
    fn upstream_stats(&self, replica_key: &str) -> Option<(usize, u64, u64, u64)> {
        let upstream = self.shared.pool.get(replica_key)?;
        let (consecutive, ok, failed) = upstream.outliers.snapshot();
        Some((upstream.in_flight(), consecutive, ok, failed))
    }

    /// Drains the records of routed calls that finished since the last call.
    fn take_records<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let records = self.shared.records.take();
        let list = PyList::empty(py);
        for r in records {
            let record = Record {
                context: r.context.unwrap_or_else(|| py.None()),
                listener: r.listener.to_string(),
                caller: r.caller.to_string(),
                principal: r.principal.to_string(),
                path: r.path,
                call_id: r.call_id,
                code: r.code,
                message: r.message,
                requests: r.requests,
                responses: r.responses,
                start_ns: r.start_ns,
                decided_ns: r.decided_ns,
                end_ns: r.end_ns,
                trace_id: r.trace.trace_id,
                server_span_id: r.trace.server_span_id,
                parent_span_id: r.trace.parent_span_id,
                sampled: r.trace.sampled,
                upstream: r.upstream,
                attempts: r
                    .attempts
                    .into_iter()
                    .map(|a| {
                        (
                            a.replica, a.outcome, a.code, a.start_ns, a.end_ns, a.span_id, a.detail,
                        )
                    })
                    .collect(),
            };
            list.append(Py::new(py, record)?)?;
        }
        Ok(list)
    }

    /// Drains the trace store rows of the data plane's spans (tracing on, sampled calls):
    /// `(trace_id, span_id, parent_span_id, name, service, kind, start_ns, end_ns, error,
    /// status_message, attributes_json)`, as `TraceStore.add` takes them.
    fn take_span_rows<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let rows = self.shared.rows.take();
        let list = PyList::empty(py);
        for r in rows {
            let row = (
                r.trace_id,
                r.span_id,
                r.parent_span_id,
                &*r.name,
                &*r.service,
                r.kind,
                r.start_ns,
                r.end_ns,
                u8::from(r.error),
                r.status_message,
                r.attributes,
            );
            list.append(row)?;
        }
        Ok(list)
    }

    /// Counters for metrics.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = &self.shared;
        let dict = PyDict::new(py);
        dict.set_item("in_flight", s.admission.in_flight())?;
        dict.set_item("streams", s.active.load(Ordering::Relaxed))?;
        dict.set_item("calls", s.stats.calls.load(Ordering::Relaxed))?;
        dict.set_item("refused", s.stats.refused.load(Ordering::Relaxed))?;
        dict.set_item("retries", s.stats.retries.load(Ordering::Relaxed))?;
        dict.set_item(
            "internal_calls",
            s.stats.internal_calls.load(Ordering::Relaxed),
        )?;
        dict.set_item("records_waiting", s.records.len())?;
        dict.set_item("records_dropped", s.records.dropped())?;
        dict.set_item("span_rows_dropped", s.rows.dropped())?;
        Ok(dict)
    }

    /// Stops: no new connections, GOAWAY on every connection, calls in flight get
    /// `grace` seconds to finish, then the rest end UNAVAILABLE ("the mesh is shutting
    /// down..."). Blocks (without the GIL) until done; returns the calls cut off.
    fn stop(&self, py: Python<'_>, grace: f64) -> PyResult<usize> {
        let grace = duration(grace, "grace")?;
        let bound: Vec<Listening> = self
            .listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .flat_map(|(_, b)| b)
            .collect();
        let shared = self.shared.clone();
        let cut = py.detach(move || {
            bound.iter().for_each(close);
            let wait = |limit: Duration| {
                let until = Instant::now() + limit;
                while shared.active.load(Ordering::Acquire) > 0 && Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(5));
                }
            };
            wait(grace);
            let cut = shared.active.load(Ordering::Acquire);
            shared.hard_stop.cancel();
            wait(Duration::from_secs(2));
            shared.pool.clear();
            if let Some(internal) = &shared.internal {
                internal.removed.cancel();
            }
            cut
        });
        Ok(cut)
    }

    fn __repr__(&self) -> String {
        let listeners: Vec<String> = self
            .listeners
            .lock()
            .map(|l| l.values().flatten().map(|b| b.address.clone()).collect())
            .unwrap_or_default();
        format!("DataPlane(listening on {listeners:?})")
    }
}

/// Gives a runtime thread a Python thread state for its whole life.
///
/// `Python::attach` on a thread without one creates a thread state and destroys it
/// again when it returns: per call, that is an mmap/munmap of its frame stack and a
/// gettid (measured: the largest cost of a call's decision). Ensuring one thread state
/// here, then releasing the GIL, keeps the state: later attaches only take the GIL.
fn keep_thread_state() {
    // SAFETY: PyGILState_Ensure may be called on any thread once the interpreter is
    // initialized (it is: this module was imported). It returns holding the GIL with
    // this thread's state, which PyEval_SaveThread then releases; the gilstate count
    // stays 1, so the state outlives every later Ensure/Release pair. It is freed with
    // the interpreter at exit (runtime threads never call into Python after that).
    unsafe {
        let _ = pyo3::ffi::PyGILState_Ensure();
        let _ = pyo3::ffi::PyEval_SaveThread();
    }
}

fn close(bound: &Listening) {
    bound.closed.cancel();
    let _ = bound.drain.send(true);
    if let Some(path) = &bound.unix_path {
        let _ = std::fs::remove_file(path);
    }
}

impl Drop for DataPlane {
    fn drop(&mut self) {
        self.shared.hard_stop.cancel();
        self.shared.pool.clear();
        if let Some(runtime) = self.runtime.lock().ok().and_then(|mut r| r.take()) {
            runtime.shutdown_background();
        }
    }
}

#[pymodule]
fn sidemesh_dataplane(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<DataPlane>()?;
    m.add_class::<Call>()?;
    m.add_class::<Decision>()?;
    m.add_class::<Refusal>()?;
    m.add_class::<RetryPolicy>()?;
    m.add_class::<TlsConfig>()?;
    m.add_class::<Record>()?;
    m.add_class::<PySpanAttributes>()?;
    Ok(())
}
