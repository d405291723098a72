/* fdkinds: fds that are kernel objects — pipes, FIFOs, eventfd, timerfd, signalfd,
 * epoll, inotify, memfd (fds and mappings), a /dev/shm file.
 *
 * usage: fdkinds GROUPS   (comma list of pipes,events,epoll,inotify,memfd,shm,dirs, or all;
 *                          run in a scratch directory: FIFO and watched files go there)
 *        fdkinds MODE     (one of the refused setups: sharedpipe, pidfd, bigmemfd,
 *                          inotifyqueued — READY reports fd= of the refused fd)
 * READY pid= ...   then waits in sigsuspend() until SIGUSR2, then checks and prints
 * VERIFY OK pid=  (exit 0)  or  VERIFY FAIL pid= reason=  (exit 1)
 *
 * Everything is checked from inside, against what was set up before READY:
 * pipes: buffered bytes (100000 in a 256 KiB pipe, several small writes, a pipe
 *   whose write end was closed → data then EOF), both ends one pipe, capacity,
 *   O_NONBLOCK per end, FD_CLOEXEC per fd, a dup'd read end; a FIFO's bytes and modes.
 * events: eventfd count > 2^32 and a semaphore one; timerfds: remaining time and
 *   interval, an expired-unread one still reads as expired, a periodic one fires,
 *   a disarmed one stays disarmed; signalfd gets a signal sent after restore.
 * epoll: exactly the expected ready set (data values) incl. a registration whose fd
 *   was closed after a dup and whose number now holds another registered file,
 *   a nested epoll; a not-ready registration fires when made ready.
 * inotify: same wd numbers, events for a file created / chmod'ed after restore,
 *   the next wd continues after the restored ones.
 * memfd: name, size, content (sparse), offset per description, seals, a mapping
 *   that shares the object with the fd, a private COW mapping, a memfd only a
 *   mapping holds. shm: a /dev/shm file as fd + MAP_SHARED mapping.
 * dirs: a directory fd read part way (readdir goes on with exactly the entries
 *   that were left), an O_PATH directory fd used with openat/fstatat, an O_PATH fd
 *   on a regular file.
 */
#include "wl.h"

#include <poll.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/inotify.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/signalfd.h>
#include <sys/timerfd.h>
#include <sys/wait.h>

#ifndef F_SETPIPE_SZ
#define F_SETPIPE_SZ 1031
#define F_GETPIPE_SZ 1032
#endif

static volatile sig_atomic_t got_usr2;
static void on_usr2(int sig)
{
    (void)sig;
    got_usr2 = 1;
}

static const char *groups;
static int has(const char *g)
{
    return strstr(groups, "all") || strstr(groups, g);
}

static int read_exact(int fd, void *buf, size_t len)
{
    size_t got = 0;
    while (got < len) {
        ssize_t r = read(fd, (char *)buf + got, len - got);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return -1;
        got += (size_t)r;
    }
    return 0;
}

static int fionread(int fd)
{
    int n = -1;
    ioctl(fd, FIONREAD, &n);
    return n;
}

/* the fdinfo lines of fd that start with prefix, joined (to compare before/after) */
static void fdinfo_grep(int fd, const char *prefix, char *out, size_t outlen)
{
    char path[64], *text;
    snprintf(path, sizeof(path), "/proc/self/fdinfo/%d", fd);
    out[0] = 0;
    if (read_file(path, &text) < 0)
        return;
    for (char *line = strtok(text, "\n"); line; line = strtok(NULL, "\n"))
        if (strncmp(line, prefix, strlen(prefix)) == 0) {
            strncat(out, line, outlen - strlen(out) - 2);
            strcat(out, "|");
        }
    free(text);
}

/* ------------------------------------------------------------------ pipes */

#define P1_LEN 100000
static unsigned char p1_data[P1_LEN], fifo_data[5000];
static int p1[2], p2r, p3[2], fifo_rw, fifo_rd, p1_size;
static const int p3dup = 100;

