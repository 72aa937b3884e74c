//! The vhost-user protocol, both sides: framing and payloads, the front-end that shares its
//! virtqueues, and the back-end session that consumes them.

pub mod backend;
pub mod channel;
pub mod codes;
pub mod connection;
pub mod describe;
pub mod device_state;
pub mod error;
pub mod frontend;
pub mod header;
mod layout;
pub mod listener;
pub mod message;
pub mod payload;
pub mod postcopy;

pub use backend::{BackendHandler, BackendSession};
pub use channel::{BackendChannel, FrontendChannel, FrontendReqHandler};
pub use device_state::MAX_DEVICE_STATE;
pub use error::{Error, Result};
pub use frontend::Frontend;
pub use listener::Listener;

#[cfg(test)]
mod decode_fuzz_tests;
#[cfg(test)]
mod session_tests;
