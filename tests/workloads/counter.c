/*
 * counter.c - the demo job: a 2-D heat-equation (Jacobi-style explicit)
 * solver that prints progress and checks its answer against a closed form.
 *
 * The grid is NX x NY interior points on the unit square with zero
 * boundaries.  The initial field is a sum of two eigenmodes of the discrete
 * Laplacian, sin(p pi x) sin(q pi y).  The explicit scheme
 *     u' = u + r (uE + uW + uN + uS - 4u)
 * maps each such mode to itself times
 *     lambda_pq = 1 - 4r (sin^2(p pi h / 2) + sin^2(q pi h / 2)),
 * so after n sweeps the exact discrete answer is known in closed form and
 * any corrupted page, register or lost sweep shows up as a mismatch.
 *
 * The number of sweeps M is fixed before READY (calibrated so the job lasts
 * about WORKLOAD_SECS, default 3 s), so the final answer does not depend on
 * how long the process spent frozen or dead.  Progress lines "step N/M" are
 * printed about every 200 ms.
 */
#include "common.h"

/* No libm: the harness builds with a plain `gcc NAME.c`.  The checks
 * compare the solver against the same sin() used to build the initial
 * field, so a local Taylor series is all the accuracy needed. */
static double my_sin(double x)
{
    const double pi = 3.14159265358979323846, two_pi = 2 * pi;
    x -= two_pi * (double)(long)(x / two_pi); /* into (-2pi, 2pi) */
    if (x > pi)
        x -= two_pi;
    if (x < -pi)
        x += two_pi;
    double term = x, sum = x, x2 = x * x;
    for (int k = 1; k < 30; k++) {
        term *= -x2 / ((2.0 * k) * (2.0 * k + 1));
        sum += term;
    }
    return sum;
}

/* b^n for a whole n >= 0 by repeated squaring. */
static double ipow(double b, long n)
{
    double r = 1;
    while (n > 0) {
        if (n & 1)
            r *= b;
        b *= b;
        n >>= 1;
    }
    return r;
}

static double my_fabs(double x) { return x < 0 ? -x : x; }

#define PI 3.14159265358979323846

#define NX 512
#define NY 512
/* r = dt / h^2; the 2-D explicit scheme is stable for r <= 1/4. */
#define R 0.2

/* Two 2 MiB grids including the zero boundary ring. */
static double grid_a[NX + 2][NY + 2];
static double grid_b[NX + 2][NY + 2];

static double mode(int p, int q, int i, int j)
{
    const double h = 1.0 / (NX + 1); /* NX == NY, so one spacing */
    return my_sin(p * PI * i * h) * my_sin(q * PI * j * h);
}

static double lambda(int p, int q)
{
    const double h = 1.0 / (NX + 1);
    double sp = my_sin(p * PI * h / 2), sq = my_sin(q * PI * h / 2);
    return 1.0 - 4.0 * R * (sp * sp + sq * sq);
}

/* Exact value at (i, j) after n sweeps. */
static double exact(long n, int i, int j)
{
    return ipow(lambda(1, 1), n) * mode(1, 1, i, j) +
           0.5 * ipow(lambda(2, 3), n) * mode(2, 3, i, j);
}

/* One sweep from src into dst (boundaries stay zero). */
static void sweep(double (*restrict dst)[NY + 2], double (*restrict src)[NY + 2])
{
    for (int i = 1; i <= NX; i++)
        for (int j = 1; j <= NY; j++)
            dst[i][j] = src[i][j] + R * (src[i + 1][j] + src[i - 1][j] +
                                         src[i][j + 1] + src[i][j - 1] -
                                         4.0 * src[i][j]);
}

/* Largest deviation from the closed form after n sweeps.  `stride` > 1
 * samples the grid for cheap mid-run checks. */
static double max_error(double (*u)[NY + 2], long n, int stride)
{
    double l11 = ipow(lambda(1, 1), n), l23 = ipow(lambda(2, 3), n);
    double worst = 0;
    for (int i = 1; i <= NX; i += stride)
        for (int j = 1; j <= NY; j += stride) {
            double e = l11 * mode(1, 1, i, j) + 0.5 * l23 * mode(2, 3, i, j);
            double d = my_fabs(u[i][j] - e);
            if (!(d <= worst)) /* also catches NaN */
                worst = d;
        }
    return worst;
}

int main(void)
{
    wl_init("counter");
    double secs = wl_secs(3.0);

    for (int i = 1; i <= NX; i++)
        for (int j = 1; j <= NY; j++)
            grid_a[i][j] = mode(1, 1, i, j) + 0.5 * mode(2, 3, i, j);

    /* Calibrate: time a few sweeps to pick M, the fixed total. */
    double (*cur)[NY + 2] = grid_a, (*nxt)[NY + 2] = grid_b;
    long done = 0;
    /* The first sweeps fault in grid_b and warm the caches; time later ones. */
    const long warm = 4, calib = 24;
    double t0 = 0;
    for (; done < calib; done++) {
        if (done == warm)
            t0 = wl_now();
        sweep(nxt, cur);
        double (*t)[NY + 2] = cur;
        cur = nxt;
        nxt = t;
    }
    double per = (wl_now() - t0) / (double)(calib - warm);
    long total = (long)(secs / (per > 1e-7 ? per : 1e-7));
    if (total < calib + 10)
        total = calib + 10;

    wl_ready(secs);
    wl_say("step %ld/%ld", done, total);
    double last_print = wl_now();

    while (done < total) {
        sweep(nxt, cur);
        double (*t)[NY + 2] = cur;
        cur = nxt;
        nxt = t;
        done++;
        if (wl_now() - last_print >= 0.2) {
            /* A cheap sampled check on every progress line so a corrupted
             * restore is reported close to where it happened. */
            double err = max_error(cur, done, 37);
            CHECK(err < 1e-9, "after %ld sweeps sampled error %g", done, err);
            wl_say("step %ld/%ld", done, total);
            last_print = wl_now();
        }
    }

    double err = max_error(cur, done, 1);
    CHECK(err < 1e-9, "after %ld sweeps max error %g vs closed form", done, err);
    /* The field must have actually decayed by the expected factor, so a
     * grid that was reset or never swept cannot match by accident. */
    double centre = cur[(NX + 1) / 2][(NY + 1) / 2];
    double want = exact(done, (NX + 1) / 2, (NY + 1) / 2);
    CHECK(my_fabs(centre - want) < 1e-9, "centre %.12g, want %.12g", centre, want);
    wl_say("step %ld/%ld", done, total);
    wl_pass();
}
