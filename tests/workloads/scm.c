/* scm: files in flight (SCM_RIGHTS) in the receive queue of a unix socket, not received
 * before the dump; after the restore they are received and checked from inside.
 *
 * usage: scm stream|dgram|seqpacket [self|child]   |   scm refuse
 * READY pid= child=   then waits in sigsuspend() until SIGUSR2, receives, checks, prints
 * VERIFY OK pid=  (exit 0)  or  VERIFY FAIL pid= reason=  (exit 1)
 *
 * The receiving socket r (SO_PASSCRED on) of a socketpair of the given type holds, sent
 * through its other end s:
 *   m1 + [the file data.txt at offset 100, through fd K kept open here (one description);
 *         data.txt opened again at offset 200, closed here]
 *   m2-plain (no files)
 *   m3 + [the write end of pipe P (holding "pipe-bytes"; its read end kept here, the
 *         write end closed here); the read end of pipe Q (holding "q-data"; both ends
 *         closed here); a memfd "scmtest" holding 64 known bytes, at offset 5, closed]
 *   m4 + [an eventfd holding 7, closed; end c1 of a stream socketpair (c0 kept here; c1
 *         holds "hello-c", sent by c0, and is closed here); the directory ".", closed]
 *   m5 + [r itself]
 * self: this process sends them. closed (stream, seqpacket): it sends them, then closes s
 *   (r reads EOF after them). child: a child is forked first and keeps r, K, P's read
 *   end and c0 (the parent closes its copies after sending); the parent keeps s, and on
 *   SIGUSR2 has the child check (SIGUSR1) and reports its exit status.
 * Checked after the restore: every recvmsg returns the bytes and number of files a
 *   scratch socketpair of the same type gave for the same sends before the dump; the
 *   credentials name the sender (this process, or the parent) and its uid; K's
 *   description is shared (reading the file received through it moves K's offset);
 *   the other file reads at 200; P's write end writes into the pipe after its bytes; Q
 *   gives its bytes then EOF; the memfd its content from offset 5; the eventfd 7; c1
 *   its queued bytes, then talks with c0 both ways; the directory is "."; the received
 *   r is r (same inode).
 * refuse: a timerfd in flight (ckpt refuses it at the dump).
 */
#include "wl.h"

#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <sys/wait.h>

static volatile sig_atomic_t got_usr2, got_usr1;
static void on_usr2(int sig)
{
    (void)sig;
    got_usr2 = 1;
}
static void on_usr1(int sig)
{
    (void)sig;
    got_usr1 = 1;
}

#define NMSG 5
static const char *msgs[NMSG] = {"m1", "m2-plain", "m3", "m4", "m5"};
static const int nfds[NMSG] = {2, 0, 3, 3, 1};

static char content[4096], memcontent[64];
static int type, s, r, keep, p_rd, c0;
static pid_t sender, child;

/* what the receiver reads: (bytes, number of files) per recvmsg */
#define MAXREAD 16
static char ref_data[MAXREAD][64];
static int ref_len[MAXREAD], ref_n[MAXREAD], nref;

static void send_msg(int sock, const char *data, const int *fds, int n)
{
    char ctl[CMSG_SPACE(sizeof(int) * 8)];
    struct iovec iov = {(void *)data, strlen(data)};
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1};
    if (n) {
        memset(ctl, 0, sizeof(ctl));
        mh.msg_control = ctl;
        mh.msg_controllen = CMSG_SPACE(sizeof(int) * n);
        struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int) * n);
        memcpy(CMSG_DATA(c), fds, sizeof(int) * n);
    }
    SETUP_CHECK(sendmsg(sock, &mh, 0) == (ssize_t)strlen(data), "sendmsg");
}

