/* writer: keeps writing pseudo-random pages at a set rate while ckpt pre-copies it,
 * and can prove after a restore that ALL its memory is exactly what its own state
 * says it must be at the instant of the freeze.
 *
 * usage: writer [key=value ...]
 *   mib=N       size of the written region W (default 64)
 *   rate=R      background page writes per second into W (default 2000);
 *               0 = none, max = as fast as possible
 *   seed=S      content seed (default 1)
 *   prefill=0|1 write every page of W once before READY (default 1)
 *   steps=0|1   set up the mutation regions below; SIGUSR1 runs the next step
 *   ballast=N   MiB of ballast (steps mode, default 0): step k keeps only the first
 *               ballast>>k pages present (MADV_DONTNEED on the rest) and rewrites
 *               them, so the set of written (and of present) pages halves per step
 *   report=S    print a RATE line every S seconds (default 1; 0: never)
 *   nothp=0|1   MADV_NOHUGEPAGE on W (4 KiB pages: soft-dirty tracks a THP as one
 *               2 MiB unit, so its precision is only measurable without THP)
 *
 * Lines (one write(2) each; see tests/helpers.py):
 *   READY pid= mib= rate= seed= pages= w=<addr of W> steps= <region>=<addr> ...
 *   RATE pid= pages_s=<achieved page writes/s since the last RATE line> total= steps=
 *   STEP <k> DONE pid= ...          after the k-th SIGUSR1's mutations are complete
 *   VERIFY OK pid= written= steps=  (exit 0)   or   VERIFY FAIL pid= ... reason= (exit 1)
 *
 * The model: every page of every region has a 32-bit state word in this process's
 * own memory: a version v (the page holds gen(seed, region, page, v), v = 0 means
 * never written: zero), or ZF|v (dropped: MADV_DONTNEED/re-created: zero), or FF|v
 * (a private file page: the file's content). A write bumps the version first, then
 * rewrites the whole page in place (a freeze in the middle is finished after the
 * restore). Versions only grow, so stale data from an older layer never matches.
 * SIGUSR1/SIGUSR2 only set flags; steps and the verification run in the main loop
 * between page writes. The verification compares every byte of every region with
 * the model, and also checks /proc/self/maps protections, that the region moved by
 * mremap is gone from its old address, VmFlags hg on the THP region and that the
 * shared anonymous region is still shared with a forked child.
 *
 * Steps (steps=1), step k runs on the k-th SIGUSR1 (a test's ckpt round hook sends
 * it after round k-1, so each mutation lands between two pre-copy rounds):
 *   1: dn 0-31, pfile 0-15 (COW), thp all 512 pages (2 MiB, MADV_HUGEPAGE), shm 0-15,
 *      prot 0-7, mv 0-3 written
 *   2: a new mapping appears (new 0-31 written, 32-47 untouched); dn 0-47 DONTNEED;
 *      re munmap + mmap at the same address, 0-15 written; mv mremap'd to a new
 *      address; prot 0-15 PROT_NONE (holding data), 16-31 PROT_READ; pfile 0-7
 *      DONTNEED (COW pages read the file again); shm 16-31 written; thp page 5
 *      DONTNEED, page 100 written
 *   3: prot 0-15 back to RW, page 0 written; mv 0,4-7 written; re 20; dn 1, 40;
 *      pfile 0 COW-written again, 8 DONTNEED; new 32-35 written, 40-47 PROT_READ;
 *      thp 200-203; shm 0-3 MADV_REMOVE (zero)
 *   4: prot 24-31 PROT_NONE (data under PROT_NONE at the freeze); dn 1 DONTNEED;
 *      re munmap + mmap again, 8-11 written; pfile 31 COW-written
 *   5+: ballast only
 */
#include "wl.h"

#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>

#ifndef MAP_FIXED_NOREPLACE
#define MAP_FIXED_NOREPLACE 0x100000
#endif
#ifndef MADV_HUGEPAGE
#define MADV_HUGEPAGE 14
#endif
#ifndef MADV_REMOVE
#define MADV_REMOVE 9
#endif

