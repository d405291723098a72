/* pgroups: process groups and sessions of a tree, in the shapes real programs make
 * (tests/test_pgroups.py). usage: pgroups MODE
 *
 *   daemon   root (a session leader) ─┬─ w1  setpgid(0,0) ─┬─ w1a ── w1a1  own group
 *                                     │                    └─ w1b ── w1b1  joins root's
 *                                     ├─ w2  joins w1's group (a sibling's) ── w2a
 *                                     └─ w3  root's group ── w3a  joins w1a1's (a cousin's)
 *   jobs     root is a job-control shell: it puts each pipeline in a group of its own
 *              j1a | j1b | j1c   j1a exited and was reaped: its group lives on without
 *                                it (the pgid is a PID nobody has); j1b has a child j1b1
 *              j2a | j2b         j2a exited, not reaped: a zombie leads the group
 *              j3a | j3b         both alive
 *              m ── m1           m made a group, m1 in it; then m moved to j3a's group
 *   session  root is a session leader and a child subreaper (PR_SET_CHILD_SUBREAPER)
 *              c1 (not kept): setsid, forks d1 (── d1x) and d2 (own group), exits and is
 *                reaped: d1, d2 are root's children in a session whose leader is gone
 *              c2: setsid, forks e2, exits unreaped: e2 is root's child in the session
 *                of a zombie
 *              p3 forks k3, then setsid, then forks p3a: k3 stays in root's session
 *              l4: setsid, forks a4 (not kept) which forks b4 and exits: b4 is root's
 *                child in the session of l4, alive
 *   outside  the workload forks the dumped root, which stays in the workload's session
 *            and group (led from outside the dump): root ─┬─ x   (that group too)
 *                                                       ├─ y  own group ── y1
 *                                                       └─ z  setsid ── z1
 *            READY names the root; the first process just waits.
 *   outside2 (refused) like outside, but x joins another group led from outside
 *   outlead  (refused) m is in the group of o, a process of root's session that left
 *            the tree (re-parented outside when its parent exited)
 *
 * Before READY the root records every kept process's PID, parent, group and session
 * (getpgid/getsid, /proc/PID/stat). On SIGUSR2 every live process publishes its PID
 * again (a zombie's parent finds its zombie with waitid WNOWAIT) and checks, for
 * itself and all its relatives, that one bijection maps every recorded id (PIDs,
 * parents, groups, sessions) to the id seen now: the identity unless the PIDs
 * changed (--new-pid). Ids led from outside the dump (outside: the first process)
 * are left to the test, which compares them with the restoring ckpt's.
 * VERIFY OK pid= newpid=0|1 kept=N     or     VERIFY FAIL pid= reason=
 */
#include "wl.h"

#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>

#define NR 24

struct shared {
    volatile int go, quit, n;
    volatile pid_t pid[NR];
    volatile int zombie[NR];  /* 1: exits before READY, not reaped */
    volatile int zcode[NR];   /* a zombie's exit code: how its parent knows it */
    volatile int parent[NR];  /* role of the parent (-1: the root's, outside) */
    volatile int release[NR]; /* tells a role to go on (exit, setpgid, …) */
    volatile int ready[NR];   /* a role's setup is done */
    pid_t ppid[NR], pgid[NR], sid[NR];
    volatile pid_t now[NR];
    volatile int pub[NR], done[NR], fail[NR];
    volatile pid_t outside; /* ids led from outside the dump (mode outside) */
    volatile pid_t other;   /* outside2: another group of that session, led outside */
    char name[NR][16];
    char why[NR][240];
};

static struct shared *sh;
static volatile sig_atomic_t got_usr2;

static void on_usr2(int sig)
{
    (void)sig;
    got_usr2 = 1;
}

static int role(const char *name, int parent)
{
    int r = __atomic_fetch_add(&sh->n, 1, __ATOMIC_SEQ_CST);
    SETUP_CHECK(r < NR, "too many roles");
    snprintf(sh->name[r], sizeof(sh->name[r]), "%s", name);
    sh->parent[r] = parent;
    sh->zcode[r] = 10 + r;
    return r;
}

static int find(const char *name)
{
    double end = mono_now() + 30;
    for (;;) {
        for (int r = 0; r < sh->n; r++)
            if (strcmp(sh->name[r], name) == 0)
                return r;
        SETUP_CHECK(mono_now() < end, name);
        usleep(1000);
    }
}

