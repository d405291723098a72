/* Sockets with data in flight, checked from inside after a restore.
 *
 *   sockets unix   socketpairs (stream, dgram, seqpacket), a listener bound to a
 *                  relative path and one to an abstract name, each with an accepted
 *                  connection and data queued both ways, a connection still waiting
 *                  in the path listener's queue, a bound dgram server with messages
 *                  from an unnamed and a named sender, a connected dgram client.
 *   sockets tcp    an IPv4 listener (SO_REUSEADDR) with an accepted loopback
 *                  connection, an IPv6 one (V6ONLY) likewise, data queued both ways
 *                  (the IPv4 sender filled its send queue), a bound UDP socket.
 *                  READY port=N: after the restore the test connects to N and sends
 *                  "hello"; we accept it (and a connection of our own) and answer.
 *   sockets ext    listens, READY port=N; the test connects and we accept; we send
 *                  EXT_OUT bytes; then ACCEPTED. The test sends bytes before the dump
 *                  and after the restore (total given in the "total" file); on
 *                  SIGUSR2 we read them all, check them, and send "bye".
 *   sockets connect PATH   a unix stream connection to a listener outside the process
 *                  (which ckpt must refuse), then just waits for SIGUSR2.
 *
 * Every stream carries pattern bytes (byte i of stream k is pat(k, i)); on SIGUSR2
 * each receiver reads exactly what was queued (and then finds nothing more), and
 * every connection makes one more round trip.
 */
#include "wl.h"

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stddef.h>
#include <sys/socket.h>
#include <sys/un.h>

#define EXT_OUT 30000

static volatile sig_atomic_t got_usr2;
static void on_usr2(int sig)
{
    (void)sig;
    got_usr2 = 1;
}

/* a stream whose first `sent` bytes went in, of which `consumed` were read */
struct stream {
    const char *name;
    int k, tx, rx;
    size_t sent, consumed;
};
static struct stream streams[16];
static int nstreams;