static void setup_pipes(void)
{
    SETUP_CHECK(pipe2(p1, O_CLOEXEC) == 0, "pipe2");
    p1_size = fcntl(p1[1], F_SETPIPE_SZ, 256 * 1024);
    SETUP_CHECK(p1_size >= 256 * 1024, "F_SETPIPE_SZ");
    SETUP_CHECK(fcntl(p1[1], F_SETFD, 0) == 0, "F_SETFD");
    SETUP_CHECK(fcntl(p1[1], F_SETFL, O_NONBLOCK) == 0, "F_SETFL");
    fill(p1_data, P1_LEN, 11);
    SETUP_CHECK(write(p1[1], p1_data, P1_LEN) == P1_LEN, "write p1");

    int p2[2];
    SETUP_CHECK(pipe(p2) == 0, "pipe p2");
    SETUP_CHECK(write(p2[1], "abc", 3) == 3, "write p2");
    close(p2[1]);
    p2r = p2[0];

    SETUP_CHECK(pipe(p3) == 0, "pipe p3");
    SETUP_CHECK(dup2(p3[0], p3dup) == p3dup, "dup2 p3");
    for (int i = 0; i < 5; i++)
        SETUP_CHECK(write(p3[1], "xy", 2) == 2, "write p3");

    SETUP_CHECK(mkfifo("fifo", 0600) == 0, "mkfifo");
    fifo_rw = open("fifo", O_RDWR | O_NONBLOCK);
    SETUP_CHECK(fifo_rw >= 0, "open fifo O_RDWR");
    fifo_rd = open("fifo", O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    SETUP_CHECK(fifo_rd >= 0, "open fifo O_RDONLY");
    fill(fifo_data, sizeof(fifo_data), 12);
    SETUP_CHECK(write(fifo_rw, fifo_data, sizeof(fifo_data)) == sizeof(fifo_data), "write fifo");
}

static void verify_pipes(void)
{
    struct stat a, b;
    CHECK(fstat(p1[0], &a) == 0 && fstat(p1[1], &b) == 0 && a.st_ino == b.st_ino,
          "the two ends of p1 are not one pipe");
    CHECK(fcntl(p1[0], F_GETFD) == FD_CLOEXEC, "p1 read end lost FD_CLOEXEC");
    CHECK(fcntl(p1[1], F_GETFD) == 0, "p1 write end gained FD_CLOEXEC");
    CHECK(fcntl(p1[1], F_GETFL) & O_NONBLOCK, "p1 write end lost O_NONBLOCK");
    CHECK(!(fcntl(p1[0], F_GETFL) & O_NONBLOCK), "p1 read end gained O_NONBLOCK");
    CHECK((fcntl(p1[0], F_GETFL) & O_ACCMODE) == O_RDONLY, "p1 read end not O_RDONLY");
    CHECK((fcntl(p1[1], F_GETFL) & O_ACCMODE) == O_WRONLY, "p1 write end not O_WRONLY");
    CHECK(fcntl(p1[0], F_GETPIPE_SZ) == p1_size, "p1 capacity %d, want %d",
          fcntl(p1[0], F_GETPIPE_SZ), p1_size);
    static unsigned char got[P1_LEN];
    int n1 = fionread(p1[0]);
    if (n1 != P1_LEN) /* (never block on a short pipe) */
        fail("p1 holds %d bytes, want %d", n1, P1_LEN);
    else
        CHECK(read_exact(p1[0], got, P1_LEN) == 0 && memcmp(got, p1_data, P1_LEN) == 0,
              "p1 data differs");
    CHECK(write(p1[1], "!", 1) == 1 && read_exact(p1[0], got, 1) == 0 && got[0] == '!',
          "p1 does not carry new data");

    char b3[16] = {0};
    CHECK(fionread(p2r) == 3 && read_exact(p2r, b3, 3) == 0 && memcmp(b3, "abc", 3) == 0,
          "p2 lost 'abc'");
    struct pollfd pfd = {p2r, POLLIN, 0};
    CHECK(poll(&pfd, 1, 0) == 1 && (pfd.revents & POLLHUP) && read(p2r, b3, 1) == 0,
          "p2 write end is open again (no EOF)");

    CHECK(fionread(p3dup) == 10 && read_exact(p3dup, b3, 10) == 0 &&
              memcmp(b3, "xyxyxyxyxy", 10) == 0,
          "p3 holds %d bytes, want 'xyxyxyxyxy'", fionread(p3dup));
    CHECK(write(p3[1], "Z", 1) == 1 && read_exact(p3[0], b3, 1) == 0 && b3[0] == 'Z',
          "p3's dup'd read end is not the same pipe");

    CHECK((fcntl(fifo_rw, F_GETFL) & (O_ACCMODE | O_NONBLOCK)) == (O_RDWR | O_NONBLOCK),
          "fifo O_RDWR fd flags %o", fcntl(fifo_rw, F_GETFL));
    CHECK((fcntl(fifo_rd, F_GETFL) & (O_ACCMODE | O_NONBLOCK)) == (O_RDONLY | O_NONBLOCK),
          "fifo O_RDONLY fd flags %o", fcntl(fifo_rd, F_GETFL));
    CHECK(fcntl(fifo_rd, F_GETFD) == FD_CLOEXEC, "fifo reader lost FD_CLOEXEC");
    struct stat fs, ps;
    CHECK(fstat(fifo_rd, &fs) == 0 && stat("fifo", &ps) == 0 && fs.st_ino == ps.st_ino,
          "the FIFO fd is not the FIFO at ./fifo");
    static unsigned char fgot[sizeof(fifo_data)];
    CHECK(fionread(fifo_rd) == (int)sizeof(fifo_data), "fifo holds %d bytes",
          fionread(fifo_rd));
    CHECK(read_exact(fifo_rd, fgot, sizeof(fgot)) == 0 && /* O_NONBLOCK: never blocks */
              memcmp(fgot, fifo_data, sizeof(fgot)) == 0,
          "fifo data differs");
}

/* ------------------------------------------------------------------ events */

static int efd1, efd2, tfd_long, tfd_expired, tfd_periodic, tfd_off, sfd;
static char sfd_mask[256];
#define EFD1_COUNT ((1ULL << 40) + 7)

static void settime(int fd, double value, double interval)
{
    struct itimerspec its = {
        {(time_t)interval, (long)((interval - (time_t)interval) * 1e9)},
        {(time_t)value, (long)((value - (time_t)value) * 1e9)},
    };
    SETUP_CHECK(timerfd_settime(fd, 0, &its, NULL) == 0, "timerfd_settime");
}

static void setup_events(void)
{
    efd1 = eventfd(7, 0);
    uint64_t v = 1ULL << 40;
    SETUP_CHECK(efd1 >= 0 && write(efd1, &v, 8) == 8, "eventfd 1");
    efd2 = eventfd(3, EFD_SEMAPHORE | EFD_NONBLOCK | EFD_CLOEXEC);
    SETUP_CHECK(efd2 >= 0, "eventfd 2");

    tfd_long = timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC);
    SETUP_CHECK(tfd_long >= 0, "timerfd long");
    settime(tfd_long, 3600, 7);
    tfd_expired = timerfd_create(CLOCK_BOOTTIME, TFD_NONBLOCK);
    SETUP_CHECK(tfd_expired >= 0, "timerfd expired");
    settime(tfd_expired, 0.001, 0);
    struct pollfd pfd = {tfd_expired, POLLIN, 0};
    SETUP_CHECK(poll(&pfd, 1, 30000) == 1, "timerfd did not expire");
    tfd_periodic = timerfd_create(CLOCK_MONOTONIC, 0);
    SETUP_CHECK(tfd_periodic >= 0, "timerfd periodic");
    settime(tfd_periodic, 0.02, 0.02);
    tfd_off = timerfd_create(CLOCK_REALTIME, TFD_NONBLOCK);
    SETUP_CHECK(tfd_off >= 0, "timerfd off");

    sigset_t m;
    sigemptyset(&m);
    sigaddset(&m, SIGUSR1);
    sigaddset(&m, SIGRTMIN + 2);
    sfd = signalfd(-1, &m, SFD_NONBLOCK | SFD_CLOEXEC);
    SETUP_CHECK(sfd >= 0, "signalfd");
    fdinfo_grep(sfd, "sigmask", sfd_mask, sizeof(sfd_mask));
}

