"""Who may have written an image, and who may change the place one is written to.

ckpt runs as root, and an image tells the restore what to open, map, bind and
become (docs/SECURITY.md). So:

- an image is read only if its directory and every file in it belong to the user
  who reads it (root for root) and are not writable by group or others; each file is
  checked on the fd it is read through (fstat after open, O_NOFOLLOW), never on a
  name looked at before;
- an image (or a snapshot store) is written only below directories that no other
  user can change: each one on the way, symlinks resolved, belongs to root or to
  ckpt's user and is not writable by group or others, unless it has the sticky bit
  (/tmp: others may add names there, but not rename or remove ckpt's). Otherwise a
  user could move ckpt's directory away mid-dump and put a link in its place.

Failures are ImageUntrusted (exit 17), one line naming the path and the reason.
"""

from __future__ import annotations

import os
import stat

from ..errors import ImageUntrusted

WRITABLE = stat.S_IWGRP | stat.S_IWOTH


def check_owned(st: os.stat_result, path: str, what: str) -> None:
    """`what` at `path` (its fstat/stat) was written by ckpt's user and only it may change it."""
    me = os.geteuid()
    if st.st_uid != me:
        raise ImageUntrusted(
            f"{path}: {what} belongs to uid {st.st_uid}, not to uid {me} who reads it; "
            "ckpt reads only images its own user wrote (docs/SECURITY.md)"
        )
    if st.st_mode & WRITABLE:
        raise ImageUntrusted(
            f"{path}: {what} is writable by {_who(st.st_mode)} (mode "
            f"{stat.S_IMODE(st.st_mode):04o}); ckpt reads only images no other user "
            "can change (docs/SECURITY.md)"
        )


def _who(mode: int) -> str:
    both = mode & WRITABLE == WRITABLE
    return "group and others" if both else ("group" if mode & stat.S_IWGRP else "others")


def _prefixes(path: str) -> list[str]:
    out = ["/"]
    cur = ""
    for part in path.strip("/").split("/"):
        if part:
            cur += "/" + part
            out.append(cur)
    return out


def check_place(directory: str, what: str = "an image") -> None:
    """Refuse to write `what` below `directory` unless no user other than root and
    ckpt's own can change any directory on the way there (missing ones are skipped:
    making them fails later, with its own error)."""
    me = os.geteuid()
    absolute = os.path.abspath(directory)
    seen: set[str] = set()
    for p in _prefixes(absolute) + _prefixes(os.path.realpath(absolute)):
        if p in seen:
            continue
        seen.add(p)
        try:
            st = os.stat(p)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode):
            continue
        if st.st_uid not in (0, me):
            raise ImageUntrusted(
                f"cannot write {what} below {directory}: {p} belongs to uid {st.st_uid}, "
                "who could move ckpt's files elsewhere while it writes them; choose a "
                "directory only root can change (docs/SECURITY.md)"
            )
        if st.st_mode & WRITABLE and not st.st_mode & stat.S_ISVTX:
            raise ImageUntrusted(
                f"cannot write {what} below {directory}: {p} is writable by "
                f"{_who(st.st_mode)} (mode {stat.S_IMODE(st.st_mode):04o}, no sticky bit), "
                "who could move ckpt's files elsewhere while it writes them; choose a "
                "directory only root can change (docs/SECURITY.md)"
            )
