"""Open an image and decode its process state: what show, verify and restore start
from (the state is schema-checked field by field on the way: ckpt/schema.py)."""

from __future__ import annotations

from ..errors import ImageCorrupt
from ..model import ProcessImage
from .reader import ImageReader


def load(directory: str) -> tuple[ImageReader, ProcessImage]:
    reader = ImageReader(directory)
    try:
        proc = ProcessImage.from_dict(reader.state)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ImageCorrupt(f"{directory}: process state is malformed ({exc})") from exc
    return reader, proc