static size_t put_stream(const char *name, int tx, int rx, size_t want, size_t consume)
{
    struct stream *s = &streams[nstreams];
    s->name = name;
    s->k = nstreams++;
    s->tx = tx;
    s->rx = rx;
    unsigned char buf[4096];
    while (s->sent < want) {
        size_t n = want - s->sent < sizeof(buf) ? want - s->sent : sizeof(buf);
        for (size_t j = 0; j < n; j++)
            buf[j] = pat(s->k, s->sent + j);
        ssize_t w = send(tx, buf, n, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            break;
        SETUP_CHECK(w > 0, name);
        s->sent += (size_t)w;
    }
    while (s->consumed < consume) {
        size_t n = consume - s->consumed < sizeof(buf) ? consume - s->consumed : sizeof(buf);
        ssize_t r = recv(rx, buf, n, MSG_DONTWAIT);
        if (r < 0 && errno == EAGAIN && wait_in(rx, 30))
            continue;
        SETUP_CHECK(r > 0, name);
        for (ssize_t j = 0; j < r; j++)
            SETUP_CHECK(buf[j] == pat(s->k, s->consumed + (size_t)j), "pattern at setup");
        s->consumed += (size_t)r;
    }
    return s->sent;
}

static void check_stream(struct stream *s)
{
    unsigned char buf[65536];
    size_t at = s->consumed;
    while (at < s->sent) {
        if (!wait_in(s->rx, 60)) {
            fail("%s: only %zu of %zu bytes arrived", s->name, at, s->sent);
            return;
        }
        size_t n = s->sent - at < sizeof(buf) ? s->sent - at : sizeof(buf);
        ssize_t r = recv(s->rx, buf, n, MSG_DONTWAIT);
        if (r < 0 && (errno == EAGAIN || errno == EINTR))
            continue;
        if (r <= 0) {
            fail("%s: read at %zu returned %zd errno %d", s->name, at, r, errno);
            return;
        }
        for (ssize_t j = 0; j < r; j++)
            if (buf[j] != pat(s->k, at + (size_t)j)) {
                fail("%s: byte %zu differs", s->name, at + (size_t)j);
                return;
            }
        at += (size_t)r;
    }
    ssize_t r = recv(s->rx, buf, 1, MSG_DONTWAIT);
    CHECK(r < 0 && errno == EAGAIN, "%s: extra data after %zu bytes (r=%zd errno=%d)", s->name,
          s->sent, r, errno);
}

/* one more message each way on a connected pair */
static void round_trip(const char *name, int a, int b)
{
    char buf[64];
    CHECK(send(a, "ping", 4, MSG_NOSIGNAL) == 4, "%s: send ping errno %d", name, errno);
    CHECK(wait_in(b, 60) && recv(b, buf, sizeof(buf), 0) == 4 && !memcmp(buf, "ping", 4),
          "%s: ping lost", name);
    CHECK(send(b, "pong!", 5, MSG_NOSIGNAL) == 5, "%s: send pong errno %d", name, errno);
    CHECK(wait_in(a, 60) && recv(a, buf, sizeof(buf), 0) == 5 && !memcmp(buf, "pong!", 5),
          "%s: pong lost", name);
}

/* ---- unix ------------------------------------------------------------------------ */

struct msg {
    int to;
    size_t len;
    int k;
    const char *from; /* expected sender path, NULL = unnamed (or not checked) */
};
static struct msg msgs[32];
static int nmsgs;

static void put_msg(int from, int to, size_t len, const struct sockaddr_un *dst, socklen_t dl,
                    const char *src)
{
    unsigned char buf[8192];
    struct msg *m = &msgs[nmsgs];
    m->to = to;
    m->len = len;
    m->k = 100 + nmsgs++;
    m->from = src;
    for (size_t j = 0; j < len; j++)
        buf[j] = pat(m->k, j);
    ssize_t w = dst ? sendto(from, buf, len, 0, (const struct sockaddr *)dst, dl)
                    : send(from, buf, len, 0);
    SETUP_CHECK(w == (ssize_t)len, "send message");
}

static void check_msgs(void)
{
    unsigned char buf[9000];
    for (int i = 0; i < nmsgs; i++) {
        struct msg *m = &msgs[i];
        struct sockaddr_un src;
        socklen_t sl = sizeof(src);
        if (!wait_in(m->to, 60)) {
            fail("message %d (%zu bytes) lost", i, m->len);
            continue;
        }
        ssize_t r = recvfrom(m->to, buf, sizeof(buf), MSG_DONTWAIT, (struct sockaddr *)&src, &sl);
        if (r != (ssize_t)m->len) {
            fail("message %d: %zd bytes, want %zu", i, r, m->len);
            continue;
        }
        for (size_t j = 0; j < m->len; j++)
            if (buf[j] != pat(m->k, j)) {
                fail("message %d: byte %zu differs", i, j);
                break;
            }
        if (m->from) {
            int named = sl > sizeof(sa_family_t);
            CHECK(named && !strcmp(src.sun_path, m->from), "message %d: from %s, want %s", i,
                  named ? src.sun_path : "(unnamed)", m->from);
        }
    }
    for (int i = 0; i < nmsgs; i++) {
        ssize_t r = recv(msgs[i].to, buf, sizeof(buf), MSG_DONTWAIT);
        CHECK(r < 0 && errno == EAGAIN, "an extra message on fd %d", msgs[i].to);
    }
}

static socklen_t un_addr(struct sockaddr_un *a, const char *name, int abstract)
{
    memset(a, 0, sizeof(*a));
    a->sun_family = AF_UNIX;
    if (abstract) {
        size_t n = strlen(name);
        memcpy(a->sun_path + 1, name, n);
        return (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + n);
    }
    snprintf(a->sun_path, sizeof(a->sun_path), "%s", name);
    return (socklen_t)(offsetof(struct sockaddr_un, sun_path) + strlen(name) + 1);
}

static int un_listen(const char *name, int abstract, int backlog)
{
    struct sockaddr_un a;
    socklen_t l = un_addr(&a, name, abstract);
    int s = socket(AF_UNIX, SOCK_STREAM, 0);
    SETUP_CHECK(s >= 0 && bind(s, (struct sockaddr *)&a, l) == 0, "bind unix");
    SETUP_CHECK(listen(s, backlog) == 0, "listen unix");
    return s;
}

static int un_connect(const char *name, int abstract, int type)
{
    struct sockaddr_un a;
    socklen_t l = un_addr(&a, name, abstract);
    int s = socket(AF_UNIX, type, 0);
    SETUP_CHECK(s >= 0 && connect(s, (struct sockaddr *)&a, l) == 0, "connect unix");
    return s;
}

static int sp_s[2], sp_d[2], sp_q[2], lp, c1, s1, c2, la, c3, s3, dsrv, dcli, dnamed;
static char abstract_name[64];

static void unix_setup(void)
{
    SETUP_CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sp_s) == 0, "socketpair stream");
    SETUP_CHECK(socketpair(AF_UNIX, SOCK_DGRAM, 0, sp_d) == 0, "socketpair dgram");
    SETUP_CHECK(socketpair(AF_UNIX, SOCK_SEQPACKET, 0, sp_q) == 0, "socketpair seqpacket");
    put_stream("pair a->b", sp_s[0], sp_s[1], 150000, 1000);
    put_stream("pair b->a", sp_s[1], sp_s[0], 5000, 0);
    put_msg(sp_d[0], sp_d[1], 100, NULL, 0, NULL);
    put_msg(sp_d[0], sp_d[1], 0, NULL, 0, NULL);
    put_msg(sp_d[0], sp_d[1], 7000, NULL, 0, NULL);
    put_msg(sp_d[1], sp_d[0], 33, NULL, 0, NULL);
    put_msg(sp_q[0], sp_q[1], 1, NULL, 0, NULL);
    put_msg(sp_q[0], sp_q[1], 4000, NULL, 0, NULL);
    put_msg(sp_q[1], sp_q[0], 77, NULL, 0, NULL);

    lp = un_listen("srv.sock", 0, 5);
    c1 = un_connect("srv.sock", 0, SOCK_STREAM);
    s1 = accept4(lp, NULL, NULL, SOCK_NONBLOCK);
    SETUP_CHECK(s1 >= 0, "accept srv.sock");
    put_stream("path c1->s1", c1, s1, 20000, 10);
    put_stream("path s1->c1", s1, c1, 7000, 0);
    c2 = un_connect("srv.sock", 0, SOCK_STREAM); /* left in the accept queue */
    SETUP_CHECK(chmod("srv.sock", 0741) == 0, "chmod srv.sock");

    snprintf(abstract_name, sizeof(abstract_name), "ckpt-wl-%d", (int)getpid());
    la = un_listen(abstract_name, 1, 3);
    c3 = un_connect(abstract_name, 1, SOCK_STREAM);
    s3 = accept(la, NULL, NULL);
    SETUP_CHECK(s3 >= 0, "accept abstract");
    put_stream("abstract c3->s3", c3, s3, 3000, 3000);
    put_stream("abstract s3->c3", s3, c3, 9000, 1);

    struct sockaddr_un a;
    socklen_t l = un_addr(&a, "dg.sock", 0);
    dsrv = socket(AF_UNIX, SOCK_DGRAM, 0);
    SETUP_CHECK(dsrv >= 0 && bind(dsrv, (struct sockaddr *)&a, l) == 0, "bind dg.sock");
    dcli = socket(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK, 0);
    put_msg(dcli, dsrv, 500, &a, l, NULL);
    struct sockaddr_un b;
    socklen_t bl = un_addr(&b, "dgc.sock", 0);
    dnamed = socket(AF_UNIX, SOCK_DGRAM, 0);
    SETUP_CHECK(dnamed >= 0 && bind(dnamed, (struct sockaddr *)&b, bl) == 0, "bind dgc.sock");
    SETUP_CHECK(connect(dnamed, (struct sockaddr *)&a, l) == 0, "connect dg.sock");
    put_msg(dnamed, dsrv, 1500, NULL, 0, "dgc.sock");
    put_msg(dcli, dsrv, 2, &a, l, NULL);
}