static void verify_events(void)
{
    uint64_t v = 0;
    struct pollfd pfd = {efd1, POLLIN, 0};
    CHECK(poll(&pfd, 1, 0) == 1 && read(efd1, &v, 8) == 8 && v == EFD1_COUNT,
          "eventfd count %llu, want %llu", (unsigned long long)v,
          (unsigned long long)EFD1_COUNT);
    CHECK(!(fcntl(efd1, F_GETFL) & O_NONBLOCK) && fcntl(efd1, F_GETFD) == 0, "eventfd 1 flags");
    CHECK(fcntl(efd2, F_GETFL) & O_NONBLOCK, "eventfd 2 lost O_NONBLOCK");
    CHECK(fcntl(efd2, F_GETFD) == FD_CLOEXEC, "eventfd 2 lost FD_CLOEXEC");
    for (int i = 0; i < 3; i++)
        CHECK(read(efd2, &v, 8) == 8 && v == 1, "semaphore eventfd read %d gave %llu", i,
              (unsigned long long)v);
    CHECK(read(efd2, &v, 8) < 0 && errno == EAGAIN, "semaphore eventfd had more than 3");

    struct itimerspec its;
    CHECK(timerfd_gettime(tfd_long, &its) == 0, "timerfd_gettime");
    CHECK(its.it_interval.tv_sec == 7 && its.it_interval.tv_nsec == 0, "long timer interval %lds",
          (long)its.it_interval.tv_sec);
    CHECK(its.it_value.tv_sec > 600 && its.it_value.tv_sec < 3600,
          "long timer has %lds left, want a bit under 3600", (long)its.it_value.tv_sec);
    CHECK(fcntl(tfd_long, F_GETFD) == FD_CLOEXEC, "timerfd lost FD_CLOEXEC");

    v = 0;
    CHECK(read(tfd_expired, &v, 8) == 8 && v >= 1, "expired timer does not read as expired (%s)",
          strerror(errno));
    CHECK(read(tfd_expired, &v, 8) < 0 && errno == EAGAIN, "one-shot timer fired again");

    CHECK(timerfd_gettime(tfd_periodic, &its) == 0 && its.it_interval.tv_nsec == 20000000 &&
              its.it_interval.tv_sec == 0,
          "periodic timer interval %lds %ldns, want 20 ms", (long)its.it_interval.tv_sec,
          its.it_interval.tv_nsec);
    v = 0;
    pfd.fd = tfd_periodic;
    CHECK(poll(&pfd, 1, 30000) == 1 && read(tfd_periodic, &v, 8) == 8 && v >= 1,
          "periodic timer does not fire");

    CHECK(timerfd_gettime(tfd_off, &its) == 0 && its.it_value.tv_sec == 0 &&
              its.it_value.tv_nsec == 0,
          "disarmed timer is armed");
    CHECK(read(tfd_off, &v, 8) < 0 && errno == EAGAIN, "disarmed timer fired");

    char mask[256];
    fdinfo_grep(sfd, "sigmask", mask, sizeof(mask));
    CHECK(strcmp(mask, sfd_mask) == 0, "signalfd mask '%s', want '%s'", mask, sfd_mask);
    CHECK(fcntl(sfd, F_GETFL) & O_NONBLOCK, "signalfd lost O_NONBLOCK");
    struct signalfd_siginfo si;
    CHECK(read(sfd, &si, sizeof(si)) < 0 && errno == EAGAIN, "signalfd had a signal already");
    union sigval sv = {.sival_int = 42};
    kill(getpid(), SIGUSR1);
    sigqueue(getpid(), SIGRTMIN + 2, sv);
    int seen_usr1 = 0, seen_rt = 0;
    while (read(sfd, &si, sizeof(si)) == sizeof(si)) {
        if (si.ssi_signo == SIGUSR1)
            seen_usr1 = 1;
        if ((int)si.ssi_signo == SIGRTMIN + 2 && si.ssi_int == 42)
            seen_rt = 1;
    }
    CHECK(seen_usr1 && seen_rt, "signalfd got usr1=%d rt=%d", seen_usr1, seen_rt);
}

