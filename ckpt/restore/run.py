"""Restore orchestration: image → checks → restorer child → rebuilt process."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

from ..errors import ImageCorrupt, RestoreError
from ..image import ImageReader
from ..kernel.memory import write_at
from ..kernel.spawn import spawn_restorer
from ..model import ProcessImage
from ..present import intersect
from .checks import check_files, wait_pid_free
from .rebuild import Rebuilder

_ZERO = bytes(1 << 20)


@dataclass
class Restored:
    pid: int
    seconds: float
    pages: int


def load(directory: str) -> tuple[ImageReader, ProcessImage]:
    reader = ImageReader(directory)
    try:
        proc = ProcessImage.from_dict(reader.state)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ImageCorrupt(f"{directory}: process state is malformed ({exc})") from exc
    return reader, proc


def restore(directory: str, *, new_pid: bool = False) -> Restored:
    """Rebuild the process; it runs on as a child of this process."""
    t0 = time.monotonic()
    reader, proc = load(directory)
    check_files(proc)
    present = [(r[0], r[1]) for v in proc.vmas for r in v.present]
    plan = reader.plan(present)
    want = None if new_pid else proc.pid
    if want is not None:
        wait_pid_free(want)
    child = spawn_restorer(want)
    rb = None
    try:
        rb = Rebuilder(child, proc, new_pid)
        rb.run(lambda mem_fd: _write_pages(reader, plan, proc, mem_fd))
    except BaseException as exc:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        if isinstance(exc, OSError) and not hasattr(exc, "exit_code"):
            raise RestoreError(f"restore failed: {exc}") from exc
        raise
    finally:
        if rb is not None:
            rb.close()
        reader.close()
    return Restored(pid=child, seconds=time.monotonic() - t0, pages=sum(n for _, n in present))


def _write_pages(reader: ImageReader, plan, proc: ProcessImage, mem_fd: int) -> None:
    for vaddr, data in reader.iter_data(plan):
        write_at(mem_fd, vaddr, data)
    # Present pages whose newest copy is all zero: fresh anonymous memory already
    # reads zero, but a file mapping would show the file's content there.
    file_spans = [(v.start, v.end) for v in proc.vmas if v.kind == "file"]
    zero_spans = sorted((a, a + n * 4096) for a, n in plan.zero)
    for a, b in intersect(zero_spans, file_spans):
        for off in range(a, b, len(_ZERO)):
            write_at(mem_fd, off, _ZERO[: min(len(_ZERO), b - off)])
