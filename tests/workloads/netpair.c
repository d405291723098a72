/* netpair: a server process and a client child talking over one socket, numbered
 * records streaming both ways with the socket buffers full at any moment.
 *
 * usage: netpair unix|stream|seqpacket|dgram|tcp      or      netpair prefork
 *   unix        the parent listens on "srv.sock" (a path relative to the cwd), the
 *               child connects, the parent accepts and keeps the listener; the child
 *               also leaves a second connection waiting in the listener's queue
 *   stream, seqpacket, dgram
 *               a unix socketpair of that type: the parent keeps one end, the child
 *               the other
 *   tcp         the parent listens on 127.0.0.1 (ephemeral port), the child connects,
 *               the parent accepts: both ends of one loopback connection in the tree
 *   unixrev     the other way round: the child listens on "rev.sock" and accepts (and
 *               keeps the listener), the parent connects
 *
 * Both sides write records as fast as the socket takes them and read slowly, so
 * both directions are full. Stream records are 16 bytes (seq, mix64(seq ^ dir));
 * seqpacket/dgram records are messages of 16 + seq % 97 bytes (the length checks
 * that boundaries are kept), ended by an 8-byte END message; a stream ends with
 * shutdown(SHUT_WR). The receiver checks every record: in order, none missing,
 * none twice, and that it got exactly what the other side says it sent.
 *
 * READY pid= child= [port=]     on SIGUSR2 (parent): both sides send at least 3000
 * more records, end their stream, read the other's to the end; the child reports
 * through shared memory and exits; the parent checks it (unix: it also accepts the
 * waiting connection and reads the child's "late" bytes from it).
 * VERIFY OK pid= records= child_records=    or    VERIFY FAIL pid= reason=
 *
 * prefork: the parent listens on 127.0.0.1 (port=) and on "pre.sock", both
 * O_NONBLOCK, and forks two workers that poll the shared listeners and accept;
 * each answers one line "pid=<worker> n=<served>\n" per connection, then closes it.
 * READY pid= w1= w2= port=      on SIGUSR2 the workers exit; VERIFY OK pid= served=
 */
#include "wl.h"

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>

#define EXTRA 3000
#define END_MARK 0xffffffffffffffffULL

struct shared {
    volatile int stop;
    volatile int progress[2]; /* records received so far, per side */
    volatile uint64_t sent[2];  /* final count, per sending side (valid once done) */
    volatile int sent_done[2];
    volatile uint64_t got[2];
    volatile int bad[2];
    volatile int served[2];
    char why[2][256];
};

static struct shared *sh;
static volatile sig_atomic_t got_usr2;
static int msg_mode; /* 1: seqpacket/dgram records are messages */
static char ready_line[128]; /* the parent prints it once both sides made progress */

static void on_usr2(int sig)
{
    (void)sig;
    got_usr2 = 1;
}

static void bad(int me, const char *fmt, unsigned long long a, unsigned long long b)
{
    if (!sh->bad[me])
        snprintf(sh->why[me], sizeof(sh->why[me]), fmt, a, b);
    sh->bad[me] = 1;
}

static size_t msg_len(uint64_t seq) { return 16 + (size_t)(seq % 97); }

static size_t make_record(unsigned char *buf, uint64_t seq, int dir)
{
    uint64_t chk = mix64(seq ^ ((uint64_t)dir << 56));
    memcpy(buf, &seq, 8);
    memcpy(buf + 8, &chk, 8);
    if (!msg_mode)
        return 16;
    size_t n = msg_len(seq);
    for (size_t i = 16; i < n; i++)
        buf[i] = (unsigned char)(seq + i);
    return n;
}

static int check_record(int me, const unsigned char *buf, size_t n, uint64_t want, int dir)
{
    unsigned char ref[128];
    size_t rn = make_record(ref, want, dir);
    if (n != rn || memcmp(buf, ref, rn) != 0) {
        uint64_t seq;
        memcpy(&seq, buf, 8);
        bad(me, "record_%llu_got_seq_%llu", (unsigned long long)want, (unsigned long long)seq);
        return 0;
    }
    return 1;
}

static void set_nonblock(int fd)
{
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
}

