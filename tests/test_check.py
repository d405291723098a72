"""`ckpt check` data: ckpt/kernel/features.py.

The expectations follow the kernel the suite runs on: when the kernel's
config is readable (/proc/config.gz or /boot/config-RELEASE) the probe must
agree with it, so the same assertions hold on the 6.18 development machine
(uffd-wp, no soft-dirty) and in a Debian 6.1 VM (soft-dirty, no WP_ASYNC and
no PAGEMAP_SCAN). Failure paths are exercised by making the wrappers fail the
way an old kernel does (ENOSYS, ENOTTY, EINVAL): the probe must answer "no".
"""

from __future__ import annotations

import dataclasses
import errno
import gzip
import json
import os
import re
import time

import pytest

from ckpt.kernel import features as F
from ckpt.kernel import uffd as U


def kernel_config() -> dict[str, str] | None:
    paths = ["/proc/config.gz", f"/boot/config-{os.uname().release}"]
    for path in paths:
        try:
            opener = gzip.open if path.endswith(".gz") else open
            with opener(path, "rt") as f:
                text = f.read()
        except OSError:
            continue
        cfg = {}
        for line in text.splitlines():
            if m := re.match(r"(CONFIG_\w+)=(.*)", line):
                cfg[m[1]] = m[2]
        return cfg
    return None


def kernel_version() -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", os.uname().release)
    assert m, os.uname().release
    return int(m[1]), int(m[2])


@pytest.fixture(scope="module")
def features() -> F.Features:
    return F.probe()


@pytest.fixture(scope="module")
def config() -> dict[str, str]:
    cfg = kernel_config()
    if cfg is None:
        pytest.skip("kernel config not readable (/proc/config.gz, /boot/config-*)")
    return cfg


def test_probe_runs_fast_and_is_cached():
    t = time.perf_counter()
    f = F._probe_uncached()
    assert time.perf_counter() - t < 5
    assert isinstance(f, F.Features)
    assert F.probe() is F.probe()


def test_json_is_serializable_and_has_the_decisions(features):
    d = F.to_json(features)
    back = json.loads(json.dumps(d))
    assert back["dirty_backend"] in F.BACKENDS
    assert back["dirty_backend"] == features.dirty_backend
    assert back["required_missing"] == features.required_missing()
    assert back["kernel_release"] == os.uname().release
    assert set(back["uffd_feature_names"]) <= {f.name for f in U.Feature} | {
        f"bit{i}" for i in range(64)
    }


def test_text_table_is_aligned(features):
    text = F.render_text(features)
    lines = text.splitlines()
    assert lines[0].split() == ["feature", "status", "note"]
    col = lines[0].index("status")
    for line, row in zip(lines[1:], F.rows(features), strict=True):
        assert line.startswith(row[1])
        assert line[col:].startswith(row[2]), line
        assert line[col - 2 : col] == "  "
    assert "dirty tracking backend" in text
    assert features.dirty_backend in text


def test_agrees_with_kernel_config(features, config):
    on = lambda name: config.get(name) == "y"  # noqa: E731
    new_uffd = kernel_version() >= (6, 7)
    assert features.soft_dirty == on("CONFIG_MEM_SOFT_DIRTY")
    assert features.userfaultfd_syscall == on("CONFIG_USERFAULTFD")
    expect_wp_async = on("CONFIG_USERFAULTFD") and on("CONFIG_PTE_MARKER_UFFD_WP") and new_uffd
    assert features.uffd_wp_async == expect_wp_async
    assert features.pagemap_scan == (on("CONFIG_PROC_PAGE_MONITOR") and new_uffd)
    assert features.pr_set_mm_map == on("CONFIG_CHECKPOINT_RESTORE")
    assert features.proc_timers == (on("CONFIG_CHECKPOINT_RESTORE") and on("CONFIG_POSIX_TIMERS"))
    if expect_wp_async and features.pagemap_scan:
        assert features.wp_async_anon and features.wp_async_file and features.wp_async_roundtrip
        assert features.dirty_backend == "uffd-wp"
    elif on("CONFIG_MEM_SOFT_DIRTY"):
        assert features.dirty_backend == "soft-dirty"
    else:
        assert features.dirty_backend == "full"


def test_agrees_with_proc(features):
    assert features.proc_timers == os.path.exists("/proc/self/timers")
    with open("/proc/self/maps", "rb") as f:
        maps = f.read().decode()
    assert [v.name for v in features.vdso] == [n for n in F.VDSO_NAMES if n in maps]
    with open("/proc/self/status") as f:
        cap_eff = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))
    assert features.cap_eff == cap_eff
    assert features.xstate_size >= 512
    assert features.thp in ("always", "madvise", "never", "unavailable")


