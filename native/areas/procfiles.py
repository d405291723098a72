"""One /proc file of many threads read in one call (issue 12: 1024 threads).

A freeze reads each thread's status, stat, children and cgroup files; from Python each
file costs an open, two reads, a close and the path and bytes objects around them, a
third of the file's whole cost. Here the files of a task directory are read by openat
on one directory fd into one buffer the caller provides.
"""

INCLUDES = """
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>
"""

TYPES = """
"""

FUNCTIONS = """
long ck_read_task_files(const char *dir, const int *tids, int n, const char *name,
                        char *buf, long cap, long *lens);
"""

CUSTOMIZATIONS = """
/* dir/TID/name of each of the n tids, one after the other into buf; lens[i] is the
   length of file i, or -errno when it could not be opened or read (ENOENT, ESRCH: the
   thread is gone). Returns the bytes used, -ENOSPC when buf is too small (the caller
   retries with a larger one), or -errno when dir cannot be opened. */
long ck_read_task_files(const char *dir, const int *tids, int n, const char *name,
                        char *buf, long cap, long *lens)
{
    char rel[64];
    long used = 0;
    int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd < 0)
        return -errno;
    for (int i = 0; i < n; i++) {
        if (snprintf(rel, sizeof(rel), "%d/%s", tids[i], name) >= (int)sizeof(rel)) {
            close(dfd);
            return -ENAMETOOLONG;
        }
        int fd = openat(dfd, rel, O_RDONLY | O_CLOEXEC);
        if (fd < 0) {
            lens[i] = -errno;
            continue;
        }
        long start = used;
        for (;;) {
            if (used >= cap) {
                close(fd);
                close(dfd);
                return -ENOSPC;
            }
            ssize_t r = read(fd, buf + used, cap - used);
            if (r < 0) {
                if (errno == EINTR)
                    continue;
                lens[i] = -errno;
                used = start;
                break;
            }
            if (r == 0) {
                lens[i] = used - start;
                break;
            }
            used += r;
        }
        close(fd);
    }
    close(dfd);
    return used;
}
"""
