/* memory: every kind of memory a single-threaded process commonly has, with
 * content it can re-derive, so a restored copy proves its own memory is right.
 *
 * usage: memory [MIB]       (MIB: size of the big malloc'd block, default 64)
 * env:   CKPT_TEST_TOKEN    echoed in READY/VERIFY and checked in /proc/self/environ
 *
 * READY pid= sum= token= comm= pfile= sfile= mb= thp=
 *   then waits in sigsuspend() until SIGUSR2, then checks everything and prints
 * VERIFY OK pid= sum= token=   (exit 0)  or  VERIFY FAIL pid= ... reason=... (exit 1)
 *
 * Checked after SIGUSR2: per-region checksums (malloc, mmaps of several sizes, shared
 * anon, private file mapping with some COW pages, shared file mapping, sbrk heap,
 * small-malloc linked list, PROT_READ and PROT_NONE data, MADV_HUGEPAGE area, .bss,
 * .data, a 2 MiB stack array); untouched and MADV_DONTNEED pages read zero; non-COW
 * pages of the private file mapping equal the file; the shared file mapping is still
 * shared with the file (write, msync, pread) and the shared anon mapping with a forked
 * child; /proc/self/maps permissions and names; the MADV_HUGEPAGE area keeps VmFlags hg; brk grows under [heap]; a fresh mmap and
 * malloc work; vDSO clocks agree with the syscalls and MONOTONIC did not go back;
 * /proc/self/auxv AT_SYSINFO_EHDR is the [vdso]; cmdline, environ, exe, comm unchanged.
 */
#include "wl.h"

#include <elf.h>
#include <sys/auxv.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>

#define MIB (1024UL * 1024UL)
#define STACK_BYTES (2 * MIB)
#define COMM "ckmem"

struct region {
    const char *name;
    unsigned char *addr;
    size_t len;
    uint64_t sum;
    int prot_none; /* must be made readable to hash it */
};

static struct region regions[32];
static int nregions;

static volatile sig_atomic_t got_usr2;
static void on_usr2(int sig)
{
    (void)sig;
    got_usr2 = 1;
}

static unsigned char bss_buf[256 * 1024];
static unsigned char data_buf[16384] = {1, 2, 3, 4, 5, 6, 7, 8};

struct node {
    struct node *next;
    uint64_t val;
    char pad[40];
};
static struct node *list_head;
static uint64_t list_sum;

/* Things remembered at start-up, compared after restore. */
static char *saved_cmdline, *saved_environ;
static ssize_t saved_cmdline_len, saved_environ_len;
static char saved_exe[4096];
static const char *token;
static struct timespec saved_mono;

static unsigned char *shared_anon, *priv_file, *shared_file, *prot_read_area, *prot_none_area;
static unsigned char *untouched, *dontneed, *sbrk_area, *thp_area;
static int thp_ok;
static size_t shared_anon_len = 2 * MIB, priv_file_len = 2 * MIB, shared_file_len = MIB;
static size_t untouched_len = MIB, dontneed_len = MIB;
static char priv_path[4096], shared_path[4096];

static uint64_t region_hash(struct region *r)
{
    if (r->prot_none && mprotect(r->addr, r->len, PROT_READ) != 0)
        return 0;
    uint64_t h = hash_mem(r->addr, r->len, 0x1234);
    if (r->prot_none)
        mprotect(r->addr, r->len, PROT_NONE);
    return h;
}

static void add_region(const char *name, void *addr, size_t len, int prot_none)
{
    struct region *r = &regions[nregions++];
    r->name = name;
    r->addr = addr;
    r->len = len;
    r->prot_none = prot_none;
    r->sum = region_hash(r);
}

static uint64_t list_hash(void)
{
    uint64_t h = 77;
    size_t n = 0;
    for (struct node *p = list_head; p; p = p->next, n++)
        h = mix64(h ^ p->val ^ (uint64_t)p->pad[n % 40]);
    return h ^ n;
}

