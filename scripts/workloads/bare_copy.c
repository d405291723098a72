/* bare_copy: the machine's own limit for moving a process's memory to a file and back,
 * for scripts/bench_dump.py. No compression, no checksums, no process state: only the
 * bytes, moved the plain way a C programmer would, single-threaded.
 *
 *   bare_copy dump PID FILE   every present page (pagemap) of PID's readable private
 *                             mappings, read with process_vm_readv (8 MiB batches, up to
 *                             1024 iovecs) and written to FILE, then fsync (as ckpt
 *                             fsyncs its image); the run table goes at the end
 *   bare_copy restore FILE    fork a fresh child that maps room for those pages, then
 *                             write FILE's bytes into it with process_vm_writev
 *                             (8 MiB batches, read(2) into one reused buffer); the child
 *                             is killed once every byte is in
 *
 * Prints "bare <mode> <seconds> <bytes>" on stdout.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PG 4096UL
#define BATCH (8UL << 20)
#define PM_PRESENT (1ULL << 63)
#define PM_SWAP (1ULL << 62)
#define PM_FILE (1ULL << 61)

struct run { uint64_t addr, npages; };

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what)
{
    perror(what);
    exit(1);
}

static void write_all(int fd, const void *p, size_t n)
{
    const char *c = p;
    while (n) {
        ssize_t w = write(fd, c, n);
        if (w < 0) die("write");
        c += w;
        n -= (size_t)w;
    }
}

static void read_all(int fd, void *p, size_t n)
{
    char *c = p;
    while (n) {
        ssize_t r = read(fd, c, n);
        if (r <= 0) die("read");
        c += r;
        n -= (size_t)r;
    }
}

static struct run *runs;
static size_t nruns, caprun;

static void add_run(uint64_t a, uint64_t n)
{
    if (nruns && runs[nruns - 1].addr + runs[nruns - 1].npages * PG == a) {
        runs[nruns - 1].npages += n;
        return;
    }
    if (nruns == caprun) {
        caprun = caprun ? 2 * caprun : 1024;
        runs = realloc(runs, caprun * sizeof(*runs));
    }
    runs[nruns].addr = a;
    runs[nruns].npages = n;
    nruns++;
}

/* Present pages of PID's readable private mappings, as runs. */
static void find_runs(int pid)
{
    char path[64], line[512];
    snprintf(path, sizeof path, "/proc/%d/maps", pid);
    FILE *f = fopen(path, "r");
    snprintf(path, sizeof path, "/proc/%d/pagemap", pid);
    int pm = open(path, O_RDONLY);
    if (!f || pm < 0) die("open maps/pagemap");
    static uint64_t ent[16384];
    while (fgets(line, sizeof line, f)) {
        unsigned long s, e;
        char perms[8];
        if (sscanf(line, "%lx-%lx %7s", &s, &e, perms) != 3) continue;
        if (perms[0] != 'r' || perms[3] != 'p' || strstr(line, "[vvar") || strstr(line, "[vsyscall]"))
            continue;
        for (uint64_t a = s; a < e;) {
            size_t want = (e - a) / PG;
            if (want > 16384) want = 16384;
            ssize_t got = pread(pm, ent, want * 8, (off_t)(a / PG * 8));
            if (got <= 0) break;
            for (size_t i = 0; i < (size_t)got / 8; i++, a += PG) {
                uint64_t x = ent[i];
                if ((x & PM_PRESENT && !(x & PM_FILE)) || (x & PM_SWAP)) add_run(a, 1);
            }
        }
    }
    fclose(f);
    close(pm);
}

static int do_dump(int pid, const char *file)
{
    double t0 = now();
    find_runs(pid);
    int fd = open(file, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (fd < 0) die("open output");
    char *buf = malloc(BATCH);
    struct iovec loc, rem[1024];
    size_t k = 0, fill = 0, total = 0;
    for (size_t i = 0; i <= nruns; i++) {
        uint64_t a = i < nruns ? runs[i].addr : 0, left = i < nruns ? runs[i].npages * PG : 0;
        do {
            size_t take = left < BATCH - fill ? left : BATCH - fill;
            if (take) {
                rem[k].iov_base = (void *)(uintptr_t)a;
                rem[k].iov_len = take;
                k++;
                fill += take;
                a += take;
                left -= take;
            }
            if (k && (fill == BATCH || k == 1024 || i == nruns)) {
                loc.iov_base = buf;
                loc.iov_len = fill;
                ssize_t got = process_vm_readv(pid, &loc, 1, rem, k, 0);
                if (got < 0) die("process_vm_readv");
                /* a PROT_NONE page reads short: keep the length, as the table says */
                write_all(fd, buf, fill);
                total += fill;
                k = fill = 0;
            }
        } while (left);
    }
    write_all(fd, runs, nruns * sizeof(*runs));
    write_all(fd, &nruns, sizeof nruns);
    if (fsync(fd)) die("fsync");
    close(fd);
    printf("bare dump %.4f %zu\n", now() - t0, total);
    return 0;
}

static int do_restore(const char *file)
{
    double t0 = now();
    int fd = open(file, O_RDONLY);
    if (fd < 0) die("open input");
    off_t end = lseek(fd, 0, SEEK_END);
    if (pread(fd, &nruns, sizeof nruns, end - (off_t)sizeof nruns) != sizeof nruns) die("pread");
    runs = malloc(nruns * sizeof(*runs));
    off_t tab = end - (off_t)sizeof nruns - (off_t)(nruns * sizeof(*runs));
    if (pread(fd, runs, nruns * sizeof(*runs), tab) != (ssize_t)(nruns * sizeof(*runs)))
        die("pread");
    size_t total = 0;
    for (size_t i = 0; i < nruns; i++) total += runs[i].npages * PG;
    /* a fresh process with room for every page (one anonymous mapping; where the
       pages land inside a process does not change what writing them costs) */
    int pfd[2];
    if (pipe(pfd)) die("pipe");
    pid_t child = fork();
    if (child < 0) die("fork");
    if (child == 0) {
        void *p = mmap(NULL, total ? total : PG, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED) _exit(2);
        uint64_t at = (uintptr_t)p;
        if (write(pfd[1], &at, sizeof at) != sizeof at) _exit(3);
        for (;;) pause();
    }
    uint64_t base;
    read_all(pfd[0], &base, sizeof base);
    if (lseek(fd, 0, SEEK_SET) < 0) die("lseek");
    char *buf = malloc(BATCH);
    struct iovec loc, rem;
    for (size_t done = 0; done < total;) {
        size_t n = total - done < BATCH ? total - done : BATCH;
        read_all(fd, buf, n);
        loc.iov_base = buf;
        loc.iov_len = n;
        rem.iov_base = (void *)(uintptr_t)(base + done);
        rem.iov_len = n;
        if (process_vm_writev(child, &loc, 1, &rem, 1, 0) != (ssize_t)n) die("process_vm_writev");
        done += n;
    }
    double t = now() - t0;
    kill(child, SIGKILL);
    waitpid(child, NULL, 0);
    close(fd);
    printf("bare restore %.4f %zu\n", t, total);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 4 && !strcmp(argv[1], "dump")) return do_dump(atoi(argv[2]), argv[3]);
    if (argc == 3 && !strcmp(argv[1], "restore")) return do_restore(argv[2]);
    fprintf(stderr, "usage: bare_copy dump PID FILE | bare_copy restore FILE\n");
    return 2;
}
