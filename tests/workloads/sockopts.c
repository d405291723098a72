/* Socket options, filters, shutdown state and address families, checked from
 * inside after a restore (issue 14: "restored, but wrong").
 *
 *   sockopts opts   TCP listeners (IPv4, IPv6), connected pairs of each family, an
 *                   unbound and an address-only bound (IP_BIND_ADDRESS_NO_PORT) TCP
 *                   socket, UDP sockets (IPv4 with multicast settings, IPv6 dual-stack
 *                   connected to a v4-mapped peer) and a unix pair, each with many
 *                   options set to values a fresh socket does not have. Every option
 *                   of a table (SOL_SOCKET, IP, IPV6, TCP, UDP) is read at setup and
 *                   again on SIGUSR2: any difference fails, by socket and option name.
 *   sockopts inet   TCP over IPv4, IPv6, v4-mapped IPv6 (a v6 client to ::ffff:127.0.0.1
 *                   and a v4 client, both through a dual-stack listener), listeners with
 *                   IPV6_V6ONLY on and off (one v6-only listener on [::] shares its port
 *                   with a v4 listener), a bound v6 socket, UDP over v6 and v4-mapped:
 *                   names (the whole sockaddr), families and V6ONLY must come back, data
 *                   queued both ways arrives, every connection makes a round trip, every
 *                   listener accepts new connections of the families it accepted before
 *                   (and the v6-only one still none over IPv4).
 *   sockopts ext6 PORT   a dual-stack listener and a v6-only one, both on [::] (READY
 *                   port=N port6=M: the test connects to N over ::1 and over 127.0.0.1,
 *                   then to M over ::1), and two connections out to the test's dual-stack
 *                   listener on PORT, over ::1 and over ::ffff:127.0.0.1. On each we send
 *                   EXT_OUT pattern bytes, then ACCEPTED. On SIGUSR2 we read the total
 *                   (file "total") from each, check it, and send "bye" on each.
 *   sockopts bpf    classic BPF socket filters: a UDP socket that keeps only datagrams
 *                   starting with 'A' (locked: SO_LOCK_FILTER), a unix dgram socket that
 *                   keeps only messages shorter than 100 bytes (one queued), a TCP
 *                   connection with an accept-all filter. Restored: the programs read
 *                   back the same, a datagram the filter drops is not received, one it
 *                   keeps is, and the lock holds (SO_DETACH_FILTER fails).
 *   sockopts ebpf   a UDP socket with an eBPF filter (SO_ATTACH_BPF): ckpt must refuse.
 *   sockopts mcast  UDP sockets in multicast groups of a multicast interface: IPv4 any
 *                   source, one source only (IP_ADD_SOURCE_MEMBERSHIP), all but one source
 *                   (IP_BLOCK_SOURCE), and an IPv6 group. Restored: MCAST_MSFILTER reads each
 *                   membership back the same, and datagrams sent to the groups (looped back,
 *                   TTL 0) arrive where the filters let them. READY groups=0 when the host
 *                   has no multicast interface with an IPv4 address (nothing checked).
 *   sockopts md5    a TCP listener with a TCP_MD5SIG key: ckpt must refuse.
 *   sockopts tsid   a UDP socket with SO_TIMESTAMPING and SOF_TIMESTAMPING_OPT_ID (a
 *                   counter getsockopt does not show): ckpt must refuse.
 *   sockopts shut   UDP sockets shut down: unconnected SHUT_RD, connected SHUT_WR and
 *                   SHUT_RDWR, IPv6 connected SHUT_RD. Restored: reads give EOF where the
 *                   read side was shut, sends fail with EPIPE where the write side was,
 *                   the others still work.
 */
#include "wl.h"

#include <arpa/inet.h>
#include <ifaddrs.h>
#include <linux/bpf.h>
#include <linux/filter.h>
#include <net/if.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <netinet/udp.h>
#include <poll.h>
#include <stddef.h>
#include <sys/socket.h>
#include <sys/un.h>

#define EXT_OUT 20000

static volatile sig_atomic_t got_usr2;
static void on_usr2(int sig)
{
    (void)sig;
    got_usr2 = 1;
}

/* ---- streams: pattern bytes queued at setup, read back after the restore ---------- */

struct stream {
    char name[48];
    int k, tx, rx;
    size_t sent, consumed;
};
static struct stream streams[32];
static int nstreams;

static void put_stream(const char *name, int tx, int rx, size_t want, size_t consume)
{
    struct stream *s = &streams[nstreams];
    snprintf(s->name, sizeof(s->name), "%s", name);
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
        s->consumed += (size_t)r;
    }
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

static void check_streams(void)
{
    for (int i = 0; i < nstreams; i++)
        check_stream(&streams[i]);
}

static void round_trip(const char *name, int a, int b)
{
    char buf[64];
    CHECK(send(a, "ping", 4, MSG_NOSIGNAL) == 4, "%s: send ping errno %d", name, errno);
    CHECK(wait_in(b, 60) && recv(b, buf, sizeof(buf), MSG_DONTWAIT) == 4 && !memcmp(buf, "ping", 4),
          "%s: ping lost", name);
    CHECK(send(b, "pong!", 5, MSG_NOSIGNAL) == 5, "%s: send pong errno %d", name, errno);
    CHECK(wait_in(a, 60) && recv(a, buf, sizeof(buf), MSG_DONTWAIT) == 5 &&
              !memcmp(buf, "pong!", 5),
          "%s: pong lost", name);
}

/* ---- addresses --------------------------------------------------------------------- */

static socklen_t sa4(struct sockaddr_storage *ss, const char *host, int port)
{
    struct sockaddr_in *a = (struct sockaddr_in *)ss;
    memset(ss, 0, sizeof(*ss));
    a->sin_family = AF_INET;
    a->sin_port = htons((uint16_t)port);
    SETUP_CHECK(inet_pton(AF_INET, host, &a->sin_addr) == 1, host);
    return sizeof(*a);
}

static socklen_t sa6(struct sockaddr_storage *ss, const char *host, int port)
{
    struct sockaddr_in6 *a = (struct sockaddr_in6 *)ss;
    memset(ss, 0, sizeof(*ss));
    a->sin6_family = AF_INET6;
    a->sin6_port = htons((uint16_t)port);
    SETUP_CHECK(inet_pton(AF_INET6, host, &a->sin6_addr) == 1, host);
    return sizeof(*a);
}

static socklen_t sa_any(struct sockaddr_storage *ss, const char *host, int port)
{
    return strchr(host, ':') ? sa6(ss, host, port) : sa4(ss, host, port);
}

static int port_of(int s)
{
    struct sockaddr_in6 a;
    socklen_t l = sizeof(a);
    getsockname(s, (struct sockaddr *)&a, &l);
    return ntohs(a.sin6_port); /* same offset in sockaddr_in */
}

static int set_int(int s, int level, int opt, int v)
{
    return setsockopt(s, level, opt, &v, sizeof(v));
}

static int get_int(int s, int level, int opt)
{
    int v = -12345;
    socklen_t l = sizeof(v);
    if (getsockopt(s, level, opt, &v, &l) < 0)
        return -12345;
    return v;
}

/* family AF_INET/AF_INET6; v6only -1: leave as is */
static int tcp_socket(int family, int v6only)
{
    int s = socket(family, SOCK_STREAM, 0);
    SETUP_CHECK(s >= 0, "socket tcp");
    SETUP_CHECK(set_int(s, SOL_SOCKET, SO_REUSEADDR, 1) == 0, "reuseaddr");
    if (v6only >= 0)
        SETUP_CHECK(set_int(s, IPPROTO_IPV6, IPV6_V6ONLY, v6only) == 0, "v6only");
    return s;
}

static int tcp_listen_on(int s, const char *host, int port)
{
    struct sockaddr_storage ss;
    socklen_t l = sa_any(&ss, host, port);
    SETUP_CHECK(bind(s, (struct sockaddr *)&ss, l) == 0, "bind listener");
    SETUP_CHECK(listen(s, 16) == 0, "listen");
    return port_of(s);
}

static int tcp_connect_to(int s, const char *host, int port)
{
    struct sockaddr_storage ss;
    socklen_t l = sa_any(&ss, host, port);
    SETUP_CHECK(connect(s, (struct sockaddr *)&ss, l) == 0, "connect");
    return s;
}

static int accept_one(int l)
{
    SETUP_CHECK(wait_in(l, 30), "a connection to accept");
    int c = accept(l, NULL, NULL);
    SETUP_CHECK(c >= 0, "accept");
    return c;
}

/* ---- what each socket looked like: names, family, an option table ---------------- */

struct optdef {
    int level, opt, len;
    const char *name;
    /* 1: the kernel changes it on an established connection; 2: the kernel copies it
       from the SYN into an accepted connection and lets nobody set it on TCP (it never
       applies to TCP): not kept */
    int dynamic;
};

#define O(l, o, n, d) {l, o, n, #o, d}
#ifndef SO_RCVMARK
#define SO_RCVMARK 75
#endif
#define SO_PASSPIDFD_ 76
#define SO_RCVPRIORITY_ 82
#define SO_PASSRIGHTS_ 83
#ifndef IP_LOCAL_PORT_RANGE
#define IP_LOCAL_PORT_RANGE 51
#endif
#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103
#endif
#ifndef UDP_GRO
#define UDP_GRO 104
#endif
#ifndef TCP_TX_DELAY
#define TCP_TX_DELAY 37
#endif
#define TCP_RTO_MAX_MS_ 44
#define TCP_RTO_MIN_US_ 45
#define TCP_DELACK_MAX_US_ 46
#define SOLU 17
#ifndef IPV6_FLOWINFO
#define IPV6_FLOWINFO 11
#endif
#ifndef IPV6_FLOWINFO_SEND
#define IPV6_FLOWINFO_SEND 33
#endif
#ifndef IPV6_PREFER_SRC_PUBLIC
#define IPV6_PREFER_SRC_PUBLIC 0x0002
#endif
#define SOF_RX_SOFTWARE (1 << 3)
#define SOF_SOFTWARE (1 << 4)

