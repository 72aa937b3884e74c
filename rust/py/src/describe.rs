//! `describe()`: what one vhost-user message says, as the core's `user::describe` tells
//! it, converted to plain Python values for `vhost.trace`. Conversion only.

use pyo3::prelude::*;
use pyo3::types::PyBytes;
use vhost_core::user::codes::Direction;
use vhost_core::user::describe::{self as core, Value};
use vhost_core::user::header::{Header, HEADER_SIZE, MAX_BODY_SIZE};

use crate::errors::invalid_param;
use crate::fd::{borrow, raw_fd_of};

/// A field: name, kind (`int`, `addr`, `bytes`, `virtio_features`, `protocol_features`,
/// `regions`, `bool`) and value.
type PyField = (&'static str, &'static str, Py<PyAny>);

/// name, reply, (code, flags, size), fds, fields, malformed, hex when malformed.
type PyDescription = (
    Option<&'static str>,
    bool,
    (u32, u32, u32),
    usize,
    Vec<PyField>,
    Option<String>,
    Option<String>,
);

fn value(py: Python<'_>, v: &Value) -> PyResult<(&'static str, Py<PyAny>)> {
    Ok(match v {
        Value::Int(n) => ("int", n.into_pyobject(py)?.into_any().unbind()),
        Value::Addr(n) => ("addr", n.into_pyobject(py)?.into_any().unbind()),
        Value::Bytes(b) => ("bytes", PyBytes::new(py, b).into_any().unbind()),
        Value::VirtioFeatures(n) => ("virtio_features", n.into_pyobject(py)?.into_any().unbind()),
        Value::ProtocolFeatures(n) => (
            "protocol_features",
            n.into_pyobject(py)?.into_any().unbind(),
        ),
        Value::Regions(r) => {
            let rows: Vec<(u64, u64, u64, u64)> = r
                .iter()
                .map(|m| {
                    (
                        m.guest_phys_addr,
                        m.memory_size,
                        m.userspace_addr,
                        m.mmap_offset,
                    )
                })
                .collect();
            ("regions", rows.into_pyobject(py)?.into_any().unbind())
        }
        Value::Bool(b) => ("bool", b.into_pyobject(py)?.to_owned().into_any().unbind()),
    })
}

/// Describes one message: `channel` is `"frontend"` for the main socket (requests from
/// the front-end) or `"backend"` for the back-end channel; `header` the 12 header bytes;
/// `fds` the fds that came with it (borrowed for the call); `request_body` the body of
/// the request a reply answers.
#[pyfunction]
#[pyo3(signature = (channel, header, body, fds, request_body = Vec::new()))]
fn describe(
    py: Python<'_>,
    channel: &str,
    header: Vec<u8>,
    body: Vec<u8>,
    fds: Vec<Bound<'_, PyAny>>,
    request_body: Vec<u8>,
) -> PyResult<PyDescription> {
    let channel = match channel {
        "frontend" => Direction::FrontendToBackend,
        "backend" => Direction::BackendToFrontend,
        other => {
            return Err(invalid_param(format!(
                "channel {other:?}: expected \"frontend\" or \"backend\""
            )))
        }
    };
    let bytes: [u8; HEADER_SIZE] = header.as_slice().try_into().map_err(|_| {
        invalid_param(format!(
            "a header is {HEADER_SIZE} bytes, got {}",
            header.len()
        ))
    })?;
    let header = Header::from_bytes(&bytes);
    let raw = fds.iter().map(raw_fd_of).collect::<PyResult<Vec<_>>>()?;
    let borrowed: Vec<_> = raw.into_iter().map(borrow).collect();
    let d = core::describe(channel, &header, &body, &borrowed, &request_body);
    let fields = d
        .fields
        .iter()
        .map(|f| value(py, &f.value).map(|(kind, v)| (f.name, kind, v)))
        .collect::<PyResult<Vec<_>>>()?;
    let hex = d.malformed.as_ref().map(|_| core::hex(&header, &body));
    Ok((
        d.name,
        d.reply,
        (header.code, header.flags, header.size),
        d.fds,
        fields,
        d.malformed,
        hex,
    ))
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("HEADER_SIZE", HEADER_SIZE)?;
    m.add("MAX_BODY_SIZE", MAX_BODY_SIZE)?;
    m.add("MAX_FDS", vhost_core::sys::MAX_FDS)?;
    m.add_function(wrap_pyfunction!(describe, m)?)
}
