/* pipeline: parent + two children streaming numbers through pipes.
 *
 *   producer ──pipe1──▶ filter ──pipe2──▶ parent (consumer)
 *
 * The producer writes 0, 1, 2, ... (8-byte records) into pipe1; the filter reads
 * each, writes x * 3 + 1 into pipe2; the parent reads and checks that it gets
 * exactly the sequence (no byte lost or duplicated, in order). The pipes are full
 * most of the time, so a checkpoint catches bytes in flight in both.
 *
 * READY pid= producer= filter=     then, on SIGUSR2 (parent), the parent asks the
 * producer (a flag in shared memory) to stop after at least 20000 more records;
 * the producer closes pipe1, the filter sees EOF and closes pipe2, the parent sees
 * EOF, reaps both and checks the count.
 * VERIFY OK pid= records=   or   VERIFY FAIL pid= reason=
 */
#include "wl.h"

#include <sys/mman.h>
#include <sys/wait.h>

struct ctl {
    volatile int stop;
    volatile uint64_t produced;
    volatile uint64_t stop_after;
};

static volatile sig_atomic_t got_usr2;
static void on_usr2(int sig)
{
    (void)sig;
    got_usr2 = 1;
}

static int full_read(int fd, void *buf, size_t n)
{
    size_t got = 0;
    while (got < n) {
        ssize_t r = read(fd, (char *)buf + got, n - got);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return got == 0 ? 0 : -1;
        got += (size_t)r;
    }
    return 1;
}

static int full_write(int fd, const void *buf, size_t n)
{
    size_t done = 0;
    while (done < n) {
        ssize_t w = write(fd, (const char *)buf + done, n - done);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return 0;
        done += (size_t)w;
    }
    return 1;
}

int main(void)
{
    sigset_t old;
    catch_usr2_blocked(on_usr2, &old);
    struct ctl *c = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    SETUP_CHECK(c != MAP_FAILED, "mmap");
    int p1[2], p2[2];
    SETUP_CHECK(pipe(p1) == 0 && pipe(p2) == 0, "pipe");
    pid_t prod = fork();
    SETUP_CHECK(prod >= 0, "fork");
    if (prod == 0) {
        close(p1[0]);
        close(p2[0]);
        close(p2[1]);
        for (uint64_t x = 0;; x++) {
            if (c->stop && x >= c->stop_after)
                break;
            if (!full_write(p1[1], &x, sizeof(x)))
                _exit(3);
            c->produced = x + 1;
        }
        close(p1[1]);
        _exit(0);
    }
    pid_t filt = fork();
    SETUP_CHECK(filt >= 0, "fork");
    if (filt == 0) {
        close(p1[1]);
        close(p2[0]);
        uint64_t x;
        int r;
        while ((r = full_read(p1[0], &x, sizeof(x))) == 1) {
            uint64_t y = x * 3 + 1;
            if (!full_write(p2[1], &y, sizeof(y)))
                _exit(3);
        }
        close(p2[1]);
        _exit(r == 0 ? 0 : 4);
    }
    close(p1[0]);
    close(p1[1]);
    close(p2[1]);
    /* consume until the pipes are busy, then report ready; keep consuming after */
    uint64_t want = 0, y;
    while (want < 100000) {
        SETUP_CHECK(full_read(p2[0], &y, sizeof(y)) == 1, "early read");
        SETUP_CHECK(y == want * 3 + 1, "early sequence");
        want++;
    }
    say("READY pid=%d producer=%d filter=%d", (int)getpid(), (int)prod, (int)filt);
    sigprocmask(SIG_SETMASK, &old, NULL); /* the consumer loop polls got_usr2 */
    /* keep consuming slowly so data sits in both pipes at any moment */
    while (!got_usr2) {
        struct timespec d = {0, 2000000};
        nanosleep(&d, NULL);
        for (int i = 0; i < 64; i++) {
            if (full_read(p2[0], &y, sizeof(y)) != 1) {
                fail("early_eof_at_%llu", (unsigned long long)want);
                finish("records=0");
            }
            if (y != want * 3 + 1) {
                fail("sequence_at_%llu_got_%llu", (unsigned long long)want,
                     (unsigned long long)y);
                finish("records=0");
            }
            want++;
        }
    }
    c->stop_after = c->produced + 20000;
    c->stop = 1;
    int r;
    while ((r = full_read(p2[0], &y, sizeof(y))) == 1) {
        if (y != want * 3 + 1) {
            fail("sequence_at_%llu_got_%llu", (unsigned long long)want, (unsigned long long)y);
            break;
        }
        want++;
    }
    CHECK(r == 0, "torn_record");
    int st;
    CHECK(waitpid(prod, &st, 0) == prod && WIFEXITED(st) && WEXITSTATUS(st) == 0, "producer");
    CHECK(waitpid(filt, &st, 0) == filt && WIFEXITED(st) && WEXITSTATUS(st) == 0, "filter");
    CHECK(want == c->produced, "consumed_%llu_produced_%llu", (unsigned long long)want,
          (unsigned long long)c->produced);
    char extra[64];
    snprintf(extra, sizeof(extra), "records=%llu", (unsigned long long)want);
    finish(extra);
}
