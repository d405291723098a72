/* traced: a process that is already being ptraced (ckpt dump must say exit 4).
 *
 * usage: traced
 * The parent forks a child that calls PTRACE_TRACEME: the parent is its tracer and
 * passes every signal stop on with PTRACE_CONT. The child prints
 * READY pid=<child> tracer=<parent>
 * and waits in sigsuspend() until SIGUSR2, then checks its TracerPid is still the
 * parent and prints VERIFY OK pid=<child> (exit 0). The parent exits with the
 * child's status.
 */
#include "wl.h"

#include <sys/prctl.h>
#include <sys/ptrace.h>
#include <sys/wait.h>

static volatile sig_atomic_t got_usr2;
static void on_usr2(int sig)
{
    (void)sig;
    got_usr2 = 1;
}

static int tracer_pid(void)
{
    char *st;
    if (read_file("/proc/self/status", &st) < 0)
        return -1;
    char *p = strstr(st, "TracerPid:");
    int t = p ? atoi(p + 10) : -1;
    free(st);
    return t;
}

int main(void)
{
    sigset_t old;
    catch_usr2_blocked(on_usr2, &old);

    pid_t parent = getpid();
    pid_t child = fork();
    SETUP_CHECK(child >= 0, "fork");
    if (child == 0) {
        SETUP_CHECK(prctl(PR_SET_PDEATHSIG, SIGKILL) == 0, "PR_SET_PDEATHSIG");
        SETUP_CHECK(prctl(PR_SET_NAME, "cktraced") == 0, "PR_SET_NAME");
        SETUP_CHECK(ptrace(PTRACE_TRACEME, 0, NULL, NULL) == 0, "PTRACE_TRACEME");
        say("READY pid=%d tracer=%d", (int)getpid(), (int)parent);
        while (!got_usr2)
            sigsuspend(&old);
        CHECK(tracer_pid() == parent, "TracerPid is %d, want %d", tracer_pid(), (int)parent);
        finish("");
    }
    prctl(PR_SET_NAME, "cktracer");
    for (;;) {
        int st;
        if (waitpid(child, &st, 0) < 0) {
            if (errno == EINTR)
                continue;
            return 3;
        }
        if (WIFEXITED(st))
            return WEXITSTATUS(st);
        if (WIFSIGNALED(st))
            return 128 + WTERMSIG(st);
        if (WIFSTOPPED(st))
            ptrace(PTRACE_CONT, child, NULL, (void *)(long)WSTOPSIG(st));
    }
}
