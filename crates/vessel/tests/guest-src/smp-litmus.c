/* smp-litmus: x86 memory-model, atomicity and cross-modifying-code checks for a guest
 * with several CPUs (built with gcc -static -O2 -pthread by crates/vessel/tests/emu_smp.rs).
 *
 *   smp-litmus [BUDGET_MS [CHECK...]]
 *
 * BUDGET_MS (default 1500) is the time each timed check runs; CHECK names run only those
 * checks (e.g. "smp-litmus 1000 sb-mfence cross-modifying-code").
 *
 * One thread per online CPU, each pinned with sched_setaffinity. Two-thread checks run on
 * every pair of CPUs in turn (CPU i with i^r, r = 1..N-1, when N is a power of two), all
 * pairs of a round at once. Every check prints one line
 *
 *   CHECK <name> PASS|FAIL <counts>
 *
 * and the program ends with "LITMUS DONE checks=C failed=F". Checks are timed rather than
 * counted, so they finish on an oversubscribed host; counts say how much each one did.
 * Outcomes x86 allows (store buffering without a fence) are counted, never failed.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define LINE 64
#define MAXCPU 64
#define SB_MAX (1 << 20)
#define ALIGNED __attribute__((aligned(LINE)))

typedef uint64_t u64;
typedef uint32_t u32;
typedef uint16_t u16;

static int ncpu;
static long budget_ms = 1500;
static volatile int stop_flag, go_flag;
static int ready;
static int checks, failures;

static inline void relax(void) { __builtin_ia32_pause(); }
/* CPUID: a serialising instruction. */
static inline void serialise(void) {
    unsigned a = 0, b, c = 0, d;
    __asm__ __volatile__("cpuid" : "+a"(a), "=b"(b), "+c"(c), "=d"(d) : : "memory");
}
static inline void cbar(void) { __asm__ __volatile__("" ::: "memory"); }

struct worker {
    int cpu, role, id;
    void *arg;
    void (*fn)(struct worker *);
    long ops, bad, seen, extra;
    int pinned;
    pthread_t th;
} ALIGNED;

static struct worker W[MAXCPU];

static int pin(int cpu) {
    cpu_set_t s;
    CPU_ZERO(&s);
    CPU_SET(cpu, &s);
    if (sched_setaffinity(0, sizeof s, &s))
        return 0;
    return sched_getcpu() == cpu;
}

static void *trampoline(void *p) {
    struct worker *w = p;
    w->pinned = pin(w->cpu);
    __atomic_fetch_add(&ready, 1, __ATOMIC_SEQ_CST);
    while (!go_flag)
        relax();
    w->fn(w);
    return NULL;
}

/* Runs W[0..n) together for ms milliseconds; returns how many could not be pinned. */
static int run_workers(int n, long ms) {
    int unpinned = 0;
    stop_flag = 0;
    go_flag = 0;
    ready = 0;
    for (int i = 0; i < n; i++) {
        W[i].id = i;
        W[i].ops = W[i].bad = W[i].seen = W[i].extra = 0;
        W[i].pinned = 0;
        if (pthread_create(&W[i].th, NULL, trampoline, &W[i])) {
            perror("pthread_create");
            exit(2);
        }
    }
    while (__atomic_load_n(&ready, __ATOMIC_SEQ_CST) < n)
        usleep(1000);
    go_flag = 1;
    usleep(ms * 1000);
    stop_flag = 1;
    for (int i = 0; i < n; i++) {
        pthread_join(W[i].th, NULL);
        unpinned += !W[i].pinned;
    }
    return unpinned;
}

static void report(const char *name, int ok, const char *fmt, ...) {
    va_list ap;
    checks++;
    failures += !ok;
    printf("CHECK %s %s ", name, ok ? "PASS" : "FAIL");
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    putchar('\n');
    fflush(stdout);
}

static int pow2(int n) { return n > 0 && (n & (n - 1)) == 0; }
/* Pairings: with N a power of two, round r pairs CPU i with i^r (every pair once);
 * otherwise one round of (0,1), (2,3), ... */
static int rounds(void) { return pow2(ncpu) ? ncpu - 1 : 1; }
static int partner(int r, int i) { return pow2(ncpu) ? (i ^ r) : (i ^ 1); }

/* Sets up W for round r: role 0 on the lower CPU of each pair, role 1 on the other, the
 * pair's argument from args[pair]. Returns the number of workers. */
static int pair_workers(int r, void (*fn)(struct worker *), void **args) {
    int n = 0, pair = 0;
    for (int i = 0; i < ncpu; i++) {
        int j = partner(r, i);
        if (j <= i || j >= ncpu)
            continue;
        W[n] = (struct worker){.cpu = i, .role = 0, .arg = args[pair], .fn = fn};
        W[n + 1] = (struct worker){.cpu = j, .role = 1, .arg = args[pair], .fn = fn};
        n += 2;
        pair++;
    }
    return n;
}