#define PG WL_PAGE
#define WORDS (PG / 8)
#define HUGE (2UL * 1024 * 1024)

#define ZF 0x80000000u /* dropped: must read zero */
#define FF 0x40000000u /* private file page: must equal the file */
#define VMASK 0x3fffffffu

enum { R_W = 1, R_DN, R_RE, R_MV, R_PR, R_NEW, R_FILE, R_THP, R_SHM, R_BAL, R_FILEDATA };

struct region {
    const char *name;
    int id;
    unsigned char *addr;
    size_t npages;
    uint32_t *st;       /* per-page state word */
    unsigned char *prot; /* per-page protection (PROT_*) */
    int mapped;
    int shared;
};

#define NREG 12
static struct region regs[NREG];
static int nregs;

static uint64_t seed = 1;
static volatile sig_atomic_t usr1_count, got_usr2;
static int steps_done;
static uint64_t total_written;
static uint64_t wstate = 0x9e3779b97f4a7c15ULL; /* the background writer's PRNG */

static struct region *W, *DN, *RE, *MV, *PR, *NEWR, *PF, *THP, *SHM, *BAL;
static unsigned char *mv_old; /* where mv was before the mremap */
static size_t bal_pages;
static int thp_advised;

static void on_usr1(int sig)
{
    (void)sig;
    usr1_count++;
}

static void on_usr2(int sig)
{
    (void)sig;
    got_usr2 = 1;
}

/* ---- page content ------------------------------------------------------------ */

static inline uint64_t page_key(int rid, size_t page, uint32_t v)
{
    return mix64(seed * 0x9e3779b97f4a7c15ULL ^ mix64(((uint64_t)rid << 40) ^ page) ^
                 ((uint64_t)v << 20)) | 1;
}

/* Page content from (seed, region, page, version): a header naming all three, a
 * quarter random words, the rest a repeating pattern (compresses like real data). */
static void gen_page(uint64_t *w, int rid, size_t page, uint32_t v)
{
    uint64_t s = page_key(rid, page, v);
    w[0] = 0xC0DE000000000000ULL | ((uint64_t)rid << 40) | page;
    w[1] = v;
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

static void gen_expected(struct region *r, size_t p, uint64_t *out)
{
    uint32_t st = r->st[p];
    if (st & FF)
        gen_page(out, R_FILEDATA, p, 1);
    else if ((st & ZF) || st == 0)
        memset(out, 0, PG);
    else
        gen_page(out, r->id, p, st & VMASK);
}

static void write_page(struct region *r, size_t p)
{
    uint32_t v = (r->st[p] & VMASK) + 1;
    r->st[p] = v; /* bump the version first, then rewrite the page in place */
    gen_page((uint64_t *)(r->addr + p * PG), r->id, p, v);
    total_written++;
}

static void write_pages(struct region *r, size_t from, size_t to)
{
    for (size_t p = from; p < to; p++)
        write_page(r, p);
}

/* Pages [from, to) were dropped: anonymous ones read zero, private file ones the file. */
static void mark_dropped(struct region *r, size_t from, size_t to, uint32_t flag)
{
    for (size_t p = from; p < to; p++)
        r->st[p] = (r->st[p] & VMASK) | flag;
}

static void dontneed(struct region *r, size_t from, size_t to, uint32_t flag)
{
    SETUP_CHECK(madvise(r->addr + from * PG, (to - from) * PG, MADV_DONTNEED) == 0,
                "MADV_DONTNEED");
    mark_dropped(r, from, to, flag);
}

static void protect(struct region *r, size_t from, size_t to, int prot)
{
    SETUP_CHECK(mprotect(r->addr + from * PG, (to - from) * PG, prot) == 0, "mprotect");
    memset(r->prot + from, prot, to - from);
}

/* ---- mappings ----------------------------------------------------------------- */

static void *xmmap(void *addr, size_t len, int prot, int flags, int fd)
{
    void *p = mmap(addr, len, prot, flags, fd, 0);
    SETUP_CHECK(p != MAP_FAILED, "mmap");
    return p;
}

/* Map len bytes with an unmapped page on each side (so it never merges with its
 * neighbours: each region is its own VMA, as the tests expect). */
static unsigned char *map_isolated(size_t len, int prot, int flags, int fd)
{
    unsigned char *base = xmmap(NULL, len + 2 * PG, PROT_NONE,
                                MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1);
    unsigned char *p = xmmap(base + PG, len, prot, flags | MAP_FIXED, fd);
    SETUP_CHECK(munmap(base, PG) == 0 && munmap(base + PG + len, PG) == 0, "munmap guards");
    return p;
}

/* calloc, not a small mmap: a one-page mmap could fill a guard hole between regions */
static void *alloc_zeroed(size_t len)
{
    void *p = calloc(1, len);
    SETUP_CHECK(p != NULL, "calloc");
    return p;
}

static struct region *add_region(const char *name, int id, unsigned char *addr,
                                 size_t npages, int prot, int shared)
{
    SETUP_CHECK(nregs < NREG, "too many regions");
    struct region *r = &regs[nregs++];
    r->name = name;
    r->id = id;
    r->addr = addr;
    r->npages = npages;
    r->st = alloc_zeroed(npages * sizeof(uint32_t));
    r->prot = alloc_zeroed(npages);
    memset(r->prot, prot, npages);
    r->mapped = addr != NULL;
    r->shared = shared;
    return r;
}

static const int RW = PROT_READ | PROT_WRITE;

static void write_pfile(const char *path, size_t npages)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    SETUP_CHECK(fd >= 0, "open pfile for write");
    uint64_t buf[WORDS];
    for (size_t p = 0; p < npages; p++) {
        gen_page(buf, R_FILEDATA, p, 1);
        SETUP_CHECK(write(fd, buf, PG) == (ssize_t)PG, "write pfile");
    }
    SETUP_CHECK(fsync(fd) == 0, "fsync pfile");
    close(fd);
}

