/* A cross-CPU round trip for bench/smp.sh: runs inside the guest, built static and
 * appended to the initramfs.
 *
 *   pingpong ROUNDS CPU_A CPU_B
 *
 * Two processes, pinned to CPU_A and CPU_B, pass one byte back and forth through two
 * pipes ROUNDS times; each side sleeps in read() until the other writes, so every
 * round trip is two wake-ups of a sleeping task (on another CPU when CPU_A != CPU_B:
 * an IPI to an idle vCPU). Prints "PINGPONG a=A b=B rounds=N us=<per round trip>". */
#define _GNU_SOURCE
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static void pin(int cpu) {
    cpu_set_t s;
    CPU_ZERO(&s);
    CPU_SET(cpu, &s);
    if (sched_setaffinity(0, sizeof s, &s) != 0) {
        perror("sched_setaffinity");
        exit(1);
    }
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: pingpong ROUNDS CPU_A CPU_B\n");
        return 2;
    }
    int rounds = atoi(argv[1]), a = atoi(argv[2]), b = atoi(argv[3]);
    int there[2], back[2];
    char c = 'x';
    if (pipe(there) || pipe(back)) {
        perror("pipe");
        return 1;
    }
    pid_t child = fork();
    if (child < 0) {
        perror("fork");
        return 1;
    }
    if (child == 0) {
        pin(b);
        for (int i = 0; i < rounds; i++)
            if (read(there[0], &c, 1) != 1 || write(back[1], &c, 1) != 1)
                _exit(1);
        _exit(0);
    }
    pin(a);
    /* A first round trip outside the timing: both sides running and pinned. */
    if (write(there[1], &c, 1) != 1 || read(back[0], &c, 1) != 1)
        return 1;
    double t0 = now();
    for (int i = 1; i < rounds; i++)
        if (write(there[1], &c, 1) != 1 || read(back[0], &c, 1) != 1)
            return 1;
    double t1 = now();
    int status;
    waitpid(child, &status, 0);
    printf("PINGPONG a=%d b=%d rounds=%d us=%.1f\n", a, b, rounds - 1,
           (t1 - t0) * 1e6 / (rounds - 1));
    return 0;
}
