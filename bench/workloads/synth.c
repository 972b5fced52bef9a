/*
 * synth.c - a synthetic workload for `ferry-bench migrate`: a job with a
 * given memory size, writable working set and write rate, that reports its
 * progress so the harness can measure how much a live migration slows it.
 *
 *   usage: synth MEM_MIB WSS_MIB RATE_MIBPS [PATTERN]
 *
 * It maps MEM_MIB MiB of private anonymous memory (MADV_NOHUGEPAGE: 4 KiB
 * pages, as the dirty tracking counts them) and fills every page with
 * non-zero, incompressible data (a xorshift stream seeded from the page
 * number and its generation; no word is ever zero). Then it prints READY
 * and keeps writing inside its working set, the first WSS_MIB MiB of the
 * region, at RATE_MIBPS MiB/s. The unit of work is one page write: check the
 * page's current contents in full (tag, generation, every word), then
 * rewrite all of it with the next generation. PATTERN picks the pages:
 *
 *   seq   (default) sweep the working set page after page, round robin: at
 *         RATE >= WSS per second the whole set is rewritten every second,
 *         always the same pages (a hot set);
 *   rand  uniformly random pages of the working set (xorshift): the set of
 *         pages written in an interval grows like WSS * (1 - e^(-RATE*t/WSS)).
 *
 * Pacing: the owed work is (time since start) * RATE; the job works in
 * batches and sleeps ~1 ms when it is ahead. Work owed for more than 20 ms
 * is dropped instead of caught up, so time the job spends frozen (or slowed)
 * is lost work, as for a real job running at its natural speed. RATE 0 means
 * as fast as it can (no sleeping).
 *
 * Every SYNTH_TICK_MS (default 100) ms it prints one line
 *
 *     tick <CLOCK_REALTIME seconds, 6 decimals> <page writes since READY>
 *
 * (realtime, so the harness can line it up with its own clock, also after
 * the job moved to another node) and verifies 1024 more pages of the whole
 * region round robin (all of a 1 GiB region every ~26 s). Just before READY
 * it prints "t0 <realtime>".
 *
 * It stops WORKLOAD_SECS (default 600) seconds of CLOCK_MONOTONIC after
 * READY, or as soon as the file named by SYNTH_STOP_FILE exists (checked
 * every tick; the harness uses it to end a migrated job early), then checks
 * every page of the region and prints "done ..." and exactly one of
 *
 *     PASS synth
 *     FAIL synth: <what>
 *
 * and exits 0 or 1 (protocol of tests/workloads/README.md). A page lost,
 * zeroed, stale or mixed up by a migration fails the next check of it.
 *
 * Build: gcc -O2 -o synth synth.c
 */
#define _GNU_SOURCE
#include "../../tests/workloads/common.h"

#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096
#define WORDS (PAGE / 8)
#define TAG_MAGIC 0x5e7d000000000000ull
/* Pages verified round robin per tick, besides the ones being rewritten. */
#define VERIFY_PER_TICK 1024
/* Owed work older than this is dropped (seconds). */
#define MAX_BACKLOG 0.02

static uint64_t *region;
static uint32_t *gens; /* generation of every page */
static long pages, wss_pages;






/* The seed of a page's stream: never zero, so xorshift never yields 0. */
static uint64_t seed_of(long page, uint32_t gen)
{
    return wl_mix((uint64_t)page * 0x100000001b3ull ^ ((uint64_t)gen << 40) ^ 0x51ull) | 1;
}

static void write_page(long page, uint32_t gen)
{
    uint64_t *p = region + page * WORDS;
    uint64_t x = seed_of(page, gen);
    p[0] = TAG_MAGIC ^ (uint64_t)page;
    p[1] = ((uint64_t)gen << 32) | 0xc0deu;
    for (long w = 2; w < WORDS; w++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        p[w] = x;
    }
}

static void check_page(long page, const char *when)
{
    const uint64_t *p = region + page * WORDS;
    uint32_t gen = gens[page];
    if (p[0] != (TAG_MAGIC ^ (uint64_t)page))
        wl_fail("%s: page %ld: tag %#llx, expected %#llx", when, page, (unsigned long long)p[0],
             (unsigned long long)(TAG_MAGIC ^ (uint64_t)page));
    if (p[1] != (((uint64_t)gen << 32) | 0xc0deu))
        wl_fail("%s: page %ld: generation word %#llx, expected generation %u", when, page,
             (unsigned long long)p[1], gen);
    uint64_t x = seed_of(page, gen);
    for (long w = 2; w < WORDS; w++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if (p[w] != x)
            wl_fail("%s: page %ld (generation %u) word %ld: %#llx, expected %#llx", when, page, gen,
                 w, (unsigned long long)p[w], (unsigned long long)x);
    }
}

/* One unit of work: check a working-set page, write its next generation. */
static void step(long page)
{
    check_page(page, "rewrite");
    uint32_t g = gens[page] + 1;
    write_page(page, g);
    gens[page] = g;
}

