/*
 * common.h - shared helpers for ferry's self-verifying test workloads.
 *
 * Protocol (see README.md): a workload sets up its state, prints "READY",
 * keeps working and re-verifying until a deadline (WORKLOAD_SECS, measured
 * from READY with CLOCK_MONOTONIC), then prints exactly one of
 * "PASS <name>" or "FAIL <name>: <reason>" and exits 0 or 1.
 *
 * Between READY and the verdict the process may be frozen, checkpointed,
 * killed and restored (same pid, memory, registers and fds), so:
 *   - output goes through write(2) straight to fd 1, never through stdio
 *     buffers (a buffered line would be written twice: once by the original
 *     and once by the restored copy, or lost);
 *   - durations are only ever checked as "at least", since time spent
 *     frozen or dead makes any interval look longer;
 *   - named files keep their size and contents after READY (see
 *     wl_keep_files), so an image taken with --leave-running can still be
 *     restored after the original finished.
 *
 * Everything here is static so each workload is a single .c file built with
 * `gcc -O2 -g -pthread -o NAME NAME.c`.
 */
#ifndef FERRY_WORKLOAD_COMMON_H
#define FERRY_WORKLOAD_COMMON_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif

#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* Every helper is static and marked unused so that a workload that does
 * not need one still compiles without warnings. */
#define WL_FN static __attribute__((unused))

static const char *wl_name = "workload";
/* CLOCK_MONOTONIC seconds at which the working phase ends (set by wl_ready). */
static double wl_deadline;

/* Seconds on CLOCK_MONOTONIC.  Monotonic time keeps running while the
 * process is frozen or between checkpoint and restore on the same machine,
 * which is exactly what "at least N seconds elapsed" checks need. */
WL_FN double wl_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Seconds on CLOCK_REALTIME: comparable across nodes and with the
 * harness's own clock (progress ticks of the bench workloads). */
WL_FN double wl_realtime(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Writes all of buf to fd 1.  A single write(2) per line: stdout is a file
 * opened with O_APPEND by the harness, so each line lands whole even though
 * the original process and a restored copy may both write to it. */
WL_FN void wl_write_all(const char *buf, size_t len)
{
    while (len > 0) {
        ssize_t n = write(1, buf, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return; /* nowhere left to report to */
        }
        buf += n;
        len -= (size_t)n;
    }
}

/* printf-like, appends '\n'.  Not async-signal-safe: main context only. */
__attribute__((format(printf, 1, 2)))
WL_FN void wl_say(const char *fmt, ...)
{
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if ((size_t)n > sizeof buf - 2)
        n = (int)(sizeof buf - 2);
    buf[n++] = '\n';
    wl_write_all(buf, (size_t)n);
}

__attribute__((format(printf, 1, 2), noreturn))
WL_FN void wl_fail(const char *fmt, ...)
{
    char reason[800];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(reason, sizeof reason, fmt, ap);
    va_end(ap);
    wl_say("FAIL %s: %s", wl_name, reason);
    _exit(1);
}

__attribute__((noreturn))
WL_FN void wl_pass(void)
{
    wl_say("PASS %s", wl_name);
    _exit(0);
}

/* CHECK(cond, "fmt", ...) fails the workload with the location and message
 * (fmt must be a string literal). */
#define CHECK(cond, fmt, ...)                                                \
    do {                                                                     \
        if (!(cond))                                                         \
            wl_fail("%s:%d: " fmt, __FILE__, __LINE__, ##__VA_ARGS__);       \
    } while (0)

/* CHECK_SYS(expr): expr must not return -1; reports errno otherwise. */
#define CHECK_SYS(expr)                                                      \
    do {                                                                     \
        if ((long)(expr) == -1L)                                             \
            wl_fail("%s:%d: %s: %s", __FILE__, __LINE__, #expr,              \
                    strerror(errno));                                        \
    } while (0)

/* WORKLOAD_SECS (seconds after READY) or the workload's default. */
WL_FN double wl_secs(double def)
{
    const char *s = getenv("WORKLOAD_SECS");
    if (s && *s) {
        char *end;
        double v = strtod(s, &end);
        if (end != s && v >= 0 && v < 1e6)
            return v;
    }
    return def;
}

WL_FN void wl_init(const char *name)
{
    wl_name = name;
}

/* Prints READY and starts the working phase of `secs` seconds. */
WL_FN void wl_ready(double secs)
{
    wl_deadline = wl_now() + secs;
    wl_say("READY");
}

WL_FN int wl_time_up(void)
{
    return wl_now() >= wl_deadline;
}

/* Directory for temporary files: $FERRY_TEST_TMP or /tmp. */
WL_FN const char *wl_tmpdir(void)
{
    const char *d = getenv("FERRY_TEST_TMP");
    return (d && *d) ? d : "/tmp";
}

/* Whether to leave temporary files behind at exit.  Under the harness
 * (FERRY_TEST_TMP set) they must stay: an image taken with --leave-running
 * is restored after the original exited, and the restored copy reopens the
 * same paths.  The harness deletes the whole directory afterwards.  Run by
 * hand (no FERRY_TEST_TMP) a workload cleans up after itself. */
WL_FN int wl_keep_files(void)
{
    const char *d = getenv("FERRY_TEST_TMP");
    return d && *d;
}

/* Sleeps at least `secs` seconds.  A signal or a checkpoint can interrupt
 * nanosleep with EINTR (a restorer may turn a pending restart into EINTR),
 * so the remaining time is recomputed from the clock, not taken from rem,
 * which the kernel does not fill in in that case. */
WL_FN void wl_sleep(double secs)
{
    double end = wl_now() + secs;
    for (;;) {
        double left = end - wl_now();
        if (left <= 0)
            return;
        struct timespec ts;
        ts.tv_sec = (time_t)left;
        ts.tv_nsec = (long)((left - (double)ts.tv_sec) * 1e9);
        if (nanosleep(&ts, NULL) == 0)
            return;
        if (errno != EINTR)
            wl_fail("nanosleep: %s", strerror(errno));
    }
}

/* 64-bit mixer (splitmix64 finaliser): cheap, deterministic patterns. */
WL_FN inline uint64_t wl_mix(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

#endif /* FERRY_WORKLOAD_COMMON_H */
