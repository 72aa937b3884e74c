//! The one way the glue blocks: without the GIL, and cut short by Ctrl-C.
//!
//! Every wait of the core goes in slices and asks a per-thread check between them and on
//! every EINTR (`vhost_core::sys::interrupt`); the check installed here runs Python's
//! signal handlers. When one raises (`KeyboardInterrupt` from SIGINT), the core's wait
//! ends with `Interrupted` and the handler's exception is raised instead, within one slice
//! of the signal. Python runs signal handlers only on the main thread, so on any other
//! thread the call simply waits (and never takes the GIL to ask).

use std::cell::RefCell;

use pyo3::prelude::*;
use vhost_core::sys::interrupt;

use crate::errors::IntoPyResult;

thread_local! {
    /// Whether this is the process's main thread, asked once per thread (two syscalls
    /// per request would show in the round-trip time).
    static MAIN: bool = {
        // SAFETY: gettid and getpid take no arguments and cannot fail.
        unsafe { libc::gettid() == libc::getpid() }
    };
}

fn on_main_thread() -> bool {
    MAIN.with(|m| *m)
}

thread_local! {
    /// The exception a signal handler raised during this thread's current wait.
    static RAISED: RefCell<Option<PyErr>> = const { RefCell::new(None) };
}

/// The check installed for a wait on the main thread: runs the signal handlers and keeps
/// what they raised. (It captures nothing, so boxing it allocates nothing.)
fn run_signal_handlers() -> bool {
    Python::attach(|py| match py.check_signals() {
        Ok(()) => false,
        Err(e) => {
            RAISED.with(|r| *r.borrow_mut() = Some(e));
            true
        }
    })
}

/// Runs `f` without the GIL, interruptible by a Python signal handler that raises.
pub fn blocking<T: Send>(py: Python<'_>, f: impl FnOnce() -> T + Send) -> PyResult<T> {
    if !on_main_thread() {
        return Ok(py.detach(f));
    }
    // The core asks the check on this same thread (detach keeps the thread, only the GIL
    // is released), so the thread-local carries the exception back.
    let out = py.detach(|| interrupt::with_check(Box::new(run_signal_handlers), f));
    // The signal wins over whatever the interrupted call returned (its Interrupted error).
    match RAISED.with(|r| r.borrow_mut().take()) {
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
