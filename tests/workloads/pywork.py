"""CPython workload: a live interpreter holding N MB of ordinary Python objects.

usage: python pywork.py [MB]       (default 300)

Builds lists of ints, strs, dicts and bytearrays from a seeded PRNG, prints
`READY pid= digest= mb= objects=`, then waits (signal.pause loop) for SIGUSR2;
it then recomputes the digest over every object, checks that the interpreter
still works (allocates, imports, clocks did not go back) and prints
`VERIFY OK pid= digest=` (exit 0) or `VERIFY FAIL pid= reason=` (exit 1).
Lines are written with one os.write each (the log is shared and O_APPEND).
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import sys
import time
from array import array

got_usr2 = False


def say(line: str) -> None:
    os.write(1, (line + "\n").encode())


def on_usr2(signum, frame):
    global got_usr2
    got_usr2 = True


def build(mb: int, seed: int = 1234):
    """About `mb` MB of objects: 40% bytearrays, 25% int lists, 20% strs, 15% dicts."""
    rng = random.Random(seed)
    budget = mb * 1024 * 1024
    blobs = [bytearray(rng.randbytes(1 << 20)) for _ in range(max(1, budget * 40 // 100 >> 20))]
    # a small int object is 32 bytes plus an 8-byte list slot
    n_ints = budget * 25 // 100 // 40
    ints = [list(range(k, k + 100_000)) for k in range(0, n_ints, 100_000)]
    for lst in ints:
        lst[rng.randrange(len(lst))] = rng.getrandbits(200)  # a few big ints too
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789 äöü€"
    n_strs = budget * 20 // 100 // 600
    strs = ["".join(rng.choices(alphabet, k=8)) * 64 + str(i) for i in range(n_strs)]
    n_dicts = budget * 15 // 100 // 4000
    dicts = [{j: f"v{i}-{j}" for j in range(40)} for i in range(n_dicts)]
    return {"blobs": blobs, "ints": ints, "strs": strs, "dicts": dicts}


def digest(objs) -> str:
    h = hashlib.blake2b(digest_size=16)
    for b in objs["blobs"]:
        h.update(b)
    for lst in objs["ints"]:
        h.update(array("q", (x & 0x7FFFFFFFFFFFFFFF for x in lst)).tobytes())
        h.update(str(max(lst)).encode())
    for s in objs["strs"]:
        h.update(s.encode())
    for d in objs["dicts"]:
        h.update(repr(sorted(d.items())).encode())
    return h.hexdigest()


def count(objs) -> int:
    return sum(len(v) for v in objs.values())


def main() -> int:
    mb = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    signal.signal(signal.SIGUSR2, on_usr2)
    objs = build(mb)
    ready_digest = digest(objs)
    pid0 = os.getpid()
    wall0, mono0 = time.time(), time.monotonic()
    say(f"READY pid={pid0} digest={ready_digest} mb={mb} objects={count(objs)}")
    while not got_usr2:
        signal.pause()
    problems = []
    now = digest(objs)
    if now != ready_digest:
        problems.append(f"digest {now} want {ready_digest}")
    # the interpreter still works: fresh allocations, an import, time, hashing
    fresh = [bytearray(1 << 20) for _ in range(8)]
    if sum(len(b) for b in fresh) != 8 << 20:
        problems.append("fresh allocation")
    import json

    if json.loads(json.dumps({"a": [1, 2, 3]})) != {"a": [1, 2, 3]}:
        problems.append("json round trip")
    if time.time() < wall0 - 1 or time.monotonic() < mono0:
        problems.append("the clocks went backwards")
    if problems:
        say(f"VERIFY FAIL pid={os.getpid()} reason={'; '.join(problems)}")
        return 1
    say(f"VERIFY OK pid={os.getpid()} digest={now}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