static void unix_verify(void)
{
    for (int i = 0; i < nstreams; i++)
        check_stream(&streams[i]);
    check_msgs();
    round_trip("socketpair stream", sp_s[0], sp_s[1]);
    round_trip("socketpair dgram", sp_d[0], sp_d[1]);
    round_trip("socketpair seqpacket", sp_q[0], sp_q[1]);
    round_trip("path connection", c1, s1);
    round_trip("abstract connection", c3, s3);
    CHECK(fcntl(s1, F_GETFL) & O_NONBLOCK, "s1 lost O_NONBLOCK");
    CHECK(!(fcntl(c1, F_GETFL) & O_NONBLOCK), "c1 gained O_NONBLOCK");
    CHECK(fcntl(dcli, F_GETFL) & O_NONBLOCK, "dcli lost O_NONBLOCK");

    struct sockaddr_un a;
    socklen_t l = sizeof(a);
    CHECK(getsockname(lp, (struct sockaddr *)&a, &l) == 0 && !strcmp(a.sun_path, "srv.sock"),
          "listener name is %s", a.sun_path);
    l = sizeof(a);
    CHECK(getpeername(c1, (struct sockaddr *)&a, &l) == 0 && !strcmp(a.sun_path, "srv.sock"),
          "c1 peer name is %s", l > sizeof(sa_family_t) ? a.sun_path : "(unnamed)");
    struct stat st;
    CHECK(stat("srv.sock", &st) == 0 && (st.st_mode & 07777) == 0741, "srv.sock mode %o",
          st.st_mode & 07777);

    /* the connection left waiting in the queue, then a new one */
    CHECK(wait_in(lp, 60), "no pending connection on srv.sock");
    int p = accept(lp, NULL, NULL);
    CHECK(p >= 0, "accept pending errno %d", errno);
    if (p >= 0)
        round_trip("pending connection", c2, p);
    int n = un_connect("srv.sock", 0, SOCK_STREAM);
    int ns = accept(lp, NULL, NULL);
    CHECK(ns >= 0, "accept new errno %d", errno);
    if (ns >= 0)
        round_trip("new path connection", n, ns);
    int na = un_connect(abstract_name, 1, SOCK_STREAM);
    int nas = accept(la, NULL, NULL);
    CHECK(nas >= 0, "accept new abstract errno %d", errno);
    if (nas >= 0)
        round_trip("new abstract connection", na, nas);
    /* the connected dgram client still reaches the server */
    char buf[16];
    CHECK(send(dnamed, "x", 1, 0) == 1 && wait_in(dsrv, 60) && recv(dsrv, buf, 16, 0) == 1,
          "connected dgram client");
}

