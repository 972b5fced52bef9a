/*
 * zero_bench.c - malloc-heavy microbenchmarks for ferry-zero, run with and
 * without the library by crates/ferry-zero/tests/preload.rs.
 *
 *   zero_bench mixed OPS THREADS   OPS malloc/free pairs in all, split over
 *                                  THREADS threads, each replacing random
 *                                  slots of its own 1024-slot table; sizes
 *                                  80 % 16-512 B, 15 % 512 B-16 KiB, 5 %
 *                                  16-256 KiB; every block gets its first
 *                                  64 bytes and one byte per page written.
 *   zero_bench realloc ROUNDS      ROUNDS times: grow a block from 4 KiB to
 *                                  4 MiB by 4 KiB steps (realloc), writing
 *                                  the new last byte, then free it.
 *
 * Prints one line: NAME ops=N threads=N secs=S ns_per_op=X
 * Build: gcc -O2 -pthread -o zero_bench zero_bench.c
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define SLOTS 1024

static long ops_per_thread;

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
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
    unsigned c = (unsigned)(r % 100);
    size_t lo, hi;
    if (c < 80)
        lo = 16, hi = 512;
    else if (c < 95)
        lo = 512, hi = 16 << 10;
    else
        lo = 16 << 10, hi = 256 << 10;
    return lo + (size_t)((r >> 8) % (hi - lo));
}

static void *mixed(void *arg)
{
    uint64_t s = 0x9e3779b97f4a7c15ull ^ (uintptr_t)arg;
    unsigned char *slot[SLOTS] = {0};
    for (long i = 0; i < ops_per_thread; i++) {
        unsigned k = (unsigned)(next(&s) % SLOTS);
        free(slot[k]);
        size_t n = pick(&s);
        unsigned char *p = malloc(n);
        if (!p)
            abort();
        memset(p, (int)i, n < 64 ? n : 64);
        for (size_t o = 4096; o < n; o += 4096)
            p[o] = (unsigned char)i;
        slot[k] = p;
    }
    for (int k = 0; k < SLOTS; k++)
        free(slot[k]);
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc >= 4 && strcmp(argv[1], "mixed") == 0) {
        long ops = atol(argv[2]);
        int threads = atoi(argv[3]);
        pthread_t t[64];
        if (threads < 1 || threads > 64)
            return 2;
        ops_per_thread = ops / threads;
        double t0 = now();
        for (int i = 0; i < threads; i++)
            pthread_create(&t[i], NULL, mixed, (void *)(uintptr_t)(i + 1));
        for (int i = 0; i < threads; i++)
            pthread_join(t[i], NULL);
        double dt = now() - t0;
        printf("mixed ops=%ld threads=%d secs=%.3f ns_per_op=%.1f\n", ops, threads, dt,
               dt * 1e9 / (double)ops);
        return 0;
    }
    if (argc >= 3 && strcmp(argv[1], "realloc") == 0) {
        long rounds = atol(argv[2]), ops = 0;
        double t0 = now();
        for (long r = 0; r < rounds; r++) {
            unsigned char *p = NULL;
            for (size_t n = 4096; n <= (4u << 20); n += 4096, ops++) {
                p = realloc(p, n);
                if (!p)
                    abort();
                p[n - 1] = (unsigned char)n;
            }
            free(p);
        }
        double dt = now() - t0;
        printf("realloc ops=%ld threads=1 secs=%.3f ns_per_op=%.1f\n", ops, dt,
               dt * 1e9 / (double)ops);
        return 0;
    }
    fprintf(stderr, "usage: zero_bench mixed OPS THREADS | realloc ROUNDS\n");
    return 2;
}
