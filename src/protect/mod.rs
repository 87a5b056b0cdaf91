//! Value transforms: masks, the encryption envelope and keyring, and the logical types
//! of encrypted columns.
//!
//! Everything here is sans-IO and works on single column values that the session has
//! already decided to transform; the policy decides *whether* a value is transformed,
//! this module only decides *how*. Nothing in here may ever return, log or put into an
//! error message the original value of a protected column.

pub mod column_crypto;
pub mod envelope;
pub mod keyring;
pub mod logical;
pub mod mask;
pub mod pgtypes;
