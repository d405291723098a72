/* TCP connections in closing states (issue 14), checked from inside after a restore.
 *
 *   tcpclose pairs     both ends of four loopback connections in this process:
 *       P1  c1 FIN_WAIT2 / s1 CLOSE_WAIT   c1 sent D1 bytes and shut down its write
 *                                          side, s1 sent D2; nobody read
 *       P2  c2 FIN_WAIT1 / s2 ESTABLISHED  c2 filled its send queue (s2 reads nothing,
 *                                          its window is shut), then shut down: the
 *                                          FIN waits behind unsent data
 *       P3  c3 FIN_WAIT1 / s3 LAST_ACK     the test drops s3 -> c3 (nft): c3 sent D3
 *                                          and its FIN, s3 got them but its acks and
 *                                          its E3 bytes and FIN are dropped
 *       P4  c4 CLOSING   / s4 FIN_WAIT1    the test drops c4 -> s4: c4 sent D4 and its
 *                                          FIN (dropped), s4 sent E4 and its FIN, which
 *                                          c4 got before any ack of its own FIN
 *   tcpclose tree      the same, the c ends in a child process (both ends in the tree)
 *
 *   READY pid= port= (the listener)   CONNECTED pid= p3= p4= (the local ports of c3, c4:
 *   the test drops s3 -> c3 and c4 -> s4, then sends SIGUSR1)   CLOSED pid= when every
 *   connection is in its state. On SIGUSR2 (the test removed its rules) every end reads
 *   what the other sent, to the end (EOF), writes what it still may, and closes; a
 *   reset anywhere (ECONNRESET, SO_ERROR) fails.  VERIFY OK pid=  or  VERIFY FAIL pid= reason=
 *
 *   tcpclose ext       the test is the peer of five connections it opens to port=, in
 *                      order; ACCEPTED pid=; on SIGUSR1 (the test sent X1 and shut
 *                      down #1, sent X4 and shut down #4, drops our packets on #3 #4 #5):
 *       #2 send Y2 + shutdown -> FIN_WAIT2    #3 send Y3 + shutdown -> FIN_WAIT1
 *       #4 send Y4 + shutdown -> LAST_ACK     #5 send Y5 + shutdown -> FIN_WAIT1, then
 *       the test sends X5 and shuts down -> CLOSING;  #1 stays CLOSE_WAIT.   SHUT pid=
 *   On SIGUSR2 (the test read #2 and #3 to their end, sent Z2 and Z3 and shut them down):
 *   read X1, Z2, Z3, X4, X5 to EOF, send "r1" on #1, close all.  VERIFY ...
 *
 * Byte i of stream k is pat(k, i).
 */
#include "wl.h"

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/wait.h>

#define D1 3000
#define D2 5000
#define D3 2000
#define E3 1500
#define D4 2500
#define E4 1200
#define X1 4000
#define X4 700
#define X5 900
#define Y2 6000
#define Y3 3500
#define Y4 800
#define Y5 1100
#define Z2 2222
#define Z3 3333

static volatile sig_atomic_t got_usr1, got_usr2;
static void on_usr1(int sig)
{
    (void)sig;
    got_usr1 = 1;
}
static void on_usr2(int sig)
{
    (void)sig;
    got_usr2 = 1;
}


static int state_of(int fd)
{
    struct tcp_info ti;
    socklen_t len = sizeof(ti);
    if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &ti, &len) != 0)
        return -1;
    return ti.tcpi_state;
}

static const char *state_name(int st)
{
    static const char *names[] = {"?", "ESTABLISHED", "SYN_SENT", "SYN_RECV", "FIN_WAIT1",
                                  "FIN_WAIT2", "TIME_WAIT", "CLOSE", "CLOSE_WAIT", "LAST_ACK",
                                  "LISTEN", "CLOSING"};
    return st >= 0 && st <= 11 ? names[st] : "?";
}