static const struct optdef optdefs[] = {
    O(SOL_SOCKET, SO_DEBUG, 4, 0), O(SOL_SOCKET, SO_REUSEADDR, 4, 0),
    O(SOL_SOCKET, SO_DONTROUTE, 4, 0), O(SOL_SOCKET, SO_BROADCAST, 4, 0),
    O(SOL_SOCKET, SO_KEEPALIVE, 4, 0), O(SOL_SOCKET, SO_OOBINLINE, 4, 0),
    O(SOL_SOCKET, SO_NO_CHECK, 4, 0), O(SOL_SOCKET, SO_PRIORITY, 4, 0),
    O(SOL_SOCKET, SO_LINGER, 8, 0), O(SOL_SOCKET, SO_REUSEPORT, 4, 0),
    O(SOL_SOCKET, SO_PASSCRED, 4, 0), O(SOL_SOCKET, SO_RCVLOWAT, 4, 0),
    O(SOL_SOCKET, SO_RCVTIMEO_OLD, 16, 0), O(SOL_SOCKET, SO_SNDTIMEO_OLD, 16, 0),
    O(SOL_SOCKET, SO_BINDTODEVICE, 16, 0), O(SOL_SOCKET, SO_TIMESTAMP_OLD, 4, 0),
    O(SOL_SOCKET, SO_PASSSEC, 4, 0), O(SOL_SOCKET, SO_TIMESTAMPNS_OLD, 4, 0),
    O(SOL_SOCKET, SO_MARK, 4, 0), O(SOL_SOCKET, SO_TIMESTAMPING_OLD, 8, 0),
    O(SOL_SOCKET, SO_RXQ_OVFL, 4, 0), O(SOL_SOCKET, SO_WIFI_STATUS, 4, 0),
    O(SOL_SOCKET, SO_PEEK_OFF, 4, 0), O(SOL_SOCKET, SO_LOCK_FILTER, 4, 0),
    O(SOL_SOCKET, SO_SELECT_ERR_QUEUE, 4, 0), O(SOL_SOCKET, SO_BUSY_POLL, 4, 0),
    O(SOL_SOCKET, SO_MAX_PACING_RATE, 8, 0), O(SOL_SOCKET, SO_ZEROCOPY, 4, 0),
    O(SOL_SOCKET, SO_TXTIME, 8, 0), O(SOL_SOCKET, SO_BINDTOIFINDEX, 4, 0),
    O(SOL_SOCKET, SO_TIMESTAMP_NEW, 4, 0), O(SOL_SOCKET, SO_TIMESTAMPNS_NEW, 4, 0),
    O(SOL_SOCKET, SO_TIMESTAMPING_NEW, 8, 0), O(SOL_SOCKET, SO_PREFER_BUSY_POLL, 4, 0),
    O(SOL_SOCKET, SO_BUSY_POLL_BUDGET, 4, 0), O(SOL_SOCKET, SO_BUF_LOCK, 4, 0),
    O(SOL_SOCKET, SO_TXREHASH, 4, 0), O(SOL_SOCKET, SO_RCVMARK, 4, 0),
    O(SOL_SOCKET, SO_PASSPIDFD_, 4, 0), O(SOL_SOCKET, SO_RCVPRIORITY_, 4, 0),
    O(SOL_SOCKET, SO_PASSRIGHTS_, 4, 0),
    O(IPPROTO_IP, IP_TOS, 4, 0), O(IPPROTO_IP, IP_TTL, 4, 0),
    O(IPPROTO_IP, IP_OPTIONS, 40, 0), O(IPPROTO_IP, IP_RECVOPTS, 4, 0),
    O(IPPROTO_IP, IP_RETOPTS, 4, 0), O(IPPROTO_IP, IP_PKTINFO, 4, 0),
    O(IPPROTO_IP, IP_MTU_DISCOVER, 4, 0), O(IPPROTO_IP, IP_RECVERR, 4, 0),
    O(IPPROTO_IP, IP_RECVTTL, 4, 0), O(IPPROTO_IP, IP_RECVTOS, 4, 0),
    O(IPPROTO_IP, IP_FREEBIND, 4, 0), O(IPPROTO_IP, IP_PASSSEC, 4, 0),
    O(IPPROTO_IP, IP_TRANSPARENT, 4, 0), O(IPPROTO_IP, IP_RECVORIGDSTADDR, 4, 0),
    O(IPPROTO_IP, IP_MINTTL, 4, 0), O(IPPROTO_IP, IP_CHECKSUM, 4, 0),
    O(IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 4, 0), O(IPPROTO_IP, IP_RECVFRAGSIZE, 4, 0),
    O(IPPROTO_IP, IP_RECVERR_RFC4884, 4, 0), O(IPPROTO_IP, IP_MULTICAST_IF, 4, 0),
    O(IPPROTO_IP, IP_MULTICAST_TTL, 4, 2), O(IPPROTO_IP, IP_MULTICAST_LOOP, 4, 0),
    O(IPPROTO_IP, IP_MULTICAST_ALL, 4, 0), O(IPPROTO_IP, IP_UNICAST_IF, 4, 0),
    O(IPPROTO_IP, IP_LOCAL_PORT_RANGE, 4, 0),
    O(IPPROTO_IPV6, IPV6_2292PKTINFO, 4, 0), O(IPPROTO_IPV6, IPV6_2292HOPOPTS, 4, 0),
    O(IPPROTO_IPV6, IPV6_2292DSTOPTS, 4, 0), O(IPPROTO_IPV6, IPV6_2292RTHDR, 4, 0),
    O(IPPROTO_IPV6, IPV6_2292HOPLIMIT, 4, 0), O(IPPROTO_IPV6, IPV6_FLOWINFO, 4, 0),
    O(IPPROTO_IPV6, IPV6_UNICAST_HOPS, 4, 0), O(IPPROTO_IPV6, IPV6_MULTICAST_IF, 4, 2),
    O(IPPROTO_IPV6, IPV6_MULTICAST_HOPS, 4, 2), O(IPPROTO_IPV6, IPV6_MULTICAST_LOOP, 4, 0),
    O(IPPROTO_IPV6, IPV6_MTU_DISCOVER, 4, 0), O(IPPROTO_IPV6, IPV6_RECVERR, 4, 0),
    O(IPPROTO_IPV6, IPV6_V6ONLY, 4, 0), O(IPPROTO_IPV6, IPV6_MULTICAST_ALL, 4, 0),
    O(IPPROTO_IPV6, IPV6_RECVERR_RFC4884, 4, 0), O(IPPROTO_IPV6, IPV6_FLOWINFO_SEND, 4, 0),
    O(IPPROTO_IPV6, IPV6_RECVPKTINFO, 4, 0), O(IPPROTO_IPV6, IPV6_RECVHOPLIMIT, 4, 0),
    O(IPPROTO_IPV6, IPV6_RECVHOPOPTS, 4, 0), O(IPPROTO_IPV6, IPV6_HOPOPTS, 256, 0),
    O(IPPROTO_IPV6, IPV6_RTHDRDSTOPTS, 256, 0), O(IPPROTO_IPV6, IPV6_RECVRTHDR, 4, 0),
    O(IPPROTO_IPV6, IPV6_RTHDR, 256, 0), O(IPPROTO_IPV6, IPV6_RECVDSTOPTS, 4, 0),
    O(IPPROTO_IPV6, IPV6_DSTOPTS, 256, 0), O(IPPROTO_IPV6, IPV6_RECVPATHMTU, 4, 0),
    O(IPPROTO_IPV6, IPV6_DONTFRAG, 4, 0), O(IPPROTO_IPV6, IPV6_RECVTCLASS, 4, 0),
    O(IPPROTO_IPV6, IPV6_TCLASS, 4, 0), O(IPPROTO_IPV6, IPV6_AUTOFLOWLABEL, 4, 0),
    O(IPPROTO_IPV6, IPV6_ADDR_PREFERENCES, 4, 0), O(IPPROTO_IPV6, IPV6_MINHOPCOUNT, 4, 0),
    O(IPPROTO_IPV6, IPV6_RECVORIGDSTADDR, 4, 0), O(IPPROTO_IPV6, IPV6_TRANSPARENT, 4, 0),
    O(IPPROTO_IPV6, IPV6_UNICAST_IF, 4, 0), O(IPPROTO_IPV6, IPV6_RECVFRAGSIZE, 4, 0),
    O(IPPROTO_IPV6, IPV6_FREEBIND, 4, 0),
    O(IPPROTO_TCP, TCP_NODELAY, 4, 0), O(IPPROTO_TCP, TCP_MAXSEG, 4, 1),
    O(IPPROTO_TCP, TCP_CORK, 4, 0), O(IPPROTO_TCP, TCP_KEEPIDLE, 4, 0),
    O(IPPROTO_TCP, TCP_KEEPINTVL, 4, 0), O(IPPROTO_TCP, TCP_KEEPCNT, 4, 0),
    O(IPPROTO_TCP, TCP_SYNCNT, 4, 0), O(IPPROTO_TCP, TCP_LINGER2, 4, 0),
    O(IPPROTO_TCP, TCP_DEFER_ACCEPT, 4, 0), O(IPPROTO_TCP, TCP_WINDOW_CLAMP, 4, 1),
    O(IPPROTO_TCP, TCP_QUICKACK, 4, 1), O(IPPROTO_TCP, TCP_CONGESTION, 16, 0),
    O(IPPROTO_TCP, TCP_THIN_LINEAR_TIMEOUTS, 4, 0), O(IPPROTO_TCP, TCP_USER_TIMEOUT, 4, 0),
    O(IPPROTO_TCP, TCP_FASTOPEN, 4, 0), O(IPPROTO_TCP, TCP_NOTSENT_LOWAT, 4, 0),
    O(IPPROTO_TCP, TCP_SAVE_SYN, 4, 0), O(IPPROTO_TCP, TCP_FASTOPEN_CONNECT, 4, 0),
    O(IPPROTO_TCP, TCP_ULP, 16, 0), O(IPPROTO_TCP, TCP_FASTOPEN_NO_COOKIE, 4, 0),
    O(IPPROTO_TCP, TCP_INQ, 4, 0), O(IPPROTO_TCP, TCP_TX_DELAY, 4, 0),
    O(IPPROTO_TCP, TCP_RTO_MAX_MS_, 4, 0), O(IPPROTO_TCP, TCP_RTO_MIN_US_, 4, 0),
    O(IPPROTO_TCP, TCP_DELACK_MAX_US_, 4, 0),
    O(SOLU, UDP_CORK, 4, 0), O(SOLU, UDP_SEGMENT, 4, 0), O(SOLU, UDP_GRO, 4, 0),
};
#define NOPTS ((int)(sizeof(optdefs) / sizeof(optdefs[0])))

