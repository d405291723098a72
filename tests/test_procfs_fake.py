"""kernel/procfs against a fake /proc tree (psutil's way): procfs.PROC_ROOT points at a
temporary directory holding PID/stat, PID/status, PID/maps… so the parsers meet the
edge cases a live process rarely shows (a comm with spaces and parentheses, deleted
and newline-escaped mapping names, a missing process), without any process at all."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from ckpt.errors import NoSuchProcess
from ckpt.kernel import procfs

PID = 4242
COMM = b"a (b) c)"  # the last ')' ends it


def _stat_line(pid: int, comm: bytes, **fields: int) -> bytes:
    """A stat line: fields 3..52 (man 5 proc) after "pid (comm) ", by 1-based number."""
    f = {4: 1, 5: pid, 6: pid, 20: 1, 22: 1, 38: 17}  # ppid, pgrp, session, threads…
    f.update((int(k[1:]), v) for k, v in fields.items())
    rest = ["S" if i == 3 else str(f.get(i, 0)) for i in range(3, 53)]
    return b"%d (%s) %s\n" % (pid, comm, " ".join(rest).encode())


MAPS = (
    b"00400000-00452000 r-xp 00000000 08:02 173521      /usr/bin/dbus-daemon\n"
    b"00e03000-00e24000 rw-p 00000000 00:00 0           [heap]\n"
    b"7f2e000000-7f2e001000 rw-s 00000000 00:05 1234    /memfd:x (deleted)\n"
    b"7f2f000000-7f2f001000 r--p 00001000 08:02 99      /tmp/a\\012b\n"
    b"7ffc0000-7ffc1000 rw-p 00000000 00:00 0           [stack]\n"
)
SMAPS_TAIL = b"Size:                  4 kB\nVmFlags: rd wr mr mw me ac sd\n"


@pytest.fixture
def fake_proc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / str(PID)
    (d / "task" / str(PID)).mkdir(parents=True)
    (d / "task" / str(PID + 1)).mkdir()
    (d / "fd").mkdir()
    (d / "fdinfo").mkdir()
    (d / "stat").write_bytes(_stat_line(PID, COMM, f20=3, f22=123456, f45=0x601000))
    (d / "status").write_bytes(
        b"Name:\ta (b) c)\nState:\tS (sleeping)\nTgid:\t4242\nUid:\t1000\t1000\t1000\t1000\n"
        b"CapEff:\t0000000000000000\n"
    )
    (d / "maps").write_bytes(MAPS)
    smaps = b"".join(line + b"\n" + SMAPS_TAIL for line in MAPS.splitlines())
    (d / "smaps").write_bytes(smaps)
    (d / "fdinfo" / "3").write_bytes(b"pos:\t10\nflags:\t02004002\nmnt_id:\t29\nino:\t77\n")
    (d / "timers").write_bytes(
        b"ID: 0\nsignal: 14/0000000000000000\nnotify: signal/pid.4242\nClockID: 1\n"
        b"ID: 1\nsignal: 10/00000000000000ff\nnotify: thread/tid.4243\nClockID: 0\n"
    )
    (d / "cmdline").write_bytes(b"python3\0-m\0ckpt\0dump\0")
    (d / "auxv").write_bytes(struct.pack("<4Q", 6, 4096, 0, 0) + bytes(16))
    monkeypatch.setattr(procfs, "PROC_ROOT", str(tmp_path))
    return tmp_path


def test_paths_follow_the_root(fake_proc: Path):
    assert procfs.path(PID, "maps") == f"{fake_proc}/{PID}/maps"
    assert procfs.fd_path(PID, 3) == f"{fake_proc}/{PID}/fd/3"
    assert procfs.system("sys", "kernel", "core_pattern") == f"{fake_proc}/sys/kernel/core_pattern"
    # paths handed to a process ckpt injects into are its /proc, never redirected
    assert procfs.in_target("self", "fd", 5) == "/proc/self/fd/5"


def test_stat_takes_comm_up_to_the_last_parenthesis(fake_proc: Path):
    st = procfs.stat(PID)
    assert (st.pid, st.comm, st.state, st.ppid, st.pgrp) == (PID, COMM, "S", 1, PID)
    assert (st.num_threads, st.starttime, st.exit_signal, st.start_data) == (
        3,
        123456,
        17,
        0x601000,
    )


def test_status_and_tasks(fake_proc: Path):
    s = procfs.status(PID)
    assert s["Name"] == "a (b) c)" and s["Uid"].split() == ["1000"] * 4
    assert procfs.tasks(PID) == [PID, PID + 1]
    assert procfs.fds(PID) == []


def test_maps_and_smaps(fake_proc: Path):
    maps = procfs.maps(PID)
    assert [m.name for m in maps] == [
        "/usr/bin/dbus-daemon", "[heap]", "/memfd:x", "/tmp/a\nb", "[stack]",
    ]  # fmt: skip
    exe, heap, memfd = maps[0], maps[1], maps[2]
    assert (exe.start, exe.end, exe.prot, exe.is_file, exe.inode) == (
        0x400000, 0x452000, 5, True, 173521,
    )  # fmt: skip
    assert not heap.is_file and heap.size == 0x21000
    assert memfd.deleted and memfd.shared and (memfd.dev_major, memfd.dev_minor) == (0, 5)
    assert maps[3].offset == 0x1000
    smaps = procfs.smaps(PID)
    assert [m.vmflags for m in smaps] == [["rd", "wr", "mr", "mw", "me", "ac", "sd"]] * 5
    assert all(m.vmflags == [] for m in maps)


def test_fdinfo_timers_auxv(fake_proc: Path):
    info = procfs.parse_fdinfo(procfs.read_bytes(PID, "fdinfo", "3"))
    assert (info.pos, info.flags, info.mnt_id, info.ino) == (10, 0o2004002, 29, 77)
    t0, t1 = procfs.parse_timers(procfs.read_bytes(PID, "timers"))
    assert (t0.id, t0.signo, t0.notify, t0.by_tid, t0.clock_id) == (0, 14, "signal", False, 1)
    assert (t1.sigev_value, t1.notify, t1.notify_tid, t1.by_tid) == (0xFF, "thread", 4243, True)
    assert procfs.parse_auxv(procfs.read_bytes(PID, "auxv")) == [(6, 4096), (0, 0)]


def test_callers_outside_procfs_read_through_the_root(fake_proc: Path):
    """The image writer's leftover check and the throttle helper see the fake tree."""
    from ckpt.kernel import throttle_helper

    assert procfs.runs_ckpt(PID) and not procfs.runs_ckpt(PID + 7)
    assert throttle_helper.starttime_of(PID) == 123456
    assert throttle_helper.state_of(PID) == "S" and throttle_helper.state_of(PID + 7) is None


def test_a_missing_process_is_no_such_process(fake_proc: Path):
    with pytest.raises(NoSuchProcess):
        procfs.stat(PID + 7)
    with pytest.raises(NoSuchProcess):
        procfs.tasks(PID + 7)


def test_a_bad_line_is_an_error_not_a_guess(fake_proc: Path):
    (fake_proc / str(PID) / "maps").write_bytes(b"00400000-00452000 r-xp\n")
    with pytest.raises(procfs.ProcParseError):
        procfs.maps(PID)
    (fake_proc / str(PID) / "stat").write_bytes(b"4242 no-parenthesis S 1\n")
    with pytest.raises(procfs.ProcParseError):
        procfs.stat(PID)
