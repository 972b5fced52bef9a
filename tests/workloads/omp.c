/*
 * omp.c - an OpenMP job: libgomp's thread pool must survive a checkpoint.
 *
 * ferry-cflags: -fopenmp
 * (the line above is read by the test harness and selftest.sh: this file is
 * built with `gcc -O2 -g -pthread -fopenmp`)
 *
 * Four OpenMP threads (omp_set_num_threads(4), dynamic adjustment off) run
 * the same kernel over and over until the deadline:
 *   z[i] = k x[i] + y[i]                        (parallel for, static)
 *   w[i] = z[i-1] + z[i] + z[i+1]  (1..N-2)     (parallel for, dynamic)
 * with reductions sum(z), sum(z x), sum(w) in uint64_t (wrapping, so the
 * result is exact and independent of the reduction order) and sum(z & 0xffff)
 * in double (exact: far below 2^53).  k is the iteration number, so every
 * iteration rewrites all of z and w (4 x 2 MiB arrays in all), and the
 * integer sums are checked against closed forms computed once before READY
 * (sum z = k Sx + Sy, sum z x = k Sxx + Sxy, sum w from sum z and the four
 * end values); the double sum against a serial recount.  Every 16th
 * iteration and at the end the whole of z and w is checked element by
 * element.
 *
 * Inside every parallel region each thread also checks omp_get_num_threads()
 * == 4, a threadprivate (TLS) variable set in the first region, and that
 * gettid() is the TID that thread number had in the first region: libgomp
 * reuses the same pool, whose idle threads sleep in futex waits between
 * regions (the main thread sleeps 1 ms after every other iteration so they
 * park there rather than spin).  A checkpoint therefore almost always finds
 * the pool inside libgomp's futex waits or mid-region.
 */
#include "common.h"

#include <dirent.h>
#include <omp.h>
#include <sys/syscall.h>

#define NT 4
#define N (1 << 18) /* 2 MiB per uint64_t array */

static uint64_t *x, *y, *z, *w;
static uint64_t Sx, Sy, Sxx, Sxy;
static pid_t pool_tid[NT];
static int tp_id;
#pragma omp threadprivate(tp_id)

static pid_t my_gettid(void)
{
    return (pid_t)syscall(SYS_gettid);
}

static uint64_t zval(uint64_t k, long i)
{
    return x[i] * k + y[i];
}

static void *alloc(void)
{
    void *p = NULL;
    CHECK(posix_memalign(&p, 4096, N * sizeof(uint64_t)) == 0, "posix_memalign");
    return p;
}

/* Full element-by-element check of z and w for iteration k. */
static void full_check(uint64_t k)
{
    for (long i = 0; i < N; i++)
        CHECK(z[i] == zval(k, i), "k=%llu: z[%ld] = %#llx, want %#llx",
              (unsigned long long)k, i, (unsigned long long)z[i],
              (unsigned long long)zval(k, i));
    for (long i = 1; i < N - 1; i++) {
        uint64_t want = zval(k, i - 1) + zval(k, i) + zval(k, i + 1);
        CHECK(w[i] == want, "k=%llu: w[%ld] = %#llx, want %#llx", (unsigned long long)k,
              i, (unsigned long long)w[i], (unsigned long long)want);
    }
}

/* Number of threads in /proc/self/task, or -1 if /proc is not ours. */
static int proc_threads(void)
{
    char link[64];
    ssize_t n = readlink("/proc/self", link, sizeof link - 1);
    if (n <= 0)
        return -1;
    link[n] = 0;
    if (atoi(link) != getpid())
        return -1;
    DIR *d = opendir("/proc/self/task");
    if (!d)
        return -1;
    int c = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL)
        c += e->d_name[0] != '.';
    closedir(d);
    return c;
}