struct optval {
    int rc, err;
    socklen_t len;
    unsigned char v[256];
};

struct rec {
    char name[32];
    int fd, family, type, established;
    struct sockaddr_storage local, remote;
    socklen_t llen, rlen;
    int rrc;
    struct optval opts[NOPTS];
};
static struct rec recs[40];
static int nrecs;

static void read_opts(int fd, struct optval *out)
{
    for (int i = 0; i < NOPTS; i++) {
        memset(&out[i], 0, sizeof(out[i]));
        out[i].len = (socklen_t)optdefs[i].len;
        out[i].rc = getsockopt(fd, optdefs[i].level, optdefs[i].opt, out[i].v, &out[i].len);
        out[i].err = out[i].rc < 0 ? errno : 0;
    }
}

/* remember fd's names, family and options (after everything is set up) */
static void track(const char *name, int fd, int established)
{
    struct rec *r = &recs[nrecs++];
    snprintf(r->name, sizeof(r->name), "%s", name);
    r->fd = fd;
    r->established = established;
    r->family = get_int(fd, SOL_SOCKET, SO_DOMAIN);
    r->type = get_int(fd, SOL_SOCKET, SO_TYPE);
    r->llen = sizeof(r->local);
    SETUP_CHECK(getsockname(fd, (struct sockaddr *)&r->local, &r->llen) == 0, name);
    r->rlen = sizeof(r->remote);
    r->rrc = getpeername(fd, (struct sockaddr *)&r->remote, &r->rlen) == 0 ? 0 : errno;
}

static void snapshot_all(void)
{
    for (int i = 0; i < nrecs; i++)
        read_opts(recs[i].fd, recs[i].opts);
}

static void hex(char *out, size_t n, const unsigned char *v, socklen_t len)
{
    size_t at = 0;
    out[0] = 0;
    for (socklen_t j = 0; j < len && at + 3 < n; j++)
        at += (size_t)snprintf(out + at, n - at, "%02x", v[j]);
}

static void check_rec(struct rec *r)
{
    CHECK(get_int(r->fd, SOL_SOCKET, SO_DOMAIN) == r->family, "%s: family %d, was %d", r->name,
          get_int(r->fd, SOL_SOCKET, SO_DOMAIN), r->family);
    CHECK(get_int(r->fd, SOL_SOCKET, SO_TYPE) == r->type, "%s: type changed", r->name);
    struct sockaddr_storage a;
    socklen_t l = sizeof(a);
    char h1[80], h2[80];
    if (getsockname(r->fd, (struct sockaddr *)&a, &l) != 0 || l != r->llen ||
        memcmp(&a, &r->local, l)) {
        hex(h1, sizeof(h1), (unsigned char *)&a, l);
        hex(h2, sizeof(h2), (unsigned char *)&r->local, r->llen);
        fail("%s: sockname %s, was %s", r->name, h1, h2);
    }
    l = sizeof(a);
    int rrc = getpeername(r->fd, (struct sockaddr *)&a, &l) == 0 ? 0 : errno;
    if (rrc != r->rrc || (!rrc && (l != r->rlen || memcmp(&a, &r->remote, l)))) {
        hex(h1, sizeof(h1), (unsigned char *)&a, rrc ? 0 : l);
        hex(h2, sizeof(h2), (unsigned char *)&r->remote, r->rrc ? 0 : r->rlen);
        fail("%s: peername %s (errno %d), was %s (errno %d)", r->name, h1, rrc, h2, r->rrc);
    }
    struct optval now[NOPTS];
    read_opts(r->fd, now);
    for (int i = 0; i < NOPTS; i++) {
        struct optval *o = &r->opts[i], *n = &now[i];
        if (optdefs[i].dynamic && r->established)
            continue;
        if (o->rc != n->rc || o->err != n->err || o->len != n->len || memcmp(o->v, n->v, o->len)) {
            hex(h1, sizeof(h1), n->v, n->rc ? 0 : n->len);
            hex(h2, sizeof(h2), o->v, o->rc ? 0 : o->len);
            fail("%s: %s is %s (errno %d), was %s (errno %d)", r->name, optdefs[i].name, h1,
                 n->err, h2, o->err);
        }
    }
}

static void check_recs(void)
{
    for (int i = 0; i < nrecs; i++)
        check_rec(&recs[i]);
}

/* ---- opts ------------------------------------------------------------------------- */

