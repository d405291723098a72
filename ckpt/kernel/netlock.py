"""The network lock: drop the packets of dumped TCP connections to outside peers
until the restore, so the peer retransmits instead of being answered with RST.

Between the dump and the restore no socket owns a dumped connection's address
pair: a segment from the peer would be answered with a reset, and one arriving
while ckpt still holds the original socket would be acknowledged and lost. With
the lock (an nftables table of ckpt's own that drops both directions of each
connection) the peer's segments are lost without an answer, so TCP resends them
to the restored socket once the restore removes the table. CRIU does the same
with iptables.

The same table holds new connections to the dumped listening sockets (issue
14): a SYN without ACK to a listener's address and port is dropped, so a
client connecting while the process is frozen or gone retransmits its SYN (after
1 s, 3 s, 7 s…) and reaches the restored listener, where it would otherwise wait
in an accept queue that cannot be dumped, or be refused.

The table outlives the dump on purpose (the image records its name); `ckpt
restore` deletes it. Without `nft` there is no lock, and the dump says so.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess

from ..errors import KernelError

TABLE_PREFIX = "ckpt_lock_"


def available() -> bool:
    return shutil.which("nft") is not None


def _nft(script: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["nft", "-f", "-"], input=script, capture_output=True, text=True, check=False
    )


def _match(host: str) -> tuple[str, str]:
    """('ip' | 'ip6', address) as nft wants it; IPv4-mapped IPv6 travels as IPv4."""
    addr = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return ("ip" if addr.version == 4 else "ip6"), str(addr)


class NetLock:
    """One dump's table; rules are added connection by connection, before each
    connection's state is read (nothing arrives or leaves after that)."""

    def __init__(self, name: str | None = None):
        self.name = name or f"{TABLE_PREFIX}{os.getpid()}_{os.urandom(4).hex()}"
        self.created = False
        self.connections = 0
        self.listeners: set[tuple[str, int]] = set()  # (address, port) whose SYNs are held

    def add(self, local: tuple, remote: tuple) -> None:
        lfam, laddr = _match(local[0])
        rfam, raddr = _match(remote[0])
        lport, rport = int(local[1]), int(remote[1])
        self._run(
            f"add rule inet {self.name} input {rfam} saddr {raddr} {lfam} daddr {laddr} "
            f"tcp sport {rport} tcp dport {lport} drop\n"
            f"add rule inet {self.name} output {lfam} saddr {laddr} {rfam} daddr {raddr} "
            f"tcp sport {lport} tcp dport {rport} drop\n"
        )
        self.connections += 1

    def hold_syn(self, local: tuple) -> None:
        """Drop new connection attempts (SYN without ACK) to a listening socket's
        address and port; segments of existing connections still pass. A listener on
        the unspecified address takes every address of the host (0.0.0.0: IPv4 only;
        "::" both families, whatever IPV6_V6ONLY says: a few more SYNs held than
        needed, never fewer)."""
        key = (str(local[0]), int(local[1]))
        if key in self.listeners:
            return
        fam, addr = _match(key[0])
        if ipaddress.ip_address(addr).is_unspecified:
            match = "meta nfproto ipv4 " if fam == "ip" else ""
        else:
            match = f"{fam} daddr {addr} "
        self._run(
            f"add rule inet {self.name} input {match}tcp dport {key[1]} "
            "tcp flags & (syn | ack) == syn drop\n"
        )
        self.listeners.add(key)

    def _run(self, rules: str) -> None:
        """Add rules, creating the table (in the same transaction) the first time."""
        script = ""
        if not self.created:
            script += (
                f"table inet {self.name} {{\n"
                "  chain input { type filter hook input priority -300; policy accept; }\n"
                "  chain output { type filter hook output priority -300; policy accept; }\n"
                "}\n"
            )
        r = _nft(script + rules)
        if r.returncode != 0:
            raise KernelError(f"cannot lock the network with nft: {r.stderr.strip()}")
        self.created = True

    def remove(self) -> None:
        if self.created:
            unlock(self.name)
            self.created = False

    def let_marked_in(self, mark: int) -> None:
        """Accept, ahead of every drop, the packets ckpt itself sends with this SO_MARK:
        the restore of a closing connection sends its peer's FIN again in the peer's
        name (kernel/tcp_repair.py inject) while this table still holds the
        connection. Once per table, after the first add()."""
        r = _nft(f"insert rule inet {self.name} input meta mark {mark:#x} accept\n")
        if r.returncode != 0:
            raise KernelError(f"cannot lock the network with nft: {r.stderr.strip()}")


def let_marked_in_table(name: str, mark: int) -> None:
    """NetLock.let_marked_in for a table a dump left (by name), unless it lets them in
    already: an image from before every outside connection's lock let ckpt's segments
    in (the restore sends each rebuilt connection an ACK in its peer's name:
    kernel/tcp_repair.py sync_mss). Best effort: a table that is gone is no matter."""
    if not name.startswith(TABLE_PREFIX) or not available():
        return
    r = subprocess.run(["nft", "list", "table", "inet", name], capture_output=True, text=True,
                       check=False)  # fmt: skip
    if r.returncode == 0 and f"meta mark {mark:#x} accept" not in r.stdout:
        _nft(f"insert rule inet {name} input meta mark {mark:#x} accept\n")


def unlock(name: str) -> bool:
    """Delete a lock table; False if it was not there (already removed, other host)."""
    if not name.startswith(TABLE_PREFIX) or not available():
        return False
    return _nft(f"delete table inet {name}\n").returncode == 0
