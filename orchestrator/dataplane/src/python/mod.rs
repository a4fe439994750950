//! The PyO3 boundary: the `sidemesh_dataplane` module, its `DataPlane` and the small
//! value classes the Python decision reads and returns. See `sidemesh_dataplane.pyi`.
//!
//! Threading: `decide`, `retry_pick`, `upstream_failed` and `verify_peer` are called
//! on the data plane's tokio threads, holding the GIL only for the call itself.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use pyo3::exceptions::{PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use crate::admission::Admission;
use crate::config::{Address, Config, H2Settings, Kind};
use crate::decision::{self, CallInfo, Decider, Verdict};
use crate::forward::{Shared, Stats};
use crate::grpc::{code, Status};
use crate::listener::{self, Bound as Listening, ListenerSpec};
use crate::pool::{PeerCheck, Pool, Upstream};
use crate::records::{CallIds, Records};
use crate::spans::Rows;

mod values;

use values::{
    attributes_of, duration, Call, Decision, PySpanAttributes, Record, Refusal, RetryPolicy,
    TlsConfig,
};

// -- the decider -------------------------------------------------------------------

struct PyDecider {
    decide: Py<PyAny>,
    retry_pick: Py<PyAny>,
    upstream_failed: Py<PyAny>,
    verify_peer: Option<Py<PyAny>>,
    timing: DecideTiming,
}

/// What the decisions cost the runtime threads: the wait for the GIL and the time
/// holding it (the Python call, and making and reading the objects around it).
#[derive(Default)]
struct DecideTiming {
    count: AtomicU64,
    wait_ns: AtomicU64,
    run_ns: AtomicU64,
}

fn internal_error(py: Python<'_>, what: &str, err: PyErr) -> Status {
    let message = format!("the mesh failed to route the call ({what} raised {err})");
    log_error(py, what, err);
    Status::new(code::INTERNAL, message)
}

/// Logs a callback's exception with its traceback on the `sidemesh.dataplane` logger.
fn log_error(py: Python<'_>, what: &str, err: PyErr) {
    let logged = py.import("logging").and_then(|logging| {
        let logger = logging.call_method1("getLogger", ("sidemesh.dataplane",))?;
        let kwargs = pyo3::types::PyDict::new(py);
        kwargs.set_item("exc_info", err.value(py))?;
        logger.call_method(
            "error",
            ("the data plane's %s callback raised", what),
            Some(&kwargs),
        )
    });
    if logged.is_err() {
        err.display(py);
    }
}

impl PyDecider {
    /// One decision, the GIL held.
    fn decide_one(&self, py: Python<'_>, call: CallInfo) -> Verdict<Py<PyAny>> {
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
    }
}

impl Decider for PyDecider {
    type Context = Py<PyAny>;

    fn decide(&self, call: CallInfo) -> Verdict<Py<PyAny>> {
        self.decide_all(vec![call]).pop().unwrap_or_else(|| {
            Verdict::Refuse(Status::new(code::INTERNAL, "the call's decision was lost"))
        })
    }

    fn decide_all(&self, calls: Vec<CallInfo>) -> Vec<Verdict<Py<PyAny>>> {
        let asked = Instant::now();
        let mut held = asked;
        let count = calls.len() as u64;
        let verdicts = Python::attach(|py| {
            held = Instant::now();
            calls
                .into_iter()
                .map(|call| self.decide_one(py, call))
                .collect()
        });
        let done = Instant::now();
        let t = &self.timing;
        t.count.fetch_add(count, Ordering::Relaxed);
        t.wait_ns
            .fetch_add((held - asked).as_nanos() as u64, Ordering::Relaxed);
        t.run_ns
            .fetch_add((done - held).as_nanos() as u64, Ordering::Relaxed);
        verdicts
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
                    log_error(py, "retry_pick", err);
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
                    log_error(py, "upstream_failed", err);
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
                log_error(py, "verify_peer", err);
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
        upstream_connections=1, complete_after=HashMap::new(),
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
        complete_after: HashMap<String, u8>,
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
            complete_after,
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
                timing: DecideTiming::default(),
            },
            batcher: Default::default(),
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
        let timing = &s.decider.timing;
        dict.set_item("decisions", timing.count.load(Ordering::Relaxed))?;
        dict.set_item("decision_batches", s.batcher.batches())?;
        dict.set_item("decide_gil_wait_ns", timing.wait_ns.load(Ordering::Relaxed))?;
        dict.set_item("decide_gil_held_ns", timing.run_ns.load(Ordering::Relaxed))?;
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
