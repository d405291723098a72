/* Snapshot benchmark target: N MiB of memory (half random, half text-like).
   SIGUSR1: rewrite PCT% of the pages (chosen at random), then print
   "STEP <k> <checksum>". SIGUSR2: print "VERIFY <checksum>" and exit. */
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static volatile sig_atomic_t step_req, verify_req;
static void on_usr1(int s) { (void)s; step_req = 1; }
static void on_usr2(int s) { (void)s; verify_req = 1; }
static uint64_t rng = 88172645463325252ULL;
static uint64_t next(void) { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; return rng; }

static void fill(unsigned char *q, uint64_t pg)
{
    if (pg & 1) {
        for (size_t i = 0; i < 4096; i += 8) { uint64_t v = next(); memcpy(q + i, &v, 8); }
    } else {
        static const char w[] = "snapshot pages of a long running cache server ";
        for (size_t i = 0; i < 4096; i++) q[i] = w[(i + pg + (next() & 7)) % (sizeof(w) - 1)];
    }
}

static uint64_t sum(const uint64_t *p, size_t n)
{
    uint64_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 1099511628211ULL;
    return h;
}

int main(int argc, char **argv)
{
    size_t mib = argc > 1 ? strtoul(argv[1], 0, 10) : 1024;
    double pct = argc > 2 ? atof(argv[2]) : 1.0;
    size_t n = mib << 20, pages = n / 4096;
    unsigned char *p = mmap(0, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return 2;
    for (size_t pg = 0; pg < pages; pg++) fill(p + pg * 4096, pg);
    signal(SIGUSR1, on_usr1);
    signal(SIGUSR2, on_usr2);
    printf("READY %d %016llx\n", getpid(), (unsigned long long)sum((uint64_t *)p, n / 8));
    fflush(stdout);
    int k = 0;
    for (;;) {
        while (!step_req && !verify_req) pause();
        if (verify_req) break;
        step_req = 0;
        size_t count = (size_t)(pages * pct / 100.0);
        for (size_t i = 0; i < count; i++) { uint64_t pg = next() % pages; fill(p + pg * 4096, pg); }
        printf("STEP %d %016llx\n", ++k, (unsigned long long)sum((uint64_t *)p, n / 8));
        fflush(stdout);
    }
    printf("VERIFY %016llx\n", (unsigned long long)sum((uint64_t *)p, n / 8));
    fflush(stdout);
    return 0;
}
