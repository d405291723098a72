"""The package structure (docs/ARCHITECTURE.md "Layout"): layers import only downward,
and no two packages import each other.

    cli → api → precopy → capture, restore, transport, store, track → kernel, image
        → model, schema, present → units, errors, faults, accel

Read from the source with ast (imports inside functions count too). Two kinds of
import are left out on purpose: those under `if TYPE_CHECKING:` (never executed),
and those in a `try: … except ImportError:` (optional accelerators: ckpt/accel.py
lends image/ the C versions of its byte loops when kernel/ loads, and image/ works
without them).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "ckpt"

RANK = {
    "ckpt": 0, "units": 0, "errors": 0, "faults": 1, "accel": 0,
    "model": 2, "schema": 3, "present": 2,
    "kernel": 4, "image": 4,
    "track": 5, "store": 5, "capture": 6, "restore": 6, "transport": 6,
    "precopy": 7, "api": 8, "cli": 9, "__main__": 10, "_native": 0,
}  # fmt: skip


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _skipped(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        parent = parents[node]
        if isinstance(parent, ast.If) and "TYPE_CHECKING" in ast.unparse(parent.test):
            return node in parent.body
        if isinstance(parent, ast.Try) and node in parent.body:
            caught = [ast.unparse(h.type) for h in parent.handlers if h.type is not None]
            if any("ImportError" in c for c in caught):
                return True
        node = parent
    return False


def imports() -> dict[str, set[str]]:
    """module → the ckpt modules or packages it imports."""
    out: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        mod = _module(path)
        pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        tree = ast.parse(path.read_text())
        parents = {c: p for p in ast.walk(tree) for c in ast.iter_child_nodes(p)}
        deps = out.setdefault(mod, set())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and not _skipped(node, parents):
                if node.level:
                    base = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.startswith("ckpt"):
                    deps.add(target)
            elif isinstance(node, ast.Import) and not _skipped(node, parents):
                deps |= {a.name for a in node.names if a.name.startswith("ckpt")}
    return out


def _top(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "ckpt"


def test_every_package_has_a_layer():
    tops = {_top(m) for m in imports()}
    assert tops <= set(RANK), f"packages without a layer: {tops - set(RANK)}"


def test_imports_only_go_down():
    upward = sorted(
        f"{mod} imports {dep}"
        for mod, deps in imports().items()
        for dep in deps
        if _top(dep) != _top(mod) and RANK[_top(dep)] >= RANK[_top(mod)]
    )
    assert not upward, "imports that go up or sideways:\n" + "\n".join(upward)


def test_no_package_cycle():
    graph: dict[str, set[str]] = {}
    for mod, deps in imports().items():
        graph.setdefault(_top(mod), set()).update(_top(d) for d in deps if _top(d) != _top(mod))

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    cycles = sorted(p for p in graph if p in reach(p))
    assert not cycles, f"packages on an import cycle: {cycles}"


def test_proc_paths_only_in_kernel():
    """Every /proc path goes through kernel/procfs (one redirectable root)."""
    offenders = [
        f"{p.relative_to(ROOT.parent)}:{n}"
        for p in ROOT.rglob("*.py")
        if "kernel" not in p.relative_to(ROOT).parts
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if '"/proc/' in line or "'/proc/" in line or 'f"/proc/' in line
    ]
    assert not offenders, offenders


def test_image_and_store_never_name_kernel():
    offenders = [
        f"{p.relative_to(ROOT.parent)}:{n}"
        for sub in ("image", "store")
        for p in (ROOT / sub).rglob("*.py")
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if "kernel" in line
    ]
    assert not offenders, offenders


def test_api_imports_without_side_effects():
    """`import ckpt.api` (the documented entry point) works on its own."""
    res = subprocess.run(
        [sys.executable, "-c", "import ckpt.api, ckpt.cli; print(ckpt.api.dump.__name__)"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 0 and res.stdout.strip() == "dump", res.stderr


def test_architecture_layout_names_every_module():
    """docs/ARCHITECTURE.md's Layout lists every module of ckpt/ and native/, and no
    module that is gone."""
    import re

    doc = (ROOT.parent / "docs" / "ARCHITECTURE.md").read_text()
    block = doc[doc.index("## Layout") : doc.index("Layers import only downward")]
    named = set(re.findall(r"(\w+\.py)\b", block)) - {"test_stop_rule.py"}
    files = {p.name for p in ROOT.rglob("*.py") if p.name != "__init__.py"}
    files |= {p.name for p in (ROOT.parent / "native").rglob("*.py")}
    assert not files - named, f"modules the layout does not name: {sorted(files - named)}"
    assert not named - files, f"the layout names modules that are gone: {sorted(named - files)}"