/* ------------------------------------------------------------------ epoll */

static int ep, ep2, ep_pipe[2], ep_ready, ep_idle, ep_stale_num;
static const int ep_stale_dup = 150;
static int ep_lines;

static void ep_add(int epfd, int fd, uint32_t events, uint64_t data)
{
    struct epoll_event ev = {.events = events, .data.u64 = data};
    SETUP_CHECK(epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) == 0, "epoll_ctl ADD");
}

static int count_lines(int fd, const char *prefix)
{
    char buf[4096];
    fdinfo_grep(fd, prefix, buf, sizeof(buf));
    int n = 0;
    for (char *p = buf; *p; p++)
        n += *p == '|';
    return n;
}

static void setup_epoll(void)
{
    ep = epoll_create1(EPOLL_CLOEXEC);
    SETUP_CHECK(ep >= 0 && pipe(ep_pipe) == 0 && write(ep_pipe[1], "p", 1) == 1, "epoll pipe");
    ep_add(ep, ep_pipe[0], EPOLLIN, 0x1111);
    ep_add(ep, ep_pipe[1], EPOLLOUT, 0x7777);
    ep_ready = eventfd(5, 0);
    ep_add(ep, ep_ready, EPOLLIN | EPOLLET, 0x2222);
    /* registered, then dup'd elsewhere and closed; its number then reused by another
       registered (idle) file */
    int ev = eventfd(1, 0);
    ep_add(ep, ev, EPOLLIN, 0x5555);
    SETUP_CHECK(dup2(ev, ep_stale_dup) == ep_stale_dup, "dup2");
    close(ev);
    ep_idle = eventfd(0, EFD_NONBLOCK);
    SETUP_CHECK(ep_idle == ev, "the freed number was not reused");
    ep_stale_num = ev;
    ep_add(ep, ep_idle, EPOLLIN, 0x4444);
    ep2 = epoll_create1(0);
    SETUP_CHECK(ep2 >= 0, "epoll 2");
    ep_add(ep2, ep_ready, EPOLLIN, 0x8888);
    ep_add(ep, ep2, EPOLLIN, 0x9999);
    ep_lines = count_lines(ep, "tfd:");
}

static uint64_t ready_set(int epfd, char *desc, size_t desclen)
{
    struct epoll_event evs[32];
    int n = epoll_wait(epfd, evs, 32, 0);
    uint64_t bits = 0;
    desc[0] = 0;
    for (int i = 0; i < n; i++) {
        bits |= 1ULL << ((evs[i].data.u64 >> 12) & 63);
        snprintf(desc + strlen(desc), desclen - strlen(desc), "%llx,",
                 (unsigned long long)evs[i].data.u64);
    }
    return bits;
}

