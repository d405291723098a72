/* Shared helpers for the C workloads (header-only, each workload is one .c file).
 *
 * Protocol (see tests/helpers.py): stdout/stderr go to a regular log file; every
 * line is written with ONE write(2) so lines from two processes sharing the log
 * (O_APPEND) never interleave. Lines are `WORD key=value key=value ...`.
 */
#ifndef CKPT_WL_H
#define CKPT_WL_H

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#pragma GCC diagnostic ignored "-Wunused-function"
#pragma GCC diagnostic ignored "-Wformat-truncation"

#define WL_PAGE 4096UL

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...)
{
    char buf[8192];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof(buf) - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if ((size_t)n > sizeof(buf) - 2)
        n = (int)sizeof(buf) - 2;
    buf[n++] = '\n';
    size_t off = 0;
    while (off < (size_t)n) {
        ssize_t w = write(1, buf + off, (size_t)n - off);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return;
        off += (size_t)w;
    }
}

/* Set up failures (before READY): print and exit 2 so the test sees why. */
#define SETUP_CHECK(cond, what)                                                        \
    do {                                                                               \
        if (!(cond)) {                                                                 \
            say("SETUP FAIL %s errno=%d (%s) at %s:%d", what, errno, strerror(errno), \
                __FILE__, __LINE__);                                                   \
            exit(2);                                                                   \
        }                                                                              \
    } while (0)

/* Verification failures: collected so one VERIFY FAIL line names every problem. */
/* Install `handler` for sig and block sig; *old gets the previous mask, for
   sigsuspend(old): the race-free way to wait for the signal in a loop. */
static void catch_blocked(int sig, void (*handler)(int), sigset_t *old)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = handler;
    SETUP_CHECK(sigaction(sig, &sa, NULL) == 0, "sigaction");
    sigset_t block;
    sigemptyset(&block);
    sigaddset(&block, sig);
    sigprocmask(SIG_BLOCK, &block, old);
}

static void catch_usr2_blocked(void (*handler)(int), sigset_t *old)
{
    catch_blocked(SIGUSR2, handler, old);
}

/* After catch_usr2_blocked(.., old): SIGUSR1 caught and blocked too, and let in by
   sigsuspend(old) as SIGUSR2 is. */
static void catch_usr1_too(void (*handler)(int), sigset_t *old)
{
    sigset_t now;
    catch_blocked(SIGUSR1, handler, &now);
    sigdelset(old, SIGUSR1);
}

static char wl_fail_buf[6000];
static int wl_fails;

static void fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void fail(const char *fmt, ...)
{
    size_t len = strlen(wl_fail_buf);
    if (len + 4 >= sizeof(wl_fail_buf))
        return;
    if (len)
        strcat(wl_fail_buf, "; ");
    len = strlen(wl_fail_buf);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(wl_fail_buf + len, sizeof(wl_fail_buf) - len, fmt, ap);
    va_end(ap);
    wl_fails++;
}

#define CHECK(cond, ...)          \
    do {                          \
        if (!(cond))              \
            fail(__VA_ARGS__);    \
    } while (0)

/* Print VERIFY OK/FAIL with the caller's extra fields and exit 0 / 1. */
static void finish(const char *extra) __attribute__((noreturn));
static void finish(const char *extra)
{
    if (wl_fails)
        say("VERIFY FAIL pid=%d %s reason=%s", (int)getpid(), extra, wl_fail_buf);
    else
        say("VERIFY OK pid=%d %s", (int)getpid(), extra);
    exit(wl_fails ? 1 : 0);
}

/* ---- deterministic content --------------------------------------------------- */

static inline uint64_t mix64(uint64_t x)
{
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    x ^= x >> 31;
    return x;
}

/* Fill [p, p+len) page by page: even pages random (xorshift), odd pages compressible
 * (one repeated word). Page i's content depends only on (seed, i). */
