//! A back-end's whole device state through the front-end, in one call each way (live
//! migration with the `DEVICE_STATE` protocol feature): [`Frontend::save_device_state`] on
//! the source, [`Frontend::load_device_state`] on the destination. Each makes the pipe,
//! sends `SET_DEVICE_STATE_FD`, moves the bytes (through the back-end's own channel when it
//! returns one) and asks `CHECK_DEVICE_STATE`, which is the only way a back-end can say
//! that saving or loading failed.
//!
//! The spec's phase is "stopped": stop every ring first (`GET_VRING_BASE`), as a migrating
//! VMM does before switch-over.

use std::os::fd::{AsFd, OwnedFd};

use super::payload::DeviceStateTransfer;
use super::{Error, Frontend, Result};
use crate::sys::pipe::{pipe, read_to_end, write_all, Bounds, StreamError};

/// The largest device state either side of this crate moves: a bound on what a peer can
/// make us buffer (a back-end that writes for ever, a front-end that sends a huge blob).
pub const MAX_DEVICE_STATE: usize = 64 << 20;

/// A failed transfer on the front-end's side of the pipe, naming the request it belongs to.
fn transfer_error(e: StreamError) -> Error {
    match e {
        StreamError::Io(e) => Error::Io(e),
        // The state is the back-end's answer to SET_DEVICE_STATE_FD, late like a reply.
        StreamError::Stalled(after) | StreamError::TimedOut(after) => Error::ReplyTimeout {
            request: "SET_DEVICE_STATE_FD",
            after,
            first: false,
        },
        other => Error::InvalidReply {
            request: "SET_DEVICE_STATE_FD",
            reason: format!("device state transfer: {other}"),
        },
    }
}

impl Frontend {
    /// The bounds of a transfer through the front-end: the reply timeout with no byte
    /// moved, the size bound, and Ctrl-C through the interrupt check.
    fn state_bounds(&self) -> Bounds<'static> {
        Bounds {
            max_len: MAX_DEVICE_STATE,
            stall: self.timeout(),
            total: None,
            cancel: None,
        }
    }

    /// Sends SET_DEVICE_STATE_FD (phase stopped) with `give`, the back-end's end of a
    /// new pipe, and returns the end this side uses: `keep`, or the back-end's own. Our
    /// copy of `give` is closed at once: only the back-end's copy may hold the pipe open,
    /// or the writer's close would never reach the reader as an end of file.
    fn open_transfer(&self, direction: u32, give: OwnedFd, keep: OwnedFd) -> Result<OwnedFd> {
        let phase = DeviceStateTransfer::PHASE_STOPPED;
        let theirs = self.set_device_state_fd(direction, phase, give.as_fd())?;
        drop(give);
        Ok(theirs.unwrap_or(keep))
    }

    /// Saves the back-end's device state (migration source, rings stopped) and returns
    /// it, once `CHECK_DEVICE_STATE` confirms the back-end wrote all of it.
    pub fn save_device_state(&self) -> Result<Vec<u8>> {
        let (read, write) = pipe()?;
        let ours = self.open_transfer(DeviceStateTransfer::DIRECTION_SAVE, write, read)?;
        let state = read_to_end(ours.as_fd(), self.state_bounds()).map_err(transfer_error)?;
        drop(ours);
        self.check_device_state()?;
        Ok(state)
    }

    /// Loads `state` (from [`save_device_state`](Self::save_device_state) on the source)
    /// into the back-end (migration destination, before its rings start), and returns once
    /// `CHECK_DEVICE_STATE` confirms the back-end took it.
    pub fn load_device_state(&self, state: &[u8]) -> Result<()> {
        if state.len() > MAX_DEVICE_STATE {
            return Err(Error::InvalidParam(format!(
                "device state of {} bytes is larger than the {MAX_DEVICE_STATE} bytes allowed",
                state.len()
            )));
        }
        let (read, write) = pipe()?;
        let ours = self.open_transfer(DeviceStateTransfer::DIRECTION_LOAD, read, write)?;
        let sent = write_all(ours.as_fd(), state, self.state_bounds());
        // Closing our end is the back-end's end of file.
        drop(ours);
        match sent {
            Ok(()) => self.check_device_state(),
            // A back-end that stopped reading may have refused the state: its CHECK says
            // so more precisely than the broken pipe.
            Err(e @ StreamError::ReaderGone(_)) => {
                self.check_device_state()?;
                Err(transfer_error(e))
            }
            Err(e) => Err(transfer_error(e)),
        }
    }
}
