"""The migration wire: framing, authentication, the channel, the sender and the sink.
The orchestration (what is sent when, the handover) is api/migrate.py (source) and
api/receive.py + api/assemble.py (destination); the convergence controller is
api/converge.py.

    protocol.py   message types, caps, payload encodings
    channel.py    framed, encrypted (AES-256-GCM per frame) or HMAC-tagged, paced socket I/O
    auth.py       token file checks + mutual handshake deriving the per-direction keys
    tls.py        optional TLS contexts
    net.py        addresses, connect/listen
    gate.py       admission: accept until one source authenticates (deadline, rate limit)
    ratelimit.py  token bucket (--max-bandwidth)
    sender.py     the thread that owns the socket while rounds stream (source)
    sink.py       NetSink: ImageWriter's interface over the channel (source)
    throttle.py   client of kernel/throttle_helper.py (cgroup cpu.max or SIGSTOP duty cycle)
    errors.py     exit codes 20+
    faults.py     fault points for tests

`ckpt migrate` and `ckpt receive` are in ckpt/cli/migrate.py; docs/MIGRATION.md
describes the protocol, the downtime definition and the failure matrix.
"""
