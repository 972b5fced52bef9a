/*
 * fanout.c - a benchmark workload for `ferry-bench tree`: a process tree
 * whose processes each run several threads, all of them dirtying memory.
 *
 *   usage: fanout THREADS PROCS MIB
 *
 * The root forks PROCS-1 children (a flat tree: every child's parent is the
 * root). Each of the PROCS processes maps its share of MIB MiB of private
 * anonymous memory (the pages are split as evenly as possible, lower process
 * indices get the remainder), and runs THREADS threads in total (its main
 * thread is one of them). Each thread owns an equal slice of its process's
 * pages: it fills them with non-zero data before READY, then every
 * FANOUT_TICK_US microseconds (default 1000) it checks and rewrites
 * FANOUT_PAGES_PER_TICK pages (default 4) of its slice, round robin, so the
 * memory is under light but constant write activity.
 *
 * Every page carries a tag (process, page number) and a generation that the
 * owning thread can predict from its own cursor, so a page lost, zeroed or
 * mixed up by a checkpoint or restore is reported as
 *     FAIL fanout: <what>
 * and the process exits 1 (the root also fails if a child exits).
 *
 * Readiness: each child writes one byte to a pipe once all its threads have
 * filled their slices, then closes it; the root reads PROCS-1 bytes (bounded
 * wait), closes its end and prints "READY" (one write(2), after an info
 * line). After READY the tree holds no pipe, socket or other descriptor
 * besides stdin/stdout/stderr as given (stdout/stderr: a log file), so ferry
 * can checkpoint it.
 *
 * It runs until killed, or until WORKLOAD_SECS (default 600) of
 * CLOCK_MONOTONIC time after READY: then the root SIGTERMs the children,
 * reaps them and prints "PASS fanout". A child whose parent is gone
 * (getppid() changed) exits within 100 ms, so nothing outlives a killed
 * root for long.
 *
 * Build: gcc -O2 -pthread -o fanout fanout.c
 */
#define _GNU_SOURCE
#include "../../tests/workloads/common.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096
#define WORDS (PAGE / 8)
#define MAX_THREADS 1024
#define MAX_PROCS 1024
/* Words of a page that every rewrite updates (word 1 is the generation). */
#define STRIDE 64
#define BOUND 60.0 /* seconds for any setup wait */

static int nthreads, nprocs, proc_idx;
static pid_t root_pid;
static long tick_us = 1000, pages_per_tick = 4;
static double deadline;
static uint64_t *region;
static long region_pages;
static atomic_int threads_ready;



__attribute__((format(printf, 1, 2), noreturn)) static void fail(const char *fmt, ...)
{
    char why[400];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(why, sizeof why, fmt, ap);
    va_end(ap);
    wl_say("FAIL fanout: process %d (pid %d): %s", proc_idx, (int)getpid(), why);
    _exit(1);
}

static uint64_t tag_of(long page)
{
    return 0xfa00000000000000ull ^ ((uint64_t)proc_idx << 40) ^ (uint64_t)page;
}

static uint64_t word_of(uint64_t tag, long w, uint64_t gen)
{
    uint64_t x = tag * 0x9e3779b97f4a7c15ull ^ (uint64_t)w * 0xbf58476d1ce4e5b9ull;
    if (w % STRIDE == 0)
        x ^= gen * 0x94d049bb133111ebull;
    return x | 1; /* never zero */
}

static void fill_page(long page)
{
    uint64_t *p = region + page * WORDS;
    uint64_t tag = tag_of(page);
    p[0] = tag;
    p[1] = 0;
    for (long w = 2; w < WORDS; w++)
        p[w] = word_of(tag, w, 0);
}

/* Checks that `page` holds generation `gen`, then writes generation gen+1. */
static void step_page(long page, uint64_t gen)
{
    uint64_t *p = region + page * WORDS;
    uint64_t tag = tag_of(page);
    if (p[0] != tag)
        fail("page %ld: tag %#llx, expected %#llx", page, (unsigned long long)p[0],
             (unsigned long long)tag);
    if (p[1] != gen)
        fail("page %ld: generation %llu, expected %llu", page, (unsigned long long)p[1],
             (unsigned long long)gen);
    for (long w = STRIDE; w < WORDS; w += STRIDE)
        if (p[w] != word_of(tag, w, gen))
            fail("page %ld word %ld: %#llx, expected %#llx", page, w, (unsigned long long)p[w],
                 (unsigned long long)word_of(tag, w, gen));
    if (p[WORDS - 1] != word_of(tag, WORDS - 1, 0))
        fail("page %ld: last word %#llx, expected %#llx", page,
             (unsigned long long)p[WORDS - 1], (unsigned long long)word_of(tag, WORDS - 1, 0));
    for (long w = STRIDE; w < WORDS; w += STRIDE)
        p[w] = word_of(tag, w, gen + 1);
    p[1] = gen + 1;
}

