/* snapgen: a process with a deterministic, numbered memory history, so that a
 * restored point-in-time snapshot can say exactly WHICH instant it is and prove
 * that all its memory is that instant's (tests/test_snapshot.py).
 *
 * usage: snapgen [key=value ...]
 *   mib=N     size of the generation region G (default 4), 4 KiB pages (no THP)
 *   seed=S    history seed (default 1)
 *   per=K     page writes per generation (default 48; PRNG-chosen, repeats allowed)
 *   drop=D    pages dropped (MADV_DONTNEED: must read zero) per generation (default 4)
 *   rate=R    background page writes per second into a separate scratch region X
 *             (default 0 = none: then memory changes ONLY on SIGUSR1)
 *   xmib=N    size of X (default 1)
 *
 * Generation 0: every page p of G holds content(seed, p, 0). Generation g >= 1 (one
 * per SIGUSR1, run in the main loop): with a PRNG seeded by (seed, g), K pages are
 * rewritten with content(seed, p, g), then D pages are dropped. The expected state
 * of G at generation g is therefore a function of (seed, g) ALONE: VERIFY replays
 * the history 1..g from scratch (nothing but the counter g is taken from memory)
 * and compares every byte of G with it. X uses the writer's model instead (a
 * per-page version word in memory, bumped before the page is rewritten), which is
 * consistent at any instant, so background writes can run during a snapshot.
 *
 * Signals (flags only; the work is done in the main loop):
 *   SIGUSR1  next generation          -> GEN <g> DONE pid= written=<n> dropped=<n>
 *            (written: distinct pages rewritten and not dropped again in this generation)
 *   SIGUSR2  verify and exit          -> VERIFY OK pid= gen= pages= xwritten=   (exit 0)
 *                                        VERIFY FAIL pid= gen= ... reason=        (exit 1)
 *   SIGHUP   close_range(3, ~0U, 0)   -> CLOSED pid= fds=<fds >= 3 before> left=<after>
 *   SIGURG   execv(/proc/self/exe, the same argv) with SNAPGEN_GEN=<g> in the
 *            environment: the new program image rebuilds G at generation g (and X
 *            empty) and prints EXECED pid= gen= (same PID, same start time)
 * Lines (one write(2) each): READY pid= mib= pages= seed= per= drop= rate= gen=0 g= x=
 */
#include "wl.h"

#include <dirent.h>
#include <sys/mman.h>
#include <sys/prctl.h>

#ifndef MADV_NOHUGEPAGE
#define MADV_NOHUGEPAGE 15
#endif

#define PG WL_PAGE
#define WORDS (PG / 8)
#define DROPPED 0xffffffffu

static uint64_t seed = 1;
static size_t npages, per = 48, ndrop = 4;
static unsigned char *G;
static uint32_t gen;

static unsigned char *X;
static size_t xpages;
static uint32_t *xver;
static uint64_t xwritten;
static uint64_t xstate = 0x2545f4914f6cdd1dULL;

static volatile sig_atomic_t usr1_count, got_usr2, got_hup, got_urg;
static uint32_t gens_done_here; /* SIGUSR1s handled by this program image */

static void on_usr1(int s) { (void)s; usr1_count++; }
static void on_usr2(int s) { (void)s; got_usr2 = 1; }
static void on_hup(int s) { (void)s; got_hup = 1; }
static void on_urg(int s) { (void)s; got_urg = 1; }

/* ---- content ------------------------------------------------------------------- */

static void gen_page(uint64_t *w, uint64_t tag, size_t p, uint32_t g)
{
    uint64_t s = mix64(seed * 0x9e3779b97f4a7c15ULL ^ mix64((tag << 48) ^ ((uint64_t)g << 24) ^ p)) | 1;
    w[0] = 0x5A9E000000000000ULL | (tag << 40) | p;
    w[1] = g;
    size_t k = 2;
    for (; k < WORDS / 4; k++) {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        w[k] = s;
    }
    for (; k < WORDS; k++)
        w[k] = s + (k & 7);
}

/* The choices of generation g: the same sequence wherever it is computed. */
struct pick {
    uint64_t s;
};

static void pick_init(struct pick *pk, uint32_t g)
{
    pk->s = mix64(seed ^ ((uint64_t)g * 0xd1b54a32d192ed03ULL)) | 1;
}

static size_t pick_next(struct pick *pk)
{
    pk->s ^= pk->s << 13;
    pk->s ^= pk->s >> 7;
    pk->s ^= pk->s << 17;
    /* a skewed choice: half the picks land in the first eighth (hot pages get
     * rewritten over and over, the rest now and then) */
    uint64_t r = mix64(pk->s);
    if (r & 1)
        return (size_t)((r >> 1) % (npages / 8 ? npages / 8 : 1));
    return (size_t)((r >> 1) % npages);
}

