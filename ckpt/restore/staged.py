"""Staged restore: build the process on the destination while pre-copy rounds arrive.

A migration's destination does not wait for a complete image. The restorer child is
spawned when the first round begins, and every round's pages go straight into its
memory, so after the freeze only the final round and the process state are left:

    StagedRestore(pid, layout)  spawn the restorer (same PID unless --new-pid), empty its
                                address space (Rebuilder.prepare_memory), map the layout
    reshape(layout)             before each round's pages: the round's VMA layout. Areas
                                gone are unmapped, new ones mapped, changed protections
                                mprotect'ed; areas that stay keep their pages
    write(runs, data)           a round's pages, into the child's memory (/proc/PID/mem);
                                thread-safe, but never concurrent with reshape()
    finish(proc)                after the final round: the final layout, then every page
                                written since round 0 that the final present map does not
                                list is zapped (MADV_DONTNEED, MADV_REMOVE for shmem), then
                                Rebuilder.apply_state() after rb.set_image(proc)
    kill()                      any failure: SIGKILL and reap the child

Why the result equals an image restore (docs/FORMAT.md, "how a restore resolves
pages"): pages are written layer by layer, so the newest layer mentioning a page wins;
a page outside the final present map reads as zero (anonymous) or as the file's page
(private file mapping), as it does after MADV_DONTNEED; and an area that keeps its
address but was re-created meanwhile is copied whole by the source in the round that
first sees it (DESIGN.md invariant 3), so its stale pages are either overwritten or
absent from the final map and zapped.

An area's contents are kept across a layout change only when it is "the same memory":
private anonymous memory (anon, heap, stack; the same growsdown flag), the same shmem
object at the same offset, or the same file at the same offset. Anything else in its
place is unmapped and mapped fresh — the source copies such an area whole anyway.

The scratch area (where syscalls are injected from) is placed by prepare_memory()
outside the first layout; a later layout that needs its place moves it first
(`_move_scratch`). The vDSO is placed once; a process that moves its vDSO during the
migration is refused.
"""

from __future__ import annotations

import bisect
import os
import signal
import threading
import time
from dataclasses import replace

from ..errors import RestoreError, as_error
from ..kernel import abi, syscalls
from ..kernel.memory import write_runs
from ..kernel.native import PAGE_SIZE
from ..kernel.remote import HEAL_CODE, SCRATCH_PAGES, Scratch
from ..kernel.spawn import spawn_restorer
from ..model import ProcessImage, Vma
from ..present import _normalize, intersect, subtract
from .checks import check_file, check_files, wait_pid_free
from .rebuild import VDSO_KINDS, Rebuilder, free_range
from .sockets import RebuiltConnections

_U64 = (1 << 64) - 1


class _Layout:
    """What Rebuilder's constructor and memory phases read of a ProcessImage: the
    source PID and the VMA list (the full ProcessImage only exists after the freeze)."""

    def __init__(self, pid: int, vmas: list[Vma]):
        self.pid = pid
        self.vmas = vmas
        self.shm: list = []  # a process with shared memory objects is never staged


def prot0(v: Vma) -> int:
    """The protection an area is mapped with while being filled (Rebuilder.map_vmas)."""
    return v.prot | (abi.PROT_WRITE if "ac" in v.vmflags else 0)


def identity(v: Vma) -> tuple:
    """Two areas with the same identity at the same address hold the same memory."""
    if v.kind == "file":
        f = v.file
        return ("file", f.path if f else v.name, f.dev if f else 0, f.ino if f else 0,
                v.shared, "mw" in v.vmflags, v.start - v.offset)  # fmt: skip
    if v.kind == "shmem":
        return ("shmem", v.start - v.offset)
    return ("anon", v.shared, "gd" in v.vmflags)


def _spans_of(runs) -> list[tuple[int, int]]:
    return [(a, a + n * PAGE_SIZE) for a, n in runs]


