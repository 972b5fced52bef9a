/*
 * signals.c - signal state across a checkpoint.
 *
 * Set up before READY:
 *   - an alternate signal stack (sigaltstack);
 *   - SIGALRM handler with SA_SIGINFO|SA_RESTART|SA_ONSTACK and sa_mask
 *     {SIGWINCH}, driven by ITIMER_REAL every 10 ms; the handler checks it
 *     runs on the alternate stack and with SIGALRM and SIGWINCH blocked;
 *   - SIGUSR1 and SIGRTMIN+1 handlers (same flags), both blocked, with
 *     SIGHUP blocked too (never sent: just part of the mask);
 *   - one SIGUSR1 sent with kill() and three SIGRTMIN+1 queued with
 *     sigqueue() carrying 1, 2, 3, all left pending;
 *   - SIGUSR2 ignored (SIG_IGN).
 * While working: the alarm counter must keep moving, the pending signals
 * must stay pending, SIGUSR2 sent to ourselves must be ignored.
 * Final phase: the handlers' flags/masks, the blocked mask, the itimer and
 * the altstack are read back, then the blocked signals are unblocked and
 * must arrive: SIGUSR1 once (SI_USER from our pid), SIGRTMIN+1 three times
 * with values 1, 2, 3 in that order (SI_QUEUE from our pid).
 */
#include "common.h"

#include <signal.h>
#include <sys/time.h>

#define ALT_SIZE (64 * 1024)
#define TICK_USEC 10000

static char *alt_stack;

static volatile sig_atomic_t alarm_count;
/* Set by handlers on a broken invariant; reported from main. */
static volatile sig_atomic_t bad_stack, bad_mask, bad_info;
static volatile sig_atomic_t usr1_count;
static volatile sig_atomic_t rt_count;
static volatile int rt_values[8];

static int rtsig(void) { return SIGRTMIN + 1; }

/* Handlers only do async-signal-safe work: compare addresses, call
 * sigprocmask/getpid, store flags. */
static void check_context(int must_block)
{
    char here;
    if (&here < alt_stack || &here >= alt_stack + ALT_SIZE)
        bad_stack = 1;
    sigset_t cur;
    sigprocmask(SIG_BLOCK, NULL, &cur);
    /* The signal itself (no SA_NODEFER) and the sa_mask signal must be
     * blocked while the handler runs. */
    if (!sigismember(&cur, must_block) || !sigismember(&cur, SIGWINCH))
        bad_mask = 1;
}

static void on_alarm(int sig, siginfo_t *si, void *uc)
{
    (void)uc;
    check_context(sig);
    if (si->si_signo != SIGALRM)
        bad_info = 1;
    alarm_count++;
}

static void on_usr1(int sig, siginfo_t *si, void *uc)
{
    (void)uc;
    check_context(sig);
    if (si->si_code != SI_USER || si->si_pid != getpid())
        bad_info = 2;
    usr1_count++;
}

static void on_rt(int sig, siginfo_t *si, void *uc)
{
    (void)uc;
    check_context(sig);
    if (si->si_code != SI_QUEUE || si->si_pid != getpid())
        bad_info = 3;
    if (rt_count < 8)
        rt_values[rt_count] = si->si_value.sival_int;
    rt_count++;
}

static void install(int sig, void (*fn)(int, siginfo_t *, void *))
{
    struct sigaction sa = {0};
    sa.sa_sigaction = fn;
    sa.sa_flags = SA_SIGINFO | SA_RESTART | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    sigaddset(&sa.sa_mask, SIGWINCH);
    CHECK_SYS(sigaction(sig, &sa, NULL));
}

static void check_action(int sig, void (*fn)(int, siginfo_t *, void *))
{
    struct sigaction sa;
    CHECK_SYS(sigaction(sig, NULL, &sa));
    int want = SA_SIGINFO | SA_RESTART | SA_ONSTACK;
    CHECK((sa.sa_flags & want) == want, "signal %d: sa_flags %#x lack %#x",
          sig, sa.sa_flags, want);
    CHECK(!(sa.sa_flags & (SA_NODEFER | SA_RESETHAND)),
          "signal %d: unexpected sa_flags %#x", sig, sa.sa_flags);
    CHECK(sa.sa_sigaction == fn, "signal %d: handler %p, want %p", sig,
          (void *)sa.sa_sigaction, (void *)fn);
    for (int s = 1; s < NSIG; s++)
        CHECK(sigismember(&sa.sa_mask, s) == (s == SIGWINCH),
              "signal %d: sa_mask membership of %d is wrong", sig, s);
}

static void blocked_set(sigset_t *set)
{
    sigemptyset(set);
    sigaddset(set, SIGUSR1);
    sigaddset(set, SIGHUP);
    sigaddset(set, rtsig());
}

static void check_handler_flags(void)
{
    CHECK(!bad_stack, "a handler did not run on the alternate stack");
    CHECK(!bad_mask, "a handler ran without its sa_mask/own signal blocked");
    CHECK(!bad_info, "bad siginfo in a handler (case %d)", (int)bad_info);
}

static void check_pending(void)
{
    sigset_t p;
    CHECK_SYS(sigpending(&p));
    CHECK(sigismember(&p, SIGUSR1), "SIGUSR1 no longer pending");
    CHECK(sigismember(&p, rtsig()), "SIGRTMIN+1 no longer pending");
    CHECK(!sigismember(&p, SIGHUP), "SIGHUP pending but never sent");
    CHECK(usr1_count == 0 && rt_count == 0,
          "blocked signal delivered early (usr1 %d, rt %d)",
          (int)usr1_count, (int)rt_count);
}

