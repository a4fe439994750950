//! Sidemesh's native data plane: the orchestrator forwards in Rust and decides in Python.
//!
//! One tokio runtime on its own threads owns every listener; each routed call's first
//! request message goes to one synchronous Python decision, and the rest of the call
//! (payloads as bytes, flow control, deadlines, cancellation, retries, TLS) stays here.

pub mod admission;
mod attempt;
pub mod authority;
mod call;
pub mod config;
pub mod decision;
pub mod forward;
pub mod grpc;
pub mod identity;
pub mod listener;
pub mod outlier;
pub mod pool;
pub mod records;
pub mod retry;
pub mod spans;
pub mod tls;

#[cfg(feature = "python")]
mod python;
