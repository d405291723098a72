/* parentof: a parent whose one child runs another workload (a process tree for
 * tests that need a child with a known memory history, e.g. snapgen).
 *
 * usage: parentof PROG [ARGS...]
 *   The child execs PROG ARGS (its own lines go to the same log: READY, GEN, VERIFY).
 *   The parent prints nothing until SIGUSR2; then it forwards SIGUSR2 to its current
 *   child (read from /proc: after a restore with --new-pid the child's PID differs),
 *   waits for it and prints PARENT pid= child_status=<exit status> (exit 0 if the
 *   child exited 0, else 1). Other signals are not forwarded: a test signals the
 *   child directly.
 */
#include "wl.h"

#include <sys/wait.h>

static volatile sig_atomic_t got_usr2;

static void on_usr2(int sig)
{
    (void)sig;
    got_usr2 = 1;
}

static pid_t current_child(void)
{
    char path[64], *text = NULL;
    snprintf(path, sizeof(path), "/proc/self/task/%d/children", (int)getpid());
    if (read_file(path, &text) <= 0)
        return -1;
    pid_t c = (pid_t)atoi(text);
    free(text);
    return c > 0 ? c : -1;
}

int main(int argc, char **argv)
{
    SETUP_CHECK(argc > 1, "usage: parentof PROG [ARGS...]");
    sigset_t old;
    catch_usr2_blocked(on_usr2, &old);
    pid_t c = fork();
    SETUP_CHECK(c >= 0, "fork");
    if (c == 0) {
        sigprocmask(SIG_SETMASK, &old, NULL);
        signal(SIGUSR2, SIG_DFL);
        execv(argv[1], argv + 1);
        _exit(127);
    }
    while (!got_usr2)
        sigsuspend(&old);
    pid_t now = current_child();
    int st = 0;
    if (now > 0) {
        kill(now, SIGUSR2);
        waitpid(now, &st, 0);
    }
    int ok = now > 0 && WIFEXITED(st) && WEXITSTATUS(st) == 0;
    say("PARENT pid=%d child=%d child_status=%d", (int)getpid(), (int)now,
        WIFEXITED(st) ? WEXITSTATUS(st) : -1);
    return ok ? 0 : 1;
}
