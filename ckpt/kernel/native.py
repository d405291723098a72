"""Loads ckpt._native and turns its -errno returns into OSError naming the call.

`ffi` and `lib` never leave ckpt/kernel/: the rest of ckpt calls typed functions.
"""

from __future__ import annotations

import errno
import os

from .. import __version__
from . import abi

try:
    from .._native import ffi, lib
except ImportError as exc:  # pragma: no cover - a broken install
    raise ImportError(
        "ckpt's native layer (ckpt._native) is missing: reinstall with `pip install .`"
    ) from exc

_built_for = ffi.string(lib.CKPT_NATIVE_VERSION).decode()
if _built_for != __version__:  # pragma: no cover - stale build
    raise ImportError(
        f"ckpt._native was built for ckpt {_built_for} but this is ckpt {__version__}: "
        "rebuild with `pip install .`"
    )

PAGE_SIZE = abi.PAGE_SIZE  # ckpt/units.py: plain data code uses it without this module
if os.sysconf("SC_PAGE_SIZE") != PAGE_SIZE:  # pragma: no cover - x86-64 has 4 KiB pages
    raise ImportError(
        f"this machine's pages are {os.sysconf('SC_PAGE_SIZE')} bytes; ckpt knows {PAGE_SIZE}"
    )


def check(ret: int, call: str, *, target: object = None) -> int:
    """Return ret, or raise OSError(errno, "<call> failed: <strerror>") for -errno."""
    if ret < 0:
        code = -ret
        where = f" ({target})" if target is not None else ""
        raise OSError(code, f"{call}{where} failed: {os.strerror(code)}")
    return ret


def syscall(nr: int, *args: int) -> int:
    """Raw syscall in ckpt's own process; returns the result or -errno."""
    a = [int(x) for x in args] + [0] * (6 - len(args))
    return lib.ck_syscall(nr, *a)


def zero_pfn() -> int:
    """PFN of the shared zero page (0 when the kernel hides PFNs from us)."""
    r = lib.ck_zero_pfn()
    return r if r > 0 else 0


def nonzero_runs(buf, npages: int) -> list[tuple[int, int]]:
    """(first_page, npages) runs of the pages of buf that are not entirely zero."""
    if npages == 0:
        return []
    cap = npages // 2 + 1
    out = ffi.new("uint64_t[]", 2 * cap)
    n = check(lib.ck_nonzero_runs(ffi.from_buffer(buf), npages, out, cap), "nonzero_runs")
    return [(out[2 * i], out[2 * i + 1]) for i in range(n)]


def diff_pages(buf, npages: int, table, first: int) -> list[tuple[int, int]]:
    """(first_page, npages) runs of the pages of buf whose digest differs from
    table[first + i] (8-byte digests, 0 = none), updating those entries."""
    if npages == 0:
        return []
    cap = npages // 2 + 1
    out = ffi.new("uint64_t[]", 2 * cap)
    tab = ffi.cast("uint64_t *", ffi.from_buffer(table, require_writable=True)) + first
    n = check(lib.ck_diff_pages(ffi.from_buffer(buf), npages, tab, out, cap), "diff_pages")
    flat = ffi.unpack(out, 2 * n)
    return list(zip(flat[0::2], flat[1::2]))


def all_zero(buf) -> bool:
    return bool(lib.ck_all_zero(ffi.from_buffer(buf), len(buf)))


ESRCH = errno.ESRCH
EPERM = errno.EPERM
EEXIST = errno.EEXIST