static void wait_state(const char *name, int fd, int st)
{
    double end = mono_now() + 30;
    while (state_of(fd) != st && mono_now() < end)
        usleep(1000);
    if (state_of(fd) != st) {
        say("SETUP FAIL %s is %s, not %s", name, state_name(state_of(fd)), state_name(st));
        exit(2);
    }
}

static int listen_lo(int *port)
{
    int l = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    SETUP_CHECK(l >= 0, "socket");
    int one = 1;
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    SETUP_CHECK(bind(l, (struct sockaddr *)&a, sizeof(a)) == 0, "bind");
    SETUP_CHECK(listen(l, 16) == 0, "listen");
    socklen_t al = sizeof(a);
    SETUP_CHECK(getsockname(l, (struct sockaddr *)&a, &al) == 0, "getsockname");
    *port = ntohs(a.sin_port);
    return l;
}

static int local_port(int fd)
{
    struct sockaddr_in a;
    socklen_t al = sizeof(a);
    getsockname(fd, (struct sockaddr *)&a, &al);
    return ntohs(a.sin_port);
}

/* a connection to our own listener: *c the connecting end, *s the accepted one */
static void connect_pair(int l, int port, int sndbuf, int *c, int *s)
{
    *c = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    SETUP_CHECK(*c >= 0, "socket");
    if (sndbuf)
        setsockopt(*c, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof(sndbuf));
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    SETUP_CHECK(connect(*c, (struct sockaddr *)&a, sizeof(a)) == 0, "connect");
    *s = accept4(l, NULL, NULL, SOCK_CLOEXEC);
    SETUP_CHECK(*s >= 0, "accept");
}

static void put(int fd, int k, size_t n)
{
    unsigned char buf[8192];
    size_t off = 0;
    while (off < n) {
        size_t len = n - off < sizeof(buf) ? n - off : sizeof(buf);
        for (size_t j = 0; j < len; j++)
            buf[j] = pat(k, off + j);
        ssize_t w = send(fd, buf, len, MSG_NOSIGNAL);
        SETUP_CHECK(w > 0, "send");
        off += (size_t)w;
    }
}

/* send pattern k until the socket takes no more (the receiver reads nothing, so its
   window shuts and the rest stays unsent); the byte count */
static size_t fill_up(int fd, int k)
{
    unsigned char buf[4096];
    size_t off = 0;
    int full = 0;
    while (full < 5) {
        for (size_t j = 0; j < sizeof(buf); j++)
            buf[j] = pat(k, off + j);
        ssize_t w = send(fd, buf, sizeof(buf), MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w < 0 && errno == EAGAIN) {
            full++;
            usleep(20000);
            continue;
        }
        SETUP_CHECK(w > 0, "send (fill)");
        off += (size_t)w;
        full = 0;
    }
    return off;
}

/* Verification: read stream k from fd to its end; it must be exactly n bytes, then EOF. */
static void drain(const char *name, int fd, int k, size_t n)
{
    unsigned char buf[8192];
    size_t got = 0;
    double end = mono_now() + 60;
    for (;;) {
        struct pollfd p = {fd, POLLIN, 0};
        int r = poll(&p, 1, 200);
        if (r < 0 && errno == EINTR)
            continue;
        if (r == 0) {
            if (mono_now() > end) {
                fail("%s: no EOF after %zu of %zu bytes (state %s)", name, got, n,
                     state_name(state_of(fd)));
                return;
            }
            continue;
        }
        ssize_t m = recv(fd, buf, sizeof(buf), MSG_DONTWAIT);
        if (m < 0 && (errno == EAGAIN || errno == EINTR))
            continue;
        if (m < 0) {
            fail("%s: recv errno %d (%s) after %zu bytes", name, errno, strerror(errno), got);
            return;
        }
        if (m == 0)
            break;
        for (ssize_t j = 0; j < m; j++)
            if (got + (size_t)j >= n || buf[j] != pat(k, got + (size_t)j)) {
                fail("%s: byte %zu differs or is one too many (of %zu)", name, got + (size_t)j, n);
                return;
            }
        got += (size_t)m;
    }
    CHECK(got == n, "%s: %zu of %zu bytes before EOF", name, got, n);
    CHECK(recv(fd, buf, 1, MSG_DONTWAIT) == 0, "%s: EOF does not stay", name);
}

