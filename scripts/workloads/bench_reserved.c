/* bench_reserved: many threads, a working set, and a lot of reserved but untouched
 * address space, the shape of a JVM or a malloc-heavy server (issue 12).
 *
 * usage: bench_reserved THREADS WS_MIB RESERVED_GIB
 *
 * RESERVED_GIB of MAP_NORESERVE heaps (4 of them) of which only WS_MIB in all is
 * written (spread over the heaps), plus THREADS-1 threads parked in a condition
 * wait on default-sized stacks (8 MiB reserved each, a few pages used) that each
 * touch a little of their own thread-local state. Prints READY, then on SIGUSR2 checks
 * the working set and every thread's value and prints VERIFY OK|FAIL.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#define HEAPS 4

static pthread_mutex_t m = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static int go, started;
static __thread long tls;
static volatile sig_atomic_t usr2;

static void on_usr2(int s) { (void)s; usr2 = 1; }

static void *worker(void *arg)
{
    long id = (long)arg;
    char scratch[4096];
    memset(scratch, (int)id, sizeof scratch); /* a touched page of stack */
    tls = id * 7919 + (long)syscall(SYS_gettid);
    long want = tls;
    pthread_mutex_lock(&m);
    started++;
    while (!go)
        pthread_cond_wait(&cv, &m);
    pthread_mutex_unlock(&m);
    return (void *)(intptr_t)(tls == want && scratch[100] == (char)id);
}

static uint64_t sum(uint64_t **h, size_t part)
{
    uint64_t c = 1469598103934665603ULL;
    for (int i = 0; i < HEAPS; i++)
        for (size_t off = 0; off < 2 * part; off += 128 << 10) {
            const uint64_t *p = (const uint64_t *)((char *)h[i] + off);
            for (size_t k = 0; k < (64 << 10) / 8; k++) c = (c ^ p[k]) * 1099511628211ULL;
        }
    return c;
}

int main(int argc, char **argv)
{
    int n = argc > 1 ? atoi(argv[1]) : 40;
    size_t ws = (size_t)(argc > 2 ? atol(argv[2]) : 512) << 20;
    size_t reserved = (size_t)(argc > 3 ? atol(argv[3]) : 8) << 30;
    size_t heap = reserved / HEAPS, part = ws / HEAPS;
    uint64_t *h[HEAPS];
    uint64_t s = 88172645463325252ULL;
    for (int i = 0; i < HEAPS; i++) {
        h[i] = mmap(NULL, heap, PROT_READ | PROT_WRITE,
                    MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (h[i] == MAP_FAILED) return 2;
        /* the working set: every other 64 KiB of the heap's first 2*part bytes,
           half random pages, half text-like pages */
        for (size_t off = 0; off < 2 * part; off += 128 << 10) {
            uint64_t *p = (uint64_t *)((char *)h[i] + off);
            for (size_t k = 0; k < (64 << 10) / 8; k++) {
                s ^= s << 13; s ^= s >> 7; s ^= s << 17;
                p[k] = (k & 512) ? s : 0x2065687420666f20ULL + ((off + k) & 0xff); /* " of the " */
            }
        }
    }
    uint64_t c = sum(h, part);

    pthread_t *t = calloc((size_t)n, sizeof(*t));
    signal(SIGUSR2, on_usr2);
    sigset_t b, old;
    sigemptyset(&b);
    sigaddset(&b, SIGUSR2);
    sigprocmask(SIG_BLOCK, &b, &old);
    for (long i = 1; i < n; i++)
        if (pthread_create(&t[i], NULL, worker, (void *)i)) return 3;
    for (;;) {
        pthread_mutex_lock(&m);
        int k = started;
        pthread_mutex_unlock(&m);
        if (k == n - 1) break;
        usleep(1000);
    }
    printf("READY pid=%d threads=%d\n", getpid(), n);
    fflush(stdout);
    while (!usr2) sigsuspend(&old);
    pthread_mutex_lock(&m);
    go = 1;
    pthread_cond_broadcast(&cv);
    pthread_mutex_unlock(&m);
    int bad = 0;
    for (long i = 1; i < n; i++) {
        void *r;
        pthread_join(t[i], &r);
        bad += r == NULL;
    }
    if (sum(h, part) != c) bad++;
    printf("VERIFY %s pid=%d bad=%d\n", bad ? "FAIL" : "OK", getpid(), bad);
    fflush(stdout);
    return bad ? 1 : 0;
}