/* Replay generations 1..upto into st[] (last generation that wrote each page, or DROPPED). */
static void replay(uint32_t *st, uint32_t upto)
{
    memset(st, 0, npages * sizeof(*st));
    for (uint32_t g = 1; g <= upto; g++) {
        struct pick pk;
        pick_init(&pk, g);
        for (size_t i = 0; i < per; i++)
            st[pick_next(&pk)] = g;
        for (size_t i = 0; i < ndrop; i++)
            st[pick_next(&pk)] = DROPPED;
    }
}

/* ---- generations ----------------------------------------------------------------- */

static void next_generation(void)
{
    uint32_t g = gen + 1;
    unsigned char *touched = calloc(npages, 1);
    SETUP_CHECK(touched != NULL, "calloc");
    size_t nw = 0, nd = 0;
    struct pick pk;
    pick_init(&pk, g);
    gen = g; /* tests only snapshot between generations, never during one */
    for (size_t i = 0; i < per; i++) {
        size_t p = pick_next(&pk);
        gen_page((uint64_t *)(G + p * PG), 1, p, g);
        touched[p] |= 1;
    }
    for (size_t i = 0; i < ndrop; i++) {
        size_t p = pick_next(&pk);
        SETUP_CHECK(madvise(G + p * PG, PG, MADV_DONTNEED) == 0, "MADV_DONTNEED");
        touched[p] |= 2;
    }
    for (size_t p = 0; p < npages; p++) {
        nw += touched[p] == 1; /* written and still present: an increment must hold it */
        nd += (touched[p] & 2) != 0;
    }
    free(touched);
    gens_done_here++;
    say("GEN %u DONE pid=%d written=%zu dropped=%zu", g, (int)getpid(), nw, nd);
}

static void build_at(uint32_t g)
{
    uint32_t *st = calloc(npages, sizeof(*st));
    SETUP_CHECK(st != NULL, "calloc");
    replay(st, g);
    for (size_t p = 0; p < npages; p++)
        if (st[p] != DROPPED)
            gen_page((uint64_t *)(G + p * PG), 1, p, st[p]);
    free(st);
    gen = g;
}

/* ---- background writes into X ------------------------------------------------------ */

static void x_write_one(void)
{
    xstate ^= xstate << 13;
    xstate ^= xstate >> 7;
    xstate ^= xstate << 17;
    size_t p = (size_t)(xstate % xpages);
    uint32_t v = xver[p] + 1;
    xver[p] = v; /* version first, then the page (a freeze in between is finished later) */
    gen_page((uint64_t *)(X + p * PG), 2, p, v);
    xwritten++;
}

/* ---- verification ------------------------------------------------------------------ */

static void verify(void)
{
    uint32_t *st = calloc(npages, sizeof(*st));
    SETUP_CHECK(st != NULL, "calloc");
    replay(st, gen);
    uint64_t want[WORDS];
    size_t bad = 0;
    for (size_t p = 0; p < npages; p++) {
        const unsigned char *page = G + p * PG;
        if (st[p] == DROPPED)
            memset(want, 0, PG);
        else
            gen_page(want, 1, p, st[p]);
        if (memcmp(page, want, PG) != 0) {
            if (bad < 4) {
                uint64_t w0, w1;
                memcpy(&w0, page, 8);
                memcpy(&w1, page + 8, 8);
                if (all_zero(page, PG))
                    fail("G page %zu is zero, want generation %d", p,
                         st[p] == DROPPED ? -1 : (int)st[p]);
                else
                    fail("G page %zu holds generation %llu (header %016llx), want %s%d", p,
                         (unsigned long long)w1, (unsigned long long)w0,
                         st[p] == DROPPED ? "zero " : "generation ",
                         st[p] == DROPPED ? -1 : (int)st[p]);
            }
            bad++;
        }
    }
    if (bad > 4)
        fail("G: %zu bad pages in all", bad);
    free(st);
    size_t xbad = 0;
    for (size_t p = 0; p < xpages; p++) {
        const unsigned char *page = X + p * PG;
        int ok;
        if (xver[p] == 0) {
            ok = all_zero(page, PG);
        } else {
            gen_page(want, 2, p, xver[p]);
            ok = memcmp(page, want, PG) == 0;
        }
        if (!ok) {
            if (xbad < 4)
                fail("X page %zu does not hold its version %u", p, xver[p]);
            xbad++;
        }
    }
    if (xbad > 4)
        fail("X: %zu bad pages in all", xbad);
    char extra[160];
    snprintf(extra, sizeof(extra), "gen=%u pages=%zu xwritten=%llu", gen, npages,
             (unsigned long long)xwritten);
    /* finish() prints "VERIFY OK pid=.. <extra>": gen= is what the tests compare */
    finish(extra);
}

/* ---- fds, exec ----------------------------------------------------------------------- */

static int count_fds_from3(void)
{
    DIR *d = opendir("/proc/self/fd");
    if (!d)
        return -1;
    int self = dirfd(d), n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] < '0' || e->d_name[0] > '9')
            continue;
        int fd = atoi(e->d_name);
        if (fd >= 3 && fd != self)
            n++;
    }
    closedir(d);
    return n;
}

