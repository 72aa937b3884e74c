"""docs/names.md, the table of rust-vmm names and ours, names only things that exist
(issue 13): every Python name imports, every link points at the object its text names,
every ``vhost_core::`` name is defined or re-exported where the table says, every
"internal" file exists, and the seed names the design asks for are all in the table.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

CHECKOUT = Path(__file__).resolve().parent.parent
PAGE = CHECKOUT / "docs" / "names.md"
RUST = CHECKOUT / "rust" / "src"
# The seed names DESIGN.md says the table maps, and those issue 13's brief lists.
SEED_NAMES = (
    "Master", "SlaveReqHandler", "VhostUserSlaveReqHandler", "MasterReqHandler",
    "SlaveFsCacheReq", "SlaveListener", "Endpoint", "VhostKernBackend", "VhostVdpa",
    "VhostBackend", "VhostUserFrontend", "VhostUserBackendReqHandler",
    "VhostUserMemoryRegionInfo", "VringConfigData", "VhostUserProtocolFeatures",
    "VhostUserVirtioFeatures", "Net", "Vsock", "VhostKernVdpa", "VhostIotlbMsg",
    "VhostUserDaemon", "VhostUserBackend",
)  # fmt: skip


def rows() -> list[list[str]]:
    found = []
    for line in PAGE.read_text().splitlines():
        if line.startswith("| ") and not line.startswith("| rust-vmm"):
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            assert len(cells) == 3, line
            found.append(cells)
    assert len(found) > 30, "the tables of names.md were not found"
    return found


def resolve(dotted: str) -> object:
    """The object ``vhost.a.B.c`` names: the longest importable module, then attributes."""
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:split]))
        except ModuleNotFoundError:
            continue
        for attr in parts[split:]:
            obj = getattr(obj, attr)
        return obj
    raise AssertionError(f"{dotted}: no module")


def python_names(cell: str) -> list[str]:
    return re.findall(r"`(vhost(?:\.\w+)+)`", cell)


def rust_defines(path: str) -> bool:
    """Whether ``vhost_core::a::b::Name`` is defined or re-exported in ``rust/src/a/b``."""
    *modules, name = path.split("::")[1:]
    base = RUST.joinpath(*modules)
    files = [base.with_suffix(".rs")] if base.with_suffix(".rs").is_file() else []
    if not modules:
        files = [RUST / "lib.rs"]
    elif base.is_dir():
        files += sorted(base.rglob("*.rs"))
    pattern = re.compile(rf"pub (?:struct|trait|enum|type|use|mod)\b[^;{{]*\b{name}\b")
    return any(pattern.search(f.read_text()) for f in files)


@pytest.mark.parametrize("row", rows(), ids=lambda r: r[0][:40])
def test_row_names_exist(row: list[str]) -> None:
    seed, ours, core = row
    names = python_names(ours)
    internal = re.findall(r"internal: `([^`]+)`", ours)
    assert names or internal, f"row {seed}: names nothing of ours"
    for name in names:
        resolve(name)  # raises if it does not exist
    for text, target in re.findall(r"\[`(vhost[\w.]*)`\]\[(vhost[\w.]*)\]", ours):
        assert resolve(text) is resolve(target), f"{text} links to {target}, another object"
    for path in internal:
        assert (CHECKOUT / path).is_file(), path
    for path in re.findall(r"`(vhost_core::[\w:]+)`", core):
        assert rust_defines(path), f"{path} is not defined in rust/src"


def test_seed_names_are_all_in_the_table() -> None:
    seeds = {name for row in rows() for name in re.findall(r"`(?:\w+::)*(\w+)`", row[0])}
    missing = [name for name in SEED_NAMES if name not in seeds]
    assert not missing, f"docs/names.md does not map {missing}"


def test_resolve_fails_on_a_name_that_does_not_exist() -> None:
    with pytest.raises(AttributeError):
        resolve("vhost.user.Master")
