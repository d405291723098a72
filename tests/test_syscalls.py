"""Injected syscalls are typed functions (kernel/syscalls.py): every call site in ckpt
names one that exists, with arguments its signature accepts, and each wrapper runs the
syscall its name says. ckpt has no type checker in CI: this test is the check that a
misspelt syscall or a wrong argument count fails before any process is touched."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from ckpt.kernel import abi, syscalls

ROOT = Path(__file__).resolve().parent.parent / "ckpt"
WRAPPERS = {
    name: fn
    for name, fn in vars(syscalls).items()
    if inspect.isfunction(fn) and fn.__module__ == syscalls.__name__
}


def _sources() -> list[tuple[Path, ast.Module]]:
    return [(p, ast.parse(p.read_text(), str(p))) for p in sorted(ROOT.rglob("*.py"))]


def _calls(tree: ast.Module):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            yield node


def test_every_call_site_binds_to_a_wrapper():
    seen, bad = 0, []
    for path, tree in _sources():
        for call in _calls(tree):
            f = call.func
            if not (isinstance(f.value, ast.Name) and f.value.id == "syscalls"):
                continue
            seen += 1
            where = f"{path.relative_to(ROOT.parent)}:{call.lineno}"
            fn = WRAPPERS.get(f.attr)
            if fn is None:
                bad.append(f"{where}: no syscall wrapper {f.attr!r}")
                continue
            if any(isinstance(a, ast.Starred) for a in call.args) or any(
                k.arg is None for k in call.keywords
            ):
                continue  # *args: checked at run time only
            try:
                inspect.signature(fn).bind(
                    *[None] * len(call.args), **{k.arg: None for k in call.keywords}
                )
            except TypeError as exc:
                bad.append(f"{where}: syscalls.{f.attr}: {exc}")
    assert not bad, "\n".join(bad)
    assert seen > 100  # the restore and the dump inject through these


def test_no_syscall_spelt_as_a_string():
    """inj.call("mmap", …) is gone, and only kernel/ numbers its own injections."""
    bad = []
    for path, tree in _sources():
        rel = path.relative_to(ROOT.parent)
        for call in _calls(tree):
            name = call.func.attr
            first = call.args[0] if call.args else None
            if name == "call" and isinstance(first, ast.Constant) and isinstance(first.value, str):
                bad.append(f"{rel}:{call.lineno}: .call({first.value!r}, …)")
            if name == "call_nr" and rel.parts[1] != "kernel":
                bad.append(f"{rel}:{call.lineno}: .call_nr(…) outside ckpt/kernel/")
    assert not bad, "\n".join(bad)


class _Recording:
    def __init__(self):
        self.calls: list[tuple[int, tuple[int, ...], str | None]] = []

    def raw(self, nr: int, *args: int) -> int:
        self.calls.append((nr, args, None))
        return 0

    def call_nr(self, nr: int, *args: int, name: str) -> int:
        self.calls.append((nr, args, name))
        return 0


@pytest.mark.parametrize("name", sorted(WRAPPERS))
def test_wrapper_runs_the_syscall_it_names(name):
    fn = WRAPPERS[name]
    params = list(inspect.signature(fn).parameters.values())[1:]
    assert all(p.kind is p.POSITIONAL_OR_KEYWORD for p in params)
    inj = _Recording()
    args = tuple(range(100, 100 + len(params)))
    fn(inj, *args)
    ((nr, passed, called),) = inj.calls
    assert nr == getattr(abi, "NR_" + name.upper())
    assert passed == args
    assert called in (name, None)  # None: raw (setfsuid/setfsgid cannot fail)
