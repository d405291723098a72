"""A private PostgreSQL cluster for tests/test_postgres.py and scripts/bench_postgres.py.

Debian's PostgreSQL server binaries (/usr/lib/postgresql/<version>/bin; .ci/run
installs the `postgresql` package) run as the `postgres` user from a directory of
their own that only we create: initdb into `<dir>/data`, the server started
directly (no pg_ctl, no systemd) as a process the caller owns, listening on
127.0.0.1:<free port> with its unix socket in `<dir>/sock`, logging to
`<dir>/postgres.log`. The postmaster chdir()s into the data directory, so every
process of the server has its working directory inside `<dir>`: the tests'
clean-up (helpers.E2E) finds them there.

Clients (psql, pgbench, pg_amcheck) run as root over TCP to 127.0.0.1, as the
database user `postgres` (trust authentication, loopback only), optionally inside
a network namespace (`ip netns exec NS ...`).

Nothing here imports pytest: scripts/bench_postgres.py uses it too.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

TOOLS = ("initdb", "postgres", "pgbench", "psql", "pg_amcheck")
DB_USER = "postgres"  # the OS user the server runs as, and the database superuser
SHARED_BUFFERS = "64MB"
DEADLINE = 60.0
POLL = 0.02


def find_bindir() -> Path | None:
    """The server binaries: $CKPT_PG_BIN, else the newest /usr/lib/postgresql/*/bin."""
    if os.environ.get("CKPT_PG_BIN"):
        return Path(os.environ["CKPT_PG_BIN"])
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else -1,
    )
    return found[-1] if found else None


def missing() -> str | None:
    """Why a cluster cannot run here (None: it can)."""
    bindir = find_bindir()
    if bindir is None:
        return (
            "no PostgreSQL server binaries (/usr/lib/postgresql/*/bin; apt-get install postgresql)"
        )
    gone = [t for t in TOOLS if not (bindir / t).exists()]
    if gone:
        return f"{', '.join(gone)} missing in {bindir} (apt-get install postgresql)"
    try:
        pwd.getpwnam(DB_USER)
    except KeyError:
        return f"no `{DB_USER}` user (Debian's postgresql package creates it)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- /proc


