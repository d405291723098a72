"""`python -m ckpt.transport migrate|receive ...` (the commands live in ckpt/cli/migrate.py);
errors print and exit exactly like `ckpt` (one `ckpt: error:` line, the error's exit code)."""

from ckpt.cli.migrate import main

main()
