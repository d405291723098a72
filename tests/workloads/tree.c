/* tree: a process tree sharing memory and open files.
 *
 * usage: tree [zombie]      (zombie: the root also keeps an exited, unreaped child)
 *   root ─┬─ a ── a1          a1 joins b's process group
 *         └─ b                b leads its own process group
 * All four map one MAP_SHARED|MAP_ANONYMOUS area (created before the forks) and
 * share the inherited log and a data file opened before the forks (one open file
 * description: one offset). Each also has 2 MiB of private memory with its own
 * pattern.
 *
 * READY pid= a= a1= b=
 * On SIGUSR2 the root tells everybody to check (a flag in the shared area).
 * Each process then: checks its private memory, its parent (getppid), its
 * process group and session, writes a token into its slot of the shared area
 * and waits to see every other process's token (so the area is really shared
 * again), and reads 4 bytes of the shared file (the offset moves for all).
 * Parents wait for their children and check their exit status.
 * VERIFY OK pid= offset=16   or   VERIFY FAIL pid= reason=
 */
#include "wl.h"

#include <sys/mman.h>
#include <sys/wait.h>

#define PRIV (2UL << 20)
enum { ROOT, A, A1, B, N };

struct shared {
    volatile int go;
    volatile pid_t pid[N];
    volatile uint64_t token[N];
    volatile int done[N];
    volatile int fail[N];
    volatile int b_wrote;
    char why[N][128];
};

static struct shared *sh;
/* shared too, but only b ever touches page 3 of it before the dump: its only copy
   is in b's page tables (the owner, root, must still get it back) */
static volatile uint64_t *only_b;
/* a memfd mapped MAP_SHARED by everybody (and its fd inherited): tokens go through it */
static volatile uint64_t *mfd;
static int memfd;
static int datafd;
static volatile sig_atomic_t got_usr2;

static void on_usr2(int sig)
{
    (void)sig;
    got_usr2 = 1;
}

static void note(int me, const char *why)
{
    sh->fail[me] = 1;
    snprintf(sh->why[me], sizeof(sh->why[me]), "%s", why);
}

static int wait_all(volatile int *flags, double secs)
{
    double end = mono_now() + secs;
    for (;;) {
        int all = 1;
        for (int i = 0; i < N; i++)
            all &= flags[i] != 0;
        if (all)
            return 1;
        if (mono_now() > end)
            return 0;
        usleep(1000);
    }
}

/* the part every process runs once told to check */
static void check(int me, unsigned char *priv, pid_t parent, pid_t want_pgid, pid_t want_sid)
{
    if (hash_mem(priv, PRIV, 0) != ({
            unsigned char *ref = malloc(PRIV);
            fill(ref, PRIV, 1000 + (uint64_t)me);
            uint64_t h = hash_mem(ref, PRIV, 0);
            free(ref);
            h;
        }))
        note(me, "private_memory");
    if (getppid() != parent)
        note(me, "parent");
    if (getpgid(0) != want_pgid)
        note(me, "pgid");
    if (getsid(0) != want_sid)
        note(me, "sid");
    sh->token[me] = 0xC0FFEE00ULL + (uint64_t)me;
    double end = mono_now() + 30;
    for (int i = 0; i < N; i++)
        while (sh->token[i] != 0xC0FFEE00ULL + (uint64_t)i && mono_now() < end)
            usleep(1000);
    for (int i = 0; i < N; i++)
        if (sh->token[i] != 0xC0FFEE00ULL + (uint64_t)i)
            note(me, "shared_memory_not_shared");
    mfd[64 * me] = 0xF00D00ULL + (uint64_t)me;
    end = mono_now() + 30;
    for (int i = 0; i < N; i++)
        while (mfd[64 * i] != 0xF00D00ULL + (uint64_t)i && mono_now() < end)
            usleep(1000);
    for (int i = 0; i < N; i++)
        if (mfd[64 * i] != 0xF00D00ULL + (uint64_t)i)
            note(me, "memfd_not_shared");
    uint64_t first;
    if (pread(memfd, &first, 8, 8192) != 8 || first != 0x5EED5EEDULL)
        note(me, "memfd_content");
    char buf[4];
    if (read(datafd, buf, 4) != 4)
        note(me, "shared_file_read");
    sh->done[me] = 1;
}

static void child_loop(int me, unsigned char *priv, pid_t parent, pid_t pgid, pid_t sid)
{
    while (!sh->go)
        usleep(2000);
    check(me, priv, parent, pgid, sid);
}

static int reap(pid_t p, const char *name, int me)
{
    int st;
    if (waitpid(p, &st, 0) != p) {
        char b[64];
        snprintf(b, sizeof(b), "waitpid_%s", name);
        note(me, b);
        return 0;
    }
    return WIFEXITED(st) && WEXITSTATUS(st) == 0;
}

