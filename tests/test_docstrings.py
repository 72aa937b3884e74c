"""Every public class, method and function of the package has a docstring (issue 11,
item 4), so that ``help()``, an IDE and the API reference say why and when to use it.

Two views, because they fail differently:

- the Python modules, at runtime (every module under ``vhost``, the CLI included):
  each public name a module defines, and each public method, property, classmethod
  and staticmethod a public class defines, must have a docstring. A method overriding a
  documented one inherits its docstring (``inspect.getdoc``), as ``help()`` shows it.
  A dataclass without its own docstring gets a generated ``Name(field, ...)`` one,
  which does not count;
- the stubs (``_core.pyi`` for the native module, ``__init__.pyi``), read with ``ast``:
  what an IDE shows of a native class is its stub, so every class and every public
  function in them needs a docstring there (a class's private helpers such as
  ``_VhostBackend`` included, since public classes inherit their methods).

Dunder methods are exempt (the language documents them), and so are enum members and
constants (no docstring can be attached at runtime).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import pkgutil
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import vhost

PACKAGE = Path(vhost.__file__).parent
STUBS = ("_core.pyi", "__init__.pyi")


def _modules() -> Iterator[ModuleType]:
    yield vhost
    for info in pkgutil.walk_packages(vhost.__path__, "vhost."):
        if info.name.rsplit(".", 1)[-1] == "__main__":
            continue  # running it is `python -m vhost`; its body is one call
        yield importlib.import_module(info.name)


def _public(name: str) -> bool:
    return not name.startswith("_")


def _own_doc(obj: object) -> str | None:
    """The docstring ``obj`` has itself, not a generated one."""
    doc = inspect.getdoc(obj)
    if doc is None or not doc.strip():
        return None
    if inspect.isclass(obj) and dataclasses.is_dataclass(obj):
        own = obj.__dict__.get("__doc__")
        if own is None or own.startswith(f"{obj.__name__}("):
            return None
    return doc


def _member_doc(cls: type, name: str, raw: object) -> str | None:
    if isinstance(raw, property):
        if raw.__doc__:
            return raw.__doc__
        # an overridden property inherits its base's docstring
        for base in cls.__mro__[1:]:
            inherited = base.__dict__.get(name)
            if isinstance(inherited, property) and inherited.__doc__:
                return inherited.__doc__
        return None
    return inspect.getdoc(getattr(cls, name))


def _runtime_missing() -> list[str]:
    missing = []
    for module in _modules():
        if not (module.__doc__ or "").strip():
            missing.append(f"{module.__name__} (module)")
        for name, obj in vars(module).items():
            if not _public(name) or getattr(obj, "__module__", None) != module.__name__:
                continue
            if not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            where = f"{module.__name__}.{name}"
            if _own_doc(obj) is None:
                missing.append(where)
            if not inspect.isclass(obj):
                continue
            for member, raw in vars(obj).items():
                if not _public(member):
                    continue
                is_method = isinstance(raw, property | classmethod | staticmethod)
                if not (is_method or inspect.isfunction(raw)):
                    continue
                if not _member_doc(obj, member, raw):
                    missing.append(f"{where}.{member}")
    return missing


def _stub_missing(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    missing = []
    if ast.get_docstring(tree) is None:
        missing.append(f"{path.name} (module)")

    def visit(body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            if isinstance(node, ast.ClassDef):
                # a class in a stub is documented even when private: the public
                # native classes inherit the methods of `_VhostBackend`
                if ast.get_docstring(node) is None:
                    missing.append(f"{path.name}: {prefix}{node.name}")
                visit(node.body, f"{prefix}{node.name}.")
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                dunder = node.name.startswith("__") and node.name.endswith("__")
                if _public(node.name) and not dunder and ast.get_docstring(node) is None:
                    # a property's setter shares the getter's docstring
                    setter = any(
                        isinstance(d, ast.Attribute) and d.attr == "setter"
                        for d in node.decorator_list
                    )
                    if not setter:
                        missing.append(f"{path.name}: {prefix}{node.name}")
            elif isinstance(node, ast.If):  # `if TYPE_CHECKING:` and the like
                visit(node.body, prefix)

    visit(tree.body, "")
    return missing


def test_every_public_python_name_has_a_docstring() -> None:
    missing = _runtime_missing()
    assert not missing, f"{len(missing)} public names without a docstring:\n" + "\n".join(
        missing
    )


def test_every_module_is_walked() -> None:
    """The walk finds the submodules that are not imported by ``vhost`` itself."""
    names = {m.__name__ for m in _modules()}
    assert {"vhost.aio", "vhost.user", "vhost.daemon", "vhost.check"} <= names


def test_every_stubbed_name_has_a_docstring() -> None:
    missing = [name for stub in STUBS for name in _stub_missing(PACKAGE / stub)]
    assert not missing, f"{len(missing)} stubbed names without a docstring:\n" + "\n".join(
        missing
    )


def test_the_checks_see_a_missing_docstring(tmp_path: Path) -> None:
    """The walkers themselves: an undocumented method, property, dataclass and stub
    function are reported, so an empty report means documented, not unseen."""

    @dataclasses.dataclass
    class Bare:
        field: int

        def method(self) -> None:
            pass

        @property
        def value(self) -> int:
            return self.field

    assert _own_doc(Bare) is None
    assert _member_doc(Bare, "method", vars(Bare)["method"]) is None
    assert _member_doc(Bare, "value", vars(Bare)["value"]) is None
    stub = tmp_path / "probe.pyi"
    stub.write_text('"""Probe."""\nclass A:\n    """A."""\n    def f(self) -> None: ...\n')
    assert _stub_missing(stub) == ["probe.pyi: A.f"]
