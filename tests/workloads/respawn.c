/* respawn: start a program as a NEW process with a chosen PID (clone3 set_tid;
 * needs CAP_CHECKPOINT_RESTORE or CAP_SYS_ADMIN in the PID namespace), so that a test
 * can replace a process by another one under the same PID (tests/test_snapshot.py).
 *
 * usage: respawn PID PROGRAM [ARG ...]
 * The child gets PID and execs PROGRAM with ARG... as argv[1..] (argv[0] = PROGRAM),
 * keeping our cwd, environment and fds 0-2. The parent prints
 *   RESPAWNED pid=<PID>          or   RESPAWN FAIL errno=<e> (<text>)  (exit 1)
 * and exits 0 at once: the child is reparented (a test is a child subreaper).
 */
#include "wl.h"

#include <linux/sched.h>

int main(int argc, char **argv)
{
    if (argc < 3) {
        say("RESPAWN FAIL usage: respawn PID PROGRAM [ARG ...]");
        return 2;
    }
    pid_t want = (pid_t)atoi(argv[1]);
    pid_t tids[1] = {want};
    struct clone_args ca;
    memset(&ca, 0, sizeof(ca));
    ca.exit_signal = SIGCHLD;
    ca.set_tid = (uint64_t)(uintptr_t)tids;
    ca.set_tid_size = 1;
    long pid = syscall(SYS_clone3, &ca, sizeof(ca));
    if (pid < 0) {
        say("RESPAWN FAIL errno=%d (%s)", errno, strerror(errno));
        return 1;
    }
    if (pid == 0) {
        execv(argv[2], argv + 2);
        say("RESPAWN FAIL exec errno=%d (%s)", errno, strerror(errno));
        _exit(127);
    }
    say("RESPAWNED pid=%ld", pid);
    return 0;
}