static void until(volatile int *flag, const char *what)
{
    double end = mono_now() + 30;
    while (!*flag && mono_now() < end)
        usleep(1000);
    SETUP_CHECK(*flag, what);
}

static pid_t stat_ppid(pid_t pid, char *state)
{
    char path[64], *buf;
    snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
    if (read_file(path, &buf) < 0)
        return -1;
    char *p = strrchr(buf, ')');
    int ppid = -1;
    char st = '?';
    if (p)
        sscanf(p + 2, "%c %d", &st, &ppid);
    free(buf);
    if (state)
        *state = st;
    return ppid;
}

/* a zombie's exit code (stat field 52, the wait status) */
static int stat_exit_code(pid_t pid)
{
    char path[64], *buf;
    snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
    if (read_file(path, &buf) < 0)
        return -1;
    char *p = strrchr(buf, ')');
    int code = -1;
    for (int field = 2; p && *p; p++)
        if (*p == ' ' && ++field == 52) {
            code = (atoi(p + 1) >> 8) & 0xff;
            break;
        }
    free(buf);
    return code;
}

/* a role that exits (its zombie is kept) once released: by its parent, or, orphan, by
   being re-parented to the root */
static void exits_when(int r, int orphan)
{
    sh->zombie[r] = 1;
    sh->ready[r] = 1;
    while (orphan ? getppid() != sh->pid[0] : !sh->release[r])
        usleep(1000);
    _exit(sh->zcode[r]);
}

static void exits(int r)
{
    exits_when(r, 0);
}

static void exits_orphan(int r)
{
    exits_when(r, 1);
}

/* ---- after the restore: publish, then check self and relatives ---------------- */

