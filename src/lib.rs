//! pgveil: a transparent PostgreSQL proxy that adds role-based masking (and, later,
//! field-level encryption) without application changes.
//!
//! This crate root only wires the modules together; see `ARCHITECTURE.md` for the map.

pub mod catalog;
pub mod config;
pub mod demo;
pub mod engine;
pub mod migrate;
pub mod observe;
pub mod policy;
pub mod protect;
pub mod server;
pub mod session;
pub mod sql;
pub mod sqltext;
pub mod tls;
pub mod wire;
