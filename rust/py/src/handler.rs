//! Calling Python handler methods from the core's handler traits. A Python exception is
//! kept (to re-raise to whoever drives the loop) and reported to the core as a handler
//! error, which the core answers with a NACK or a closed connection.

use std::sync::{Mutex, MutexGuard, TryLockError};
use std::time::Duration;

use pyo3::prelude::*;
use vhost_core::user::Error;

/// Locks `m` without holding the GIL while waiting. The holder may be blocked in a call
/// made with the GIL released (recv, accept) and needs the GIL back to finish; waiting
/// for `m` with the GIL held would deadlock the two threads and with them the
/// interpreter (ADVERSARIAL J7). A poisoned lock is taken as is.
pub fn lock_detached<'a, T>(py: Python<'_>, m: &'a Mutex<T>) -> MutexGuard<'a, T> {
    loop {
        match m.try_lock() {
            Ok(g) => return g,
            Err(TryLockError::Poisoned(p)) => return p.into_inner(),
            Err(TryLockError::WouldBlock) => {
                py.detach(|| std::thread::sleep(Duration::from_millis(1)));
            }
        }
    }
}

/// Remembers the first Python exception raised during one request.
#[derive(Default)]
pub struct PyCallState {
    pub error: Option<PyErr>,
}

impl PyCallState {
    /// Calls `obj.name(*args)` and converts the result with `convert`.
    pub fn call<T>(
        &mut self,
        obj: &Py<PyAny>,
        name: &'static str,
        args: impl for<'py> FnOnce(Python<'py>) -> PyResult<Bound<'py, pyo3::types::PyTuple>>,
        convert: impl for<'py> FnOnce(&Bound<'py, PyAny>) -> PyResult<T>,
    ) -> Result<T, Error> {
        Python::attach(|py| {
            let result = args(py)
                .and_then(|a| obj.bind(py).call_method1(name, a))
                .and_then(|r| convert(&r));
            result.map_err(|e| {
                let msg = format!("{name}: {e}");
                let not_supported = py
                    .import("vhost.errors")
                    .and_then(|m| m.getattr("NotSupportedError"))
                    .map(|cls| e.is_instance(py, &cls))
                    .unwrap_or(false);
                if self.error.is_none() {
                    self.error = Some(e);
                }
                if not_supported {
                    Error::NotSupported(name)
                } else {
                    Error::Handler(msg)
                }
            })
        })
    }
}

/// `()` from any return value (handlers may return None).
pub fn unit(_: &Bound<'_, PyAny>) -> PyResult<()> {
    Ok(())
}

/// A u64 answer where None means 0.
pub fn u64_or_zero(v: &Bound<'_, PyAny>) -> PyResult<u64> {
    if v.is_none() {
        Ok(0)
    } else {
        v.extract()
    }
}

/// `(shmid, size)` pairs from a Python mapping of shared memory region id to size.
pub fn shmem_pairs(v: &Bound<'_, PyAny>) -> PyResult<Vec<(u8, u64)>> {
    v.call_method0("items")?
        .try_iter()?
        .map(|item| item?.extract::<(u8, u64)>())
        .collect()
}

/// A class of the Python facade the glue builds handler arguments of (`vhost.types`,
/// `vhost.user`), so a handler receives the same named types the rest of the API uses.
/// Imported on first use, then kept.
pub struct FacadeType {
    cell: pyo3::sync::PyOnceLock<Py<pyo3::types::PyType>>,
    module: &'static str,
    name: &'static str,
}

impl FacadeType {
    pub const fn new(module: &'static str, name: &'static str) -> Self {
        FacadeType {
            cell: pyo3::sync::PyOnceLock::new(),
            module,
            name,
        }
    }

    /// `module.name(*args)`.
    pub fn build<'py>(
        &self,
        py: Python<'py>,
        args: impl IntoPyObject<
            'py,
            Target = pyo3::types::PyTuple,
            Output = Bound<'py, pyo3::types::PyTuple>,
        >,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.cell
            .import(py, self.module, self.name)?
            .call1(args.into_pyobject(py).map_err(Into::into)?)
    }
}
