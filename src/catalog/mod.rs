//! What pgveil learns from the upstream server's system catalogs to decide which rule
//! applies to a result column.
//!
//! This module only reads and interprets catalog data; it must never decide masking on
//! its own, and whatever it cannot interpret precisely it reports conservatively (more
//! source columns, never fewer).

pub mod lineage;
pub mod node_tree;