/* Both directions over fd until both are finished. me: 0 parent, 1 child. */
static uint64_t pump(int fd, int me)
{
    int out_dir = me, in_dir = 1 - me;
    uint64_t next_out = 0, next_in = 0, stop_at = 0;
    unsigned char obuf[128], rbuf[65536];
    size_t olen = 0, ooff = 0, rlen = 0;
    int out_done = 0, in_done = 0, stopping = 0;
    set_nonblock(fd);
    while (!(out_done && in_done)) {
        if (me == 0 && got_usr2)
            sh->stop = 1;
        if (sh->stop && !stopping) {
            stopping = 1;
            stop_at = next_out + EXTRA;
        }
        /* write until the socket is full */
        for (int k = 0; !out_done && k < 256; k++) {
            if (ooff == olen) {
                if (stopping && next_out >= stop_at) {
                    sh->sent[out_dir] = next_out;
                    sh->sent_done[out_dir] = 1;
                    if (msg_mode) {
                        uint64_t end = END_MARK;
                        if (send(fd, &end, 8, MSG_NOSIGNAL) != 8)
                            break; /* full: try again next round */
                    } else {
                        shutdown(fd, SHUT_WR);
                    }
                    out_done = 1;
                    break;
                }
                olen = make_record(obuf, next_out, out_dir);
                ooff = 0;
            }
            ssize_t w = send(fd, obuf + ooff, olen - ooff, MSG_NOSIGNAL);
            if (w < 0 && errno == EINTR)
                continue;
            if (w < 0 && errno == EAGAIN)
                break;
            if (w <= 0) {
                bad(me, "send_failed_errno_%llu_at_%llu", (unsigned long long)errno,
                    (unsigned long long)next_out);
                return next_in;
            }
            ooff += (size_t)w;
            if (ooff == olen)
                next_out++;
        }
        /* read slowly until told to stop, then as fast as possible */
        int budget = stopping ? 1 << 30 : 16;
        while (!in_done && budget > 0) {
            if (msg_mode) {
                ssize_t r = recv(fd, rbuf, sizeof(rbuf), 0);
                if (r < 0 && errno == EINTR)
                    continue;
                if (r < 0 && errno == EAGAIN)
                    break;
                if (r == 8) {
                    uint64_t v;
                    memcpy(&v, rbuf, 8);
                    if (v == END_MARK) {
                        in_done = 1;
                        break;
                    }
                }
                if (r <= 0) {
                    bad(me, "recv_%llu_errno_%llu", (unsigned long long)r,
                        (unsigned long long)errno);
                    return next_in;
                }
                if (!check_record(me, rbuf, (size_t)r, next_in, in_dir))
                    return next_in;
                next_in++;
                budget--;
                continue;
            }
            size_t want = budget < 4096 ? 16 * (size_t)budget : sizeof(rbuf) - rlen;
            if (want > sizeof(rbuf) - rlen)
                want = sizeof(rbuf) - rlen;
            ssize_t r = recv(fd, rbuf + rlen, want, 0);
            if (r < 0 && errno == EINTR)
                continue;
            if (r < 0 && errno == EAGAIN)
                break;
            if (r < 0) {
                bad(me, "recv_errno_%llu_at_%llu", (unsigned long long)errno,
                    (unsigned long long)next_in);
                return next_in;
            }
            if (r == 0) {
                if (rlen)
                    bad(me, "torn_record_%llu_bytes_at_%llu", (unsigned long long)rlen,
                        (unsigned long long)next_in);
                in_done = 1;
                break;
            }
            rlen += (size_t)r;
            size_t off = 0;
            while (rlen - off >= 16) {
                if (!check_record(me, rbuf + off, 16, next_in, in_dir))
                    return next_in;
                next_in++;
                budget--;
                off += 16;
            }
            memmove(rbuf, rbuf + off, rlen - off);
            rlen -= off;
        }
        sh->progress[me] = next_in > 0x7fffffff ? 0x7fffffff : (int)next_in;
        if (me == 0 && ready_line[0] && sh->progress[0] >= 2000 && sh->progress[1] >= 2000) {
            say("%s", ready_line);
            ready_line[0] = 0;
        }
        if (!stopping) {
            struct timespec d = {0, 1000000};
            nanosleep(&d, NULL);
        } else if (!(out_done && in_done)) {
            struct pollfd p = {fd, (short)(POLLIN | (out_done ? 0 : POLLOUT)), 0};
            poll(&p, 1, 100);
        }
    }
    /* the other side's count is final once its END went out */
    double end = mono_now() + 60;
    while (!sh->sent_done[in_dir] && mono_now() < end)
        usleep(1000);
    if (next_in != sh->sent[in_dir])
        bad(me, "received_%llu_of_%llu", (unsigned long long)next_in,
            (unsigned long long)sh->sent[in_dir]);
    return next_in;
}

