/* threads: a process with a second thread.
 *
 * usage: threads [leader-exit]
 * READY pid= threads=2     then waits in sigsuspend() until SIGUSR2, then checks that
 *                          the second thread is still alive and was not disturbed
 * VERIFY OK pid= spins=    (exit 0)  or  VERIFY FAIL ... reason=  (exit 1)
 *
 * leader-exit: the main thread calls pthread_exit() on SIGUSR1 (the process
 * lives on in the second thread, its leader a zombie: ckpt must refuse it, exit
 * 5); the second thread then takes SIGUSR2 and verifies.
 */
#include "wl.h"

#include <pthread.h>
#include <sys/prctl.h>

static volatile sig_atomic_t got_usr2;
static volatile unsigned long spins;
static int leader_exit;

static void on_usr2(int sig)
{
    (void)sig;
    got_usr2 = 1;
}

static void verify(void)
{
    unsigned long before = spins;
    double deadline = mono_now() + 30;
    while (spins < before + 3 && mono_now() < deadline) {
        struct timespec d = {0, 10000000};
        nanosleep(&d, NULL);
    }
    CHECK(spins >= before + 3, "second thread stopped running");
    char extra[64];
    snprintf(extra, sizeof(extra), "spins=%lu", spins);
    finish(extra);
}

static void *worker(void *arg)
{
    (void)arg;
    if (leader_exit) {
        sigset_t usr2;
        sigemptyset(&usr2);
        sigaddset(&usr2, SIGUSR2);
        pthread_sigmask(SIG_UNBLOCK, &usr2, NULL); /* SIGUSR1 stays blocked here */
    }
    for (;;) {
        struct timespec d = {0, 20000000};
        nanosleep(&d, NULL);
        spins++;
        if (leader_exit && got_usr2) { /* this thread is the one that runs on */
            CHECK(spins > 3, "second thread did not run");
            char extra[64];
            snprintf(extra, sizeof(extra), "spins=%lu", spins);
            finish(extra);
        }
    }
    return NULL;
}

int main(int argc, char **argv)
{
    leader_exit = argc > 1 && strcmp(argv[1], "leader-exit") == 0;
    SETUP_CHECK(prctl(PR_SET_NAME, "ckthr") == 0, "PR_SET_NAME");
    sigset_t old;
    /* block before creating the thread so only the main thread takes SIGUSR2 */
    catch_usr2_blocked(on_usr2, &old);
    sigset_t u1;
    sigemptyset(&u1);
    sigaddset(&u1, SIGUSR1);
    sigprocmask(SIG_BLOCK, &u1, NULL);
    pthread_t t;
    SETUP_CHECK(pthread_create(&t, NULL, worker, NULL) == 0, "pthread_create");
    say("READY pid=%d threads=2", (int)getpid());
    if (leader_exit) {
        sigset_t u1;
        int sig;
        sigemptyset(&u1);
        sigaddset(&u1, SIGUSR1);
        sigwait(&u1, &sig);
        pthread_exit(NULL);
    }
    while (!got_usr2)
        sigsuspend(&old);
    CHECK(pthread_kill(t, 0) == 0, "second thread is gone");
    verify();
}
