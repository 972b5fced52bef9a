/*
 * churn.c - a malloc/free microbenchmark for `ferry-bench zero`: the
 * worst case for a library that scrubs freed memory, since the program
 * does little with its blocks besides allocating and freeing them.
 *
 *   usage: churn THREADS OPS full|touch
 *
 * Each of THREADS threads does OPS operations on its own table of 1024
 * slots: pick a random slot, free its block, malloc a new one of a random
 * size between 16 B and 64 KiB, log-uniformly distributed (every power of
 * two from 16 B to 32 KiB is equally likely to be the lower end of the
 * size's octave; a uniform offset inside the octave), and write it:
 *
 *   full   every byte of the block (what a program that allocates memory
 *          normally goes on to do);
 *   touch  its first 64 bytes and one byte per 4 KiB page (allocation
 *          cost alone).
 *
 * A block's first and last bytes are checked before it is freed (each
 * block stores a tag derived from its slot and operation). At the end it
 * prints
 *
 *     churn threads=T ops=N mode=M secs=S cpu=C ns_per_op=X
 *     PASS churn
 *
 * (or "FAIL churn: <what>", exit 1). secs is CLOCK_MONOTONIC from the
 * first thread's start to the last thread's end, cpu the process's CPU
 * time (all threads, user + system) over the same span, ns_per_op
 * secs / N.
 *
 * Build: gcc -O2 -pthread -o churn churn.c
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define SLOTS 1024
#define MIN_SHIFT 4  /* 16 B */
#define MAX_SHIFT 16 /* 64 KiB */

static long ops;
static int full;

struct slot {
    unsigned char *p;
    size_t n;
    unsigned char tag;
};

static double clock_secs(clockid_t c)
{
    struct timespec ts;
    clock_gettime(c, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void fail(const char *what)
{
    char buf[256];
    int n = snprintf(buf, sizeof buf, "FAIL churn: %s\n", what);
    if (n > 0)
        (void)!write(1, buf, (size_t)n);
    _exit(1);
}

static uint64_t next(uint64_t *s)
{
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

static size_t pick(uint64_t *s)
{
    uint64_t r = next(s);
    unsigned e = MIN_SHIFT + (unsigned)(r % (MAX_SHIFT - MIN_SHIFT));
    size_t lo = (size_t)1 << e;
    return lo + (size_t)((r >> 16) % lo);
}

static void *worker(void *arg)
{
    uint64_t s = 0x9e3779b97f4a7c15ull ^ ((uintptr_t)arg * 0x100000001b3ull);
    struct slot *slot = calloc(SLOTS, sizeof *slot);
    if (!slot)
        fail("calloc");
    for (long i = 0; i < ops; i++) {
        struct slot *k = &slot[next(&s) % SLOTS];
        if (k->p) {
            if (k->p[0] != k->tag || k->p[k->n - 1] != k->tag)
                fail("a block changed before it was freed");
            free(k->p);
        }
        size_t n = pick(&s);
        unsigned char tag = (unsigned char)(i | 1);
        unsigned char *p = malloc(n);
        if (!p)
            fail("malloc");
        if (full) {
            memset(p, tag, n);
        } else {
            memset(p, tag, n < 64 ? n : 64);
            for (size_t o = 4096; o < n; o += 4096)
                p[o] = tag;
            p[n - 1] = tag;
        }
        __asm__ volatile("" : : "r"(p) : "memory");
        k->p = p;
        k->n = n;
        k->tag = tag;
    }
    for (int k = 0; k < SLOTS; k++)
        free(slot[k].p);
    free(slot);
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc != 4 || (strcmp(argv[3], "full") != 0 && strcmp(argv[3], "touch") != 0)) {
        fprintf(stderr, "usage: churn THREADS OPS full|touch\n");
        return 2;
    }
    int threads = atoi(argv[1]);
    ops = atol(argv[2]);
    full = strcmp(argv[3], "full") == 0;
    if (threads < 1 || threads > 256 || ops < 1)
        fail("bad THREADS or OPS");
    pthread_t t[256];
    double t0 = clock_secs(CLOCK_MONOTONIC), c0 = clock_secs(CLOCK_PROCESS_CPUTIME_ID);
    for (int i = 0; i < threads; i++)
        if (pthread_create(&t[i], NULL, worker, (void *)(uintptr_t)(i + 1)) != 0)
            fail("pthread_create");
    for (int i = 0; i < threads; i++)
        pthread_join(t[i], NULL);
    double dt = clock_secs(CLOCK_MONOTONIC) - t0;
    double dc = clock_secs(CLOCK_PROCESS_CPUTIME_ID) - c0;
    char buf[200];
    int n = snprintf(buf, sizeof buf,
                     "churn threads=%d ops=%ld mode=%s secs=%.4f cpu=%.4f ns_per_op=%.1f\n"
                     "PASS churn\n",
                     threads, ops * threads, argv[3], dt, dc, dt * 1e9 / (double)(ops * threads));
    if (n > 0)
        (void)!write(1, buf, (size_t)n);
    return 0;
}
