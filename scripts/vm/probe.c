/* Kernel feature probe for scripts/vm/selftest: prints one "name: yes|no
 * (detail)" line per feature ckpt's tests rely on.  Exit status 0 always;
 * the caller decides what it requires. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/sched.h>
#include <linux/userfaultfd.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1ULL << 15)
#endif
#ifndef PAGEMAP_SCAN
#define PAGEMAP_SCAN _IOWR('f', 16, struct pm_scan_arg_x)
#endif
struct pm_scan_arg_x {
	uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages;
	uint64_t category_inverted, category_mask, category_anyof_mask, return_mask;
};

static void report(const char *name, int ok, const char *detail)
{
	printf("%s: %s%s%s%s\n", name, ok ? "yes" : "no", detail && *detail ? " (" : "",
	       detail ? detail : "", detail && *detail ? ")" : "");
}

static int soft_dirty(char *detail, size_t n)
{
	long ps = sysconf(_SC_PAGESIZE);
	char *m = mmap(NULL, ps, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	int fd = open("/proc/self/clear_refs", O_WRONLY);
	if (m == MAP_FAILED || fd < 0) {
		snprintf(detail, n, "setup: %s", strerror(errno));
		return 0;
	}
	if (write(fd, "4", 1) != 1) {
		snprintf(detail, n, "clear_refs=4: %s", strerror(errno));
		return 0;
	}
	close(fd);
	m[0] = 1; /* fresh page, written after the clear */
	/* a second page that is touched before the clear must read clean */
	char *c = mmap(NULL, ps, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	c[0] = 1;
	fd = open("/proc/self/clear_refs", O_WRONLY);
	write(fd, "4", 1);
	close(fd);
	m[1] = 2; /* dirty again after the second clear */
	int pm = open("/proc/self/pagemap", O_RDONLY);
	uint64_t e1 = 0, e2 = 0;
	pread(pm, &e1, 8, (uintptr_t)m / ps * 8);
	pread(pm, &e2, 8, (uintptr_t)c / ps * 8);
	close(pm);
	int d1 = e1 >> 55 & 1, d2 = e2 >> 55 & 1;
	snprintf(detail, n, "written page bit55=%d, clean page bit55=%d", d1, d2);
	return d1 == 1 && d2 == 0;
}

static int pagemap_scan(char *detail, size_t n)
{
	int pm = open("/proc/self/pagemap", O_RDONLY);
	struct pm_scan_arg_x a = {.size = sizeof a};
	int r = ioctl(pm, PAGEMAP_SCAN, &a);
	int e = errno;
	close(pm);
	snprintf(detail, n, "ioctl: %s", r < 0 ? strerror(e) : "ok");
	return r >= 0;
}

static int uffd_wp_async(char *detail, size_t n)
{
	int fd = syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	if (fd < 0) {
		snprintf(detail, n, "userfaultfd: %s", strerror(errno));
		return 0;
	}
	struct uffdio_api api = {.api = UFFD_API, .features = 0};
	if (ioctl(fd, UFFDIO_API, &api) < 0) {
		snprintf(detail, n, "UFFDIO_API: %s", strerror(errno));
		return 0;
	}
	close(fd);
	snprintf(detail, n, "features=0x%llx", (unsigned long long)api.features);
	return (api.features & UFFD_FEATURE_WP_ASYNC) != 0;
}

static int ptrace_and_vm_readv(char *detail, size_t n, int *vm_ok)
{
	static volatile uint64_t secret = 0x1234abcd5678ef00ULL;
	pid_t pid = fork();
	if (pid == 0) {
		secret = 0xfeedfacecafebeefULL;
		for (;;)
			pause();
	}
	usleep(100000);
	int ok = 0;
	*vm_ok = 0;
	if (ptrace(PTRACE_SEIZE, pid, 0, 0) == 0 && ptrace(PTRACE_INTERRUPT, pid, 0, 0) == 0) {
		int st;
		waitpid(pid, &st, 0);
		errno = 0;
		long w = ptrace(PTRACE_PEEKDATA, pid, (void *)&secret, 0);
		ok = errno == 0 && (uint64_t)w == 0xfeedfacecafebeefULL;
		snprintf(detail, n, "PEEKDATA=%lx", w);
		ptrace(PTRACE_DETACH, pid, 0, 0);
	} else {
		snprintf(detail, n, "seize: %s", strerror(errno));
	}
	uint64_t v = 0;
	struct iovec l = {&v, 8}, r = {(void *)&secret, 8};
	*vm_ok = process_vm_readv(pid, &l, 1, &r, 1, 0) == 8 && v == 0xfeedfacecafebeefULL;
	kill(pid, SIGKILL);
	waitpid(pid, NULL, 0);
	return ok;
}

static int clone3_works(char *detail, size_t n)
{
	struct clone_args a;
	memset(&a, 0, sizeof a);
	a.exit_signal = SIGCHLD;
	long pid = syscall(SYS_clone3, &a, sizeof a);
	if (pid == 0)
		_exit(42);
	if (pid < 0) {
		snprintf(detail, n, "clone3: %s", strerror(errno));
		return 0;
	}
	int st;
	waitpid(pid, &st, 0);
	snprintf(detail, n, "child exit %d", WEXITSTATUS(st));
	return WIFEXITED(st) && WEXITSTATUS(st) == 42;
}

int main(void)
{
	char d[256];
	struct utsname u;
	uname(&u);
	printf("kernel: %s\n", u.release);
	report("soft-dirty", soft_dirty(d, sizeof d), d);
	report("pagemap-scan", pagemap_scan(d, sizeof d), d);
	report("uffd-wp-async", uffd_wp_async(d, sizeof d), d);
	int vm_ok;
	report("ptrace", ptrace_and_vm_readv(d, sizeof d, &vm_ok), d);
	report("process_vm_readv", vm_ok, "");
	report("clone3", clone3_works(d, sizeof d), d);
	return 0;
}
