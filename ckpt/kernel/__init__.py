"""The only package that talks to syscalls, ioctls, ptrace and /proc."""