/* set an option, or say why not (an option this kernel lacks is a NOTE, not a failure) */
static void setopt(int s, int level, int opt, const void *v, socklen_t l, const char *name)
{
    if (setsockopt(s, level, opt, v, l) == 0)
        return;
    if (errno == ENOPROTOOPT) {
        say("NOTE pid=%d option=%s unsupported", (int)getpid(), name);
        return;
    }
    say("SETUP FAIL setsockopt %s errno=%d (%s)", name, errno, strerror(errno));
    exit(2);
}
#define SETI(s, l, o, v)                               \
    do {                                               \
        int v_ = (v);                                  \
        setopt(s, l, o, &v_, sizeof(v_), #o);          \
    } while (0)
#define SETB(s, l, o, p, n) setopt(s, l, o, p, n, #o)

static void common_opts(int s, int variant)
{
    /* an even variant: linger off, with a time kept from when it was on */
    struct linger lg = {.l_onoff = 1, .l_linger = 7 + variant}, off = {0, 0};
    struct timeval rt = {.tv_sec = 2, .tv_usec = 250000}, st = {.tv_sec = 1, .tv_usec = 500000};
    SETI(s, SOL_SOCKET, SO_KEEPALIVE, 1);
    SETB(s, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
    if (!(variant & 1))
        SETB(s, SOL_SOCKET, SO_LINGER, &off, sizeof(off));
    SETI(s, SOL_SOCKET, SO_RCVLOWAT, 2 + (variant & 1));
    SETB(s, SOL_SOCKET, SO_RCVTIMEO_OLD, &rt, sizeof(rt));
    SETB(s, SOL_SOCKET, SO_SNDTIMEO_OLD, &st, sizeof(st));
    SETI(s, SOL_SOCKET, SO_PRIORITY, 4 + variant);
    SETI(s, SOL_SOCKET, SO_MARK, 0x1230 + variant);
    SETI(s, SOL_SOCKET, SO_OOBINLINE, 1);
    SETI(s, SOL_SOCKET, SO_DEBUG, 1);
    SETI(s, SOL_SOCKET, SO_DONTROUTE, variant & 1);
    SETI(s, SOL_SOCKET, SO_SELECT_ERR_QUEUE, 1);
    SETI(s, SOL_SOCKET, SO_BUSY_POLL, 10 + variant);
    SETI(s, SOL_SOCKET, SO_PREFER_BUSY_POLL, 1);
    SETI(s, SOL_SOCKET, SO_BUSY_POLL_BUDGET, 16 + variant);
    SETI(s, SOL_SOCKET, SO_RCVMARK, 1);
    uint64_t rate = 12345678 + (uint64_t)variant;
    SETB(s, SOL_SOCKET, SO_MAX_PACING_RATE, &rate, sizeof(rate));
    if (variant & 1)
        SETI(s, SOL_SOCKET, SO_TIMESTAMPNS_OLD, 1);
    else
        SETI(s, SOL_SOCKET, SO_TIMESTAMP_OLD, 1);
    if (variant < 5) /* the UDP ones choose their interface with *_UNICAST_IF instead */
        SETB(s, SOL_SOCKET, SO_BINDTODEVICE, "lo", 3);
}

static void tcp_opts(int s, int variant)
{
    SETI(s, IPPROTO_TCP, TCP_NODELAY, 1);
    SETI(s, IPPROTO_TCP, TCP_KEEPIDLE, 77 + variant);
    SETI(s, IPPROTO_TCP, TCP_KEEPINTVL, 11 + variant);
    SETI(s, IPPROTO_TCP, TCP_KEEPCNT, 4 + variant);
    SETI(s, IPPROTO_TCP, TCP_SYNCNT, 3);
    SETI(s, IPPROTO_TCP, TCP_LINGER2, 30 + variant);
    SETI(s, IPPROTO_TCP, TCP_USER_TIMEOUT, 12345 + variant);
    SETB(s, IPPROTO_TCP, TCP_CONGESTION, "reno", 4);
    SETI(s, IPPROTO_TCP, TCP_NOTSENT_LOWAT, 65536 + variant);
    SETI(s, IPPROTO_TCP, TCP_THIN_LINEAR_TIMEOUTS, 1);
    SETI(s, IPPROTO_TCP, TCP_INQ, 1);
    SETI(s, IPPROTO_TCP, TCP_RTO_MAX_MS_, 60000 + variant);
    SETI(s, IPPROTO_TCP, TCP_RTO_MIN_US_, 100000 + variant);
    SETI(s, IPPROTO_TCP, TCP_DELACK_MAX_US_, 50000 + variant);
}

static void ip_opts(int s, int variant)
{
    SETI(s, IPPROTO_IP, IP_TOS, 0x10 + 4 * variant);
    SETI(s, IPPROTO_IP, IP_TTL, 33 + variant);
    SETI(s, IPPROTO_IP, IP_RECVERR, 1);
    SETI(s, IPPROTO_IP, IP_RECVTOS, 1);
    SETI(s, IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_PROBE);
    SETI(s, IPPROTO_IP, IP_MINTTL, 2);
}

static void ip6_opts(int s, int variant)
{
    SETI(s, IPPROTO_IPV6, IPV6_TCLASS, 0x28 + 4 * variant);
    SETI(s, IPPROTO_IPV6, IPV6_UNICAST_HOPS, 17 + variant);
    SETI(s, IPPROTO_IPV6, IPV6_RECVERR, 1);
    SETI(s, IPPROTO_IPV6, IPV6_MTU_DISCOVER, IPV6_PMTUDISC_PROBE);
    SETI(s, IPPROTO_IPV6, IPV6_RECVTCLASS, 1);
    SETI(s, IPPROTO_IPV6, IPV6_AUTOFLOWLABEL, 0);
    SETI(s, IPPROTO_IPV6, IPV6_MINHOPCOUNT, 2);
    SETI(s, IPPROTO_IPV6, IPV6_ADDR_PREFERENCES, IPV6_PREFER_SRC_PUBLIC);
}

static int opts_l4, opts_l6, opts_port4, opts_port6;

static void opts_setup(void)
{
    /* listeners: options before bind (freebind, transparent, fastopen) and after */
    opts_l4 = socket(AF_INET, SOCK_STREAM, 0);
    SETUP_CHECK(opts_l4 >= 0, "socket");
    SETI(opts_l4, SOL_SOCKET, SO_REUSEADDR, 1);
    SETI(opts_l4, SOL_SOCKET, SO_REUSEPORT, 1);
    SETI(opts_l4, IPPROTO_IP, IP_FREEBIND, 1);
    SETI(opts_l4, IPPROTO_IP, IP_TRANSPARENT, 1);
    common_opts(opts_l4, 0);
    tcp_opts(opts_l4, 0);
    ip_opts(opts_l4, 0);
    SETI(opts_l4, IPPROTO_TCP, TCP_MAXSEG, 1200);
    SETI(opts_l4, IPPROTO_TCP, TCP_DEFER_ACCEPT, 5);
    SETI(opts_l4, IPPROTO_TCP, TCP_FASTOPEN, 16);
    SETI(opts_l4, IPPROTO_TCP, TCP_SAVE_SYN, 1);
    opts_port4 = tcp_listen_on(opts_l4, "127.0.0.1", 0);
    int bufs = 96 * 1024;
    SETI(opts_l4, SOL_SOCKET, SO_RCVBUF, bufs);

    opts_l6 = socket(AF_INET6, SOCK_STREAM, 0);
    SETUP_CHECK(opts_l6 >= 0, "socket6");
    SETI(opts_l6, IPPROTO_IPV6, IPV6_V6ONLY, 1);
    SETI(opts_l6, IPPROTO_IPV6, IPV6_FREEBIND, 1);
    SETI(opts_l6, IPPROTO_IPV6, IPV6_TRANSPARENT, 1);
    common_opts(opts_l6, 1);
    tcp_opts(opts_l6, 1);
    ip6_opts(opts_l6, 1);
    SETI(opts_l6, IPPROTO_TCP, TCP_FASTOPEN, 5);
    opts_port6 = tcp_listen_on(opts_l6, "::1", 0);

    /* connections: the client sets its own, the accepted end inherits the listener's
       and gets more */
    int c4 = socket(AF_INET, SOCK_STREAM, 0);
    common_opts(c4, 2);
    ip_opts(c4, 2);
    tcp_connect_to(c4, "127.0.0.1", opts_port4);
    tcp_opts(c4, 2);
    SETI(c4, SOL_SOCKET, SO_ZEROCOPY, 1);
    SETI(c4, SOL_SOCKET, SO_SNDBUF, 70000);
    /* TCP_DEFER_ACCEPT: the listener wakes up once data came */
    SETUP_CHECK(send(c4, "hhhh", 4, 0) == 4, "hello");
    int a4 = accept_one(opts_l4);
    char h1[4];
    SETUP_CHECK(wait_in(a4, 30) && recv(a4, h1, 4, MSG_WAITALL) == 4, "hello in");
    SETI(a4, SOL_SOCKET, SO_WIFI_STATUS, 1);
    put_stream("opts tcp4 c->a", c4, a4, 30000, 5);
    put_stream("opts tcp4 a->c", a4, c4, 20000, 0);
    /* a peek offset part way into the queued bytes (TCP has SO_PEEK_OFF since 6.9) */
    if (set_int(a4, SOL_SOCKET, SO_PEEK_OFF, 0) == 0) {
        char pk[100];
        SETUP_CHECK(recv(a4, pk, sizeof(pk), MSG_PEEK) == (ssize_t)sizeof(pk), "peek");
    }

    int c6 = socket(AF_INET6, SOCK_STREAM, 0);
    common_opts(c6, 3);
    ip6_opts(c6, 3);
    SETI(c6, IPPROTO_IP, IP_TOS, 0x20); /* SOL_IP on a v6 socket: for v4-mapped traffic */
    tcp_connect_to(c6, "::1", opts_port6);
    tcp_opts(c6, 3);
    SETUP_CHECK(send(c6, "hhhh", 4, 0) == 4, "hello6");
    int a6 = accept_one(opts_l6);
    SETUP_CHECK(wait_in(a6, 30) && recv(a6, h1, 4, MSG_WAITALL) == 4, "hello6 in");
    SETI(a6, IPPROTO_TCP, TCP_NODELAY, 0);
    SETI(a6, IPPROTO_TCP, TCP_CORK, 1);
    put_stream("opts tcp6 c->a", c6, a6, 10000, 0);

    /* unbound TCP with options for a later connect; address-only bound */
    int u = socket(AF_INET, SOCK_STREAM, 0);
    common_opts(u, 4);
    tcp_opts(u, 4);
    SETI(u, IPPROTO_TCP, TCP_FASTOPEN_CONNECT, 1);
    SETI(u, IPPROTO_TCP, TCP_MAXSEG, 1000);
    SETI(u, IPPROTO_TCP, TCP_WINDOW_CLAMP, 40000);
    int nb = socket(AF_INET, SOCK_STREAM, 0);
    SETI(nb, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1);
    uint32_t range = 40000u | (40999u << 16);
    SETB(nb, IPPROTO_IP, IP_LOCAL_PORT_RANGE, &range, sizeof(range));
    struct sockaddr_storage ss;
    socklen_t sl = sa4(&ss, "127.0.0.2", 0);
    SETUP_CHECK(bind(nb, (struct sockaddr *)&ss, sl) == 0, "bind no port");

    /* UDP v4: multicast settings, receive flags */
    int g = socket(AF_INET, SOCK_DGRAM, 0);
    common_opts(g, 5);
    ip_opts(g, 5);
    SETI(g, SOL_SOCKET, SO_BROADCAST, 1);
    SETI(g, SOL_SOCKET, SO_NO_CHECK, 1);
    SETI(g, SOL_SOCKET, SO_RXQ_OVFL, 1);
    int tsflags = SOF_RX_SOFTWARE | SOF_SOFTWARE;
    SETI(g, SOL_SOCKET, SO_TIMESTAMPING_OLD, tsflags);
    SETI(g, IPPROTO_IP, IP_PKTINFO, 1);
    SETI(g, IPPROTO_IP, IP_RECVTTL, 1);
    SETI(g, IPPROTO_IP, IP_RECVOPTS, 1);
    SETI(g, IPPROTO_IP, IP_RETOPTS, 1);
    SETI(g, IPPROTO_IP, IP_RECVORIGDSTADDR, 1);
    SETI(g, IPPROTO_IP, IP_RECVFRAGSIZE, 1);
    SETI(g, IPPROTO_IP, IP_CHECKSUM, 1);
    SETI(g, IPPROTO_IP, IP_MULTICAST_TTL, 5);
    SETI(g, IPPROTO_IP, IP_MULTICAST_LOOP, 0);
    SETI(g, IPPROTO_IP, IP_MULTICAST_ALL, 0);
    struct in_addr mif;
    inet_pton(AF_INET, "127.0.0.1", &mif);
    SETB(g, IPPROTO_IP, IP_MULTICAST_IF, &mif, sizeof(mif));
    SETI(g, IPPROTO_IP, IP_UNICAST_IF, (int)htonl(1));
    unsigned char ipopts[4] = {1, 1, 1, 0}; /* NOP NOP NOP EOL */
    SETB(g, IPPROTO_IP, IP_OPTIONS, ipopts, sizeof(ipopts));
    SETI(g, SOLU, UDP_SEGMENT, 1200);
    SETI(g, SOLU, UDP_GRO, 1);
    SETI(g, SOL_SOCKET, SO_PEEK_OFF, 0);
    sl = sa4(&ss, "127.0.0.1", 0);
    SETUP_CHECK(bind(g, (struct sockaddr *)&ss, sl) == 0, "bind udp");

    /* UDP v6 dual-stack, connected to g over v4-mapped */
    int h = socket(AF_INET6, SOCK_DGRAM, 0);
    common_opts(h, 6);
    ip6_opts(h, 6);
    SETI(h, IPPROTO_IPV6, IPV6_V6ONLY, 0);
    SETI(h, IPPROTO_IPV6, IPV6_RECVPKTINFO, 1);
    SETI(h, IPPROTO_IPV6, IPV6_RECVHOPLIMIT, 1);
    SETI(h, IPPROTO_IPV6, IPV6_RECVHOPOPTS, 1);
    SETI(h, IPPROTO_IPV6, IPV6_RECVRTHDR, 1);
    SETI(h, IPPROTO_IPV6, IPV6_RECVDSTOPTS, 1);
    SETI(h, IPPROTO_IPV6, IPV6_RECVPATHMTU, 1);
    SETI(h, IPPROTO_IPV6, IPV6_RECVORIGDSTADDR, 1);
    SETI(h, IPPROTO_IPV6, IPV6_RECVFRAGSIZE, 1);
    SETI(h, IPPROTO_IPV6, IPV6_DONTFRAG, 1);
    SETI(h, IPPROTO_IPV6, IPV6_MULTICAST_HOPS, 9);
    SETI(h, IPPROTO_IPV6, IPV6_MULTICAST_LOOP, 0);
    SETI(h, IPPROTO_IPV6, IPV6_MULTICAST_ALL, 0);
    SETI(h, IPPROTO_IPV6, IPV6_MULTICAST_IF, 1);
    SETI(h, IPPROTO_IPV6, IPV6_UNICAST_IF, (int)htonl(1));
    SETI(h, IPPROTO_IPV6, IPV6_FLOWINFO, 1);
    SETI(h, IPPROTO_IPV6, IPV6_2292PKTINFO, 1);
    SETI(h, IPPROTO_IPV6, IPV6_2292HOPLIMIT, 1);
    unsigned char hopopts[8] = {0, 0, 1, 4, 0, 0, 0, 0}; /* PadN */
    SETB(h, IPPROTO_IPV6, IPV6_HOPOPTS, hopopts, sizeof(hopopts));
    SETI(h, IPPROTO_IP, IP_TOS, 0x30);
    SETI(h, IPPROTO_IP, IP_TTL, 44);
    SETI(h, SOLU, UDP_CORK, 0);
    char mapped[64];
    snprintf(mapped, sizeof(mapped), "::ffff:127.0.0.1");
    sl = sa6(&ss, mapped, port_of(g));
    SETUP_CHECK(connect(h, (struct sockaddr *)&ss, sl) == 0, "connect udp6 to mapped");

    /* unix */
    int sp[2];
    SETUP_CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sp) == 0, "socketpair");
    SETI(sp[0], SOL_SOCKET, SO_PASSCRED, 1);
    SETI(sp[0], SOL_SOCKET, SO_PASSSEC, 1);
    SETI(sp[0], SOL_SOCKET, SO_PASSPIDFD_, 1);
    SETI(sp[1], SOL_SOCKET, SO_PASSRIGHTS_, 0);
    SETI(sp[1], SOL_SOCKET, SO_RCVLOWAT, 9);
    SETI(sp[1], SOL_SOCKET, SO_PRIORITY, 3);
    SETI(sp[1], SOL_SOCKET, SO_TIMESTAMP_NEW, 1);
    SETI(sp[1], SOL_SOCKET, SO_MARK, 77);
    put_stream("opts unix", sp[0], sp[1], 1000, 0);

    track("tcp4 listener", opts_l4, 0);
    track("tcp6 listener", opts_l6, 0);
    track("tcp4 client", c4, 1);
    track("tcp4 accepted", a4, 1);
    track("tcp6 client", c6, 1);
    track("tcp6 accepted", a6, 1);
    track("tcp4 unbound", u, 0);
    track("tcp4 bound, no port", nb, 0);
    track("udp4", g, 0);
    track("udp6 to v4-mapped", h, 0);
    track("unix a", sp[0], 0);
    track("unix b", sp[1], 0);
    snapshot_all();
}