/* Waits (bounded) for the alarm counter to move by `n` ticks. */
static void expect_ticks(int n, const char *when)
{
    int start = alarm_count;
    double give_up = wl_now() + 10.0;
    while (alarm_count - start < n) {
        CHECK(wl_now() < give_up,
              "%s: SIGALRM stopped ticking (%d ticks in 10 s)", when,
              (int)(alarm_count - start));
        wl_sleep(0.005);
    }
}

int main(void)
{
    wl_init("signals");
    double secs = wl_secs(2.0);

    alt_stack = malloc(ALT_SIZE);
    CHECK(alt_stack, "malloc");
    stack_t ss = {.ss_sp = alt_stack, .ss_size = ALT_SIZE, .ss_flags = 0};
    CHECK_SYS(sigaltstack(&ss, NULL));

    install(SIGALRM, on_alarm);
    install(SIGUSR1, on_usr1);
    install(rtsig(), on_rt);
    signal(SIGUSR2, SIG_IGN);

    sigset_t blk;
    blocked_set(&blk);
    CHECK_SYS(sigprocmask(SIG_BLOCK, &blk, NULL));
    CHECK_SYS(kill(getpid(), SIGUSR1));
    for (int v = 1; v <= 3; v++)
        CHECK_SYS(sigqueue(getpid(), rtsig(), (union sigval){.sival_int = v}));
    check_pending();

    struct itimerval it = {{0, TICK_USEC}, {0, TICK_USEC}};
    CHECK_SYS(setitimer(ITIMER_REAL, &it, NULL));
    expect_ticks(3, "before READY");

    wl_ready(secs);

    int last = alarm_count;
    double last_move = wl_now();
    while (!wl_time_up()) {
        /* Short sleeps, interrupted by the 10 ms alarm (handled in
         * wl_sleep), so handlers run at all sorts of moments. */
        wl_sleep(0.02);
        CHECK_SYS(kill(getpid(), SIGUSR2)); /* ignored: must not kill us */
        check_pending();
        check_handler_flags();
        if (alarm_count != last) {
            last = alarm_count;
            last_move = wl_now();
        }
        /* Generous: only a timer that is gone for good trips this. */
        CHECK(wl_now() - last_move < 10.0, "SIGALRM stopped ticking");
    }

    /* Final phase. */
    expect_ticks(3, "after the working phase");
    struct itimerval cur;
    CHECK_SYS(getitimer(ITIMER_REAL, &cur));
    CHECK(cur.it_interval.tv_sec == 0 && cur.it_interval.tv_usec == TICK_USEC,
          "ITIMER_REAL interval is %ld.%06ld s, want 0.%06d",
          (long)cur.it_interval.tv_sec, (long)cur.it_interval.tv_usec, TICK_USEC);

    check_action(SIGALRM, on_alarm);
    check_action(SIGUSR1, on_usr1);
    check_action(rtsig(), on_rt);
    struct sigaction sa;
    CHECK_SYS(sigaction(SIGUSR2, NULL, &sa));
    CHECK(sa.sa_handler == SIG_IGN, "SIGUSR2 is no longer ignored");

    stack_t now;
    CHECK_SYS(sigaltstack(NULL, &now));
    CHECK(now.ss_sp == alt_stack && now.ss_size == ALT_SIZE && now.ss_flags == 0,
          "sigaltstack is %p+%zu flags %d, want %p+%d flags 0", now.ss_sp,
          now.ss_size, now.ss_flags, (void *)alt_stack, ALT_SIZE);

    /* The blocked mask, exactly. */
    sigset_t mask;
    CHECK_SYS(sigprocmask(SIG_BLOCK, NULL, &mask));
    for (int s = 1; s < NSIG; s++) {
        if (s == SIGKILL || s == SIGSTOP)
            continue;
        CHECK(sigismember(&mask, s) == sigismember(&blk, s),
              "signal %d is %sblocked", s, sigismember(&mask, s) ? "" : "not ");
    }
    check_pending();

    /* Stop the timer so only the awaited signals arrive now. */
    struct itimerval off = {{0, 0}, {0, 0}};
    CHECK_SYS(setitimer(ITIMER_REAL, &off, NULL));

    /* Unblock: pending signals are delivered before sigprocmask returns,
     * the queued real-time ones in the order they were sent. */
    sigset_t deliver;
    sigemptyset(&deliver);
    sigaddset(&deliver, SIGUSR1);
    sigaddset(&deliver, rtsig());
    CHECK_SYS(sigprocmask(SIG_UNBLOCK, &deliver, NULL));
    CHECK(usr1_count == 1, "SIGUSR1 delivered %d times, want 1", (int)usr1_count);
    CHECK(rt_count == 3, "SIGRTMIN+1 delivered %d times, want 3", (int)rt_count);
    for (int i = 0; i < 3; i++)
        CHECK(rt_values[i] == i + 1, "SIGRTMIN+1 #%d carried %d, want %d (order %d,%d,%d)",
              i, rt_values[i], i + 1, rt_values[0], rt_values[1], rt_values[2]);
    check_handler_flags();

    sigset_t p;
    CHECK_SYS(sigpending(&p));
    for (int s = 1; s < NSIG; s++)
        CHECK(!sigismember(&p, s) || s == SIGHUP, "signal %d still pending", s);
    CHECK(!sigismember(&p, SIGHUP), "SIGHUP pending but never sent");

    wl_say("alarm ticks %d", (int)alarm_count);
    wl_pass();
}
