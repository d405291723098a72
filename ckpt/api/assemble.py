"""Turns a migration's frame stream into a staged process and/or image layers
(the destination's data path; the session around it is receive.py)."""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager

from ..errors import CkptError, ImageExists, ImageNotFound, RestoreError
from ..image import ImageWriter, fsio
from ..image.layer_writer import LayerWriter, index_name, pages_name
from ..kernel import procfs
from ..kernel.native import PAGE_SIZE
from ..model import SLOT_SHIFT
from ..restore.staged import StagedRestore
from ..transport import faults, protocol
from ..transport.errors import (
    ProtocolError,
    SourceAborted,
)


def check_image_destination(path: str) -> None:
    """Fail before listening if --keep-images cannot be created (ImageWriter's own rules)."""
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ImageNotFound(f"{parent}: directory does not exist (cannot keep the image there)")
    if os.path.lexists(path) and not (os.path.isdir(path) and not os.listdir(path)):
        raise ImageExists(f"{path}: already exists (choose a new path for --keep-images)")


class Assembler:
    """Turns the frame stream into a staged process and/or image layers, enforcing the
    message order.

    Staged (the source sends each round's VMA layout, docs/MIGRATION.md): the restorer
    child is built from layer 0 on; chunks are inflated and written into it by a small
    pool, each layer's writes finish before its LAYER_ACK (and before the next layer's
    layout is applied). An image is written as well only for --keep-images, from the
    received compressed chunks (no second compression). Without layouts (an older
    source, or --no-stage): an image only, restored after the final round.
    """

    def __init__(
        self,
        path: str,
        level: int | None,
        ack: Callable[[int], None],
        *,
        stage: bool = True,
        keep: bool = False,
        new_pid: bool = False,
        threads: int = 2,
    ):
        self.path = path
        self.ack = ack
        self.level = level
        self.stage = stage
        self.keep = keep
        self.new_pid = new_pid
        self.writer: ImageWriter | None = None
        self.layer: LayerWriter | None = None
        self.staged: StagedRestore | None = None
        self.open = False  # a layer is open
        self.expect = 0  # next layer number
        self.pages = self.chunks = 0
        self.frozen_at: float | None = None
        self.frozen_layer = -1  # first layer after FROZEN
        self.source_frozen_ms = 0.0
        self.marks: dict[str, float] = {}  # when final-round events happened (monotonic)
        self._fsync = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-fsync")
        self._fsyncs: list = []
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ckpt-stage")
        self._inflight: deque[Future] = deque()
        self._max_inflight = 4 * threads

    def round_name(self) -> str:
        if self.frozen_at is not None:
            return "the final round"
        return f"pre-copy round {self.expect}"

    def feed(self, f) -> dict | None:
        """Handle one frame; returns the STATE message when the image is complete."""
        t = f.type
        if t == protocol.PING:
            return None
        if t == protocol.ABORT:
            reason = protocol.decode(t, f.payload)["reason"]
            raise SourceAborted(f"the source aborted the migration: {reason}")
        if t == protocol.PAGES:
            if not self.open:
                raise ProtocolError("page chunk outside a layer")
            chunk = protocol.parse_chunk(f.payload)
            if chunk.layer != self.expect:
                raise ProtocolError(f"page chunk of layer {chunk.layer} inside layer {self.expect}")
            if len(chunk.frame) > chunk.ulen + chunk.ulen // 128 + 4096:
                raise ProtocolError(f"page chunk of layer {chunk.layer}: frame too large")
            self._pages(chunk)
            self.chunks += 1
            self.pages += chunk.ulen // PAGE_SIZE
            return None
        msg = protocol.decode(t, f.payload)
        if t == protocol.LAYER_BEGIN:
            if self.open or msg["layer"] != self.expect:
                raise ProtocolError(f"layer {msg['layer']} begins, expected {self.expect}")
            if self.expect == 1:
                faults.kill_point("receive-midstream")
            if self.frozen_at is not None:
                self.marks["final_begin"] = time.monotonic()
            self._begin(msg)
            self.open = True
            self.pages = self.chunks = 0
        elif t == protocol.LAYER_END:
            if not self.open or msg["layer"] != self.expect:
                raise ProtocolError(f"layer {msg['layer']} ends, but layer {self.expect} is open")
            if (msg["pages"], msg["chunks"]) != (self.pages, self.chunks):
                raise ProtocolError(
                    f"layer {self.expect} ends after {self.pages} pages in {self.chunks} chunks, "
                    f"the source sent {msg['pages']} in {msg['chunks']}"
                )
            self._drain(0)  # every page of the layer is in place (or its error surfaces)
            if self.layer is not None:
                self.layer.close()
                if self.keep:
                    self._sync_later(self.expect)
                self.layer = None
            self.open = False
            if self.frozen_at is None:
                if self.staged is not None:
                    self.staged.compact()
                self.ack(self.expect)
            else:
                self.marks["final_end"] = time.monotonic()
            self.expect += 1
        elif t == protocol.FROZEN:
            if self.open or self.frozen_at is not None:
                raise ProtocolError("FROZEN marker out of place")
            self.frozen_at = time.monotonic()
            self.frozen_layer = self.expect
            self.source_frozen_ms = float(msg["frozen_for_ms"])
        elif t == protocol.STATE:
            if self.open or self.frozen_at is None or self.expect <= self.frozen_layer:
                raise ProtocolError("process state before the final round")
            self.marks["state"] = time.monotonic()
            return msg
        else:
            raise ProtocolError(f"unexpected {f.name} from the source")
        return None

    def _begin(self, msg: dict) -> None:
        vmas = msg.get("vmas")
        if self.expect == 0:
            if self.stage and vmas is not None:
                pid = msg.get("pid")
                if not pid or pid < 0:
                    raise ProtocolError("layer 0 carries a layout but no PID")
                layout = protocol.decode_layout(vmas)
                with _staging("starting the process"):
                    self.staged = StagedRestore(pid, layout, new_pid=self.new_pid)
            if self.keep or self.staged is None:
                self.writer = ImageWriter(
                    self.path, level=self.level, durable=self.keep, runs_ckpt=procfs.runs_ckpt
                )
        elif self.staged is not None:
            if vmas is None:
                raise ProtocolError(f"layer {self.expect} carries no layout")
            layout = protocol.decode_layout(vmas)
            with _staging(f"mapping the layout of round {self.expect}"):
                faults.stage_point(self.expect)
                self.staged.reshape(layout)
        if self.writer is not None:
            self.layer = self.writer.begin_layer()

    def _pages(self, chunk: protocol.RawChunk) -> None:
        if self.staged is not None and any(a >> SLOT_SHIFT for a, _ in chunk.runs):
            raise ProtocolError("pages of a process tree's member in a staged migration")
        if self.staged is not None:
            while len(self._inflight) >= self._max_inflight:
                self._inflight.popleft().result()
            self._inflight.append(self._pool.submit(self._apply, self.staged, chunk))
        elif self.layer is not None:
            chunk.check()  # the image path stores the frame as it came: check it first
        if self.layer is not None:
            self.layer.add_compressed(chunk.runs, chunk.frame, chunk.crc, chunk.ulen)

    @staticmethod
    def _apply(staged: StagedRestore, chunk: protocol.RawChunk) -> None:
        """Pool thread: inflate a chunk straight into the staged process."""
        data = chunk.inflate()
        with _staging(f"writing pages of round {chunk.layer}"):
            staged.write(chunk.runs, data)

    def _drain(self, keep: int) -> None:
        while len(self._inflight) > keep:
            self._inflight.popleft().result()

    def _sync_later(self, layer: int) -> None:
        """fsync a closed layer now, off the critical path (commit fsyncs again, cheaply)."""
        assert self.writer is not None
        d = self.writer.tmp_path
        for name in (pages_name(layer), index_name(layer)):
            self._fsyncs.append(self._fsync.submit(fsio.fsync_path, os.path.join(d, name)))

    def commit(self, msg: dict) -> None:
        for fut in self._fsyncs:
            try:
                fut.result()
            except OSError:
                pass  # commit() fsyncs again and reports a real failure
        assert self.writer is not None
        self.writer.commit(msg["state"], msg["meta"])
        self._fsync.shutdown(wait=False)

    def close(self) -> None:
        """The stream is over (pages all written): stop the pool."""
        self._pool.shutdown(wait=True)
        if self.writer is None:
            self._fsync.shutdown(wait=False)

    def abort_image(self) -> None:
        self._fsync.shutdown(wait=True, cancel_futures=True)
        if self.writer is not None:
            self.writer.abort()

    def abort(self) -> None:
        """Kill the staged process (if any) and drop the image."""
        for fut in self._inflight:
            fut.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._inflight.clear()
        if self.staged is not None:
            self.staged.kill()
        self._fsync.shutdown(wait=True, cancel_futures=True)
        if self.writer is not None:
            self.writer.abort()


@contextmanager
def _staging(what: str):
    """An OSError while building the process is a failed restore, not a storage problem."""
    try:
        yield
    except OSError as exc:
        if isinstance(exc, CkptError):
            raise
        raise RestoreError(f"staged restore failed while {what}: {exc}") from None
