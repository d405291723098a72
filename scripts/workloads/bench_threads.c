/* bench_threads: N threads parked in a condition wait, each with a TLS value and a
 * small stack; the main thread waits for SIGUSR2, then wakes and joins them all.
 *
 * usage: bench_threads N
 * READY pid= threads=      then, on SIGUSR2:
 * VERIFY OK pid= threads=  or  VERIFY FAIL pid= bad=
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>

static pthread_mutex_t m = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static int go, started;
static __thread long tls;
static volatile sig_atomic_t usr2;

static void on_usr2(int s) { (void)s; usr2 = 1; }

static void *worker(void *arg)
{
    long id = (long)arg;
    tls = id * 7919 + (long)syscall(SYS_gettid);
    long want = tls;
    pthread_mutex_lock(&m);
    started++;
    while (!go)
        pthread_cond_wait(&cv, &m);
    pthread_mutex_unlock(&m);
    return (void *)(intptr_t)(tls == want);
}

int main(int argc, char **argv)
{
    int n = argc > 1 ? atoi(argv[1]) : 1;
    pthread_t *t = calloc((size_t)n, sizeof(*t));
    signal(SIGUSR2, on_usr2);
    sigset_t b, old;
    sigemptyset(&b);
    sigaddset(&b, SIGUSR2);
    sigprocmask(SIG_BLOCK, &b, &old);
    pthread_attr_t a;
    pthread_attr_init(&a);
    pthread_attr_setstacksize(&a, 64 * 1024);
    for (long i = 0; i < n; i++)
        if (pthread_create(&t[i], &a, worker, (void *)i)) {
            printf("SETUP FAIL pthread_create %ld\n", i);
            return 2;
        }
    for (;;) {
        pthread_mutex_lock(&m);
        int s = started;
        pthread_mutex_unlock(&m);
        if (s == n)
            break;
        usleep(1000);
    }
    printf("READY pid=%d threads=%d\n", getpid(), n + 1);
    fflush(stdout);
    while (!usr2)
        sigsuspend(&old);
    pthread_mutex_lock(&m);
    go = 1;
    pthread_cond_broadcast(&cv);
    pthread_mutex_unlock(&m);
    int bad = 0;
    for (int i = 0; i < n; i++) {
        void *r;
        pthread_join(t[i], &r);
        bad += r == NULL;
    }
    printf(bad ? "VERIFY FAIL pid=%d bad=%d\n" : "VERIFY OK pid=%d threads=%d\n", getpid(),
           bad ? bad : n + 1);
    return bad != 0;
}