static void fill(void *p, size_t len, uint64_t seed)
{
    unsigned char *b = p;
    size_t npages = (len + WL_PAGE - 1) / WL_PAGE;
    for (size_t i = 0; i < npages; i++) {
        size_t n = len - i * WL_PAGE < WL_PAGE ? len - i * WL_PAGE : WL_PAGE;
        uint64_t s = mix64(seed * 0x9e3779b97f4a7c15ULL + i + 1) | 1;
        uint64_t *w = (uint64_t *)(b + i * WL_PAGE);
        size_t nw = n / 8;
        if (i & 1) {
            for (size_t k = 0; k < nw; k++)
                w[k] = s;
        } else {
            for (size_t k = 0; k < nw; k++) {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                w[k] = s;
            }
        }
        for (size_t k = nw * 8; k < n; k++)
            b[i * WL_PAGE + k] = (unsigned char)(s >> (k & 7));
    }
}

/* Checksum of a byte range, chained through h. Word-wise, fast enough at -O1. */
static uint64_t hash_mem(const void *p, size_t len, uint64_t h)
{
    const unsigned char *b = p;
    size_t nw = len / 8;
    uint64_t w;
    for (size_t k = 0; k < nw; k++) {
        memcpy(&w, b + k * 8, 8);
        h = (h ^ w) * 0x100000001b3ULL;
        h ^= h >> 29;
    }
    for (size_t k = nw * 8; k < len; k++)
        h = (h ^ b[k]) * 0x100000001b3ULL;
    return mix64(h ^ len);
}

static int all_zero(const void *p, size_t len)
{
    const unsigned char *b = p;
    for (size_t k = 0; k < len; k++)
        if (b[k])
            return 0;
    return 1;
}

/* Read a whole (small) file into a malloc'd buffer; returns length or -1. */
static ssize_t read_file(const char *path, char **out)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    size_t cap = 4096, len = 0;
    char *buf = malloc(cap + 1);
    for (;;) {
        if (len == cap) {
            cap *= 2;
            buf = realloc(buf, cap + 1);
        }
        ssize_t r = read(fd, buf + len, cap - len);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            break;
        len += (size_t)r;
    }
    close(fd);
    buf[len] = 0;
    *out = buf;
    return (ssize_t)len;
}

/* Find the /proc/self/maps line that contains address `start`; copy its perms
 * ("rw-p") into perms[5] and its path (may be "") into path[pathlen]. */
static int maps_lookup(uintptr_t start, char perms[5], char *path, size_t pathlen)
{
    char *maps;
    if (read_file("/proc/self/maps", &maps) < 0)
        return -1;
    int found = -1;
    for (char *line = strtok(maps, "\n"); line; line = strtok(NULL, "\n")) {
        unsigned long s, e, off;
        char pr[5];
        int n = 0;
        if (sscanf(line, "%lx-%lx %4s %lx %*s %*s%n", &s, &e, pr, &off, &n) < 4)
            continue;
        if (start < s || start >= e)
            continue;
        memcpy(perms, pr, 5);
        const char *p = line + n;
        while (*p == ' ')
            p++;
        snprintf(path, pathlen, "%s", p);
        found = 0;
        break;
    }
    free(maps);
    return found;
}

/* Does some /proc/self/maps line labelled `label` (e.g. "[heap]") contain addr? */
static int maps_label_contains(const char *label, uintptr_t addr)
{
    char *maps;
    if (read_file("/proc/self/maps", &maps) < 0)
        return 0;
    int found = 0;
    for (char *line = strtok(maps, "\n"); line; line = strtok(NULL, "\n")) {
        unsigned long s, e;
        if (sscanf(line, "%lx-%lx", &s, &e) != 2)
            continue;
        size_t ll = strlen(line), bl = strlen(label);
        if (ll >= bl && strcmp(line + ll - bl, label) == 0 && addr >= s && addr < e) {
            found = 1;
            break;
        }
    }
    free(maps);
    return found;
}

static double mono_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* the pattern byte i of stream k (socket workloads: what was queued is what is read) */
static inline unsigned char pat(int k, size_t i)
{
    return (unsigned char)(i * 31 + (size_t)k * 7 + (i >> 8));
}

/* wait (generously) until fd is readable */
static inline int wait_in(int fd, int seconds)
{
    struct pollfd p = {.fd = fd, .events = POLLIN};
    double end = mono_now() + seconds;
    while (mono_now() < end) {
        int r = poll(&p, 1, 200);
        if (r > 0)
            return 1;
        if (r < 0 && errno != EINTR)
            return 0;
    }
    return 0;
}

#endif