static void setup_steps(size_t ballast_mib)
{
    DN = add_region("dn", R_DN, map_isolated(64 * PG, RW, MAP_PRIVATE | MAP_ANONYMOUS, -1), 64,
                    RW, 0);
    RE = add_region("re", R_RE, map_isolated(32 * PG, RW, MAP_PRIVATE | MAP_ANONYMOUS, -1), 32,
                    RW, 0);
    MV = add_region("mv", R_MV, map_isolated(32 * PG, RW, MAP_PRIVATE | MAP_ANONYMOUS, -1), 32,
                    RW, 0);
    PR = add_region("prot", R_PR, map_isolated(32 * PG, RW, MAP_PRIVATE | MAP_ANONYMOUS, -1),
                    32, RW, 0);
    NEWR = add_region("new", R_NEW, NULL, 48, RW, 0);
    SHM = add_region("shm", R_SHM, map_isolated(64 * PG, RW, MAP_SHARED | MAP_ANONYMOUS, -1),
                     64, RW, 1);
    write_pages(DN, 0, 64);
    write_pages(RE, 0, 32);
    write_pages(MV, 0, 32);
    write_pages(PR, 0, 32);
    write_pages(SHM, 0, 64);

    /* a private file mapping, every page read (file pages in memory, not COW yet) */
    write_pfile("pfile.dat", 32);
    int fd = open("pfile.dat", O_RDONLY | O_CLOEXEC);
    SETUP_CHECK(fd >= 0, "open pfile");
    PF = add_region("pfile", R_FILE, map_isolated(32 * PG, RW, MAP_PRIVATE, fd), 32, RW, 0);
    close(fd);
    mark_dropped(PF, 0, 32, FF);
    volatile unsigned char sink = 0;
    for (size_t p = 0; p < 32; p++)
        sink ^= PF->addr[p * PG + 17];
    (void)sink;

    /* a 2 MiB aligned MADV_HUGEPAGE region, left unpopulated until step 1 */
    unsigned char *raw = xmmap(NULL, 2 * HUGE, RW, MAP_PRIVATE | MAP_ANONYMOUS, -1);
    unsigned char *al = (unsigned char *)(((uintptr_t)raw + HUGE - 1) & ~(HUGE - 1));
    if (al > raw)
        SETUP_CHECK(munmap(raw, (size_t)(al - raw)) == 0, "munmap thp head");
    if (al + HUGE < raw + 2 * HUGE)
        SETUP_CHECK(munmap(al + HUGE, (size_t)(raw + 2 * HUGE - (al + HUGE))) == 0,
                    "munmap thp tail");
    thp_advised = madvise(al, HUGE, MADV_HUGEPAGE) == 0;
    THP = add_region("thp", R_THP, al, HUGE / PG, RW, 0);

    if (ballast_mib) {
        bal_pages = ballast_mib * 256;
        BAL = add_region("ballast", R_BAL,
                         map_isolated(bal_pages * PG, RW, MAP_PRIVATE | MAP_ANONYMOUS, -1),
                         bal_pages, RW, 0);
        write_pages(BAL, 0, bal_pages);
    }
}