/* one recvmsg: its bytes, the files it carried (fds[], *n), its sender's credentials */
static ssize_t recv_msg(int sock, char *buf, size_t len, int *fds, int *n, struct ucred *cr)
{
    char ctl[CMSG_SPACE(sizeof(int) * 16) + CMSG_SPACE(sizeof(struct ucred))];
    struct iovec iov = {buf, len};
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl,
                        .msg_controllen = sizeof(ctl)};
    ssize_t got = recvmsg(sock, &mh, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
    *n = 0;
    if (cr)
        memset(cr, 0, sizeof(*cr));
    if (got < 0)
        return got;
    if (mh.msg_flags & MSG_CTRUNC)
        fail("recvmsg: control messages truncated");
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c)) {
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
            int k = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
            memcpy(fds + *n, CMSG_DATA(c), sizeof(int) * k);
            *n += k;
        } else if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_CREDENTIALS && cr) {
            memcpy(cr, CMSG_DATA(c), sizeof(*cr));
        }
    }
    return got;
}

static void pair(int t, int sv[2])
{
    SETUP_CHECK(socketpair(AF_UNIX, t, 0, sv) == 0, "socketpair");
    int one = 1;
    SETUP_CHECK(setsockopt(sv[1], SOL_SOCKET, SO_PASSCRED, &one, sizeof(one)) == 0,
                "SO_PASSCRED");
}

/* The same sends on a scratch pair (files: /dev/null), read back: what reads return. */
static void reference(void)
{
    int sv[2], null = open("/dev/null", O_RDONLY | O_CLOEXEC);
    SETUP_CHECK(null >= 0, "open /dev/null");
    pair(type, sv);
    int many[8] = {null, null, null, null, null, null, null, null};
    for (int i = 0; i < NMSG; i++)
        send_msg(sv[0], msgs[i], many, nfds[i]);
    for (;;) {
        int fds[32], n;
        char buf[256];
        ssize_t got = recv_msg(sv[1], buf, sizeof(buf), fds, &n, NULL);
        if (got < 0)
            break;
        SETUP_CHECK(nref < MAXREAD && got < 64, "reference read");
        memcpy(ref_data[nref], buf, (size_t)got);
        ref_len[nref] = (int)got;
        ref_n[nref++] = n;
        for (int k = 0; k < n; k++)
            close(fds[k]);
    }
    close(sv[0]);
    close(sv[1]);
    close(null);
}

static int read_is(int fd, const char *want, size_t len)
{
    char buf[256];
    ssize_t n = read(fd, buf, len);
    return n == (ssize_t)len && memcmp(buf, want, len) == 0;
}

/* the files, and the messages sent from `from` (the parent in child mode: after fork) */
static int f_only, p_wr, q_rd, mfd, efd, c1, dirfd_;

/* The sender's own fds of the files it sends: from now on they are only in flight. */
static void close_in_flight(void)
{
    close(f_only);
    close(p_wr);
    close(q_rd);
    close(mfd);
    close(efd);
    close(c1);
    close(dirfd_);
}

static void make_files(void)
{
    for (size_t i = 0; i < sizeof(content); i++)
        content[i] = (char)('A' + (i * 7 + i / 13) % 26);
    int w = open("data.txt", O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    SETUP_CHECK(w >= 0 && write(w, content, sizeof(content)) == (ssize_t)sizeof(content),
                "data.txt");
    close(w);
    keep = open("data.txt", O_RDONLY | O_CLOEXEC);
    SETUP_CHECK(keep >= 0 && lseek(keep, 100, SEEK_SET) == 100, "keep");
    f_only = open("data.txt", O_RDONLY | O_CLOEXEC);
    SETUP_CHECK(f_only >= 0 && lseek(f_only, 200, SEEK_SET) == 200, "f_only");
    int p[2], q[2];
    SETUP_CHECK(pipe2(p, O_CLOEXEC) == 0 && write(p[1], "pipe-bytes", 10) == 10, "pipe P");
    p_rd = p[0];
    p_wr = p[1];
    SETUP_CHECK(pipe2(q, O_CLOEXEC) == 0 && write(q[1], "q-data", 6) == 6, "pipe Q");
    q_rd = q[0];
    close(q[1]);
    for (size_t i = 0; i < sizeof(memcontent); i++)
        memcontent[i] = (char)('a' + i % 26);
    mfd = memfd_create("scmtest", MFD_CLOEXEC);
    SETUP_CHECK(mfd >= 0 && write(mfd, memcontent, sizeof(memcontent)) == 64 &&
                    lseek(mfd, 5, SEEK_SET) == 5, "memfd");
    efd = eventfd(7, EFD_CLOEXEC);
    SETUP_CHECK(efd >= 0, "eventfd");
    int c[2];
    SETUP_CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, c) == 0, "pair c");
    c0 = c[0];
    c1 = c[1];
    SETUP_CHECK(write(c0, "hello-c", 7) == 7, "c0 → c1");
    dirfd_ = open(".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    SETUP_CHECK(dirfd_ >= 0, "open .");
}

