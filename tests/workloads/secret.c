/* secret: memory and a pipe holding known markers, to see what crosses the network
 * during a migration (tests/test_transport_security.py records the TCP stream).
 *
 * usage: secret MEMHEX PIPEHEX [MIB]
 *   MEMHEX   the memory marker, in hex (its bytes, not the hex, are in memory)
 *   PIPEHEX  the pipe marker, in hex
 *   MIB      size of the region (default 8)
 *
 * The region is filled with random bytes (incompressible, so a cleartext stream
 * carries its pages nearly verbatim), and the memory marker is copied at offset
 * 1000 + k * 64 KiB for every k. The pipe marker is written into a pipe the
 * process holds both ends of and never reads: it travels as buffered pipe bytes.
 *
 * READY pid= mib=
 * on SIGUSR2: the region's checksum, every marker copy and the pipe's bytes are
 * checked: VERIFY OK pid= (exit 0) or VERIFY FAIL pid= reason= (exit 1)
 */
#include "wl.h"

#include <sys/mman.h>

#define MIB (1024UL * 1024UL)
#define STRIDE (64UL * 1024UL)

static volatile sig_atomic_t verify_now;

static void on_usr2(int sig)
{
    (void)sig;
    verify_now = 1;
}

static size_t unhex(const char *hex, unsigned char *out, size_t cap)
{
    size_t n = strlen(hex) / 2;
    SETUP_CHECK(n > 0 && n <= cap && strlen(hex) % 2 == 0, "marker is not hex");
    for (size_t i = 0; i < n; i++) {
        unsigned v;
        SETUP_CHECK(sscanf(hex + 2 * i, "%2x", &v) == 1, "marker is not hex");
        out[i] = (unsigned char)v;
    }
    return n;
}

int main(int argc, char **argv)
{
    SETUP_CHECK(argc >= 3, "usage: secret MEMHEX PIPEHEX [MIB]");
    static unsigned char mem_marker[256], pipe_marker[256];
    size_t mlen = unhex(argv[1], mem_marker, sizeof(mem_marker));
    size_t plen = unhex(argv[2], pipe_marker, sizeof(pipe_marker));
    size_t mib = argc > 3 ? strtoul(argv[3], NULL, 10) : 8;
    size_t len = mib * MIB;

    unsigned char *region = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                                 -1, 0);
    SETUP_CHECK(region != MAP_FAILED, "mmap");
    int rnd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
    SETUP_CHECK(rnd >= 0, "open /dev/urandom");
    for (size_t off = 0; off < len;) {
        ssize_t r = read(rnd, region + off, len - off);
        SETUP_CHECK(r > 0, "read /dev/urandom");
        off += (size_t)r;
    }
    close(rnd);
    for (size_t off = 1000; off + mlen <= len; off += STRIDE)
        memcpy(region + off, mem_marker, mlen);
    uint64_t sum = hash_mem(region, len, 0);

    int p[2];
    SETUP_CHECK(pipe(p) == 0, "pipe");
    SETUP_CHECK(write(p[1], pipe_marker, plen) == (ssize_t)plen, "write pipe");

    sigset_t old;
    catch_usr2_blocked(on_usr2, &old);
    say("READY pid=%d mib=%zu", (int)getpid(), mib);
    while (!verify_now)
        sigsuspend(&old);

    CHECK(hash_mem(region, len, 0) == sum, "region checksum differs");
    for (size_t off = 1000; off + mlen <= len; off += STRIDE)
        if (memcmp(region + off, mem_marker, mlen) != 0) {
            fail("memory marker missing at offset %zu", off);
            break;
        }
    unsigned char got[256];
    fcntl(p[0], F_SETFL, O_NONBLOCK);
    ssize_t n = read(p[0], got, sizeof(got));
    CHECK(n == (ssize_t)plen && memcmp(got, pipe_marker, plen) == 0,
          "pipe holds %zd bytes, not the marker", n);
    finish("");
}