/* ---- tcp ------------------------------------------------------------------------- */

static int tl, ta, tb, tl6, ta6, tb6, udp;
static int tport;

static int tcp_listen(int family, int *port)
{
    int s = socket(family, SOCK_STREAM, 0);
    int one = 1;
    SETUP_CHECK(s >= 0, "socket tcp");
    SETUP_CHECK(setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) == 0, "reuseaddr");
    if (family == AF_INET6) {
        SETUP_CHECK(setsockopt(s, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one)) == 0, "v6only");
        struct sockaddr_in6 a = {.sin6_family = AF_INET6, .sin6_addr = IN6ADDR_LOOPBACK_INIT};
        SETUP_CHECK(bind(s, (struct sockaddr *)&a, sizeof(a)) == 0, "bind6");
    } else {
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        SETUP_CHECK(bind(s, (struct sockaddr *)&a, sizeof(a)) == 0, "bind4");
    }
    SETUP_CHECK(listen(s, 16) == 0, "listen tcp");
    struct sockaddr_in6 got;
    socklen_t gl = sizeof(got);
    getsockname(s, (struct sockaddr *)&got, &gl);
    *port = ntohs(got.sin6_port); /* same offset in sockaddr_in */
    return s;
}

static int tcp_connect(int family, int port)
{
    int s = socket(family, SOCK_STREAM, 0);
    int r;
    if (family == AF_INET6) {
        struct sockaddr_in6 a = {.sin6_family = AF_INET6, .sin6_addr = IN6ADDR_LOOPBACK_INIT,
                                 .sin6_port = htons((uint16_t)port)};
        r = connect(s, (struct sockaddr *)&a, sizeof(a));
    } else {
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK),
                                .sin_port = htons((uint16_t)port)};
        r = connect(s, (struct sockaddr *)&a, sizeof(a));
    }
    SETUP_CHECK(s >= 0 && r == 0, "connect tcp");
    return s;
}

