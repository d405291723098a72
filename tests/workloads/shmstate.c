/* shmstate: shared memory whose content no single page table holds (issue 10).
 *
 * usage: shmstate
 *   root ─┬─ c1      c1 and c2 bump their own counters in ONE shared page, forever
 *         ├─ c2
 *         └─ (e)     e fills pages of the shared areas, then exits (reaped)
 *
 * Areas, all MAP_SHARED and created before the forks:
 *   anon   4 MiB MAP_SHARED|MAP_ANONYMOUS: page 0 holds the counters; pages
 *          [512, 768) are written by e only (after it exits they are in nobody's
 *          page tables); pages [768, 1024) are written by e too and then only READ
 *          by the root, one more page every millisecond (they become present in
 *          its page tables between pre-copy rounds by reads alone)
 *   memfd  1 MiB memfd mapped by all: pages [128, 192) written by e through its
 *          mapping; c2 keeps writing a counter into page 8 through the fd (pwrite)
 *   posix  256 KiB POSIX shm (/dev/shm/ckpt-shmstate-<root pid>, a tmpfs file) mapped by
 *          all: pages [16, 32) written by e; c2 bumps a counter in its page 0 too (after
 *          a snapshot the original keeps changing the file: the restore must bring back
 *          the snapshot's content, or make the file again when it is gone)
 *
 * Counters: each bumper loops `check shared[me] == mine; v = mine + 1; shared[me] = v;
 * mine = v;` with `mine` in its private memory. At the top of the loop the two agree,
 * in the original and after any restore, if and only if the shared page came back
 * with the newest content (whichever process wrote it last); a disagreement is kept
 * (in private memory) and reported.
 *
 * READY pid= c1= c2=
 * On SIGUSR2 (to the root) everybody stops and checks; the root prints
 * VERIFY OK pid= bumps=   or   VERIFY FAIL pid= reason=
 */
#include "wl.h"

#include <sys/mman.h>
#include <sys/wait.h>

#define ANON (4UL << 20)
#define MFD (1UL << 20)
enum { ROOT, C1, C2, N };

struct ctl {
    volatile int stop;
    volatile pid_t pid[N];
    volatile int ready[N];
    volatile int done[N];
    volatile int fail[N];
    char why[N][160];
    volatile uint64_t counter[N]; /* each bumper's own slot, one shared page */
};

static struct ctl *ctl;
static unsigned char *anon;
static unsigned char *mfd;
static int memfd;
static volatile uint64_t *posix;
static volatile uint64_t pmine;
#define POSIX_LEN (256UL << 10)
static volatile sig_atomic_t got_usr2;
static volatile uint64_t mine; /* private: the last value this process stored */
static volatile uint64_t fd_mine;

static void on_usr2(int sig)
{
    (void)sig;
    got_usr2 = 1;
}

