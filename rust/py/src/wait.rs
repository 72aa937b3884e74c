//! The one way the glue blocks: without the GIL, and cut short by Ctrl-C.
//!
//! Every wait of the core goes in slices and asks a per-thread check between them and on
//! every EINTR (`vhost_core::sys::interrupt`); the check installed here runs Python's
//! signal handlers. When one raises (`KeyboardInterrupt` from SIGINT), the core's wait
//! ends with `Interrupted` and the handler's exception is raised instead, within one slice
//! of the signal. Python runs signal handlers only on the main thread, so on any other
//! thread the call simply waits (and never takes the GIL to ask).

use std::sync::{Arc, Mutex};

use pyo3::prelude::*;
use vhost_core::sys::interrupt;

use crate::errors::IntoPyResult;

fn on_main_thread() -> bool {
    // SAFETY: gettid and getpid take no arguments and cannot fail.
    unsafe { libc::gettid() == libc::getpid() }
}

/// Runs `f` without the GIL, interruptible by a Python signal handler that raises.
pub fn blocking<T: Send>(py: Python<'_>, f: impl FnOnce() -> T + Send) -> PyResult<T> {
    if !on_main_thread() {
        return Ok(py.detach(f));
    }
    let pending: Arc<Mutex<Option<PyErr>>> = Arc::default();
    let stash = pending.clone();
    let out = py.detach(move || {
        let check: interrupt::Check = Box::new(move || {
            Python::attach(|py| match py.check_signals() {
                Ok(()) => false,
                Err(e) => {
                    *stash.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                    true
                }
            })
        });
        interrupt::with_check(check, f)
    });
    // The signal wins over whatever the interrupted call returned (its Interrupted error).
    let raised = pending.lock().unwrap_or_else(|p| p.into_inner()).take();
    match raised {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

/// [`blocking`] for a core call, converting its error.
pub fn call<T, R>(py: Python<'_>, f: impl FnOnce() -> R + Send) -> PyResult<T>
where
    R: IntoPyResult<T> + Send,
{
    blocking(py, f)?.py_err()
}