static void opts_verify(void)
{
    check_recs();
    check_streams();
    round_trip("opts tcp4", recs[2].fd, recs[3].fd);
    round_trip("opts tcp6", recs[4].fd, recs[5].fd);
    round_trip("opts unix", recs[10].fd, recs[11].fd);
    /* the v6 socket still reaches the v4 one through its v4-mapped peer name */
    char b[8];
    CHECK(send(recs[9].fd, "m", 1, 0) == 1 && wait_in(recs[8].fd, 60) &&
              recv(recs[8].fd, b, sizeof(b), MSG_DONTWAIT) == 1,
          "udp6 -> udp4 over v4-mapped: errno %d", errno);
    /* listeners still listen (the v4 one defers accept until data comes) */
    int ports[2] = {opts_port4, opts_port6}, ls[2] = {opts_l4, opts_l6};
    const char *hosts[2] = {"127.0.0.1", "::1"};
    for (int i = 0; i < 2; i++) {
        int n = socket(i ? AF_INET6 : AF_INET, SOCK_STREAM, 0);
        tcp_connect_to(n, hosts[i], ports[i]);
        CHECK(send(n, "hhhh", 4, 0) == 4, "send to new connection %d", i);
        int a = wait_in(ls[i], 60) ? accept(ls[i], NULL, NULL) : -1;
        CHECK(a >= 0, "listener %s: no new connection (errno %d)", hosts[i], errno);
        if (a >= 0) {
            CHECK(wait_in(a, 60) && recv(a, b, 4, MSG_DONTWAIT) == 4, "new %d: hello", i);
            round_trip(i ? "new tcp6" : "new tcp4", n, a);
        }
    }
}

/* ---- inet: families, names, V6ONLY ------------------------------------------------- */

static int in_l4, in_l6, in_ld, in_lv, in_lv4, in_p4, in_p6, in_pd, in_pv;

static void pair(const char *name, int family, const char *host, int lsock, int port,
                 int *cp, int *ap)
{
    int c = tcp_socket(family, -1);
    tcp_connect_to(c, host, port);
    int a = accept_one(lsock);
    char n[48];
    snprintf(n, sizeof(n), "%s c->a", name);
    put_stream(n, c, a, 40000, 3);
    snprintf(n, sizeof(n), "%s a->c", name);
    put_stream(n, a, c, 30000, 0);
    snprintf(n, sizeof(n), "%s client", name);
    track(n, c, 1);
    snprintf(n, sizeof(n), "%s accepted", name);
    track(n, a, 1);
    *cp = c;
    *ap = a;
}

static int in_c[6], in_a[6], in_pairs = 5;
static const char *in_names[6] = {"v4", "v6", "v6 to v4-mapped", "v4 to dual-stack",
                                  "v6 to dual-stack", "link-local v6"};
static struct sockaddr_in6 in_ll; /* a link-local address of this host, with its scope */

static int find_link_local(void)
{
    struct ifaddrs *ifs, *i;
    int found = 0;
    if (getifaddrs(&ifs) != 0)
        return 0;
    for (i = ifs; i && !found; i = i->ifa_next) {
        if (!i->ifa_addr || i->ifa_addr->sa_family != AF_INET6)
            continue;
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)i->ifa_addr;
        if (IN6_IS_ADDR_LINKLOCAL(&a->sin6_addr) && a->sin6_scope_id) {
            in_ll = *a;
            found = 1;
        }
    }
    freeifaddrs(ifs);
    return found;
}
static int in_u6, in_u6c, in_um, in_u4;

static void inet_setup(void)
{
    in_l4 = tcp_socket(AF_INET, -1);
    in_p4 = tcp_listen_on(in_l4, "127.0.0.1", 0);
    in_l6 = tcp_socket(AF_INET6, 1);
    in_p6 = tcp_listen_on(in_l6, "::1", 0);
    in_ld = tcp_socket(AF_INET6, 0); /* dual-stack on [::] */
    in_pd = tcp_listen_on(in_ld, "::", 0);
    /* v6-only on [::], its port also taken over IPv4 by another listener: without
       V6ONLY set again before bind, one of them could not be restored */
    in_lv = socket(AF_INET6, SOCK_STREAM, 0);
    SETUP_CHECK(set_int(in_lv, IPPROTO_IPV6, IPV6_V6ONLY, 1) == 0, "v6only");
    in_pv = tcp_listen_on(in_lv, "::", 0);
    in_lv4 = socket(AF_INET, SOCK_STREAM, 0);
    tcp_listen_on(in_lv4, "127.0.0.1", in_pv);
    track("listener v4", in_l4, 0);
    track("listener v6 (v6only)", in_l6, 0);
    track("listener dual-stack", in_ld, 0);
    track("listener [::] v6only", in_lv, 0);
    track("listener v4 on the v6only port", in_lv4, 0);

    pair(in_names[0], AF_INET, "127.0.0.1", in_l4, in_p4, &in_c[0], &in_a[0]);
    pair(in_names[1], AF_INET6, "::1", in_l6, in_p6, &in_c[1], &in_a[1]);
    pair(in_names[2], AF_INET6, "::ffff:127.0.0.1", in_ld, in_pd, &in_c[2], &in_a[2]);
    pair(in_names[3], AF_INET, "127.0.0.1", in_ld, in_pd, &in_c[3], &in_a[3]);
    pair(in_names[4], AF_INET6, "::1", in_ld, in_pd, &in_c[4], &in_a[4]);
    if (find_link_local()) { /* names with a scope id; connections bound to the interface */
        int l = socket(AF_INET6, SOCK_STREAM, 0);
        struct sockaddr_in6 a = in_ll;
        a.sin6_port = 0;
        SETUP_CHECK(bind(l, (struct sockaddr *)&a, sizeof(a)) == 0, "bind link-local");
        SETUP_CHECK(listen(l, 4) == 0, "listen link-local");
        socklen_t al = sizeof(a);
        getsockname(l, (struct sockaddr *)&a, &al);
        int c = socket(AF_INET6, SOCK_STREAM, 0);
        SETUP_CHECK(connect(c, (struct sockaddr *)&a, sizeof(a)) == 0, "connect link-local");
        in_c[5] = c;
        in_a[5] = accept_one(l);
        put_stream("link-local c->a", c, in_a[5], 20000, 0);
        put_stream("link-local a->c", in_a[5], c, 20000, 7);
        track("link-local listener", l, 0);
        track("link-local client", c, 1);
        track("link-local accepted", in_a[5], 1);
        in_pairs = 6;
    } else {
        say("NOTE pid=%d no link-local IPv6 address: that case is left out", (int)getpid());
    }

    /* bound, not listening: v6, and dual-stack [::] */
    struct sockaddr_storage ss;
    socklen_t sl;
    int b6 = socket(AF_INET6, SOCK_STREAM, 0);
    sl = sa6(&ss, "::1", 0);
    SETUP_CHECK(bind(b6, (struct sockaddr *)&ss, sl) == 0, "bind b6");
    track("bound v6", b6, 0);
    int bd = socket(AF_INET6, SOCK_STREAM, 0);
    SETUP_CHECK(set_int(bd, IPPROTO_IPV6, IPV6_V6ONLY, 0) == 0, "v6only 0");
    sl = sa6(&ss, "::", 0);
    SETUP_CHECK(bind(bd, (struct sockaddr *)&ss, sl) == 0, "bind bd");
    track("bound [::] dual-stack", bd, 0);
    int bm = socket(AF_INET6, SOCK_STREAM, 0);
    sl = sa6(&ss, "::ffff:127.0.0.1", 0);
    SETUP_CHECK(bind(bm, (struct sockaddr *)&ss, sl) == 0, "bind bm");
    track("bound v4-mapped", bm, 0);

    /* UDP: v6 bound, v6 connected to it, dual-stack bound on [::] with a v4 peer */
    in_u6 = socket(AF_INET6, SOCK_DGRAM, 0);
    sl = sa6(&ss, "::1", 0);
    SETUP_CHECK(bind(in_u6, (struct sockaddr *)&ss, sl) == 0, "bind u6");
    in_u6c = socket(AF_INET6, SOCK_DGRAM, 0);
    sl = sa6(&ss, "::1", port_of(in_u6));
    SETUP_CHECK(connect(in_u6c, (struct sockaddr *)&ss, sl) == 0, "connect u6c");
    in_um = socket(AF_INET6, SOCK_DGRAM, 0);
    SETUP_CHECK(set_int(in_um, IPPROTO_IPV6, IPV6_V6ONLY, 0) == 0, "um v6only 0");
    sl = sa6(&ss, "::", 0);
    SETUP_CHECK(bind(in_um, (struct sockaddr *)&ss, sl) == 0, "bind um");
    in_u4 = socket(AF_INET, SOCK_DGRAM, 0);
    sl = sa4(&ss, "127.0.0.1", port_of(in_um));
    SETUP_CHECK(connect(in_u4, (struct sockaddr *)&ss, sl) == 0, "connect u4");
    int umc = socket(AF_INET6, SOCK_DGRAM, 0);
    sl = sa6(&ss, "::ffff:127.0.0.1", port_of(in_u4));
    SETUP_CHECK(connect(umc, (struct sockaddr *)&ss, sl) == 0, "connect umc");
    track("udp v6 bound", in_u6, 0);
    track("udp v6 connected", in_u6c, 0);
    track("udp dual-stack bound", in_um, 0);
    track("udp v4 to dual-stack", in_u4, 0);
    track("udp v6 to v4-mapped", umc, 0);
    snapshot_all();
}

