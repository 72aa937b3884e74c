"""What a check run found: one :class:`CaseResult` per case, gathered in a :class:`Report`."""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Any


class Outcome(enum.Enum):
    """How one case ended, as the table and ``--json`` show it."""

    PASS = "pass"
    """The back-end behaved as the specification (or ADVERSARIAL.md) asks, and still
    answered correctly on a fresh connection afterwards."""
    FAIL = "fail"
    """The back-end answered, but wrongly (a wrong reply, an ack for a request it must
    refuse, a wrong value on the fresh connection, fds leaked)."""
    DIED = "died"
    """The back-end went away: nobody accepts on its socket afterwards, or its process
    was killed by a signal."""
    HUNG = "hung"
    """The back-end neither answered nor closed within the case's time bound."""
    SKIP = "skip"
    """Not run: the back-end lacks what the case needs (a protocol feature, a known
    device type), ``--only``/``--skip`` left it out, or the back-end was gone."""

    @property
    def ok(self) -> bool:
        """Whether this outcome lets the run exit 0."""
        return self in (Outcome.PASS, Outcome.SKIP)


@dataclass
class CaseResult:
    """One case's verdict: the case, where its rule comes from, the outcome and why."""

    name: str
    ref: str
    """The specification section or ADVERSARIAL.md row the case tests."""
    outcome: Outcome
    detail: str = ""
    seconds: float = 0.0
    fds: int | None = None
    """The back-end's open fds after the case (``--pid`` or ``--restart``), else None."""

    def to_json(self) -> dict[str, Any]:
        """The result as plain JSON values."""
        d = asdict(self)
        d["outcome"] = self.outcome.value
        return d


@dataclass
class Report:
    """Every case's result, in the order run, and what the back-end offered."""

    socket: str
    features: int = 0
    protocol_features: int | None = None
    device: str | None = None
    results: list[CaseResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no case failed, died or hung (what makes the CLI exit 0)."""
        return all(r.outcome.ok for r in self.results)

    def counts(self) -> dict[str, int]:
        """How many cases ended each way, by outcome name."""
        out = {o.value: 0 for o in Outcome}
        for r in self.results:
            out[r.outcome.value] += 1
        return out

    def to_json(self) -> dict[str, Any]:
        """The whole report as plain JSON values (what ``--json`` prints)."""
        return {
            "socket": self.socket,
            "features": self.features,
            "protocol_features": self.protocol_features,
            "device": self.device,
            "ok": self.ok,
            "counts": self.counts(),
            "results": [r.to_json() for r in self.results],
        }

    def table(self) -> str:
        """A plain-text table: case, outcome, reference, detail; then the counts."""
        rows = [("case", "result", "ref", "detail")]
        rows += [(r.name, r.outcome.value, r.ref, r.detail) for r in self.results]
        w0 = max(len(r[0]) for r in rows)
        w1 = max(len(r[1]) for r in rows)
        w2 = max(len(r[2]) for r in rows)
        lines = [f"{a:<{w0}}  {b:<{w1}}  {c:<{w2}}  {d}".rstrip() for a, b, c, d in rows]
        summary = ", ".join(f"{n} {k}" for k, n in self.counts().items() if n)
        lines.append(f"{len(self.results)} cases: {summary}")
        return "\n".join(lines)
