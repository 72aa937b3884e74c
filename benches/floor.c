/*
 * floor.c - the latency floor of one vhost-user round trip on this machine.
 *
 * Two processes (fork) over an AF_UNIX SOCK_STREAM socketpair play
 * ping-pong: the parent writes a REQ-byte request, the child reads it whole
 * and writes a REPLY-byte reply, the parent reads that whole.  No protocol
 * logic at all, so nothing written on top of a Unix socket - in C, Rust or
 * Python - can go faster; benchmarks report their numbers next to this one.
 *
 *   floor [ITERATIONS [REQ_BYTES REPLY_BYTES [setsid]]]
 *
 * The mean is over one loop of ITERATIONS round trips timed at its two ends (as the
 * Python benchmarks time theirs); median and p99 come from a second loop of as many,
 * timed one by one.
 *
 * Defaults: 100000 iterations, 12-byte request / 20-byte reply (a
 * GET_FEATURES header and its u64 answer).  20 20 is a message with a u64
 * body acknowledged under REPLY_ACK (SET_VRING_NUM + NEED_REPLY).
 *
 * With `setsid` the child runs in a session of its own; by default both stay in the
 * caller's session (with autogroup scheduling, one scheduling group).
 *
 * CPU placement is the caller's (e.g. `taskset -c 0 floor`); the program
 * prints the CPUs it is allowed on, so every result states its placement.
 *
 * Build: cc -O2 -Wall -Wextra -o floor benches/floor.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_MSG 4096
#define WARMUP 1000

static void die(const char *what)
{
	perror(what);
	exit(2);
}

static int read_full(int fd, char *buf, size_t n)
{
	size_t done = 0;
	while (done < n) {
		ssize_t r = read(fd, buf + done, n - done);
		if (r == 0)
			return -1; /* peer closed */
		if (r < 0) {
			if (errno == EINTR)
				continue;
			die("read");
		}
		done += (size_t)r;
	}
	return 0;
}

static void write_full(int fd, const char *buf, size_t n)
{
	size_t done = 0;
	while (done < n) {
		ssize_t w = write(fd, buf + done, n - done);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			die("write");
		}
		done += (size_t)w;
	}
}

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return (x > y) - (x < y);
}

static void print_placement(void)
{
	cpu_set_t set;
	int first = 1;
	if (sched_getaffinity(0, sizeof(set), &set) != 0)
		die("sched_getaffinity");
	printf("cpus=");
	for (int c = 0; c < CPU_SETSIZE; c++) {
		if (CPU_ISSET(c, &set)) {
			printf(first ? "%d" : ",%d", c);
			first = 0;
		}
	}
}

static long parse_arg(const char *s, long lo, long hi, const char *name)
{
	char *end;
	long v = strtol(s, &end, 10);
	if (*s == '\0' || *end != '\0' || v < lo || v > hi) {
		fprintf(stderr, "floor: %s must be an integer in [%ld, %ld]\n", name, lo, hi);
		exit(2);
	}
	return v;
}

int main(int argc, char **argv)
{
	long iters = 100000, req = 12, rep = 20;
	int sv[2];
	static char buf[MAX_MSG];

	int own_session = 0;
	if (argc == 5 && strcmp(argv[4], "setsid") == 0) {
		own_session = 1;
		argc = 4;
	}
	if (argc != 1 && argc != 2 && argc != 4) {
		fprintf(stderr, "usage: %s [ITERATIONS [REQ_BYTES REPLY_BYTES [setsid]]]\n", argv[0]);
		return 2;
	}
	if (argc >= 2)
		iters = parse_arg(argv[1], 1, 100000000, "ITERATIONS");
	if (argc == 4) {
		req = parse_arg(argv[2], 1, MAX_MSG, "REQ_BYTES");
		rep = parse_arg(argv[3], 1, MAX_MSG, "REPLY_BYTES");
	}
	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0)
		die("socketpair");

	pid_t child = fork();
	if (child < 0)
		die("fork");
	if (child == 0) {
		/* With autogroup scheduling a session is a scheduling group of its own: a peer
		 * started in another session (as a daemon would be) pays for cross-group
		 * wake-ups. `setsid` measures that layout. */
		if (own_session && setsid() < 0)
			die("setsid");
		/* back-end: answer every request until the front-end closes */
		close(sv[0]);
		memset(buf, 0x5a, sizeof(buf));
		while (read_full(sv[1], buf, (size_t)req) == 0)
			write_full(sv[1], buf, (size_t)rep);
		_exit(0);
	}
	close(sv[1]);

	uint64_t *samples = malloc(sizeof(*samples) * (size_t)iters);
	if (!samples)
		die("malloc");
	memset(buf, 0xa5, sizeof(buf));
	for (long i = 0; i < WARMUP; i++) {
		write_full(sv[0], buf, (size_t)req);
		if (read_full(sv[0], buf, (size_t)rep) != 0)
			die("child closed");
	}
	/* The mean comes from a loop timed like the Python benchmarks time theirs: one clock
	 * reading at each end, none per round trip (two readings each would add their own
	 * cost to the floor). The median and p99 need per-sample readings: a second loop. */
	uint64_t total0 = now_ns();
	for (long i = 0; i < iters; i++) {
		write_full(sv[0], buf, (size_t)req);
		if (read_full(sv[0], buf, (size_t)rep) != 0)
			die("child closed");
	}
	uint64_t total = now_ns() - total0;
	for (long i = 0; i < iters; i++) {
		uint64_t t0 = now_ns();
		write_full(sv[0], buf, (size_t)req);
		if (read_full(sv[0], buf, (size_t)rep) != 0)
			die("child closed");
		samples[i] = now_ns() - t0;
	}
	close(sv[0]);
	int status;
	if (waitpid(child, &status, 0) < 0)
		die("waitpid");

	qsort(samples, (size_t)iters, sizeof(*samples), cmp_u64);
	printf("floor: socketpair round trip %ld/%ld bytes, n=%ld, ", req, rep, iters);
	print_placement();
	printf(": mean_ns=%.0f median_ns=%llu p99_ns=%llu\n", (double)total / (double)iters,
	       (unsigned long long)samples[iters / 2],
	       (unsigned long long)samples[(iters * 99) / 100]);
	free(samples);
	return WIFEXITED(status) && WEXITSTATUS(status) == 0 ? 0 : 1;
}
