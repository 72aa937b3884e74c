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
use crate::vduse::{VduseDevice, VduseError};

use super::device::VirtioDevice;

use super::queue::lock;

/// Why a request to the front-end was not delivered (or was answered with a refusal).
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// No front-end is being served right now.
    #[error("{request}: no front-end is connected")]
    NoFrontend {
        /// The request that needed a front-end.
        request: &'static str,
    },
    /// A front-end is connected but gave no back-end channel: it did not ack
    /// `BACKEND_REQ` or never sent `SET_BACKEND_REQ_FD`.
    #[error(
        "{request}: the front-end did not set up the back-end channel \
         (BACKEND_REQ was not negotiated, or no SET_BACKEND_REQ_FD)"
    )]
    NoChannel {
        /// The request that needed the channel.
        request: &'static str,
    },
    /// The front-end answered a lookup with success but sent no fd with it.
    #[error("{request}: the front-end found the object but sent no fd")]
    NoFd {
        /// The request whose reply lacked the fd.
        request: &'static str,
    },
    /// The request itself failed on the channel: a protocol feature the front-end did not
    /// ack (`InactiveFeature`), a refusal, a timeout, a broken channel.
    #[error(transparent)]
    Channel(#[from] UserError),
    /// A VDUSE device is served: the kernel refused the new configuration space or its
    /// interrupt.
    #[error(transparent)]
    Vduse(#[from] VduseError),
}

#[derive(Debug, Default)]
struct LinkState {
    /// A front-end is being served.
    connected: bool,
    channel: Option<Arc<BackendChannel>>,
    /// Served through VDUSE: configuration changes go to the kernel instead.
    vduse: Option<VduseLink>,
}

/// The VDUSE device being served and the device whose configuration it shows.
#[derive(Clone)]
struct VduseLink {
    dev: Arc<VduseDevice>,
    device: Arc<dyn VirtioDevice>,
}

impl std::fmt::Debug for VduseLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VduseLink")
            .field("dev", &self.dev.name())
            .finish()
    }
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
    /// A link with no front-end: the daemon fills it when a session starts.
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
            ..LinkState::default()
        };
    }

    /// A VDUSE run started: config changes of `device` go to `dev` until it ends
    /// ([`session_ended`](Self::session_ended)).
    pub(crate) fn vduse_started(&self, dev: Arc<VduseDevice>, device: Arc<dyn VirtioDevice>) {
        *lock(&self.state) = LinkState {
            connected: true,
            channel: None,
            vduse: Some(VduseLink { dev, device }),
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
    /// Through VDUSE: the device's configuration space is written to the kernel
    /// (`VDUSE_DEV_SET_CONFIG`) and the driver interrupted (`DEV_INJECT_CONFIG_IRQ`).
    pub fn config_changed(&self) -> Result<(), LinkError> {
        let vduse = lock(&self.state).vduse.clone();
        if let Some(v) = vduse {
            v.dev.set_config(0, &v.device.config())?;
            return Ok(v.dev.inject_config_irq()?);
        }
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

#[cfg(test)]
mod tests {
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;
    use std::sync::mpsc;
    use std::thread;

    use super::*;
    use crate::daemon::{Daemon, DeviceError, VirtioDevice};
    use crate::memory::GuestMemory;
    use crate::sys::memfd_create;
    use crate::user::codes::{protocol_features as pf, VHOST_USER_F_PROTOCOL_FEATURES};
    use crate::user::payload::ShmemMapPayload;
    use crate::user::{Frontend, FrontendReqHandler, Result as UserResult};
    use crate::vring::DescriptorChain;

    /// A device with a shared memory window (it offers SHMEM), keeping its link.
    #[derive(Default)]
    struct Window {
        link: Mutex<Option<FrontendLink>>,
    }

    impl VirtioDevice for Window {
        fn device_type(&self) -> u32 {
            26 // virtio-fs, whose DAX window is shared memory region 0
        }
        fn num_queues(&self) -> u16 {
            1
        }
        fn features(&self) -> u64 {
            0
        }
        fn protocol_features(&self) -> u64 {
            pf::SHMEM
        }
        fn config(&self) -> Vec<u8> {
            Vec::new()
        }
        fn attach_frontend(&self, link: FrontendLink) {
            *lock(&self.link) = Some(link);
        }
        fn process(
            &self,
            _: u16,
            _: &GuestMemory,
            _: Vec<DescriptorChain>,
            _: &mut Vec<(u16, u32)>,
        ) -> Result<(), DeviceError> {
            Ok(())
        }
    }

    /// The front-end's side: reads what each mapping's fd holds.
    struct Mapper(mpsc::Sender<(ShmemMapPayload, Vec<u8>)>);

    impl FrontendReqHandler for Mapper {
        fn shmem_map(&mut self, map: &ShmemMapPayload, fd: OwnedFd) -> UserResult<u64> {
            let mut file = std::fs::File::from(fd);
            file.seek(SeekFrom::Start(map.fd_offset))?;
            let mut bytes = vec![0u8; map.len as usize];
            file.read_exact(&mut bytes)?;
            self.0.send((*map, bytes)).unwrap();
            Ok(0)
        }
        fn shmem_unmap(&mut self, map: &ShmemMapPayload) -> UserResult<u64> {
            self.0.send((*map, Vec::new())).unwrap();
            Ok(0)
        }
    }

    #[test]
    fn a_device_maps_and_unmaps_shared_memory_through_its_link() {
        let device = Arc::new(Window::default());
        let daemon = Arc::new(Daemon::new(device.clone()).unwrap());
        let link = lock(&device.link)
            .clone()
            .expect("the daemon hands the link over");
        assert!(matches!(
            link.shmem_unmap(0, 0, 4096),
            Err(LinkError::NoFrontend { .. })
        ));
        let (a, b) = UnixStream::pair().unwrap();
        let d = daemon.clone();
        let server = thread::spawn(move || d.serve_stream(b));
        let fe = Frontend::new(a).unwrap();
        fe.get_features().unwrap();
        fe.set_owner().unwrap();
        let offered = fe.get_protocol_features().unwrap();
        let want = pf::BACKEND_REQ | pf::BACKEND_SEND_FD | pf::REPLY_ACK | pf::SHMEM;
        assert_eq!(offered & want, want);
        fe.set_protocol_features(want).unwrap();
        fe.set_features(VHOST_USER_F_PROTOCOL_FEATURES | 1 << 32)
            .unwrap();
        let mut channel = fe.set_backend_req_fd().unwrap();
        fe.get_features().unwrap(); // the channel is attached once this is answered
        assert!(link.connected() && link.has_channel());
        let (tx, rx) = mpsc::channel();
        let front = thread::spawn(move || {
            let mut mapper = Mapper(tx);
            for _ in 0..2 {
                channel.handle_one(&mut mapper).unwrap();
            }
        });

        let mut file = std::fs::File::from(memfd_create("window", 8192).unwrap());
        file.seek(SeekFrom::Start(4096)).unwrap();
        file.write_all(b"mapped by the device").unwrap();
        link.shmem_map(0, 4096, 0x10000, 20, true, file.as_fd())
            .unwrap();
        let (map, bytes) = rx.recv().unwrap();
        assert_eq!((map.shmid, map.shm_offset, map.len), (0, 0x10000, 20));
        assert_eq!(bytes, b"mapped by the device");
        link.shmem_unmap(0, 0x10000, 20).unwrap();
        let (map, _) = rx.recv().unwrap();
        assert_eq!((map.shm_offset, map.len), (0x10000, 20));
        front.join().unwrap();

        drop(fe);
        server.join().unwrap().unwrap();
        assert!(!link.connected());
        assert!(matches!(
            link.shmem_unmap(0, 0, 4096),
            Err(LinkError::NoFrontend { .. })
        ));
    }
}
