/* tcpstate: what a process observes of TCP sockets that are closed, shut down for
 * reading, or plain connections (their MSS), checked by itself after the restore.
 *
 * usage: tcpstate closed | shut | mss | ext PORT | timeout
 *
 * closed: sockets in state CLOSE after a connection (kernel/tcp_closed.py), each
 *   recorded at setup (names, state, poll mask, SIOCINQ, TCP_MAXSEG, tcpi_snd_mss,
 *   buffer sizes) and compared after the restore, then probed the way a program
 *   would find out (each probe is destructive, so each socket gets its own):
 *   #1 a client whose peer reset it, error unread: recv ECONNRESET then 0, SO_ERROR 0,
 *      connect EISCONN, listen EINVAL, send EPIPE, its old port free for another
 *      socket, bind() on it allowed again;
 *   #2 an accepted socket reset with 300 unread bytes: the bytes, ECONNRESET, 0 (its
 *      port, its listener's, is released: the listener holds it);
 *   #3 a client bound to a port explicitly, reset, error already read: recv 0,
 *      SO_ERROR 0, its port still its own (another bind: EADDRINUSE; its own: EINVAL);
 *   #4 a client whose peer sent 5 bytes, its FIN, then a reset: the bytes, 0, 0,
 *      SO_ERROR EPIPE;
 *   #5 a non-blocking connect refused, error unread: connect() again gives
 *      ECONNREFUSED and makes it reusable (a second connect to the live listener works);
 *   #6 both FINs exchanged (this end's TIME_WAIT went to a timewait socket): recv 0;
 *   #7 reset, then connect(AF_UNSPEC) (error still pending): getsockname as it was,
 *      SO_ERROR ECONNRESET, then it connects to the listener again;
 *   #8 accepted by a listener on a port below the ephemeral range (a server's: one
 *      connect() never gives), 10 unread bytes, reset: the bytes, ECONNRESET, 0; the
 *      port released (bind() on it allowed), the listener still holds it.
 * shut: connections with shutdown(SHUT_RD): a plain one (recv 0 at once, data sent to
 *   it afterwards still arrives, the other way works), one also shut for writing
 *   (FIN_WAIT2: data arriving resets the connection: the peer ends CLOSE with EPIPE),
 *   an unbound and a bound socket shut down (ENOTCONN, bits set: POLLRDHUP).
 * mss: a loopback connection after traffic: TCP_MAXSEG and tcpi_snd_mss of both ends
 *   are the same after the restore, and data still flows.
 * ext PORT: one connection to the test's listener (the test is the outside peer,
 *   --tcp-established): its TCP_MAXSEG and tcpi_snd_mss are the same after the restore.
 * timeout: a connection whose peer's segments the test drops (nft) times out
 *   (TCP_USER_TIMEOUT): state CLOSE with ETIMEDOUT pending; the dump refuses it.
 *   Lines: READY pid= cport= sport=, then (on SIGUSR1) TIMEDOUT pid=.
 *
 * READY pid= ...; on SIGUSR2: VERIFY OK pid=  or  VERIFY FAIL pid= reason=
 */
#include "wl.h"

#include <arpa/inet.h>
#include <netinet/tcp.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/socket.h>

#ifndef SIOCINQ
#define SIOCINQ 0x541B
#endif

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

static struct sockaddr_in lo(int port)
{
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    return a;
}

static int listen_lo(int *port)
{
    int l = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    SETUP_CHECK(l >= 0, "socket");
    int one = 1;
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    struct sockaddr_in a = lo(0);
    SETUP_CHECK(bind(l, (struct sockaddr *)&a, sizeof(a)) == 0, "bind");
    SETUP_CHECK(listen(l, 16) == 0, "listen");
    socklen_t al = sizeof(a);
    SETUP_CHECK(getsockname(l, (struct sockaddr *)&a, &al) == 0, "getsockname");
    *port = ntohs(a.sin_port);
    return l;
}

static int port_of(int s)
{
    struct sockaddr_in a;
    socklen_t al = sizeof(a);
    if (getsockname(s, (struct sockaddr *)&a, &al))
        return -1;
    return ntohs(a.sin_port);
}

