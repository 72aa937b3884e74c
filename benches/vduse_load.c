/* The load generator of bench_vduse.py: 4 KiB O_DIRECT random reads at a fixed queue
 * depth through Linux AIO (io_submit/io_getevents as raw syscalls, no libaio), checking
 * what it reads against the image's known pattern, so a back-end that returns wrong data
 * cannot look fast. Built static by the script (gcc -O2 -static) and run in the test guest.
 *
 *   vduse_load mkimage PATH BYTES        write the pattern image (tests/guest_kern/vdpa_blk.py
 *                                        make_image: each 512-byte sector n starts with n as
 *                                        a little-endian u64, then byte j (8..511) is
 *                                        (n + j - 8) mod 256)
 *   vduse_load read DEV DEPTH SECONDS [SEED]
 *                                        reads for SECONDS, DEPTH in flight; prints one line
 *                                        "reads=R seconds=S iops=I checked=C fullchecked=F"
 *                                        and exits 0, or names the first mismatch and exits 1
 *
 * Every read has its 8 sector headers checked; every 8th also its whole 4 KiB.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/aio_abi.h>
#include <linux/fs.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define BLOCK 4096
#define SECTOR 512
#define MAX_DEPTH 256

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void fill_sector(unsigned char *s, uint64_t n) {
    for (int i = 0; i < 8; i++) s[i] = (unsigned char)(n >> (8 * i));
    for (int j = 8; j < SECTOR; j++) s[j] = (unsigned char)(n + (uint64_t)j - 8);
}

static int mkimage(const char *path, uint64_t bytes) {
    FILE *f = fopen(path, "wb");
    if (!f) {
        fprintf(stderr, "vduse_load: mkimage %s: %s\n", path, strerror(errno));
        return 1;
    }
    unsigned char s[SECTOR];
    for (uint64_t n = 0; n < bytes / SECTOR; n++) {
        fill_sector(s, n);
        if (fwrite(s, SECTOR, 1, f) != 1) {
            fprintf(stderr, "vduse_load: mkimage %s: write failed at sector %" PRIu64 "\n", path, n);
            fclose(f);
            return 1;
        }
    }
    if (fclose(f) != 0) {
        fprintf(stderr, "vduse_load: mkimage %s: %s\n", path, strerror(errno));
        return 1;
    }
    return 0;
}

static uint64_t rng_state;
static uint64_t next_rand(void) { /* xorshift64 */
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

/* 0 when the block read at `offset` holds the pattern; otherwise prints the mismatch. */
static int verify(const char *dev, const unsigned char *buf, uint64_t offset, int full) {
    unsigned char want[SECTOR];
    for (int k = 0; k < BLOCK / SECTOR; k++) {
        uint64_t n = offset / SECTOR + (uint64_t)k;
        const unsigned char *got = buf + k * SECTOR;
        fill_sector(want, n);
        size_t len = full ? SECTOR : 8;
        if (memcmp(got, want, len) != 0) {
            size_t at = 0;
            while (at < len && got[at] == want[at]) at++;
            fprintf(stderr,
                    "vduse_load: %s: data mismatch at byte %" PRIu64
                    " (sector %" PRIu64 " byte %zu): read 0x%02x, the image has 0x%02x\n",
                    dev, offset + (uint64_t)k * SECTOR + at, n, at, got[at], want[at]);
            return 1;
        }
    }
    return 0;
}

static long sys_io_setup(unsigned nr, aio_context_t *ctx) { return syscall(SYS_io_setup, nr, ctx); }
static long sys_io_destroy(aio_context_t ctx) { return syscall(SYS_io_destroy, ctx); }
static long sys_io_submit(aio_context_t ctx, long n, struct iocb **iocbs) {
    return syscall(SYS_io_submit, ctx, n, iocbs);
}
static long sys_io_getevents(aio_context_t ctx, long min, long max, struct io_event *ev) {
    return syscall(SYS_io_getevents, ctx, min, max, ev, NULL);
}