static void *map_anon(size_t len, int flags)
{
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, flags | MAP_ANONYMOUS, -1, 0);
    SETUP_CHECK(p != MAP_FAILED, "mmap");
    return p;
}

static void write_file(const char *path, size_t len, uint64_t seed)
{
    unsigned char *buf = malloc(len);
    SETUP_CHECK(buf != NULL, "malloc");
    fill(buf, len, seed);
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    SETUP_CHECK(fd >= 0, "open for write");
    SETUP_CHECK(write(fd, buf, len) == (ssize_t)len, "write file");
    SETUP_CHECK(fsync(fd) == 0, "fsync");
    close(fd);
    free(buf);
}

static uint64_t total_sum(int recompute)
{
    uint64_t h = 0;
    for (int i = 0; i < nregions; i++)
        h = mix64(h ^ (recompute ? region_hash(&regions[i]) : regions[i].sum));
    return mix64(h ^ (recompute ? list_hash() : list_sum));
}

static uintptr_t auxv_sysinfo_ehdr(void)
{
    char *buf;
    ssize_t n = read_file("/proc/self/auxv", &buf);
    uintptr_t v = 0;
    for (ssize_t off = 0; n > 0 && off + 16 <= n; off += 16) {
        uint64_t type, val;
        memcpy(&type, buf + off, 8);
        memcpy(&val, buf + off + 8, 8);
        if (type == AT_SYSINFO_EHDR)
            v = (uintptr_t)val;
    }
    if (n >= 0)
        free(buf);
    return v;
}

/* VmFlags of the /proc/self/smaps area containing addr ("" if not found). */
static void vmflags_of(uintptr_t addr, char *out, size_t outlen)
{
    char *smaps;
    out[0] = 0;
    if (read_file("/proc/self/smaps", &smaps) < 0)
        return;
    int inside = 0;
    for (char *line = strtok(smaps, "\n"); line; line = strtok(NULL, "\n")) {
        unsigned long s, e;
        char c;
        if (sscanf(line, "%lx-%lx %c", &s, &e, &c) == 3 && strchr(line, ' ') &&
            strchr(line, '-') < strchr(line, ' '))
            inside = addr >= s && addr < e;
        else if (inside && strncmp(line, "VmFlags:", 8) == 0) {
            snprintf(out, outlen, "%s ", line + 8);
            break;
        }
    }
    free(smaps);
}

static void check_map(const char *what, void *addr, const char *perms, const char *suffix)
{
    char pr[5] = "", path[4096] = "";
    if (maps_lookup((uintptr_t)addr, pr, path, sizeof(path)) != 0) {
        fail("%s not in /proc/self/maps", what);
        return;
    }
    CHECK(strcmp(pr, perms) == 0, "%s perms %s want %s", what, pr, perms);
    if (suffix) {
        size_t pl = strlen(path), sl = strlen(suffix);
        CHECK(pl >= sl && strcmp(path + pl - sl, suffix) == 0, "%s maps name '%s' want *%s",
              what, path, suffix);
    }
}