static void sleep_us(long us)
{
    struct timespec ts = {us / 1000000, (us % 1000000) * 1000};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

struct slice {
    long first, count;
    uint64_t cursor; /* page writes done; page = cursor % count, gen = cursor / count */
};

/* One tick of a thread's work. */
static void tick(struct slice *s)
{
    for (long k = 0; k < pages_per_tick; k++) {
        long page = s->first + (long)(s->cursor % (uint64_t)s->count);
        step_page(page, s->cursor / (uint64_t)s->count);
        s->cursor++;
    }
}

static void slice_of(int t, struct slice *s)
{
    long a = region_pages * t / nthreads, b = region_pages * (t + 1) / nthreads;
    s->first = a;
    s->count = b - a;
    s->cursor = 0;
    for (long p = a; p < b; p++)
        fill_page(p);
}

static void *worker(void *arg)
{
    struct slice s;
    slice_of((int)(intptr_t)arg, &s);
    atomic_fetch_add(&threads_ready, 1);
    for (;;) {
        sleep_us(tick_us);
        tick(&s);
    }
    return NULL;
}

/* Maps this process's memory and starts its threads; returns thread 0's
 * slice once every thread has filled its own. */
static void setup_process(struct slice *s)
{
    size_t len = (size_t)region_pages * PAGE;
    region = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (region == MAP_FAILED)
        fail("mmap %zu bytes: %s", len, strerror(errno));
    for (int t = 1; t < nthreads; t++) {
        pthread_t th;
        int e = pthread_create(&th, NULL, worker, (void *)(intptr_t)t);
        if (e != 0)
            fail("pthread_create (thread %d): %s", t, strerror(e));
    }
    slice_of(0, s);
    double end = wl_now() + BOUND;
    while (atomic_load(&threads_ready) < nthreads - 1) {
        if (wl_now() > end)
            fail("only %d of %d threads started within %.0f s", atomic_load(&threads_ready) + 1,
                 nthreads, BOUND);
        sleep_us(1000);
    }
}

static long env_long(const char *name, long dflt, long lo, long hi)
{
    const char *v = getenv(name);
    if (!v || !*v)
        return dflt;
    char *end;
    long x = strtol(v, &end, 10);
    if (*end || x < lo || x > hi) {
        wl_say("FAIL fanout: bad %s=%s (want %ld..%ld)", name, v, lo, hi);
        exit(2);
    }
    return x;
}

static long arg_long(const char *s, const char *what, long lo, long hi)
{
    char *end;
    long x = strtol(s, &end, 10);
    if (!*s || *end || x < lo || x > hi) {
        wl_say("FAIL fanout: bad %s %s (want %ld..%ld)", what, s, lo, hi);
        exit(2);
    }
    return x;
}

static void child_main(int ready_wr, long total_pages)
{
    struct slice s;
    region_pages = total_pages / nprocs + (proc_idx < total_pages % nprocs);
    setup_process(&s);
    char c = 'r';
    while (write(ready_wr, &c, 1) < 0 && errno == EINTR) {
    }
    close(ready_wr);
    double next_check = wl_now() + 0.1;
    for (;;) {
        sleep_us(tick_us);
        tick(&s);
        double t = wl_now();
        if (t >= next_check) {
            next_check = t + 0.1;
            if (getppid() != root_pid)
                _exit(0); /* the root is gone: we were killed along with it */
        }
    }
}

int main(int argc, char **argv)
{
    if (argc != 4) {
        wl_say("usage: fanout THREADS PROCS MIB");
        return 2;
    }
    nthreads = (int)arg_long(argv[1], "THREADS", 1, MAX_THREADS);
    nprocs = (int)arg_long(argv[2], "PROCS", 1, MAX_PROCS);
    long mib = arg_long(argv[3], "MIB", 1, 1L << 20);
    tick_us = env_long("FANOUT_TICK_US", 1000, 1, 10000000);
    pages_per_tick = env_long("FANOUT_PAGES_PER_TICK", 4, 1, 1L << 20);
    long secs = env_long("WORKLOAD_SECS", 600, 1, 1L << 30);
    long total_pages = mib * (1024 * 1024 / PAGE);
    if (total_pages / nprocs < nthreads) {
        wl_say("FAIL fanout: %ld pages cannot give each of %d processes %d threads a page",
            total_pages, nprocs, nthreads);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    root_pid = getpid();
    int pfd[2];
    if (nprocs > 1 && pipe(pfd) != 0)
        fail("pipe: %s", strerror(errno));
    pid_t kids[MAX_PROCS];
    for (int i = 1; i < nprocs; i++) {
        pid_t pid = fork();
        if (pid < 0)
            fail("fork (child %d): %s", i, strerror(errno));
        if (pid == 0) {
            proc_idx = i;
            close(pfd[0]);
            child_main(pfd[1], total_pages);
        }
        kids[i] = pid;
    }

    struct slice s;
    proc_idx = 0;
    region_pages = total_pages / nprocs + (0 < total_pages % nprocs);
    setup_process(&s);

    if (nprocs > 1) {
        close(pfd[1]);
        int got = 0;
        double end = wl_now() + BOUND;
        while (got < nprocs - 1) {
            double left = end - wl_now();
            if (left <= 0)
                fail("only %d of %d children ready within %.0f s", got, nprocs - 1, BOUND);
            struct pollfd p = {pfd[0], POLLIN, 0};
            int r = poll(&p, 1, (int)(left * 1000) + 1);
            if (r < 0 && errno != EINTR)
                fail("poll: %s", strerror(errno));
            if (r <= 0)
                continue;
            char buf[MAX_PROCS];
            ssize_t n = read(pfd[0], buf, sizeof buf);
            if (n < 0 && errno != EINTR)
                fail("read readiness pipe: %s", strerror(errno));
            if (n == 0)
                fail("a child exited before it was ready (%d of %d ready)", got, nprocs - 1);
            if (n > 0)
                got += (int)n;
        }
        close(pfd[0]);
    }
    wl_say("fanout: %d process%s x %d thread%s, %ld pages per process (%ld MiB in total), "
        "%ld page%s per thread every %ld us",
        nprocs, nprocs == 1 ? "" : "es", nthreads, nthreads == 1 ? "" : "s", region_pages, mib,
        pages_per_tick, pages_per_tick == 1 ? "" : "s", tick_us);
    wl_say("READY");
    deadline = wl_now() + (double)secs;

    double next_check = wl_now() + 0.1;
    for (;;) {
        sleep_us(tick_us);
        tick(&s);
        double t = wl_now();
        if (t < next_check)
            continue;
        next_check = t + 0.1;
        int st;
        pid_t dead = waitpid(-1, &st, WNOHANG);
        if (dead > 0) {
            if (WIFSIGNALED(st))
                fail("child pid %d was killed by signal %d", (int)dead, WTERMSIG(st));
            fail("child pid %d exited with status %d", (int)dead, WEXITSTATUS(st));
        }
        if (t > deadline)
            break;
    }
    /* Deadline: stop the children (SIGTERM, default action) and reap them. */
    for (int i = 1; i < nprocs; i++)
        kill(kids[i], SIGTERM);
    for (int i = 1; i < nprocs; i++) {
        int st;
        double end = wl_now() + BOUND;
        for (;;) {
            pid_t r = waitpid(kids[i], &st, WNOHANG);
            if (r == kids[i])
                break;
            if (r < 0)
                fail("waitpid %d: %s", (int)kids[i], strerror(errno));
            if (wl_now() > end)
                fail("child pid %d did not exit after the deadline", (int)kids[i]);
            sleep_us(10000);
        }
        if (!WIFSIGNALED(st) || WTERMSIG(st) != SIGTERM)
            fail("child pid %d ended with status %#x instead of SIGTERM", (int)kids[i], st);
    }
    wl_say("PASS fanout");
    return 0;
}