static void send_more(const char *name, int fd, int k, size_t n)
{
    unsigned char buf[4096];
    CHECK(n <= sizeof(buf), "%s: too long", name);
    for (size_t j = 0; j < n; j++)
        buf[j] = pat(k, j);
    CHECK(send(fd, buf, n, MSG_NOSIGNAL) == (ssize_t)n, "%s: send errno %d (%s)", name, errno,
          strerror(errno));
}

static void closed_write(const char *name, int fd)
{
    CHECK(send(fd, "x", 1, MSG_NOSIGNAL) < 0 && errno == EPIPE,
          "%s: the write side is open again (errno %d)", name, errno);
}

static void close_clean(const char *name, int fd)
{
    int err = 0;
    socklen_t len = sizeof(err);
    getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
    CHECK(err == 0, "%s: SO_ERROR %d (%s)", name, err, strerror(err));
    CHECK(close(fd) == 0, "%s: close", name);
}

/* ---- pairs ------------------------------------------------------------------------- */

static int c[5], s[5];
static size_t n2;

static void server_side(void)
{
    drain("s1", s[1], 1, D1);
    send_more("s1", s[1], 11, 1000); /* CLOSE_WAIT: the write side still works */
    close_clean("s1", s[1]);
    drain("s2", s[2], 2, n2);
    send_more("s2", s[2], 12, 500);
    close_clean("s2", s[2]);
    drain("s3", s[3], 3, D3);
    closed_write("s3", s[3]);
    close_clean("s3", s[3]);
    drain("s4", s[4], 4, D4);
    closed_write("s4", s[4]);
    close_clean("s4", s[4]);
}

static void client_side(void)
{
    /* c1 got D2 (pattern 21) then 1000 of pattern 11: read them as two streams */
    unsigned char buf[D2];
    size_t got = 0;
    double end = mono_now() + 60;
    while (got < D2 && mono_now() < end) {
        ssize_t m = recv(c[1], buf + got, D2 - got, 0);
        if (m <= 0) {
            fail("c1: recv %zd errno %d after %zu bytes", m, errno, got);
            break;
        }
        got += (size_t)m;
    }
    for (size_t j = 0; j < got; j++)
        if (buf[j] != pat(21, j)) {
            fail("c1: byte %zu of the queued stream differs", j);
            break;
        }
    drain("c1", c[1], 11, 1000);
    closed_write("c1", c[1]);
    close_clean("c1", c[1]);
    drain("c2", c[2], 12, 500);
    close_clean("c2", c[2]);
    drain("c3", c[3], 23, E3);
    closed_write("c3", c[3]);
    close_clean("c3", c[3]);
    drain("c4", c[4], 24, E4);
    closed_write("c4", c[4]);
    close_clean("c4", c[4]);
}

