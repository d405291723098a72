"""End to end: what a socket is besides its data (issue 14, "restored, but wrong").

The workload (tests/workloads/sockopts.c) sets socket options, filters and
shutdown states, and makes connections across IPv4, IPv6 and v4-mapped IPv6; it
reads every option of a table (and every socket's names and family) at setup and
again when restored, and fails naming each difference. Each test dumps it,
restores it, and lets it check itself; what ckpt cannot restore exactly is
refused at the dump with one line.
"""

from __future__ import annotations

import socket

import pytest
from helpers import DEADLINE, assert_error, dump_restore_verify, proc_alive
from test_sockets import pat, recv_exactly


def test_options_restored(e2e):
    """Listeners, connections (IPv4, IPv6), unbound and address-only bound TCP, UDP
    (multicast settings, v4-mapped peer) and unix sockets with options set: every
    option of the workload's table reads back the same after the restore."""
    w = e2e.spawn("sockopts", "opts")
    dump_restore_verify(e2e, w)


def test_address_families_restored(e2e):
    """TCP over IPv4, IPv6 and v4-mapped IPv6, listeners with IPV6_V6ONLY on and off
    (a v6-only [::] listener sharing its port with a v4 one), bound and UDP sockets:
    names, families and V6ONLY come back, data flows both ways, listeners accept."""
    w = e2e.spawn("sockopts", "inet")
    dump_restore_verify(e2e, w)


def test_classic_bpf_filter_restored(e2e):
    """Classic BPF filters (a locked one on UDP, unix dgram, TCP) read back the same
    after the restore and still drop what they dropped."""
    w = e2e.spawn("sockopts", "bpf")
    dump_restore_verify(e2e, w)


def test_multicast_groups_restored(e2e):
    """UDP sockets in multicast groups (IPv4 any source, one source, all but one source;
    IPv6): each membership reads back the same (MCAST_MSFILTER) and datagrams to the groups
    arrive where the filters let them."""
    w = e2e.spawn("sockopts", "mcast")
    if w.ready["groups"] == "0":
        pytest.skip("no multicast interface with an IPv4 address to loop datagrams through")
    dump_restore_verify(e2e, w)


def test_ebpf_filter_refused(e2e):
    """An eBPF socket filter cannot be read back: the dump is refused with one line
    naming the fd, and the process runs on."""
    w = e2e.spawn("sockopts", "ebpf")
    res = e2e.dump(w.pid, e2e.path("img"))
    assert_error(res, 5, f"fd {w.ready['fd']}", "eBPF")
    assert proc_alive(w.pid)


@pytest.mark.parametrize(
    ("mode", "needle"),
    [("md5", "TCP_MD5SIG"), ("tsid", "SOF_TIMESTAMPING_OPT_ID")],
)
def test_unreadable_state_refused(e2e, mode, needle):
    """TCP_MD5SIG keys and the counter of SOF_TIMESTAMPING_OPT_ID cannot be read back:
    refused with one line naming the fd and what it holds; the process runs on."""
    w = e2e.spawn("sockopts", mode)
    res = e2e.dump(w.pid, e2e.path("img"))
    assert_error(res, 5, f"fd {w.ready['fd']}", needle)
    assert proc_alive(w.pid)


def test_udp_shutdown_restored(e2e):
    """UDP sockets shut down for reading, writing or both stay so."""
    w = e2e.spawn("sockopts", "shut")
    dump_restore_verify(e2e, w)


