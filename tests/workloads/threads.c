/*
 * threads.c - a multi-threaded process: every thread's state (TLS, TID,
 * blocking waits) must survive a checkpoint, and the threads must go on
 * cooperating through glibc's synchronisation objects.
 *
 * usage: threads [N]        (N worker threads, default 8, at most 64)
 *
 * Threads (index: role):
 *   0..N-1   workers.  Every iteration each worker checks its __thread
 *            values (index, a magic word, a 16-word buffer rewritten every
 *            iteration, the TLS address itself, i.e. the fs base) and its
 *            TID against the one recorded at thread start; increments a
 *            mutex-protected shared counter; does a condition-variable
 *            handshake with its partner (2k <-> 2k+1: each side waits for
 *            its turn, checks the shared sequence number and hands over);
 *            then waits on a pthread_barrier shared by all workers.
 *   N        waits in one long pthread_cond_timedwait (CLOCK_MONOTONIC)
 *            that is only signalled after the deadline;
 *   N+1      waits in one long FUTEX_WAIT_BITSET (absolute timeout) on a
 *            word that is only set after the deadline;
 *   N+2      loops over 20 ms nanosleeps, checking its TLS after each;
 *   N+3      locks a robust mutex (PTHREAD_MUTEX_ROBUST) before READY and
 *            holds it until it exits at the end without unlocking;
 *   main     watchdog: checks progress, its own TLS and that the robust
 *            mutex stays held (trylock -> EBUSY), in 20 ms nanosleeps.
 * So at any moment at least one thread is in a long futex wait, one in a
 * condition wait, one in nanosleep and the workers are mostly in barrier
 * or condvar futex waits.
 *
 * After the deadline every thread parks, then main sends SIGUSR1 to each
 * with pthread_kill (which uses the TID glibc stored at pthread_create) and
 * to itself; the handler records gettid() and the thread's TLS index, which
 * must match that thread's TID recorded at start (TIDs must be unchanged
 * after a restore, and glibc's cached TIDs must still be right).  The robust
 * mutex holder then exits; the next pthread_mutex_clocklock must return
 * EOWNERDEAD (the kernel walks the robust list registered with
 * set_robust_list at thread exit).  Every thread is joined with a bounded
 * pthread_clockjoin_np (which relies on the kernel clearing the TID word
 * registered with set_tid_address) and must return its own token.  Finally
 * the shared counter must equal N x iterations, and every pair handshake
 * sequence 2 x iterations.
 */
#include "common.h"

#include <dirent.h>
#include <linux/futex.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <sys/syscall.h>

#define MAX_WORKERS 64
enum { AUX_COND, AUX_FUTEX, AUX_SLEEP, AUX_ROBUST, N_AUX };
#define MAX_THREADS (MAX_WORKERS + N_AUX)
/* Slots: threads 0..nthreads-1, then main. */
#define MAX_SLOTS (MAX_THREADS + 1)
/* Bound for any wait that should end within seconds. */
#define BOUND 30.0
#define TOKEN(i) ((void *)(uintptr_t)(0x7e500000u + (unsigned)(i)))

static int nworkers, nthreads, main_slot;
static pthread_t th[MAX_THREADS];

static _Atomic pid_t tids[MAX_SLOTS];        /* gettid() at thread start */
static void *_Atomic tls_addrs[MAX_SLOTS];   /* &tls_idx at thread start */
static _Atomic pid_t sig_tid[MAX_SLOTS];     /* gettid() in the handler */
static _Atomic int sig_count[MAX_SLOTS];
static _Atomic int sig_stray;                /* handler ran with no index */

static __thread int tls_idx = -1;
static __thread uint64_t tls_magic;
static __thread uint64_t tls_buf[16];
static __thread long tls_gen;

static _Atomic int started;
static _Atomic int go; /* set after READY: the deadline is known */
static _Atomic int parked;
static _Atomic int may_exit;
static _Atomic int aux_stop;
static _Atomic int workers_done;

/* Workers. */
static pthread_barrier_t barrier;
static pthread_mutex_t count_mu = PTHREAD_MUTEX_INITIALIZER;
static long shared_count;
static _Atomic long iters[MAX_WORKERS];
static _Atomic int stop_flag[2];
struct pair {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int turn;
    long seq;
};
static struct pair pairs[MAX_WORKERS / 2];

