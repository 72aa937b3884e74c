//! Postcopy on the back-end side: the userfaultfd of one session and the mappings
//! registered with it.
//!
//! POSTCOPY_ADVISE creates the userfaultfd and hands the front-end a second handle;
//! POSTCOPY_LISTEN registers every mapping of guest memory with it, and every mapping
//! that arrives later (SET_MEM_TABLE, ADD_MEM_REG) until POSTCOPY_END, which unregisters
//! and closes. Nothing changes in the data path: a worker that touches a page the
//! destination has not received yet sleeps in the kernel until the front-end copies the
//! page in.
//!
//! A registered region is kept mapped (an `Arc`) until it is unregistered, so a range is
//! never unregistered after its addresses were reused by another mapping.
//!
//! Teardown wakes every waiter: unregistering a range wakes the threads waiting on it
//! (they then see an ordinary page: zeros where the front-end never copied anything). The
//! daemon tears postcopy down before it stops its workers when a session ends, so a
//! front-end that dies mid-postcopy never leaves a worker asleep on a page nobody will
//! send (the front-end's own handle, gone with it, is not what wakes them: ours would
//! keep the object alive).

use std::sync::Arc;

use crate::memory::{GuestMemory, GuestRegion};
use crate::sys::userfaultfd::{Userfaultfd, UFFD_FEATURE_MISSING_SHMEM};
use crate::user::{Error, Result};

/// One session's postcopy state, from POSTCOPY_ADVISE to POSTCOPY_END.
#[derive(Debug)]
pub(crate) struct Postcopy {
    uffd: Userfaultfd,
    /// Between POSTCOPY_LISTEN and POSTCOPY_END: new mappings are registered too.
    listening: bool,
    registered: Vec<Arc<GuestRegion>>,
}

impl Postcopy {
    /// POSTCOPY_ADVISE: a userfaultfd for shared memory, and the handle for the front-end.
    pub(crate) fn advise() -> Result<(Self, std::os::fd::OwnedFd)> {
        let uffd = Userfaultfd::new(UFFD_FEATURE_MISSING_SHMEM)
            .map_err(|e| Error::Handler(format!("POSTCOPY_ADVISE: {e}")))?;
        let theirs = uffd
            .try_clone_fd()
            .map_err(|e| Error::Handler(format!("POSTCOPY_ADVISE: dup the userfaultfd: {e}")))?;
        let state = Postcopy {
            uffd,
            listening: false,
            registered: Vec::new(),
        };
        Ok((state, theirs))
    }

    /// POSTCOPY_LISTEN: registers every region of `mem`, and later ones from now on.
    pub(crate) fn listen(&mut self, mem: &GuestMemory) -> Result<()> {
        if self.listening {
            return Err(Error::InvalidParam(
                "POSTCOPY_LISTEN: postcopy is already listening".into(),
            ));
        }
        self.listening = true;
        // All or nothing: a refused LISTEN leaves nothing registered and postcopy advised.
        self.track(mem, "POSTCOPY_LISTEN").inspect_err(|_| {
            let _ = self.unregister_all();
        })
    }

    /// Registers the regions of `mem` not registered yet (while listening); `request`
    /// names the request in errors. Regions that left the table stay registered (and
    /// mapped) until POSTCOPY_END: a worker may still be in a batch on them.
    pub(crate) fn track(&mut self, mem: &GuestMemory, request: &str) -> Result<()> {
        if !self.listening {
            return Ok(());
        }
        for region in mem.regions() {
            if self.registered.iter().any(|r| Arc::ptr_eq(r, region)) {
                continue;
            }
            let info = region.info();
            self.uffd
                .register(region.as_ptr() as u64, region.len())
                .map_err(|e| {
                    Error::InvalidParam(format!(
                        "{request}: register guest memory {:#x}..{:#x} with the userfaultfd: {e} \
                         (postcopy needs shared memory: memfd, tmpfs)",
                        info.guest_phys_addr,
                        info.guest_phys_addr + info.memory_size
                    ))
                })?;
            self.registered.push(region.clone());
        }
        Ok(())
    }

    /// Unregisters everything (waking every waiter) and drops the mappings kept for it.
    /// Returns the first failure, after trying every region.
    pub(crate) fn unregister_all(&mut self) -> std::io::Result<()> {
        let mut first = Ok(());
        for region in self.registered.drain(..) {
            let r = self.uffd.unregister(region.as_ptr() as u64, region.len());
            if first.is_ok() {
                first = r;
            }
        }
        self.listening = false;
        first
    }
}

impl Drop for Postcopy {
    fn drop(&mut self) {
        let _ = self.unregister_all();
    }
}
