/* threads: a process with a second thread (ckpt dump must refuse it: exit 5).
 *
 * usage: threads
 * READY pid= threads=2     then waits in sigsuspend() until SIGUSR2, then checks that
 *                          the second thread is still alive and was not disturbed
 * VERIFY OK pid= spins=    (exit 0)  or  VERIFY FAIL ... reason=  (exit 1)
 */
#include "wl.h"

#include <pthread.h>
#include <sys/prctl.h>

static volatile sig_atomic_t got_usr2;
static volatile unsigned long spins;

static void on_usr2(int sig)
{
    (void)sig;
    got_usr2 = 1;
}

static void *worker(void *arg)
{
    (void)arg;
    for (;;) {
        struct timespec d = {0, 20000000};
        nanosleep(&d, NULL);
        spins++;
    }
    return NULL;
}

int main(void)
{
    SETUP_CHECK(prctl(PR_SET_NAME, "ckthr") == 0, "PR_SET_NAME");
    sigset_t old;
    /* block before creating the thread so only the main thread takes SIGUSR2 */
    catch_usr2_blocked(on_usr2, &old);
    pthread_t t;
    SETUP_CHECK(pthread_create(&t, NULL, worker, NULL) == 0, "pthread_create");
    say("READY pid=%d threads=2", (int)getpid());
    while (!got_usr2)
        sigsuspend(&old);
    unsigned long before = spins;
    double deadline = mono_now() + 30;
    while (spins < before + 3 && mono_now() < deadline) {
        struct timespec d = {0, 10000000};
        nanosleep(&d, NULL);
    }
    CHECK(spins >= before + 3, "second thread stopped running");
    CHECK(pthread_kill(t, 0) == 0, "second thread is gone");
    char extra[64];
    snprintf(extra, sizeof(extra), "spins=%lu", spins);
    finish(extra);
}
