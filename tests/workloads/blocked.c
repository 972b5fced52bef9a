/*
 * blocked.c - a process stopped inside blocking system calls must resume
 * them correctly.
 *
 * After READY it loops (until the deadline, at least once) over a sequence
 * of blocking calls, each lasting STEP (300 ms), so a checkpoint taken at a
 * random moment almost always finds the process asleep in one of them:
 *   1. nanosleep(STEP)                 -> 0, at least STEP elapsed
 *   2. read() on an empty pipe; a one-shot ITIMER_REAL fires after STEP and
 *      its SIGALRM handler (SA_RESTART) writes "tick NNNNNN\n" into the pipe
 *                                      -> exactly that line, never EINTR
 *   3. poll() on the empty pipe, timeout STEP       -> 0
 *   4. futex(FUTEX_WAIT) on a word nobody wakes, timeout STEP -> ETIMEDOUT
 *   5. select() on the empty pipe, timeout STEP     -> 0
 *   6. pause() until SIGALRM (interval timer)       -> -1/EINTR, handler ran
 * and checks at least STEP elapsed for every one.
 *
 * What a restorer must get right: a read() interrupted by the freeze is
 * restarted (ERESTARTSYS with an SA_RESTART handler: returning EINTR is a
 * FAIL); calls that the kernel restarts through restart_syscall (nanosleep,
 * poll, select, futex with a timeout) may come back with EINTR after a
 * restore, since the kernel's restart block is not part of the image, and
 * this program then retries with the remaining time as a careful program
 * does; pending ITIMER_REAL values must survive.
 *
 * Watchdog: there is none in-process: steps 2 and 6 rely on ITIMER_REAL,
 * the only alarm clock a process has.  Every other wait is bounded, and the
 * harness kills a workload that overruns its timeout.
 */
#include "common.h"

#include <linux/futex.h>
#include <poll.h>
#include <signal.h>
#include <sys/select.h>
#include <sys/syscall.h>
#include <sys/time.h>

#define STEP 0.3
#define STEP_MS 300
/* Allowed early wake-up: measurement granularity only, far below STEP. */
#define SLACK 0.001
#define TICK_LEN 12

enum { MODE_COUNT, MODE_WRITE };

static int pfd[2];
static volatile sig_atomic_t mode = MODE_COUNT;
static volatile sig_atomic_t alarms;
static volatile sig_atomic_t ticks_written;
static volatile sig_atomic_t handler_write_failed;

/* Formats "tick NNNNNN\n" without stdio (async-signal-safe). */
static void tick_text(char *out, int n)
{
    memcpy(out, "tick ", 5);
    for (int i = 10; i >= 5; i--) {
        out[i] = (char)('0' + n % 10);
        n /= 10;
    }
    out[11] = '\n';
}

static void on_alarm(int sig)
{
    (void)sig;
    int saved = errno;
    alarms++;
    if (mode == MODE_WRITE) {
        char buf[TICK_LEN];
        tick_text(buf, ticks_written + 1);
        if (write(pfd[1], buf, TICK_LEN) != TICK_LEN)
            handler_write_failed = 1;
        ticks_written++;
        mode = MODE_COUNT; /* one line per read step */
    }
    errno = saved;
}

static void set_timer(double first, double interval)
{
    struct itimerval it;
    it.it_value.tv_sec = (time_t)first;
    it.it_value.tv_usec = (suseconds_t)((first - (double)(time_t)first) * 1e6);
    it.it_interval.tv_sec = (time_t)interval;
    it.it_interval.tv_usec = (suseconds_t)((interval - (double)(time_t)interval) * 1e6);
    CHECK_SYS(setitimer(ITIMER_REAL, &it, NULL));
}

static struct timespec to_ts(double s)
{
    if (s < 0)
        s = 0;
    struct timespec ts;
    ts.tv_sec = (time_t)s;
    ts.tv_nsec = (long)((s - (double)ts.tv_sec) * 1e9);
    return ts;
}

static void expect_elapsed(double t0, const char *what)
{
    double dt = wl_now() - t0;
    CHECK(dt >= STEP - SLACK, "%s returned after %.6f s, asked for %.3f s", what, dt, STEP);
}

/* 1. nanosleep, retried with the remaining time (from the clock) on EINTR. */
static void step_nanosleep(int *eintr)
{
    double t0 = wl_now(), end = t0 + STEP;
    for (;;) {
        struct timespec ts = to_ts(end - wl_now());
        int r = nanosleep(&ts, NULL);
        if (r == 0)
            break;
        CHECK(errno == EINTR, "nanosleep: %s", strerror(errno));
        ++*eintr;
    }
    expect_elapsed(t0, "nanosleep");
}

/* 2. read() blocked until the SIGALRM handler writes; SA_RESTART means a
 * signal or a freeze must never surface as EINTR here. */