static void verify_epoll(void)
{
    char desc[256];
    /* data 0xN111..: bit N */
    uint64_t want = (1 << 1) | (1 << 2) | (1 << 5) | (1 << 7) | (1 << 9);
    uint64_t got = ready_set(ep, desc, sizeof(desc));
    CHECK(got == want, "epoll ready set {%s}, want {1111,2222,5555,7777,9999}", desc);
    CHECK(count_lines(ep, "tfd:") == ep_lines, "epoll has %d registrations, want %d",
          count_lines(ep, "tfd:"), ep_lines);
    CHECK(fcntl(ep, F_GETFD) == FD_CLOEXEC, "epoll lost FD_CLOEXEC");
    uint64_t one = 1;
    CHECK(write(ep_idle, &one, 8) == 8, "write idle eventfd");
    got = ready_set(ep, desc, sizeof(desc));
    CHECK(got & (1 << 4), "epoll does not report the fd %d registration made ready {%s}",
          ep_stale_num, desc);
    got = ready_set(ep2, desc, sizeof(desc));
    CHECK(got == (1 << 8), "nested epoll ready set {%s}, want {8888}", desc);
}

/* ------------------------------------------------------------------ inotify */

static int in_fd, wd_dir, wd_file;

static void drain_inotify(void)
{
    char buf[4096];
    while (read(in_fd, buf, sizeof(buf)) > 0)
        ;
}