static void note(int me, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void note(int me, const char *fmt, ...)
{
    if (sh->fail[me]++)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(sh->why[me], sizeof(sh->why[me]), fmt, ap);
    va_end(ap);
}

static void publish(int me)
{
    sh->now[me] = getpid();
    sh->pub[me] = 1;
    /* my zombie children: their PIDs now (--new-pid), told apart by their exit codes */
    char path[64], *kids;
    snprintf(path, sizeof(path), "/proc/%d/task/%d/children", (int)getpid(), (int)getpid());
    if (read_file(path, &kids) < 0)
        kids = strdup("");
    for (char *tok = strtok(kids, " \n"); tok; tok = strtok(NULL, " \n")) {
        pid_t kid = atoi(tok);
        char st;
        if (stat_ppid(kid, &st) < 0 || st != 'Z')
            continue;
        int code = stat_exit_code(kid);
        for (int r = 0; r < sh->n; r++)
            if (sh->zombie[r] && sh->parent[r] == me && sh->zcode[r] == code) {
                sh->now[r] = kid;
                sh->pub[r] = 1;
            }
    }
    free(kids);
    for (int r = 0; r < sh->n; r++)
        if (sh->zombie[r] && sh->parent[r] == me && !sh->pub[r])
            note(me, "zombie_%s_not_found", sh->name[r]);
}

#define MAXP (4 * NR)
struct pair {
    pid_t was, is;
    char what[40];
};

static void check(int me)
{
    double end = mono_now() + 30;
    for (int r = 0; r < sh->n; r++)
        while (!sh->pub[r] && mono_now() < end)
            usleep(1000);
    struct pair p[MAXP];
    int np = 0, newpid = 0;
    for (int r = 0; r < sh->n; r++) {
        if (!sh->pub[r]) {
            note(me, "%s_did_not_publish", sh->name[r]);
            return;
        }
        pid_t now = sh->now[r], self = r == me;
        newpid |= now != sh->pid[r];
        pid_t pg = self ? getpgid(0) : getpgid(now), s = self ? getsid(0) : getsid(now);
        pid_t pp = self ? getppid() : stat_ppid(now, NULL);
        p[np++] = (struct pair){sh->pid[r], now, ""};
        snprintf(p[np - 1].what, sizeof(p[0].what), "pid_of_%s", sh->name[r]);
        p[np++] = (struct pair){sh->pgid[r], pg, ""};
        snprintf(p[np - 1].what, sizeof(p[0].what), "pgid_of_%s", sh->name[r]);
        p[np++] = (struct pair){sh->sid[r], s, ""};
        snprintf(p[np - 1].what, sizeof(p[0].what), "sid_of_%s", sh->name[r]);
        if (r) { /* the root's parent is outside the dump */
            p[np++] = (struct pair){sh->ppid[r], pp, ""};
            snprintf(p[np - 1].what, sizeof(p[0].what), "ppid_of_%s", sh->name[r]);
        }
    }
    for (int i = 0; i < np; i++) {
        if (p[i].was == sh->outside)
            continue; /* the test compares those with ckpt's own */
        if (p[i].is <= 0) {
            note(me, "%s:was_%d_now_%d", p[i].what, (int)p[i].was, (int)p[i].is);
            return;
        }
        for (int j = 0; j < i; j++) {
            if (p[j].was == sh->outside)
                continue;
            if ((p[i].was == p[j].was) != (p[i].is == p[j].is)) {
                note(me, "%s_vs_%s:was_%d,%d_now_%d,%d", p[i].what, p[j].what, (int)p[i].was,
                     (int)p[j].was, (int)p[i].is, (int)p[j].is);
                return;
            }
        }
        if (!newpid && p[i].was != p[i].is) {
            note(me, "%s:was_%d_now_%d", p[i].what, (int)p[i].was, (int)p[i].is);
            return;
        }
    }
}

/* a kept live process: waits until told to check, checks, waits to be let go */
static void member(int me) __attribute__((noreturn));
static void member(int me)
{
    pid_t self = getpid(); /* as recorded: the roles are renumbered before READY */
    sh->ready[me] = 1;
    while (!sh->go)
        usleep(2000);
    for (me = 0; me < sh->n && sh->pid[me] != self; me++)
        ;
    if (me == sh->n)
        _exit(3);
    publish(me);
    check(me);
    sh->done[me] = 1;
    while (!sh->quit)
        usleep(2000);
    _exit(0);
}

/* fork a child for role r (its parent: the caller, role `parent`); the child runs fn */
static pid_t spawn(int r, void (*fn)(int))
{
    pid_t c = fork();
    SETUP_CHECK(c >= 0, "fork");
    if (c == 0) {
        sh->pid[r] = getpid();
        fn(r);
        member(r);
    }
    sh->pid[r] = c;
    return c;
}

static void just_member(int r)
{
    member(r);
}

static void own_group(int r)
{
    SETUP_CHECK(setpgid(0, 0) == 0, "setpgid own");
    member(r);
}

/* ---- daemon ---------------------------------------------------------------------- */

static void join_root(int r)
{
    SETUP_CHECK(setpgid(0, sh->pid[0]) == 0, "setpgid root's");
    member(r);
}

static void w1b(int r)
{
    spawn(role("w1b1", r), join_root);
    member(r);
}

static void w1a(int r)
{
    spawn(role("w1a1", r), own_group);
    member(r);
}

static void w1(int r)
{
    SETUP_CHECK(setpgid(0, 0) == 0, "setpgid w1");
    spawn(role("w1a", r), w1a);
    spawn(role("w1b", r), w1b);
    member(r);
}

static void w2(int r)
{
    until(&sh->ready[find("w1")], "w1 ready");
    SETUP_CHECK(setpgid(0, sh->pid[find("w1")]) == 0, "setpgid w1's");
    spawn(role("w2a", r), just_member);
    member(r);
}

static void w3a(int r)
{
    int c = find("w1a1");
    until(&sh->ready[c], "w1a1 ready");
    SETUP_CHECK(setpgid(0, sh->pid[c]) == 0, "setpgid w1a1's");
    member(r);
}

static void w3(int r)
{
    spawn(role("w3a", r), w3a);
    member(r);
}

static void daemon_mode(void)
{
    spawn(role("w1", 0), w1);
    until(&sh->ready[find("w1")], "w1");
    spawn(role("w2", 0), w2);
    spawn(role("w3", 0), w3);
}

/* ---- jobs ------------------------------------------------------------------------ */

static void leader_exits(int r)
{
    setpgid(0, 0);
    sh->ready[r] = 1;
    until(&sh->release[r], "released");
    _exit(sh->zcode[r]);
}

static void follower(int r)
{
    char nm[4] = {sh->name[r][0], sh->name[r][1], 'a', 0};
    int lead = find(nm); /* the first role of this pipeline */
    setpgid(0, sh->pid[lead]); /* the shell does it too: whoever is first */
    if (strcmp(sh->name[r], "j1b") == 0)
        spawn(role("j1b1", r), just_member);
    if (strcmp(sh->name[r], "j4b") == 0)
        exits(r);
    member(r);
}

static void mover(int r)
{
    SETUP_CHECK(setpgid(0, 0) == 0, "setpgid m");
    int c = role("m1", r);
    spawn(c, just_member);
    until(&sh->ready[c], "m1 ready");
    int j3a = find("j3a");
    until(&sh->ready[j3a], "j3a ready");
    SETUP_CHECK(setpgid(0, sh->pid[j3a]) == 0, "setpgid m to j3a's");
    member(r);
}

/* a pipeline: the leader first, in its own group (the shell's setpgid and the child's) */
static pid_t pipeline(const char *name, int members, void (*lead_fn)(int), int *lead_role)
{
    char nm[16];
    snprintf(nm, sizeof(nm), "%sa", name);
    int lead = role(nm, 0);
    pid_t l = spawn(lead, lead_fn);
    setpgid(l, l);
    for (int i = 1; i < members; i++) {
        snprintf(nm, sizeof(nm), "%s%c", name, 'a' + i);
        int r = role(nm, 0);
        pid_t c = spawn(r, follower);
        setpgid(c, l);
        until(&sh->ready[r], "pipeline member");
    }
    *lead_role = lead;
    return l;
}

static void jobs_mode(void)
{
    int l1, l2, l3;
    pid_t j1a = pipeline("j1", 3, leader_exits, &l1);
    pid_t j2a = pipeline("j2", 2, leader_exits, &l2);
    pipeline("j3", 2, own_group, &l3);
    int l4;
    pid_t j4a = pipeline("j4", 2, leader_exits, &l4);
    until(&sh->ready[find("j1b1")], "j1b1");
    int m = role("m", 0);
    spawn(m, mover);
    until(&sh->ready[m], "m");
    sh->release[l1] = 1;
    SETUP_CHECK(waitpid(j1a, NULL, 0) == j1a, "reap j1a");
    sh->pid[l1] = 0; /* gone: only its group id is left */
    sh->release[l2] = 1;
    siginfo_t si;
    memset(&si, 0, sizeof(si));
    SETUP_CHECK(waitid(P_PID, (id_t)j2a, &si, WEXITED | WNOWAIT) == 0, "j2a exited");
    sh->zombie[l2] = 1;
    sh->release[l4] = 1;
    SETUP_CHECK(waitpid(j4a, NULL, 0) == j4a, "reap j4a");
    sh->pid[l4] = 0;
    sh->release[find("j4b")] = 1; /* j4b: a zombie in the group of the gone j4a */
}

/* ---- session --------------------------------------------------------------------- */

static void fn_d1(int r)
{
    spawn(role("d1x", r), just_member);
    until(&sh->ready[find("d1x")], "d1x");
}

static void c1(int r)
{
    SETUP_CHECK(setsid() > 0, "setsid c1");
    int d1 = role("d1", 0), d2 = role("d2", 0);
    spawn(d1, fn_d1);
    spawn(d2, own_group);
    int d3 = role("d3", 0); /* a zombie in this session, once re-parented to the root */
    spawn(d3, exits_orphan);
    until(&sh->ready[d1], "d1");
    until(&sh->ready[d2], "d2");
    until(&sh->ready[d3], "d3");
    sh->ready[r] = 1;
    _exit(0);
}

static void c2(int r)
{
    SETUP_CHECK(setsid() > 0, "setsid c2");
    int e2 = role("e2", 0);
    spawn(e2, just_member);
    int e3 = role("e3", 0); /* a zombie in the session of the zombie c2 */
    spawn(e3, exits_orphan);
    until(&sh->ready[e2], "e2");
    until(&sh->ready[e3], "e3");
    sh->ready[r] = 1;
    _exit(sh->zcode[r]);
}

static void p3(int r)
{
    int k3 = role("k3", r);
    spawn(k3, just_member);
    int k4 = role("k4", r); /* a zombie left in the old session */
    spawn(k4, exits);
    until(&sh->ready[k3], "k3");
    until(&sh->ready[k4], "k4");
    sh->release[k4] = 1;
    SETUP_CHECK(setsid() > 0, "setsid p3");
    spawn(role("p3a", r), just_member);
    member(r);
}

static void l4(int r)
{
    SETUP_CHECK(setsid() > 0, "setsid l4");
    int b4 = role("b4", 0);
    pid_t a4 = fork();
    SETUP_CHECK(a4 >= 0, "fork a4");
    if (a4 == 0) {
        spawn(b4, just_member);
        int b5 = role("b5", 0); /* a zombie in the session of l4, once the root's */
        spawn(b5, exits_orphan);
        until(&sh->ready[b4], "b4");
        until(&sh->ready[b5], "b5");
        _exit(0);
    }
    SETUP_CHECK(waitpid(a4, NULL, 0) == a4, "reap a4");
    member(r);
}

static void session_mode(void)
{
    SETUP_CHECK(prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0, "subreaper");
    /* c1 is not kept (reaped): a placeholder role with no PID */
    int rc1 = role("c1", 0);
    pid_t pc1 = spawn(rc1, c1);
    until(&sh->ready[rc1], "c1");
    SETUP_CHECK(waitpid(pc1, NULL, 0) == pc1, "reap c1");
    int rc2 = role("c2", 0);
    pid_t pc2 = spawn(rc2, c2);
    until(&sh->ready[rc2], "c2");
    siginfo_t si;
    memset(&si, 0, sizeof(si));
    SETUP_CHECK(waitid(P_PID, (id_t)pc2, &si, WEXITED | WNOWAIT) == 0, "c2 exited");
    sh->zombie[rc2] = 1;
    spawn(role("p3", 0), p3);
    int rl4 = role("l4", 0);
    spawn(rl4, l4);
    until(&sh->ready[find("p3a")], "p3a");
    until(&sh->ready[rl4], "l4");
    sh->pid[rc1] = 0;
}

/* ---- outside --------------------------------------------------------------------- */

static void zsess(int r)
{
    SETUP_CHECK(setsid() > 0, "setsid z");
    spawn(role("z1", r), just_member);
    member(r);
}

static void ygroup(int r)
{
    SETUP_CHECK(setpgid(0, 0) == 0, "setpgid y");
    spawn(role("y1", r), just_member);
    member(r);
}

static void x_other(int r)
{
    SETUP_CHECK(setpgid(0, sh->other) == 0, "setpgid x to the other outside group");
    member(r);
}

static void outside_mode(int other)
{
    spawn(role("x", 0), other ? x_other : just_member);
    spawn(role("y", 0), ygroup);
    spawn(role("z", 0), zsess);
}

/* ---- outlead --------------------------------------------------------------------- */

static void outlead_mode(void)
{
    int m = role("m", 0);
    spawn(m, just_member);
    until(&sh->ready[m], "m");
    int p[2];
    SETUP_CHECK(pipe(p) == 0, "pipe");
    pid_t a = fork();
    SETUP_CHECK(a >= 0, "fork a");
    if (a == 0) {
        pid_t o = fork();
        if (o == 0) { /* o: re-parented outside the tree once a exits */
            close(p[0]);
            close(p[1]);
            setpgid(0, 0);
            for (;;)
                pause();
        }
        setpgid(o, o);
        SETUP_CHECK(write(p[1], &o, sizeof(o)) == sizeof(o), "write o");
        _exit(0);
    }
    pid_t o = 0;
    SETUP_CHECK(read(p[0], &o, sizeof(o)) == sizeof(o), "read o");
    close(p[0]);
    close(p[1]);
    SETUP_CHECK(waitpid(a, NULL, 0) == a, "reap a"); /* o's parent: outside the tree now */
    SETUP_CHECK(kill(sh->pid[m], 0) == 0, "m alive");
    /* m joins o's group (same session) from here: we are its parent */
    SETUP_CHECK(setpgid(sh->pid[m], o) == 0, "setpgid m to o's group");
    say("OUTSIDE o=%d", (int)o);
}

/* ---- main ------------------------------------------------------------------------ */

int main(int argc, char **argv)
{
    const char *mode = argc > 1 ? argv[1] : "daemon";
    sigset_t old;
    catch_usr2_blocked(on_usr2, &old);
    sh = mmap(NULL, sizeof(*sh), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    SETUP_CHECK(sh != MAP_FAILED, "mmap shared");
    int outside = strncmp(mode, "outside", 7) == 0;
    if (outside) { /* this process stays outside; its child is the dumped root */
        sh->outside = getpid();
        if (strcmp(mode, "outside2") == 0) { /* another group of this session, outside */
            pid_t g = fork();
            SETUP_CHECK(g >= 0, "fork g");
            if (g == 0) {
                setpgid(0, 0);
                for (;;)
                    pause();
            }
            setpgid(g, g);
            sh->other = g;
        }
        pid_t root = fork();
        SETUP_CHECK(root >= 0, "fork root");
        if (root > 0)
            for (;;) /* reaps the root the dump kills: its PID is free for the restore */
                if (wait(NULL) < 0)
                    pause();
    }
    sh->pid[role("root", -1)] = getpid();
    if (strcmp(mode, "daemon") == 0)
        daemon_mode();
    else if (strcmp(mode, "jobs") == 0)
        jobs_mode();
    else if (strcmp(mode, "session") == 0)
        session_mode();
    else if (outside)
        outside_mode(strcmp(mode, "outside2") == 0);
    else if (strcmp(mode, "outlead") == 0)
        outlead_mode();
    else
        SETUP_CHECK(0, "unknown mode");
    /* every kept live role set up */
    for (int r = 1; r < sh->n; r++)
        if (sh->pid[r] && !sh->zombie[r])
            until(&sh->ready[r], sh->name[r]);
    /* re-parented orphans and zombies settled; then record what the restore must keep */
    double end = mono_now() + 30;
    for (int r = 1; r < sh->n; r++) {
        if (!sh->pid[r])
            continue;
        int par = sh->parent[r];
        char st = '?';
        while (stat_ppid(sh->pid[r], &st) != sh->pid[par] && mono_now() < end)
            usleep(1000);
        while (sh->zombie[r] && st != 'Z' && mono_now() < end) {
            usleep(1000);
            stat_ppid(sh->pid[r], &st);
        }
    }
    /* drop the roles that are gone (reaped): move the kept ones down */
    int n = 0;
    for (int r = 0; r < sh->n; r++) {
        if (!sh->pid[r])
            continue;
        int to = n++;
        if (to != r) {
            sh->pid[to] = sh->pid[r];
            sh->zombie[to] = sh->zombie[r];
            sh->zcode[to] = sh->zcode[r];
            memcpy(sh->name[to], sh->name[r], sizeof(sh->name[0]));
            for (int q = 0; q < sh->n; q++)
                if (sh->parent[q] == r)
                    sh->parent[q] = to;
            sh->parent[to] = sh->parent[r];
        }
    }
    sh->n = n;
    for (int r = 0; r < n; r++) {
        sh->ppid[r] = stat_ppid(sh->pid[r], NULL);
        sh->pgid[r] = getpgid(sh->pid[r]);
        sh->sid[r] = getsid(sh->pid[r]);
        SETUP_CHECK(sh->pgid[r] > 0 && sh->sid[r] > 0 && sh->ppid[r] > 0, "ids");
        SETUP_CHECK(!r || sh->ppid[r] == sh->pid[sh->parent[r]], "parent");
    }
    char line[4096];
    int len = snprintf(line, sizeof(line), "READY pid=%d kept=%d", (int)getpid(), n);
    for (int r = 0; r < n && len < (int)sizeof(line) - 64; r++)
        len += snprintf(line + len, sizeof(line) - (size_t)len, " %s=%d/%d/%d/%d", sh->name[r],
                        (int)sh->pid[r], (int)sh->ppid[r], (int)sh->pgid[r], (int)sh->sid[r]);
    say("%s", line);

    while (!got_usr2)
        sigsuspend(&old);
    sh->go = 1;
    publish(0);
    check(0);
    sh->done[0] = 1;
    end = mono_now() + 60;
    for (int r = 0; r < n; r++)
        while (!sh->zombie[r] && !sh->done[r] && mono_now() < end)
            usleep(1000);
    int newpid = 0;
    for (int r = 0; r < n; r++) {
        newpid |= sh->now[r] != sh->pid[r];
        if (!sh->zombie[r] && !sh->done[r])
            fail("%s_did_not_check", sh->name[r]);
        else if (sh->fail[r])
            fail("%s:%s", sh->name[r], sh->why[r]);
    }
    sh->quit = 1;
    char extra[64];
    snprintf(extra, sizeof(extra), "newpid=%d kept=%d", newpid, n);
    finish(extra);
}
