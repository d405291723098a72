/* sysvshm: SysV shared memory in a process tree.
 *
 * usage: sysvshm
 *   A: a keyed segment (key 0x5eed0000 + pid & 0xffff, 1 MiB, mode 0640) that stays
 *      after its users (the test removes it);
 *   B: an IPC_PRIVATE segment (256 KiB) marked for deletion while attached (IPC_RMID):
 *      it goes when the last user detaches, so after a dump that killed the tree it
 *      must be made again from the image.
 * Both are attached before fork, so the child has them too. Each holds a pattern.
 *
 * READY pid= child= shma= shmb= key=
 * On SIGUSR2 (root): both processes check the patterns, write a token into each
 * segment and wait for the other's (the segments are shared again), the root checks
 * the ids, key, size and that B is still marked for deletion, waits for the child.
 * VERIFY OK pid=   or   VERIFY FAIL pid= reason=
 */
#include "wl.h"

#include <sys/ipc.h>
#include <sys/shm.h>
#include <sys/wait.h>

#define ASZ (1UL << 20)
#define BSZ (256UL << 10)

static volatile sig_atomic_t got_usr2;
static void on_usr2(int sig)
{
    (void)sig;
    got_usr2 = 1;
}

static unsigned char *a, *b;
static int ida, idb;

/* token slots: the first page of each segment; the pattern lives from page 1 on */
static void exchange(int me, const char *who)
{
    volatile uint64_t *ta = (volatile uint64_t *)a, *tb = (volatile uint64_t *)b;
    ta[me] = 0xA0A0 + (uint64_t)me;
    tb[me] = 0xB0B0 + (uint64_t)me;
    int other = 1 - me;
    double end = mono_now() + 30;
    while ((ta[other] != 0xA0A0 + (uint64_t)other || tb[other] != 0xB0B0 + (uint64_t)other) &&
           mono_now() < end)
        usleep(1000);
    CHECK(ta[other] == 0xA0A0 + (uint64_t)other, "%s: segment A not shared", who);
    CHECK(tb[other] == 0xB0B0 + (uint64_t)other, "%s: segment B not shared", who);
}

static void check_patterns(const char *who)
{
    unsigned char *ref = malloc(ASZ);
    fill(ref, ASZ - 4096, 77);
    CHECK(memcmp(a + 4096, ref, ASZ - 4096) == 0, "%s: segment A content", who);
    fill(ref, BSZ - 4096, 88);
    CHECK(memcmp(b + 4096, ref, BSZ - 4096) == 0, "%s: segment B content", who);
    free(ref);
}

int main(void)
{
    sigset_t old;
    catch_usr2_blocked(on_usr2, &old);
    key_t key = (key_t)(0x5eed0000 + (getpid() & 0xffff));
    ida = shmget(key, ASZ, IPC_CREAT | IPC_EXCL | 0640);
    SETUP_CHECK(ida >= 0, "shmget A");
    idb = shmget(IPC_PRIVATE, BSZ, IPC_CREAT | 0600);
    SETUP_CHECK(idb >= 0, "shmget B");
    a = shmat(ida, NULL, 0);
    b = shmat(idb, NULL, 0);
    SETUP_CHECK(a != (void *)-1 && b != (void *)-1, "shmat");
    fill(a + 4096, ASZ - 4096, 77);
    fill(b + 4096, BSZ - 4096, 88);
    SETUP_CHECK(shmctl(idb, IPC_RMID, NULL) == 0, "IPC_RMID B");
    pid_t c = fork();
    SETUP_CHECK(c >= 0, "fork");
    if (c == 0) {
        /* wait for the root's go (a flag in A's token page) */
        volatile uint64_t *ta = (volatile uint64_t *)a;
        while (ta[8] != 0x60)
            usleep(2000);
        check_patterns("child");
        exchange(1, "child");
        _exit(wl_fails ? 1 : 0);
    }
    say("READY pid=%d child=%d shma=%d shmb=%d key=%d", (int)getpid(), (int)c, ida, idb,
        (int)key);
    while (!got_usr2)
        sigsuspend(&old);
    ((volatile uint64_t *)a)[8] = 0x60;
    check_patterns("root");
    exchange(0, "root");
    struct shmid_ds ds;
    CHECK(shmctl(ida, IPC_STAT, &ds) == 0 && ds.shm_perm.__key == key && ds.shm_segsz == ASZ &&
              (ds.shm_perm.mode & 0777) == 0640,
          "segment A id/key/size/mode");
    CHECK(shmctl(idb, IPC_STAT, &ds) == 0 && ds.shm_segsz == BSZ &&
              (ds.shm_perm.mode & SHM_DEST),
          "segment B id/size/marked for deletion");
    int st;
    CHECK(waitpid(c, &st, 0) == c && WIFEXITED(st) && WEXITSTATUS(st) == 0, "child failed");
    char extra[64];
    snprintf(extra, sizeof(extra), "shma=%d shmb=%d", ida, idb);
    finish(extra);
}