static void send_all(void)
{
    int m1[2] = {keep, f_only}, m3[3] = {p_wr, q_rd, mfd}, m4[3] = {efd, c1, dirfd_},
        m5[1] = {r};
    send_msg(s, msgs[0], m1, 2);
    send_msg(s, msgs[1], NULL, 0);
    send_msg(s, msgs[2], m3, 3);
    send_msg(s, msgs[3], m4, 3);
    send_msg(s, msgs[4], m5, 1);
    close_in_flight(); /* in flight only from now on */
}

static void verify(void)
{
    int got_fds[32], ng = 0;
    for (int i = 0; i < nref; i++) {
        char buf[256];
        int fds[32], n;
        struct ucred cr;
        ssize_t got = recv_msg(r, buf, sizeof(buf), fds, &n, &cr);
        if (got < 0) {
            fail("read %d: %s", i, strerror(errno));
            return;
        }
        CHECK(got == ref_len[i] && memcmp(buf, ref_data[i], (size_t)got) == 0 && n == ref_n[i],
              "read %d: %zd bytes '%.*s' and %d files, not '%.*s' and %d", i, got, (int)got,
              buf, n, ref_len[i], ref_data[i], ref_n[i]);
        CHECK(cr.pid == sender && cr.uid == getuid() && cr.gid == getgid(),
              "read %d: credentials pid %d uid %d, not %d %d", i, (int)cr.pid, (int)cr.uid,
              (int)sender, (int)getuid());
        for (int k = 0; k < n && ng < 32; k++)
            got_fds[ng++] = fds[k];
    }
    int fds[8], n;
    char extra[64];
    ssize_t more = recv_msg(r, extra, sizeof(extra), fds, &n, NULL);
    if (s < 0) /* its peer closed: EOF */
        CHECK(more == 0, "no EOF after the messages (%zd, errno %d)", more, errno);
    else
        CHECK(more < 0 && errno == EAGAIN, "more queued than before the dump");
    if (ng != 9) {
        fail("%d files received, not 9", ng);
        return;
    }
    /* m1: K's description (shared offset), then the file opened again at 200 */
    CHECK(read_is(got_fds[0], content + 100, 10), "file via K: not the bytes at 100");
    CHECK(lseek(keep, 0, SEEK_CUR) == 110, "K's offset %ld, not 110 (not shared)",
          (long)lseek(keep, 0, SEEK_CUR));
    CHECK(read_is(got_fds[1], content + 200, 10), "second file: not the bytes at 200");
    CHECK(lseek(keep, 0, SEEK_CUR) == 110, "K moved with the other description");
    /* m3: pipe P's write end, pipe Q's read end, the memfd */
    CHECK(write(got_fds[2], "+more", 5) == 5, "P's write end: %s", strerror(errno));
    CHECK(read_is(p_rd, "pipe-bytes+more", 15), "pipe P: not its bytes then ours");
    CHECK(read_is(got_fds[3], "q-data", 6), "pipe Q: not its bytes");
    char b[8];
    CHECK(read(got_fds[3], b, sizeof(b)) == 0, "pipe Q: no EOF after its bytes");
    char link[128] = "";
    char path[64];
    snprintf(path, sizeof(path), "/proc/self/fd/%d", got_fds[4]);
    CHECK(readlink(path, link, sizeof(link) - 1) > 0 && !strncmp(link, "/memfd:scmtest", 14),
          "memfd: %s", link);
    CHECK(read_is(got_fds[4], memcontent + 5, 59), "memfd: not its content from offset 5");
    /* m4: eventfd, c1, the directory */
    uint64_t v = 0;
    CHECK(read(got_fds[5], &v, 8) == 8 && v == 7, "eventfd: %llu", (unsigned long long)v);
    CHECK(read_is(got_fds[6], "hello-c", 7), "c1: not its queued bytes");
    CHECK(write(c0, "ping", 4) == 4 && read_is(got_fds[6], "ping", 4), "c0 → c1");
    CHECK(write(got_fds[6], "pong", 4) == 4 && read_is(c0, "pong", 4), "c1 → c0");
    struct stat a, d;
    CHECK(fstat(got_fds[7], &a) == 0 && stat(".", &d) == 0 && S_ISDIR(a.st_mode) &&
              a.st_ino == d.st_ino && a.st_dev == d.st_dev,
          "the directory is not .");
    /* m5: r itself */
    CHECK(fstat(got_fds[8], &a) == 0 && fstat(r, &d) == 0 && a.st_ino == d.st_ino,
          "the socket received is not r");
}

