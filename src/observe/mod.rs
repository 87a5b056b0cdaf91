//! What pgveil tells operators about itself: Prometheus metrics and the admin HTTP
//! endpoint that serves them with health and readiness.
//!
//! Nothing here may ever carry a protected value: metric labels name roles, tables,
//! columns and reasons, never data.

pub mod audit;
pub mod fingerprint;
pub mod http;
pub mod metrics;

pub use metrics::{metrics, DenyReason, Metrics};