/* connect to host:port over family; the listener that takes it accepts it */
static void new_connection(const char *what, int family, const char *host, int port, int lsock)
{
    int n = socket(family, SOCK_STREAM | SOCK_NONBLOCK, 0);
    struct sockaddr_storage ss;
    socklen_t sl = sa_any(&ss, host, port);
    int r = connect(n, (struct sockaddr *)&ss, sl);
    CHECK(r == 0 || errno == EINPROGRESS, "%s: connect errno %d", what, errno);
    int a = wait_in(lsock, 60) ? accept(lsock, NULL, NULL) : -1;
    CHECK(a >= 0, "%s: not accepted (errno %d)", what, errno);
    if (a < 0)
        return;
    struct pollfd p = {.fd = n, .events = POLLOUT};
    poll(&p, 1, 10000);
    int fl = fcntl(n, F_GETFL);
    fcntl(n, F_SETFL, fl & ~O_NONBLOCK);
    round_trip(what, n, a);
    close(n);
    close(a);
}

static void inet_verify(void)
{
    check_recs();
    check_streams();
    for (int i = 0; i < in_pairs; i++)
        round_trip(in_names[i], in_c[i], in_a[i]);
    new_connection("new v4", AF_INET, "127.0.0.1", in_p4, in_l4);
    new_connection("new v6", AF_INET6, "::1", in_p6, in_l6);
    new_connection("new v4 to dual-stack", AF_INET, "127.0.0.1", in_pd, in_ld);
    new_connection("new v6 to dual-stack", AF_INET6, "::1", in_pd, in_ld);
    new_connection("new v4-mapped to dual-stack", AF_INET6, "::ffff:127.0.0.1", in_pd, in_ld);
    new_connection("new v6 to the v6only [::]", AF_INET6, "::1", in_pv, in_lv);
    /* over IPv4 the v6-only port belongs to the v4 listener */
    new_connection("new v4 to the v6only port", AF_INET, "127.0.0.1", in_pv, in_lv4);
    CHECK(!wait_in(in_lv, 0), "the v6only listener got an IPv4 connection");
    /* UDP both ways */
    char b[8];
    struct sockaddr_storage from;
    socklen_t fl = sizeof(from);
    CHECK(send(in_u6c, "a", 1, 0) == 1 && wait_in(in_u6, 60) &&
              recvfrom(in_u6, b, sizeof(b), MSG_DONTWAIT, (struct sockaddr *)&from, &fl) == 1,
          "udp v6: errno %d", errno);
    CHECK(sendto(in_u6, "b", 1, 0, (struct sockaddr *)&from, fl) == 1 && wait_in(in_u6c, 60) &&
              recv(in_u6c, b, sizeof(b), MSG_DONTWAIT) == 1,
          "udp v6 back: errno %d", errno);
    fl = sizeof(from);
    CHECK(send(in_u4, "c", 1, 0) == 1 && wait_in(in_um, 60) &&
              recvfrom(in_um, b, sizeof(b), MSG_DONTWAIT, (struct sockaddr *)&from, &fl) == 1,
          "udp v4 -> dual-stack: errno %d", errno);
    CHECK(fl == sizeof(struct sockaddr_in6) && from.ss_family == AF_INET6,
          "dual-stack udp: the v4 sender is not v4-mapped (len %d)", (int)fl);
    CHECK(sendto(in_um, "d", 1, 0, (struct sockaddr *)&from, fl) == 1 && wait_in(in_u4, 60) &&
              recv(in_u4, b, sizeof(b), MSG_DONTWAIT) == 1,
          "udp dual-stack -> v4: errno %d", errno);
}

/* ---- ext6: connections to and from the test over v6 and v4-mapped ------------------ */

#define EXT_N 5
static int ext_fd[EXT_N];
static const char *ext_names[EXT_N] = {"accepted over ::1", "accepted over 127.0.0.1",
                                       "accepted by the v6-only listener", "out to ::1",
                                       "out to ::ffff:127.0.0.1"};

static void ext6_setup(int test_port)
{
    int l = tcp_socket(AF_INET6, 0);
    int port = tcp_listen_on(l, "::", 0);
    int l6 = tcp_socket(AF_INET6, 1);
    int port6 = tcp_listen_on(l6, "::", 0);
    say("READY pid=%d port=%d port6=%d mode=ext6", (int)getpid(), port, port6);
    /* the test connects over ::1 first, then over 127.0.0.1, then to the v6-only one */
    for (int i = 0; i < 3; i++) {
        int from = i < 2 ? l : l6;
        SETUP_CHECK(wait_in(from, 60), "test connection");
        ext_fd[i] = accept(from, NULL, NULL);
        SETUP_CHECK(ext_fd[i] >= 0, "accept ext6");
    }
    ext_fd[3] = tcp_connect_to(tcp_socket(AF_INET6, -1), "::1", test_port);
    ext_fd[4] = tcp_connect_to(tcp_socket(AF_INET6, -1), "::ffff:127.0.0.1", test_port);
    track("v6-only listener", l6, 0);
    unsigned char buf[EXT_OUT];
    for (int i = 0; i < EXT_N; i++) {
        for (size_t j = 0; j < sizeof(buf); j++)
            buf[j] = pat(10 + i, j);
        SETUP_CHECK(send(ext_fd[i], buf, sizeof(buf), 0) == (ssize_t)sizeof(buf), "send ext6");
        track(ext_names[i], ext_fd[i], 1);
    }
    track("dual-stack listener", l, 0);
    snapshot_all();
    say("ACCEPTED pid=%d", (int)getpid());
}

static void ext6_verify(void)
{
    char *txt;
    size_t total = 0;
    if (read_file("total", &txt) >= 0) {
        total = strtoul(txt, NULL, 10);
        free(txt);
    }
    CHECK(total > 0, "no total file");
    check_recs();
    for (int i = 0; i < EXT_N; i++) {
        struct stream s = {.k = 20 + i, .rx = ext_fd[i], .sent = total};
        snprintf(s.name, sizeof(s.name), "from the test, %s", ext_names[i]);
        check_stream(&s);
        CHECK(send(ext_fd[i], "bye", 3, MSG_NOSIGNAL) == 3, "%s: send bye errno %d",
              ext_names[i], errno);
    }
}

/* ---- bpf: classic filters come back and still filter --------------------------------- */

static int bf_udp, bf_unix[2], bf_tc, bf_ta;
/* UDP: the filter sees the UDP header first; keep datagrams whose byte 0 is 'A' */
static struct sock_filter udp_prog[] = {
    BPF_STMT(BPF_LD | BPF_B | BPF_ABS, 8),
    BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, 'A', 0, 1),
    BPF_STMT(BPF_RET | BPF_K, 0xffff),
    BPF_STMT(BPF_RET | BPF_K, 0),
};
/* unix: keep messages shorter than 100 bytes */
static struct sock_filter unix_prog[] = {
    BPF_STMT(BPF_LD | BPF_W | BPF_LEN, 0),
    BPF_JUMP(BPF_JMP | BPF_JGE | BPF_K, 100, 0, 1),
    BPF_STMT(BPF_RET | BPF_K, 0),
    BPF_STMT(BPF_RET | BPF_K, 0xffffffff),
};
static struct sock_filter all_prog[] = {BPF_STMT(BPF_RET | BPF_K, 0xffffffff)};

static void attach(int s, struct sock_filter *p, unsigned short n)
{
    struct sock_fprog f = {.len = n, .filter = p};
    SETUP_CHECK(setsockopt(s, SOL_SOCKET, SO_ATTACH_FILTER, &f, sizeof(f)) == 0, "attach");
}

static void check_filter(const char *name, int s, struct sock_filter *p, unsigned short n)
{
    struct sock_filter got[16];
    socklen_t l = 0;
    CHECK(getsockopt(s, SOL_SOCKET, SO_GET_FILTER, NULL, &l) == 0 && l == n,
          "%s: %d filter instructions, want %d (errno %d)", name, (int)l, n, errno);
    l = 16;
    CHECK(getsockopt(s, SOL_SOCKET, SO_GET_FILTER, got, &l) == 0 && l == n &&
              !memcmp(got, p, n * sizeof(*p)),
          "%s: the filter differs", name);
}

static void bpf_setup(void)
{
    struct sockaddr_storage ss;
    socklen_t sl = sa4(&ss, "127.0.0.1", 0);
    bf_udp = socket(AF_INET, SOCK_DGRAM, 0);
    SETUP_CHECK(bind(bf_udp, (struct sockaddr *)&ss, sl) == 0, "bind");
    attach(bf_udp, udp_prog, 4);
    SETUP_CHECK(set_int(bf_udp, SOL_SOCKET, SO_LOCK_FILTER, 1) == 0, "lock");
    SETUP_CHECK(socketpair(AF_UNIX, SOCK_DGRAM, 0, bf_unix) == 0, "socketpair");
    attach(bf_unix[1], unix_prog, 4);
    SETUP_CHECK(send(bf_unix[0], "queued", 6, 0) == 6, "queued");
    char big[200];
    memset(big, 'x', sizeof(big));
    SETUP_CHECK(send(bf_unix[0], big, sizeof(big), 0) == (ssize_t)sizeof(big), "dropped");
    int l = tcp_socket(AF_INET, -1);
    int port = tcp_listen_on(l, "127.0.0.1", 0);
    bf_tc = tcp_connect_to(tcp_socket(AF_INET, -1), "127.0.0.1", port);
    bf_ta = accept_one(l);
    attach(bf_ta, all_prog, 1);
    put_stream("filtered tcp", bf_tc, bf_ta, 10000, 0);
    track("udp with filter", bf_udp, 0);
    track("unix with filter", bf_unix[1], 0);
    track("tcp with filter", bf_ta, 1);
    snapshot_all();
}