static void pairs(int tree, sigset_t *old)
{
    int port;
    int l = listen_lo(&port);
    say("READY pid=%d port=%d", (int)getpid(), port);
    for (int i = 1; i <= 4; i++)
        connect_pair(l, port, i == 2 ? 32768 : 0, &c[i], &s[i]);
    /* P1 */
    put(c[1], 1, D1);
    put(s[1], 21, D2);
    shutdown(c[1], SHUT_WR);
    wait_state("c1", c[1], TCP_FIN_WAIT2);
    wait_state("s1", s[1], TCP_CLOSE_WAIT);
    /* P2 */
    n2 = fill_up(c[2], 2);
    shutdown(c[2], SHUT_WR);
    wait_state("c2", c[2], TCP_FIN_WAIT1);
    /* P3, P4 once the test drops s3 -> c3 and c4 -> s4 */
    say("CONNECTED pid=%d p3=%d p4=%d", (int)getpid(), local_port(c[3]), local_port(c[4]));
    while (!got_usr1)
        sigsuspend(old);
    put(c[3], 3, D3);
    put(s[3], 23, E3);
    shutdown(c[3], SHUT_WR);
    wait_state("s3", s[3], TCP_CLOSE_WAIT);
    shutdown(s[3], SHUT_WR);
    wait_state("s3", s[3], TCP_LAST_ACK);
    wait_state("c3", c[3], TCP_FIN_WAIT1);
    put(c[4], 4, D4);
    put(s[4], 24, E4);
    shutdown(c[4], SHUT_WR);
    usleep(50000);
    shutdown(s[4], SHUT_WR);
    wait_state("c4", c[4], TCP_CLOSING);
    wait_state("s4", s[4], TCP_FIN_WAIT1);
    pid_t child = -1;
    if (tree) {
        child = fork();
        SETUP_CHECK(child >= 0, "fork");
        if (child == 0) {
            for (int i = 1; i <= 4; i++)
                close(s[i]);
            close(l);
            while (!got_usr2)
                sigsuspend(old);
            client_side();
            if (wl_fails)
                say("CHILD FAIL pid=%d reason=%s", (int)getpid(), wl_fail_buf);
            _exit(wl_fails ? 1 : 0);
        }
        for (int i = 1; i <= 4; i++)
            close(c[i]);
    }
    say("CLOSED pid=%d child=%d n2=%zu", (int)getpid(), (int)child, n2);
    while (!got_usr2)
        sigsuspend(old);
    if (tree)
        kill(child, SIGUSR2);
    server_side();
    if (tree) {
        int st;
        pid_t r;
        while ((r = waitpid(child, &st, 0)) < 0 && errno == EINTR)
            ;
        CHECK(r == child && WIFEXITED(st) && WEXITSTATUS(st) == 0, "the child failed (%d)", st);
    } else {
        client_side();
    }
    finish("");
}

/* ---- ext: the test is the peer --------------------------------------------------- */

static void ext(sigset_t *old)
{
    int port, e[6];
    int l = listen_lo(&port);
    say("READY pid=%d port=%d", (int)getpid(), port);
    for (int i = 1; i <= 5; i++) {
        e[i] = accept4(l, NULL, NULL, SOCK_CLOEXEC);
        SETUP_CHECK(e[i] >= 0, "accept");
    }
    say("ACCEPTED pid=%d", (int)getpid());
    while (!got_usr1)
        sigsuspend(old);
    put(e[2], 32, Y2);
    shutdown(e[2], SHUT_WR);
    put(e[3], 33, Y3);
    shutdown(e[3], SHUT_WR);
    wait_state("#4", e[4], TCP_CLOSE_WAIT);
    put(e[4], 34, Y4);
    shutdown(e[4], SHUT_WR);
    put(e[5], 35, Y5);
    shutdown(e[5], SHUT_WR);
    say("SHUT pid=%d", (int)getpid());
    while (!got_usr2)
        sigsuspend(old);
    drain("#1", e[1], 41, X1);
    send_more("#1", e[1], 51, 2);
    close_clean("#1", e[1]);
    drain("#2", e[2], 42, Z2);
    closed_write("#2", e[2]);
    close_clean("#2", e[2]);
    drain("#3", e[3], 43, Z3);
    close_clean("#3", e[3]);
    drain("#4", e[4], 44, X4);
    closed_write("#4", e[4]);
    close_clean("#4", e[4]);
    drain("#5", e[5], 45, X5);
    closed_write("#5", e[5]);
    close_clean("#5", e[5]);
    finish("");
}

int main(int argc, char **argv)
{
    const char *mode = argc > 1 ? argv[1] : "pairs";
    sigset_t old;
    catch_usr2_blocked(on_usr2, &old);
    catch_usr1_too(on_usr1, &old);
    if (!strcmp(mode, "pairs") || !strcmp(mode, "tree"))
        pairs(!strcmp(mode, "tree"), &old);
    else if (!strcmp(mode, "ext"))
        ext(&old);
    say("SETUP FAIL unknown mode %s", mode);
    return 2;
}
