//! The shared methods of the `VhostBackend` interface, written once for the three native
//! classes that implement it (`Frontend`, `KernelDevice`, `VdpaDevice`).
//!
//! Each class says how one call reaches its core object ([`PyVhostBackend`]: which lock,
//! which wait); [`vhost_backend_pymethods!`] then generates its `#[pymethods]` block with
//! the fourteen shared methods, calling the core's `vhost_core::backend::VhostBackend`
//! trait and converting its one error type once ([`crate::errors::core_error`]). The
//! Python signatures are the same on all three classes.

use std::os::fd::RawFd;

use pyo3::prelude::*;
use vhost_core::backend::{LogRegion, MemoryRegion, VhostBackend};
use vhost_core::memory::RegionInfo;

use crate::fd::{borrow, raw_fd_of};

/// How a native class reaches its core back-end for one call.
pub(crate) trait PyVhostBackend {
    /// Runs `f` on the core back-end without the GIL (interruptible by Ctrl-C), and
    /// converts its error.
    fn with_backend<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&dyn VhostBackend) -> vhost_core::Result<T> + Send,
    ) -> PyResult<T>;
}

/// [`PyVhostBackend::with_backend`] for a class that holds its core object in an `Arc`
/// (`get` fails once the object is closed): the Arc keeps it alive for the call.
pub(crate) fn call_shared<B: VhostBackend, T: Send>(
    py: Python<'_>,
    backend: PyResult<std::sync::Arc<B>>,
    f: impl FnOnce(&dyn VhostBackend) -> vhost_core::Result<T> + Send,
) -> PyResult<T> {
    let backend = backend?;
    crate::wait::call(py, || f(&*backend))
}

/// A memory region as Python passes it: `(guest_phys_addr, memory_size, userspace_addr,
/// mmap_offset, fd)`, the fd -1 when there is none.
pub(crate) type RegionArg<'py> = (u64, u64, u64, u64, Bound<'py, PyAny>);

/// The regions' numbers and fds, checked while the GIL is held.
pub(crate) fn region_list(regions: &[RegionArg<'_>]) -> PyResult<Vec<(RegionInfo, Option<RawFd>)>> {
    regions
        .iter()
        .map(|(gpa, size, uaddr, off, fd)| {
            let fd = match fd.extract::<i64>() {
                Ok(-1) => None,
                _ => Some(raw_fd_of(fd)?),
            };
            let info = RegionInfo {
                guest_phys_addr: *gpa,
                memory_size: *size,
                userspace_addr: *uaddr,
                mmap_offset: *off,
            };
            Ok((info, fd))
        })
        .collect()
}

/// The core's memory table over `regions`, whose fds the caller's Python objects keep open.
pub(crate) fn memory_table(regions: &[(RegionInfo, Option<RawFd>)]) -> Vec<MemoryRegion<'static>> {
    regions
        .iter()
        .map(|(info, fd)| MemoryRegion {
            info: *info,
            fd: fd.map(borrow),
        })
        .collect()
}

/// A dirty-log region as Python passes it: `(mmap_size, mmap_offset, fd)`.
pub(crate) fn log_region(
    region: Option<(u64, u64, Bound<'_, PyAny>)>,
) -> PyResult<Option<(u64, u64, RawFd)>> {
    region
        .map(|(size, offset, fd)| Ok((size, offset, raw_fd_of(&fd)?)))
        .transpose()
}

/// The core's view of a checked [`log_region`].
pub(crate) fn log_of(region: Option<(u64, u64, RawFd)>) -> Option<LogRegion<'static>> {
    region.map(|(mmap_size, mmap_offset, fd)| LogRegion {
        mmap_size,
        mmap_offset,
        fd: borrow(fd),
    })
}

