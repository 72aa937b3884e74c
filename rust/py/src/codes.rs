//! The core's request and protocol-feature tables as plain rows, so that Python's code
//! enums (`scripts/gen_codes.py` writes `vhost/codes.py` from them) and tools read the one
//! table the decoder and encoder come from. Conversion only.

use pyo3::prelude::*;
use vhost_core::user::codes::{protocol_features as pf, BackendReq, FrontendReq, RequestSpec};

/// One request: direction, code, name, gate name, body type, fd rule, reply rule, whether
/// the reply may carry an fd, and its documentation.
type Row = (
    &'static str,
    u32,
    &'static str,
    Option<&'static str>,
    &'static str,
    String,
    String,
    bool,
    &'static str,
);

fn row(direction: &'static str, s: &RequestSpec) -> Row {
    (
        direction,
        s.code,
        s.name,
        s.gate.and_then(pf::name),
        s.body,
        format!("{:?}", s.fds),
        format!("{:?}", s.reply),
        s.reply_fd,
        s.doc,
    )
}

/// Every vhost-user request of both directions, in code order, front-end first.
#[pyfunction]
fn request_table() -> Vec<Row> {
    let front = FrontendReq::ALL.iter().map(|r| row("frontend", r.spec()));
    let back = BackendReq::ALL.iter().map(|r| row("backend", r.spec()));
    front.chain(back).collect()
}

/// Every protocol feature the core names: name, mask, documentation.
#[pyfunction]
fn protocol_feature_table() -> Vec<(&'static str, u64, &'static str)> {
    pf::TABLE.to_vec()
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(request_table, m)?)?;
    m.add_function(wrap_pyfunction!(protocol_feature_table, m)?)
}