static void verify(unsigned char *stackbuf)
{
    /* 1. every region's checksum */
    for (int i = 0; i < nregions; i++) {
        uint64_t h = region_hash(&regions[i]);
        CHECK(h == regions[i].sum, "region %s checksum %016llx want %016llx", regions[i].name,
              (unsigned long long)h, (unsigned long long)regions[i].sum);
    }
    CHECK(list_hash() == list_sum, "malloc'd linked list changed");
    CHECK(stackbuf == regions[nregions - 1].addr, "stack array moved");

    /* 2. pages that must read zero */
    CHECK(all_zero(untouched, untouched_len), "untouched pages are not zero");
    CHECK(all_zero(dontneed + dontneed_len / 2, dontneed_len / 2),
          "MADV_DONTNEED pages are not zero (stale data resurrected)");

    /* 3. private file mapping: non-COW pages equal the file, COW pages do not */
    int fd = open(priv_path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        fail("open private.dat: %s", strerror(errno));
    } else {
        unsigned char page[WL_PAGE];
        size_t same_bad = 0, cow_bad = 0;
        for (size_t i = 0; i < priv_file_len / WL_PAGE; i++) {
            if (pread(fd, page, WL_PAGE, (off_t)(i * WL_PAGE)) != (ssize_t)WL_PAGE) {
                fail("pread private.dat");
                break;
            }
            int same = memcmp(page, priv_file + i * WL_PAGE, WL_PAGE) == 0;
            if (i % 4 == 0 && same)
                cow_bad++;
            if (i % 4 != 0 && !same)
                same_bad++;
        }
        CHECK(same_bad == 0, "%zu private-file pages differ from the file", same_bad);
        CHECK(cow_bad == 0, "%zu COW-written private-file pages equal the file", cow_bad);
        close(fd);
    }

    /* 4. shared file mapping is still shared with the file */
    fd = open(shared_path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        fail("open shared.dat: %s", strerror(errno));
    } else {
        unsigned char *buf = malloc(shared_file_len + WL_PAGE);
        ssize_t r = pread(fd, buf, shared_file_len, 0);
        CHECK(r == (ssize_t)shared_file_len && memcmp(buf, shared_file, shared_file_len) == 0,
              "shared file mapping differs from the file");
        unsigned char *scratch = shared_file + shared_file_len;
        fill(scratch, WL_PAGE, 0xabc000 + (uint64_t)getpid());
        CHECK(msync(shared_file, shared_file_len + WL_PAGE, MS_SYNC) == 0, "msync: %s",
              strerror(errno));
        r = pread(fd, buf, WL_PAGE, (off_t)shared_file_len);
        CHECK(r == (ssize_t)WL_PAGE && memcmp(buf, scratch, WL_PAGE) == 0,
              "write through the shared file mapping did not reach the file");
        free(buf);
        close(fd);
    }

    /* 5. shared anon mapping is shared with a child */
    uint64_t orig_word;
    memcpy(&orig_word, shared_anon, 8);
    pid_t child = fork();
    if (child == 0) {
        uint64_t magic = 0x5ea5ea5ea5ea5eaULL;
        memcpy(shared_anon, &magic, 8);
        _exit(0);
    }
    if (child < 0) {
        fail("fork: %s", strerror(errno));
    } else {
        int st;
        waitpid(child, &st, 0);
        uint64_t now;
        memcpy(&now, shared_anon, 8);
        CHECK(now == 0x5ea5ea5ea5ea5eaULL, "shared anon mapping not shared with a forked child");
        memcpy(shared_anon, &orig_word, 8);
    }

    /* 6. /proc/self/maps */
    check_map("PROT_READ area", prot_read_area, "r--p", NULL);
    check_map("PROT_NONE area", prot_none_area, "---p", NULL);
    check_map("shared anon", shared_anon, "rw-s", NULL);
    check_map("shared file mapping", shared_file, "rw-s", "/shared.dat");
    check_map("private file mapping", priv_file, "rw-p", "/private.dat");
    if (thp_ok) {
        char flags[256];
        vmflags_of((uintptr_t)thp_area, flags, sizeof(flags));
        CHECK(strstr(flags, " hg ") != NULL, "MADV_HUGEPAGE area lost VmFlags hg (has '%s')",
              flags);
    }
    CHECK(maps_label_contains("[heap]", (uintptr_t)sbrk_area), "sbrk area is not in [heap]");
    CHECK(maps_label_contains("[stack]", (uintptr_t)stackbuf + STACK_BYTES - 1),
          "stack array is not in [stack]");

    /* 7. brk grows, fresh mmap and malloc work */
    char *old_brk = sbrk(0);
    char *grown = sbrk(65536);
    CHECK(grown == old_brk, "sbrk(65536) returned %p, brk was %p", (void *)grown, (void *)old_brk);
    if (grown != (void *)-1) {
        memset(grown, 0x5a, 65536);
        CHECK((char *)sbrk(0) == old_brk + 65536, "brk did not move by 65536");
        CHECK(maps_label_contains("[heap]", (uintptr_t)grown + 65535), "grown brk not [heap]");
    }
    void *fresh = mmap(NULL, MIB, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK(fresh != MAP_FAILED, "fresh mmap: %s", strerror(errno));
    if (fresh != MAP_FAILED) {
        memset(fresh, 0x33, MIB);
        munmap(fresh, MIB);
    }
    char *m = malloc(4 * MIB);
    CHECK(m != NULL, "malloc after restore");
    if (m) {
        memset(m, 1, 4 * MIB);
        free(m);
    }

    /* 8. clocks (vDSO vs syscall) */
    struct timespec vr, sr, vm, sm;
    clock_gettime(CLOCK_REALTIME, &vr);
    syscall(SYS_clock_gettime, CLOCK_REALTIME, &sr);
    clock_gettime(CLOCK_MONOTONIC, &vm);
    syscall(SYS_clock_gettime, CLOCK_MONOTONIC, &sm);
    time_t t = time(NULL);
    CHECK(llabs((long long)vr.tv_sec - (long long)sr.tv_sec) <= 5,
          "vDSO CLOCK_REALTIME %lld vs syscall %lld", (long long)vr.tv_sec, (long long)sr.tv_sec);
    CHECK(llabs((long long)t - (long long)sr.tv_sec) <= 5, "time(NULL) %lld vs syscall %lld",
          (long long)t, (long long)sr.tv_sec);
    CHECK(llabs((long long)vm.tv_sec - (long long)sm.tv_sec) <= 5,
          "vDSO CLOCK_MONOTONIC %lld vs syscall %lld", (long long)vm.tv_sec, (long long)sm.tv_sec);
    CHECK(vm.tv_sec > saved_mono.tv_sec ||
              (vm.tv_sec == saved_mono.tv_sec && vm.tv_nsec >= saved_mono.tv_nsec),
          "CLOCK_MONOTONIC went backwards");

    /* 9. auxv and vDSO */
    uintptr_t ehdr = auxv_sysinfo_ehdr();
    CHECK(ehdr != 0 && ehdr == getauxval(AT_SYSINFO_EHDR),
          "/proc/self/auxv AT_SYSINFO_EHDR %lx, libc has %lx", (unsigned long)ehdr,
          getauxval(AT_SYSINFO_EHDR));
    CHECK(maps_label_contains("[vdso]", ehdr), "AT_SYSINFO_EHDR %lx is not the [vdso]",
          (unsigned long)ehdr);

    /* 10. identity: cmdline, environ, exe, comm, pid */
    char *now;
    ssize_t n = read_file("/proc/self/cmdline", &now);
    CHECK(n == saved_cmdline_len && memcmp(now, saved_cmdline, (size_t)n) == 0,
          "/proc/self/cmdline changed");
    if (n >= 0)
        free(now);
    n = read_file("/proc/self/environ", &now);
    CHECK(n == saved_environ_len && memcmp(now, saved_environ, (size_t)n) == 0,
          "/proc/self/environ changed");
    if (n >= 0)
        free(now);
    const char *tok_now = getenv("CKPT_TEST_TOKEN");
    CHECK(tok_now ? strcmp(tok_now, token) == 0 : strcmp(token, "none") == 0,
          "getenv(CKPT_TEST_TOKEN) changed");
    char exe[4096];
    ssize_t el = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
    exe[el < 0 ? 0 : el] = 0;
    CHECK(strcmp(exe, saved_exe) == 0, "/proc/self/exe is '%s' want '%s'", exe, saved_exe);
    char comm[32] = "";
    prctl(PR_GET_NAME, comm);
    CHECK(strcmp(comm, COMM) == 0, "PR_GET_NAME '%s' want '%s'", comm, COMM);
    n = read_file("/proc/self/comm", &now);
    CHECK(n > 0 && strcmp(now, COMM "\n") == 0, "/proc/self/comm wrong");
    if (n >= 0)
        free(now);
    CHECK(getpid() == (pid_t)syscall(SYS_getpid), "getpid() disagrees with the syscall");

    char extra[256];
    snprintf(extra, sizeof(extra), "sum=%016llx token=%s", (unsigned long long)total_sum(1),
             token);
    finish(extra);
}

int main(int argc, char **argv)
{
    unsigned char stackbuf[STACK_BYTES];
    size_t mb = argc > 1 ? strtoul(argv[1], NULL, 10) : 64;

    SETUP_CHECK(prctl(PR_SET_NAME, COMM) == 0, "PR_SET_NAME");
    token = getenv("CKPT_TEST_TOKEN");
    if (!token)
        token = "none";
    saved_cmdline_len = read_file("/proc/self/cmdline", &saved_cmdline);
    saved_environ_len = read_file("/proc/self/environ", &saved_environ);
    SETUP_CHECK(saved_cmdline_len > 0 && saved_environ_len >= 0, "read cmdline/environ");
    ssize_t el = readlink("/proc/self/exe", saved_exe, sizeof(saved_exe) - 1);
    SETUP_CHECK(el > 0, "readlink exe");
    saved_exe[el] = 0;
    char cwd[4096];
    SETUP_CHECK(getcwd(cwd, sizeof(cwd)) != NULL, "getcwd");
    snprintf(priv_path, sizeof(priv_path), "%s/private.dat", cwd);
    snprintf(shared_path, sizeof(shared_path), "%s/shared.dat", cwd);

    /* big malloc'd block (glibc mmaps it) */
    unsigned char *big = malloc(mb * MIB);
    SETUP_CHECK(big != NULL, "malloc big");
    fill(big, mb * MIB, 1);
    add_region("malloc", big, mb * MIB, 0);

    /* explicit private anonymous mmaps of several sizes */
    static const size_t sizes[] = {WL_PAGE, 3 * WL_PAGE, MIB + WL_PAGE, 16 * MIB};
    static const char *names[] = {"mmap4k", "mmap12k", "mmap1m+4k", "mmap16m"};
    for (int i = 0; i < 4; i++) {
        unsigned char *p = map_anon(sizes[i], MAP_PRIVATE);
        fill(p, sizes[i], 10 + (uint64_t)i);
        add_region(names[i], p, sizes[i], 0);
    }

    /* shared anonymous */
    shared_anon = map_anon(shared_anon_len, MAP_SHARED);
    fill(shared_anon, shared_anon_len, 20);
    add_region("shared_anon", shared_anon, shared_anon_len, 0);

    /* private file mapping, every 4th page COW-written */
    write_file(priv_path, priv_file_len, 100);
    int fd = open(priv_path, O_RDONLY | O_CLOEXEC);
    SETUP_CHECK(fd >= 0, "open private.dat");
    priv_file = mmap(NULL, priv_file_len, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    SETUP_CHECK(priv_file != MAP_FAILED, "mmap private.dat");
    close(fd);
    for (size_t i = 0; i < priv_file_len / WL_PAGE; i += 4)
        fill(priv_file + i * WL_PAGE, WL_PAGE, 200 + i);
    add_region("private_file", priv_file, priv_file_len, 0);

    /* shared file mapping, written through the mapping; its last page is scratch */
    fd = open(shared_path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    SETUP_CHECK(fd >= 0, "open shared.dat");
    SETUP_CHECK(ftruncate(fd, (off_t)(shared_file_len + WL_PAGE)) == 0, "ftruncate");
    shared_file =
        mmap(NULL, shared_file_len + WL_PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    SETUP_CHECK(shared_file != MAP_FAILED, "mmap shared.dat");
    close(fd);
    fill(shared_file, shared_file_len + WL_PAGE, 300);
    SETUP_CHECK(msync(shared_file, shared_file_len + WL_PAGE, MS_SYNC) == 0, "msync");
    add_region("shared_file", shared_file, shared_file_len, 0);

    /* heap: sbrk area, and many small mallocs in a linked list */
    sbrk_area = sbrk((intptr_t)MIB);
    SETUP_CHECK(sbrk_area != (void *)-1, "sbrk");
    fill(sbrk_area, MIB, 400);
    add_region("sbrk", sbrk_area, MIB, 0);
    for (int i = 0; i < 4000; i++) {
        struct node *nd = malloc(sizeof(*nd) + (size_t)(i % 7) * 16);
        SETUP_CHECK(nd != NULL, "malloc node");
        nd->val = mix64((uint64_t)i);
        memset(nd->pad, i & 0xff, sizeof(nd->pad));
        nd->next = list_head;
        list_head = nd;
    }
    list_sum = list_hash();

    /* read-only and inaccessible areas that hold data */
    prot_read_area = map_anon(64 * 1024, MAP_PRIVATE);
    fill(prot_read_area, 64 * 1024, 500);
    SETUP_CHECK(mprotect(prot_read_area, 64 * 1024, PROT_READ) == 0, "mprotect R");
    add_region("prot_read", prot_read_area, 64 * 1024, 0);
    prot_none_area = map_anon(64 * 1024, MAP_PRIVATE);
    fill(prot_none_area, 64 * 1024, 600);
    SETUP_CHECK(mprotect(prot_none_area, 64 * 1024, PROT_NONE) == 0, "mprotect NONE");
    add_region("prot_none", prot_none_area, 64 * 1024, 1);

    /* MADV_HUGEPAGE area, 2 MiB aligned */
    unsigned char *raw = map_anon(6 * MIB, MAP_PRIVATE);
    unsigned char *thp = (unsigned char *)(((uintptr_t)raw + 2 * MIB - 1) & ~(2 * MIB - 1));
    if (thp > raw)
        munmap(raw, (size_t)(thp - raw));
    munmap(thp + 4 * MIB, (size_t)(raw + 6 * MIB - (thp + 4 * MIB)));
    thp_ok = madvise(thp, 4 * MIB, MADV_HUGEPAGE) == 0;
    thp_area = thp;
    fill(thp, 4 * MIB, 700);
    add_region("thp", thp, 4 * MIB, 0);

    /* untouched pages, and pages written then dropped */
    untouched = map_anon(untouched_len, MAP_PRIVATE);
    dontneed = map_anon(dontneed_len, MAP_PRIVATE);
    fill(dontneed, dontneed_len, 800);
    SETUP_CHECK(madvise(dontneed + dontneed_len / 2, dontneed_len / 2, MADV_DONTNEED) == 0,
                "MADV_DONTNEED");
    add_region("dontneed_kept", dontneed, dontneed_len / 2, 0);

    /* .bss, .data, and the stack (last: verify() checks its address) */
    fill(bss_buf, sizeof(bss_buf), 900);
    add_region("bss", bss_buf, sizeof(bss_buf), 0);
    fill(data_buf, sizeof(data_buf), 901);
    add_region("data", data_buf, sizeof(data_buf), 0);
    fill(stackbuf, STACK_BYTES, 1000);
    add_region("stack", stackbuf, STACK_BYTES, 0);

    sigset_t old;
    catch_usr2_blocked(on_usr2, &old);
    clock_gettime(CLOCK_MONOTONIC, &saved_mono);

    say("READY pid=%d sum=%016llx token=%s comm=%s pfile=%p sfile=%p mb=%zu thp=%d", (int)getpid(),
        (unsigned long long)total_sum(0), token, COMM, (void *)priv_file, (void *)shared_file,
        mb, thp_ok);
    while (!got_usr2)
        sigsuspend(&old);
    verify(stackbuf);
}