static int local_port(int s)
{
    struct sockaddr_in6 a;
    socklen_t l = sizeof(a);
    getsockname(s, (struct sockaddr *)&a, &l);
    return ntohs(a.sin6_port);
}

static void tcp_setup(void)
{
    int port6, one = 1;
    tl = tcp_listen(AF_INET, &tport);
    ta = tcp_connect(AF_INET, tport);
    tb = accept(tl, NULL, NULL);
    SETUP_CHECK(tb >= 0, "accept tcp");
    SETUP_CHECK(setsockopt(ta, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) == 0, "nodelay");
    /* tb has it from the listener; TCP_REPAIR clears it when switched off (ckpt puts it back) */
    SETUP_CHECK(setsockopt(ta, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) == 0, "reuseaddr");
    put_stream("tcp a->b", ta, tb, 8 << 20, 100); /* until the send queue is full */
    put_stream("tcp b->a", tb, ta, 10000, 0);
    tl6 = tcp_listen(AF_INET6, &port6);
    ta6 = tcp_connect(AF_INET6, port6);
    tb6 = accept4(tl6, NULL, NULL, SOCK_NONBLOCK);
    SETUP_CHECK(tb6 >= 0, "accept tcp6");
    put_stream("tcp6 a->b", ta6, tb6, 50000, 1);
    put_stream("tcp6 b->a", tb6, ta6, 50000, 49000);
    udp = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in u = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    SETUP_CHECK(udp >= 0 && bind(udp, (struct sockaddr *)&u, sizeof(u)) == 0, "bind udp");
}

static void tcp_verify(void)
{
    for (int i = 0; i < nstreams; i++)
        check_stream(&streams[i]);
    round_trip("tcp", ta, tb);
    round_trip("tcp6", ta6, tb6);
    int one = 0;
    socklen_t ol = sizeof(one);
    CHECK(getsockopt(ta, IPPROTO_TCP, TCP_NODELAY, &one, &ol) == 0 && one, "TCP_NODELAY lost");
    CHECK(getsockopt(tl, SOL_SOCKET, SO_REUSEADDR, &one, &ol) == 0 && one, "SO_REUSEADDR lost");
    one = 0;
    CHECK(getsockopt(ta, SOL_SOCKET, SO_REUSEADDR, &one, &ol) == 0 && one,
          "SO_REUSEADDR of a connection lost");
    one = 0;
    CHECK(getsockopt(tb, SOL_SOCKET, SO_REUSEADDR, &one, &ol) == 0 && one,
          "SO_REUSEADDR of an accepted connection lost");
    CHECK(getsockopt(tl6, IPPROTO_IPV6, IPV6_V6ONLY, &one, &ol) == 0 && one, "V6ONLY lost");
    /* the test's connection (made before it sent SIGUSR2) and one of our own */
    int mine = tcp_connect(AF_INET, tport);
    int got_test = -1, got_mine = -1;
    for (int i = 0; i < 2; i++) {
        if (!wait_in(tl, 60)) {
            fail("listener: connection %d never came", i);
            break;
        }
        struct sockaddr_in peer;
        socklen_t pl = sizeof(peer);
        int c = accept(tl, (struct sockaddr *)&peer, &pl);
        if (c < 0) {
            fail("accept after restore errno %d", errno);
            break;
        }
        if (ntohs(peer.sin_port) == local_port(mine))
            got_mine = c;
        else
            got_test = c;
    }
    if (got_mine >= 0)
        round_trip("new tcp connection", mine, got_mine);
    CHECK(got_test >= 0, "the test's connection was not accepted");
    if (got_test >= 0) {
        char buf[16] = {0};
        CHECK(wait_in(got_test, 60) && recv(got_test, buf, 5, MSG_WAITALL) == 5 &&
                  !memcmp(buf, "hello", 5),
              "no hello from the test");
        CHECK(send(got_test, "world", 5, MSG_NOSIGNAL) == 5, "send world");
    }
    /* UDP: same port, still receives */
    struct sockaddr_in u;
    socklen_t ul = sizeof(u);
    getsockname(udp, (struct sockaddr *)&u, &ul);
    char b[8];
    CHECK(sendto(udp, "u", 1, 0, (struct sockaddr *)&u, ul) == 1 && wait_in(udp, 60) &&
              recv(udp, b, 8, 0) == 1,
          "udp to itself");
}

