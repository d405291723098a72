"""Page-run data path: pagemap classification, bulk reads, zero-page detection.

Everything here works on runs of pages so that Python never loops per page.
"""

INCLUDES = """
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/ioctl.h>
#include <sys/uio.h>
#include <immintrin.h>
#include <linux/userfaultfd.h>
"""

TYPES = """
"""

FUNCTIONS = """
long ck_pagemap_runs(int pm_fd, uint64_t start, uint64_t end, int include_file,
                     uint64_t zero_pfn, uint64_t require, uint64_t *out, size_t max_runs,
                     uint64_t *next);
long ck_pagemap_filter(int pm_fd, const uint64_t *runs, size_t nruns, int include_file,
                       uint64_t zero_pfn, uint64_t require, uint64_t *out, size_t max_runs,
                       size_t *consumed);
long ck_zero_pfn(void);
long ck_read_runs(int pid, int mem_fd, int pm_fd, const uint64_t *runs, size_t nruns, char *buf);
long ck_write_runs(int mem_fd, const uint64_t *runs, size_t nruns, const char *buf);
long ck_nonzero_runs(const char *buf, size_t npages, uint64_t *out, size_t max_runs);
long ck_pack_nonzero(char *buf, const uint64_t *runs, size_t nruns, uint64_t *out,
                     size_t max_out, uint64_t *data_pages);
long ck_write_pieces(int pid, int mem_fd, const char *buf, const uint64_t *pieces, size_t n);
long ck_fill_pieces(int uffd, const uint64_t *ranges, size_t nr, int pid, int mem_fd,
                    const char *buf, const uint64_t *pieces, size_t n, uint64_t *filled);
void ck_copy(char *dst, const char *src, size_t n);
uint32_t ck_crc32(uint32_t crc, const char *data, size_t len);
int ck_all_zero(const char *buf, size_t len);
long ck_diff_pages(const char *buf, size_t npages, uint64_t *table, uint64_t *out,
                   size_t max_runs);
"""

