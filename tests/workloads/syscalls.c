/* syscalls: dumped while blocked inside a system call; after restore the call
 * must finish the way it would have without the checkpoint.
 *
 * usage: syscalls MODE [SECONDS]     (SECONDS default 4)
 *   nanosleep            raw nanosleep(SECONDS)                      -> returns 0
 *   clock_nanosleep      clock_nanosleep(MONOTONIC, relative)        -> returns 0
 *   clock_nanosleep_abs  clock_nanosleep(MONOTONIC, TIMER_ABSTIME)   -> 0, not early
 *   poll                 poll(NULL, 0, SECONDS*1000)                 -> returns 0
 *   select               select(0, NULL, NULL, NULL, {SECONDS})      -> returns 0
 *   futex                FUTEX_WAIT with a SECONDS timeout           -> ETIMEDOUT
 *   pause                pause()                                     -> EINTR, and only
 *                        because the SIGUSR2 handler ran (the test sends SIGUSR2)
 * READY pid= mode= nr=<syscall number> sum=
 * WOKE pid= mode= rc= errno= waited=     (waited: CLOCK_MONOTONIC seconds, log only)
 * VERIFY OK pid= mode= sum=  (exit 0)  or  VERIFY FAIL ... reason=  (exit 1)
 * A "no EINTR" failure means the restore turned a restartable call into an error.
 */
#include "wl.h"

#include <linux/futex.h>
#include <poll.h>
#include <sys/prctl.h>
#include <sys/select.h>

#define BUF_BYTES (8UL * 1024 * 1024)

static volatile sig_atomic_t got_usr2;
static void on_usr2(int sig)
{
    (void)sig;
    got_usr2 = 1;
}

int main(int argc, char **argv)
{
    const char *mode = argc > 1 ? argv[1] : "nanosleep";
    long secs = argc > 2 ? strtol(argv[2], NULL, 10) : 4;
    SETUP_CHECK(prctl(PR_SET_NAME, "cksys") == 0, "PR_SET_NAME");

    unsigned char *buf = malloc(BUF_BYTES);
    SETUP_CHECK(buf != NULL, "malloc");
    fill(buf, BUF_BYTES, 42);
    uint64_t sum = hash_mem(buf, BUF_BYTES, 1);

    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_usr2; /* no SA_RESTART: pause() must return EINTR */
    SETUP_CHECK(sigaction(SIGUSR2, &sa, NULL) == 0, "sigaction");

    long nr;
    if (!strcmp(mode, "nanosleep"))
        nr = SYS_nanosleep;
    else if (!strcmp(mode, "clock_nanosleep") || !strcmp(mode, "clock_nanosleep_abs"))
        nr = SYS_clock_nanosleep;
    else if (!strcmp(mode, "poll"))
        nr = SYS_poll;
    else if (!strcmp(mode, "select"))
        nr = SYS_select;
    else if (!strcmp(mode, "futex"))
        nr = SYS_futex;
    else if (!strcmp(mode, "pause"))
        nr = SYS_pause;
    else {
        say("SETUP FAIL unknown mode %s", mode);
        return 2;
    }

    struct timespec req = {secs, 0}, rem = {0, 0}, target;
    struct timeval tv = {secs, 0};
    static uint32_t futex_word;
    clock_gettime(CLOCK_MONOTONIC, &target);
    target.tv_sec += secs;
    double t0 = mono_now();

    say("READY pid=%d mode=%s nr=%ld sum=%016llx", (int)getpid(), mode, nr,
        (unsigned long long)sum);
    long rc;
    if (nr == SYS_nanosleep)
        rc = syscall(SYS_nanosleep, &req, &rem);
    else if (!strcmp(mode, "clock_nanosleep"))
        rc = syscall(SYS_clock_nanosleep, CLOCK_MONOTONIC, 0, &req, &rem);
    else if (nr == SYS_clock_nanosleep)
        rc = syscall(SYS_clock_nanosleep, CLOCK_MONOTONIC, TIMER_ABSTIME, &target, NULL);
    else if (nr == SYS_poll)
        rc = syscall(SYS_poll, NULL, 0, (int)(secs * 1000));
    else if (nr == SYS_select)
        rc = syscall(SYS_select, 0, NULL, NULL, NULL, &tv);
    else if (nr == SYS_futex)
        rc = syscall(SYS_futex, &futex_word, FUTEX_WAIT_PRIVATE, 0, &req, NULL, 0);
    else
        rc = syscall(SYS_pause);
    int err = rc < 0 ? errno : 0;
    say("WOKE pid=%d mode=%s rc=%ld errno=%d waited=%.2f", (int)getpid(), mode, rc, err,
        mono_now() - t0);

    if (nr == SYS_futex) {
        CHECK(rc == -1 && err == ETIMEDOUT, "futex wait returned %ld errno %d (want ETIMEDOUT)",
              rc, err);
    } else if (nr == SYS_pause) {
        CHECK(rc == -1 && err == EINTR, "pause returned %ld errno %d", rc, err);
        CHECK(got_usr2, "pause returned without the SIGUSR2 handler running");
    } else {
        CHECK(rc == 0, "%s returned %ld errno %d (%s)", mode, rc, err, strerror(err));
    }
    if (nr != SYS_pause)
        CHECK(!got_usr2, "unexpected SIGUSR2");
    if (!strcmp(mode, "clock_nanosleep_abs")) {
        struct timespec now;
        clock_gettime(CLOCK_MONOTONIC, &now);
        CHECK(now.tv_sec > target.tv_sec ||
                  (now.tv_sec == target.tv_sec && now.tv_nsec >= target.tv_nsec),
              "absolute sleep returned before its deadline");
    }
    uint64_t now_sum = hash_mem(buf, BUF_BYTES, 1);
    CHECK(now_sum == sum, "memory checksum %016llx want %016llx", (unsigned long long)now_sum,
          (unsigned long long)sum);
    char extra[128];
    snprintf(extra, sizeof(extra), "mode=%s sum=%016llx", mode, (unsigned long long)now_sum);
    finish(extra);
}