class StagedRestore:
    """The process being built ahead of the freeze; see the module docstring."""

    # a kernel failure in building the process is the restore's (exit 11), not the kernel's
    @as_error(RestoreError)
    def __init__(self, source_pid: int, layout: list[Vma], *, new_pid: bool = False):
        t0 = time.monotonic()
        self.source_pid = source_pid
        want = None if new_pid else source_pid
        if want is not None:
            wait_pid_free(want)
        self.child = spawn_restorer(want)
        self.rb: Rebuilder | None = None
        self.mapped: list[Vma] = []  # what the child has mapped now (no vDSO), sorted
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._written: list[tuple[int, int]] = []  # spans written since round 0
        self._lock = threading.Lock()
        self._vdso: dict[str, tuple[int, int]] = {}
        self.pages_written = 0
        self.running = False
        self.timings: dict[str, float] = {}
        try:
            self.rb = Rebuilder(self.child, _Layout(source_pid, layout), new_pid)  # type: ignore[arg-type]
            self.rb.prepare_memory()
            self._vdso = {v.kind: (v.start, v.end) for v in layout if v.kind in VDSO_KINDS}
            self.reshape(layout)
        except BaseException:
            self.kill()
            raise
        self.timings["start_ms"] = (time.monotonic() - t0) * 1000

    @property
    def mem_fd(self) -> int:
        assert self.rb is not None
        return self.rb.mem_fd

    # -- layout ---------------------------------------------------------------------------

    def _check_layout_files(self, vmas: list[Vma]) -> None:
        """Files are mapped by path: refuse one that is not the source's (exit 10)."""
        seen = set()
        for v in vmas:
            if v.file is not None and (v.file.dev, v.file.ino, v.file.path) not in seen:
                seen.add((v.file.dev, v.file.ino, v.file.path))
                check_file(v.file, f"mapped file (at {v.start:#x})")

    @as_error(RestoreError)
    def reshape(self, layout: list[Vma]) -> dict[str, int]:
        """Bring the child's mappings to `layout`, keeping the pages of areas that stay.

        Returns what it did (counts), for the caller's statistics.
        """
        rb = self.rb
        assert rb is not None
        want_vdso = {v.kind: (v.start, v.end) for v in layout if v.kind in VDSO_KINDS}
        if want_vdso != self._vdso:
            raise RestoreError(
                "the process moved its vDSO during the migration (not supported by the "
                "staged restore)"
            )
        tgt = sorted((v for v in layout if v.kind not in VDSO_KINDS), key=lambda v: v.start)
        cur = self.mapped
        keep: list[tuple[int, int]] = []
        mprot: list[tuple[int, int, int]] = []
        i = j = 0
        while i < len(cur) and j < len(tgt):
            c, t = cur[i], tgt[j]
            a, b = max(c.start, t.start), min(c.end, t.end)
            if a < b and identity(c) == identity(t):
                keep.append((a, b))
                if prot0(c) != prot0(t):
                    mprot.append((a, b, prot0(t)))
            if c.end <= t.end:
                i += 1
            else:
                j += 1
        unmap = subtract([(v.start, v.end) for v in cur], keep)
        fresh: list[Vma] = []
        for t in tgt:
            for a, b in subtract([(t.start, t.end)], keep):
                off = t.offset + (a - t.start) if t.kind in ("file", "shmem") else t.offset
                fresh.append(replace(t, start=a, end=b, offset=off, present=[]))
        self._check_layout_files([v for v in fresh if v.kind == "file"])
        if self._scratch_conflicts(tgt):
            self._move_scratch(cur, tgt)
        inj = rb.inj
        for a, b in _merge_adjacent(unmap):
            syscalls.munmap(inj, a, b - a)
        for a, b, p in mprot:
            syscalls.mprotect(inj, a, b - a, p)
        if fresh:
            saved = rb.proc
            rb.set_image(_Layout(self.source_pid, fresh))  # type: ignore[arg-type]
            try:
                rb.map_vmas()
            finally:
                rb.set_image(saved)
        dropped = _normalize(list(unmap) + [(v.start, v.end) for v in fresh])
        with self._lock:
            if dropped and self._written:
                self._written = subtract(_normalize(self._written), dropped)
            self.mapped = tgt
            self._starts = [v.start for v in tgt]
            self._ends = [v.end for v in tgt]
        return {"unmapped": len(unmap), "mapped": len(fresh), "mprotected": len(mprot)}

    def _scratch_conflicts(self, tgt: list[Vma]) -> bool:
        s = self.rb.inj.scratch
        return any(v.start < s.addr + s.size and s.addr < v.end for v in tgt)

    def _move_scratch(self, cur: list[Vma], tgt: list[Vma]) -> None:
        """The next layout needs the scratch area's place: move it somewhere free in both."""
        inj = self.rb.inj
        old = inj.scratch
        size = SCRATCH_PAGES * PAGE_SIZE
        busy = [(v.start, v.end) for v in cur + tgt] + list(self._vdso.values())
        busy.append((old.addr, old.addr + old.size))
        addr = free_range(busy, size)
        rwx = abi.PROT_READ | abi.PROT_WRITE | abi.PROT_EXEC
        flags = abi.MAP_PRIVATE | abi.MAP_ANONYMOUS | abi.MAP_FIXED_NOREPLACE
        syscalls.mmap(inj, addr, size, rwx, flags, _U64, 0)
        inj.write(addr, HEAL_CODE)
        inj.scratch = Scratch(addr)
        inj.use(addr)
        inj.reset_data()
        syscalls.munmap(inj, old.addr, old.size)

    # -- pages ----------------------------------------------------------------------------

    def write(self, runs: list[tuple[int, int]], data) -> int:
        """Write runs (pages back to back in data) into the child; returns pages written.

        Pages outside the current layout are skipped: their area was unmapped after the
        source listed the round's pages, and whatever is there by the next round is
        copied whole then (see PageCopier.copy's tolerant mode).
        """
        starts, ends = self._starts, self._ends
        inside = True
        for a, n in runs:
            k = bisect.bisect_right(starts, a) - 1
            if k < 0 or a + n * PAGE_SIZE > ends[k]:
                inside = False
                break
        if inside:
            write_runs(self.mem_fd, runs, data)
            done = list(runs)
        else:
            done = self._write_clipped(runs, memoryview(data).cast("B"))
        spans = _spans_of(done)
        pages = sum(n for _, n in done)
        with self._lock:
            self._written.extend(spans)
            self.pages_written += pages
        return pages

    def _write_clipped(self, runs, mv: memoryview) -> list[tuple[int, int]]:
        layout = list(zip(self._starts, self._ends, strict=True))
        done: list[tuple[int, int]] = []
        off = 0
        for a, n in runs:
            b = a + n * PAGE_SIZE
            for s, e in intersect([(a, b)], layout):
                piece = mv[off + (s - a) : off + (e - a)]
                write_runs(self.mem_fd, [(s, (e - s) // PAGE_SIZE)], piece)
                done.append((s, (e - s) // PAGE_SIZE))
            off += n * PAGE_SIZE
        return done

    def compact(self) -> None:
        """Merge the written spans (between rounds, off the critical path)."""
        with self._lock:
            self._written = _normalize(self._written)

    # -- the end --------------------------------------------------------------------------

    @as_error(RestoreError)
    def finish(self, proc: ProcessImage) -> dict[str, float]:
        """Final layout, stale pages zapped, then the process state; the process runs."""
        rb = self.rb
        assert rb is not None
        if proc.pid != self.source_pid:
            raise RestoreError(f"the final state is of PID {proc.pid}, not {self.source_pid}")
        if proc.zombies:  # a child that came and went during the rounds, not reaped yet
            pids = ", ".join(str(z.pid) for z in proc.zombies)
            raise RestoreError(
                f"the final state holds zombie children ({pids}): a staged restore builds "
                "one process"
            )
        t0 = time.monotonic()
        check_files(proc)
        if not self._same_layout(proc.vmas):
            self.reshape(proc.vmas)
        t1 = time.monotonic()
        zapped = self.zap_stale(proc)
        t2 = time.monotonic()
        rb.set_image(proc)
        tcp = RebuiltConnections()  # failed: kill() closes its TCP connections silently
        try:
            rb.apply_state()
        except BaseException:
            tcp.silence()
            raise
        finally:
            tcp.close()
        self.running = True  # detached: from now on the caller owns the process
        t3 = time.monotonic()
        self.timings.update(
            layout_ms=(t1 - t0) * 1000, zap_ms=(t2 - t1) * 1000, state_ms=(t3 - t2) * 1000,
            zapped_spans=float(zapped),
        )  # fmt: skip
        return self.timings

    def _same_layout(self, vmas: list[Vma]) -> bool:
        tgt = sorted((v for v in vmas if v.kind not in VDSO_KINDS), key=lambda v: v.start)
        return len(tgt) == len(self.mapped) and all(
            (a.start, a.end, prot0(a), identity(a)) == (b.start, b.end, prot0(b), identity(b))
            for a, b in zip(tgt, self.mapped, strict=True)
        )

    def stale_spans(self, proc: ProcessImage) -> list[tuple[int, int, int]]:
        """(start, end, advice): pages written since round 0 that the final map lacks."""
        with self._lock:
            written = _normalize(self._written)
            self._written = written
        present = _normalize([s for v in proc.vmas for s in _spans_of(v.present)])
        stale = subtract(written, present)
        out: list[tuple[int, int, int]] = []
        for v in sorted(proc.vmas, key=lambda v: v.start):
            if v.kind in VDSO_KINDS or (v.kind == "file" and v.shared):
                continue
            advice = abi.MADV_REMOVE if v.kind == "shmem" else abi.MADV_DONTNEED
            out.extend((a, b, advice) for a, b in intersect(stale, [(v.start, v.end)]))
        return out

    def zap_stale(self, proc: ProcessImage) -> int:
        spans = self.stale_spans(proc)
        for a, b, advice in spans:
            syscalls.madvise(self.rb.inj, a, b - a, advice)
        return len(spans)

    def kill(self) -> None:
        """SIGKILL and reap the child (idempotent; not once it runs: see finish())."""
        if self.child > 0 and not self.running:
            try:
                os.kill(self.child, signal.SIGKILL)
                os.waitpid(self.child, 0)
            except OSError:
                pass
            self.child = -1
        self.close()

    def close(self) -> None:
        if self.rb is not None:
            self.rb.close()


def _merge_adjacent(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    return _normalize(list(spans))