static void *zalloc(size_t n) {
    void *p = aligned_alloc(LINE, (n + LINE - 1) / LINE * LINE);
    if (!p) {
        perror("aligned_alloc");
        exit(2);
    }
    memset(p, 0, n);
    return p;
}

/* ---- every CPU online and reachable ---- */

static void check_cpus(void) {
    long online = sysconf(_SC_NPROCESSORS_ONLN);
    int pinned = 0;
    for (int i = 0; i < ncpu; i++)
        pinned += pin(i);
    cpu_set_t all;
    CPU_ZERO(&all);
    for (int i = 0; i < ncpu; i++)
        CPU_SET(i, &all);
    sched_setaffinity(0, sizeof all, &all);
    report("cpus", online == ncpu && pinned == ncpu, "online=%ld pinned=%d", online, pinned);
}

/* ---- message passing: data then flag; a reader that sees the flag sees the data ---- */

struct mp {
    volatile long data ALIGNED;
    volatile long flag ALIGNED;
};

static void mp_fn(struct worker *w) {
    struct mp *m = w->arg;
    if (w->role == 0) {
        long k = 0;
        while (!stop_flag) {
            k++;
            m->data = k;
            m->flag = k;
        }
        w->ops = k;
    } else {
        long last = 0;
        while (!stop_flag) {
            long f = m->flag;
            long d = m->data;
            if (d < f)
                w->bad++;
            if (f != last) {
                w->seen++;
                last = f;
            }
            w->ops++;
        }
    }
}

static void check_mp(void) {
    void *args[MAXCPU];
    long writes = 0, reads = 0, changes = 0, bad = 0;
    int unpinned = 0;
    for (int r = 1; r <= rounds(); r++) {
        for (int p = 0; p < ncpu / 2; p++)
            args[p] = zalloc(sizeof(struct mp));
        int n = pair_workers(r, mp_fn, args);
        unpinned += run_workers(n, budget_ms / rounds());
        for (int i = 0; i < n; i++) {
            if (W[i].role == 0)
                writes += W[i].ops;
            else
                reads += W[i].ops, changes += W[i].seen, bad += W[i].bad;
        }
        for (int p = 0; p < ncpu / 2; p++)
            free(args[p]);
    }
    report("mp", bad == 0 && reads > 0 && writes > 0 && !unpinned,
           "writes=%ld reads=%ld flag_changes_seen=%ld data_older_than_flag=%ld unpinned=%d",
           writes, reads, changes, bad, unpinned);
}

/* ---- store buffering: x=k; [fence]; r0=y  ||  y=k; [fence]; r1=x, in lockstep ----
 * Each side waits until the other finished the previous iteration, so iteration k starts
 * with x, y >= k-1. Both reading k-1 is the store-buffering outcome: allowed without a
 * fence, forbidden with MFENCE or a locked instruction between the store and the load
 * (a failed LOCK CMPXCHG is still a locked instruction, SDM vol. 3A 9.1.2.2/9.2.2). */

struct sb {
    volatile long x ALIGNED;
    volatile long y ALIGNED;
    volatile long dummy[2] ALIGNED;
    int *r[2];
    long done[2];
};

#define SB_FN(NAME, FENCE)                                                       \
    static void NAME(struct worker *w) {                                         \
        struct sb *s = w->arg;                                                   \
        volatile long *mine = w->role ? &s->y : &s->x;                           \
        volatile long *other = w->role ? &s->x : &s->y;                          \
        volatile long *dummy = &s->dummy[w->role];                               \
        int *r = s->r[w->role];                                                  \
        long k;                                                                  \
        (void)dummy;                                                             \
        for (k = 1; k < SB_MAX && !stop_flag; k++) {                             \
            while (*other < k - 1) {                                             \
                if (stop_flag)                                                   \
                    goto out;                                                    \
                relax();                                                         \
            }                                                                    \
            *mine = k;                                                           \
            FENCE;                                                               \
            r[k] = (int)*other;                                                  \
        }                                                                        \
    out:                                                                         \
        s->done[w->role] = k - 1;                                                \
    }

SB_FN(sb_none, cbar())
SB_FN(sb_mfence, __asm__ __volatile__("mfence" ::: "memory"))
SB_FN(sb_lockadd, __asm__ __volatile__("lock orq $0, (%%rsp)" ::: "memory", "cc"))
/* *dummy is 1, RAX 0: the compare always fails. */
SB_FN(sb_failcas, do {
    long rax = 0;
    __asm__ __volatile__("lock cmpxchgq %2, %1" : "+a"(rax), "+m"(*dummy) : "r"(1L) : "memory", "cc");
} while (0))

