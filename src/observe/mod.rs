//! What pgveil tells operators about itself: Prometheus metrics, the admin HTTP
//! endpoint that serves them with health and readiness, and the audit log.
//!
//! Nothing here may ever carry a protected value: metric labels name roles, tables,
//! columns and reasons, never data; audit records carry statement fingerprints, names and counts.

pub mod audit;
pub mod audit_log;
pub mod fingerprint;
pub mod http;
pub mod metrics;

pub use metrics::{metrics, DenyReason, Metrics};