/* AnonHugePages (kB) of the smaps area containing addr, or -1. */
static long anon_huge_kb(uintptr_t addr)
{
    char *smaps;
    if (read_file("/proc/self/smaps", &smaps) < 0)
        return -1;
    long kb = -1;
    int inside = 0;
    for (char *line = strtok(smaps, "\n"); line; line = strtok(NULL, "\n")) {
        unsigned long s, e;
        char *sp = strchr(line, ' ');
        if (sscanf(line, "%lx-%lx ", &s, &e) == 2 && sp && strchr(line, '-') < sp)
            inside = addr >= s && addr < e;
        else if (inside && strncmp(line, "AnonHugePages:", 14) == 0) {
            kb = atol(line + 14);
            break;
        }
    }
    free(smaps);
    return kb;
}

static int vmflag_set(uintptr_t addr, const char *flag)
{
    char *smaps;
    if (read_file("/proc/self/smaps", &smaps) < 0)
        return -1;
    int inside = 0, found = 0;
    char want[8];
    snprintf(want, sizeof(want), " %s", flag);
    for (char *line = strtok(smaps, "\n"); line; line = strtok(NULL, "\n")) {
        unsigned long s, e;
        char *sp = strchr(line, ' ');
        if (sscanf(line, "%lx-%lx ", &s, &e) == 2 && sp && strchr(line, '-') < sp)
            inside = addr >= s && addr < e;
        else if (inside && strncmp(line, "VmFlags:", 8) == 0) {
            size_t wl = strlen(want);
            for (char *q = strstr(line, want); q; q = strstr(q + 1, want))
                if (q[wl] == ' ' || q[wl] == 0)
                    found = 1;
            break;
        }
    }
    free(smaps);
    return found;
}

/* munmap the region and map a fresh one at the same address: everything reads zero. */
static void recreate(struct region *r)
{
    size_t len = r->npages * PG;
    SETUP_CHECK(munmap(r->addr, len) == 0, "munmap for re-create");
    void *p = xmmap(r->addr, len, RW, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1);
    SETUP_CHECK(p == r->addr, "mmap at the same address");
    mark_dropped(r, 0, r->npages, ZF);
    memset(r->prot, RW, r->npages);
}

static void ballast_step(int k)
{
    if (!BAL || k >= 40)
        return;
    size_t keep = bal_pages >> k, had = bal_pages >> (k - 1);
    if (had > keep)
        dontneed(BAL, keep, had, ZF);
    write_pages(BAL, 0, keep);
}