static void check_sb(const char *name, void (*fn)(struct worker *), int fenced) {
    void *args[MAXCPU];
    long iters = 0, both_stale = 0, impossible = 0;
    int unpinned = 0, idle_pairs = 0;
    int np = ncpu / 2;
    for (int p = 0; p < np; p++) {
        struct sb *s = zalloc(sizeof(struct sb));
        s->r[0] = zalloc(sizeof(int) * SB_MAX);
        s->r[1] = zalloc(sizeof(int) * SB_MAX);
        args[p] = s;
    }
    for (int r = 1; r <= rounds(); r++) {
        for (int p = 0; p < np; p++) {
            struct sb *s = args[p];
            s->x = s->y = 0;
            s->dummy[0] = s->dummy[1] = 1;
            s->done[0] = s->done[1] = 0;
        }
        int n = pair_workers(r, fn, args);
        unpinned += run_workers(n, budget_ms / rounds());
        for (int p = 0; p < n / 2; p++) {
            struct sb *s = args[p];
            long m = s->done[0] < s->done[1] ? s->done[0] : s->done[1];
            idle_pairs += m == 0;
            for (long k = 1; k <= m; k++) {
                int a = s->r[0][k], b = s->r[1][k];
                if (a < k - 1 || b < k - 1)
                    impossible++; /* a load went back in time */
                else if (a == k - 1 && b == k - 1)
                    both_stale++;
            }
            iters += m;
        }
    }
    for (int p = 0; p < np; p++) {
        struct sb *s = args[p];
        free(s->r[0]);
        free(s->r[1]);
        free(s);
    }
    long bad = impossible + (fenced ? both_stale : 0);
    report(name, bad == 0 && iters > 0 && !unpinned,
           "iterations=%ld both_read_old=%ld%s load_reordered=%ld idle_pairs=%d unpinned=%d",
           iters, both_stale, fenced ? "(forbidden)" : "(allowed)", impossible, idle_pairs,
           unpinned);
}

/* ---- LOCKed counters on every CPU ---- */

static struct {
    volatile long v ALIGNED;
} ctr;

static void lockadd_fn(struct worker *w) {
    long n = 0;
    while (!stop_flag) {
        __atomic_fetch_add(&ctr.v, 1, __ATOMIC_RELAXED); /* lock addq */
        n++;
    }
    w->ops = n;
}

static void xadd_fn(struct worker *w) {
    long n = 0, last = -1;
    while (!stop_flag) {
        long t = __atomic_fetch_add(&ctr.v, 1, __ATOMIC_RELAXED); /* lock xaddq */
        if (t <= last)
            w->bad++;
        last = t;
        n++;
    }
    w->ops = n;
}

static int all_workers(void (*fn)(struct worker *)) {
    for (int i = 0; i < ncpu; i++)
        W[i] = (struct worker){.cpu = i, .role = i & 1, .fn = fn};
    return ncpu;
}

static void check_counter(const char *name, void (*fn)(struct worker *)) {
    ctr.v = 0;
    int unpinned = run_workers(all_workers(fn), budget_ms);
    long sum = 0, bad = 0;
    for (int i = 0; i < ncpu; i++)
        sum += W[i].ops, bad += W[i].bad;
    report(name, ctr.v == sum && bad == 0 && sum > 0 && !unpinned,
           "increments=%ld counter=%ld lost=%ld tickets_out_of_order=%ld unpinned=%d", sum, ctr.v,
           sum - ctr.v, bad, unpinned);
}

/* ---- LOCKed bit operations on one shared word: each CPU sets and clears only its own bit
 * (as Linux's page and folio flags are set by one CPU while another clears a neighbour),
 * with every form the kernel uses (OR/AND/XOR with an immediate on a byte, a word, a dword
 * or a qword, with a register, BTS/BTR/BTC with an immediate or a register). An RMW that is not atomic
 * writes back a stale copy of the other CPUs' bits: a CPU then finds its bit wrong. ---- */

static union {
    volatile u64 q;
    volatile unsigned char b[8];
} bitw ALIGNED;

#define OWN_BIT(k) ((bitw.q >> (k)) & 1)
#define BYTE_OPS(K)                                                                        \
    case K:                                                                                \
        __asm__ __volatile__("lock orb %1, %0" : "+m"(bitw.b[0]) : "i"(1 << K) : "memory");  \
        bad += OWN_BIT(K) != 1;                                                            \
        __asm__ __volatile__("lock andb %1, %0"                                            \
                             : "+m"(bitw.b[0])                                             \
                             : "i"(0xff & ~(1 << K))                                       \
                             : "memory");                                                  \
        bad += OWN_BIT(K) != 0;                                                            \
        __asm__ __volatile__("lock xorw %1, %0"                                            \
                             : "+m"(*(volatile unsigned short *)&bitw.q)                   \
                             : "i"(1 << K)                                                 \
                             : "memory");                                                  \
        bad += OWN_BIT(K) != 1;                                                            \
        __asm__ __volatile__("lock andl %1, %0"                                            \
                             : "+m"(*(volatile unsigned *)&bitw.q)                         \
                             : "i"(~(1 << K))                                              \
                             : "memory");                                                  \
        bad += OWN_BIT(K) != 0;                                                            \
        __asm__ __volatile__("lock orq %1, %0" : "+m"(bitw.q) : "i"(1 << K) : "memory");     \
        bad += OWN_BIT(K) != 1;                                                            \
        __asm__ __volatile__("lock andq %1, %0" : "+m"(bitw.q) : "i"(~(1 << K)) : "memory"); \
        bad += OWN_BIT(K) != 0;                                                            \
        __asm__ __volatile__("lock btsq %1, %0" : "+m"(bitw.q) : "i"(K) : "memory", "cc");   \
        bad += OWN_BIT(K) != 1;                                                            \
        __asm__ __volatile__("lock btrq %1, %0" : "+m"(bitw.q) : "i"(K) : "memory", "cc");   \
        bad += OWN_BIT(K) != 0;                                                            \
        __asm__ __volatile__("lock btcl %1, %0"                                            \
                             : "+m"(*(volatile unsigned *)&bitw.q)                         \
                             : "i"(K)                                                      \
                             : "memory", "cc");                                            \
        bad += OWN_BIT(K) != 1;                                                            \
        __asm__ __volatile__("lock xorb %1, %0" : "+m"(bitw.b[0]) : "i"(1 << K) : "memory"); \
        bad += OWN_BIT(K) != 0;                                                            \
        break;

