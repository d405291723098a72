"""Live migration: stream pre-copy rounds to another host and hand the process over.

    protocol.py   message types, caps, payload encodings
    channel.py    framed, encrypted (AES-256-GCM per frame) or HMAC-tagged, paced socket I/O
    auth.py       token file checks + mutual handshake deriving the per-direction keys
    tls.py        optional TLS contexts
    net.py        addresses, connect/listen
    gate.py       admission: accept until one source authenticates (deadline, rate limit)
    ratelimit.py  token bucket (--max-bandwidth)
    sender.py     the thread that owns the socket while rounds stream (source)
    sink.py       NetSink: ImageWriter's interface over the channel (source)
    control.py    per-round progress, throttle decisions, freeze stamp (source)
    throttle.py   client of kernel/throttle_helper.py (cgroup cpu.max or SIGSTOP duty cycle)
    migrate.py    the source side, in order
    receiver.py   the destination side, in order
    errors.py     exit codes 20+
    faults.py     fault points for tests

`ckpt migrate` and `ckpt receive` are in ckpt/cli/migrate.py; docs/MIGRATION.md
describes the protocol, the downtime definition and the failure matrix.
"""