static void do_step(int k)
{
    char extra[256] = "";
    switch (k) {
    case 1:
        write_pages(DN, 0, 32);
        write_pages(PF, 0, 16);
        write_pages(THP, 0, THP->npages);
        write_pages(SHM, 0, 16);
        write_pages(PR, 0, 8);
        write_pages(MV, 0, 4);
        snprintf(extra, sizeof(extra), " thp_kb=%ld thp_advised=%d",
                 anon_huge_kb((uintptr_t)THP->addr), thp_advised);
        break;
    case 2: {
        NEWR->addr = map_isolated(NEWR->npages * PG, RW, MAP_PRIVATE | MAP_ANONYMOUS, -1);
        NEWR->mapped = 1;
        write_pages(NEWR, 0, 32);
        dontneed(DN, 0, 48, ZF);
        recreate(RE);
        write_pages(RE, 0, 16);
        size_t len = MV->npages * PG;
        unsigned char *dst = map_isolated(len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1);
        void *moved = mremap(MV->addr, len, len, MREMAP_MAYMOVE | MREMAP_FIXED, dst);
        SETUP_CHECK(moved == dst, "mremap");
        mv_old = MV->addr;
        MV->addr = dst;
        protect(PR, 0, 16, PROT_NONE);
        protect(PR, 16, 32, PROT_READ);
        dontneed(PF, 0, 8, FF);
        write_pages(SHM, 16, 32);
        dontneed(THP, 5, 6, ZF);
        write_page(THP, 100);
        snprintf(extra, sizeof(extra), " new=%p mv=%p mv_old=%p", (void *)NEWR->addr,
                 (void *)MV->addr, (void *)mv_old);
        break;
    }
    case 3:
        protect(PR, 0, 16, RW);
        write_page(PR, 0);
        write_page(MV, 0);
        write_pages(MV, 4, 8);
        write_page(RE, 20);
        write_page(DN, 1);
        write_page(DN, 40);
        write_page(PF, 0);
        dontneed(PF, 8, 9, FF);
        write_pages(NEWR, 32, 36);
        protect(NEWR, 40, 48, PROT_READ);
        write_pages(THP, 200, 204);
        SETUP_CHECK(madvise(SHM->addr, 4 * PG, MADV_REMOVE) == 0, "MADV_REMOVE");
        mark_dropped(SHM, 0, 4, ZF);
        break;
    case 4:
        protect(PR, 24, 32, PROT_NONE);
        dontneed(DN, 1, 2, ZF);
        recreate(RE);
        write_pages(RE, 8, 12);
        write_page(PF, 31);
        break;
    default:
        break;
    }
    ballast_step(k);
    steps_done = k;
    say("STEP %d DONE pid=%d%s", k, (int)getpid(), extra);
}

/* ---- verification --------------------------------------------------------------- */

static const char *perm_str(int prot, int shared, char out[5])
{
    out[0] = (prot & PROT_READ) ? 'r' : '-';
    out[1] = (prot & PROT_WRITE) ? 'w' : '-';
    out[2] = (prot & PROT_EXEC) ? 'x' : '-';
    out[3] = shared ? 's' : 'p';
    out[4] = 0;
    return out;
}

static void describe(const unsigned char *page, int rid, size_t p, char *out, size_t n)
{
    uint64_t w0, w1;
    memcpy(&w0, page, 8);
    memcpy(&w1, page + 8, 8);
    if (all_zero(page, PG))
        snprintf(out, n, "zero");
    else if ((w0 >> 48) == 0xC0DE && (int)((w0 >> 40) & 0xff) == rid && (w0 & 0xffffffffff) == p)
        snprintf(out, n, "version %llu", (unsigned long long)w1);
    else if ((w0 >> 48) == 0xC0DE && (int)((w0 >> 40) & 0xff) == R_FILEDATA)
        snprintf(out, n, "file content");
    else if ((w0 >> 48) == 0xC0DE)
        snprintf(out, n, "header of region %d page %llu", (int)((w0 >> 40) & 0xff),
                 (unsigned long long)(w0 & 0xffffffffff));
    else
        snprintf(out, n, "other bytes (%016llx)", (unsigned long long)w0);
}

static void want_str(struct region *r, size_t p, char *out, size_t n)
{
    uint32_t st = r->st[p];
    if (st & FF)
        snprintf(out, n, "file content");
    else if ((st & ZF) || st == 0)
        snprintf(out, n, "zero");
    else
        snprintf(out, n, "version %u", st & VMASK);
}

