"""CPython workload with threads: a ThreadPoolExecutor, a producer/consumer pair and a
thread parked on a lock, all busy while ckpt works.

usage: python pythreads.py [WORKERS]      (default 4)

The pool keeps hashing tasks (each result is a pure function of the task number)
into `done`; a producer feeds a queue.Queue that a consumer sums; a third thread
waits on a threading.Event. READY pid= threads= ; on SIGUSR2 the main thread
checks that every thread is alive, that the pool still accepts and finishes new
work, that the queue pair still moves data, that every result recorded (before
and after the checkpoint) is right, then shuts everything down and joins it.
VERIFY OK pid= tasks= items=   or   VERIFY FAIL pid= reason=
"""

from __future__ import annotations

import hashlib
import os
import queue
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait

got_usr2 = False
stop = threading.Event()
done: dict[int, str] = {}
done_lock = threading.Lock()


def say(line: str) -> None:
    os.write(1, (line + "\n").encode())


def on_usr2(signum, frame):
    global got_usr2
    got_usr2 = True


def work(i: int) -> str:
    h = f"task{i}".encode()
    for _ in range(300):
        h = hashlib.sha256(h).digest()
    return h.hex()


def record(i: int) -> None:
    r = work(i)
    with done_lock:
        done[i] = r


def feeder(pool: ThreadPoolExecutor, counter: list[int]) -> None:
    while not stop.is_set():
        futs = [pool.submit(record, counter[0] + k) for k in range(16)]
        counter[0] += 16
        wait(futs)


def producer(q: queue.Queue, sent: list[int]) -> None:
    n = 0
    while not stop.is_set():
        q.put(n)
        sent[0] += n
        n += 1
        if n % 64 == 0:
            time.sleep(0.001)
    q.put(None)


def consumer(q: queue.Queue, got: list[int], items: list[int]) -> None:
    while True:
        v = q.get()
        if v is None:
            return
        got[0] += v
        items[0] += 1


def main() -> int:
    workers = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    signal.signal(signal.SIGUSR2, on_usr2)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ckw")
    counter = [0]
    q: queue.Queue = queue.Queue(maxsize=1000)
    sent, got, items = [0], [0], [0]
    gate = threading.Event()
    parked = threading.Thread(target=gate.wait, name="parked")
    threads = [
        threading.Thread(target=feeder, args=(pool, counter), name="feeder"),
        threading.Thread(target=producer, args=(q, sent), name="producer"),
        threading.Thread(target=consumer, args=(q, got, items), name="consumer"),
        parked,
    ]
    for t in threads:
        t.start()
    while len(done) < 64:
        time.sleep(0.01)
    say(f"READY pid={os.getpid()} threads={threading.active_count()}")
    while not got_usr2:
        signal.pause()
    problems = []
    dead = [t.name for t in threads if not t.is_alive()]
    if dead:
        problems.append(f"threads gone: {dead}")
    # the pool and the pipeline still make progress after the checkpoint
    before_done, before_items = len(done), items[0]
    deadline = time.monotonic() + 60
    while (len(done) < before_done + 64 or items[0] < before_items + 64) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.01)
    if len(done) < before_done + 64:
        problems.append("pool stalled")
    if items[0] < before_items + 64:
        problems.append("queue pipeline stalled")
    extra = [pool.submit(work, 10**9 + k) for k in range(8)]
    if [f.result(timeout=60) for f in extra] != [work(10**9 + k) for k in range(8)]:
        problems.append("new pool work wrong")
    stop.set()
    gate.set()
    for t in threads:
        t.join(60)
        if t.is_alive():
            problems.append(f"{t.name} did not finish")
    pool.shutdown(wait=True)
    if sent[0] != got[0]:
        problems.append(f"queue sum {got[0]} != sent {sent[0]}")
    with done_lock:
        wrong = [i for i, r in done.items() if r != work(i)]
    if wrong:
        problems.append(f"{len(wrong)} wrong results, e.g. task {wrong[0]}")
    if problems:
        say(f"VERIFY FAIL pid={os.getpid()} reason={'; '.join(problems)}")
        return 1
    say(f"VERIFY OK pid={os.getpid()} tasks={len(done)} items={items[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
