//! pgveil: a transparent PostgreSQL proxy that will add field-level encryption and
//! role-based masking without application changes.
//!
//! This crate root only wires the modules together; see `ARCHITECTURE.md` for the map.

pub mod catalog;
pub mod config;
pub mod protect;
pub mod server;
pub mod session;
pub mod tls;
pub mod wire;
