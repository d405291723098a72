"""ckpt: checkpoint and restore running Linux processes."""

__version__ = "0.1.0"