CUSTOMIZATIONS = """
#define CK_PAGE 4096UL
#define PM_PRESENT (1ULL << 63)
#define PM_SWAP    (1ULL << 62)
#define PM_FILE    (1ULL << 61)
#define PM_GUARD   (1ULL << 58)
#define PM_PFN_MASK ((1ULL << 55) - 1)

/* Pages of [start, end) that hold data ckpt must save, as (addr, npages) runs.
   Present pages (file/shmem pages only when include_file), and swap entries
   that are real swap (uffd-wp and guard markers use swap type 31 and hold no
   data). The shared zero page is skipped. With `require`, only entries with
   all those bits set (e.g. soft-dirty, bit 55) count. Appends to out (n runs so
   far in *n); returns 0, 1 when out filled up (*next = where to resume), or -errno. */
static int scan_range(int pm_fd, uint64_t start, uint64_t end, int include_file,
                      uint64_t zero_pfn, uint64_t require, uint64_t *out, size_t max_runs,
                      size_t *n, uint64_t *next)
{
    enum { BATCH = 16384 };
    static __thread uint64_t ent[BATCH];
    uint64_t run_start = 0, run_len = 0, addr = start;
    while (addr < end) {
        size_t want = (end - addr) / CK_PAGE;
        if (want > BATCH) want = BATCH;
        ssize_t got = pread(pm_fd, ent, want * 8, (off_t)(addr / CK_PAGE * 8));
        if (got < 0) { if (errno == EINTR) continue; return -errno; }
        if (got == 0) break;
        size_t cnt = (size_t)got / 8;
        for (size_t i = 0; i < cnt; i++, addr += CK_PAGE) {
            uint64_t e = ent[i];
            int keep = 0;
            if (e & PM_PRESENT) {
                keep = (!(e & PM_FILE) || include_file);
                if (keep && zero_pfn && (e & PM_PFN_MASK) == zero_pfn) keep = 0;
            } else if ((e & PM_SWAP) && !(e & PM_GUARD)) {
                keep = ((e & 0x1f) != 0x1f);
            }
            if (keep && require && (e & require) != require) keep = 0;
            if (keep) {
                if (run_len && run_start + run_len * CK_PAGE == addr) { run_len++; continue; }
                if (run_len) {
                    if (*n == max_runs) { *next = run_start; return 1; }
                    out[2 * *n] = run_start; out[2 * *n + 1] = run_len; (*n)++;
                }
                run_start = addr; run_len = 1;
            }
        }
    }
    if (run_len) {
        if (*n == max_runs) { *next = run_start; return 1; }
        out[2 * *n] = run_start; out[2 * *n + 1] = run_len; (*n)++;
    }
    *next = end;
    return 0;
}

long ck_pagemap_runs(int pm_fd, uint64_t start, uint64_t end, int include_file,
                     uint64_t zero_pfn, uint64_t require, uint64_t *out, size_t max_runs,
                     uint64_t *next)
{
    size_t n = 0;
    int r = scan_range(pm_fd, start, end, include_file, zero_pfn, require, out, max_runs, &n, next);
    return r < 0 ? r : (long)n;
}

/* The data-holding pages among a list of (addr, npages) runs (e.g. the pages a
   tracker reported written). *consumed = input runs fully processed. */
long ck_pagemap_filter(int pm_fd, const uint64_t *runs, size_t nruns, int include_file,
                       uint64_t zero_pfn, uint64_t require, uint64_t *out, size_t max_runs,
                       size_t *consumed)
{
    size_t n = 0, i = 0;
    for (; i < nruns; i++) {
        size_t before = n;
        uint64_t next;
        int r = scan_range(pm_fd, runs[2 * i], runs[2 * i] + runs[2 * i + 1] * CK_PAGE,
                           include_file, zero_pfn, require, out, max_runs, &n, &next);
        if (r < 0) return r;
        if (r == 1) { n = before; break; }
    }
    *consumed = i;
    return (long)n;
}

/* PFN of the shared zero page (visible to CAP_SYS_ADMIN), or 0 if hidden. */
long ck_zero_pfn(void)
{
    volatile char *p = mmap(NULL, CK_PAGE, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return -errno;
    (void)p[0];
    long r = 0;
    int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        uint64_t e = 0;
        if (pread(fd, &e, 8, (off_t)((uintptr_t)p / CK_PAGE * 8)) == 8 && (e & PM_PRESENT))
            r = (long)(e & PM_PFN_MASK);
        close(fd);
    }
    munmap((void *)p, CK_PAGE);
    return r;
}

/* A page process_vm_readv must not read: an anonymous page that may be shared
   copy-on-write with another process (present but not mapped exactly once, or in
   swap). process_vm_readv pins the pages it reads, and a read-only pin of a
   possibly shared anonymous page unshares it (the target gets a copy of its own,
   Linux 5.19+): dumping a forked tree would undo its copy-on-write sharing, and a
   snapshot or --leave-running would leave the live processes with twice the memory.
   /proc/PID/mem reads without pinning. */
#define PM_EXCLUSIVE (1ULL << 56)
static int maybe_shared(uint64_t e)
{
    if (e & PM_FILE) return 0;
    if (e & PM_PRESENT) return !(e & PM_EXCLUSIVE);
    return (e & PM_SWAP) != 0;
}

static int mem_read(int mem_fd, char *dst, uint64_t addr, size_t len)
{
    size_t done = 0;
    while (done < len) {
        ssize_t r = pread(mem_fd, dst + done, len - done, (off_t)(addr + done));
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return r < 0 ? -errno : -EIO;
        done += (size_t)r;
    }
    return 0;
}

/* process_vm_readv of k iovecs; what it cannot read (PROT_NONE pages) comes from
   /proc/PID/mem, which reads through page protections. */
static int vm_flush(int pid, int mem_fd, struct iovec *loc, struct iovec *rem, size_t k)
{
    if (!k) return 0;
    ssize_t got = process_vm_readv(pid, loc, k, rem, k, 0);
    if (got < 0) {
        if (errno == ESRCH) return -ESRCH;
        got = 0;
    }
    size_t off = 0;
    for (size_t j = 0; j < k; j++) {
        size_t len = rem[j].iov_len;
        if (off + len > (size_t)got) {
            size_t skip = (size_t)got > off ? (size_t)got - off : 0;
            int r = mem_read(mem_fd, (char *)loc[j].iov_base + skip,
                             (uint64_t)(uintptr_t)rem[j].iov_base + skip, len - skip);
            if (r) return r;
        }
        off += len;
    }
    return 0;
}

/* Read (addr, npages) runs back to back into buf: process_vm_readv (fast, up to
   1024 iovecs a call), except the pages pagemap (pm_fd >= 0) says may be shared
   copy-on-write, which come from /proc/PID/mem (see maybe_shared). */
long ck_read_runs(int pid, int mem_fd, int pm_fd, const uint64_t *runs, size_t nruns, char *buf)
{
    enum { CHUNK = 2048 };
    static __thread uint64_t ent[CHUNK];
    struct iovec loc[1024], rem[1024];
    size_t k = 0, total = 0;
    for (size_t i = 0; i < nruns; i++) {
        uint64_t addr = runs[2 * i], left = runs[2 * i + 1];
        while (left) {
            size_t n = left > CHUNK ? CHUNK : (size_t)left;
            int have = 0;
            if (pm_fd >= 0) {
                ssize_t r = pread(pm_fd, ent, n * 8, (off_t)(addr / CK_PAGE * 8));
                have = r == (ssize_t)(n * 8);
            }
            for (size_t p = 0; p < n;) {
                int slow = have && maybe_shared(ent[p]);
                size_t q = p + 1;
                while (q < n && (have && maybe_shared(ent[q])) == slow) q++;
                char *dst = buf + total + p * CK_PAGE;
                uint64_t a = addr + p * CK_PAGE;
                size_t len = (q - p) * CK_PAGE;
                if (slow) {
                    int r = mem_read(mem_fd, dst, a, len);
                    if (r) return r;
                } else {
                    if (k == 1024) {
                        int r = vm_flush(pid, mem_fd, loc, rem, k);
                        if (r) return r;
                        k = 0;
                    }
                    loc[k].iov_base = dst;
                    loc[k].iov_len = len;
                    rem[k].iov_base = (void *)(uintptr_t)a;
                    rem[k].iov_len = len;
                    k++;
                }
                p = q;
            }
            total += n * CK_PAGE;
            addr += n * CK_PAGE;
            left -= n;
        }
    }
    int r = vm_flush(pid, mem_fd, loc, rem, k);
    return r ? r : (long)total;
}

/* Write runs from buf through /proc/PID/mem (ignores page protections). */
long ck_write_runs(int mem_fd, const uint64_t *runs, size_t nruns, const char *buf)
{
    size_t total = 0;
    for (size_t i = 0; i < nruns; i++) {
        size_t len = runs[2 * i + 1] * CK_PAGE, done = 0;
        while (done < len) {
            ssize_t r = pwrite(mem_fd, buf + total + done, len - done, (off_t)(runs[2 * i] + done));
            if (r < 0 && errno == EINTR) continue;
            if (r <= 0) return r < 0 ? -errno : -EIO;
            done += (size_t)r;
        }
        total += len;
    }
    return (long)total;
}

static int page_is_zero(const char *p)
{
    const uint64_t *w = (const uint64_t *)p;
    uint64_t acc = 0;
    for (size_t i = 0; i < CK_PAGE / 8; i += 8)
        acc |= w[i] | w[i + 1] | w[i + 2] | w[i + 3] | w[i + 4] | w[i + 5] | w[i + 6] | w[i + 7];
    return acc == 0;
}

int ck_all_zero(const char *buf, size_t len)
{
    size_t i = 0;
    for (; i + CK_PAGE <= len; i += CK_PAGE) if (!page_is_zero(buf + i)) return 0;
    for (; i < len; i++) if (buf[i]) return 0;
    return 1;
}

/* Runs (first_page, npages) of pages in buf that are not all zero. */
long ck_nonzero_runs(const char *buf, size_t npages, uint64_t *out, size_t max_runs)
{
    size_t n = 0;
    for (size_t i = 0; i < npages;) {
        while (i < npages && page_is_zero(buf + i * CK_PAGE)) i++;
        if (i == npages) break;
        size_t s = i;
        while (i < npages && !page_is_zero(buf + i * CK_PAGE)) i++;
        if (n == max_runs) return -ENOSPC;
        out[2 * n] = s; out[2 * n + 1] = i - s; n++;
    }
    return (long)n;
}

/* The pages of buf (the runs' pages back to back) that are not all zero, moved down in
   place so that they lie back to back from buf's start (nothing moves while no zero page
   came before). Records (vaddr, npages, is_data) in buffer order, neighbours of the same
   kind merged, go to out; *data_pages = pages kept. Returns the records, or -ENOSPC. */
long ck_pack_nonzero(char *buf, const uint64_t *runs, size_t nruns, uint64_t *out,
                     size_t max_out, uint64_t *data_pages)
{
    size_t n = 0, src = 0, dst = 0;
    for (size_t i = 0; i < nruns; i++) {
        uint64_t a = runs[2 * i], cnt = runs[2 * i + 1];
        for (uint64_t p = 0; p < cnt;) {
            int data = !page_is_zero(buf + (src + p) * CK_PAGE);
            uint64_t q = p + 1;
            while (q < cnt && !page_is_zero(buf + (src + q) * CK_PAGE) == data) q++;
            uint64_t va = a + p * CK_PAGE, np = q - p;
            if (n && out[3 * n - 1] == (uint64_t)data && out[3 * n - 3] + out[3 * n - 2] * CK_PAGE == va) {
                out[3 * n - 2] += np;
            } else {
                if (n == max_out) return -ENOSPC;
                out[3 * n] = va; out[3 * n + 1] = np; out[3 * n + 2] = (uint64_t)data; n++;
            }
            if (data) {
                if (dst != src + p) memmove(buf + dst * CK_PAGE, buf + (src + p) * CK_PAGE, np * CK_PAGE);
                dst += np;
            }
            p = q;
        }
        src += cnt;
    }
    *data_pages = dst;
    return (long)n;
}

/* CRC-32 of chunks (the image format's checksum, docs/FORMAT.md) at ~16 GB/s instead
   of zlib's ~7 GB/s: every stored byte is checksummed at dump and at restore. */
static uint32_t crc_table[256];
__attribute__((constructor)) static void crc_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[i] = c;
    }
}

/* Internal state in and out (the caller inverts). len >= 64, len % 16 == 0.
   Folding with PCLMULQDQ: Gopal, Ozturk et al., "Fast CRC Computation for Generic
   Polynomials Using PCLMULQDQ Instruction" (Intel, 2009), constants for the
   bit-reflected CRC-32 (IEEE) polynomial, as in zlib-ng and Chromium's zlib. */
__attribute__((target("sse4.2,pclmul")))
static uint32_t crc_fold(const unsigned char *buf, size_t len, uint32_t crc)
{
    static const uint64_t __attribute__((aligned(16))) k1k2[] = { 0x0154442bd4, 0x01c6e41596 };
    static const uint64_t __attribute__((aligned(16))) k3k4[] = { 0x01751997d0, 0x00ccaa009e };
    static const uint64_t __attribute__((aligned(16))) k5k0[] = { 0x0163cd6124, 0x0000000000 };
    static const uint64_t __attribute__((aligned(16))) poly[] = { 0x01db710641, 0x01f7011641 };
    __m128i x0, x1, x2, x3, x4, x5, x6, x7, x8, y5, y6, y7, y8;
    x1 = _mm_loadu_si128((const __m128i *)(buf + 0x00));
    x2 = _mm_loadu_si128((const __m128i *)(buf + 0x10));
    x3 = _mm_loadu_si128((const __m128i *)(buf + 0x20));
    x4 = _mm_loadu_si128((const __m128i *)(buf + 0x30));
    x1 = _mm_xor_si128(x1, _mm_cvtsi32_si128((int)crc));
    x0 = _mm_load_si128((const __m128i *)k1k2);
    buf += 64;
    len -= 64;
    while (len >= 64) {
        x5 = _mm_clmulepi64_si128(x1, x0, 0x00);
        x6 = _mm_clmulepi64_si128(x2, x0, 0x00);
        x7 = _mm_clmulepi64_si128(x3, x0, 0x00);
        x8 = _mm_clmulepi64_si128(x4, x0, 0x00);
        x1 = _mm_clmulepi64_si128(x1, x0, 0x11);
        x2 = _mm_clmulepi64_si128(x2, x0, 0x11);
        x3 = _mm_clmulepi64_si128(x3, x0, 0x11);
        x4 = _mm_clmulepi64_si128(x4, x0, 0x11);
        y5 = _mm_loadu_si128((const __m128i *)(buf + 0x00));
        y6 = _mm_loadu_si128((const __m128i *)(buf + 0x10));
        y7 = _mm_loadu_si128((const __m128i *)(buf + 0x20));
        y8 = _mm_loadu_si128((const __m128i *)(buf + 0x30));
        x1 = _mm_xor_si128(_mm_xor_si128(x1, x5), y5);
        x2 = _mm_xor_si128(_mm_xor_si128(x2, x6), y6);
        x3 = _mm_xor_si128(_mm_xor_si128(x3, x7), y7);
        x4 = _mm_xor_si128(_mm_xor_si128(x4, x8), y8);
        buf += 64;
        len -= 64;
    }
    x0 = _mm_load_si128((const __m128i *)k3k4);
    x5 = _mm_clmulepi64_si128(x1, x0, 0x00);
    x1 = _mm_clmulepi64_si128(x1, x0, 0x11);
    x1 = _mm_xor_si128(_mm_xor_si128(x1, x2), x5);
    x5 = _mm_clmulepi64_si128(x1, x0, 0x00);
    x1 = _mm_clmulepi64_si128(x1, x0, 0x11);
    x1 = _mm_xor_si128(_mm_xor_si128(x1, x3), x5);
    x5 = _mm_clmulepi64_si128(x1, x0, 0x00);
    x1 = _mm_clmulepi64_si128(x1, x0, 0x11);
    x1 = _mm_xor_si128(_mm_xor_si128(x1, x4), x5);
    while (len >= 16) {
        x2 = _mm_loadu_si128((const __m128i *)buf);
        x5 = _mm_clmulepi64_si128(x1, x0, 0x00);
        x1 = _mm_clmulepi64_si128(x1, x0, 0x11);
        x1 = _mm_xor_si128(_mm_xor_si128(x1, x2), x5);
        buf += 16;
        len -= 16;
    }
    x2 = _mm_clmulepi64_si128(x1, x0, 0x10);
    x3 = _mm_setr_epi32(~0, 0, ~0, 0);
    x1 = _mm_srli_si128(x1, 8);
    x1 = _mm_xor_si128(x1, x2);
    x0 = _mm_loadl_epi64((const __m128i *)k5k0);
    x2 = _mm_srli_si128(x1, 4);
    x1 = _mm_and_si128(x1, x3);
    x1 = _mm_clmulepi64_si128(x1, x0, 0x00);
    x1 = _mm_xor_si128(x1, x2);
    x0 = _mm_load_si128((const __m128i *)poly);
    x2 = _mm_and_si128(x1, x3);
    x2 = _mm_clmulepi64_si128(x2, x0, 0x10);
    x2 = _mm_and_si128(x2, x3);
    x2 = _mm_clmulepi64_si128(x2, x0, 0x00);
    x1 = _mm_xor_si128(x1, x2);
    return (uint32_t)_mm_extract_epi32(x1, 1);
}

/* zlib's crc32(crc, buf, len): CRC-32 (IEEE), so zlib.crc32(data, crc) == ck_crc32(crc, ...). */
uint32_t ck_crc32(uint32_t crc, const char *data, size_t len)
{
    static int fast = -1;
    const unsigned char *buf = (const unsigned char *)data;
    uint32_t s = ~crc;
    if (fast < 0) fast = __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse4.2");
    if (fast && len >= 64) {
        size_t n = len & ~(size_t)15;
        s = crc_fold(buf, n, s);
        buf += n;
        len -= n;
    }
    while (len--) s = crc_table[(s ^ *buf++) & 0xff] ^ (s >> 8);
    return ~s;
}

/* memcpy, called through cffi so that big copies run without the GIL. */
void ck_copy(char *dst, const char *src, size_t n)
{
    memcpy(dst, src, n);
}

static int mem_write(int mem_fd, const char *src, uint64_t addr, size_t len)
{
    size_t done = 0;
    while (done < len) {
        ssize_t r = pwrite(mem_fd, src + done, len - done, (off_t)(addr + done));
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return r < 0 ? -errno : -EIO;
        done += (size_t)r;
    }
    return 0;
}

/* Write pieces (vaddr, npages, first page in buf) of buf into process pid with
   process_vm_writev, up to 1024 iovecs a call (one copy, pages pinned in batches).
   What it cannot write (a read-only or PROT_NONE page) goes through /proc/PID/mem,
   which writes through page protections, and the next call resumes after it
   (pid 0: everything through mem_fd). Returns the bytes written or -errno. */
long ck_write_pieces(int pid, int mem_fd, const char *buf, const uint64_t *pieces, size_t n)
{
    struct iovec loc[1024], rem[1024];
    size_t total = 0, i = 0;
    while (i < n) {
        size_t k = 0;
        for (; k < 1024 && i + k < n; k++) {
            const uint64_t *p = pieces + 3 * (i + k);
            loc[k].iov_base = (void *)(buf + p[2] * CK_PAGE);
            loc[k].iov_len = p[1] * CK_PAGE;
            rem[k].iov_base = (void *)(uintptr_t)p[0];
            rem[k].iov_len = p[1] * CK_PAGE;
        }
        ssize_t got = pid > 0 ? process_vm_writev(pid, loc, k, rem, k, 0) : 0;
        if (got < 0) {
            if (errno == ESRCH) return -ESRCH;
            got = 0;
        }
        size_t off = 0, j = 0;
        for (; j < k && off + loc[j].iov_len <= (size_t)got; j++) off += loc[j].iov_len;
        total += off;
        if (j < k) {  /* iovec j stopped short: the rest of it through /proc/PID/mem */
            size_t skip = (size_t)got - off;
            int r = mem_write(mem_fd, (const char *)loc[j].iov_base + skip,
                              (uint64_t)(uintptr_t)rem[j].iov_base + skip, loc[j].iov_len - skip);
            if (r) return r;
            total += loc[j].iov_len;
            j++;
        }
        i += j;
    }
    return (long)total;
}

/* UFFDIO_COPY [dst, dst + len) from src: every page that is not there yet is made and
   filled in one step; a page there already (EEXIST: copy-on-write from the parent, an
   mlock'd VMA populated when mapped) is written over with ck_write_pieces, which can
   since it is present. 0 or -errno; *filled grows by the bytes UFFDIO_COPY placed. */
static long fill_range(int uffd, int pid, int mem_fd, const char *buf, uint64_t dst,
                       uint64_t page, uint64_t len, uint64_t *filled)
{
    uint64_t done = 0;
    int again = 0;
    while (done < len) {
        struct uffdio_copy c;
        memset(&c, 0, sizeof c);
        c.dst = dst + done;
        c.src = (uint64_t)(uintptr_t)(buf + page * CK_PAGE + done);
        c.len = len - done;
        c.mode = UFFDIO_COPY_MODE_DONTWAKE;  /* nothing waits: the process is stopped */
        if (ioctl(uffd, UFFDIO_COPY, &c) == 0) {
            *filled += len - done;
            return 0;
        }
        if (c.copy > 0) {
            done += (uint64_t)c.copy;
            *filled += (uint64_t)c.copy;
            continue;
        }
        if (errno == EEXIST) {
            uint64_t one[3] = { dst + done, 1, page + done / CK_PAGE };
            long r = ck_write_pieces(pid, mem_fd, buf, one, 1);
            if (r < 0) return r;
            done += CK_PAGE;
            continue;
        }
        if (errno == EAGAIN && ++again <= 8) continue;
        return -errno;
    }
    return 0;
}

/* Pieces (vaddr, npages, first page in buf) of buf into process pid: what lies in one
   of the nr sorted [start, end) ranges registered (MISSING mode) on uffd, the mm's
   userfaultfd, with UFFDIO_COPY (fill_range), which allocates each page and copies
   into it where process_vm_writev faults a cleared page in first and copies over it
   (about 1.5x the time); the rest with ck_write_pieces. Inside a registered range
   nothing else could write a missing page: ckpt's userfaultfd is user-mode only, so a
   write from outside the process fails there (EFAULT) instead of waiting for a
   handler. Returns the bytes written or -errno; *filled: those of them UFFDIO_COPY
   placed. */
long ck_fill_pieces(int uffd, const uint64_t *ranges, size_t nr, int pid, int mem_fd,
                    const char *buf, const uint64_t *pieces, size_t n, uint64_t *filled)
{
    *filled = 0;
    if (uffd < 0 || nr == 0) return ck_write_pieces(pid, mem_fd, buf, pieces, n);
    size_t total = 0;
    for (size_t i = 0; i < n; i++) {
        const uint64_t *p = pieces + 3 * i;
        uint64_t a = p[0], end = p[0] + p[1] * CK_PAGE, page = p[2];
        while (a < end) {
            /* the first range that ends after a */
            size_t lo = 0, hi = nr;
            while (lo < hi) {
                size_t mid = (lo + hi) / 2;
                if (ranges[2 * mid + 1] <= a) lo = mid + 1;
                else hi = mid;
            }
            uint64_t b;
            long r;
            if (lo < nr && ranges[2 * lo] <= a) {  /* inside range lo */
                b = ranges[2 * lo + 1] < end ? ranges[2 * lo + 1] : end;
                r = fill_range(uffd, pid, mem_fd, buf, a, page, b - a, filled);
            } else {  /* outside, up to the next range */
                b = lo < nr && ranges[2 * lo] < end ? ranges[2 * lo] : end;
                uint64_t seg[3] = { a, (b - a) / CK_PAGE, page };
                r = ck_write_pieces(pid, mem_fd, buf, seg, 1);
            }
            if (r < 0) return r;
            page += (b - a) / CK_PAGE;
            a = b;
        }
        total += p[1] * CK_PAGE;
    }
    return (long)total;
}

/* 64-bit digest of one page: XXH64's stripe loop and avalanche (4 lanes). Never 0:
   a table entry of 0 means "no copy of this page is stored". */
#define XP1 0x9E3779B185EBCA87ULL
#define XP2 0xC2B2AE3D27D4EB4FULL
#define XP3 0x165667B19E3779F9ULL
#define XP4 0x85EBCA77C2B2AE63ULL
#define XP5 0x27D4EB2F165667C5ULL
static inline uint64_t xrotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }
static inline uint64_t xround(uint64_t acc, uint64_t in)
{
    acc += in * XP2; acc = xrotl(acc, 31); return acc * XP1;
}
static inline uint64_t xmerge(uint64_t acc, uint64_t v)
{
    acc ^= xround(0, v); return acc * XP1 + XP4;
}
static uint64_t page_digest(const char *p)
{
    const uint64_t *w = (const uint64_t *)p;
    uint64_t v1 = XP1 + XP2, v2 = XP2, v3 = 0, v4 = 0 - XP1;
    for (size_t i = 0; i < CK_PAGE / 8; i += 4) {
        v1 = xround(v1, w[i]); v2 = xround(v2, w[i + 1]);
        v3 = xround(v3, w[i + 2]); v4 = xround(v4, w[i + 3]);
    }
    uint64_t h = xrotl(v1, 1) + xrotl(v2, 7) + xrotl(v3, 12) + xrotl(v4, 18);
    h = xmerge(h, v1); h = xmerge(h, v2); h = xmerge(h, v3); h = xmerge(h, v4);
    h += CK_PAGE;
    h ^= h >> 33; h *= XP2; h ^= h >> 29; h *= XP3; h ^= h >> 32;
    return h ? h : 1;
}

/* Pages of buf whose digest differs from table[i] (what the image holds for them):
   their table entries are updated and their (first_page, npages) runs written to
   out. Returns the number of runs, or -ENOSPC. */
long ck_diff_pages(const char *buf, size_t npages, uint64_t *table, uint64_t *out,
                   size_t max_runs)
{
    size_t n = 0;
    long run_start = -1;
    for (size_t i = 0; i < npages; i++) {
        uint64_t h = page_digest(buf + i * CK_PAGE);
        int changed = table[i] != h;
        table[i] = h;
        if (changed && run_start < 0) run_start = (long)i;
        if (!changed && run_start >= 0) {
            if (n == max_runs) return -ENOSPC;
            out[2 * n] = (uint64_t)run_start; out[2 * n + 1] = i - (size_t)run_start; n++;
            run_start = -1;
        }
    }
    if (run_start >= 0) {
        if (n == max_runs) return -ENOSPC;
        out[2 * n] = (uint64_t)run_start; out[2 * n + 1] = npages - (size_t)run_start; n++;
    }
    return (long)n;
}
"""