static int connect_lo(int s, int port)
{
    struct sockaddr_in a = lo(port);
    return connect(s, (struct sockaddr *)&a, sizeof(a));
}

static struct tcp_info info_of(int s)
{
    struct tcp_info ti;
    memset(&ti, 0, sizeof(ti));
    socklen_t l = sizeof(ti);
    getsockopt(s, IPPROTO_TCP, TCP_INFO, &ti, &l);
    return ti;
}

static int get_int(int s, int level, int opt)
{
    int v = -1;
    socklen_t l = sizeof(v);
    if (getsockopt(s, level, opt, &v, &l))
        return -errno;
    return v;
}

static void wait_state(const char *name, int s, int st)
{
    double end = mono_now() + 20;
    while (info_of(s).tcpi_state != st && mono_now() < end)
        usleep(1000);
    if (info_of(s).tcpi_state != st) {
        say("SETUP FAIL %s is in state %d, not %d", name, info_of(s).tcpi_state, st);
        exit(2);
    }
}

static int accept_one(int l)
{
    int a = accept4(l, NULL, NULL, SOCK_CLOEXEC);
    SETUP_CHECK(a >= 0, "accept");
    return a;
}

static void reset_close(int s)
{
    struct linger lg = {1, 0};
    setsockopt(s, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
    close(s);
}

/* what a socket shows without being changed: recorded at setup, compared after restore */
struct view {
    char name[64];
    struct sockaddr_storage local;
    socklen_t local_len;
    int peer_err;
    int state, revents, inq, maxseg, snd_mss, sndbuf, rcvbuf;
};

static void look(int s, struct view *v)
{
    char name[sizeof(v->name)];
    memcpy(name, v->name, sizeof(name));
    memset(v, 0, sizeof(*v));
    memcpy(v->name, name, sizeof(name));
    v->local_len = sizeof(v->local);
    getsockname(s, (struct sockaddr *)&v->local, &v->local_len);
    struct sockaddr_storage p;
    socklen_t pl = sizeof(p);
    v->peer_err = getpeername(s, (struct sockaddr *)&p, &pl) ? errno : 0;
    struct tcp_info ti = info_of(s);
    v->state = ti.tcpi_state;
    v->snd_mss = (int)ti.tcpi_snd_mss;
    struct pollfd pf = {s, POLLIN | POLLOUT | POLLRDHUP | POLLPRI, 0};
    poll(&pf, 1, 0);
    v->revents = pf.revents;
    v->inq = -1;
    ioctl(s, SIOCINQ, &v->inq);
    v->maxseg = get_int(s, IPPROTO_TCP, TCP_MAXSEG);
    v->sndbuf = get_int(s, SOL_SOCKET, SO_SNDBUF);
    v->rcvbuf = get_int(s, SOL_SOCKET, SO_RCVBUF);
}

static void same(const char *name, int s, const struct view *was)
{
    struct view now;
    look(s, &now);
    CHECK(now.local_len == was->local_len && !memcmp(&now.local, &was->local, was->local_len),
          "%s: getsockname changed (port %d, was %d)", name,
          ntohs(((struct sockaddr_in *)&now.local)->sin_port),
          ntohs(((struct sockaddr_in *)&was->local)->sin_port));
    CHECK(now.peer_err == was->peer_err, "%s: getpeername errno %d, was %d", name, now.peer_err,
          was->peer_err);
    CHECK(now.state == was->state, "%s: state %d, was %d", name, now.state, was->state);
    CHECK(now.revents == was->revents, "%s: poll 0x%x, was 0x%x", name, now.revents,
          was->revents);
    CHECK(now.inq == was->inq, "%s: SIOCINQ %d, was %d", name, now.inq, was->inq);
    if (was->state != TCP_CLOSE)
        return; /* a connection's MSS moves with the next window it sees (mss mode checks
                   it where the windows are settled), its buffers autotune (not kept) */
    CHECK(now.maxseg == was->maxseg, "%s: TCP_MAXSEG %d, was %d", name, now.maxseg, was->maxseg);
    CHECK(now.snd_mss == was->snd_mss, "%s: tcpi_snd_mss %d, was %d", name, now.snd_mss,
          was->snd_mss);
    CHECK(now.sndbuf == was->sndbuf, "%s: SO_SNDBUF %d, was %d", name, now.sndbuf, was->sndbuf);
    CHECK(now.rcvbuf == was->rcvbuf, "%s: SO_RCVBUF %d, was %d", name, now.rcvbuf, was->rcvbuf);
}

/* recv once without blocking: the byte count, or -errno */
static ssize_t recv_now(int s, char *buf, size_t n)
{
    ssize_t r = recv(s, buf, n, MSG_DONTWAIT);
    return r < 0 ? -errno : r;
}

static int other_bind(int port)
{
    int t = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in a = lo(port);
    int r = bind(t, (struct sockaddr *)&a, sizeof(a)) ? errno : 0;
    close(t);
    return r;
}

/* ---- closed ------------------------------------------------------------------------ */

#define NC 9
static int cs[NC];
static struct view cv[NC];
static int c_port, c_listener, c3_port, c8_port;

static void closed_setup(void)
{
    int l = c_listener = listen_lo(&c_port);
    /* #1 client reset by its peer, error unread */
    cs[1] = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    SETUP_CHECK(connect_lo(cs[1], c_port) == 0, "connect #1");
    int p = accept_one(l);
    char big[200000];
    memset(big, 'q', sizeof(big));
    for (int i = 0; i < 20; i++) { /* traffic: a grown window, a grown MSS */
        SETUP_CHECK(send(cs[1], big, sizeof(big), 0) == (ssize_t)sizeof(big), "send #1");
        size_t got = 0;
        while (got < sizeof(big)) {
            ssize_t r = recv(p, big, sizeof(big) - got, 0);
            SETUP_CHECK(r > 0, "recv #1");
            got += (size_t)r;
        }
    }
    usleep(20000);
    reset_close(p);
    wait_state("#1", cs[1], TCP_CLOSE);
    /* #2 accepted, 300 unread bytes, reset by the client */
    int c = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    SETUP_CHECK(connect_lo(c, c_port) == 0, "connect #2");
    cs[2] = accept_one(l);
    for (int i = 0; i < 300; i++)
        big[i] = (char)(i * 7);
    SETUP_CHECK(send(c, big, 300, 0) == 300, "send #2");
    double end = mono_now() + 10;
    while (get_int(cs[2], SOL_SOCKET, SO_RCVBUF) > 0 && mono_now() < end) {
        int n = 0;
        ioctl(cs[2], SIOCINQ, &n);
        if (n == 300)
            break;
        usleep(1000);
    }
    reset_close(c);
    wait_state("#2", cs[2], TCP_CLOSE);
    /* #3 bound explicitly to its port (bind() to port 0 locks none), reset, error read */
    int t = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in b = lo(0);
    SETUP_CHECK(bind(t, (struct sockaddr *)&b, sizeof(b)) == 0, "bind a free port");
    c3_port = port_of(t);
    close(t);
    cs[3] = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    b = lo(c3_port);
    SETUP_CHECK(bind(cs[3], (struct sockaddr *)&b, sizeof(b)) == 0, "bind #3");
    SETUP_CHECK(connect_lo(cs[3], c_port) == 0, "connect #3");
    p = accept_one(l);
    reset_close(p);
    wait_state("#3", cs[3], TCP_CLOSE);
    SETUP_CHECK(get_int(cs[3], SOL_SOCKET, SO_ERROR) == ECONNRESET, "#3 ECONNRESET");
    /* #4 5 bytes, FIN, then reset: EPIPE */
    cs[4] = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    SETUP_CHECK(connect_lo(cs[4], c_port) == 0, "connect #4");
    p = accept_one(l);
    SETUP_CHECK(send(p, "hello", 5, 0) == 5, "send #4");
    shutdown(p, SHUT_WR);
    wait_state("#4 (CLOSE_WAIT)", cs[4], TCP_CLOSE_WAIT);
    reset_close(p);
    wait_state("#4", cs[4], TCP_CLOSE);
    /* #5 non-blocking connect refused (a port bound, not listening) */
    int hold = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    b = lo(0);
    SETUP_CHECK(bind(hold, (struct sockaddr *)&b, sizeof(b)) == 0, "bind hold");
    cs[5] = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    SETUP_CHECK(connect_lo(cs[5], port_of(hold)) < 0 && errno == EINPROGRESS, "connect #5");
    wait_state("#5", cs[5], TCP_CLOSE);
    close(hold);
    /* #6 both FINs: this end shuts down first, the peer closes (this end: TIME_WAIT) */
    cs[6] = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    SETUP_CHECK(connect_lo(cs[6], c_port) == 0, "connect #6");
    p = accept_one(l);
    shutdown(cs[6], SHUT_WR);
    wait_state("#6 (FIN_WAIT2)", cs[6], TCP_FIN_WAIT2);
    close(p);
    wait_state("#6", cs[6], TCP_CLOSE);
    /* #7 reset, then connect(AF_UNSPEC); its error stays */
    cs[7] = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    SETUP_CHECK(connect_lo(cs[7], c_port) == 0, "connect #7");
    p = accept_one(l);
    reset_close(p);
    wait_state("#7", cs[7], TCP_CLOSE);
    struct sockaddr unspec = {.sa_family = AF_UNSPEC};
    SETUP_CHECK(connect(cs[7], &unspec, sizeof(unspec)) == 0, "AF_UNSPEC #7");
    /* #8 accepted through a listener on a port below the ephemeral range */
    int l8 = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(l8, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    for (c8_port = 20000 + getpid() % 5000; c8_port < 30000; c8_port++) {
        b = lo(c8_port);
        if (bind(l8, (struct sockaddr *)&b, sizeof(b)) == 0)
            break;
    }
    SETUP_CHECK(c8_port < 30000 && listen(l8, 4) == 0, "listen #8");
    c = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    SETUP_CHECK(connect_lo(c, c8_port) == 0, "connect #8");
    cs[8] = accept_one(l8);
    SETUP_CHECK(send(c, "0123456789", 10, 0) == 10, "send #8");
    end = mono_now() + 10;
    for (int n = 0; n < 10 && mono_now() < end; usleep(1000))
        ioctl(cs[8], SIOCINQ, &n);
    reset_close(c);
    wait_state("#8", cs[8], TCP_CLOSE);
    for (int i = 1; i < NC; i++) {
        snprintf(cv[i].name, sizeof(cv[i].name), "#%d", i);
        look(cs[i], &cv[i]);
    }
    say("READY pid=%d listener=%d p1=%d p3=%d p7=%d mss1=%d", (int)getpid(), c_port,
        port_of(cs[1]), c3_port, port_of(cs[7]), cv[1].maxseg);
}

static void closed_verify(void)
{
    char buf[512];
    for (int i = 1; i < NC; i++)
        same(cv[i].name, cs[i], &cv[i]);
    /* #1 */
    int p1 = port_of(cs[1]);
    CHECK(other_bind(p1) == 0, "#1: its old port %d is not free (%s)", p1, strerror(other_bind(p1)));
    ssize_t r = recv_now(cs[1], buf, sizeof(buf));
    CHECK(r == -ECONNRESET, "#1: first recv %zd, not ECONNRESET", r);
    r = recv_now(cs[1], buf, sizeof(buf));
    CHECK(r == 0, "#1: second recv %zd, not 0", r);
    CHECK(get_int(cs[1], SOL_SOCKET, SO_ERROR) == 0, "#1: SO_ERROR after recv");
    CHECK(connect_lo(cs[1], c_port) < 0 && errno == EISCONN, "#1: connect gives %s",
          strerror(errno));
    CHECK(listen(cs[1], 1) < 0 && errno == EINVAL, "#1: listen gives %s", strerror(errno));
    CHECK(send(cs[1], "x", 1, MSG_NOSIGNAL) < 0 && errno == EPIPE, "#1: send gives %s",
          strerror(errno));
    struct sockaddr_in any = lo(0);
    CHECK(bind(cs[1], (struct sockaddr *)&any, sizeof(any)) == 0, "#1: bind again: %s",
          strerror(errno));
    /* #2 */
    r = recv_now(cs[2], buf, sizeof(buf));
    CHECK(r == 300, "#2: recv %zd, not the 300 unread bytes", r);
    for (int i = 0; r == 300 && i < 300; i++)
        if (buf[i] != (char)(i * 7)) {
            fail("#2: byte %d differs", i);
            break;
        }
    r = recv_now(cs[2], buf, sizeof(buf));
    CHECK(r == -ECONNRESET, "#2: recv after the data %zd, not ECONNRESET", r);
    r = recv_now(cs[2], buf, sizeof(buf));
    CHECK(r == 0, "#2: then %zd, not 0", r);
    /* #3 */
    CHECK(other_bind(c3_port) == EADDRINUSE, "#3: another bind to its port %d: %s", c3_port,
          strerror(other_bind(c3_port)));
    r = recv_now(cs[3], buf, sizeof(buf));
    CHECK(r == 0, "#3: recv %zd, not 0", r);
    CHECK(get_int(cs[3], SOL_SOCKET, SO_ERROR) == 0, "#3: SO_ERROR not 0");
    CHECK(bind(cs[3], (struct sockaddr *)&any, sizeof(any)) < 0 && errno == EINVAL,
          "#3: bind on it gives %s", strerror(errno));
    /* #4 */
    r = recv_now(cs[4], buf, sizeof(buf));
    CHECK(r == 5 && !memcmp(buf, "hello", 5), "#4: recv %zd, not the 5 bytes", r);
    r = recv_now(cs[4], buf, sizeof(buf));
    CHECK(r == 0, "#4: recv after the data %zd, not 0 (the FIN)", r);
    int e = get_int(cs[4], SOL_SOCKET, SO_ERROR);
    CHECK(e == EPIPE, "#4: SO_ERROR %d, not EPIPE", e);
    /* #5 */
    CHECK(connect_lo(cs[5], c_port) < 0 && errno == ECONNREFUSED,
          "#5: connect again gives %s, not ECONNREFUSED", strerror(errno));
    int rc = connect_lo(cs[5], c_port); /* now unconnected: a new (non-blocking) connect */
    CHECK(rc == 0 || errno == EINPROGRESS, "#5: a new connect gives %s", strerror(errno));
    /* #6 */
    r = recv_now(cs[6], buf, sizeof(buf));
    CHECK(r == 0, "#6: recv %zd, not 0", r);
    CHECK(get_int(cs[6], SOL_SOCKET, SO_ERROR) == 0, "#6: SO_ERROR not 0");
    /* #7 */
    e = get_int(cs[7], SOL_SOCKET, SO_ERROR);
    CHECK(e == ECONNRESET, "#7: SO_ERROR %d, not ECONNRESET", e);
    CHECK(connect_lo(cs[7], c_port) == 0, "#7: connect after AF_UNSPEC: %s", strerror(errno));
    /* #8 */
    r = recv_now(cs[8], buf, sizeof(buf));
    CHECK(r == 10 && !memcmp(buf, "0123456789", 10), "#8: recv %zd, not the 10 bytes", r);
    r = recv_now(cs[8], buf, sizeof(buf));
    CHECK(r == -ECONNRESET, "#8: recv after the data %zd, not ECONNRESET", r);
    r = recv_now(cs[8], buf, sizeof(buf));
    CHECK(r == 0, "#8: then %zd, not 0", r);
    CHECK(other_bind(c8_port) == EADDRINUSE, "#8: its listener's port %d is free", c8_port);
    CHECK(bind(cs[8], (struct sockaddr *)&any, sizeof(any)) == 0, "#8: bind on it: %s",
          strerror(errno));
    finish("");
}

/* ---- shut ---------------------------------------------------------------------------- */

static int sa1, sa2, sb1, sb2, su, sbnd;
static struct view sv[4];

static void shut_setup(void)
{
    int port, l = listen_lo(&port);
    sa1 = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    SETUP_CHECK(connect_lo(sa1, port) == 0, "connect a");
    sa2 = accept_one(l);
    SETUP_CHECK(shutdown(sa1, SHUT_RD) == 0, "SHUT_RD a");
    sb1 = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    SETUP_CHECK(connect_lo(sb1, port) == 0, "connect b");
    sb2 = accept_one(l);
    SETUP_CHECK(shutdown(sb1, SHUT_RDWR) == 0, "SHUT_RDWR b");
    wait_state("b1", sb1, TCP_FIN_WAIT2);
    wait_state("b2", sb2, TCP_CLOSE_WAIT);
    su = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    SETUP_CHECK(shutdown(su, SHUT_RD) < 0 && errno == ENOTCONN, "shutdown unbound");
    sbnd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in b = lo(0);
    SETUP_CHECK(bind(sbnd, (struct sockaddr *)&b, sizeof(b)) == 0, "bind");
    SETUP_CHECK(shutdown(sbnd, SHUT_RDWR) < 0 && errno == ENOTCONN, "shutdown bound");
    int fds[4] = {sa1, sb1, su, sbnd};
    for (int i = 0; i < 4; i++) {
        snprintf(sv[i].name, sizeof(sv[i].name), "shut #%d", i);
        look(fds[i], &sv[i]);
    }
    say("READY pid=%d", (int)getpid());
}

static void shut_verify(void)
{
    char buf[64];
    int fds[4] = {sa1, sb1, su, sbnd};
    for (int i = 0; i < 4; i++)
        same(sv[i].name, fds[i], &sv[i]);
    ssize_t r = recv_now(sa1, buf, sizeof(buf));
    CHECK(r == 0, "a: recv after SHUT_RD gives %zd, not 0", r);
    CHECK(send(sa2, "ping", 4, MSG_NOSIGNAL) == 4, "a: the peer cannot send");
    double end = mono_now() + 5;
    int n = 0;
    while (n < 4 && mono_now() < end) {
        ioctl(sa1, SIOCINQ, &n);
        usleep(1000);
    }
    r = recv_now(sa1, buf, sizeof(buf));
    CHECK(r == 4 && !memcmp(buf, "ping", 4), "a: data sent after SHUT_RD: recv %zd", r);
    CHECK(send(sa1, "pong", 4, MSG_NOSIGNAL) == 4, "a: cannot send");
    struct pollfd pf = {sa2, POLLIN, 0};
    poll(&pf, 1, 5000);
    r = recv_now(sa2, buf, sizeof(buf));
    CHECK(r == 4 && !memcmp(buf, "pong", 4), "a: the peer got %zd bytes", r);
    /* b: FIN_WAIT2 shut for reading: data arriving resets the connection */
    CHECK(send(sb2, "late", 4, MSG_NOSIGNAL) == 4, "b: the peer cannot send");
    end = mono_now() + 5;
    while (info_of(sb2).tcpi_state != TCP_CLOSE && mono_now() < end)
        usleep(1000);
    CHECK(info_of(sb2).tcpi_state == TCP_CLOSE, "b: the peer is in state %d, not reset",
          info_of(sb2).tcpi_state);
    int e = get_int(sb2, SOL_SOCKET, SO_ERROR);
    CHECK(e == EPIPE, "b: the peer's error %d, not EPIPE", e);
    finish("");
}

/* ---- mss, ext ------------------------------------------------------------------------ */

static int m1, m2;
static struct view mv[2];

static void traffic(int a, int b, int rounds)
{
    static char big[1 << 18];
    for (int i = 0; i < rounds; i++) {
        SETUP_CHECK(send(a, big, sizeof(big), 0) == (ssize_t)sizeof(big), "send");
        size_t got = 0;
        while (got < sizeof(big)) {
            ssize_t r = recv(b, big, sizeof(big) - got, 0);
            SETUP_CHECK(r > 0, "recv");
            got += (size_t)r;
        }
    }
}

static void mss_setup(void)
{
    int port, l = listen_lo(&port);
    m1 = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    SETUP_CHECK(connect_lo(m1, port) == 0, "connect");
    m2 = accept_one(l);
    traffic(m1, m2, 40);
    traffic(m2, m1, 40);
    usleep(50000);
    look(m1, &mv[0]);
    look(m2, &mv[1]);
    snprintf(mv[0].name, sizeof(mv[0].name), "client");
    snprintf(mv[1].name, sizeof(mv[1].name), "server");
    say("READY pid=%d mss1=%d mss2=%d", (int)getpid(), mv[0].snd_mss, mv[1].snd_mss);
}

static void mss_check(int s, struct view *was)
{
    int maxseg = get_int(s, IPPROTO_TCP, TCP_MAXSEG);
    int snd = (int)info_of(s).tcpi_snd_mss;
    CHECK(maxseg == was->maxseg, "%s: TCP_MAXSEG %d, was %d", was->name, maxseg, was->maxseg);
    CHECK(snd == was->snd_mss, "%s: tcpi_snd_mss %d, was %d", was->name, snd, was->snd_mss);
}

static void mss_verify(void)
{
    mss_check(m1, &mv[0]);
    mss_check(m2, &mv[1]);
    traffic(m1, m2, 2);
    traffic(m2, m1, 2);
    finish("");
}

static void ext_setup(int port)
{
    m1 = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    SETUP_CHECK(connect_lo(m1, port) == 0, "connect");
    static char buf[1 << 16];
    memset(buf, 'e', sizeof(buf));
    for (int i = 0; i < 16; i++) /* the test reads it all before the dump */
        SETUP_CHECK(send(m1, buf, sizeof(buf), 0) == (ssize_t)sizeof(buf), "send");
    say("SENT pid=%d", (int)getpid());
    double end = mono_now() + 20; /* every byte acknowledged */
    while (info_of(m1).tcpi_unacked && mono_now() < end)
        usleep(1000);
    /* one more byte (the test reads it after the restore): its ACK carries the window the
       test's socket has now that it read everything, as the probe after the restore will */
    SETUP_CHECK(send(m1, "x", 1, 0) == 1, "send");
    usleep(20000);
    while (info_of(m1).tcpi_unacked && mono_now() < end)
        usleep(1000);
    usleep(50000);
    look(m1, &mv[0]);
    snprintf(mv[0].name, sizeof(mv[0].name), "outside");
    say("READY pid=%d mss=%d", (int)getpid(), mv[0].snd_mss);
}

static void ext_verify(void)
{
    mss_check(m1, &mv[0]);
    CHECK(send(m1, "after", 5, MSG_NOSIGNAL) == 5, "send after the restore");
    finish("");
}

/* ---- timeout ------------------------------------------------------------------------- */

static void timeout_run(sigset_t *old)
{
    int port, l = listen_lo(&port);
    int c = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    SETUP_CHECK(connect_lo(c, port) == 0, "connect");
    int p = accept_one(l);
    unsigned int ms = 300;
    SETUP_CHECK(setsockopt(c, IPPROTO_TCP, TCP_USER_TIMEOUT, &ms, sizeof(ms)) == 0, "timeout");
    say("READY pid=%d cport=%d sport=%d", (int)getpid(), port_of(c), port);
    while (!got_usr1)
        sigsuspend(old);
    SETUP_CHECK(send(c, "lost", 4, 0) == 4, "send");
    wait_state("timed out", c, TCP_CLOSE);
    say("TIMEDOUT pid=%d", (int)getpid());
    while (!got_usr2)
        sigsuspend(old);
    int e = get_int(c, SOL_SOCKET, SO_ERROR);
    CHECK(e == ETIMEDOUT, "SO_ERROR %d, not ETIMEDOUT (still pending after the refused dump)", e);
    (void)p;
    finish("");
}

int main(int argc, char **argv)
{
    const char *mode = argc > 1 ? argv[1] : "closed";
    sigset_t old;
    catch_usr2_blocked(on_usr2, &old);
    catch_usr1_too(on_usr1, &old);
    void (*verify)(void) = NULL;
    if (!strcmp(mode, "closed")) {
        closed_setup();
        verify = closed_verify;
    } else if (!strcmp(mode, "shut")) {
        shut_setup();
        verify = shut_verify;
    } else if (!strcmp(mode, "mss")) {
        mss_setup();
        verify = mss_verify;
    } else if (!strcmp(mode, "ext") && argc > 2) {
        ext_setup(atoi(argv[2]));
        verify = ext_verify;
    } else if (!strcmp(mode, "timeout")) {
        timeout_run(&old);
    } else {
        say("SETUP FAIL unknown mode %s", mode);
        return 2;
    }
    while (!got_usr2)
        sigsuspend(&old);
    verify();
    return 0;
}