static long arg_long(const char *s, const char *what, long lo, long hi)
{
    char *end;
    long x = strtol(s, &end, 10);
    if (!*s || *end || x < lo || x > hi) {
        wl_say("FAIL synth: bad %s %s (want %ld..%ld)", what, s, lo, hi);
        exit(2);
    }
    return x;
}

static long env_long(const char *name, long dflt, long lo, long hi)
{
    const char *v = getenv(name);
    if (!v || !*v)
        return dflt;
    return arg_long(v, name, lo, hi);
}

static void sleep_us(long us)
{
    struct timespec ts = {us / 1000000, (us % 1000000) * 1000};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

int main(int argc, char **argv)
{
    wl_init("synth");
    if (argc < 4 || argc > 5) {
        wl_say("usage: synth MEM_MIB WSS_MIB RATE_MIBPS [seq|rand]");
        return 2;
    }
    long mem = arg_long(argv[1], "MEM_MIB", 1, 1L << 20);
    long wss = arg_long(argv[2], "WSS_MIB", 1, mem);
    long rate = arg_long(argv[3], "RATE_MIBPS", 0, 1L << 20);
    int random_pages = 0;
    if (argc == 5) {
        if (strcmp(argv[4], "rand") == 0)
            random_pages = 1;
        else if (strcmp(argv[4], "seq") != 0) {
            wl_say("FAIL synth: bad PATTERN %s (want seq or rand)", argv[4]);
            return 2;
        }
    }
    long secs = env_long("WORKLOAD_SECS", 600, 1, 1L << 30);
    long tick_ms = env_long("SYNTH_TICK_MS", 100, 1, 60000);
    const char *stop_file = getenv("SYNTH_STOP_FILE");
    if (stop_file && !*stop_file)
        stop_file = NULL;

    pages = mem * (1024 * 1024 / PAGE);
    wss_pages = wss * (1024 * 1024 / PAGE);
    size_t len = (size_t)pages * PAGE;
    region = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (region == MAP_FAILED)
        wl_fail("mmap %zu bytes: %s", len, strerror(errno));
    madvise(region, len, MADV_NOHUGEPAGE);
    gens = calloc((size_t)pages, sizeof *gens);
    if (!gens)
        wl_fail("calloc %ld generations", pages);
    double t_fill = wl_now();
    for (long p = 0; p < pages; p++)
        write_page(p, 0);
    t_fill = wl_now() - t_fill;

    double rate_pps = (double)rate * (1024.0 * 1024.0 / PAGE); /* pages per second */
    wl_say("synth: mem %ld MiB, working set %ld MiB, rate %ld MiB/s (%.0f page writes/s%s), "
        "pattern %s, filled in %.2f s",
        mem, wss, rate, rate_pps, rate == 0 ? ", unpaced" : "", random_pages ? "rand" : "seq",
        t_fill);
    wl_say("t0 %.6f", wl_realtime());
    wl_say("READY");

    double start = wl_now();
    double deadline = start + (double)secs;
    double tick = (double)tick_ms / 1000.0;
    double next_tick = start + tick;
    /* Pacing: `base` is the time from which `done` page writes were owed. */
    double base = start;
    uint64_t done = 0, rng = 0x2545f4914f6cdd1dull, cursor = 0;
    long verify_at = 0;
    const char *why = "deadline";
    for (;;) {
        double t = wl_now();
        long batch;
        if (rate > 0) {
            double owed = (t - base) * rate_pps - (double)done;
            if (owed > rate_pps * MAX_BACKLOG) {
                /* Behind (frozen, or starved of CPU): drop the backlog. */
                base = t - ((double)done + rate_pps * MAX_BACKLOG) / rate_pps;
                owed = rate_pps * MAX_BACKLOG;
            }
            batch = owed < 1.0 ? 0 : (long)owed;
            if (batch > 4096)
                batch = 4096;
        } else {
            batch = 64;
        }
        for (long k = 0; k < batch; k++) {
            long page;
            if (random_pages) {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                page = (long)(rng % (uint64_t)wss_pages);
            } else {
                page = (long)(cursor++ % (uint64_t)wss_pages);
            }
            step(page);
        }
        done += (uint64_t)batch;
        if (t >= next_tick) {
            next_tick += tick;
            if (next_tick < t)
                next_tick = t + tick; /* after a freeze: no burst of ticks */
            wl_say("tick %.6f %llu", wl_realtime(), (unsigned long long)done);
            for (long k = 0; k < VERIFY_PER_TICK && k < pages; k++) {
                check_page(verify_at, "periodic check");
                verify_at = (verify_at + 1) % pages;
            }
            if (t >= deadline)
                break;
            if (stop_file && access(stop_file, F_OK) == 0) {
                why = "stop file";
                break;
            }
        }
        if (rate > 0 && batch == 0)
            sleep_us(1000);
    }
    double ran = wl_now() - start;
    for (long p = 0; p < pages; p++)
        check_page(p, "final check");
    wl_say("done: %llu page writes in %.3f s (%s)", (unsigned long long)done, ran, why);
    wl_say("PASS synth");
    return 0;
}
