//! What pgveil learns from the upstream server's system catalogs to decide which rule
//! applies to a result column.
//!
//! This module only reads and interprets catalog data; it must never decide masking on
//! its own, and whatever it cannot interpret precisely it reports conservatively (more
//! source columns, never fewer). It reads with the `catalog` login, never through a
//! client's session.

pub mod connect;
pub mod lineage;
pub mod node_tree;
pub mod rules;
pub mod snapshot;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum CatalogError {
    #[error(
        "no `catalog` login in the config: pgveil needs one to read which columns are protected"
    )]
    NotConfigured,
    #[error("catalog password variable {variable} is not set")]
    PasswordUnset { variable: String },
    #[error("catalog TLS: {0}")]
    Tls(String),
    #[error("cannot connect to database {database} as {user}: {reason}")]
    Connect {
        database: String,
        user: String,
        reason: String,
    },
    #[error("catalog query for {what} failed: {reason}")]
    Query { what: &'static str, reason: String },
}
