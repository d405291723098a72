"""Sizes that plain data code (image/, store/, transport/) shares with kernel/.

PAGE_SIZE is the image format's page (docs/FORMAT.md: `page_size` 4096 in every state
and index) and x86-64's. It lives here, not in kernel/, so that code which never loads
the compiled extension (`ckpt show`, `ckpt verify`) can use it; kernel/native.py
re-exports it after checking that this machine's page is the same.
"""

from __future__ import annotations

PAGE_SIZE = 4096
