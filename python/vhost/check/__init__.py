"""A conformance and robustness check of any vhost-user back-end, as h2spec is for HTTP/2
servers: ``python -m vhost check SOCKET``, or :func:`run_checks` from Python.

The checker is a front-end that speaks raw bytes (:mod:`vhost.check.wire`), so it can send
what :class:`vhost.user.Frontend` would refuse to build. Each case runs on a connection
of its own; afterwards a fresh connection must still get a correct ``GET_FEATURES``
reply, or the case is ``died`` or ``hung`` whatever the case itself saw. Cases are the
specification's negotiation rules as far as a front-end can see them
(:data:`vhost.check.cases.CONFORMANCE`) and the rows of ADVERSARIAL.md a front-end can
send (:data:`vhost.check.hostile.HOSTILE`).
"""

from __future__ import annotations

from .cases import Case
from .report import CaseResult, Outcome, Report
from .runner import DEVICES, CheckError, all_cases, run_checks

__all__ = [
    "DEVICES",
    "Case",
    "CaseResult",
    "CheckError",
    "Outcome",
    "Report",
    "all_cases",
    "run_checks",
]