static unsigned char *private_area(int me)
{
    unsigned char *p =
        mmap(NULL, PRIV, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    SETUP_CHECK(p != MAP_FAILED, "mmap private");
    fill(p, PRIV, 1000 + (uint64_t)me);
    return p;
}

int main(int argc, char **argv)
{
    pid_t zombie = 0;
    sigset_t old;
    catch_usr2_blocked(on_usr2, &old);
    sh = mmap(NULL, 1 << 20, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    SETUP_CHECK(sh != MAP_FAILED, "mmap shared");
    only_b = mmap(NULL, 16 * 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    SETUP_CHECK(only_b != MAP_FAILED, "mmap only_b");
    memfd = memfd_create("treemem", 0);
    SETUP_CHECK(memfd >= 0 && ftruncate(memfd, 16 * 4096) == 0, "memfd");
    mfd = mmap(NULL, 16 * 4096, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
    SETUP_CHECK(mfd != MAP_FAILED, "mmap memfd");
    mfd[1024] = 0x5EED5EEDULL; /* offset 8192 */
    datafd = open("data", O_RDWR | O_CREAT | O_TRUNC, 0644);
    SETUP_CHECK(datafd >= 0, "open data");
    SETUP_CHECK(write(datafd, "0123456789abcdef0123456789abcdef", 32) == 32, "write data");
    SETUP_CHECK(lseek(datafd, 0, SEEK_SET) == 0, "lseek");
    pid_t root = getpid(), sid = getsid(0);
    sh->pid[ROOT] = root;

    pid_t b = fork();
    SETUP_CHECK(b >= 0, "fork b");
    if (b == 0) {
        setpgid(0, 0);
        unsigned char *priv = private_area(B);
        sh->pid[B] = getpid();
        only_b[3 * 512] = 0xB0B0B0B0ULL;
        sh->b_wrote = 1;
        child_loop(B, priv, root, getpid(), sid);
        _exit(sh->fail[B]);
    }
    setpgid(b, b); /* no race with the child's own call */
    pid_t a = fork();
    SETUP_CHECK(a >= 0, "fork a");
    if (a == 0) {
        unsigned char *priv = private_area(A);
        sh->pid[A] = getpid();
        pid_t a1 = fork();
        if (a1 == 0) {
            setpgid(0, b);
            unsigned char *p1 = private_area(A1);
            sh->pid[A1] = getpid();
            child_loop(A1, p1, sh->pid[A], b, sid);
            _exit(sh->fail[A1]);
        }
        setpgid(a1, b);
        child_loop(A, priv, root, root, sid);
        if (!reap(a1, "a1", A))
            note(A, "a1_failed");
        _exit(sh->fail[A]);
    }
    unsigned char *priv = private_area(ROOT);
    double end = mono_now() + 30;
    while ((!sh->pid[A] || !sh->pid[A1] || !sh->pid[B]) && mono_now() < end)
        usleep(1000);
    SETUP_CHECK(sh->pid[A] && sh->pid[A1] && sh->pid[B], "children started");
    while (!sh->b_wrote && mono_now() < end)
        usleep(1000);
    /* wait until a1 is in b's group (setpgid by a1 or a) */
    while (getpgid(sh->pid[A1]) != b && mono_now() < end)
        usleep(1000);
    if (argc > 1 && strcmp(argv[1], "zombie") == 0) {
        zombie = fork();
        if (zombie == 0)
            _exit(0);
        siginfo_t si;
        memset(&si, 0, sizeof(si));
        waitid(P_PID, (id_t)zombie, &si, WEXITED | WNOWAIT); /* exited, left unreaped */
    }
    say("READY pid=%d a=%d a1=%d b=%d zombie=%d", (int)root, (int)sh->pid[A], (int)sh->pid[A1],
        (int)sh->pid[B], (int)zombie);

    while (!got_usr2)
        sigsuspend(&old);
    if (zombie)
        waitpid(zombie, NULL, 0);
    sh->go = 1;
    check(ROOT, priv, getppid(), root, sid);
    if (!wait_all(sh->done, 60))
        fail("not_everybody_checked");
    CHECK(reap(a, "a", ROOT), "a_failed");
    CHECK(reap(b, "b", ROOT), "b_failed");
    for (int i = 0; i < N; i++)
        if (sh->fail[i])
            fail("member%d:%s", i, sh->why[i]);
    CHECK(only_b[3 * 512] == 0xB0B0B0B0ULL, "page_only_b_touched_lost");
    off_t off = lseek(datafd, 0, SEEK_CUR);
    CHECK(off == 16, "shared_offset=%ld", (long)off);
    char extra[32];
    snprintf(extra, sizeof(extra), "offset=%ld", (long)off);
    finish(extra);
}
