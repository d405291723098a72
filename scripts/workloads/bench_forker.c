/* Benchmark target: a parent and K children, each child `bench_mem M` (M MiB).
   usage: bench_forker K BENCH_MEM M
   The children print their own READY lines; the parent prints "TREE READY <pid>"
   once all K did (it counts them in a pipe), and on SIGUSR2 forwards it to every
   child, waits for them and prints "TREE VERIFY OK|FAIL", exiting 0/1. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static volatile sig_atomic_t go;
static void on_usr2(int s) { (void)s; go = 1; }

int main(int argc, char **argv)
{
    if (argc < 4)
        return 2;
    int k = atoi(argv[1]);
    pid_t *kids = calloc((size_t)k, sizeof(*kids));
    signal(SIGUSR2, on_usr2);
    for (int i = 0; i < k; i++) {
        kids[i] = fork();
        if (kids[i] == 0) {
            execl(argv[2], argv[2], argv[3], (char *)NULL);
            _exit(127);
        }
    }
    /* wait until every child printed READY: poll our own log (stdout is a file) */
    char path[64];
    snprintf(path, sizeof(path), "/proc/self/fd/1");
    for (;;) {
        FILE *f = fopen(path, "r");
        int n = 0;
        char line[256];
        while (f && fgets(line, sizeof(line), f))
            n += strncmp(line, "READY", 5) == 0;
        if (f)
            fclose(f);
        if (n >= k)
            break;
        usleep(10000);
    }
    printf("TREE READY %d\n", getpid());
    fflush(stdout);
    while (!go)
        pause();
    int bad = 0;
    for (int i = 0; i < k; i++)
        kill(kids[i], SIGUSR2);
    for (int i = 0; i < k; i++) {
        int st;
        if (waitpid(kids[i], &st, 0) != kids[i] || !WIFEXITED(st) || WEXITSTATUS(st))
            bad++;
    }
    printf(bad ? "TREE VERIFY FAIL %d\n" : "TREE VERIFY OK %d\n", getpid());
    fflush(stdout);
    return bad != 0;
}
