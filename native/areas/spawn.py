"""The restorer child: clone3 (with set_tid for the original PID) into a pause loop.

The child never returns to Python: it jumps straight into a raw `pause` loop
written in assembly, so it touches no lock and no libc state. ckpt then seizes
it and rebuilds it by syscall injection, using the loop's own `syscall`
instruction for the first call.
"""

INCLUDES = """
#include <linux/sched.h>
#include <signal.h>
"""

TYPES = """
"""

FUNCTIONS = """
long ck_spawn_restorer(int pid);
uint64_t ck_pause_syscall_addr(void);
"""

CUSTOMIZATIONS = """
__asm__(
    ".text\\n"
    ".p2align 4\\n"
    ".hidden ck_pause_loop\\n"
    ".globl ck_pause_loop\\n"
    "ck_pause_loop:\\n"
    "    mov $34, %eax\\n"
    ".hidden ck_pause_syscall\\n"
    ".globl ck_pause_syscall\\n"
    "ck_pause_syscall:\\n"
    "    syscall\\n"
    "    jmp ck_pause_loop\\n");

extern char ck_pause_loop[];
extern char ck_pause_syscall[];

uint64_t ck_pause_syscall_addr(void) { return (uint64_t)(uintptr_t)ck_pause_syscall; }

/* clone3 without CLONE_VM (fork semantics); pid > 0 asks for that exact PID. */
long ck_spawn_restorer(int pid)
{
    struct clone_args args;
    pid_t tid[1] = { pid };
    long ret;
    memset(&args, 0, sizeof(args));
    args.exit_signal = SIGCHLD;
    if (pid > 0) {
        args.set_tid = (uint64_t)(uintptr_t)tid;
        args.set_tid_size = 1;
    }
    __asm__ volatile("syscall"
                     : "=a"(ret)
                     : "0"(435L), "D"(&args), "S"(sizeof(args))
                     : "rcx", "r11", "memory");
    if (ret == 0) {
        __asm__ volatile("jmp ck_pause_loop");
        __builtin_unreachable();
    }
    return ret;
}
"""