static void step_read(void)
{
    double t0 = wl_now();
    int want = ticks_written + 1;
    mode = MODE_WRITE;
    set_timer(STEP, 0);
    char buf[64];
    ssize_t n = read(pfd[0], buf, sizeof buf);
    CHECK(n >= 0, "read on the pipe failed: %s (must be restarted: SA_RESTART)",
          strerror(errno));
    CHECK(n == TICK_LEN, "read %zd bytes, want %d", n, TICK_LEN);
    char exp[TICK_LEN];
    tick_text(exp, want);
    CHECK(memcmp(buf, exp, TICK_LEN) == 0, "read \"%.*s\", want \"%.*s\"",
          TICK_LEN - 1, buf, TICK_LEN - 1, exp);
    CHECK(!handler_write_failed, "the SIGALRM handler could not write the pipe");
    CHECK(mode == MODE_COUNT, "read returned before the handler ran");
    expect_elapsed(t0, "read");
}

/* 3. poll() on the empty pipe. */
static void step_poll(int *eintr)
{
    double t0 = wl_now(), end = t0 + STEP;
    for (;;) {
        struct pollfd p = {.fd = pfd[0], .events = POLLIN};
        int ms = (int)((end - wl_now()) * 1000 + 0.999);
        int r = poll(&p, 1, ms < 0 ? 0 : ms);
        if (r == 0)
            break;
        CHECK(r < 0, "poll: pipe unexpectedly readable (revents %#x)", p.revents);
        CHECK(errno == EINTR, "poll: %s", strerror(errno));
        ++*eintr;
    }
    expect_elapsed(t0, "poll");
}

/* 4. FUTEX_WAIT with a relative timeout on a word nobody wakes. */
static void step_futex(int *eintr)
{
    static uint32_t word = 0;
    double t0 = wl_now(), end = t0 + STEP;
    for (;;) {
        struct timespec ts = to_ts(end - wl_now());
        long r = syscall(SYS_futex, &word, FUTEX_WAIT_PRIVATE, 0, &ts, NULL, 0);
        if (r == -1 && errno == ETIMEDOUT)
            break;
        CHECK(!(r == -1 && errno == EAGAIN), "futex: value changed under us (EAGAIN)");
        /* EINTR, or 0 (a spurious wake-up, allowed by futex(2)): retry. */
        CHECK(r == 0 || errno == EINTR, "futex: %s", strerror(errno));
        ++*eintr;
    }
    expect_elapsed(t0, "futex");
}

/* 5. select() on the empty pipe. */
static void step_select(int *eintr)
{
    double t0 = wl_now(), end = t0 + STEP;
    for (;;) {
        fd_set r;
        FD_ZERO(&r);
        FD_SET(pfd[0], &r);
        double left = end - wl_now();
        if (left < 0)
            left = 0;
        struct timeval tv = {(time_t)left, (suseconds_t)((left - (double)(time_t)left) * 1e6 + 0.999)};
        int n = select(pfd[0] + 1, &r, NULL, NULL, &tv);
        if (n == 0)
            break;
        CHECK(n < 0, "select: pipe unexpectedly readable");
        CHECK(errno == EINTR, "select: %s", strerror(errno));
        ++*eintr;
    }
    expect_elapsed(t0, "select");
}

/* 6. pause() until SIGALRM.  The timer repeats every STEP so that an alarm
 * landing between the check and pause() (say, the process was frozen right
 * there) only costs one more period instead of sleeping forever. */
static void step_pause(void)
{
    double t0 = wl_now();
    int a0 = alarms;
    mode = MODE_COUNT;
    set_timer(STEP, STEP);
    while (alarms == a0) {
        int r = pause();
        CHECK(r == -1 && errno == EINTR, "pause returned %d (%s)", r, strerror(errno));
    }
    set_timer(0, 0); /* a pending SIGALRM is delivered as this returns */
    expect_elapsed(t0, "pause");
}

int main(void)
{
    wl_init("blocked");
    double secs = wl_secs(2.0);

    CHECK_SYS(pipe(pfd));
    struct sigaction sa = {0};
    sa.sa_handler = on_alarm;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    CHECK_SYS(sigaction(SIGALRM, &sa, NULL));

    wl_ready(secs);

    int rounds = 0, eintr = 0;
    do {
        step_nanosleep(&eintr);
        step_read();
        step_poll(&eintr);
        step_futex(&eintr);
        step_select(&eintr);
        step_pause();
        rounds++;
    } while (!wl_time_up());

    /* Nothing left over in the pipe, no stray timer. */
    struct pollfd p = {.fd = pfd[0], .events = POLLIN};
    CHECK(poll(&p, 1, 0) == 0, "pipe not empty at the end");
    struct itimerval it;
    CHECK_SYS(getitimer(ITIMER_REAL, &it));
    CHECK(it.it_value.tv_sec == 0 && it.it_value.tv_usec == 0, "ITIMER_REAL still armed");
    CHECK(ticks_written == rounds, "%d ticks written for %d rounds", (int)ticks_written, rounds);

    wl_say("rounds %d, retried after EINTR %d times", rounds, eintr);
    wl_pass();
}
