"""ImageWriter: builds an image in a temporary directory and publishes it atomically.

Why this order: layers are written while the process may still run (pre-copy),
the process state last; commit() then fsyncs every file and the directory and
renames `PATH.tmp-<pid>-<rand>` to `PATH`. A crash at any point leaves at most
a tmp directory, which ImageReader refuses (it has no state file, and is not
at PATH anyway): a half-written image never looks complete.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import shutil
import stat
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .. import __version__
from ..errors import DumpError, ImageExists, ImageNotFound
from ..model import present_keys, state_version
from ..units import PAGE_SIZE
from . import fsio, trust
from .blob import write_blob
from .codec import DEFAULT_LEVEL, Compressor
from .header import KIND_STATE, NO_LAYER
from .index import MAX_CHUNK_ULEN
from .layer_writer import BufferPool, LayerEntry, LayerWriter, index_name, pages_name
from .runs import normalize, resolve

STATE_NAME = "state.bin"


def _check_destination(path: str) -> None:
    """PATH may not exist yet, or be an empty directory (rename replaces those)."""
    parent = os.path.dirname(path) or "."
    if not os.path.isdir(parent):
        raise ImageNotFound(f"{parent}: directory does not exist (cannot create image {path})")
    trust.check_place(parent, f"image {path}")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode) and not os.listdir(path):
        return
    raise ImageExists(f"{path}: already exists (choose a new path or remove it)")


# DIR.tmp-<writer pid>-<8 hex>: an image being written (renamed to DIR when complete)
_TMP_NAME = re.compile(r"(?P<base>.+)\.tmp-(?P<pid>[0-9]+)-[0-9a-f]{8}")
_IMAGE_FILE = re.compile(r"state\.bin|layer-[0-9]{4}\.(index|pages)\.bin|snapshot\.json")


def remove_leftovers(parent: str, runs_ckpt: Callable[[int], bool] | None = None) -> list[str]:
    """Remove the DIR.tmp-* directories that killed writers left in `parent`.

    A writer holds an flock on its tmp directory from right after making it until it
    is renamed or removed (Linux drops it when the writer dies, SIGKILL too), so
    one whose lock can be taken has no live writer of this ckpt. Removed only if also:
    its writer's PID runs no ckpt (a ckpt without this lock may still be writing; a
    PID reused by anything else is not the writer), it is a 0700 directory of ckpt's
    user, and it holds nothing but image files. `runs_ckpt(pid)` says whether a PID runs
    ckpt (the caller passes procfs.runs_ckpt: image/ reads no /proc); without it any live PID might.
    """
    removed = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in names:
        m = _TMP_NAME.fullmatch(name)
        if m is None:
            continue
        path = os.path.join(parent, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) & 0o077:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # its writer is alive
            if (runs_ckpt or _alive)(int(m["pid"])):
                continue
            if not all(_IMAGE_FILE.fullmatch(n) for n in os.listdir(fd)):
                continue
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        finally:
            os.close(fd)
    return removed


def _alive(pid: int) -> bool:
    """Whether PID exists (then it may be a ckpt still writing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # EPERM: another user's
    return pid > 0


class ImageWriter:
    """Writes one image directory; use as a context manager so failures clean up.

    `base`: an existing image whose layers become this image's first layers
    (hard-linked, copied across filesystems); new layers continue its numbering.
    That is how an incremental snapshot extends the previous one for free.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        level: int | None = None,
        chunk_bytes: int = 4 << 20,
        threads: int = 2,
        *,
        base: str | os.PathLike | None = None,
        durable: bool = True,
        runs_ckpt: Callable[[int], bool] | None = None,
    ):
        if chunk_bytes % PAGE_SIZE or not PAGE_SIZE <= chunk_bytes <= MAX_CHUNK_ULEN:
            raise ValueError(
                f"chunk_bytes must be a multiple of {PAGE_SIZE} up to {MAX_CHUNK_ULEN}"
            )
        if threads < 1:
            raise ValueError("threads must be >= 1")
        self.path = os.path.abspath(os.fspath(path))
        #: fsync files and directories at commit; False for scratch images that only
        #: live until a restore has read them (crash-safety is then not needed)
        self.durable = durable
        _check_destination(self.path)
        self.level = DEFAULT_LEVEL if level is None else level
        self.chunk_bytes = chunk_bytes
        #: DIR.tmp-* directories of killed writers removed from the parent first
        self.removed_leftovers = remove_leftovers(os.path.dirname(self.path), runs_ckpt)
        self.tmp_path = f"{self.path}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        with fsio.space_checked(self.path, "its directory"):
            os.mkdir(self.tmp_path, fsio.DIR_MODE)
        # held until the directory is published or removed: a live writer's mark
        self._lock_fd = os.open(self.tmp_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        self._done = False  # committed or aborted
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ckpt-zstd")
        self._compressor = Compressor(self.level)
        self._max_inflight = 2 * threads
        self._buffers = BufferPool(chunk_bytes)  # add_read's chunk buffers, kept across layers
        self._entries: list[LayerEntry] = []
        self._open: LayerWriter | None = None
        self._ident = os.urandom(16)
        if base is not None:
            try:
                with fsio.space_checked(self.path, "the layers it shares with its base"):
                    self._inherit(os.fspath(base))
            except BaseException:
                self.abort()
                raise

    # -- layers ----------------------------------------------------------------

    def _inherit(self, base: str) -> None:
        from .reader import ImageReader  # the reader validates the base before we link it

        with ImageReader(base) as r:
            for lr in r.layers:
                for name in (pages_name(lr.number), index_name(lr.number)):
                    src, dst = os.path.join(r.path, name), os.path.join(self.tmp_path, name)
                    try:
                        os.link(src, dst)
                    except OSError:
                        shutil.copyfile(src, dst)
                self._entries.append(lr.entry)

    def begin_layer(self) -> LayerWriter:
        """Start the next layer (0 = base); the previous one must be closed."""
        self._check_usable()
        if self._open is not None and self._open.stats is None:
            raise RuntimeError(f"layer {self._open.layer} is still open")
        self._open = LayerWriter(
            len(self._entries),
            self.tmp_path,
            self._pool,
            self._compressor,
            self.chunk_bytes,
            self._max_inflight,
            self._entries.append,
            image=self.path,
            buffers=self._buffers,
            direct=self.durable,
        )
        return self._open

    @property
    def layers(self) -> int:
        """Number of closed layers so far."""
        return len(self._entries)

    # -- finishing -------------------------------------------------------------

    def commit(self, state: dict[str, Any], meta: dict[str, Any] | None = None) -> str:
        """Write the final process state, fsync everything, publish PATH. Returns PATH.

        On failure the tmp directory is removed and the error re-raised: no image
        is left behind that could look complete.
        """
        self._check_usable()
        if self._open is not None and self._open.stats is None:
            raise RuntimeError(f"layer {self._open.layer} is still open: close it before commit")
        try:
            with fsio.space_checked(self.path, "its state"):
                self._commit(state, meta or {})
        except BaseException:
            self.abort()
            raise
        return self.path

    def check_complete(self, state: dict[str, Any]) -> None:
        """Refuse to publish an image restore would refuse: every page the state says
        holds data must have a record (data or zero) in some layer. This is restore's
        own check (ImageReader.plan), run on the layers as written, so a dump never
        reports success (or kills its target) for an image that cannot be restored."""
        from .layer_reader import LayerReader  # the reader validates what it reads

        records = []
        for e in self._entries:
            lr = LayerReader(self.tmp_path, e)
            try:
                records.append(lr.index.records)
            finally:
                lr.close()
        missing = resolve(normalize(present_keys(state)), records).missing
        if missing:
            s, e = missing[0]
            total = sum(b - a for a, b in missing)
            raise DumpError(
                f"the image is incomplete: {total} page(s) the process holds are stored in "
                f"no layer (first key {s * PAGE_SIZE:#x}, {e - s} page(s)); not written "
                "(a ckpt bug: please report it)"
            )

    def _commit(self, state: dict[str, Any], meta: dict[str, Any]) -> None:
        self.check_complete(state)
        envelope = {
            "page_size": PAGE_SIZE,
            "writer": f"ckpt {__version__}",
            "layers": [e.to_obj() for e in self._entries],
            "meta": meta,
            "state": state,
        }
        state_path = os.path.join(self.tmp_path, STATE_NAME)
        version = state_version(state)
        write_blob(state_path, KIND_STATE, self._ident, NO_LAYER, envelope, version=version)
        self._pool.shutdown(wait=True)
        if self.durable:
            for e in self._entries:
                fsio.fsync_path(os.path.join(self.tmp_path, pages_name(e.layer)))
                fsio.fsync_path(os.path.join(self.tmp_path, index_name(e.layer)))
            fsio.fsync_path(state_path)
            fsio.fsync_path(self.tmp_path)
        try:
            os.rename(self.tmp_path, self.path)
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                raise ImageExists(f"{self.path}: appeared while the image was written") from None
            raise
        self._done = True
        self._unlock()
        if self.durable:
            fsio.fsync_path(os.path.dirname(self.path))

    def _unlock(self) -> None:
        fd, self._lock_fd = getattr(self, "_lock_fd", -1), -1
        if fd >= 0:
            os.close(fd)

    def abort(self) -> None:
        """Drop everything written so far (idempotent; a no-op after commit)."""
        if self._done:
            return
        self._done = True
        if self._open is not None:
            self._open.discard()
        self._pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(self.tmp_path, ignore_errors=True)
        self._unlock()

    def _check_usable(self) -> None:
        if self._done:
            raise RuntimeError("image writer already committed or aborted")

    def __enter__(self) -> ImageWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.abort()  # after a successful commit this does nothing

    def __del__(self):
        with contextlib.suppress(Exception):
            if not getattr(self, "_done", True):
                self.abort()
