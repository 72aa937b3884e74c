//! The conversions of Python arguments every class shares, so that one argument means the
//! same everywhere and a bad one is always the caller's `InvalidParamError`.

use std::time::{Duration, Instant};

use pyo3::prelude::*;

use crate::errors::invalid_param;

/// A timeout in seconds as Python APIs take it: `None` or `math.inf` waits for ever, a
/// finite number from 0 waits that long; a negative number or NaN is refused, naming
/// `what`, rather than read as "forever" by one call and "now" by another.
pub fn timeout(what: &str, seconds: Option<f64>) -> PyResult<Option<Duration>> {
    match seconds {
        None => Ok(None),
        Some(s) if s == f64::INFINITY => Ok(None),
        Some(s) => Duration::try_from_secs_f64(s).map(Some).map_err(|_| {
            invalid_param(format!(
                "{what} must be a number of seconds from 0 (or None to wait for ever), not {s}"
            ))
        }),
    }
}

/// [`timeout`] as the instant it ends (`None`: never; also for a timeout so long that the
/// instant is past what the clock can represent).
pub fn deadline(what: &str, seconds: Option<f64>) -> PyResult<Option<Instant>> {
    Ok(timeout(what, seconds)?.and_then(|d| Instant::now().checked_add(d)))
}

/// A finite number of seconds for a setting that cannot be "for ever" (a poll period, a
/// run's length).
pub fn seconds(what: &str, s: f64) -> PyResult<Duration> {
    match timeout(what, Some(s))? {
        Some(d) => Ok(d),
        None => Err(invalid_param(format!("{what} must be finite, not {s}"))),
    }
}