static void close_fds(void)
{
    int before = count_fds_from3();
    long rc = syscall(SYS_close_range, 3U, ~0U, 0U);
    int after = count_fds_from3();
    say("CLOSED pid=%d fds=%d left=%d rc=%ld", (int)getpid(), before, after, rc);
}

static char **saved_argv;

static void reexec(void)
{
    char val[32];
    snprintf(val, sizeof(val), "%u", gen);
    SETUP_CHECK(setenv("SNAPGEN_GEN", val, 1) == 0, "setenv");
    execv("/proc/self/exe", saved_argv);
    SETUP_CHECK(0, "execv");
}

/* ---- main ------------------------------------------------------------------------------ */

static unsigned char *map_region(size_t pages)
{
    /* guard pages around it: G and X are VMAs of their own */
    unsigned char *base = mmap(NULL, (pages + 2) * PG, PROT_NONE,
                               MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    SETUP_CHECK(base != MAP_FAILED, "mmap");
    unsigned char *p = mmap(base + PG, pages * PG, PROT_READ | PROT_WRITE,
                            MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
    SETUP_CHECK(p == base + PG, "mmap fixed");
    SETUP_CHECK(munmap(base, PG) == 0 && munmap(p + pages * PG, PG) == 0, "munmap guards");
    SETUP_CHECK(madvise(p, pages * PG, MADV_NOHUGEPAGE) == 0, "MADV_NOHUGEPAGE");
    return p;
}

int main(int argc, char **argv)
{
    size_t mib = 4, xmib = 1;
    double rate = 0;
    saved_argv = argv;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strncmp(a, "mib=", 4))
            mib = strtoul(a + 4, NULL, 10);
        else if (!strncmp(a, "seed=", 5))
            seed = strtoull(a + 5, NULL, 10);
        else if (!strncmp(a, "per=", 4))
            per = strtoul(a + 4, NULL, 10);
        else if (!strncmp(a, "drop=", 5))
            ndrop = strtoul(a + 5, NULL, 10);
        else if (!strncmp(a, "rate=", 5))
            rate = strtod(a + 5, NULL);
        else if (!strncmp(a, "xmib=", 5))
            xmib = strtoul(a + 5, NULL, 10);
        else {
            errno = EINVAL;
            SETUP_CHECK(0, "unknown argument");
        }
    }
    SETUP_CHECK(mib > 0 && xmib > 0, "mib and xmib must be > 0");
    SETUP_CHECK(prctl(PR_SET_NAME, "snapgen") == 0, "PR_SET_NAME");

    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_flags = SA_RESTART;
    sa.sa_handler = on_usr1;
    SETUP_CHECK(sigaction(SIGUSR1, &sa, NULL) == 0, "sigaction USR1");
    sa.sa_handler = on_usr2;
    SETUP_CHECK(sigaction(SIGUSR2, &sa, NULL) == 0, "sigaction USR2");
    sa.sa_handler = on_hup;
    SETUP_CHECK(sigaction(SIGHUP, &sa, NULL) == 0, "sigaction HUP");
    sa.sa_handler = on_urg;
    SETUP_CHECK(sigaction(SIGURG, &sa, NULL) == 0, "sigaction URG");

    npages = mib * 256;
    G = map_region(npages);
    xpages = xmib * 256;
    X = map_region(xpages);
    xver = calloc(xpages, sizeof(*xver));
    SETUP_CHECK(xver != NULL, "calloc");

    const char *env_gen = getenv("SNAPGEN_GEN");
    if (env_gen) {
        build_at((uint32_t)strtoul(env_gen, NULL, 10));
        unsetenv("SNAPGEN_GEN");
        say("EXECED pid=%d gen=%u", (int)getpid(), gen);
    } else {
        build_at(0);
        say("READY pid=%d mib=%zu pages=%zu seed=%llu per=%zu drop=%zu rate=%.0f gen=0 g=%p x=%p",
            (int)getpid(), mib, npages, (unsigned long long)seed, per, ndrop, rate, (void *)G,
            (void *)X);
    }

    double t0 = mono_now(), paced = 0;
    for (;;) {
        if (got_usr2)
            verify();
        if (got_hup) {
            got_hup = 0;
            close_fds();
        }
        if (got_urg) {
            got_urg = 0;
            reexec();
        }
        while (gens_done_here < (uint32_t)usr1_count)
            next_generation();
        if (rate > 0) {
            double due = (mono_now() - t0) * rate;
            if (due - paced > rate * 0.25 + 16)
                paced = due - 16; /* we were stopped: no burst to catch up */
            int n = 0;
            while (paced + 1 <= due && n < 16 && !got_usr2) {
                x_write_one();
                paced += 1;
                n++;
            }
        }
        struct timespec d = {0, rate > 0 ? 2000000L : 10000000L};
        nanosleep(&d, NULL); /* a signal cuts it short: fine */
    }
}