static void bitops_fn(struct worker *w) {
    long n = 0, bad = 0;
    int k = w->cpu & 7;
    u64 mask = 1ull << k;
    while (!stop_flag) {
        switch (k) {
            BYTE_OPS(0)
            BYTE_OPS(1)
            BYTE_OPS(2)
            BYTE_OPS(3)
            BYTE_OPS(4)
            BYTE_OPS(5)
            BYTE_OPS(6)
            BYTE_OPS(7)
        }
        __asm__ __volatile__("lock orq %1, %0" : "+m"(bitw.q) : "r"(mask) : "memory");
        bad += OWN_BIT(k) != 1;
        __asm__ __volatile__("lock andq %1, %0" : "+m"(bitw.q) : "r"(~mask) : "memory");
        bad += OWN_BIT(k) != 0;
        __asm__ __volatile__("lock btsq %1, %0" : "+m"(bitw.q) : "r"((u64)k) : "memory", "cc");
        bad += OWN_BIT(k) != 1;
        __asm__ __volatile__("lock btrq %1, %0" : "+m"(bitw.q) : "r"((u64)k) : "memory", "cc");
        bad += OWN_BIT(k) != 0;
        __asm__ __volatile__("lock btcq %1, %0" : "+m"(bitw.q) : "r"((u64)k) : "memory", "cc");
        bad += OWN_BIT(k) != 1;
        __asm__ __volatile__("lock xorq %1, %0" : "+m"(bitw.q) : "r"(mask) : "memory");
        bad += OWN_BIT(k) != 0;
        n++;
    }
    w->ops = n;
    w->bad = bad;
}

static void check_bitops(void) {
    bitw.q = 0;
    /* Up to 8 CPUs share the byte, each with its own bit. */
    int n = ncpu < 8 ? ncpu : 8;
    for (int i = 0; i < n; i++)
        W[i] = (struct worker){.cpu = i, .role = i & 1, .fn = bitops_fn};
    int unpinned = run_workers(n, budget_ms);
    long rounds_done = 0, bad = 0;
    for (int i = 0; i < n; i++)
        rounds_done += W[i].ops, bad += W[i].bad;
    report("lock-bitops", bad == 0 && bitw.q == 0 && rounds_done > 0 && !unpinned,
           "rounds=%ld wrong_own_bit=%ld final=%#llx unpinned=%d", rounds_done, bad,
           (unsigned long long)bitw.q, unpinned);
}

/* ---- narrow atomics side by side in one word, as in Linux's queued spinlock: every CPU
 * exchanges tokens into the 16-bit tail half (XCHG) while each toggles its own bit of the
 * low byte (LOCK CMPXCHG of 8 bits). Every token exchanged in must come out exactly once
 * (from some exchange, or as the value left), and no CPU's bit may go wrong. ---- */

static union {
    volatile u64 q;
    volatile unsigned short h[4];
    volatile unsigned char b[8];
} qsw ALIGNED;

static void toggle_own(int k) {
    unsigned char expect = qsw.b[0], want;
    do {
        want = (unsigned char)(expect ^ (1u << k));
    } while (!__atomic_compare_exchange_n(&qsw.b[0], &expect, want, 0, __ATOMIC_SEQ_CST,
                                          __ATOMIC_SEQ_CST));
}

static void narrow_fn(struct worker *w) {
    long n = 0, bad = 0, sum_in = 0, sum_out = 0;
    int k = w->cpu & 7;
    while (!stop_flag) {
        unsigned short t = (unsigned short)(((w->cpu & 7) + 1) << 12 | (n & 0xfff));
        sum_in += t;
        __asm__ __volatile__("xchgw %0, %1" : "+r"(t), "+m"(qsw.h[1]) : : "memory");
        sum_out += t;
        toggle_own(k);
        bad += ((qsw.b[0] >> k) & 1) != 1;
        toggle_own(k);
        bad += ((qsw.b[0] >> k) & 1) != 0;
        n++;
    }
    w->ops = n;
    w->bad = bad;
    w->extra = sum_in;
    w->seen = sum_out;
}