static size_t verify_region(struct region *r)
{
    if (!r->mapped)
        return 0;
    uint64_t want[WORDS];
    size_t bad = 0;
    size_t p = 0;
    while (p < r->npages) {
        /* a run of pages with one protection */
        size_t q = p;
        while (q < r->npages && r->prot[q] == r->prot[p])
            q++;
        int prot = r->prot[p];
        char pr[5], path[512], want_pr[5];
        perm_str(prot, r->shared, want_pr);
        size_t ends[2] = {p, q - 1};
        for (int j = 0; j < 2; j++) {
            size_t e = ends[j];
            if (maps_lookup((uintptr_t)(r->addr + e * PG), pr, path, sizeof(path)) != 0)
                fail("%s page %zu is not mapped", r->name, e);
            else
                CHECK(strcmp(pr, want_pr) == 0, "%s page %zu perms %s want %s", r->name, e, pr,
                      want_pr);
        }
        if (!(prot & PROT_READ))
            SETUP_CHECK(mprotect(r->addr + p * PG, (q - p) * PG, PROT_READ) == 0,
                        "mprotect to verify");
        for (size_t i = p; i < q; i++) {
            gen_expected(r, i, want);
            const unsigned char *page = r->addr + i * PG;
            if (memcmp(page, want, PG) != 0) {
                if (bad < 4) {
                    char got[96], exp[32];
                    describe(page, r->id, i, got, sizeof(got));
                    want_str(r, i, exp, sizeof(exp));
                    fail("%s page %zu holds %s, want %s", r->name, i, got, exp);
                }
                bad++;
            }
        }
        if (!(prot & PROT_READ))
            SETUP_CHECK(mprotect(r->addr + p * PG, (q - p) * PG, prot) == 0,
                        "mprotect back");
        p = q;
    }
    if (bad > 4)
        fail("%s: %zu bad pages in all", r->name, bad);
    return r->npages;
}

static void verify(void)
{
    size_t pages = 0;
    for (int i = 0; i < nregs; i++)
        pages += verify_region(&regs[i]);
    if (PF) {
        char pr[5], path[512];
        if (maps_lookup((uintptr_t)PF->addr, pr, path, sizeof(path)) == 0) {
            size_t pl = strlen(path);
            CHECK(pl >= 9 && strcmp(path + pl - 9, "pfile.dat") == 0,
                  "pfile mapping is named '%s'", path);
        }
    }
    if (mv_old) {
        char pr[5], path[512];
        CHECK(maps_lookup((uintptr_t)mv_old, pr, path, sizeof(path)) != 0,
              "the mremap'd region's old address %p is mapped again", (void *)mv_old);
    }
    if (THP && thp_advised)
        CHECK(vmflag_set((uintptr_t)THP->addr, "hg") == 1, "thp region lost VmFlags hg");
    if (SHM && !wl_fails) {
        /* still shared: a forked child's write shows up here */
        volatile uint64_t *w = (volatile uint64_t *)(SHM->addr + 63 * PG + 64);
        uint64_t old = *w;
        pid_t c = fork();
        SETUP_CHECK(c >= 0, "fork");
        if (c == 0) {
            *w = 0x5ca1ab1e;
            _exit(0);
        }
        int status;
        SETUP_CHECK(waitpid(c, &status, 0) == c, "waitpid");
        CHECK(*w == 0x5ca1ab1e, "shm is no longer shared with a forked child");
        *w = old;
    }
    char extra[160];
    snprintf(extra, sizeof(extra), "written=%llu steps=%d pages=%zu",
             (unsigned long long)total_written, steps_done, pages);
    finish(extra);
}

/* ---- main loop ---------------------------------------------------------------------- */

static size_t next_page(size_t n)
{
    wstate ^= wstate << 13;
    wstate ^= wstate >> 7;
    wstate ^= wstate << 17;
    return (size_t)(wstate % n);
}

static void nap(double s)
{
    struct timespec d = {(time_t)s, (long)((s - (double)(time_t)s) * 1e9)};
    nanosleep(&d, NULL); /* a signal cuts it short: fine */
}