static void bpf_verify(void)
{
    check_recs();
    check_filter("udp", bf_udp, udp_prog, 4);
    check_filter("unix", bf_unix[1], unix_prog, 4);
    check_filter("tcp", bf_ta, all_prog, 1);
    CHECK(get_int(bf_udp, SOL_SOCKET, SO_LOCK_FILTER) == 1, "udp: SO_LOCK_FILTER lost");
    int z = 0;
    CHECK(setsockopt(bf_udp, SOL_SOCKET, SO_DETACH_FILTER, &z, sizeof(z)) < 0 && errno == EPERM,
          "udp: the locked filter could be detached");
    /* one dropped, one kept: only the kept one arrives */
    struct sockaddr_storage ss;
    socklen_t sl = sizeof(ss);
    getsockname(bf_udp, (struct sockaddr *)&ss, &sl);
    int tx = socket(AF_INET, SOCK_DGRAM, 0);
    char b[64];
    CHECK(sendto(tx, "Bdropped", 8, 0, (struct sockaddr *)&ss, sl) == 8, "send B");
    CHECK(sendto(tx, "Akept", 5, 0, (struct sockaddr *)&ss, sl) == 5, "send A");
    ssize_t r = wait_in(bf_udp, 60) ? recv(bf_udp, b, sizeof(b), MSG_DONTWAIT) : -1;
    CHECK(r == 5 && !memcmp(b, "Akept", 5), "udp: got %zd bytes (%.*s), want Akept", r,
          r > 0 ? (int)r : 0, b);
    r = recv(bf_udp, b, sizeof(b), MSG_DONTWAIT);
    CHECK(r < 0 && errno == EAGAIN, "udp: a datagram the filter drops arrived (%zd)", r);
    /* unix: the queued short message, then a long one is dropped and a short one kept */
    r = recv(bf_unix[1], b, sizeof(b), MSG_DONTWAIT);
    CHECK(r == 6 && !memcmp(b, "queued", 6), "unix: queued message lost (%zd)", r);
    char big[200];
    memset(big, 'y', sizeof(big));
    CHECK(send(bf_unix[0], big, sizeof(big), 0) == (ssize_t)sizeof(big), "unix send big");
    CHECK(send(bf_unix[0], "short", 5, 0) == 5, "unix send short");
    r = recv(bf_unix[1], b, sizeof(b), MSG_DONTWAIT);
    CHECK(r == 5, "unix: got %zd bytes, want the short message", r);
    check_streams();
    round_trip("filtered tcp", bf_tc, bf_ta);
}

/* ---- ebpf: cannot be read back, ckpt must refuse --------------------------------------- */

static void ebpf_setup(void)
{
    struct bpf_insn prog[] = {
        {.code = BPF_ALU64 | BPF_MOV | BPF_K, .dst_reg = BPF_REG_0, .imm = -1},
        {.code = BPF_JMP | BPF_EXIT},
    };
    union bpf_attr attr;
    memset(&attr, 0, sizeof(attr));
    attr.prog_type = BPF_PROG_TYPE_SOCKET_FILTER;
    attr.insns = (uint64_t)(uintptr_t)prog;
    attr.insn_cnt = 2;
    attr.license = (uint64_t)(uintptr_t) "GPL";
    int pfd = (int)syscall(__NR_bpf, BPF_PROG_LOAD, &attr, sizeof(attr));
    SETUP_CHECK(pfd >= 0, "bpf prog load");
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    SETUP_CHECK(setsockopt(s, SOL_SOCKET, SO_ATTACH_BPF, &pfd, sizeof(pfd)) == 0, "attach bpf");
    close(pfd);
    say("READY pid=%d mode=ebpf fd=%d", (int)getpid(), s);
}

/* ---- mcast: group memberships and their source filters -------------------------------- */

#ifndef MCAST_MSFILTER
#define MCAST_MSFILTER 48
#endif
static int mc_r4, mc_r6, mc_tx4, mc_tx6, mc_port4, mc_port6, mc_if, mc_groups;
static struct in_addr mc_src;
static const char *mc_g4[3] = {"239.77.1.1", "239.77.1.2", "239.77.1.3"};
static const char *mc_g6 = "ff15::77:1";

struct msf {
    int rc, err, fmode, numsrc;
    struct sockaddr_storage src[4];
};
static struct msf mc_before[4];

static int find_mcast_if(void)
{
    struct ifaddrs *ifs, *i;
    int found = 0;
    if (getifaddrs(&ifs) != 0)
        return 0;
    for (i = ifs; i && !found; i = i->ifa_next) {
        unsigned want = IFF_UP | IFF_MULTICAST;
        if (!i->ifa_addr || i->ifa_addr->sa_family != AF_INET || (i->ifa_flags & want) != want ||
            (i->ifa_flags & IFF_LOOPBACK))
            continue;
        mc_src = ((struct sockaddr_in *)i->ifa_addr)->sin_addr;
        mc_if = (int)if_nametoindex(i->ifa_name);
        found = mc_if > 0;
    }
    freeifaddrs(ifs);
    return found;
}

static void read_msf(int s, int level, int family, const char *group, struct msf *out)
{
    union {
        struct group_filter gf;
        char raw[sizeof(struct group_filter) + 4 * sizeof(struct sockaddr_storage)];
    } u;
    memset(&u, 0, sizeof(u));
    u.gf.gf_interface = (uint32_t)mc_if;
    struct sockaddr_storage ss;
    sa_any(&ss, group, 0);
    memcpy(&u.gf.gf_group, &ss, sizeof(ss));
    u.gf.gf_numsrc = 4;
    socklen_t l = sizeof(u);
    memset(out, 0, sizeof(*out));
    out->rc = getsockopt(s, level, MCAST_MSFILTER, &u, &l);
    out->err = out->rc ? errno : 0;
    out->fmode = (int)u.gf.gf_fmode;
    out->numsrc = (int)u.gf.gf_numsrc;
    for (int i = 0; i < out->numsrc && i < 4; i++)
        memcpy(&out->src[i], &u.gf.gf_slist[i], sizeof(out->src[i]));
    (void)family;
}

static void read_all_msf(struct msf *out)
{
    for (int i = 0; i < 3; i++)
        read_msf(mc_r4, IPPROTO_IP, AF_INET, mc_g4[i], &out[i]);
    read_msf(mc_r6, IPPROTO_IPV6, AF_INET6, mc_g6, &out[3]);
}

/* send one datagram to each IPv4 group and the IPv6 one; which arrive */
static int mc_round(void)
{
    struct sockaddr_storage ss;
    socklen_t sl;
    char b[16];
    int got = 0;
    for (int i = 0; i < 3; i++) {
        sl = sa4(&ss, mc_g4[i], mc_port4);
        char m = (char)('1' + i);
        CHECK(sendto(mc_tx4, &m, 1, 0, (struct sockaddr *)&ss, sl) == 1, "send to %s errno %d",
              mc_g4[i], errno);
    }
    sl = sa6(&ss, mc_g6, mc_port6);
    CHECK(sendto(mc_tx6, "6", 1, 0, (struct sockaddr *)&ss, sl) == 1, "send to %s errno %d", mc_g6,
          errno);
    double end = mono_now() + 3;
    while (mono_now() < end) {
        ssize_t r = recv(mc_r4, b, sizeof(b), MSG_DONTWAIT);
        if (r == 1)
            got |= 1 << (b[0] - '1');
        r = recv(mc_r6, b, sizeof(b), MSG_DONTWAIT);
        if (r == 1)
            got |= 8;
        if ((got & 0xb) == 0xb) { /* what should come came; give the rest a moment */
            usleep(200000);
            if (recv(mc_r4, b, sizeof(b), MSG_DONTWAIT) == 1)
                got |= 1 << (b[0] - '1');
            break;
        }
        usleep(10000);
    }
    return got;
}

static void mcast_setup(void)
{
    if (!find_mcast_if()) {
        say("NOTE pid=%d no multicast interface with an IPv4 address", (int)getpid());
        return;
    }
    struct sockaddr_storage ss;
    socklen_t sl;
    mc_r4 = socket(AF_INET, SOCK_DGRAM, 0);
    SETUP_CHECK(set_int(mc_r4, IPPROTO_IP, IP_MULTICAST_ALL, 0) == 0, "multicast all");
    sl = sa4(&ss, "0.0.0.0", 0);
    SETUP_CHECK(bind(mc_r4, (struct sockaddr *)&ss, sl) == 0, "bind r4");
    mc_port4 = port_of(mc_r4);
    struct ip_mreqn mr = {.imr_ifindex = mc_if};
    inet_pton(AF_INET, mc_g4[0], &mr.imr_multiaddr);
    SETUP_CHECK(setsockopt(mc_r4, IPPROTO_IP, IP_ADD_MEMBERSHIP, &mr, sizeof(mr)) == 0, "join 1");
    struct ip_mreq_source ms = {.imr_interface = mc_src, .imr_sourceaddr = mc_src};
    inet_pton(AF_INET, mc_g4[1], &ms.imr_multiaddr);
    SETUP_CHECK(setsockopt(mc_r4, IPPROTO_IP, IP_ADD_SOURCE_MEMBERSHIP, &ms, sizeof(ms)) == 0,
                "join 2 from one source");
    inet_pton(AF_INET, mc_g4[2], &mr.imr_multiaddr);
    SETUP_CHECK(setsockopt(mc_r4, IPPROTO_IP, IP_ADD_MEMBERSHIP, &mr, sizeof(mr)) == 0, "join 3");
    inet_pton(AF_INET, mc_g4[2], &ms.imr_multiaddr);
    SETUP_CHECK(setsockopt(mc_r4, IPPROTO_IP, IP_BLOCK_SOURCE, &ms, sizeof(ms)) == 0, "block");

    mc_r6 = socket(AF_INET6, SOCK_DGRAM, 0);
    SETUP_CHECK(set_int(mc_r6, IPPROTO_IPV6, IPV6_MULTICAST_ALL, 0) == 0, "multicast all 6");
    sl = sa6(&ss, "::", 0);
    SETUP_CHECK(bind(mc_r6, (struct sockaddr *)&ss, sl) == 0, "bind r6");
    mc_port6 = port_of(mc_r6);
    struct ipv6_mreq m6 = {.ipv6mr_interface = (unsigned)mc_if};
    inet_pton(AF_INET6, mc_g6, &m6.ipv6mr_multiaddr);
    SETUP_CHECK(setsockopt(mc_r6, IPPROTO_IPV6, IPV6_JOIN_GROUP, &m6, sizeof(m6)) == 0, "join 6");

    mc_tx4 = socket(AF_INET, SOCK_DGRAM, 0);
    SETUP_CHECK(setsockopt(mc_tx4, IPPROTO_IP, IP_MULTICAST_IF, &mc_src, sizeof(mc_src)) == 0,
                "multicast if");
    SETUP_CHECK(set_int(mc_tx4, IPPROTO_IP, IP_MULTICAST_TTL, 0) == 0, "ttl 0");
    mc_tx6 = socket(AF_INET6, SOCK_DGRAM, 0);
    SETUP_CHECK(set_int(mc_tx6, IPPROTO_IPV6, IPV6_MULTICAST_IF, mc_if) == 0, "multicast if 6");
    SETUP_CHECK(set_int(mc_tx6, IPPROTO_IPV6, IPV6_MULTICAST_HOPS, 0) == 0, "hops 0");

    int got = mc_round();
    if (got != 0xb) {
        say("NOTE pid=%d multicast loopback delivers %#x, not 0xb: nothing checked", (int)getpid(),
            got);
        return;
    }
    read_all_msf(mc_before);
    track("multicast receiver v4", mc_r4, 0);
    track("multicast receiver v6", mc_r6, 0);
    snapshot_all();
    mc_groups = 4;
}

