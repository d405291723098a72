/* A listening server with connections arriving while it is dumped (issue 14:
 * accept queues).
 *
 *   backlog tcp MS     listens on 127.0.0.1 (READY port=N); waits MS milliseconds
 *                      before each accept (a lazy server: under load its accept
 *                      queue is rarely empty), then reads a line and answers
 *                      "pong\n" and closes.
 *   backlog unix MS    the same on the unix socket "srv.sock" in its directory
 *                      (READY path=...); the client may have closed its end already:
 *                      the answer is best-effort.
 *   backlog never-tcp  listens on 127.0.0.1 (READY port=N) and never accepts.
 *   backlog never-unix listens on "srv.sock" and never accepts.
 *
 * On SIGUSR2: VERIFY OK served=N (connections answered), or FAIL if an accept
 * or an answer failed for another reason than the client having gone.
 */
#include "wl.h"

#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>

static volatile sig_atomic_t got_usr2;
static void on_usr2(int sig)
{
    (void)sig;
    got_usr2 = 1;
}

static void nap_ms(int ms)
{
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
        ;
}

/* Read up to a newline (or EOF), answer "pong\n". 1 if answered. */
static int serve(int c)
{
    char buf[256];
    size_t got = 0;
    struct pollfd p = {.fd = c, .events = POLLIN};
    while (got < sizeof(buf)) {
        if (poll(&p, 1, 10000) <= 0)
            return 0;
        ssize_t r = read(c, buf + got, sizeof(buf) - got);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            break;
        got += (size_t)r;
        if (memchr(buf, '\n', got))
            break;
    }
    return write(c, "pong\n", 5) == 5;
}

int main(int argc, char **argv)
{
    SETUP_CHECK(argc >= 2, "usage: backlog tcp|unix|never-tcp|never-unix [MS]");
    const char *mode = argv[1];
    int delay = argc > 2 ? atoi(argv[2]) : 0;
    int unix_mode = strstr(mode, "unix") != NULL;
    int never = strncmp(mode, "never", 5) == 0;
    signal(SIGPIPE, SIG_IGN);
    sigset_t old;
    catch_usr2_blocked(on_usr2, &old);

    int l;
    if (unix_mode) {
        l = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        SETUP_CHECK(l >= 0, "socket");
        struct sockaddr_un a = {.sun_family = AF_UNIX};
        strcpy(a.sun_path, "srv.sock");
        unlink(a.sun_path);
        SETUP_CHECK(bind(l, (struct sockaddr *)&a, sizeof(a)) == 0, "bind");
        SETUP_CHECK(listen(l, 64) == 0, "listen");
        say("READY pid=%d fd=%d path=srv.sock", (int)getpid(), l);
    } else {
        l = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        SETUP_CHECK(l >= 0, "socket");
        int one = 1;
        setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        SETUP_CHECK(bind(l, (struct sockaddr *)&a, sizeof(a)) == 0, "bind");
        SETUP_CHECK(listen(l, 64) == 0, "listen");
        socklen_t n = sizeof(a);
        SETUP_CHECK(getsockname(l, (struct sockaddr *)&a, &n) == 0, "getsockname");
        say("READY pid=%d fd=%d port=%d", (int)getpid(), l, ntohs(a.sin_port));
    }

    long served = 0;
    while (!got_usr2) {
        struct pollfd p = {.fd = l, .events = never ? 0 : POLLIN};
        int r = ppoll(&p, 1, NULL, &old); /* SIGUSR2 only while waiting here */
        if (r < 0) {
            if (errno != EINTR)
                fail("ppoll: %s", strerror(errno));
            continue;
        }
        if (never || !(p.revents & POLLIN))
            continue;
        if (delay)
            nap_ms(delay);
        int c = accept4(l, NULL, NULL, SOCK_CLOEXEC);
        if (c < 0) {
            if (errno != EINTR && errno != EAGAIN && errno != ECONNABORTED)
                fail("accept: %s", strerror(errno));
            continue;
        }
        served += serve(c);
        close(c);
    }
    char extra[64];
    snprintf(extra, sizeof(extra), "served=%ld", served);
    finish(extra);
}