static void setup_inotify(void)
{
    SETUP_CHECK(mkdir("watched", 0700) == 0, "mkdir");
    int f = open("watched/f", O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
    SETUP_CHECK(f >= 0, "create watched/f");
    close(f);
    in_fd = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
    SETUP_CHECK(in_fd >= 0, "inotify_init1");
    for (int i = 0; i < 5; i++) { /* move the cyclic wd allocator on */
        int w = inotify_add_watch(in_fd, ".", IN_OPEN);
        SETUP_CHECK(w > 0 && inotify_rm_watch(in_fd, w) == 0, "burn wd");
    }
    wd_dir = inotify_add_watch(in_fd, "watched", IN_CREATE | IN_DELETE);
    wd_file = inotify_add_watch(in_fd, "watched/f", IN_ATTRIB | IN_ONESHOT);
    SETUP_CHECK(wd_dir > 5 && wd_file > wd_dir, "watches");
    drain_inotify();
}

static void verify_inotify(void)
{
    CHECK(count_lines(in_fd, "inotify wd:") == 2, "inotify has %d watches, want 2",
          count_lines(in_fd, "inotify wd:"));
    CHECK(fcntl(in_fd, F_GETFL) & O_NONBLOCK, "inotify lost O_NONBLOCK");
    char buf[4096];
    CHECK(read(in_fd, buf, sizeof(buf)) < 0 && errno == EAGAIN, "inotify has stale events");
    int f = open("watched/new", O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
    if (f >= 0)
        close(f);
    chmod("watched/f", 0600);
    int seen_create = 0, seen_attrib = 0;
    double end = mono_now() + 30;
    while (!(seen_create && seen_attrib) && mono_now() < end) {
        struct pollfd pfd = {in_fd, POLLIN, 0};
        poll(&pfd, 1, 1000);
        ssize_t n = read(in_fd, buf, sizeof(buf));
        for (ssize_t off = 0; n > 0 && off < n;) {
            struct inotify_event *e = (struct inotify_event *)(buf + off);
            if (e->wd == wd_dir && (e->mask & IN_CREATE) && strcmp(e->name, "new") == 0)
                seen_create = 1;
            if (e->wd == wd_file && (e->mask & IN_ATTRIB))
                seen_attrib = 1;
            off += sizeof(*e) + e->len;
        }
    }
    CHECK(seen_create, "no IN_CREATE on wd %d for watched/new", wd_dir);
    CHECK(seen_attrib, "no IN_ATTRIB on wd %d for watched/f", wd_file);
    int next = inotify_add_watch(in_fd, ".", IN_OPEN);
    CHECK(next == wd_file + 1, "the next watch got wd %d, want %d", next, wd_file + 1);
}

/* ------------------------------------------------------------------ memfd */

#define M1_SIZE (4UL << 20)
#define M2_SIZE (1UL << 20)
#define PRIV_SIZE (64UL << 10)
static int m1, m1_ro;
static unsigned char *m1_map, *m1_priv, *m2_map;
static uint64_t m1_hash, m2_hash, priv_hash;
static unsigned char chunk[64 << 10];

static void setup_memfd(void)
{
    m1 = memfd_create("ckpt-test", MFD_ALLOW_SEALING | MFD_CLOEXEC);
    SETUP_CHECK(m1 >= 0 && ftruncate(m1, M1_SIZE) == 0, "memfd 1");
    fill(chunk, sizeof(chunk), 21);
    SETUP_CHECK(pwrite(m1, chunk, sizeof(chunk), 0) == sizeof(chunk), "pwrite 0");
    fill(chunk, 8192, 22);
    SETUP_CHECK(pwrite(m1, chunk, 8192, 3UL << 20) == 8192, "pwrite 3M");
    SETUP_CHECK(lseek(m1, 12345, SEEK_SET) == 12345, "lseek");
    m1_map = mmap(NULL, M1_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, m1, 0);
    SETUP_CHECK(m1_map != MAP_FAILED, "mmap memfd shared");
    memcpy(m1_map + (2UL << 20), "via-map", 7);
    m1_priv = mmap(NULL, PRIV_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE, m1, 0);
    SETUP_CHECK(m1_priv != MAP_FAILED, "mmap memfd private");
    m1_priv[0] = 'P'; /* COW page 0 */
    SETUP_CHECK(fcntl(m1, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW) == 0, "seals");
    char path[64];
    snprintf(path, sizeof(path), "/proc/self/fd/%d", m1);
    m1_ro = open(path, O_RDONLY);
    SETUP_CHECK(m1_ro >= 0 && lseek(m1_ro, 77, SEEK_SET) == 77, "reopen memfd");

    int m2 = memfd_create("maponly", 0);
    SETUP_CHECK(m2 >= 0 && ftruncate(m2, M2_SIZE) == 0, "memfd 2");
    m2_map = mmap(NULL, M2_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, m2, 0);
    SETUP_CHECK(m2_map != MAP_FAILED, "mmap memfd 2");
    close(m2);
    fill(m2_map, M2_SIZE, 23);

    m1_hash = hash_mem(m1_map, M1_SIZE, 1);
    m2_hash = hash_mem(m2_map, M2_SIZE, 1);
    priv_hash = hash_mem(m1_priv, PRIV_SIZE, 1);
}

static void verify_memfd(void)
{
    char path[64], link[256] = {0};
    snprintf(path, sizeof(path), "/proc/self/fd/%d", m1);
    CHECK(readlink(path, link, sizeof(link) - 1) > 0 &&
              strcmp(link, "/memfd:ckpt-test (deleted)") == 0,
          "memfd is '%s'", link);
    CHECK(lseek(m1, 0, SEEK_CUR) == 12345, "memfd offset %lld", (long long)lseek(m1, 0, SEEK_CUR));
    CHECK(lseek(m1_ro, 0, SEEK_CUR) == 77, "reopened memfd offset %lld",
          (long long)lseek(m1_ro, 0, SEEK_CUR));
    CHECK((fcntl(m1_ro, F_GETFL) & O_ACCMODE) == O_RDONLY, "reopened memfd not O_RDONLY");
    CHECK(fcntl(m1, F_GETFD) == FD_CLOEXEC && fcntl(m1_ro, F_GETFD) == 0, "memfd FD_CLOEXEC");
    CHECK(fcntl(m1, F_GET_SEALS) == (F_SEAL_SHRINK | F_SEAL_GROW), "memfd seals %#x",
          fcntl(m1, F_GET_SEALS));
    struct stat st;
    CHECK(fstat(m1, &st) == 0 && (size_t)st.st_size == M1_SIZE, "memfd size");
    CHECK(ftruncate(m1, 2 * M1_SIZE) < 0 && errno == EPERM, "F_SEAL_GROW not enforced");
    static unsigned char whole[M1_SIZE];
    CHECK(pread(m1_ro, whole, M1_SIZE, 0) == (ssize_t)M1_SIZE &&
              hash_mem(whole, M1_SIZE, 1) == m1_hash,
          "memfd content differs");
    CHECK(hash_mem(m1_map, M1_SIZE, 1) == m1_hash, "memfd shared mapping content differs");
    CHECK(hash_mem(m1_priv, PRIV_SIZE, 1) == priv_hash && m1_priv[0] == 'P',
          "private memfd mapping differs");
    CHECK(pwrite(m1, "NEW", 3, (1UL << 20) + 5) == 3 &&
              memcmp(m1_map + (1UL << 20) + 5, "NEW", 3) == 0,
          "a write through the memfd fd is not seen in its mapping");
    memcpy(m1_map + (1UL << 20) + 100, "MAPW", 4);
    char b[4];
    CHECK(pread(m1_ro, b, 4, (1UL << 20) + 100) == 4 && memcmp(b, "MAPW", 4) == 0,
          "a write through the mapping is not seen through the fd");
    CHECK(pwrite(m1, "Q", 1, 5000) == 1 && m1_priv[5000] == 'Q',
          "the private mapping's untouched page does not follow the memfd");
    CHECK(hash_mem(m2_map, M2_SIZE, 1) == m2_hash, "mapping-only memfd content differs");
    char perms[5], name[256];
    CHECK(maps_lookup((uintptr_t)m2_map, perms, name, sizeof(name)) == 0 &&
              strcmp(name, "/memfd:maponly (deleted)") == 0 && strcmp(perms, "rw-s") == 0,
          "mapping-only memfd is '%s' %s", name, perms);
}

/* ------------------------------------------------------------------ /dev/shm */

static int shm_fd;
static unsigned char *shm_map;
static char shm_path[64];
static uint64_t shm_hash;

/* ---- dirs --------------------------------------------------------------------------- */

#include <dirent.h>

static int dir_fd, dir_path_fd, file_path_fd;
static ino_t dir_ino, file_ino;
static char dir_left[4096]; /* names readdir still has to give, '/'-separated */

static void names_from(int fd, char *out, size_t cap)
{
    char buf[8192];
    out[0] = 0;
    for (;;) {
        long n = syscall(SYS_getdents64, fd, buf, sizeof(buf));
        if (n <= 0)
            break;
        for (long off = 0; off < n;) {
            struct dirent64 *d = (struct dirent64 *)(buf + off);
            if (strlen(out) + strlen(d->d_name) + 2 < cap) {
                strcat(out, d->d_name);
                strcat(out, "/");
            }
            off += d->d_reclen;
        }
    }
}

static void setup_dirs(void)
{
    SETUP_CHECK(mkdir("d", 0755) == 0, "mkdir d");
    for (int i = 0; i < 12; i++) {
        char name[32];
        snprintf(name, sizeof(name), "d/entry-%02d", i);
        int f = open(name, O_CREAT | O_WRONLY, 0644);
        SETUP_CHECK(f >= 0, "create entry");
        close(f);
    }
    dir_fd = open("d", O_RDONLY | O_DIRECTORY);
    SETUP_CHECK(dir_fd >= 0, "open dir");
    char small[80]; /* room for a couple of entries only: readdir stops part way */
    SETUP_CHECK(syscall(SYS_getdents64, dir_fd, small, sizeof(small)) > 0, "getdents");
    off_t pos = lseek(dir_fd, 0, SEEK_CUR);
    int again = open("d", O_RDONLY | O_DIRECTORY);
    SETUP_CHECK(again >= 0 && lseek(again, pos, SEEK_SET) == pos, "seek dir");
    names_from(again, dir_left, sizeof(dir_left));
    close(again);
    SETUP_CHECK(strstr(dir_left, "entry-"), "entries left to read");
    dir_path_fd = open("d", O_PATH | O_DIRECTORY);
    file_path_fd = open("d/entry-03", O_PATH);
    SETUP_CHECK(dir_path_fd >= 0 && file_path_fd >= 0, "O_PATH");
    struct stat st;
    fstat(dir_fd, &st);
    dir_ino = st.st_ino;
    fstat(file_path_fd, &st);
    file_ino = st.st_ino;
}

static void verify_dirs(void)
{
    struct stat st;
    CHECK(fstat(dir_fd, &st) == 0 && S_ISDIR(st.st_mode) && st.st_ino == dir_ino,
          "dir fd is not the directory");
    char left[4096];
    names_from(dir_fd, left, sizeof(left));
    CHECK(strcmp(left, dir_left) == 0, "readdir went on with [%s], not [%s]", left, dir_left);
    CHECK(fcntl(dir_path_fd, F_GETFL) & O_PATH, "O_PATH dir fd lost O_PATH");
    CHECK(fstatat(dir_path_fd, "entry-05", &st, 0) == 0, "fstatat through the O_PATH dir fd");
    int f = openat(dir_path_fd, "entry-07", O_RDONLY);
    CHECK(f >= 0, "openat through the O_PATH dir fd");
    if (f >= 0)
        close(f);
    CHECK((fcntl(file_path_fd, F_GETFL) & O_PATH) && fstat(file_path_fd, &st) == 0 &&
              st.st_ino == file_ino,
          "O_PATH file fd");
}

static void setup_shm(void)
{
    snprintf(shm_path, sizeof(shm_path), "/dev/shm/ckpt-fdkinds-%d", (int)getpid());
    shm_fd = open(shm_path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    SETUP_CHECK(shm_fd >= 0 && ftruncate(shm_fd, M2_SIZE) == 0, "shm file");
    shm_map = mmap(NULL, M2_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, shm_fd, 0);
    SETUP_CHECK(shm_map != MAP_FAILED, "mmap shm");
    fill(shm_map, M2_SIZE, 31);
    SETUP_CHECK(pwrite(shm_fd, "fd-write", 8, 4096) == 8, "pwrite shm");
    SETUP_CHECK(lseek(shm_fd, 999, SEEK_SET) == 999, "lseek shm");
    shm_hash = hash_mem(shm_map, M2_SIZE, 1);
}

static void verify_shm(void)
{
    CHECK(hash_mem(shm_map, M2_SIZE, 1) == shm_hash, "shm mapping content differs");
    CHECK(lseek(shm_fd, 0, SEEK_CUR) == 999, "shm fd offset");
    CHECK(pwrite(shm_fd, "AFTER", 5, 8192) == 5 && memcmp(shm_map + 8192, "AFTER", 5) == 0,
          "a write through the shm fd is not seen in its mapping");
    struct stat a, b;
    CHECK(fstat(shm_fd, &a) == 0 && stat(shm_path, &b) == 0 && a.st_ino == b.st_ino,
          "the shm fd is not %s", shm_path);
}

/* ------------------------------------------------------------------ refused setups */

static int refused_fd = -1, shared_pipe[2], child;

static void setup_refused(const char *mode)
{
    if (strcmp(mode, "sharedpipe") == 0) {
        /* the peer is not a descendant (double fork: it is re-parented to the test,
           a subreaper), so no process-tree dump can take it along; the test's
           cleanup kills it (its cwd is the test directory) */
        int report[2];
        SETUP_CHECK(pipe(shared_pipe) == 0 && write(shared_pipe[1], "hello", 5) == 5, "pipe");
        SETUP_CHECK(pipe(report) == 0, "pipe");
        pid_t mid = fork();
        SETUP_CHECK(mid >= 0, "fork");
        if (mid == 0) {
            pid_t peer = fork();
            if (peer == 0) {
                close(report[1]);
                for (;;)
                    pause();
            }
            _exit(write(report[1], &peer, sizeof(peer)) == sizeof(peer) ? 0 : 1);
        }
        close(report[1]);
        SETUP_CHECK(read_exact(report[0], &child, sizeof(child)) == 0 && child > 0, "peer pid");
        close(report[0]);
        SETUP_CHECK(waitpid(mid, NULL, 0) == mid, "waitpid");
        refused_fd = shared_pipe[0];
    } else if (strcmp(mode, "pidfd") == 0) {
        refused_fd = (int)syscall(SYS_pidfd_open, getpid(), 0);
        SETUP_CHECK(refused_fd >= 0, "pidfd_open");
    } else if (strcmp(mode, "bigmemfd") == 0) {
        refused_fd = memfd_create("big", 0);
        size_t len = 65UL << 20;
        SETUP_CHECK(refused_fd >= 0 && ftruncate(refused_fd, len) == 0, "memfd");
        unsigned char *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, refused_fd, 0);
        SETUP_CHECK(p != MAP_FAILED, "mmap");
        memset(p, 0x5a, len);
        munmap(p, len);
    } else if (strcmp(mode, "inotifyqueued") == 0) {
        refused_fd = inotify_init1(IN_NONBLOCK);
        SETUP_CHECK(refused_fd >= 0 && inotify_add_watch(refused_fd, ".", IN_CREATE) > 0,
                    "inotify");
        int f = open("queued", O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
        SETUP_CHECK(f >= 0, "create");
        close(f);
    }
}

static void verify_refused(const char *mode)
{
    if (strcmp(mode, "sharedpipe") == 0) {
        char b[8];
        CHECK(fionread(shared_pipe[0]) == 5 && read_exact(shared_pipe[0], b, 5) == 0 &&
                  memcmp(b, "hello", 5) == 0,
              "the failed dump disturbed the pipe's data");
    } else if (strcmp(mode, "inotifyqueued") == 0) {
        char buf[4096];
        CHECK(read(refused_fd, buf, sizeof(buf)) > 0, "the failed dump consumed the event");
    }
    struct stat st;
    CHECK(fstat(refused_fd, &st) == 0, "fd %d closed", refused_fd);
}

int main(int argc, char **argv)
{
    groups = argc > 1 ? argv[1] : "all";
    int refused = !strcmp(groups, "sharedpipe") || !strcmp(groups, "pidfd") ||
                  !strcmp(groups, "bigmemfd") || !strcmp(groups, "inotifyqueued");
    sigset_t old;
    if (!refused && has("events")) {
        sigset_t m;
        sigemptyset(&m);
        sigaddset(&m, SIGUSR1);
        sigaddset(&m, SIGRTMIN + 2);
        sigprocmask(SIG_BLOCK, &m, NULL);
    }
    catch_usr2_blocked(on_usr2, &old);
    if (refused) {
        setup_refused(groups);
    } else {
        if (has("pipes"))
            setup_pipes();
        if (has("events"))
            setup_events();
        if (has("epoll"))
            setup_epoll();
        if (has("inotify"))
            setup_inotify();
        if (has("memfd"))
            setup_memfd();
        if (has("shm"))
            setup_shm();
        if (has("dirs"))
            setup_dirs();
    }
    say("READY pid=%d groups=%s fd=%d child=%d", (int)getpid(), groups, refused_fd, child);
    while (!got_usr2)
        sigsuspend(&old);
    if (refused) {
        verify_refused(groups);
    } else {
        if (has("pipes"))
            verify_pipes();
        if (has("events"))
            verify_events();
        if (has("epoll"))
            verify_epoll();
        if (has("inotify"))
            verify_inotify();
        if (has("memfd"))
            verify_memfd();
        if (has("shm")) {
            verify_shm();
            unlink(shm_path);
        }
        if (has("dirs"))
            verify_dirs();
    }
    finish("");
}