def assert_every_no_is_explained(f: F.Features) -> None:
    for _key, label, status, note in F.rows(f):
        if status == "no":
            assert note, f"{label}: 'no' without a reason"


def test_no_feature_says_no_without_a_reason(features):
    assert_every_no_is_explained(features)


def test_required_for_root_with_checkpoint_restore(features):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    assert features.ptrace_seize and features.process_vm_readv
    if features.has_cap(F.CAP_CHECKPOINT_RESTORE) or features.has_cap(F.CAP_SYS_ADMIN):
        assert features.clone3_set_tid
        assert features.required_missing() == [
            k for k in ("pr_set_mm_map",) if not features.pr_set_mm_map
        ]


def test_required_missing_lists_what_is_off(features):
    f = dataclasses.replace(features, clone3_set_tid=False, pr_set_mm_map=False)
    assert f.required_missing() == ["clone3_set_tid", "pr_set_mm_map"]
    assert F.required_missing(f) == ["clone3_set_tid", "pr_set_mm_map"]
    assert "missing" in F.render_text(f)


def test_backend_decision(features):
    wp = int(U.Feature.WP_ASYNC | U.Feature.WP_UNPOPULATED)
    best = dataclasses.replace(
        features, uffd_features=wp, pagemap_scan=True, wp_async_roundtrip=True, soft_dirty=True
    )
    assert best.dirty_backend == "uffd-wp"
    no_unpop = dataclasses.replace(best, uffd_features=int(U.Feature.WP_ASYNC))
    assert no_unpop.dirty_backend == "soft-dirty"
    assert dataclasses.replace(best, pagemap_scan=False).dirty_backend == "soft-dirty"
    assert dataclasses.replace(best, wp_async_roundtrip=False).dirty_backend == "soft-dirty"
    assert dataclasses.replace(best, uffd_features=0, soft_dirty=False).dirty_backend == "full"


# -------------------------------------------- a kernel that has none of it


def _fail(err: int):
    def raiser(*args, **kwargs):
        raise OSError(err, os.strerror(err))

    return raiser


def test_linux_6_1_like_kernel(monkeypatch):
    """6.1: UFFDIO_API refuses WP_ASYNC (EINVAL), PAGEMAP_SCAN is ENOTTY, and
    soft-dirty works. The probe must say so and pick soft-dirty."""
    real_api = U.uffd_api
    old_bits = ~int(
        U.Feature.WP_UNPOPULATED | U.Feature.POISON | U.Feature.WP_ASYNC | U.Feature.MOVE
    )

    def api_6_1(fd, features=0):
        if features & ~old_bits:
            raise OSError(errno.EINVAL, "UFFDIO_API failed: Invalid argument")
        info = real_api(fd, features)
        return U.ApiInfo(U.Feature(int(info.features) & old_bits), info.ioctls)

    monkeypatch.setattr(U, "uffd_api", api_6_1)
    monkeypatch.setattr(U, "pagemap_scan", _fail(errno.ENOTTY))
    monkeypatch.setattr(F, "_soft_dirty", lambda: True)
    f = F._probe_uncached()
    assert f.userfaultfd_syscall
    assert not f.uffd_wp_async and not f.uffd_wp_unpopulated
    assert not f.pagemap_scan and "ENOTTY" in f.notes["pagemap_scan"]
    assert not (f.wp_async_anon or f.wp_async_file or f.wp_async_roundtrip)
    assert "WP_ASYNC" in f.notes["wp_async_roundtrip"]
    assert f.dirty_backend == "soft-dirty"
    json.dumps(F.to_json(f))
    assert "soft-dirty" in F.render_text(f)
    assert_every_no_is_explained(f)


def test_no_userfaultfd_at_all(monkeypatch):
    monkeypatch.setattr(U, "uffd_create", _fail(errno.ENOSYS))
    monkeypatch.setattr(U, "uffd_dev_create", _fail(errno.ENOENT))
    monkeypatch.setattr(F, "_soft_dirty", _fail(errno.ENOSYS))
    f = F._probe_uncached()
    assert not f.userfaultfd_syscall and not f.userfaultfd_dev
    assert f.uffd_features == 0
    assert f.notes["userfaultfd_syscall"].startswith("ENOSYS")
    assert f.dirty_backend == "full"
    assert_every_no_is_explained(f)


def test_wp_async_registration_refused(monkeypatch):
    """A kernel that advertises WP_ASYNC but refuses to register (EINVAL)
    must not be chosen for uffd-wp."""
    monkeypatch.setattr(U, "register_wp", _fail(errno.EINVAL))
    f = F._probe_uncached()
    if not f.uffd_wp_async:
        pytest.skip("no WP_ASYNC here")
    assert not f.wp_async_anon and not f.wp_async_file and not f.wp_async_roundtrip
    assert f.dirty_backend != "uffd-wp"
    assert_every_no_is_explained(f)
