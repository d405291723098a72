/* logger: a service-shaped process whose stdout and stderr lead outside the dump.
 *
 * usage: logger          (started with stdout/stderr set by the test: a pipe to a
 *                         `cat`, a socket to a collector, as systemd or a shell would)
 * Every 20 ms it writes "out N" to fd 1 and "err N" to fd 2, N counting up from 1 in
 * its memory: after a restore the numbers go on where they were, to wherever the
 * restoring ckpt connected those fds.
 */
#include "wl.h"

int main(void)
{
    signal(SIGPIPE, SIG_DFL);
    for (unsigned long n = 1;; n++) {
        char line[64];
        int k = snprintf(line, sizeof(line), "out %lu\n", n);
        if (write(1, line, (size_t)k) != k)
            return 3;
        k = snprintf(line, sizeof(line), "err %lu\n", n);
        if (write(2, line, (size_t)k) != k)
            return 4;
        usleep(20000);
    }
}