def _read(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return None


def children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            text = _read(f"/proc/{pid}/task/{tid}/children")
            out += [int(x) for x in (text or "").split()]
    return sorted(set(out))


def tree(pid: int) -> list[int]:
    """pid and its descendants, parents first."""
    order, queue = [pid], [pid]
    while queue:
        kids = children(queue.pop(0))
        order += kids
        queue += kids
    return order


def state(pid: int) -> str | None:
    text = _read(f"/proc/{pid}/stat")
    if not text:
        return None
    return text[text.rfind(")") + 2 :].split()[0]


def title(pid: int) -> str:
    """The process title postgres set (`postgres: checkpointer`, `postgres: postgres
    postgres 127.0.0.1(40312) idle`...)."""
    return (_read(f"/proc/{pid}/cmdline") or "").replace("\0", " ").strip()


def reap(pids: list[int], timeout: float = DEADLINE) -> None:
    """Wait until every pid is gone, reaping the ones that are (or become) our
    children: a killed tree's members are re-parented to the subreaper (us)."""
    end = time.monotonic() + timeout
    for pid in pids:
        while os.path.exists(f"/proc/{pid}"):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            if time.monotonic() > end:
                raise AssertionError(
                    f"process {pid} ({title(pid)!r}, state {state(pid)}) did not go away"
                )
            time.sleep(0.01)


# ---------------------------------------------------------------- the cluster


@dataclass
class Cluster:
    """One PostgreSQL cluster under `root` (a directory the postgres user can enter)."""

    root: Path
    bindir: Path = field(default_factory=lambda: find_bindir() or Path("/nonexistent"))
    port: int = field(default_factory=free_port)
    shared_buffers: str = SHARED_BUFFERS
    ipc_shm: set[str] = field(default_factory=set)  # /dev/shm files our server mapped
    ipc_sysv: set[int] = field(default_factory=set)  # SysV segments it attached

    def __post_init__(self) -> None:
        self.data = self.root / "data"
        self.sock = self.root / "sock"
        self.log = self.root / "postgres.log"
        pw = pwd.getpwnam(DB_USER)
        self.uid, self.gid = pw.pw_uid, pw.pw_gid

    def tool(self, name: str) -> str:
        return str(self.bindir / name)

    # -- server
    def server_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", LANG="C", HOME=str(self.root))
        return env

    def initdb(self) -> None:
        """A fresh cluster in root/data (the directories owned by postgres)."""
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o711)
        for d in (self.data, self.sock):
            d.mkdir(mode=0o700)
            os.chown(d, self.uid, self.gid)
        res = subprocess.run(
            [self.tool("initdb"), "-D", str(self.data), "-U", DB_USER, "-A", "trust",
             "--locale=C", "-E", "UTF8", "--no-sync"],
            user=self.uid, group=self.gid, extra_groups=[], cwd=self.root,
            env=self.server_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True,
            timeout=120, check=False,
        )  # fmt: skip
        if res.returncode != 0:
            raise AssertionError(f"initdb exited {res.returncode}:\n{res.stdout}{res.stderr}")

    def argv(self) -> list[str]:
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": str(self.sock),
            "shared_buffers": self.shared_buffers,
            "huge_pages": "off",
            "logging_collector": "off",
            "log_destination": "stderr",
            "log_line_prefix": "%m [%p] ",
        }
        out = [self.tool("postgres"), "-D", str(self.data)]
        for k, v in settings.items():
            out += ["-c", f"{k}={v}"]
        return out

    def popen(self, netns: str | None = None) -> subprocess.Popen:
        """Start the postmaster as `postgres`, in its own session, its output appended
        to the log; the caller owns (and must kill and reap) it. netns: in that
        network namespace (nsenter execs the server: its PID is the Popen's)."""
        if netns:
            argv = ["nsenter", f"--net=/run/netns/{netns}", "-S", str(self.uid),
                    "-G", str(self.gid), "--", *self.argv()]  # fmt: skip
            creds: dict = {}
        else:
            argv = self.argv()
            creds = {"user": self.uid, "group": self.gid, "extra_groups": []}
        with open(self.log, "ab") as out:
            return subprocess.Popen(
                argv, cwd=self.data, env=self.server_env(), stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **creds,
            )  # fmt: skip

    def log_text(self, since: int = 0) -> str:
        with open(self.log, "rb") as f:
            f.seek(since)
            return f.read().decode(errors="replace")

    def log_size(self) -> int:
        return self.log.stat().st_size if self.log.exists() else 0

    def log_problems(self, since: int = 0) -> list[str]:
        """ERROR, FATAL and PANIC lines of the server log (after byte offset since)."""
        return [
            ln
            for ln in self.log_text(since).splitlines()
            if re.search(r"\b(ERROR|FATAL|PANIC):", ln)
        ]

    # -- clients
    def client_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(
            PGHOST="127.0.0.1", PGPORT=str(self.port), PGUSER=DB_USER, PGDATABASE="postgres",
            PGCONNECT_TIMEOUT="10", LC_ALL="C",
        )  # fmt: skip
        return env

    def client_argv(self, name: str, *args: str, netns: str | None = None) -> list[str]:
        prefix = ["ip", "netns", "exec", netns] if netns else []
        return [*prefix, self.tool(name), *args]

    def run(
        self, name: str, *args: str, netns: str | None = None, timeout: float = 300
    ) -> subprocess.CompletedProcess:
        return subprocess.run(
            self.client_argv(name, *args, netns=netns), env=self.client_env(), cwd=self.root,
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
            check=False,
        )  # fmt: skip

    def sql(self, query: str, netns: str | None = None, timeout: float = 120) -> str:
        """One psql -c; its unaligned, tuples-only output (it must succeed)."""
        res = self.run(
            "psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", query,
            netns=netns, timeout=timeout,
        )  # fmt: skip
        if res.returncode != 0:
            raise AssertionError(f"psql -c {query!r} exited {res.returncode}:\n{res.stderr}")
        return res.stdout.strip()

    def answers(self, netns: str | None = None) -> bool:
        try:
            return self.sql("SELECT 1", netns=netns, timeout=30) == "1"
        except (AssertionError, subprocess.TimeoutExpired):
            return False

    def wait_ready(self, popen: subprocess.Popen | None = None, netns: str | None = None,
                   timeout: float = DEADLINE) -> None:  # fmt: skip
        end = time.monotonic() + timeout
        while not self.answers(netns):
            if popen is not None and popen.poll() is not None:
                raise AssertionError(
                    f"postgres exited {popen.returncode}:\n{self.log_text()[-4000:]}\n"
                    f"sockets on port {self.port}:\n{self.sockets(netns)}"
                )
            if time.monotonic() > end:
                raise AssertionError(
                    f"postgres does not answer after {timeout}s:\n{self.log_text()[-4000:]}"
                )
            time.sleep(0.1)

    def sockets(self, netns: str | None = None) -> str:
        """`ss` of the TCP sockets on the server's port (what holds it, if bind fails)."""
        prefix = ["ip", "netns", "exec", netns] if netns else []
        res = subprocess.run(
            [*prefix, "ss", "-tanoe", "state", "all", f"( sport = :{self.port} )"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        return res.stdout + res.stderr

    def pgbench_init(self, scale: int = 4, netns: str | None = None) -> None:
        res = self.run("pgbench", "-i", "-s", str(scale), "-q", netns=netns)
        if res.returncode != 0:
            raise AssertionError(f"pgbench -i exited {res.returncode}:\n{res.stderr}")

    def pgbench_argv(self, *args: str, netns: str | None = None) -> list[str]:
        """TPC-B-like load: 4 clients, 2 threads, progress every second; -n: no VACUUM
        and no TRUNCATE of pgbench_history first, so that the balances and the history
        keep adding up across runs."""
        return self.client_argv(
            "pgbench", "-n", "-c", "4", "-j", "2", "-P", "1", *args, netns=netns
        )

    def pgbench(self, seconds: int, netns: str | None = None) -> PgbenchResult:
        argv = self.pgbench_argv("-T", str(seconds), netns=netns)
        res = subprocess.run(
            argv, env=self.client_env(), cwd=self.root, stdin=subprocess.DEVNULL,
            capture_output=True, text=True, timeout=seconds + 300, check=False,
        )  # fmt: skip
        return PgbenchResult(res.returncode, res.stdout + res.stderr)

    def balances(self, netns: str | None = None) -> tuple[int, int, int, int]:
        """sum(abalance), sum(tbalance), sum(bbalance), sum(delta): every committed
        TPC-B transaction adds the same delta to each, so they must be equal."""
        out = self.sql(
            "SELECT (SELECT coalesce(sum(abalance), 0) FROM pgbench_accounts), "
            "(SELECT coalesce(sum(tbalance), 0) FROM pgbench_tellers), "
            "(SELECT coalesce(sum(bbalance), 0) FROM pgbench_branches), "
            "(SELECT coalesce(sum(delta), 0) FROM pgbench_history)",
            netns=netns,
        )
        a, t, b, h = (int(x) for x in out.split("|"))
        return a, t, b, h

    def history_rows(self, netns: str | None = None) -> int:
        return int(self.sql("SELECT count(*) FROM pgbench_history", netns=netns))

    def amcheck(self, netns: str | None = None) -> subprocess.CompletedProcess:
        """pg_amcheck of every database (installing amcheck where missing): heap
        pages and TOAST, every B-tree with its parent/child links, descending
        from the root for each tuple, and every heap tuple found in its indexes."""
        return self.run(
            "pg_amcheck", "--all", "--install-missing", "--heapallindexed", "--parent-check",
            "--rootdescend", netns=netns, timeout=600,
        )  # fmt: skip

    def probe(self, netns: str | None = None) -> int:
        """A new connection reads and writes: count the accounts, insert a row."""
        n = int(self.sql("SELECT count(*) FROM pgbench_accounts", netns=netns))
        self.sql(
            "CREATE TABLE IF NOT EXISTS ckpt_probe (id serial PRIMARY KEY, at timestamptz); "
            "INSERT INTO ckpt_probe (at) VALUES (now())",
            netns=netns,
        )
        return n

    # -- the server's processes
    def client_backends(self, postmaster: int) -> list[int]:
        """Backends serving a TCP client (title `postgres: USER DB 127.0.0.1(PORT) ...`)."""
        return [p for p in children(postmaster) if "127.0.0.1(" in title(p)]

    def quiet(self, postmaster: int, clients: int) -> bool:
        """No child is a zombie (exited, not yet reaped by the postmaster: ckpt refuses
        a tree with a zombie) and exactly `clients` client backends are connected."""
        kids = children(postmaster)
        if any(state(p) == "Z" for p in kids):
            return False
        return len(self.client_backends(postmaster)) == clients

    def note_ipc(self, pids: list[int]) -> None:
        """Remember the /dev/shm segments and SysV segments these processes map, to
        remove them at the end (a killed server leaves them behind)."""
        for pid in pids:
            for line in (_read(f"/proc/{pid}/maps") or "").splitlines():
                parts = line.split(maxsplit=5)
                if len(parts) < 6:
                    continue
                path = parts[5]
                if path.startswith("/dev/shm/PostgreSQL."):
                    self.ipc_shm.add(path.split()[0])
                elif path.startswith("/SYSV"):
                    self.ipc_sysv.add(int(parts[4]))  # the inode of a SysV mapping is its shmid

    def remove_ipc(self) -> None:
        """Remove what note_ipc() found, if nothing uses it any more."""
        for path in self.ipc_shm:
            with contextlib.suppress(OSError):
                if os.stat(path).st_uid == self.uid:
                    os.unlink(path)

        def nattch() -> dict[int, int]:
            out = {}
            for line in (_read("/proc/sysvipc/shm") or "").splitlines()[1:]:
                f = line.split()
                out[int(f[1])] = int(f[6])  # shmid -> attachments
            return out

        end = time.monotonic() + 10  # killed processes detach as they finish exiting
        while any(nattch().get(s, 0) for s in self.ipc_sysv) and time.monotonic() < end:
            time.sleep(0.05)
        attached = nattch()
        for shmid in self.ipc_sysv:
            if attached.get(shmid) == 0:
                subprocess.run(["ipcrm", "-m", str(shmid)], capture_output=True, check=False)


@dataclass
class PgbenchResult:
    returncode: int
    output: str

    def tps(self) -> float | None:
        m = re.search(r"^tps = ([0-9.]+)", self.output, re.M)
        return float(m.group(1)) if m else None

    def processed(self) -> int | None:
        m = re.search(r"number of transactions actually processed: (\d+)", self.output)
        return int(m.group(1)) if m else None

    def problems(self) -> list[str]:
        """Lines reporting errors, aborted clients or failed transactions."""
        out = []
        for ln in self.output.splitlines():
            low = ln.lower()
            m = re.search(r"number of failed transactions: (\d+)|^progress:.* (\d+) failed", low)
            if m:
                if int(m.group(1) or m.group(2)):
                    out.append(ln)
            elif re.search(r"error|abort|fatal|could not|failed|terminat", low):
                out.append(ln)
        return out

    def ok(self) -> bool:
        return self.returncode == 0 and not self.problems() and self.processed() is not None