/* Aux threads. */
static pthread_mutex_t park_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t park_cv;
static int park_release;
static _Atomic long cond_wakeups;
static _Atomic uint32_t futex_word;
static _Atomic long futex_wakeups;
static _Atomic long sleeps;
static pthread_mutex_t robust_mu;
static _Atomic int robust_locked;

static pid_t my_gettid(void)
{
    return (pid_t)syscall(SYS_gettid);
}

/* Absolute CLOCK_MONOTONIC time `secs` from now. */
static struct timespec mono_in(double secs)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    double ns = (double)ts.tv_nsec + secs * 1e9;
    ts.tv_sec += (time_t)(ns / 1e9);
    ts.tv_nsec = (long)(ns - (double)(time_t)(ns / 1e9) * 1e9);
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000L;
    }
    return ts;
}

static void on_usr1(int sig)
{
    (void)sig;
    int saved = errno;
    int i = tls_idx;
    if (i >= 0 && i < MAX_SLOTS) {
        atomic_store(&sig_tid[i], my_gettid());
        atomic_fetch_add(&sig_count[i], 1);
    } else {
        atomic_fetch_add(&sig_stray, 1);
    }
    errno = saved;
}

static uint64_t tls_word(int idx, int k, long gen)
{
    return wl_mix(((uint64_t)idx << 40) ^ ((uint64_t)k << 32) ^ (uint64_t)gen);
}

/* Records this thread's identity and fills its TLS. */
static void tls_setup(int idx)
{
    tls_idx = idx;
    tls_magic = wl_mix(0x5eed0000u + (unsigned)idx);
    tls_gen = 0;
    for (int k = 0; k < 16; k++)
        tls_buf[k] = tls_word(idx, k, 0);
    atomic_store(&tids[idx], my_gettid());
    atomic_store(&tls_addrs[idx], (void *)&tls_idx);
}

static void tls_check(int idx)
{
    CHECK(tls_idx == idx, "thread %d: TLS index reads %d", idx, tls_idx);
    CHECK((void *)&tls_idx == atomic_load(&tls_addrs[idx]),
          "thread %d: TLS moved from %p to %p (fs base not restored?)", idx,
          atomic_load(&tls_addrs[idx]), (void *)&tls_idx);
    CHECK(tls_magic == wl_mix(0x5eed0000u + (unsigned)idx),
          "thread %d: TLS magic %#llx", idx, (unsigned long long)tls_magic);
    for (int k = 0; k < 16; k++)
        CHECK(tls_buf[k] == tls_word(idx, k, tls_gen),
              "thread %d: TLS buffer word %d wrong at generation %ld", idx, k,
              tls_gen);
    pid_t t = my_gettid();
    CHECK(t == atomic_load(&tids[idx]), "thread %d: gettid() %d, was %d at start",
          idx, (int)t, (int)atomic_load(&tids[idx]));
}

static void tls_advance(void)
{
    tls_gen++;
    for (int k = 0; k < 16; k++)
        tls_buf[k] = tls_word(tls_idx, k, tls_gen);
}

/* Waits (bounded) until main lets threads exit; SIGUSR1 arrives meanwhile. */
static void final_park(int idx)
{
    atomic_fetch_add(&parked, 1);
    double end = wl_now() + BOUND;
    while (!atomic_load(&may_exit)) {
        CHECK(wl_now() < end, "thread %d: never allowed to exit", idx);
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL); /* EINTR from SIGUSR1 is fine */
    }
    tls_check(idx);
}

static void handshake(int idx, long it)
{
    struct pair *p = &pairs[idx / 2];
    int me = idx & 1;
    struct timespec end = mono_in(BOUND);
    CHECK(pthread_mutex_lock(&p->mu) == 0, "pair mutex lock");
    while (p->turn != me) {
        int r = pthread_cond_timedwait(&p->cv, &p->mu, &end);
        CHECK(r == 0 || r == ETIMEDOUT, "pthread_cond_timedwait: %s", strerror(r));
        CHECK(r == 0 || p->turn == me,
              "worker %d: partner never handed over (iteration %ld)", idx, it);
    }
    long want = 2 * it + me;
    CHECK(p->seq == want, "worker %d: pair sequence %ld, want %ld", idx, p->seq,
          want);
    p->seq++;
    p->turn = !me;
    CHECK(pthread_cond_signal(&p->cv) == 0, "pthread_cond_signal");
    CHECK(pthread_mutex_unlock(&p->mu) == 0, "pair mutex unlock");
}

