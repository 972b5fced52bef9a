/*
 * phases.c - an allocation-heavy, solver-like workload for `ferry-bench
 * zero`: it keeps a live state, and every phase assembles a system from
 * large temporary work arrays, frees the temporaries, iterates on the
 * system, and frees it. Freed heap keeps its old (non-zero) contents under
 * glibc, so while a phase solves, several hundred MiB of freed
 * temporaries sit in the heap looking like data to a migration; that is
 * what ferry's freed-memory library (crates/ferry-zero) is for.
 *
 *   usage: phases [LIVE_MIB [WORK_MIB [ITERS [PHASES]]]]
 *          defaults 256 384 200 0
 *
 * Setup: LIVE_MIB of live state in 4 MiB malloc blocks, every 8-byte word
 * a non-zero hash of (block, index).
 *
 * Phase p (all arrays 8 MiB, malloc'd one by one):
 *   1. assemble: WORK_MIB of temporaries T[k], T[k][i] = hash(p, k, i) | 1;
 *      then WORK_MIB / 4 of system arrays S[j] (allocated after the
 *      temporaries, so they sit above them in the heap), S[j][i] = the sum
 *      of T[4j..4j+3][i]; the temporaries are freed (they stay in the
 *      middle of the heap, below S);
 *   2. solve: ITERS sweeps x = x * A + B (mod 2^64) over every element of
 *      S (three such steps per element and sweep);
 *   3. check: every S[j][i] must equal A_n * S0 + B_n, S0 recomputed from
 *      the hashes (A_n, B_n: the sweeps composed), i.e. the temporaries
 *      held the right values when they were summed and S was never
 *      disturbed; the sum of S is the phase's checksum c_p;
 *   4. update the live state: the live blocks b with b % 8 == p % 8 are
 *      checked (init(b, i) + acc[b]) and c_p is added to every word
 *      (acc[b] += c_p); then S is freed (glibc then trims the heap).
 *
 * Phase 1 runs before READY (warm-up: glibc's dynamic mmap threshold rises
 * when the first mmapped 8 MiB array is freed, so from phase 2 on every
 * array comes from the heap). Then READY, and phases 2, 3, ... until PHASES
 * phases are done (0: no limit), WORKLOAD_SECS (default 600) seconds of
 * CLOCK_MONOTONIC have passed since READY, or the file PHASES_STOP_FILE
 * exists (both checked between sweeps; a solve cut short is checked for
 * the sweeps it did). Then the whole live state is checked and it prints
 * "done phases=N secs=S" (S: CLOCK_MONOTONIC seconds from start to the
 * end of the last phase) and exactly one of
 *
 *     PASS phases
 *     FAIL phases: <what>
 *
 * and exits 0 or 1 (the protocol of tests/workloads/README.md). Progress:
 * one line per step, "phase P assemble|solve|done <CLOCK_REALTIME> cpu=<CPU
 * seconds of the process>" (done adds "sweeps=N"), for the harness to see
 * where in a phase a migration started and how long phases take.
 *
 * Build: gcc -O2 -o phases phases.c
 */
#define _GNU_SOURCE
#include "../../tests/workloads/common.h"

#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define MIB (1024L * 1024L)
#define LIVE_BLOCK (4 * MIB)
#define ARRAY (8 * MIB)
#define WORDS_PER_ARRAY (ARRAY / 8)
#define WORDS_PER_LIVE (LIVE_BLOCK / 8)
#define LIVE_GROUPS 8
#define MULT 0x5851f42d4c957f2dull
#define INC 0x14057b7ef767814full

static uint64_t **live;
static uint64_t *acc;
static long nlive;
static const char *stop_file;
static double deadline;


static double cpu(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}




static long arg_long(int argc, char **argv, int i, long def, long lo, long hi, const char *what)
{
    if (argc <= i)
        return def;
    char *end;
    errno = 0;
    long v = strtol(argv[i], &end, 10);
    if (errno || *end || end == argv[i] || v < lo || v > hi)
        wl_fail("bad %s %s (want %ld..%ld)", what, argv[i], lo, hi);
    return v;
}


static uint64_t live_init(long b, long i)
{
    return wl_mix(((uint64_t)b << 32) ^ (uint64_t)i ^ 0x11ull << 56) | 1;
}

static uint64_t temp_val(long p, long k, long i)
{
    return wl_mix(((uint64_t)p << 48) ^ ((uint64_t)k << 32) ^ (uint64_t)i) | 1;
}

static void *alloc(size_t n, const char *what)
{
    void *p = malloc(n);
    if (!p)
        wl_fail("malloc(%zu) for %s failed", n, what);
    return p;
}

static int should_stop(void)
{
    return wl_now() >= deadline || (stop_file && access(stop_file, F_OK) == 0);
}

/* Checks the live blocks of group g (b % LIVE_GROUPS == g) and adds c. */
static void live_update(int g, uint64_t c)
{
    for (long b = g; b < nlive; b += LIVE_GROUPS) {
        uint64_t *w = live[b];
        for (long i = 0; i < WORDS_PER_LIVE; i++) {
            if (w[i] != live_init(b, i) + acc[b])
                wl_fail("live block %ld word %ld is %#llx, want %#llx", b, i,
                     (unsigned long long)w[i], (unsigned long long)(live_init(b, i) + acc[b]));
            w[i] += c;
        }
        acc[b] += c;
    }
}

/* One phase; returns 0 when it was cut short by a stop request before
 * its solve was complete (it is still checked and applied). */
