/* Random O_DIRECT write/verify over a block device from several threads at once, each
 * pinned to a CPU (so, on a multi-queue disk, submitting on that CPU's queue).
 *
 *   blk-verify DEV REGION_MIB THREADS CPUS
 *
 * Thread t owns region t (REGION_MIB MiB at t * REGION_MIB MiB), runs on CPU t % CPUS and
 * uses blocks of 4 KiB << (t % 4). It writes every block of its region once, in a
 * random order, each filled with 64-bit words that name the word's own byte offset on
 * the disk and the thread; once every thread is done writing, each reads its region back
 * in another random order and checks every word. Prints WERR/RERR/BAD lines for what
 * failed and, at the end, "VERIFIED <dev> <writes> <reads>" only when nothing did. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static const char *dev;
static long region, cpus;
static pthread_barrier_t written;
static int failed;
static long writes, reads;
static pthread_mutex_t count = PTHREAD_MUTEX_INITIALIZER;

static uint64_t word(uint64_t offset, long t) {
    return offset * 0x9e3779b97f4a7c15ull ^ ((uint64_t)t << 56) ^ 0x5a5a;
}

static void shuffle(long *order, long n, uint64_t seed) {
    for (long i = 0; i < n; i++)
        order[i] = i;
    for (long i = n - 1; i > 0; i--) {
        seed ^= seed << 13, seed ^= seed >> 7, seed ^= seed << 17;
        long j = (long)(seed % (uint64_t)(i + 1));
        long x = order[i];
        order[i] = order[j], order[j] = x;
    }
}

static void *run(void *arg) {
    long t = (long)arg;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(t % cpus, &set);
    if (sched_setaffinity(0, sizeof set, &set))
        perror("sched_setaffinity");
    size_t bs = 4096u << (t % 4);
    long n = region / (long)bs;
    uint64_t base = (uint64_t)t * (uint64_t)region;
    int fd = open(dev, O_RDWR | O_DIRECT);
    uint64_t *buf;
    long *order = malloc(sizeof(long) * n);
    if (fd < 0 || !order || posix_memalign((void **)&buf, 4096, bs)) {
        perror("setup");
        __atomic_store_n(&failed, 1, __ATOMIC_SEQ_CST);
        pthread_barrier_wait(&written);
        return NULL;
    }
    long w = 0, r = 0;
    shuffle(order, n, 0x1234567 + t);
    for (long i = 0; i < n; i++) {
        uint64_t at = base + (uint64_t)order[i] * bs;
        for (size_t k = 0; k < bs / 8; k++)
            buf[k] = word(at + k * 8, t);
        if (pwrite(fd, buf, bs, (off_t)at) != (ssize_t)bs) {
            printf("WERR-%ld-%ld\n", t, order[i]);
            __atomic_store_n(&failed, 1, __ATOMIC_SEQ_CST);
        }
        w++;
    }
    pthread_barrier_wait(&written);
    shuffle(order, n, 0x7654321 + t);
    for (long i = 0; i < n; i++) {
        uint64_t at = base + (uint64_t)order[i] * bs;
        memset(buf, 0, bs);
        if (pread(fd, buf, bs, (off_t)at) != (ssize_t)bs) {
            printf("RERR-%ld-%ld\n", t, order[i]);
            __atomic_store_n(&failed, 1, __ATOMIC_SEQ_CST);
            continue;
        }
        r++;
        for (size_t k = 0; k < bs / 8; k++) {
            if (buf[k] != word(at + k * 8, t)) {
                printf("BAD-%ld-%ld\n", t, order[i]);
                __atomic_store_n(&failed, 1, __ATOMIC_SEQ_CST);
                break;
            }
        }
    }
    pthread_mutex_lock(&count);
    writes += w, reads += r;
    pthread_mutex_unlock(&count);
    close(fd);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s DEV REGION_MIB THREADS CPUS\n", argv[0]);
        return 2;
    }
    dev = argv[1];
    region = atol(argv[2]) << 20;
    long threads = atol(argv[3]);
    cpus = atol(argv[4]);
    if (region <= 0 || threads <= 0 || threads > 64 || cpus <= 0)
        return 2;
    pthread_barrier_init(&written, NULL, (unsigned)threads);
    pthread_t tid[64];
    for (long t = 0; t < threads; t++)
        pthread_create(&tid[t], NULL, run, (void *)t);
    for (long t = 0; t < threads; t++)
        pthread_join(tid[t], NULL);
    if (failed)
        return 1;
    printf("VERIFIED %s %ld %ld\n", dev, writes, reads);
    return 0;
}