static void mcast_verify(void)
{
    if (!mc_groups)
        return;
    check_recs();
    struct msf now[4];
    read_all_msf(now);
    for (int i = 0; i < 4; i++) {
        const char *g = i < 3 ? mc_g4[i] : mc_g6;
        struct msf *a = &mc_before[i], *b = &now[i];
        CHECK(a->rc == b->rc && a->fmode == b->fmode && a->numsrc == b->numsrc &&
                  !memcmp(a->src, b->src, sizeof(a->src)),
              "group %s: rc %d errno %d mode %d %d sources, was rc %d mode %d %d sources", g,
              b->rc, b->err, b->fmode, b->numsrc, a->rc, a->fmode, a->numsrc);
    }
    struct msf none;
    read_msf(mc_r4, IPPROTO_IP, AF_INET, "239.77.1.9", &none);
    CHECK(none.rc < 0 && none.err == EADDRNOTAVAIL, "a group never joined: rc %d errno %d",
          none.rc, none.err);
    int got = mc_round();
    CHECK(got == 0xb, "datagrams arrived for %#x (1, 2: IPv4 groups; 4: the blocked source; "
                      "8: IPv6), want 0xb", got);
}

/* ---- what ckpt cannot read back: it must refuse ------------------------------------ */

static void md5_setup(void)
{
    int l = tcp_socket(AF_INET, -1);
    struct tcp_md5sig m;
    memset(&m, 0, sizeof(m));
    struct sockaddr_in *peer = (struct sockaddr_in *)&m.tcpm_addr;
    peer->sin_family = AF_INET;
    inet_pton(AF_INET, "127.0.0.1", &peer->sin_addr);
    m.tcpm_keylen = 6;
    memcpy(m.tcpm_key, "secret", 6);
    SETUP_CHECK(setsockopt(l, IPPROTO_TCP, TCP_MD5SIG, &m, sizeof(m)) == 0, "md5 key");
    tcp_listen_on(l, "127.0.0.1", 0);
    say("READY pid=%d mode=md5 fd=%d", (int)getpid(), l);
}

static void tsid_setup(void)
{
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    int flags = SOF_SOFTWARE | (1 << 1) /* TX_SOFTWARE */ | (1 << 7) /* OPT_ID */;
    SETUP_CHECK(set_int(s, SOL_SOCKET, SO_TIMESTAMPING_OLD, flags) == 0, "timestamping");
    say("READY pid=%d mode=tsid fd=%d", (int)getpid(), s);
}

/* ---- shut: UDP shutdown states --------------------------------------------------------- */

static int sh_rd, sh_wr, sh_rdwr, sh_rd6, sh_peer, sh_peer6;

static void shut_setup(void)
{
    struct sockaddr_storage ss;
    socklen_t sl = sa4(&ss, "127.0.0.1", 0);
    sh_peer = socket(AF_INET, SOCK_DGRAM, 0);
    SETUP_CHECK(bind(sh_peer, (struct sockaddr *)&ss, sl) == 0, "bind peer");
    sl = sizeof(ss);
    getsockname(sh_peer, (struct sockaddr *)&ss, &sl);
    sh_rd = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_storage any;
    socklen_t al = sa4(&any, "127.0.0.1", 0);
    SETUP_CHECK(bind(sh_rd, (struct sockaddr *)&any, al) == 0, "bind rd");
    /* unconnected: ENOTCONN, but the read side is shut all the same */
    SETUP_CHECK(shutdown(sh_rd, SHUT_RD) < 0 && errno == ENOTCONN, "shutdown unconnected");
    sh_wr = socket(AF_INET, SOCK_DGRAM, 0);
    SETUP_CHECK(connect(sh_wr, (struct sockaddr *)&ss, sl) == 0, "connect wr");
    SETUP_CHECK(shutdown(sh_wr, SHUT_WR) == 0, "shutdown wr");
    sh_rdwr = socket(AF_INET, SOCK_DGRAM, 0);
    SETUP_CHECK(connect(sh_rdwr, (struct sockaddr *)&ss, sl) == 0, "connect rdwr");
    SETUP_CHECK(shutdown(sh_rdwr, SHUT_RDWR) == 0, "shutdown rdwr");
    sh_peer6 = socket(AF_INET6, SOCK_DGRAM, 0);
    struct sockaddr_storage s6;
    socklen_t l6 = sa6(&s6, "::1", 0);
    SETUP_CHECK(bind(sh_peer6, (struct sockaddr *)&s6, l6) == 0, "bind peer6");
    l6 = sizeof(s6);
    getsockname(sh_peer6, (struct sockaddr *)&s6, &l6);
    sh_rd6 = socket(AF_INET6, SOCK_DGRAM, 0);
    SETUP_CHECK(connect(sh_rd6, (struct sockaddr *)&s6, l6) == 0, "connect rd6");
    SETUP_CHECK(shutdown(sh_rd6, SHUT_RD) == 0, "shutdown rd6");
    track("udp SHUT_RD unconnected", sh_rd, 0);
    track("udp SHUT_WR", sh_wr, 0);
    track("udp SHUT_RDWR", sh_rdwr, 0);
    track("udp6 SHUT_RD", sh_rd6, 0);
    track("udp peer", sh_peer, 0);
    snapshot_all();
}

static short revents(int s)
{
    struct pollfd p = {.fd = s, .events = POLLIN | POLLOUT | POLLRDHUP};
    poll(&p, 1, 0);
    return p.revents;
}

/* a blocking read (bounded by a timeout): 0 at once on a shut read side */
static ssize_t read_blocking(int s)
{
    struct timeval tv = {.tv_sec = 5};
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    char b[8];
    return recv(s, b, sizeof(b), 0);
}

static void shut_verify(void)
{
    check_recs();
    char b[8];
    CHECK(revents(sh_rd) & POLLRDHUP, "SHUT_RD unconnected: no POLLRDHUP");
    CHECK(read_blocking(sh_rd) == 0, "SHUT_RD unconnected: recv errno %d", errno);
    CHECK(send(sh_wr, "x", 1, MSG_NOSIGNAL) < 0 && errno == EPIPE,
          "SHUT_WR: send did not fail with EPIPE (errno %d)", errno);
    CHECK(!(revents(sh_wr) & POLLRDHUP), "SHUT_WR: read side shut too");
    CHECK(revents(sh_rdwr) & POLLHUP, "SHUT_RDWR: no POLLHUP");
    CHECK(send(sh_rdwr, "x", 1, MSG_NOSIGNAL) < 0 && errno == EPIPE, "SHUT_RDWR: send works");
    CHECK(read_blocking(sh_rdwr) == 0, "SHUT_RDWR: recv errno %d", errno);
    CHECK(revents(sh_rd6) & POLLRDHUP, "udp6 SHUT_RD: no POLLRDHUP");
    CHECK(send(sh_rd6, "y", 1, MSG_NOSIGNAL) == 1, "udp6 SHUT_RD: send errno %d", errno);
    CHECK(wait_in(sh_peer6, 60) && recv(sh_peer6, b, sizeof(b), MSG_DONTWAIT) == 1,
          "udp6 SHUT_RD: the peer got nothing");
}

int main(int argc, char **argv)
{
    const char *mode = argc > 1 ? argv[1] : "opts";
    sigset_t old;
    catch_usr2_blocked(on_usr2, &old);
    if (!strcmp(mode, "opts")) {
        opts_setup();
        say("READY pid=%d mode=opts sockets=%d", (int)getpid(), nrecs);
    } else if (!strcmp(mode, "inet")) {
        inet_setup();
        say("READY pid=%d mode=inet sockets=%d", (int)getpid(), nrecs);
    } else if (!strcmp(mode, "ext6") && argc > 2) {
        ext6_setup(atoi(argv[2]));
    } else if (!strcmp(mode, "bpf")) {
        bpf_setup();
        say("READY pid=%d mode=bpf", (int)getpid());
    } else if (!strcmp(mode, "ebpf")) {
        ebpf_setup();
    } else if (!strcmp(mode, "mcast")) {
        mcast_setup();
        say("READY pid=%d mode=mcast groups=%d", (int)getpid(), mc_groups);
    } else if (!strcmp(mode, "md5")) {
        md5_setup();
    } else if (!strcmp(mode, "tsid")) {
        tsid_setup();
    } else if (!strcmp(mode, "shut")) {
        shut_setup();
        say("READY pid=%d mode=shut", (int)getpid());
    } else {
        say("SETUP FAIL unknown mode %s", mode);
        return 2;
    }
    while (!got_usr2)
        sigsuspend(&old);
    if (!strcmp(mode, "opts"))
        opts_verify();
    else if (!strcmp(mode, "inet"))
        inet_verify();
    else if (!strcmp(mode, "ext6"))
        ext6_verify();
    else if (!strcmp(mode, "bpf"))
        bpf_verify();
    else if (!strcmp(mode, "shut"))
        shut_verify();
    else if (!strcmp(mode, "mcast"))
        mcast_verify();
    finish("");
}