static int wait_readable(int fd, int ms)
{
    struct pollfd p = {fd, POLLIN, 0};
    int r;
    do
        r = poll(&p, 1, ms);
    while (r < 0 && errno == EINTR);
    return r == 1;
}

/* ---------------------------------------------------------------- prefork */

static void worker(int me, int tl, int ul)
{
    char line[128];
    while (!sh->stop) {
        struct pollfd p[2] = {{tl, POLLIN, 0}, {ul, POLLIN, 0}};
        if (poll(p, 2, 50) <= 0)
            continue;
        for (int i = 0; i < 2; i++) {
            if (!(p[i].revents & POLLIN))
                continue;
            int c = accept4(p[i].fd, NULL, NULL, SOCK_CLOEXEC);
            if (c < 0)
                continue; /* another worker took it */
            sh->served[me]++;
            if (wait_readable(c, 10000)) {
                char req[64];
                ssize_t r = recv(c, req, sizeof(req), 0);
                (void)r;
            }
            int n = snprintf(line, sizeof(line), "pid=%d n=%d\n", (int)getpid(), sh->served[me]);
            ssize_t w = send(c, line, (size_t)n, MSG_NOSIGNAL);
            (void)w;
            close(c);
        }
    }
    _exit(0);
}

static void prefork(sigset_t *old)
{
    int tl = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    SETUP_CHECK(tl >= 0, "socket");
    int one = 1;
    setsockopt(tl, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    SETUP_CHECK(bind(tl, (struct sockaddr *)&a, sizeof(a)) == 0, "bind");
    SETUP_CHECK(listen(tl, 64) == 0, "listen");
    socklen_t al = sizeof(a);
    SETUP_CHECK(getsockname(tl, (struct sockaddr *)&a, &al) == 0, "getsockname");
    int ul = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    SETUP_CHECK(ul >= 0, "socket");
    struct sockaddr_un u = {.sun_family = AF_UNIX};
    strcpy(u.sun_path, "pre.sock");
    SETUP_CHECK(bind(ul, (struct sockaddr *)&u, sizeof(u)) == 0, "bind unix");
    SETUP_CHECK(listen(ul, 64) == 0, "listen unix");
    pid_t w[2];
    for (int i = 0; i < 2; i++) {
        w[i] = fork();
        SETUP_CHECK(w[i] >= 0, "fork");
        if (w[i] == 0) {
            sigprocmask(SIG_SETMASK, old, NULL);
            worker(i, tl, ul);
        }
    }
    say("READY pid=%d w1=%d w2=%d port=%d", (int)getpid(), (int)w[0], (int)w[1],
        (int)ntohs(a.sin_port));
    while (!got_usr2)
        sigsuspend(old);
    sh->stop = 1;
    for (int i = 0; i < 2; i++) {
        int st;
        CHECK(waitpid(w[i], &st, 0) == w[i] && WIFEXITED(st) && WEXITSTATUS(st) == 0,
              "worker_%d", i);
    }
    char extra[64];
    snprintf(extra, sizeof(extra), "served=%d", sh->served[0] + sh->served[1]);
    finish(extra);
}

/* ---------------------------------------------------------------- the pair */

int main(int argc, char **argv)
{
    const char *mode = argc > 1 ? argv[1] : "stream";
    sigset_t old;
    catch_usr2_blocked(on_usr2, &old);
    sh = mmap(NULL, sizeof(*sh), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    SETUP_CHECK(sh != MAP_FAILED, "mmap");
    memset(sh, 0, sizeof(*sh)); /* fault the page in here too */
    if (!strcmp(mode, "prefork"))
        prefork(&old);

    int mine = -1, theirs = -1, listener = -1, port = 0;
    struct sockaddr_un u = {.sun_family = AF_UNIX};
    struct sockaddr_in in = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (!strcmp(mode, "stream") || !strcmp(mode, "seqpacket") || !strcmp(mode, "dgram")) {
        int type = !strcmp(mode, "stream") ? SOCK_STREAM
                   : !strcmp(mode, "dgram") ? SOCK_DGRAM
                                            : SOCK_SEQPACKET;
        msg_mode = type != SOCK_STREAM;
        int sv[2];
        SETUP_CHECK(socketpair(AF_UNIX, type | SOCK_CLOEXEC, 0, sv) == 0, "socketpair");
        mine = sv[0];
        theirs = sv[1];
    } else if (!strcmp(mode, "unix")) {
        listener = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        strcpy(u.sun_path, "srv.sock");
        SETUP_CHECK(bind(listener, (struct sockaddr *)&u, sizeof(u)) == 0, "bind");
        SETUP_CHECK(listen(listener, 8) == 0, "listen");
    } else if (!strcmp(mode, "tcp")) {
        listener = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        SETUP_CHECK(bind(listener, (struct sockaddr *)&in, sizeof(in)) == 0, "bind");
        SETUP_CHECK(listen(listener, 8) == 0, "listen");
        socklen_t al = sizeof(in);
        SETUP_CHECK(getsockname(listener, (struct sockaddr *)&in, &al) == 0, "getsockname");
        port = ntohs(in.sin_port);
    } else if (strcmp(mode, "unixrev")) {
        SETUP_CHECK(0, "unknown mode");
    }
    int rev = !strcmp(mode, "unixrev");
    strcpy(u.sun_path, rev ? "rev.sock" : "srv.sock");

    pid_t child = fork();
    SETUP_CHECK(child >= 0, "fork");
    if (child == 0) {
        sigprocmask(SIG_SETMASK, &old, NULL);
        int fd = theirs, waiting = -1;
        if (mine >= 0)
            close(mine);
        if (rev) {
            int l = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
            if (l < 0 || bind(l, (struct sockaddr *)&u, sizeof(u)) != 0 || listen(l, 8) != 0)
                _exit(22);
            fd = accept4(l, NULL, NULL, SOCK_CLOEXEC);
            if (fd < 0)
                _exit(23);
        }
        if (listener >= 0) {
            close(listener);
            int fam = port ? AF_INET : AF_UNIX;
            fd = socket(fam, SOCK_STREAM | SOCK_CLOEXEC, 0);
            struct sockaddr *sa = port ? (struct sockaddr *)&in : (struct sockaddr *)&u;
            socklen_t sl = port ? sizeof(in) : sizeof(u);
            if (fd < 0 || connect(fd, sa, sl) != 0)
                _exit(20);
            if (!port) { /* a second connection the server leaves in its accept queue */
                waiting = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
                if (waiting < 0 || connect(waiting, sa, sl) != 0)
                    _exit(21);
            }
        }
        sh->got[1] = pump(fd, 1);
        if (waiting >= 0 && send(waiting, "late", 4, MSG_NOSIGNAL) != 4)
            bad(1, "late_send_errno_%llu%llu", (unsigned long long)errno, 0);
        _exit(sh->bad[1] ? 1 : 0);
    }
    int fd = mine;
    if (theirs >= 0)
        close(theirs);
    if (listener >= 0) {
        fd = accept4(listener, NULL, NULL, SOCK_CLOEXEC);
        SETUP_CHECK(fd >= 0, "accept");
    }
    if (rev) { /* connect once the child listens */
        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        double end = mono_now() + 30;
        while (connect(fd, (struct sockaddr *)&u, sizeof(u)) != 0 && mono_now() < end)
            usleep(1000);
        SETUP_CHECK(mono_now() < end, "connect to the child");
    }
    /* pump() says READY once both directions have moved 2000 records */
    if (port)
        snprintf(ready_line, sizeof(ready_line), "READY pid=%d child=%d port=%d", (int)getpid(),
                 (int)child, port);
    else
        snprintf(ready_line, sizeof(ready_line), "READY pid=%d child=%d", (int)getpid(),
                 (int)child);
    sigprocmask(SIG_SETMASK, &old, NULL);
    uint64_t got = pump(fd, 0);
    if (sh->bad[0])
        fail("parent: %s", sh->why[0]);
    if (listener >= 0 && !port) {
        set_nonblock(listener);
        CHECK(wait_readable(listener, 60000), "no_waiting_connection");
        int late = accept4(listener, NULL, NULL, SOCK_CLOEXEC);
        CHECK(late >= 0, "accept_waiting_errno_%d", errno);
        if (late >= 0) {
            char buf[8] = {0};
            CHECK(wait_readable(late, 60000), "late_bytes_missing");
            CHECK(recv(late, buf, sizeof(buf), 0) == 4 && !memcmp(buf, "late", 4),
                  "late_bytes_%s", buf);
        }
    }
    int st;
    pid_t r;
    while ((r = waitpid(child, &st, 0)) < 0 && errno == EINTR)
        ;
    CHECK(r == child && WIFEXITED(st) && WEXITSTATUS(st) == 0, "child_status_%d: %s", st,
          sh->why[1]);
    while (waitpid(-1, NULL, WNOHANG) > 0)
        ;
    char extra[96];
    snprintf(extra, sizeof(extra), "records=%llu child_records=%llu", (unsigned long long)got,
             (unsigned long long)sh->got[1]);
    finish(extra);
}
