//! A device's way to its front-end: the back-end request channel of the session being
//! served (`SET_BACKEND_REQ_FD`), behind a handle that outlives sessions.
//!
//! The daemon owns one [`FrontendLink`] and hands clones to the device
//! ([`VirtioDevice::attach_frontend`](super::VirtioDevice::attach_frontend)) and to whoever
//! drives the daemon (a `resize` call, a signal handler). Each session attaches its channel
//! when the front-end sends one and detaches it when the session ends, so a request made
//! between sessions, or to a front-end that never set up the channel, fails with an error
//! that says which of the two it was instead of writing to a dead socket.

use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex};

use crate::user::{BackendChannel, Error as UserError};

use super::queue::lock;

/// Why a request to the front-end was not delivered (or was answered with a refusal).
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// No front-end is being served right now.
    #[error("{request}: no front-end is connected")]
    NoFrontend { request: &'static str },
    /// A front-end is connected but gave no back-end channel: it did not ack
    /// `BACKEND_REQ` or never sent `SET_BACKEND_REQ_FD`.
    #[error(
        "{request}: the front-end did not set up the back-end channel \
         (BACKEND_REQ was not negotiated, or no SET_BACKEND_REQ_FD)"
    )]
    NoChannel { request: &'static str },
    /// The front-end answered a lookup with success but sent no fd with it.
    #[error("{request}: the front-end found the object but sent no fd")]
    NoFd { request: &'static str },
    /// The request itself failed on the channel: a protocol feature the front-end did not
    /// ack (`InactiveFeature`), a refusal, a timeout, a broken channel.
    #[error(transparent)]
    Channel(#[from] UserError),
}

#[derive(Debug, Default)]
struct LinkState {
    /// A front-end is being served.
    connected: bool,
    channel: Option<Arc<BackendChannel>>,
}

/// A cloneable handle on the current session's back-end channel. Every request blocks
/// until the front-end has taken it (and acked it, with `REPLY_ACK`), bounded by the
/// channel's timeout; call it from a device or control thread, never while holding
/// something the session thread needs.
#[derive(Debug, Clone, Default)]
pub struct FrontendLink {
    state: Arc<Mutex<LinkState>>,
}

impl FrontendLink {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether a front-end is being served.
    pub fn connected(&self) -> bool {
        lock(&self.state).connected
    }

    /// Whether the front-end being served set up the back-end channel.
    pub fn has_channel(&self) -> bool {
        lock(&self.state).channel.is_some()
    }

    pub(crate) fn session_started(&self) {
        *lock(&self.state) = LinkState {
            connected: true,
            channel: None,
        };
    }

    pub(crate) fn attach(&self, channel: Arc<BackendChannel>) {
        lock(&self.state).channel = Some(channel);
    }

    pub(crate) fn session_ended(&self) {
        *lock(&self.state) = LinkState::default();
    }

    /// The channel, cloned out so that a slow front-end never holds the link's lock.
    fn channel(&self, request: &'static str) -> Result<Arc<BackendChannel>, LinkError> {
        let st = lock(&self.state);
        match (&st.channel, st.connected) {
            (Some(ch), _) => Ok(ch.clone()),
            (None, true) => Err(LinkError::NoChannel { request }),
            (None, false) => Err(LinkError::NoFrontend { request }),
        }
    }

    /// Tells the front-end the configuration space changed (`CONFIG_CHANGE_MSG`): it
    /// re-reads it with `GET_CONFIG` and interrupts the driver. Needs `CONFIG`.
    pub fn config_changed(&self) -> Result<(), LinkError> {
        Ok(self.channel("CONFIG_CHANGE_MSG")?.config_change()?)
    }

    /// Registers the object `uuid` this device exports (`SHARED_OBJECT_ADD`).
    pub fn shared_object_add(&self, uuid: [u8; 16]) -> Result<(), LinkError> {
        Ok(self.channel("SHARED_OBJECT_ADD")?.shared_object_add(uuid)?)
    }

    /// Withdraws an object registered with [`shared_object_add`](Self::shared_object_add).
    pub fn shared_object_remove(&self, uuid: [u8; 16]) -> Result<(), LinkError> {
        Ok(self
            .channel("SHARED_OBJECT_REMOVE")?
            .shared_object_remove(uuid)?)
    }

    /// Asks the front-end for the object `uuid` another device exported
    /// (`SHARED_OBJECT_LOOKUP`): its dma-buf fd, now the caller's, or `None` when the
    /// front-end does not know the object (a non-zero answer).
    pub fn shared_object_lookup(&self, uuid: [u8; 16]) -> Result<Option<OwnedFd>, LinkError> {
        const REQUEST: &str = "SHARED_OBJECT_LOOKUP";
        match self.channel(REQUEST)?.shared_object_lookup_fd(uuid)? {
            (0, Some(fd)) => Ok(Some(fd)),
            (0, None) => Err(LinkError::NoFd { request: REQUEST }),
            _ => Ok(None),
        }
    }

    /// Maps `len` bytes of `fd` from `fd_offset` into shared memory region `shmid` at
    /// `shm_offset` (`SHMEM_MAP`; the fd stays the caller's). Needs `SHMEM`.
    pub fn shmem_map(
        &self,
        shmid: u8,
        fd_offset: u64,
        shm_offset: u64,
        len: u64,
        writable: bool,
        fd: BorrowedFd<'_>,
    ) -> Result<(), LinkError> {
        Ok(self
            .channel("SHMEM_MAP")?
            .shmem_map(shmid, fd_offset, shm_offset, len, writable, fd)?)
    }

    /// Unmaps what [`shmem_map`](Self::shmem_map) mapped (`SHMEM_UNMAP`).
    pub fn shmem_unmap(&self, shmid: u8, shm_offset: u64, len: u64) -> Result<(), LinkError> {
        Ok(self
            .channel("SHMEM_UNMAP")?
            .shmem_unmap(shmid, shm_offset, len)?)
    }
}
