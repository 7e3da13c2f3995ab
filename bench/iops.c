/* 4 KiB random I/O on a block device with O_DIRECT, for bench/io.sh: runs inside the
 * guest, built static and appended to the initramfs.
 *
 *   iops DEV r|w SECONDS THREADS SPAN_MIB
 *
 * THREADS workers each keep one request in flight (queue depth = THREADS) at random
 * 4 KiB-aligned offsets within the first SPAN_MIB MiB, for SECONDS; prints
 * "IOPS-R=<n>" or "IOPS-W=<n>" (completed requests per second), or "IOPS-ERR ..." . */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static int fd, writing;
static double seconds;
static uint64_t blocks;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static void *worker(void *arg) {
    uint64_t x = 0x9e3779b97f4a7c15ull * ((uintptr_t)arg + 1), done = 0;
    void *buf;
    if (posix_memalign(&buf, 4096, 4096))
        return (void *)-1;
    memset(buf, (int)(uintptr_t)arg, 4096);
    double end = now() + seconds;
    while (now() < end) {
        for (int i = 0; i < 16; i++) {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17;
            off_t off = (off_t)(x % blocks) * 4096;
            ssize_t n = writing ? pwrite(fd, buf, 4096, off) : pread(fd, buf, 4096, off);
            if (n != 4096)
                return (void *)-1;
            done++;
        }
    }
    return (void *)(uintptr_t)done;
}

int main(int argc, char **argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: iops DEV r|w SECONDS THREADS SPAN_MIB\n");
        return 2;
    }
    writing = argv[2][0] == 'w';
    seconds = atof(argv[3]);
    int threads = atoi(argv[4]);
    blocks = (uint64_t)atoll(argv[5]) * 256;
    if (threads < 1 || threads > 64 || blocks == 0 || seconds <= 0)
        return 2;
    fd = open(argv[1], (writing ? O_RDWR : O_RDONLY) | O_DIRECT);
    if (fd < 0) {
        printf("IOPS-ERR open %s\n", argv[1]);
        return 1;
    }
    pthread_t t[64];
    double t0 = now();
    for (int i = 0; i < threads; i++)
        pthread_create(&t[i], NULL, worker, (void *)(uintptr_t)i);
    uint64_t total = 0;
    int failed = 0;
    for (int i = 0; i < threads; i++) {
        void *r;
        pthread_join(t[i], &r);
        if (r == (void *)-1)
            failed = 1;
        else
            total += (uintptr_t)r;
    }
    double secs = now() - t0;
    if (failed) {
        printf("IOPS-ERR request failed\n");
        return 1;
    }
    printf("IOPS-%c=%.0f\n", writing ? 'W' : 'R', total / secs);
    return 0;
}
