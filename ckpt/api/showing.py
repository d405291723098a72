"""What an image holds, as plain data (`ckpt show`, `ckpt show --json`)."""

from __future__ import annotations

import os

from ..image.load import load


def snapshot_dir(store: str, at: str | None) -> tuple[str, str]:
    """(image directory, id) of the snapshot `at` (id, prefix, time; None = latest)."""
    from ..store import Store

    st = Store.open(store)
    info = st.resolve(at)
    return st.path_of(info), info.id


def _resolve_show_target(target: str) -> str:
    """`ckpt show` takes an image DIR, a store S (latest) or S@ID."""
    base, _, at = target.partition("@")
    if os.path.isfile(os.path.join(base, "store.json")):
        return snapshot_dir(base, at or None)[0]
    return target


def show(directory: str) -> dict:
    """What an image holds, as plain data (for `ckpt show`)."""
    directory = _resolve_show_target(directory)
    reader, proc = load(directory)
    try:
        summary = reader.summary()
        meta = dict(reader.meta)
    finally:
        reader.close()
    vmas = []
    for v in proc.vmas:
        pages = sum(n for _, n in v.present)
        vmas.append({
            "start": v.start, "end": v.end, "size": v.size,
            "perms": ("r" if v.prot & 1 else "-") + ("w" if v.prot & 2 else "-")
            + ("x" if v.prot & 4 else "-") + ("s" if v.shared else "p"),
            "kind": v.kind, "name": v.name, "offset": v.offset, "pages": pages, "shm": v.shm,
        })  # fmt: skip
    fds = [
        {
            "fd": f.fd,
            "kind": f.kind,
            "path": f.path,
            "flags": f.flags,
            "cloexec": f.cloexec,
            "pos": f.pos,
        }
        for f in proc.fds
    ]
    for rec, f in zip(fds, proc.fds):
        if f.tty is not None:  # a shell job's terminal, or one outside the dump (capture/tty.py)
            rec["tty"] = {"name": f.tty.name, "pgid": f.tty.pgid, "foreground": f.tty.foreground}
        if f.pty is not None:  # a pty pair of the dump, on its master's first record
            rec["pty"] = {
                "name": f"/dev/pts/{f.pty.index}", "packet": f.pty.packet,
                "locked": f.pty.locked, "output": len(f.pty.output),
            }  # fmt: skip
    t = proc.threads[0]
    return {
        "image": os.path.abspath(directory),
        "meta": meta,
        "process": {
            "pid": proc.pid,
            "ppid": proc.ppid,
            "pgid": proc.pgid,
            "sid": proc.sid,
            "comm": proc.comm.decode(errors="replace"),
            "cmdline": [a.decode(errors="replace") for a in proc.cmdline.split(b"\0") if a],
            "exe": proc.exe,
            "cwd": proc.cwd,
            "uids": proc.uids,
            "gids": proc.gids,
            "threads": len(proc.threads),
            "sigmask": f"{t.sigmask:016x}",
            "sigactions": len(proc.sigactions),
            "posix_timers": len(proc.posix_timers),
            "itimers": len(proc.itimers),
            "descendants": [
                {
                    "pid": p.pid,
                    "ppid": p.ppid,
                    "comm": p.comm.decode(errors="replace"),
                    "threads": len(p.threads),
                    "fds": len(p.fds),
                }
                for p in proc.tree
            ],
            "zombies": [
                {
                    "pid": z.pid,
                    "ppid": z.ppid,
                    "comm": z.comm.decode(errors="replace"),
                    "status": z.status,
                }
                for z in proc.zombies
            ],
            "net_lock": proc.net_lock,
        },
        "vmas": vmas,
        "fds": fds,
        "shm": [_shm_info(i, o, proc) for i, o in enumerate(proc.shm)],
        "layers": summary,
    }


def _shm_info(index: int, obj, proc) -> dict:
    """One shared memory object: what it is, its pages, and which processes map it."""
    mapped_by = sorted({p.pid for p in (proc, *proc.tree) for v in p.vmas if v.shm == index})
    info = {
        "index": index, "kind": obj.kind, "size": obj.size,
        "pages": sum(n for _, n in obj.present), "mapped_by": mapped_by,
    }  # fmt: skip
    if obj.sysv is not None:
        info["sysv"] = {"shmid": obj.sysv.shmid, "key": obj.sysv.key}
    return info
