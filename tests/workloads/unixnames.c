/* unixnames: unix sockets bound to a path whose file was deleted afterwards.
 *
 * usage: unixnames   (run in a scratch directory)
 * READY pid=   then waits in sigsuspend() until SIGUSR2, then checks and prints
 * VERIFY OK pid=  (exit 0)  or  VERIFY FAIL pid= reason=  (exit 1)
 *
 * Set up: listener L bound to "l.sock" (relative) with an accepted connection (A, C)
 * holding "to-a" and a client P still in its queue; then l.sock is deleted and a
 * regular file takes the name. Dgram D bound to "<cwd>/d.sock" (absolute) holding a
 * message from S (bound to "s.sock", kept); d.sock deleted. A stream socket bound to
 * "gone/x.sock", whose directory was removed.
 * Checked: getsockname of each is the name it was bound to; the names deleted stay
 * deleted (l.sock is still the regular file that took it, d.sock and gone/ are not
 * there); the accepted connection carries data both ways and C's peer name is
 * l.sock; P is accepted now and works; D holds S's message (sender s.sock) and
 * receives a new one from S.
 */
#include "wl.h"

#include <stddef.h>
#include <sys/socket.h>
#include <sys/un.h>

static volatile sig_atomic_t got_usr2;
static void on_usr2(int sig)
{
    (void)sig;
    got_usr2 = 1;
}

static int L, A, C, P, D, S, X;
static char dpath[200];

static socklen_t addr_of(struct sockaddr_un *a, const char *name)
{
    memset(a, 0, sizeof(*a));
    a->sun_family = AF_UNIX;
    snprintf(a->sun_path, sizeof(a->sun_path), "%s", name);
    return (socklen_t)(offsetof(struct sockaddr_un, sun_path) + strlen(name) + 1);
}

static int bound(int type, const char *name)
{
    int s = socket(AF_UNIX, type, 0);
    struct sockaddr_un a;
    socklen_t n = addr_of(&a, name);
    SETUP_CHECK(s >= 0 && bind(s, (struct sockaddr *)&a, n) == 0, name);
    return s;
}

static int connected(int type, const char *name)
{
    int s = socket(AF_UNIX, type, 0);
    struct sockaddr_un a;
    socklen_t n = addr_of(&a, name);
    SETUP_CHECK(s >= 0 && connect(s, (struct sockaddr *)&a, n) == 0, name);
    return s;
}

static int name_is(int s, const char *want, int peer)
{
    struct sockaddr_un a;
    socklen_t n = sizeof(a);
    memset(&a, 0, sizeof(a));
    int r = peer ? getpeername(s, (struct sockaddr *)&a, &n) : getsockname(s, (struct sockaddr *)&a, &n);
    return r == 0 && strcmp(a.sun_path, want) == 0;
}

static void setup(void)
{
    SETUP_CHECK(getcwd(dpath, sizeof(dpath) - 8) != NULL, "getcwd");
    strcat(dpath, "/d.sock");
    L = bound(SOCK_STREAM, "l.sock");
    SETUP_CHECK(listen(L, 8) == 0, "listen");
    C = connected(SOCK_STREAM, "l.sock");
    A = accept4(L, NULL, NULL, SOCK_CLOEXEC);
    SETUP_CHECK(A >= 0 && write(C, "to-a", 4) == 4, "accept");
    P = connected(SOCK_STREAM, "l.sock");
    SETUP_CHECK(unlink("l.sock") == 0, "unlink l.sock");
    int f = open("l.sock", O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    SETUP_CHECK(f >= 0 && write(f, "not a socket", 12) == 12, "l.sock file");
    close(f);

    D = bound(SOCK_DGRAM, dpath);
    S = bound(SOCK_DGRAM, "s.sock");
    struct sockaddr_un a;
    socklen_t n = addr_of(&a, dpath);
    SETUP_CHECK(sendto(S, "dgram-1", 7, 0, (struct sockaddr *)&a, n) == 7, "sendto");
    SETUP_CHECK(unlink(dpath) == 0, "unlink d.sock");

    SETUP_CHECK(mkdir("gone", 0755) == 0, "mkdir gone");
    X = bound(SOCK_STREAM, "gone/x.sock");
    SETUP_CHECK(unlink("gone/x.sock") == 0 && rmdir("gone") == 0, "gone");
}

static void verify(void)
{
    CHECK(name_is(L, "l.sock", 0), "L is not bound to l.sock");
    CHECK(name_is(D, dpath, 0), "D is not bound to %s", dpath);
    CHECK(name_is(X, "gone/x.sock", 0), "X is not bound to gone/x.sock");
    CHECK(name_is(S, "s.sock", 0), "S is not bound to s.sock");
    CHECK(name_is(C, "l.sock", 1), "C's peer is not l.sock");
    struct stat st;
    char *content = NULL;
    CHECK(lstat("l.sock", &st) == 0 && S_ISREG(st.st_mode) && read_file("l.sock", &content) == 12 &&
              memcmp(content, "not a socket", 12) == 0,
          "the file that took l.sock's name was touched");
    free(content);
    CHECK(access(dpath, F_OK) != 0 && errno == ENOENT, "%s has a name again", dpath);
    CHECK(access("gone", F_OK) != 0 && errno == ENOENT, "gone/ is back");

    char buf[64];
    CHECK(read(A, buf, 4) == 4 && memcmp(buf, "to-a", 4) == 0, "A's bytes");
    CHECK(write(A, "to-c", 4) == 4 && read(C, buf, 4) == 4 && memcmp(buf, "to-c", 4) == 0,
          "A → C");
    int q = accept4(L, NULL, NULL, SOCK_CLOEXEC);
    CHECK(q >= 0 && write(P, "p", 1) == 1 && read(q, buf, 1) == 1 && buf[0] == 'p',
          "the queued client P");

    struct sockaddr_un from;
    socklen_t fl = sizeof(from);
    memset(&from, 0, sizeof(from));
    ssize_t r = recvfrom(D, buf, sizeof(buf), MSG_DONTWAIT, (struct sockaddr *)&from, &fl);
    CHECK(r == 7 && memcmp(buf, "dgram-1", 7) == 0 && strcmp(from.sun_path, "s.sock") == 0,
          "D's queued message (%zd bytes from '%s')", r, from.sun_path);
}

int main(void)
{
    sigset_t old;
    catch_usr2_blocked(on_usr2, &old);
    setup();
    say("READY pid=%d", (int)getpid());
    while (!got_usr2)
        sigsuspend(&old);
    verify();
    finish("");
}