static void refuse_mode(void)
{
    int sv[2];
    pair(SOCK_DGRAM, sv);
    int t = timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC);
    SETUP_CHECK(t >= 0, "timerfd");
    send_msg(sv[0], "timer", &t, 1);
    close(t);
    s = sv[0];
    r = sv[1];
}

int main(int argc, char **argv)
{
    const char *kind = argc > 1 ? argv[1] : "stream";
    const char *where = argc > 2 ? argv[2] : "self";
    sigset_t old;
    catch_usr2_blocked(on_usr2, &old);
    if (!strcmp(kind, "refuse")) {
        refuse_mode();
        say("READY pid=%d child=0", (int)getpid());
        while (!got_usr2)
            sigsuspend(&old);
        finish("");
    }
    type = !strcmp(kind, "dgram") ? SOCK_DGRAM
           : !strcmp(kind, "seqpacket") ? SOCK_SEQPACKET
                                        : SOCK_STREAM;
    reference();
    int sv[2];
    pair(type, sv);
    s = sv[0];
    r = sv[1];
    make_files();
    sender = getpid();
    if (!strcmp(where, "child")) {
        sigset_t before;
        catch_blocked(SIGUSR1, on_usr1, &before);
        int sync[2];
        SETUP_CHECK(pipe2(sync, O_CLOEXEC) == 0, "pipe");
        child = fork();
        SETUP_CHECK(child >= 0, "fork");
        if (child == 0) { /* the receiver: keeps r, K, P's read end, c0 */
            close(sync[0]);
            close(s);
            close_in_flight();
            SETUP_CHECK(write(sync[1], "k", 1) == 1, "sync");
            close(sync[1]);
            sigset_t wait_mask = old;
            sigdelset(&wait_mask, SIGUSR1);
            while (!got_usr1)
                sigsuspend(&wait_mask);
            verify();
            if (wl_fails)
                say("CHILD FAIL pid=%d reason=%s", (int)getpid(), wl_fail_buf);
            _exit(wl_fails ? 1 : 0);
        }
        close(sync[1]);
        char k;
        SETUP_CHECK(read(sync[0], &k, 1) == 1, "sync"); /* the child closed its copies */
        close(sync[0]);
        send_all();
        close(r); /* the parent keeps s only */
        close(keep);
        close(p_rd);
        close(c0);
    } else {
        send_all();
        if (!strcmp(where, "closed")) {
            close(s);
            s = -1;
        }
    }
    say("READY pid=%d child=%d", (int)getpid(), (int)child);
    while (!got_usr2)
        sigsuspend(&old);
    if (child > 0) {
        int status = 0;
        CHECK(kill(child, SIGUSR1) == 0 && waitpid(child, &status, 0) == child &&
                  WIFEXITED(status) && WEXITSTATUS(status) == 0,
              "the child's checks failed (status %#x)", status);
    } else {
        verify();
    }
    char extra[64];
    snprintf(extra, sizeof(extra), "kind=%s where=%s", kind, where);
    finish(extra);
}