static void *worker(void *arg)
{
    int idx = (int)(intptr_t)arg;
    tls_setup(idx);
    atomic_fetch_add(&started, 1);
    double gend = wl_now() + BOUND;
    while (!atomic_load(&go)) {
        CHECK(wl_now() < gend, "worker %d: main never said go", idx);
        wl_sleep(0.001);
    }
    int paired = idx < nworkers - (nworkers % 2);
    for (long it = 0;; it++) {
        tls_check(idx);
        CHECK(pthread_mutex_lock(&count_mu) == 0, "counter lock");
        shared_count++;
        CHECK(pthread_mutex_unlock(&count_mu) == 0, "counter unlock");
        if (paired)
            handshake(idx, it);
        tls_advance();
        atomic_store(&iters[idx], it + 1);
        /* Worker 0 decides for everybody; the flag is indexed by parity so
         * it is never rewritten while a slow worker may still read it. */
        if (idx == 0)
            atomic_store(&stop_flag[it & 1], wl_time_up());
        int r = pthread_barrier_wait(&barrier);
        CHECK(r == 0 || r == PTHREAD_BARRIER_SERIAL_THREAD,
              "pthread_barrier_wait: %s", strerror(r));
        if (atomic_load(&stop_flag[it & 1]))
            break;
    }
    atomic_fetch_add(&workers_done, 1);
    final_park(idx);
    return TOKEN(idx);
}

static void *cond_waiter(void *arg)
{
    int idx = (int)(intptr_t)arg;
    tls_setup(idx);
    struct timespec end = mono_in(BOUND + wl_secs(2.0));
    CHECK(pthread_mutex_lock(&park_mu) == 0, "park lock");
    atomic_fetch_add(&started, 1);
    while (!park_release) {
        int r = pthread_cond_timedwait(&park_cv, &park_mu, &end);
        CHECK(r == 0 || r == ETIMEDOUT, "pthread_cond_timedwait: %s", strerror(r));
        CHECK(r == 0 || park_release, "condition waiter was never signalled");
        atomic_fetch_add(&cond_wakeups, 1);
    }
    CHECK(pthread_mutex_unlock(&park_mu) == 0, "park unlock");
    tls_check(idx);
    final_park(idx);
    return TOKEN(idx);
}

static void *futex_waiter(void *arg)
{
    int idx = (int)(intptr_t)arg;
    tls_setup(idx);
    struct timespec end = mono_in(BOUND + wl_secs(2.0));
    atomic_fetch_add(&started, 1);
    while (atomic_load(&futex_word) == 0) {
        long r = syscall(SYS_futex, &futex_word, FUTEX_WAIT_BITSET_PRIVATE, 0u,
                         &end, NULL, FUTEX_BITSET_MATCH_ANY);
        if (r == -1) {
            CHECK(errno == EAGAIN || errno == EINTR || errno == ETIMEDOUT,
                  "FUTEX_WAIT_BITSET: %s", strerror(errno));
            CHECK(errno != ETIMEDOUT || atomic_load(&futex_word) != 0,
                  "futex waiter was never woken");
        }
        atomic_fetch_add(&futex_wakeups, 1);
    }
    tls_check(idx);
    final_park(idx);
    return TOKEN(idx);
}

static void *sleeper(void *arg)
{
    int idx = (int)(intptr_t)arg;
    tls_setup(idx);
    atomic_fetch_add(&started, 1);
    while (!atomic_load(&aux_stop)) {
        struct timespec ts = {0, 20 * 1000000};
        if (nanosleep(&ts, NULL) != 0)
            CHECK(errno == EINTR, "nanosleep: %s", strerror(errno));
        tls_check(idx);
        tls_advance();
        atomic_fetch_add(&sleeps, 1);
    }
    final_park(idx);
    return TOKEN(idx);
}

static void *robust_holder(void *arg)
{
    int idx = (int)(intptr_t)arg;
    tls_setup(idx);
    int r = pthread_mutex_lock(&robust_mu);
    CHECK(r == 0, "robust mutex lock: %s", strerror(r));
    atomic_store(&robust_locked, 1);
    atomic_fetch_add(&started, 1);
    final_park(idx);
    /* Exit still holding it: the kernel marks it FUTEX_OWNER_DIED. */
    return TOKEN(idx);
}