/* One iteration; returns after all checks passed. */
static void iterate(uint64_t k)
{
    uint64_t s1 = 0, s2 = 0, s3 = 0;
    double ds = 0;
    int bad = 0;
#pragma omp parallel reduction(+ : s1, s2, s3, ds) reduction(| : bad)
    {
        int t = omp_get_thread_num();
        if (omp_get_num_threads() != NT)
            bad |= 1;
        if (tp_id != t + 1)
            bad |= 2;
        if (t < 0 || t >= NT || my_gettid() != pool_tid[t])
            bad |= 4;
#pragma omp for schedule(static)
        for (long i = 0; i < N; i++) {
            uint64_t v = x[i] * k + y[i];
            z[i] = v;
            s1 += v;
            s2 += v * x[i];
            ds += (double)(v & 0xffff);
        }
        /* implicit barrier: all of z is written */
#pragma omp for schedule(dynamic, 4096)
        for (long i = 1; i < N - 1; i++) {
            uint64_t v = z[i - 1] + z[i] + z[i + 1];
            w[i] = v;
            s3 += v;
        }
    }
    CHECK(!(bad & 1), "k=%llu: a region did not have %d threads", (unsigned long long)k,
          NT);
    CHECK(!(bad & 2), "k=%llu: threadprivate value lost", (unsigned long long)k);
    CHECK(!(bad & 4), "k=%llu: a pool thread's TID changed", (unsigned long long)k);
    uint64_t want1 = k * Sx + Sy, want2 = k * Sxx + Sxy;
    CHECK(s1 == want1, "k=%llu: sum z = %#llx, want %#llx", (unsigned long long)k,
          (unsigned long long)s1, (unsigned long long)want1);
    CHECK(s2 == want2, "k=%llu: sum z*x = %#llx, want %#llx", (unsigned long long)k,
          (unsigned long long)s2, (unsigned long long)want2);
    uint64_t z0 = zval(k, 0), z1 = zval(k, 1), zm = zval(k, N - 2), zn = zval(k, N - 1);
    uint64_t want3 = 3 * want1 - 2 * z0 - z1 - zm - 2 * zn;
    CHECK(s3 == want3, "k=%llu: sum w = %#llx, want %#llx", (unsigned long long)k,
          (unsigned long long)s3, (unsigned long long)want3);
    uint64_t low = 0;
    for (long i = 0; i < N; i++)
        low += z[i] & 0xffff;
    CHECK(ds == (double)low, "k=%llu: double sum %.17g, want %llu", (unsigned long long)k,
          ds, (unsigned long long)low);
}

int main(void)
{
    wl_init("omp");
    double secs = wl_secs(2.0);
    omp_set_dynamic(0);
    omp_set_num_threads(NT);

    x = alloc();
    y = alloc();
    z = alloc();
    w = alloc();
    int nthr = 0;
#pragma omp parallel
    {
        int t = omp_get_thread_num();
        tp_id = t + 1;
        if (t < NT)
            pool_tid[t] = my_gettid();
#pragma omp single
        nthr = omp_get_num_threads();
#pragma omp for schedule(static)
        for (long i = 0; i < N; i++) {
            x[i] = wl_mix((uint64_t)i) >> 20;
            y[i] = wl_mix((uint64_t)i ^ 0xabcdef0000ull);
            z[i] = 0;
            w[i] = 0;
        }
    }
    CHECK(nthr == NT, "got %d OpenMP threads, want %d", nthr, NT);
    CHECK(pool_tid[0] == getpid(), "OpenMP thread 0 is not the main thread");
    for (int a = 0; a < NT; a++)
        for (int b = a + 1; b < NT; b++)
            CHECK(pool_tid[a] != pool_tid[b], "threads %d and %d share TID %d", a, b,
                  (int)pool_tid[a]);
    for (long i = 0; i < N; i++) {
        Sx += x[i];
        Sy += y[i];
        Sxx += x[i] * x[i];
        Sxy += x[i] * y[i];
    }
    iterate(1);
    full_check(1);
    int tasks = proc_threads();
    CHECK(tasks == -1 || tasks == NT, "%d threads in /proc/self/task, want %d", tasks, NT);

    wl_ready(secs);
    uint64_t k = 1;
    while (!wl_time_up()) {
        k++;
        iterate(k);
        if (k % 16 == 0)
            full_check(k);
        if (k % 2 == 0)
            wl_sleep(0.001);
    }
    full_check(k);
    tasks = proc_threads();
    CHECK(tasks == -1 || tasks == NT, "%d threads in /proc/self/task, want %d", tasks, NT);
    wl_say("omp: %llu iterations with %d threads", (unsigned long long)k, NT);
    wl_pass();
}
