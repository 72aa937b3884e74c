"""A griffe extension: the package's reST docstrings, as Markdown mkdocstrings renders.

The docstrings of ``python/vhost`` are written for ``help()`` and IDEs in reST: roles
(``:class:`Frontend```, ``:meth:`~vhost.user.Frontend.negotiate```), literal blocks
introduced by ``::`` and simple tables. mkdocstrings reads Markdown, so this extension
rewrites each docstring once the package is loaded:

* a role becomes a cross-reference (``[`Frontend`][vhost.user.Frontend]``), its target
  resolved the way Python resolves the name in the docstring's scope (the object, its
  parents, their imports). A target that does not resolve, if it names the package
  or is a bare name that is not a builtin, stays a cross-reference, so ``mkdocs build
  --strict`` fails on it: a renamed or misspelled reference cannot hide. A name outside
  the package (``OSError``, ``os.read``) becomes code, as the standard library's pages
  are not part of the site;
* ``::`` at the end of a paragraph becomes ``:`` and the indented block after it a
  fenced code block;
* a simple table (``====  ====`` borders) becomes a Markdown table; rows whose first
  column is empty continue the row above.
"""

from __future__ import annotations

import builtins
import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(class|meth|func|attr|mod|data|exc|obj|const):`(~?)([^`<>]+?)`")
BORDER = re.compile(r"^(\s*)(=+)((?:\s+=+)+)\s*$")
PACKAGE = "vhost"


def _lookup(scope: griffe.Object | griffe.Alias, name: str) -> str | None:
    """The canonical path ``name`` means in ``scope``, or None when it is not ours."""
    head, _, rest = name.partition(".")
    node: Any = scope
    if head == PACKAGE:
        while node.parent is not None:
            node = node.parent
        node = _Root(node)
    while node is not None:
        # A class's inherited members too: a method's docstring names its siblings.
        members = node.all_members if getattr(node, "is_class", False) else node.members
        if head in members:
            found: Any = members[head]
            for part in rest.split(".") if rest else []:
                found = _follow(found)
                try:
                    found = (found.all_members if found.is_class else found.members)[part]
                except (KeyError, griffe.AliasResolutionError):
                    return None
            found = _follow(found)
            try:
                return str(found.canonical_path)
            except griffe.AliasResolutionError:
                return str(found.path)
        node = node.parent
    return None


def _follow(obj: Any) -> Any:
    """What a re-export by assignment (``GuestMemory = _core.GuestMemory``) names."""
    if obj.is_alias or not obj.is_attribute:
        return obj
    value = obj.value
    if isinstance(value, (griffe.ExprName, griffe.ExprAttribute)):
        try:
            return obj.modules_collection.get_member(value.canonical_path)
        except (KeyError, ValueError, griffe.AliasResolutionError):
            return obj
    return obj


class _Root:
    """A scope whose only member is the package itself (for absolute names)."""

    def __init__(self, package: Any) -> None:
        self.members = {PACKAGE: package}
        self.parent = None


def _private(path: str) -> bool:
    """A name the site does not document (the reference filters ``_`` names out)."""
    return any(part.startswith("_") and part != "_core" for part in path.split("."))


def _convert_roles(obj: griffe.Object, text: str) -> str:
    def replace(match: re.Match[str]) -> str:
        _, tilde, target = match.groups()
        target = target.strip()
        label = target.rsplit(".", 1)[-1] if tilde else target
        if target.endswith("()"):
            target = target[:-2]
        path = _lookup(obj, target)
        ours = target.startswith(PACKAGE + ".") or target == PACKAGE
        bare = "." not in target and not hasattr(builtins, target)
        if path is None and (ours or bare):
            # Ours (or a bare name, which Python would look up in this scope) but not
            # found: leave it to autorefs to fail the build.
            path = target if ours else f"{PACKAGE}.{target}"
        if path is not None and _private(path):
            return f"`{label}`"
        if path is None or not (path == PACKAGE or path.startswith(PACKAGE + ".")):
            return f"`{label}`"
        return f"[`{label}`][{path}]"

    return ROLE.sub(replace, text)


def _convert_table(lines: list[str], start: int) -> tuple[list[str], int] | None:
    """The Markdown of the simple table whose top border is ``lines[start]``, and the
    index after its bottom border; None when no table starts there."""
    first = BORDER.match(lines[start])
    if first is None:
        return None
    indent = first.group(1)
    border = lines[start].strip()
    borders = [start]
    i = start + 1
    while i < len(lines) and len(borders) < 3:
        if lines[i].strip() == border:
            borders.append(i)
        elif not lines[i].strip():
            return None
        i += 1
    if len(borders) != 3:
        return None
    starts = [m.start() for m in re.finditer(r"=+", lines[start])]

    def cells(line: str) -> list[str]:
        ends = [*starts[1:], len(line)]
        return [line[a:b].strip() for a, b in zip(starts, ends, strict=True)]

    heads = [cells(line) for line in lines[borders[0] + 1 : borders[1]]]
    header = [" ".join(column) for column in zip(*heads, strict=True)]
    rows: list[list[str]] = []
    for line in lines[borders[1] + 1 : borders[2]]:
        row = cells(line)
        if rows and not row[0]:  # a continuation line of the row above
            rows[-1] = [f"{a} {b}".strip() for a, b in zip(rows[-1], row, strict=True)]
        else:
            rows.append(row)
    out = [indent + "| " + " | ".join(header) + " |", indent + "|" + "---|" * len(starts)]
    out += [indent + "| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return out, borders[2] + 1


def _convert_blocks(text: str) -> str:
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        table = _convert_table(lines, i)
        if table is not None:
            if out and out[-1].strip():
                out.append("")
            out.extend(table[0])
            out.append("")
            i = table[1]
            continue
        line = lines[i]
        if line.rstrip().endswith("::") and not line.strip().startswith(".."):
            stripped = line.rstrip()[:-2].rstrip()
            base = len(line) - len(line.lstrip())
            j = i + 1
            while j < len(lines) and not lines[j].strip():
                j += 1
            block: list[str] = []
            while j < len(lines) and (
                not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > base
            ):
                block.append(lines[j])
                j += 1
            while block and not block[-1].strip():
                block.pop()
            if block:
                if stripped:
                    out.append(stripped + ":")
                inner = min(len(b) - len(b.lstrip()) for b in block if b.strip())
                out += ["", " " * base + "```text"]
                out += [" " * base + b[inner:] if b.strip() else "" for b in block]
                out += [" " * base + "```", ""]
                i = j
                continue
        out.append(line)
        i += 1
    return "\n".join(out)


class RstDocstrings(griffe.Extension):
    """Rewrites every docstring of the loaded package from reST to Markdown (see above)."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        seen: set[int] = set()

        def walk(obj: griffe.Object) -> None:
            if id(obj) in seen:
                return
            seen.add(id(obj))
            if obj.docstring is not None:
                obj.docstring.value = _convert_roles(obj, _convert_blocks(obj.docstring.value))
            for member in obj.members.values():
                if not member.is_alias:
                    walk(member)  # type: ignore[arg-type]

        walk(pkg)