static void check_narrow(void) {
    qsw.q = 0;
    int n = ncpu < 8 ? ncpu : 8;
    for (int i = 0; i < n; i++)
        W[i] = (struct worker){.cpu = i, .role = i & 1, .fn = narrow_fn};
    int unpinned = run_workers(n, budget_ms);
    long rounds_done = 0, bad = 0, in = 0, out = 0;
    for (int i = 0; i < n; i++)
        rounds_done += W[i].ops, bad += W[i].bad, in += W[i].extra, out += W[i].seen;
    out += qsw.h[1];
    report("narrow-atomics", bad == 0 && in == out && qsw.b[0] == 0 && rounds_done > 0 &&
                                 !unpinned,
           "rounds=%ld wrong_own_bit=%ld tokens_in=%ld tokens_out=%ld lost_or_doubled=%ld "
           "unpinned=%d",
           rounds_done, bad, in, out, in - out, unpinned);
}

/* ---- spinlocks (CMPXCHG, XCHG with its implicit lock, LOCK BTS) around a plain counter ---- */

static struct {
    volatile long lock ALIGNED;
    volatile long count ALIGNED;
    volatile long owner;
} sl;

static inline void lock_cmpxchg(void) {
    for (;;) {
        long e = 0;
        if (__atomic_compare_exchange_n(&sl.lock, &e, 1, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
            return;
        while (sl.lock)
            relax();
    }
}

static inline void lock_xchg(void) {
    long v;
    for (;;) {
        v = 1;
        __asm__ __volatile__("xchgq %0, %1" : "+r"(v), "+m"(sl.lock) : : "memory");
        if (!v)
            return;
        while (sl.lock)
            relax();
    }
}

static inline void lock_bts(void) {
    for (;;) {
        unsigned char c;
        __asm__ __volatile__("lock btsq $0, %0; setc %1" : "+m"(sl.lock), "=q"(c) : : "memory", "cc");
        if (!c)
            return;
        while (sl.lock & 1)
            relax();
    }
}

#define LOCK_FN(NAME, LOCK)                                                      \
    static void NAME(struct worker *w) {                                         \
        long n = 0;                                                              \
        while (!stop_flag) {                                                     \
            LOCK();                                                              \
            sl.owner = w->cpu;                                                   \
            long c = sl.count;                                                   \
            sl.count = c + 1;                                                    \
            if (sl.owner != w->cpu)                                              \
                w->bad++;                                                        \
            __atomic_store_n(&sl.lock, 0, __ATOMIC_RELEASE);                     \
            n++;                                                                 \
        }                                                                        \
        w->ops = n;                                                              \
    }

LOCK_FN(cmpxchg_lock_fn, lock_cmpxchg)
LOCK_FN(xchg_lock_fn, lock_xchg)
LOCK_FN(bts_lock_fn, lock_bts)

static void check_spinlock(const char *name, void (*fn)(struct worker *)) {
    sl.lock = 0;
    sl.count = 0;
    int unpinned = run_workers(all_workers(fn), budget_ms);
    long sum = 0, bad = 0;
    for (int i = 0; i < ncpu; i++)
        sum += W[i].ops, bad += W[i].bad;
    report(name, sl.count == sum && bad == 0 && sum > 0 && !unpinned,
           "acquisitions=%ld counter=%ld lost=%ld two_owners=%ld unpinned=%d", sum, sl.count,
           sum - sl.count, bad, unpinned);
}

/* ---- LOCK CMPXCHG16B: a 16-byte pair; alone, and against LOCK ADD on its high half ---- */

static struct {
    volatile u64 lo, hi;
} __attribute__((aligned(LINE))) dw;

static inline int cas16(u64 *lo, u64 *hi, u64 nlo, u64 nhi) {
    unsigned char ok;
    __asm__ __volatile__("lock cmpxchg16b %1; sete %0"
                         : "=q"(ok), "+m"(dw), "+a"(*lo), "+d"(*hi)
                         : "b"(nlo), "c"(nhi)
                         : "memory", "cc");
    return ok;
}

/* Role 0 (or every CPU when `mixed` is 0) adds 1 to both halves with CMPXCHG16B; a
 * failed one returns a snapshot, whose low 32 bits must agree. Role 1 (mixed) adds 1<<32 to
 * the high half with LOCK ADD. */
static int dw_mixed;

static void dw_fn(struct worker *w) {
    long n = 0;
    if (dw_mixed && w->role == 1) {
        while (!stop_flag) {
            __asm__ __volatile__("lock addq %1, %0" : "+m"(dw.hi) : "r"(1ULL << 32) : "memory", "cc");
            n++;
        }
        w->ops = n;
        return;
    }
    u64 lo = 0, hi = 0;
    while (!stop_flag) {
        if (cas16(&lo, &hi, lo + 1, hi + 1)) {
            lo++, hi++, n++;
        } else {
            w->seen++;
            if ((u32)lo != (u32)hi)
                w->bad++;
        }
    }
    w->ops = n;
}

static void check_cmpxchg16b(const char *name, int mixed) {
    dw.lo = dw.hi = 0;
    dw_mixed = mixed;
    int unpinned = run_workers(all_workers(dw_fn), budget_ms);
    u64 cas = 0, adds = 0;
    long torn = 0, retries = 0;
    for (int i = 0; i < ncpu; i++) {
        if (mixed && W[i].role == 1)
            adds += W[i].ops;
        else
            cas += W[i].ops, torn += W[i].bad, retries += W[i].seen;
    }
    int ok = dw.lo == cas && dw.hi == cas + (adds << 32) && torn == 0 && cas > 0 && !unpinned &&
             (!mixed || adds > 0);
    report(name, ok,
           "cmpxchg16b=%llu lock_add_hi=%llu lo=%llu hi_low32=%llu hi_high32=%llu "
           "retries=%ld torn_snapshots=%ld unpinned=%d",
           (unsigned long long)cas, (unsigned long long)adds, (unsigned long long)dw.lo,
           (unsigned long long)(u32)dw.hi, (unsigned long long)(dw.hi >> 32), retries, torn,
           unpinned);
}

/* ---- split locks: LOCK ADD on a dword across a cache-line boundary; alone, and against an
 * aligned LOCK ADD on its low word (hardware locks the bus: atomic against everything) ---- */

static unsigned char splitbuf[3 * LINE] ALIGNED;
#define SPLIT32 ((volatile u32 *)(splitbuf + LINE - 2)) /* bytes 62..65 */
#define LOW16 ((volatile u16 *)(splitbuf + LINE - 2))   /* bytes 62..63, aligned */
static int split_mixed;

static void split_fn(struct worker *w) {
    long n = 0;
    if (split_mixed && w->role == 1) {
        while (!stop_flag) {
            __asm__ __volatile__("lock addw $1, %0" : "+m"(*LOW16) : : "memory", "cc");
            n++;
        }
    } else {
        u32 inc = split_mixed ? 0x10000 : 1;
        while (!stop_flag) {
            __asm__ __volatile__("lock addl %1, %0" : "+m"(*SPLIT32) : "r"(inc) : "memory", "cc");
            n++;
        }
    }
    w->ops = n;
}

static void check_split(const char *name, int mixed) {
    *SPLIT32 = 0;
    split_mixed = mixed;
    int unpinned = run_workers(all_workers(split_fn), budget_ms);
    u64 split = 0, aligned = 0;
    for (int i = 0; i < ncpu; i++) {
        if (mixed && W[i].role == 1)
            aligned += W[i].ops;
        else
            split += W[i].ops;
    }
    u32 v = *SPLIT32, want;
    if (mixed)
        want = (u32)((split << 16) + (aligned & 0xffff)); /* words wrap separately */
    else
        want = (u32)split;
    int ok = v == want && split > 0 && !unpinned && (!mixed || aligned > 0);
    report(name, ok, "split_adds=%llu aligned_adds=%llu value=%#x expected=%#x unpinned=%d",
           (unsigned long long)split, (unsigned long long)aligned, v, want, unpinned);
}

/* ---- one writer, readers on the other CPUs; the writer moves to each CPU in turn ---- */

static int writer_rounds(void) { return ncpu < 4 ? ncpu : 4; }

static int writer_workers(int r, void (*fn)(struct worker *), void *arg) {
    for (int i = 0; i < ncpu; i++)
        W[i] = (struct worker){.cpu = i, .role = i == r ? 0 : 1, .arg = arg, .fn = fn};
    return ncpu;
}

/* seqlock: the writer bumps seq to odd, writes a pair (a; b, c on another line), bumps seq
 * to even; a reader that saw the same even seq around its reads saw an untorn pair. */
static struct {
    volatile unsigned seq ALIGNED;
    volatile long a ALIGNED;
    volatile long b ALIGNED;
    volatile long c;
} sq;

static void seqlock_fn(struct worker *w) {
    if (w->role == 0) {
        long k = 0;
        while (!stop_flag) {
            k++;
            unsigned s = sq.seq;
            sq.seq = s + 1;
            cbar(); /* smp_wmb() on x86 */
            sq.a = k;
            sq.b = k;
            sq.c = k;
            cbar();
            sq.seq = s + 2;
        }
        w->ops = k;
        return;
    }
    long last = 0;
    while (!stop_flag) {
        unsigned s1 = sq.seq;
        if (s1 & 1) {
            w->extra++;
            continue;
        }
        cbar(); /* smp_rmb() on x86 */
        long a = sq.a, b = sq.b, c = sq.c;
        cbar();
        if (sq.seq != s1) {
            w->extra++;
            continue;
        }
        if (a != b || b != c)
            w->bad++;
        if (a != last)
            w->seen++, last = a;
        w->ops++;
    }
}

static void check_seqlock(void) {
    long writes = 0, reads = 0, retries = 0, changes = 0, torn = 0;
    int unpinned = 0;
    for (int r = 0; r < writer_rounds(); r++) {
        memset((void *)&sq, 0, sizeof sq);
        unpinned += run_workers(writer_workers(r, seqlock_fn, NULL), budget_ms / writer_rounds());
        for (int i = 0; i < ncpu; i++) {
            if (W[i].role == 0)
                writes += W[i].ops;
            else
                reads += W[i].ops, retries += W[i].extra, changes += W[i].seen, torn += W[i].bad;
        }
    }
    report("seqlock", torn == 0 && reads > 0 && writes > 0 && !unpinned,
           "writes=%ld consistent_reads=%ld retries=%ld values_seen=%ld torn=%ld unpinned=%d",
           writes, reads, retries, changes, torn, unpinned);
}

/* Untorn plain accesses: 8 bytes aligned, 8 bytes unaligned inside one cache line (atomic
 * on P6 and later, SDM vol. 3A 9.1.1), 16 bytes with MOVDQA (atomic where CPUID has AVX). */
static unsigned char tearbuf[2 * LINE] ALIGNED;
static int tear_kind; /* 0: aligned 8, 1: unaligned 8 in a line, 2: movdqa 16 */

static inline volatile u64 *tear_ptr(void) {
    return (volatile u64 *)(tearbuf + (tear_kind == 1 ? 4 : 0));
}

static void tear_fn(struct worker *w) {
    volatile u64 *p = tear_ptr();
    if (w->role == 0) {
        u64 k = 0;
        while (!stop_flag) {
            k++;
            if (tear_kind == 2) {
                u64 v[2] __attribute__((aligned(16))) = {k * 0x100000001ULL, k * 0x100000001ULL};
                __asm__ __volatile__("movdqa %1, %%xmm0; movdqa %%xmm0, %0"
                                     : "=m"(*(volatile u64(*)[2])p)
                                     : "m"(v)
                                     : "xmm0", "memory");
            } else {
                *p = k * 0x100000001ULL;
            }
        }
        w->ops = (long)k;
        return;
    }
    u64 last = 0;
    while (!stop_flag) {
        u64 v[2] __attribute__((aligned(16)));
        if (tear_kind == 2) {
            __asm__ __volatile__("movdqa %1, %%xmm1; movdqa %%xmm1, %0"
                                 : "=m"(v)
                                 : "m"(*(volatile u64(*)[2])p)
                                 : "xmm1", "memory");
            if (v[0] != v[1])
                w->bad++;
        } else {
            v[0] = *p;
        }
        if ((u32)v[0] != (u32)(v[0] >> 32))
            w->bad++;
        if (v[0] != last)
            w->seen++, last = v[0];
        w->ops++;
    }
}

static void check_tear(const char *name, int kind) {
    long writes = 0, reads = 0, changes = 0, torn = 0;
    int unpinned = 0;
    tear_kind = kind;
    for (int r = 0; r < writer_rounds(); r++) {
        memset(tearbuf, 0, sizeof tearbuf);
        unpinned += run_workers(writer_workers(r, tear_fn, NULL), budget_ms / writer_rounds());
        for (int i = 0; i < ncpu; i++) {
            if (W[i].role == 0)
                writes += W[i].ops;
            else
                reads += W[i].ops, changes += W[i].seen, torn += W[i].bad;
        }
    }
    report(name, torn == 0 && reads > 0 && writes > 0 && !unpinned,
           "writes=%ld reads=%ld values_seen=%ld torn=%ld unpinned=%d", writes, reads, changes,
           torn, unpinned);
}

/* ---- cross-modifying code: one CPU rewrites the immediate of `mov eax, imm32; ret` in an
 * RWX page and raises a flag; the other, which keeps calling the function while it waits,
 * sees the flag, runs CPUID (serialising) and calls it: it must get the new value
 * (SDM vol. 3A 9.1.3, the cross-modifying-code protocol). ---- */

struct xmc {
    unsigned char *code;
    volatile long flag ALIGNED;
    volatile long ack ALIGNED;
};

static void xmc_fn(struct worker *w) {
    struct xmc *x = w->arg;
    volatile u32 *imm = (volatile u32 *)(x->code + 4);
    int (*fn)(void) = (int (*)(void))(void *)(x->code + 3);
    if (w->role == 0) {
        long k;
        for (k = 1; !stop_flag; k++) {
            *imm = (u32)k;
            x->flag = k;
            while (x->ack != k) {
                if (stop_flag)
                    goto out;
                relax();
            }
            w->ops++;
        }
    out:
        return;
    }
    long k = 1;
    while (!stop_flag) {
        while (x->flag != k) {
            if (stop_flag)
                return;
            (void)fn();
            w->extra++;
        }
        serialise();
        int v = fn();
        if (v != (int)k)
            w->bad++;
        x->ack = k;
        k++;
    }
}

static void check_xmc(void) {
    void *args[MAXCPU];
    long mods = 0, stale = 0, spin_calls = 0;
    int unpinned = 0;
    int np = ncpu / 2;
    for (int p = 0; p < np; p++) {
        struct xmc *x = zalloc(sizeof(struct xmc));
        x->code = mmap(NULL, 4096, PROT_READ | PROT_WRITE | PROT_EXEC, MAP_PRIVATE | MAP_ANONYMOUS,
                       -1, 0);
        if (x->code == MAP_FAILED) {
            perror("mmap rwx");
            exit(2);
        }
        args[p] = x;
    }
    for (int r = 1; r <= rounds(); r++) {
        for (int p = 0; p < np; p++) {
            struct xmc *x = args[p];
            /* nop; nop; nop; mov eax, 0; ret  (the immediate 4-byte aligned at offset 4) */
            static const unsigned char tmpl[9] = {0x90, 0x90, 0x90, 0xb8, 0, 0, 0, 0, 0xc3};
            memcpy(x->code, tmpl, sizeof tmpl);
            x->flag = x->ack = 0;
        }
        int n = pair_workers(r, xmc_fn, args);
        unpinned += run_workers(n, budget_ms / rounds());
        for (int i = 0; i < n; i++) {
            if (W[i].role == 0)
                mods += W[i].ops;
            else
                stale += W[i].bad, spin_calls += W[i].extra;
        }
    }
    for (int p = 0; p < np; p++) {
        struct xmc *x = args[p];
        munmap(x->code, 4096);
        free(x);
    }
    report("cross-modifying-code", stale == 0 && mods > 0 && !unpinned,
           "modifications=%ld stale_after_cpuid=%ld calls_while_waiting=%ld unpinned=%d", mods,
           stale, spin_calls, unpinned);
}

static int has_avx(void) {
    unsigned a = 1, b, c = 0, d;
    __asm__ __volatile__("cpuid" : "+a"(a), "=b"(b), "+c"(c), "=d"(d));
    return (c >> 28) & 1;
}

static char **only;
static int nonly;

static int want(const char *name) {
    if (!nonly)
        return 1;
    for (int i = 0; i < nonly; i++)
        if (!strcmp(only[i], name))
            return 1;
    return 0;
}

int main(int argc, char **argv) {
    if (argc > 1)
        budget_ms = atol(argv[1]);
    if (argc > 2)
        only = argv + 2, nonly = argc - 2;
    ncpu = (int)sysconf(_SC_NPROCESSORS_ONLN);
    if (ncpu < 2 || ncpu > MAXCPU) {
        printf("smp-litmus: needs 2..%d online CPUs, has %d\n", MAXCPU, ncpu);
        printf("LITMUS DONE checks=0 failed=1\n");
        return 1;
    }
    printf("smp-litmus: %d cpus, %ld ms per check\n", ncpu, budget_ms);
    fflush(stdout);
    if (want("cpus"))
        check_cpus();
    if (want("mp"))
        check_mp();
    if (want("sb"))
        check_sb("sb", sb_none, 0);
    if (want("sb-mfence"))
        check_sb("sb-mfence", sb_mfence, 1);
    if (want("sb-lock-or"))
        check_sb("sb-lock-or", sb_lockadd, 1);
    if (want("sb-failed-lock-cmpxchg"))
        check_sb("sb-failed-lock-cmpxchg", sb_failcas, 1);
    if (want("lock-add"))
        check_counter("lock-add", lockadd_fn);
    if (want("lock-xadd"))
        check_counter("lock-xadd", xadd_fn);
    if (want("narrow-atomics"))
        check_narrow();
    if (want("lock-bitops"))
        check_bitops();
    if (want("cmpxchg-spinlock"))
        check_spinlock("cmpxchg-spinlock", cmpxchg_lock_fn);
    if (want("xchg-spinlock"))
        check_spinlock("xchg-spinlock", xchg_lock_fn);
    if (want("bts-spinlock"))
        check_spinlock("bts-spinlock", bts_lock_fn);
    if (want("cmpxchg16b"))
        check_cmpxchg16b("cmpxchg16b", 0);
    if (want("cmpxchg16b-vs-lock-add"))
        check_cmpxchg16b("cmpxchg16b-vs-lock-add", 1);
    if (want("split-lock"))
        check_split("split-lock", 0);
    if (want("split-lock-vs-aligned-lock"))
        check_split("split-lock-vs-aligned-lock", 1);
    if (want("seqlock"))
        check_seqlock();
    if (want("untorn-8-aligned"))
        check_tear("untorn-8-aligned", 0);
    if (want("untorn-8-unaligned-in-line"))
        check_tear("untorn-8-unaligned-in-line", 1);
    /* 16-byte atomicity is promised only where CPUID has AVX (SDM vol. 3A 9.1.1). */
    if (want("untorn-16-movdqa") && has_avx())
        check_tear("untorn-16-movdqa", 2);
    if (want("cross-modifying-code"))
        check_xmc();
    printf("LITMUS DONE checks=%d failed=%d\n", checks, failures);
    return failures != 0;
}