/// `#[pymethods] impl $class { <the shared methods> <the class's own methods> }`: the
/// class implements [`PyVhostBackend`]; its own methods go inside the braces.
macro_rules! vhost_backend_pymethods {
    ($class:ty { $($own:tt)* }) => {
        $crate::backend_methods::vhost_backend_pymethods!(
            @impl $class [set_vring_kick set_vring_call set_vring_err] { $($own)* }
        );
    };
    (@impl $class:ty [$($vring_fd:ident)*] { $($own:tt)* }) => {
        #[pymethods]
        impl $class {
            /// `GET_FEATURES`: the virtio feature bits the device offers.
            fn get_features(&self, py: Python<'_>) -> PyResult<u64> {
                self.with_backend(py, |b| b.get_features())
            }

            /// `SET_FEATURES`.
            fn set_features(&self, py: Python<'_>, features: &Bound<'_, PyAny>) -> PyResult<()> {
                $crate::convert::uint_args!("set_features"; features: U64);
                self.with_backend(py, |b| b.set_features(features))
            }

            /// `SET_OWNER`.
            fn set_owner(&self, py: Python<'_>) -> PyResult<()> {
                self.with_backend(py, |b| b.set_owner())
            }

            /// `RESET_OWNER`.
            fn reset_owner(&self, py: Python<'_>) -> PyResult<()> {
                self.with_backend(py, |b| b.reset_owner())
            }

            /// `SET_MEM_TABLE`; `regions`: (guest_phys_addr, memory_size,
            /// userspace_addr, mmap_offset, fd) tuples, fd -1 for none.
            fn set_mem_table(
                &self,
                py: Python<'_>,
                regions: Vec<$crate::backend_methods::RegionArg<'_>>,
            ) -> PyResult<()> {
                let table = $crate::backend_methods::region_list(&regions)?;
                self.with_backend(py, move |b| {
                    b.set_mem_table(&$crate::backend_methods::memory_table(&table))
                })
            }

            /// `SET_LOG_BASE`: `base` in this process (kernel), or the shared-memory
            /// `region` (mmap_size, mmap_offset, fd) with base 0 (vhost-user).
            #[pyo3(signature = (base, region = None))]
            fn set_log_base(
                &self,
                py: Python<'_>,
                base: &Bound<'_, PyAny>,
                region: Option<(u64, u64, Bound<'_, PyAny>)>,
            ) -> PyResult<()> {
                $crate::convert::uint_args!("set_log_base"; base: U64);
                let region = $crate::backend_methods::log_region(region)?;
                self.with_backend(py, move |b| {
                    b.set_log_base(base, $crate::backend_methods::log_of(region))
                })
            }

            /// `SET_LOG_FD` (None unbinds, where the family can).
            #[pyo3(signature = (fd))]
            fn set_log_fd(&self, py: Python<'_>, fd: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
                let fd = $crate::fd::opt_fd(fd)?;
                self.with_backend(py, move |b| b.set_log_fd(fd.map($crate::fd::borrow)))
            }

            /// `SET_VRING_NUM`.
            fn set_vring_num(&self, py: Python<'_>, index: &Bound<'_, PyAny>, num: &Bound<'_, PyAny>) -> PyResult<()> {
                $crate::convert::uint_args!("set_vring_num"; index: U32, num: U32);
                self.with_backend(py, |b| b.set_vring_num(index, num))
            }

            /// `SET_VRING_ADDR`.
            #[pyo3(
                signature = (index, desc, used, avail, flags = None, log = None),
                text_signature = "(self, index, desc, used, avail, flags=0, log=0)"
            )]
            #[allow(clippy::too_many_arguments)] // mirrors the Python signature
            fn set_vring_addr(
                &self,
                py: Python<'_>,
                index: &Bound<'_, PyAny>,
                desc: &Bound<'_, PyAny>,
                used: &Bound<'_, PyAny>,
                avail: &Bound<'_, PyAny>,
                flags: Option<&Bound<'_, PyAny>>,
                log: Option<&Bound<'_, PyAny>>,
            ) -> PyResult<()> {
                $crate::convert::uint_args!(
                    "set_vring_addr";
                    index: U32, desc: U64, used: U64, avail: U64, flags: U32 = 0, log: U64 = 0
                );
                let addrs = vhost_core::backend::VringAddrs {
                    index,
                    flags,
                    desc,
                    used,
                    avail,
                    log,
                };
                self.with_backend(py, move |b| b.set_vring_addr(&addrs))
            }

            /// `SET_VRING_BASE`.
            fn set_vring_base(&self, py: Python<'_>, index: &Bound<'_, PyAny>, base: &Bound<'_, PyAny>) -> PyResult<()> {
                $crate::convert::uint_args!("set_vring_base"; index: U32, base: U32);
                self.with_backend(py, |b| b.set_vring_base(index, base))
            }

            /// `GET_VRING_BASE`: stops the ring.
            fn get_vring_base(&self, py: Python<'_>, index: &Bound<'_, PyAny>) -> PyResult<u32> {
                $crate::convert::uint_args!("get_vring_base"; index: U32);
                self.with_backend(py, |b| b.get_vring_base(index))
            }

            $(
                /// `SET_VRING_KICK`, `SET_VRING_CALL`, `SET_VRING_ERR`: an eventfd of
                /// ring `index` (None: no fd).
                #[pyo3(signature = (index, fd))]
                fn $vring_fd(
                    &self,
                    py: Python<'_>,
                    index: &Bound<'_, PyAny>,
                    fd: Option<&Bound<'_, PyAny>>,
                ) -> PyResult<()> {
                    $crate::convert::uint_args!(stringify!($vring_fd); index: U32);
                    let fd = $crate::fd::opt_fd(fd)?;
                    self.with_backend(py, move |b| b.$vring_fd(index, fd.map($crate::fd::borrow)))
                }
            )*

            $($own)*
        }
    };
}

pub(crate) use vhost_backend_pymethods;
