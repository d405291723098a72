/* Benchmark target: N MiB of anonymous memory with realistic content.
   Half of the pages are random bytes, a quarter text-like, a quarter zero-ish
   structures. Prints "READY <pid> <checksum>" and, on SIGUSR2, recomputes the
   checksum and prints "VERIFY OK|FAIL" then exits 0/1. */
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static volatile sig_atomic_t go;
static void on_usr2(int s) { (void)s; go = 1; }

static uint64_t sum(const uint64_t *p, size_t n)
{
    uint64_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 1099511628211ULL;
    return h;
}

int main(int argc, char **argv)
{
    size_t mib = argc > 1 ? strtoul(argv[1], 0, 10) : 256;
    size_t n = mib << 20;
    unsigned char *p = mmap(0, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return 2;
    uint64_t s = 88172645463325252ULL;
    static const char words[] = "the quick brown fox jumps over the lazy dog while ckpt copies pages ";
    for (size_t pg = 0; pg < n / 4096; pg++) {
        unsigned char *q = p + pg * 4096;
        switch (pg % 4) {
        case 0: case 1:
            for (size_t i = 0; i < 4096; i += 8) {
                s ^= s << 13; s ^= s >> 7; s ^= s << 17;
                memcpy(q + i, &s, 8);
            }
            break;
        case 2:
            for (size_t i = 0; i < 4096; i++) q[i] = words[(i + pg) % (sizeof(words) - 1)];
            break;
        default:
            for (size_t i = 0; i < 4096; i += 64) { uint64_t v = pg * 64 + i; memcpy(q + i, &v, 8); }
        }
    }
    uint64_t c = sum((uint64_t *)p, n / 8);
    signal(SIGUSR2, on_usr2);
    printf("READY %d %016llx\n", getpid(), (unsigned long long)c);
    fflush(stdout);
    while (!go) pause();
    uint64_t c2 = sum((uint64_t *)p, n / 8);
    printf("VERIFY %s %d %016llx\n", c == c2 ? "OK" : "FAIL", getpid(), (unsigned long long)c2);
    fflush(stdout);
    return c == c2 ? 0 : 1;
}