/* Waits until *v >= want, bounded. */
static void wait_count(_Atomic int *v, int want, const char *what)
{
    double end = wl_now() + BOUND;
    while (atomic_load(v) < want) {
        CHECK(wl_now() < end, "timed out waiting for %s (%d of %d)", what,
              atomic_load(v), want);
        wl_sleep(0.001);
    }
}

/* The TIDs listed in /proc/self/task must be exactly the recorded ones,
 * when /proc belongs to our pid namespace (it may not under `ferry run`). */
static void check_proc_tasks(void)
{
    char link[64];
    ssize_t n = readlink("/proc/self", link, sizeof link - 1);
    if (n <= 0)
        return;
    link[n] = 0;
    if (atoi(link) != getpid())
        return;
    DIR *d = opendir("/proc/self/task");
    if (!d)
        return;
    int seen = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.')
            continue;
        pid_t t = (pid_t)atoi(e->d_name);
        int found = 0;
        for (int i = 0; i < nthreads; i++)
            found |= atomic_load(&tids[i]) == t;
        found |= atomic_load(&tids[main_slot]) == t;
        CHECK(found, "/proc/self/task lists unknown thread %d", (int)t);
        seen++;
    }
    closedir(d);
    CHECK(seen == nthreads + 1, "/proc/self/task lists %d threads, want %d", seen,
          nthreads + 1);
}

