"""Fault points (ckpt/faults.py): one list, every name in the code on it, of the kind
its call site expects; a misspelt name is a ValueError, not a point that never fires."""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

from ckpt import faults
from ckpt.errors import RestoreError
from ckpt.faults import ACT, FAIL, KILL, Point

# call → the kind of point it takes (None: any)
CALLS = {"point": KILL, "fail": FAIL, "kill_point": KILL, "active": None}


def call_sites() -> list[tuple[str, str, str | None]]:
    """(where, name, kind) of every fault call with a literal name in ckpt/."""
    out = []
    for path in sorted((REPO / "ckpt").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            f = node.func
            fname = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
            owner = (
                f.value.id
                if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name)
                else None
            )
            in_faults = path.name == "faults.py" and owner is None
            if fname not in CALLS or not (owner == "faults" or in_faults):
                continue
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                kind = CALLS[fname]
                if fname == "active" and len(node.args) > 1:  # active(name, KIND)
                    kind = {"KILL": KILL, "FAIL": FAIL, "ACT": ACT}[node.args[1].id]
                where = f"{Path(path).relative_to(REPO)}:{node.lineno}"
                out.append((where, arg.value, kind))
    return out


def test_every_point_in_the_code_is_listed_with_its_kind():
    sites = call_sites()
    assert len(sites) > 20, sites  # the scan finds them
    for where, name, kind in sites:
        assert name in {p.value for p in Point}, f"{where}: {name!r} is not a Point"
        if kind is not None:
            assert Point(name).kind == kind, f"{where}: {name!r} is not a {kind} point"


def test_every_listed_point_is_used():
    used = {name for _, name, _ in call_sites()}
    assert {p.value for p in Point} - used == set()


def test_unknown_or_wrong_kind_is_a_value_error(monkeypatch):
    monkeypatch.delenv("CKPT_FAULT", raising=False)
    for call in (faults.point, faults.fail, faults.active):
        with pytest.raises(ValueError, match="not a fault point"):
            call("seizd")
    with pytest.raises(ValueError, match="kill point, not a fail one"):
        faults.fail("seized")
    with pytest.raises(ValueError, match="fail point, not a kill one"):
        faults.point("restore-files")
    faults.point(Point.SEIZED)  # a member does as well as its name
    faults.fail("restore-files")  # nothing armed: nothing happens


def test_the_environment_arms_one_point(monkeypatch):
    monkeypatch.setenv("CKPT_FAULT", "restore-files")
    faults.point("seized")  # another point: goes on
    assert faults.active("restore-files") and not faults.active("commit")
    with pytest.raises(RestoreError, match=r"injected fault \(CKPT_FAULT=restore-files\)"):
        faults.fail(Point.RESTORE_FILES)


def test_a_kill_point_kills():
    env = dict(os.environ, CKPT_FAULT="gc-plan")
    code = "from ckpt import faults; faults.point('gc-build'); print('on', flush=True); faults.point('gc-plan'); print('alive')"
    p = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=60
    )
    assert p.returncode == -signal.SIGKILL and p.stdout == "on\n", p
