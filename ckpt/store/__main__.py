"""`python -m ckpt.store snapshots|verify|gc|compact ...` (the commands live in ckpt/cli/store.py)."""

from ckpt.cli.store import main

main()
