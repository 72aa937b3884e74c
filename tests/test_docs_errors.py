"""docs/errors.md's table of exceptions is the package's real hierarchy (issue 13): it
lists every exception class the public modules define (less the internal ones in
``INTERNAL``, each with its reason), each row's link is the class, and its "is a" column
is the class's bases in order. A new exception, a removed one or a changed base fails
here until the page says so.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import vhost

CHECKOUT = Path(__file__).resolve().parent.parent
PAGE = CHECKOUT / "docs" / "errors.md"
ROW = re.compile(r"^\| \[`(\w+)`\]\[([\w.]+)\] \| ([^|]+) \| [^|]+ \|$")
# Exception classes users never see, and why.
INTERNAL = {
    "vhost.cli.common.CliError": "the CLI's own; printed as one line, never raised to a caller",
    "vhost.cli.blk.RingRefusedError": "the CLI's own (bench blk's ring fitting)",
    "vhost.check.cases.Died": "a case's verdict, caught by the check runner",
    "vhost.check.cases.Failed": "a case's verdict, caught by the check runner",
    "vhost.check.cases.NotApplicable": "a case's verdict, caught by the check runner",
}


def package_exceptions() -> dict[str, type[BaseException]]:
    found: dict[str, type[BaseException]] = {}
    names = [i.name for i in pkgutil.walk_packages(vhost.__path__, "vhost.")]
    for module in [vhost, *(importlib.import_module(n) for n in names if "__main__" not in n)]:
        for name, obj in vars(module).items():
            if (
                inspect.isclass(obj)
                and issubclass(obj, BaseException)
                and obj.__module__.startswith("vhost")
                and not name.startswith("_")
            ):
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return found


def table() -> dict[str, list[str]]:
    """Class path -> the "is a" names, from the page."""
    rows = {}
    for line in PAGE.read_text().splitlines():
        match = ROW.match(line)
        if match:
            name, path, bases = match.groups()
            assert path.rsplit(".", 1)[-1] == name, line
            rows[path] = re.findall(r"`(\w+)`", bases)
    return rows


def test_the_table_lists_every_exception() -> None:
    documented = set(table())
    public = set(package_exceptions()) - set(INTERNAL)
    assert documented == public, (
        f"missing from docs/errors.md: {sorted(public - documented)}; "
        f"listed but not in the package: {sorted(documented - public)}"
    )


def test_each_row_gives_the_real_bases() -> None:
    classes = package_exceptions()
    for path, bases in table().items():
        cls = classes[path]
        assert bases == [b.__name__ for b in cls.__bases__], f"{path}: the page says {bases}"


def test_every_internal_exception_still_exists() -> None:
    assert set(INTERNAL) <= set(package_exceptions())


def test_the_page_names_the_errors_module_hierarchy_root() -> None:
    assert table()["vhost.errors.VhostError"] == ["Exception"]