def test_outside_peers_over_v6_and_v4_mapped(e2e):
    """Connections to peers outside the process (--tcp-established) over IPv6 and
    v4-mapped IPv6, accepted by a dual-stack listener and by a v6-only one, and made by
    the process to a dual-stack listener: every byte sent before the dump and after the
    restore arrives, both ways; the restored v6-only listener still turns IPv4 away."""
    lst = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    lst.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    lst.bind(("::", 0))
    lst.listen(4)
    conns: list[socket.socket] = []
    try:
        w = e2e.spawn("sockopts", "ext6", str(lst.getsockname()[1]))
        port, port6 = int(w.ready["port"]), int(w.ready["port6"])
        # the workload's order: dual-stack over ::1, over 127.0.0.1, v6-only over ::1
        for host, p in (("::1", port), ("127.0.0.1", port), ("::1", port6)):
            conns.append(socket.create_connection((host, p), timeout=DEADLINE))
        for _ in range(2):  # then its own: to ::1, to ::ffff:127.0.0.1
            lst.settimeout(DEADLINE)
            conns.append(lst.accept()[0])
        w.wait_for("ACCEPTED", w.pid)
        before = 30000
        for i, c in enumerate(conns):
            c.sendall(pat(20 + i, 0, before))
        image = e2e.path("img")
        e2e.dump_ok(w, image, "--tcp-established")
        bg = e2e.ckpt_bg("restore", "-D", str(image))
        e2e.wait_restored(w.pid, w.ident, bg)
        after = 12000
        for i, c in enumerate(conns):
            c.sendall(pat(20 + i, before, after))
        (w.cwd / "total").write_text(str(before + after))
        v = e2e.verify(w, w.pid)
        assert v.ok, v.line
        for i, c in enumerate(conns):
            assert recv_exactly(c, 20000) == pat(10 + i, 0, 20000), f"connection {i}"
            assert recv_exactly(c, 3) == b"bye", f"connection {i}"
        assert bg.wait().returncode == 0
        # (SYNs may be held until the restore removes its lock: the client resends them)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port6), timeout=DEADLINE).close()
    finally:
        for c in conns:
            c.close()
        lst.close()


# --------------------------------------------------------------- units


def _socket_state(**sock) -> dict:
    s = {"ino": 5, "family": 2, "type": 2, "protocol": 17, "state": "bound"}
    s.update(sock)
    fd = {"fd": 3, "kind": "socket", "path": "socket:[5]", "flags": 2, "cloexec": False,
          "pos": 0, "socket": s}  # fmt: skip
    return {"pid": 10, "fds": [fd]}


def test_state_version_of_socket_settings():
    """A socket with an option a 5.x reader does not set, a BPF filter or a shut down UDP
    socket makes the state major 6 (a 5.x reader would drop them without a word);
    options 5.x sets and a unix socket's shutdown do not."""
    from ckpt.model import state_version

    assert state_version(_socket_state())[0] < 6
    assert state_version(_socket_state(options={"SO_REUSEADDR": 1, "IPV6_V6ONLY": 0}))[0] < 6
    assert state_version(_socket_state(options={"SO_BINDTODEVICE": b"lo"})) == (6, 0)
    assert state_version(_socket_state(filter=b"\x06" + bytes(7))) == (6, 0)
    assert state_version(_socket_state(shutdown=1)) == (6, 0)
    group = {"iface": "eth0", "group": "239.1.1.1"}
    assert state_version(_socket_state(mcast=[group])) == (6, 0)
    assert state_version(_socket_state(family=1, type=1, shutdown=2))[0] < 6


def test_schema_checks_socket_settings():
    """The filter is whole instructions, an option value at most 1024 bytes."""
    from ckpt.model import Socket
    from ckpt.schema import SchemaError, build

    s = _socket_state(filter=bytes(16), options={"IPV6_HOPOPTS": bytes(8)})["fds"][0]["socket"]
    assert build(Socket, s).filter == bytes(16)
    for bad in ({"filter": bytes(12)}, {"options": {"IPV6_HOPOPTS": bytes(1025)}}):
        with pytest.raises(SchemaError):
            build(Socket, {**s, **bad})


def test_option_table_order():
    """What the kernel checks against the bound interface comes before SO_BINDTODEVICE,
    which comes before bind; SO_PRIORITY after IP_TOS (which sets it); every name once."""
    from ckpt.kernel import sockets as ks

    for family, type_, proto in ((2, 1, 6), (10, 1, 6), (2, 2, 17), (10, 2, 17), (1, 1, 0)):
        names = [o.name for o in ks.option_table(family, type_, proto)]
        assert len(names) == len(set(names))
        early = [n for n in names if n in ks.BEFORE_BIND]
        assert names[: len(early)] == early, "early options first"
        dev = names.index("SO_BINDTODEVICE")
        for n in ("IP_UNICAST_IF", "IP_MULTICAST_IF", "IPV6_UNICAST_IF", "IPV6_MULTICAST_IF"):
            assert n not in names or names.index(n) < dev, n
        assert "IP_TOS" not in names or names.index("IP_TOS") < names.index("SO_PRIORITY")
        if type_ == 1 and family != 1:
            assert "IP_MULTICAST_TTL" not in names  # never settable on TCP
