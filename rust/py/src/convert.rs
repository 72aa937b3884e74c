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
    Duration::try_from_secs_f64(s).map_err(|_| {
        invalid_param(format!(
            "{what} must be a finite number of seconds from 0, not {s}"
        ))
    })
}

/// Defines a newtype for an unsigned integer argument: a Python `int` in range is the
/// value; a negative or too large one is the caller's `InvalidParamError` naming the value
/// and the range (not PyO3's `OverflowError`); a `bool` or a non-integer is a `TypeError`.
/// PyO3 adds the argument's name as a note ("while processing 'index'").
macro_rules! uint_arg {
    ($(#[$doc:meta])* $name:ident($t:ty)) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub struct $name(pub $t);

        impl<'a, 'py> FromPyObject<'a, 'py> for $name {
            type Error = PyErr;

            fn extract(obj: pyo3::Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
                if obj.is_instance_of::<pyo3::types::PyBool>() {
                    return Err(pyo3::exceptions::PyTypeError::new_err(format!(
                        "expected an int in 0..={}, not a bool ({})",
                        <$t>::MAX,
                        obj.to_string()
                    )));
                }
                match obj.extract::<$t>() {
                    Ok(v) => Ok($name(v)),
                    Err(e) if e.is_instance_of::<pyo3::exceptions::PyOverflowError>(obj.py()) => {
                        Err(invalid_param(format!(
                            "{} is out of range 0..={} (an unsigned {}-bit integer)",
                            obj.to_string(),
                            <$t>::MAX,
                            <$t>::BITS
                        )))
                    }
                    Err(e) => Err(e),
                }
            }
        }

        impl $name {
            /// The attribute `name` of `obj` (a device's or handler's static description),
            /// converted as an argument is, the error naming `Type.name`.
            #[allow(dead_code)] // not every width is a device attribute
            pub fn attr(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<$t> {
                let owner = obj.get_type().name().map(|n| n.to_string()).unwrap_or_default();
                let value = obj.getattr(name)?;
                Self::named(&value, &format!("{owner}.{name}"))
            }

            /// `value` converted as an argument is, the error starting with `what`
            /// ("set_vring_num: index"), for the arguments [`uint_args!`] converts.
            pub fn named(value: &Bound<'_, PyAny>, what: &str) -> PyResult<$t> {
                let py = value.py();
                value.extract::<$name>().map(|v| v.0).map_err(|e| {
                    PyErr::from_type(e.get_type(py), format!("{what}: {}", e.value(py)))
                })
            }
        }
    };
}

uint_arg!(
    /// A `u8` argument (a device status).
    U8(u8)
);
uint_arg!(
    /// A `u16` argument (a ring size, a queue count).
    U16(u16)
);
uint_arg!(
    /// A `u32` argument (a queue index, a ring size, a config offset).
    U32(u32)
);
uint_arg!(
    /// A `u64` argument (an address, a size, a feature mask).
    U64(u64)
);

/// Converts unsigned integer arguments received as `&Bound<PyAny>`, each error naming the
/// method and the argument (`set_vring_num: index: -1 is out of range 0..=4294967295 ...`),
/// which a typed parameter cannot (PyO3 only adds the argument's name as a note):
/// `uint_args!("set_vring_num"; index: U32, num: U32);` rebinds `index` and `num`.
/// An optional argument (`Option<&Bound<PyAny>>`) takes its default: `asid: U32 = 0`.
macro_rules! uint_args {
    ($method:expr; $($arg:ident: $t:ident $(= $default:expr)?),+ $(,)?) => {
        $(
            let $arg = $crate::convert::uint_args!(@one $method, $arg, $t $(, $default)?);
        )+
    };
    (@one $method:expr, $arg:ident, $t:ident) => {
        $crate::convert::$t::named(&$arg, concat!($method, ": ", stringify!($arg)))?
    };
    (@one $method:expr, $arg:ident, $t:ident, $default:expr) => {
        match $arg {
            Some(v) => $crate::convert::$t::named(&v, concat!($method, ": ", stringify!($arg)))?,
            None => $default,
        }
    };
}

pub(crate) use uint_args;
