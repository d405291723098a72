"""Plain syscalls with fixed signatures (pidfd_open, get_robust_list, ...)."""

INCLUDES = """
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>
#include <sys/syscall.h>
"""

TYPES = """
typedef int... pid_t;
"""

FUNCTIONS = """
long ck_syscall(long nr, long a0, long a1, long a2, long a3, long a4, long a5);
int ck_errno(void);
"""

CUSTOMIZATIONS = """
/* Returns the raw result or -errno, so Python never reads a stale errno. */
long ck_syscall(long nr, long a0, long a1, long a2, long a3, long a4, long a5)
{
    long r = syscall(nr, a0, a1, a2, a3, a4, a5);
    return r < 0 ? -errno : r;
}

int ck_errno(void) { return errno; }
"""
