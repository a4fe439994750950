//! The value classes the Python decision reads and returns: `Call`, `Decision`,
//! `Refusal`, `RetryPolicy`, `SpanAttributes`, `TlsConfig`, and the `Record` of a
//! finished call.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyString};

use crate::decision::CallInfo;
use crate::grpc::{self, Status};
use crate::retry;
use crate::spans::Attributes;
use crate::tls::TlsSettings;

/// One routed call, as the decision sees it.
#[pyclass(frozen, module = "sidemesh_dataplane")]
pub(crate) struct Call {
    pub(crate) info: CallInfo,
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
pub(crate) struct RetryPolicy {
    pub(crate) policy: retry::RetryPolicy,
}

pub(crate) fn duration(seconds: f64, what: &str) -> PyResult<Duration> {
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

pub(crate) fn metadata_pairs(items: &Bound<'_, PyAny>) -> PyResult<Vec<(HeaderName, HeaderValue)>> {
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
pub(crate) struct PySpanAttributes {
    pub(crate) attributes: Attributes,
}

pub(crate) fn attributes_of(mapping: &Bound<'_, PyAny>) -> PyResult<Attributes> {
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
pub(crate) struct Decision {
    pub(crate) upstream: String,
    pub(crate) message: Option<Bytes>,
    pub(crate) metadata: Vec<(HeaderName, HeaderValue)>,
    pub(crate) context: Py<PyAny>,
    pub(crate) retry: retry::RetryPolicy,
    pub(crate) span_attributes: Option<Attributes>,
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
pub(crate) struct Refusal {
    pub(crate) status: Status,
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
pub(crate) struct TlsConfig {
    pub(crate) settings: TlsSettings,
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

pub(crate) type AttemptTuple = (String, &'static str, u32, u64, u64, String, String);

/// One finished routed call.
#[pyclass(frozen, get_all, module = "sidemesh_dataplane")]
pub(crate) struct Record {
    pub(crate) context: Py<PyAny>,
    pub(crate) listener: String,
    pub(crate) caller: String,
    pub(crate) principal: String,
    pub(crate) path: String,
    pub(crate) call_id: String,
    pub(crate) code: u32,
    pub(crate) message: String,
    pub(crate) requests: u64,
    pub(crate) responses: u64,
    pub(crate) start_ns: u64,
    pub(crate) decided_ns: u64,
    pub(crate) end_ns: u64,
    pub(crate) trace_id: String,
    pub(crate) server_span_id: String,
    pub(crate) parent_span_id: String,
    pub(crate) sampled: bool,
    pub(crate) upstream: String,
    /// (replica, outcome, code, start_ns, end_ns, client span id, detail) per attempt.
    pub(crate) attempts: Vec<AttemptTuple>,
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