int main(int argc, char **argv)
{
    wl_init("threads");
    double secs = wl_secs(2.0);
    nworkers = argc > 1 ? atoi(argv[1]) : 8;
    if (nworkers < 2 || nworkers > MAX_WORKERS)
        wl_fail("worker count must be 2..%d", MAX_WORKERS);
    nthreads = nworkers + N_AUX;
    main_slot = nthreads;

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    CHECK_SYS(sigaction(SIGUSR1, &sa, NULL));

    tls_setup(main_slot);
    CHECK(atomic_load(&tids[main_slot]) == getpid(), "main thread's TID is not the pid");

    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    CHECK(pthread_condattr_setclock(&ca, CLOCK_MONOTONIC) == 0, "condattr_setclock");
    CHECK(pthread_cond_init(&park_cv, &ca) == 0, "cond init");
    for (int i = 0; i < nworkers / 2; i++) {
        CHECK(pthread_mutex_init(&pairs[i].mu, NULL) == 0, "mutex init");
        CHECK(pthread_cond_init(&pairs[i].cv, &ca) == 0, "cond init");
    }
    pthread_condattr_destroy(&ca);
    CHECK(pthread_barrier_init(&barrier, NULL, (unsigned)nworkers) == 0, "barrier init");
    pthread_mutexattr_t ma;
    pthread_mutexattr_init(&ma);
    CHECK(pthread_mutexattr_setrobust(&ma, PTHREAD_MUTEX_ROBUST) == 0, "setrobust");
    CHECK(pthread_mutex_init(&robust_mu, &ma) == 0, "robust mutex init");
    pthread_mutexattr_destroy(&ma);

    for (int i = 0; i < nthreads; i++) {
        void *(*fn)(void *) = worker;
        if (i == nworkers + AUX_COND)
            fn = cond_waiter;
        else if (i == nworkers + AUX_FUTEX)
            fn = futex_waiter;
        else if (i == nworkers + AUX_SLEEP)
            fn = sleeper;
        else if (i == nworkers + AUX_ROBUST)
            fn = robust_holder;
        int r = pthread_create(&th[i], NULL, fn, (void *)(intptr_t)i);
        CHECK(r == 0, "pthread_create %d: %s", i, strerror(r));
    }
    wait_count(&started, nthreads, "threads to start");
    CHECK(atomic_load(&robust_locked), "robust mutex not locked");
    /* Let the waiters reach their futexes before READY. */
    wl_sleep(0.02);

    wl_ready(secs);
    atomic_store(&go, 1);

    /* Watchdog phase. */
    long last_it = -1;
    double last_progress = wl_now();
    while (atomic_load(&workers_done) < nworkers) {
        wl_sleep(0.02);
        tls_check(main_slot);
        int r = pthread_mutex_trylock(&robust_mu);
        CHECK(r == EBUSY, "robust mutex trylock while held: %s",
              r == 0 ? "succeeded" : strerror(r));
        long it = atomic_load(&iters[0]);
        if (it != last_it) {
            last_it = it;
            last_progress = wl_now();
        }
        CHECK(wl_now() - last_progress < BOUND, "workers stuck at iteration %ld", it);
    }

    /* Release the aux threads; everybody parks. */
    atomic_store(&aux_stop, 1);
    CHECK(pthread_mutex_lock(&park_mu) == 0, "park lock");
    park_release = 1;
    CHECK(pthread_cond_broadcast(&park_cv) == 0, "cond broadcast");
    CHECK(pthread_mutex_unlock(&park_mu) == 0, "park unlock");
    atomic_store(&futex_word, 1);
    syscall(SYS_futex, &futex_word, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
    wait_count(&parked, nthreads, "threads to park");

    check_proc_tasks();

    /* One SIGUSR1 per thread, via the pthread_t (glibc's cached TID). */
    for (int i = 0; i < nthreads; i++) {
        int r = pthread_kill(th[i], SIGUSR1);
        CHECK(r == 0, "pthread_kill thread %d: %s", i, strerror(r));
    }
    CHECK(pthread_kill(pthread_self(), SIGUSR1) == 0, "pthread_kill self");
    double end = wl_now() + BOUND;
    for (int i = 0; i <= nthreads; i++) {
        while (atomic_load(&sig_count[i]) == 0) {
            CHECK(wl_now() < end, "thread %d (TID %d) never ran its SIGUSR1 handler", i,
                  (int)atomic_load(&tids[i]));
            wl_sleep(0.001);
        }
    }
    CHECK(atomic_load(&sig_stray) == 0, "SIGUSR1 handler ran in an unknown thread");
    for (int i = 0; i <= nthreads; i++) {
        CHECK(atomic_load(&sig_count[i]) == 1, "thread %d ran its handler %d times", i,
              atomic_load(&sig_count[i]));
        CHECK(atomic_load(&sig_tid[i]) == atomic_load(&tids[i]),
              "thread %d: handler ran in TID %d, thread started as TID %d", i,
              (int)atomic_load(&sig_tid[i]), (int)atomic_load(&tids[i]));
    }

    atomic_store(&may_exit, 1);
    for (int i = 0; i < nthreads; i++) {
        void *ret = NULL;
        struct timespec jend = mono_in(BOUND);
        int r = pthread_clockjoin_np(th[i], &ret, CLOCK_MONOTONIC, &jend);
        CHECK(r == 0, "joining thread %d (TID %d): %s", i, (int)atomic_load(&tids[i]),
              strerror(r));
        CHECK(ret == TOKEN(i), "thread %d returned %p, want %p", i, ret, TOKEN(i));
    }

    /* The holder exited without unlocking. */
    struct timespec lend = mono_in(10);
    int r = pthread_mutex_clocklock(&robust_mu, CLOCK_MONOTONIC, &lend);
    CHECK(r == EOWNERDEAD, "locking the dead holder's robust mutex: %s, want EOWNERDEAD",
          r == 0 ? "succeeded" : strerror(r));
    CHECK(pthread_mutex_consistent(&robust_mu) == 0, "pthread_mutex_consistent");
    CHECK(pthread_mutex_unlock(&robust_mu) == 0, "robust unlock");
    r = pthread_mutex_trylock(&robust_mu);
    CHECK(r == 0, "robust mutex relock: %s", strerror(r));
    CHECK(pthread_mutex_unlock(&robust_mu) == 0, "robust unlock");

    long n = atomic_load(&iters[0]);
    CHECK(n > 0, "no iterations");
    for (int i = 0; i < nworkers; i++)
        CHECK(atomic_load(&iters[i]) == n, "worker %d did %ld iterations, worker 0 %ld",
              i, atomic_load(&iters[i]), n);
    CHECK(shared_count == (long)nworkers * n, "shared counter %ld, want %d x %ld",
          shared_count, nworkers, n);
    for (int i = 0; i < nworkers / 2; i++)
        CHECK(pairs[i].seq == 2 * n, "pair %d sequence %ld, want %ld", i, pairs[i].seq,
              2 * n);
    CHECK(atomic_load(&sleeps) > 0, "sleeper never slept");
    CHECK(atomic_load(&cond_wakeups) >= 1 && atomic_load(&futex_wakeups) >= 1,
          "waiters never woke");
    tls_check(main_slot);
    wl_say("threads: %d workers, %ld iterations, %ld sleeps", nworkers, n,
           atomic_load(&sleeps));
    wl_pass();
}
