//! The vhost-user protocol, both sides: framing and payloads, the front-end that shares its
//! virtqueues, and the back-end session that consumes them.

pub mod codes;
pub mod error;
pub mod header;
pub mod message;
pub mod payload;

pub use error::{Error, Result};
