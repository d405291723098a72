/* shmcollide: shared memory objects of every kind whose (dev, ino) collide.
 *
 * A SysV segment's inode number is its shmid (ipc/shm.c sets i_ino to it), on the
 * same internal shmem mount as anonymous MAP_SHARED memory and memfds, whose inode
 * numbers count up on their own. kernel.shm_next_id chooses the id of the next
 * segment: so the segments here get exactly the inode numbers of an anonymous
 * shared mapping (S1) and of a memfd (S2): /proc/PID/maps shows the same dev and
 * inode for two different objects. A /dev/shm file (its own tmpfs) is mapped too.
 *
 * usage: shmcollide
 * READY pid= anon= memfd= s1= s2=
 * On SIGUSR2: each of the five mappings (anon, memfd, S1, S2, /dev/shm file) holds its
 * own pattern; a write into each one shows in no other (they are five objects again).
 * VERIFY OK pid=   or   VERIFY FAIL pid= reason=
 */
#include "wl.h"

#include <sys/ipc.h>
#include <sys/mman.h>
#include <sys/shm.h>

#define SZ (4 * 4096UL)
#define N 5

static volatile sig_atomic_t got_usr2;
static void on_usr2(int sig)
{
    (void)sig;
    got_usr2 = 1;
}

static const char *names[N] = {"anon", "memfd", "sysv=anon's inode", "sysv=memfd's inode",
                               "/dev/shm file"};
static unsigned char *maps_[N];

/* The inode /proc/self/maps shows for the mapping at p. */
static unsigned long inode_of(void *p)
{
    FILE *f = fopen("/proc/self/maps", "r");
    SETUP_CHECK(f != NULL, "open maps");
    char line[512];
    unsigned long ino = 0;
    while (fgets(line, sizeof(line), f)) {
        unsigned long a, b;
        if (sscanf(line, "%lx-%lx %*s %*s %*s %lu", &a, &b, &ino) == 3 && a == (unsigned long)p)
            break;
        ino = 0;
    }
    fclose(f);
    SETUP_CHECK(ino != 0, "inode of a shared mapping");
    return ino;
}

/* A private SysV segment whose id (= inode) is `id`, attached and marked for deletion
 * (it goes with its users; the restore makes it again under that id). */
static unsigned char *segment_with_id(unsigned long id, int *got)
{
    for (int tries = 0; tries < 20; tries++) { /* another shmget may take the id first */
        FILE *f = fopen("/proc/sys/kernel/shm_next_id", "w");
        SETUP_CHECK(f != NULL, "open shm_next_id");
        fprintf(f, "%lu", id);
        SETUP_CHECK(fclose(f) == 0, "write shm_next_id");
        int shmid = shmget(IPC_PRIVATE, SZ, IPC_CREAT | 0600);
        SETUP_CHECK(shmid >= 0, "shmget");
        if ((unsigned long)shmid != id) {
            shmctl(shmid, IPC_RMID, NULL);
            continue;
        }
        unsigned char *p = shmat(shmid, NULL, 0);
        SETUP_CHECK(p != (void *)-1, "shmat");
        SETUP_CHECK(shmctl(shmid, IPC_RMID, NULL) == 0, "IPC_RMID");
        *got = shmid;
        return p;
    }
    SETUP_CHECK(0, "a segment with the wanted id");
    return NULL;
}

static void check_all(const char *when)
{
    for (int k = 0; k < N; k++)
        for (size_t i = 0; i < SZ; i += 512)
            if (maps_[k][i] != (unsigned char)(0x10 * (k + 1) + (i / 4096))) {
                fail("%s: %s holds 0x%02x at %zu", when, names[k], maps_[k][i], i);
                break;
            }
}

int main(void)
{
    sigset_t old;
    catch_usr2_blocked(on_usr2, &old);
    maps_[0] = mmap(NULL, SZ, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    SETUP_CHECK(maps_[0] != MAP_FAILED, "mmap anon");
    int mfd = memfd_create("collide", MFD_CLOEXEC);
    SETUP_CHECK(mfd >= 0 && ftruncate(mfd, SZ) == 0, "memfd");
    maps_[1] = mmap(NULL, SZ, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
    SETUP_CHECK(maps_[1] != MAP_FAILED, "mmap memfd");
    unsigned long anon = inode_of(maps_[0]), mino = inode_of(maps_[1]);
    int s1, s2;
    maps_[2] = segment_with_id(anon, &s1);
    maps_[3] = segment_with_id(mino, &s2);
    SETUP_CHECK(inode_of(maps_[2]) == anon && inode_of(maps_[3]) == mino, "colliding inodes");
    char path[64];
    snprintf(path, sizeof(path), "/dev/shm/ckpt-collide-%d", (int)getpid());
    int sfd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    SETUP_CHECK(sfd >= 0 && ftruncate(sfd, SZ) == 0, "/dev/shm file");
    maps_[4] = mmap(NULL, SZ, PROT_READ | PROT_WRITE, MAP_SHARED, sfd, 0);
    SETUP_CHECK(maps_[4] != MAP_FAILED, "mmap /dev/shm file");
    for (int k = 0; k < N; k++)
        for (size_t i = 0; i < SZ; i++)
            maps_[k][i] = (unsigned char)(0x10 * (k + 1) + (i / 4096));
    check_all("setup");
    SETUP_CHECK(wl_fails == 0, wl_fail_buf);
    say("READY pid=%d anon=%lu memfd=%lu s1=%d s2=%d shm=%s", (int)getpid(), anon, mino, s1, s2,
        path);
    while (!got_usr2)
        sigsuspend(&old);
    check_all("restored");
    for (int k = 0; k < N; k++) { /* one object each: a write shows in that one only */
        maps_[k][100] = 0xEE;
        for (int o = 0; o < N; o++)
            if (o != k)
                CHECK(maps_[o][100] == (unsigned char)(0x10 * (o + 1)),
                      "a write into %s shows in %s", names[k], names[o]);
        maps_[k][100] = (unsigned char)(0x10 * (k + 1));
    }
    unlink(path);
    finish("");
}