/* ---- ext: a connection to the test ---------------------------------------------- */

static int el, ec;

static void ext_setup(void)
{
    el = tcp_listen(AF_INET, &tport);
    say("READY pid=%d port=%d mode=ext", (int)getpid(), tport);
    ec = accept(el, NULL, NULL);
    SETUP_CHECK(ec >= 0, "accept ext");
    unsigned char buf[EXT_OUT];
    for (size_t j = 0; j < sizeof(buf); j++)
        buf[j] = pat(1, j);
    SETUP_CHECK(send(ec, buf, sizeof(buf), 0) == (ssize_t)sizeof(buf), "send ext");
    say("ACCEPTED pid=%d", (int)getpid());
}

static void ext_verify(void)
{
    char *txt;
    size_t total = 0;
    if (read_file("total", &txt) >= 0) {
        total = strtoul(txt, NULL, 10);
        free(txt);
    }
    CHECK(total > 0, "no total file");
    struct stream s = {.name = "from the test", .k = 0, .rx = ec, .sent = total};
    check_stream(&s);
    CHECK(send(ec, "bye", 3, MSG_NOSIGNAL) == 3, "send bye errno %d", errno);
    char extra[64];
    snprintf(extra, sizeof(extra), "received=%zu", total);
    finish(extra);
}

int main(int argc, char **argv)
{
    const char *mode = argc > 1 ? argv[1] : "unix";
    sigset_t old;
    catch_usr2_blocked(on_usr2, &old);
    if (!strcmp(mode, "unix")) {
        unix_setup();
        say("READY pid=%d mode=unix streams=%d msgs=%d", (int)getpid(), nstreams, nmsgs);
    } else if (!strcmp(mode, "tcp")) {
        tcp_setup();
        say("READY pid=%d mode=tcp port=%d queued=%zu", (int)getpid(), tport, streams[0].sent);
    } else if (!strcmp(mode, "ext")) {
        ext_setup();
    } else if (!strcmp(mode, "connect") && argc > 2) { /* to a unix listener outside */
        int c = un_connect(argv[2], 0, SOCK_STREAM);
        say("READY pid=%d mode=connect fd=%d", (int)getpid(), c);
    } else {
        say("SETUP FAIL unknown mode %s", mode);
        return 2;
    }
    while (!got_usr2)
        sigsuspend(&old);
    if (!strcmp(mode, "unix"))
        unix_verify();
    else if (!strcmp(mode, "tcp"))
        tcp_verify();
    else if (!strcmp(mode, "ext"))
        ext_verify();
    finish("");
}