static int randread(const char *dev, int depth, double seconds, uint64_t seed) {
    int fd = open(dev, O_RDONLY | O_DIRECT);
    if (fd < 0) {
        fprintf(stderr, "vduse_load: open %s: %s\n", dev, strerror(errno));
        return 1;
    }
    uint64_t size = 0;
    struct stat st;
    if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode)) {
        size = (uint64_t)st.st_size; /* a plain file: the script's own self-check */
    } else if (ioctl(fd, BLKGETSIZE64, &size) != 0) {
        fprintf(stderr, "vduse_load: %s: no size (BLKGETSIZE64: %s)\n", dev, strerror(errno));
        return 1;
    }
    if (size < BLOCK) {
        fprintf(stderr, "vduse_load: %s: %" PRIu64 " bytes, less than one block\n", dev, size);
        return 1;
    }
    uint64_t blocks = size / BLOCK;
    aio_context_t ctx = 0;
    if (sys_io_setup((unsigned)depth, &ctx) != 0) {
        fprintf(stderr, "vduse_load: io_setup(%d): %s\n", depth, strerror(errno));
        return 1;
    }
    static struct iocb cbs[MAX_DEPTH];
    static struct iocb *ptrs[MAX_DEPTH];
    static struct io_event events[MAX_DEPTH];
    unsigned char *bufs;
    if (posix_memalign((void **)&bufs, BLOCK, (size_t)depth * BLOCK) != 0) {
        fprintf(stderr, "vduse_load: out of memory\n");
        return 1;
    }
    rng_state = seed ? seed : 0x9e3779b97f4a7c15ULL;
    for (int i = 0; i < depth; i++) {
        memset(&cbs[i], 0, sizeof cbs[i]);
        cbs[i].aio_fildes = (uint32_t)fd;
        cbs[i].aio_lio_opcode = IOCB_CMD_PREAD;
        cbs[i].aio_buf = (uint64_t)(uintptr_t)(bufs + (size_t)i * BLOCK);
        cbs[i].aio_nbytes = BLOCK;
        cbs[i].aio_offset = (int64_t)((next_rand() % blocks) * BLOCK);
        cbs[i].aio_data = (uint64_t)i;
        ptrs[i] = &cbs[i];
    }
    uint64_t reads = 0, checked = 0, full = 0;
    int rc = 0;
    double start = now(), deadline = start + seconds;
    long inflight = 0;
    if (sys_io_submit(ctx, depth, ptrs) != depth) {
        fprintf(stderr, "vduse_load: io_submit %s: %s\n", dev, strerror(errno));
        return 1;
    }
    inflight = depth;
    int stopping = 0;
    uint64_t wakeups = 0;
    while (inflight > 0) {
        long got = sys_io_getevents(ctx, 1, depth, events);
        if (got < 0) {
            if (errno == EINTR) continue;
            fprintf(stderr, "vduse_load: io_getevents %s: %s\n", dev, strerror(errno));
            rc = 1;
            break;
        }
        inflight -= got;
        /* The guest's clock may be an emulated device: read it every 8th wake-up only. */
        if (!stopping && (++wakeups & 7) == 0 && now() >= deadline) stopping = 1;
        long again = 0;
        for (long e = 0; e < got; e++) {
            struct iocb *cb = (struct iocb *)(uintptr_t)events[e].obj;
            if (events[e].res != BLOCK) {
                fprintf(stderr, "vduse_load: %s: read at %" PRId64 " returned %" PRId64 "\n",
                        dev, (int64_t)cb->aio_offset, (int64_t)events[e].res);
                rc = 1;
                stopping = 1;
                continue;
            }
            reads++;
            int whole = (reads % 8) == 0;
            if (verify(dev, (const unsigned char *)(uintptr_t)cb->aio_buf,
                       (uint64_t)cb->aio_offset, whole) != 0) {
                rc = 1;
                stopping = 1;
                continue;
            }
            checked++;
            full += (uint64_t)whole;
            if (!stopping) {
                cb->aio_offset = (int64_t)((next_rand() % blocks) * BLOCK);
                ptrs[again++] = cb;
            }
        }
        if (again > 0) {
            if (sys_io_submit(ctx, again, ptrs) != again) {
                fprintf(stderr, "vduse_load: io_submit %s: %s\n", dev, strerror(errno));
                rc = 1;
                break;
            }
            inflight += again;
        }
    }
    double elapsed = now() - start;
    sys_io_destroy(ctx);
    close(fd);
    free(bufs);
    if (rc == 0)
        printf("reads=%" PRIu64 " seconds=%.4f iops=%.1f checked=%" PRIu64 " fullchecked=%" PRIu64
               "\n",
               reads, elapsed, (double)reads / elapsed, checked, full);
    return rc;
}

int main(int argc, char **argv) {
    if (argc == 4 && strcmp(argv[1], "mkimage") == 0)
        return mkimage(argv[2], strtoull(argv[3], NULL, 0));
    if ((argc == 5 || argc == 6) && strcmp(argv[1], "read") == 0) {
        int depth = atoi(argv[3]);
        double seconds = atof(argv[4]);
        if (depth < 1 || depth > MAX_DEPTH || !(seconds > 0)) {
            fprintf(stderr, "vduse_load: depth must be 1..%d and seconds > 0\n", MAX_DEPTH);
            return 2;
        }
        return randread(argv[2], depth, seconds, argc == 6 ? strtoull(argv[5], NULL, 0) : 0);
    }
    fprintf(stderr,
            "usage: vduse_load mkimage PATH BYTES | vduse_load read DEV DEPTH SECONDS [SEED]\n");
    return 2;
}
