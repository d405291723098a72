"""Arm a dirty-page tracker inside a briefly frozen process (one injection), and
the descendants of a tree dump, each frozen only for its own arming."""

from __future__ import annotations

from .. import faults
from ..capture import attrs, state
from ..capture.process import check_arch
from ..capture.target import Target
from ..capture.tree import check_member, descendants
from ..errors import DumpError, NoSuchProcess
from ..kernel import procfs
from ..kernel.ptrace import Tracee
from ..kernel.remote import DumpInjection
from ..track import make_tracker
from ..track.base import Tracker
from .rounds import Member, Precopy


def arm(tracee: Tracee, trk: Tracker) -> None:
    regs = tracee.getregs()
    check_arch(tracee.pid, regs)
    mask = tracee.get_sigmask()
    maps = procfs.maps(tracee.pid)
    attrs.refuse_frozen([tracee])  # a descendant is armed before the final freeze
    with DumpInjection(tracee, maps, regs, mask) as inj:
        state.close_leftover_uffds(inj, tracee.pid)
        trk.arm(inj)
        faults.fail("arm-fails", DumpError)  # after arming: its cleanup is tested


def arm_members(pre: Precopy, tracker: str, root: int) -> None:
    """Arm tracking in each descendant, so the tree's pages are pre-copied too.

    Each is frozen only for its own arming. One that exits meanwhile is skipped;
    one that appears later is copied whole in the final freeze.
    """
    for space, pid in enumerate(descendants(root), 1):
        try:
            if check_member(pid, root):
                continue  # a zombie: nothing to track (recorded in the final freeze)
            st = procfs.stat(pid)
            member = Member(Target(pid, st.starttime), make_tracker(tracker, pid), space)
            tracee = member.target.freeze()
        except (NoSuchProcess, DumpError):
            continue
        try:
            arm(tracee, member.tracker)
        except BaseException:
            member.tracker.cleanup_on_error()
            if tracee.attached:
                tracee.detach()
            raise
        tracee.detach()
        pre.add_member(member)