int main(int argc, char **argv)
{
    size_t mib = 64, ballast = 0;
    int nothp = 0;
    double rate = 2000;
    double report = 1.0;
    int rate_max = 0, prefill = 1, steps = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strncmp(a, "mib=", 4))
            mib = strtoul(a + 4, NULL, 10);
        else if (!strncmp(a, "nothp=", 6))
            nothp = atoi(a + 6);
        else if (!strcmp(a, "rate=max"))
            rate_max = 1;
        else if (!strncmp(a, "rate=", 5))
            rate = strtod(a + 5, NULL);
        else if (!strncmp(a, "seed=", 5))
            seed = strtoull(a + 5, NULL, 10);
        else if (!strncmp(a, "prefill=", 8))
            prefill = atoi(a + 8);
        else if (!strncmp(a, "steps=", 6))
            steps = atoi(a + 6);
        else if (!strncmp(a, "ballast=", 8))
            ballast = strtoul(a + 8, NULL, 10);
        else if (!strncmp(a, "report=", 7))
            report = strtod(a + 7, NULL);
        else {
            errno = EINVAL;
            SETUP_CHECK(0, "unknown argument");
        }
    }
    SETUP_CHECK(mib > 0, "mib must be > 0");
    SETUP_CHECK(prctl(PR_SET_NAME, "ckwriter") == 0, "PR_SET_NAME");

    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_flags = SA_RESTART;
    sa.sa_handler = on_usr1;
    SETUP_CHECK(sigaction(SIGUSR1, &sa, NULL) == 0, "sigaction USR1");
    sa.sa_handler = on_usr2;
    SETUP_CHECK(sigaction(SIGUSR2, &sa, NULL) == 0, "sigaction USR2");

    size_t wpages = mib * 256;
    W = add_region("w", R_W, map_isolated(wpages * PG, RW, MAP_PRIVATE | MAP_ANONYMOUS, -1),
                   wpages, RW, 0);
    if (nothp)
        SETUP_CHECK(madvise(W->addr, wpages * PG, 15 /* MADV_NOHUGEPAGE */) == 0, "madvise nohugepage");
    if (prefill)
        write_pages(W, 0, wpages);
    if (steps)
        setup_steps(ballast);

    char where[512] = "";
    size_t off = 0;
    for (int i = 0; i < nregs && off < sizeof(where) - 40; i++)
        if (regs[i].mapped)
            off += (size_t)snprintf(where + off, sizeof(where) - off, " %s=%p", regs[i].name,
                                    (void *)regs[i].addr);
    char rate_s[32];
    if (rate_max)
        snprintf(rate_s, sizeof(rate_s), "max");
    else
        snprintf(rate_s, sizeof(rate_s), "%.0f", rate);
    say("READY pid=%d mib=%zu rate=%s seed=%llu pages=%zu steps=%d ballast=%zu%s",
        (int)getpid(), mib, rate_s, (unsigned long long)seed, wpages, steps, ballast, where);

    double t0 = mono_now(), last_report = t0, paced = 0;
    uint64_t at_last_report = total_written;
    for (;;) {
        if (got_usr2)
            verify();
        while (steps_done < usr1_count) {
            if (steps)
                do_step(steps_done + 1);
            else
                say("STEP %d DONE pid=%d", ++steps_done, (int)getpid());
        }
        double now = mono_now();
        if (rate_max) {
            for (int i = 0; i < 64; i++)
                write_page(W, next_page(wpages));
        } else if (rate > 0) {
            double due = (now - t0) * rate;
            if (due - paced > rate * 0.25 + 64)
                paced = due - 64; /* we were stopped (e.g. frozen): no burst to catch up */
            if (paced + 1 <= due) {
                int n = 0;
                while (paced + 1 <= due && n < 64 && !got_usr2) {
                    write_page(W, next_page(wpages));
                    paced += 1;
                    n++;
                }
            } else {
                double wait = (paced + 1 - due) / rate;
                nap(wait < 0.002 ? wait : 0.002);
            }
        } else {
            nap(0.01);
        }
        if (report > 0 && now - last_report >= report) {
            double pps = (double)(total_written - at_last_report) / (now - last_report);
            say("RATE pid=%d pages_s=%.0f total=%llu steps=%d", (int)getpid(), pps,
                (unsigned long long)total_written, steps_done);
            last_report = now;
            at_last_report = total_written;
        }
    }
}