static void note(int me, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void note(int me, const char *fmt, ...)
{
    size_t len = strlen(ctl->why[me]);
    if (len + 2 >= sizeof(ctl->why[me]))
        return;
    if (len)
        strcat(ctl->why[me], ",");
    len = strlen(ctl->why[me]);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(ctl->why[me] + len, sizeof(ctl->why[me]) - len, fmt, ap);
    va_end(ap);
    ctl->fail[me] = 1;
}

static uint64_t want_hash(size_t len, uint64_t seed)
{
    unsigned char *ref = malloc(len);
    fill(ref, len, seed);
    uint64_t h = hash_mem(ref, len, 0);
    free(ref);
    return h;
}

/* What every process checks after the restore: the pages e wrote, as it wrote them. */
static void check_common(int me)
{
    if (hash_mem(anon + 512 * WL_PAGE, 256 * WL_PAGE, 0) != want_hash(256 * WL_PAGE, 77))
        note(me, "anon_pages_of_exited_child");
    if (hash_mem(anon + 768 * WL_PAGE, 256 * WL_PAGE, 0) != want_hash(256 * WL_PAGE, 78))
        note(me, "anon_pages_only_read");
    if (hash_mem(mfd + 128 * WL_PAGE, 64 * WL_PAGE, 0) != want_hash(64 * WL_PAGE, 79))
        note(me, "memfd_pages_of_exited_child");
    if (hash_mem((unsigned char *)posix + 16 * WL_PAGE, 16 * WL_PAGE, 0) !=
        want_hash(16 * WL_PAGE, 80))
        note(me, "posix_shm_pages_of_exited_child");
}

/* The first disagreement a bumper saw at the top of its loop (private memory): at
 * the top, every shared counter must hold exactly what this process stored last. A
 * restore that brings a shared page back older (or the /dev/shm file with content
 * from after the snapshot) shows up in the first iteration after it. */
static char seen_bad[160];

static void see(const char *what, uint64_t got, uint64_t want)
{
    if (!seen_bad[0])
        snprintf(seen_bad, sizeof(seen_bad), "%s=%lu_want=%lu", what, (unsigned long)got,
                 (unsigned long)want);
}

static void bumper(int me)
{
    ctl->pid[me] = getpid();
    ctl->ready[me] = 1;
    while (!ctl->stop) {
        if (ctl->counter[me] != mine)
            see("counter", ctl->counter[me], mine);
        uint64_t v = mine + 1;
        ctl->counter[me] = v;
        mine = v;
        if (me == C2) {
            uint64_t w = 0;
            if (pread(memfd, &w, 8, 8 * WL_PAGE) != 8 || w != fd_mine)
                see("memfd_fd_counter", w, fd_mine);
            w = fd_mine + 1;
            if (pwrite(memfd, &w, 8, 8 * WL_PAGE) == 8)
                fd_mine = w;
            if (posix[0] != pmine)
                see("posix_counter", posix[0], pmine);
            uint64_t p = pmine + 1;
            posix[0] = p;
            pmine = p;
        }
        if ((v & 1023) == 0)
            usleep(100);
    }
    if (seen_bad[0])
        note(me, "%s", seen_bad);
    if (ctl->counter[me] != mine)
        note(me, "counter%d=%lu_mine=%lu", me, (unsigned long)ctl->counter[me],
             (unsigned long)mine);
    check_common(me);
    ctl->done[me] = 1;
    _exit(0);
}

int main(void)
{
    sigset_t old;
    catch_usr2_blocked(on_usr2, &old);
    ctl = mmap(NULL, ANON, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    SETUP_CHECK(ctl != MAP_FAILED, "mmap anon");
    anon = (unsigned char *)ctl;
    memfd = memfd_create("shmstate", 0);
    SETUP_CHECK(memfd >= 0 && ftruncate(memfd, MFD) == 0, "memfd");
    mfd = mmap(NULL, MFD, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
    SETUP_CHECK(mfd != MAP_FAILED, "mmap memfd");
    ctl->pid[ROOT] = getpid();
    char pname[64];
    snprintf(pname, sizeof(pname), "/ckpt-shmstate-%d", (int)getpid());
    int pfd = shm_open(pname, O_CREAT | O_EXCL | O_RDWR, 0640);
    SETUP_CHECK(pfd >= 0 && ftruncate(pfd, POSIX_LEN) == 0, "shm_open");
    posix = mmap(NULL, POSIX_LEN, PROT_READ | PROT_WRITE, MAP_SHARED, pfd, 0);
    SETUP_CHECK(posix != MAP_FAILED, "mmap posix");
    close(pfd);

    pid_t e = fork();
    SETUP_CHECK(e >= 0, "fork e");
    if (e == 0) {
        fill(anon + 512 * WL_PAGE, 256 * WL_PAGE, 77);
        fill(anon + 768 * WL_PAGE, 256 * WL_PAGE, 78);
        fill(mfd + 128 * WL_PAGE, 64 * WL_PAGE, 79);
        fill((unsigned char *)posix + 16 * WL_PAGE, 16 * WL_PAGE, 80);
        _exit(0);
    }
    int st;
    SETUP_CHECK(waitpid(e, &st, 0) == e && WIFEXITED(st) && WEXITSTATUS(st) == 0, "child e");

    pid_t kid[N] = {0};
    for (int me = C1; me <= C2; me++) {
        kid[me] = fork();
        SETUP_CHECK(kid[me] >= 0, "fork");
        if (kid[me] == 0)
            bumper(me);
    }
    double end = mono_now() + 30;
    while ((!ctl->ready[C1] || !ctl->ready[C2]) && mono_now() < end)
        usleep(1000);
    SETUP_CHECK(ctl->ready[C1] && ctl->ready[C2], "bumpers started");
    say("READY pid=%d c1=%d c2=%d", (int)getpid(), (int)kid[C1], (int)kid[C2]);

    /* read the pages e left, one more each millisecond, until told to check */
    sigprocmask(SIG_SETMASK, &old, NULL); /* SIGUSR2 lands in the loop below */
    volatile uint64_t sink = 0;
    size_t next = 768;
    while (!got_usr2) {
        if (next < 1024)
            sink += anon[next++ * WL_PAGE + 8];
        else
            next = 768;
        usleep(1000);
    }
    (void)sink;
    ctl->stop = 1;
    check_common(ROOT);
    for (int me = C1; me <= C2; me++) {
        if (waitpid(kid[me], &st, 0) != kid[me] || !WIFEXITED(st) || WEXITSTATUS(st))
            fail("bumper%d_exit", me);
        if (!ctl->done[me])
            fail("bumper%d_not_done", me);
    }
    for (int i = 0; i < N; i++)
        if (ctl->fail[i])
            fail("p%d:%s", i, ctl->why[i]);
    shm_unlink(pname);
    char extra[64];
    snprintf(extra, sizeof(extra), "bumps=%lu", (unsigned long)(ctl->counter[C1] + ctl->counter[C2]));
    finish(extra);
}
