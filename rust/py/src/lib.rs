//! `vhost._core`: the PyO3 glue over `vhost_core`. Classes here copy their inputs, release
//! the GIL around blocking calls and convert errors; the protocol lives in the core.

use pyo3::prelude::*;

mod backend;
mod backend_methods;
mod blkload;
mod channel;
mod codes;
mod convert;
mod daemon;
mod describe;
mod dirty_log;
mod errors;
mod eventfd;
mod fd;
mod frontend;
mod frontend_calls;
mod handler;
mod kern;
mod link;
mod memory;
mod postcopy;
mod vdpa;
mod vring;
mod wait;

/// The native module under the `vhost` package: PyO3 glue over the Rust core, which
/// converts types and releases the GIL. Use the typed facade (`vhost`, `vhost.user`...).
#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<fd::FileDescriptor>()?;
    m.add_class::<eventfd::PyEventFd>()?;
    m.add_class::<memory::PyGuestMemory>()?;
    m.add_class::<memory::GuestView>()?;
    m.add_class::<dirty_log::PyDirtyLog>()?;
    m.add_class::<postcopy::PyFaultResolver>()?;
    m.add_class::<frontend::PyFrontend>()?;
    m.add_class::<frontend_calls::PyFrontendCalls>()?;
    m.add_class::<frontend_calls::PyPendingCall>()?;
    m.add_class::<channel::PyFrontendChannel>()?;
    m.add_class::<channel::PyBackendChannel>()?;
    m.add_class::<backend::PyBackendSession>()?;
    m.add_class::<backend::PyListener>()?;
    m.add_class::<vring::PyDescriptorChain>()?;
    m.add_class::<vring::PyDeviceQueue>()?;
    m.add_class::<vring::PyVirtqueue>()?;
    m.add_class::<blkload::PyBlkLoad>()?;
    m.add_class::<daemon::PyBlkDevice>()?;
    m.add_class::<daemon::PyImageFile>()?;
    m.add_class::<daemon::PyBatch>()?;
    m.add_class::<daemon::PyDaemon>()?;
    m.add_class::<link::PyFrontendLink>()?;
    m.add_class::<kern::PyKernelDevice>()?;
    m.add_class::<vdpa::PyVdpaDevice>()?;
    m.add_function(wrap_pyfunction!(vring::ring_sizes, m)?)?;
    m.add_function(wrap_pyfunction!(vring::place_rings, m)?)?;
    codes::register(m)?;
    describe::register(m)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add(
        "MAX_DEVICE_STATE",
        vhost_core::user::device_state::MAX_DEVICE_STATE,
    )?;
    m.add(
        "DEFAULT_POSTCOPY_FAULT_TIMEOUT",
        vhost_core::daemon::DEFAULT_POSTCOPY_FAULT_TIMEOUT.as_secs_f64(),
    )?;
    m.add(
        "DEFAULT_IOTLB_MISS_TIMEOUT",
        vhost_core::daemon::DEFAULT_IOTLB_MISS_TIMEOUT.as_secs_f64(),
    )?;
    Ok(())
}
