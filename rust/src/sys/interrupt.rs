//! Cutting a blocking wait short: every wait of this crate (poll, recvmsg, sendmsg,
//! connect) asks a per-thread check at least every [`SLICE`] and on every EINTR, and
//! gives up with `ErrorKind::Interrupted` when the check says so.
//!
//! The crate knows nothing of what the check looks at: the Python glue installs one that
//! runs Python's signal handlers, so Ctrl-C raises `KeyboardInterrupt` promptly in the
//! middle of a reply wait, an accept or an eventfd read. A wait resumed after the check is
//! exactly where it was: the deadline is kept and the bytes already read stay read. With
//! no check installed (plain Rust callers, worker threads) waits never end early.

use std::cell::RefCell;
use std::io;
use std::time::Duration;

/// How long a wait goes without asking the check, when one is installed: short enough
/// for Ctrl-C to feel immediate, long enough to cost nothing measurable.
pub const SLICE: Duration = Duration::from_millis(50);

/// A check asked between slices of a wait: `true` means stop waiting now.
pub type Check = Box<dyn FnMut() -> bool>;

thread_local! {
    static CHECK: RefCell<Option<Check>> = const { RefCell::new(None) };
}

/// Runs `f` with `check` installed for this thread, then restores whatever was there.
pub fn with_check<R>(check: Check, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<Check>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let previous = self.0.take();
            CHECK.with(|c| *c.borrow_mut() = previous);
        }
    }
    let _restore = Restore(CHECK.with(|c| c.replace(Some(check))));
    f()
}

/// Whether a check is installed on this thread: waits then go in slices.
pub fn installed() -> bool {
    CHECK.with(|c| c.borrow().is_some())
}

/// Asks the installed check; `Err(Interrupted)` when it says to stop. The check is taken
/// out while it runs, so a wait it starts itself (a signal handler that blocks) is not
/// asked recursively.
pub fn check() -> io::Result<()> {
    let Some(mut f) = CHECK.with(|c| c.borrow_mut().take()) else {
        return Ok(());
    };
    let stop = f();
    CHECK.with(|c| {
        let mut slot = c.borrow_mut();
        if slot.is_none() {
            *slot = Some(f);
        }
    });
    if stop {
        Err(interrupted())
    } else {
        Ok(())
    }
}

/// The error a wait ends with when the check stopped it.
pub fn interrupted() -> io::Error {
    io::Error::new(io::ErrorKind::Interrupted, "the wait was interrupted")
}

/// How long one slice of a wait with `left` remaining may block: all of it without a
/// check, at most [`SLICE`] with one. `None` is no bound.
pub fn slice(left: Option<Duration>) -> Option<Duration> {
    if installed() {
        Some(left.map_or(SLICE, |l| l.min(SLICE)))
    } else {
        left
    }
}

/// A wait bound in poll(2)'s milliseconds (`None`: -1, forever), rounded up so that a
/// remainder below a millisecond does not turn into a busy zero.
pub fn poll_ms(bound: Option<Duration>) -> i32 {
    bound.map_or(-1, |d| {
        i32::try_from(d.as_nanos().div_ceil(1_000_000)).unwrap_or(i32::MAX)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::rc::Rc;

    #[test]
    fn check_is_scoped_and_restored() {
        assert!(!installed());
        assert!(check().is_ok());
        let calls = Rc::new(Cell::new(0));
        let seen = calls.clone();
        let r = with_check(
            Box::new(move || {
                seen.set(seen.get() + 1);
                seen.get() >= 2
            }),
            || {
                assert!(installed());
                assert!(check().is_ok());
                let e = check().unwrap_err();
                assert_eq!(e.kind(), io::ErrorKind::Interrupted);
                7
            },
        );
        assert_eq!((r, calls.get()), (7, 2));
        assert!(!installed());
        assert_eq!(slice(None), None);
        assert_eq!(poll_ms(slice(Some(Duration::from_micros(1)))), 1);
    }

    #[test]
    fn a_check_is_not_asked_from_inside_itself() {
        let inner = Rc::new(Cell::new(None));
        let out = inner.clone();
        with_check(
            Box::new(move || {
                out.set(Some(installed()));
                false
            }),
            || check().unwrap(),
        );
        assert_eq!(inner.get(), Some(false));
    }
}
