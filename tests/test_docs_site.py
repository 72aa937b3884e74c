"""The documentation site's own machinery (issue 13): the strict build that CI runs, and
the griffe extension that turns the package's reST docstrings into Markdown with
cross-references (``docs/_ext/rst_docstrings.py``), so that a reference to a name that
does not exist fails ``make docs`` instead of rendering as text.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import griffe

CHECKOUT = Path(__file__).resolve().parent.parent


def extension() -> ModuleType:
    path = CHECKOUT / "docs" / "_ext" / "rst_docstrings.py"
    spec = importlib.util.spec_from_file_location("rst_docstrings", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def package() -> griffe.Module:
    loaded = griffe.load(
        "vhost", search_paths=[str(CHECKOUT / "python")], allow_inspection=False
    )
    assert isinstance(loaded, griffe.Module)
    return loaded


def test_make_docs_is_strict_and_in_make_test() -> None:
    makefile = (CHECKOUT / "Makefile").read_text()
    (recipe,) = re.findall(r"^docs:\n\t(.*)$", makefile, flags=re.M)
    assert "build --strict" in recipe
    # --quiet drops warnings before --strict counts them: the build would pass anyway.
    assert "--quiet" not in recipe and " -q" not in recipe
    (test,) = re.findall(r"^test: (.*)$", makefile, flags=re.M)
    assert "docs" in test.split()
    config = (CHECKOUT / "mkdocs.yml").read_text()
    assert "allow_inspection: false" in config  # the stubs, not the compiled module


def test_roles_become_cross_references_or_code() -> None:
    ext = extension()
    obj = package()["errors"]["VhostOSError"]
    text = ext._convert_roles(
        obj,
        ":class:`VhostFileNotFoundError` :meth:`~vhost.user.Frontend.negotiate` "
        ":func:`os.read` :class:`OSError` :class:`NoSuchName` :meth:`vhost.user.Nope`",
    )
    assert text.split() == [
        "[`VhostFileNotFoundError`][vhost.errors.VhostFileNotFoundError]",  # in scope
        "[`negotiate`][vhost.user.Frontend.negotiate]",  # absolute, ~ shortens it
        "`os.read`",  # not ours: code
        "`OSError`",  # a builtin: code
        "[`NoSuchName`][vhost.NoSuchName]",  # unresolved: a reference autorefs fails on
        "[`vhost.user.Nope`][vhost.user.Nope]",
    ]


def test_inherited_and_reexported_names_resolve() -> None:
    ext = extension()
    pkg = package()
    # close() comes from a private base class: code, not a dangling reference.
    assert ext._convert_roles(pkg["dirty_log"]["DirtyLog"], ":meth:`close`") == "`close`"
    # GuestMemory = _core.GuestMemory in vhost.user: the native class's page.
    assert ext._convert_roles(
        pkg["types"]["VringAddrs"], ":meth:`vhost.user.GuestMemory.user_to_gpa`"
    ) == "[`vhost.user.GuestMemory.user_to_gpa`][vhost._core.GuestMemory.user_to_gpa]"


def test_literal_blocks_and_tables_become_markdown() -> None:
    ext = extension()
    assert ext._convert_blocks("The tree::\n\n    a\n      b\n\nafter") == (
        "The tree:\n\n```text\na\n  b\n```\n\nafter"
    )
    table = "====  ====\nrust  python\n====  ====\n``A``   x\n      y\n``B``   z\n====  ====\n"
    assert ext._convert_blocks(table).splitlines()[:4] == [
        "| rust | python |",
        "|---|---|",
        "| ``A`` | x y |",
        "| ``B`` | z |",
    ]