static int phase(long p, long ntemp, long iters)
{
    long nsys = ntemp / 4;
    uint64_t **t = alloc(sizeof *t * (size_t)ntemp, "temporaries table");
    uint64_t **s = alloc(sizeof *s * (size_t)nsys, "system table");

    wl_say("phase %ld assemble %.6f cpu=%.6f", p, wl_realtime(), cpu());
    for (long k = 0; k < ntemp; k++) {
        t[k] = alloc(ARRAY, "a temporary");
        for (long i = 0; i < WORDS_PER_ARRAY; i++)
            t[k][i] = temp_val(p, k, i);
    }
    for (long j = 0; j < nsys; j++) {
        s[j] = alloc(ARRAY, "a system array");
        uint64_t *a = t[4 * j], *b = t[4 * j + 1], *c = t[4 * j + 2], *d = t[4 * j + 3];
        for (long i = 0; i < WORDS_PER_ARRAY; i++)
            s[j][i] = a[i] + b[i] + c[i] + d[i];
    }
    for (long k = 0; k < ntemp; k++)
        free(t[k]);
    free(t);

    wl_say("phase %ld solve %.6f cpu=%.6f", p, wl_realtime(), cpu());
    /* Each sweep applies f(x) = MULT x + INC three times: f^3(x) = A x + B. */
    const uint64_t A = MULT * MULT * MULT;
    const uint64_t B = (MULT * MULT + MULT + 1) * INC;
    uint64_t an = 1, bn = 0;
    long done = 0;
    for (; done < iters; done++) {
        if (done > 0 && should_stop())
            break;
        for (long j = 0; j < nsys; j++) {
            uint64_t *x = s[j];
            for (long i = 0; i < WORDS_PER_ARRAY; i++) {
                uint64_t v = x[i];
                v = v * MULT + INC;
                v = v * MULT + INC;
                x[i] = v * MULT + INC;
            }
        }
        an *= A;
        bn = bn * A + B;
    }

    uint64_t sum = 0;
    for (long j = 0; j < nsys; j++)
        for (long i = 0; i < WORDS_PER_ARRAY; i++) {
            uint64_t s0 = temp_val(p, 4 * j, i) + temp_val(p, 4 * j + 1, i) +
                          temp_val(p, 4 * j + 2, i) + temp_val(p, 4 * j + 3, i);
            uint64_t want = an * s0 + bn;
            if (s[j][i] != want)
                wl_fail("phase %ld: system array %ld word %ld is %#llx after %ld sweeps, want %#llx",
                     p, j, i, (unsigned long long)s[j][i], done, (unsigned long long)want);
            sum += want;
        }
    live_update((int)(p % LIVE_GROUPS), sum | 1);
    for (long j = 0; j < nsys; j++)
        free(s[j]);
    free(s);
    wl_say("phase %ld done %.6f cpu=%.6f sweeps=%ld", p, wl_realtime(), cpu(), done);
    return done == iters;
}

int main(int argc, char **argv)
{
    wl_init("phases");
    double start = wl_now();
    long live_mib = arg_long(argc, argv, 1, 256, 4, 1L << 20, "LIVE_MIB");
    long work_mib = arg_long(argc, argv, 2, 384, 32, 1L << 20, "WORK_MIB");
    long iters = arg_long(argc, argv, 3, 200, 1, 1L << 30, "ITERS");
    long phases = arg_long(argc, argv, 4, 0, 0, 1L << 30, "PHASES");
    long secs = 600;
    const char *e = getenv("WORKLOAD_SECS");
    if (e && *e) {
        char *end;
        secs = strtol(e, &end, 10);
        if (*end || secs < 1)
            wl_fail("bad WORKLOAD_SECS %s", e);
    }
    stop_file = getenv("PHASES_STOP_FILE");
    if (stop_file && !*stop_file)
        stop_file = NULL;
    /* Whole 32 MiB groups: four 8 MiB temporaries per system array. */
    long ntemp = (work_mib * MIB / ARRAY) / 4 * 4;
    if (ntemp < 4)
        wl_fail("WORK_MIB %ld is below 32", work_mib);

    nlive = live_mib * MIB / LIVE_BLOCK;
    if (nlive < 1)
        nlive = 1;
    live = alloc(sizeof *live * (size_t)nlive, "live table");
    acc = calloc((size_t)nlive, sizeof *acc);
    if (!acc)
        wl_fail("calloc for the live accumulators failed");
    for (long b = 0; b < nlive; b++) {
        live[b] = alloc(LIVE_BLOCK, "a live block");
        for (long i = 0; i < WORDS_PER_LIVE; i++)
            live[b][i] = live_init(b, i);
    }

    deadline = 1e300;
    phase(1, ntemp, iters);
    wl_say("READY");
    double ready = wl_now();
    deadline = ready + (double)secs;
    long p = 1;
    while (phases == 0 || p < phases) {
        if (should_stop())
            break;
        p++;
        if (!phase(p, ntemp, iters))
            break;
    }
    double end = wl_now();
    for (long b = 0; b < nlive; b++)
        for (long i = 0; i < WORDS_PER_LIVE; i++)
            if (live[b][i] != live_init(b, i) + acc[b])
                wl_fail("live block %ld word %ld is %#llx at the end, want %#llx", b, i,
                     (unsigned long long)live[b][i],
                     (unsigned long long)(live_init(b, i) + acc[b]));
    wl_say("done phases=%ld secs=%.3f", p, end - start);
    wl_say("PASS phases");
    return 0;
}
