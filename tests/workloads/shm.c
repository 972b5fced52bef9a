/*
 * shm.c - memory shared between two processes, and private memory that
 * fork made copy-on-write, across a checkpoint of both.
 *
 * Before fork the parent creates
 *   - SH: 1 MiB MAP_SHARED|MAP_ANONYMOUS (page 0 holds the turn counter),
 *   - MF: a 512 KiB memfd, mapped MAP_SHARED ("view 1", inherited),
 *   - PV: 256 KiB MAP_PRIVATE|MAP_ANONYMOUS, filled with a pattern;
 * after fork each process maps the memfd a second time ("view 2").
 *
 * Parent and child take turns (turn t: the parent when t is even, the child
 * when odd), waiting for theirs with atomics, sched_yield and short usleeps.
 * On turn t the owner first checks the other's turn t-1 writes (in SH, in
 * MF through both views and through pread on the memfd), then writes 64
 * words of SH page 1 + t % 255 and of MF page t % 128 (through view 1 or
 * view 2, alternately), bumps its own turn count (each checks the other's)
 * and hands the turn over.  Every 128 turns each side checks all of SH and
 * MF against what the whole history must have left there.
 *
 * PV: each process rewrites one page of the lower half per own turn with a
 * pattern of its own and checks its previous one; every 128 turns it checks
 * the whole region: lower half its own latest patterns (or the pre-fork one
 * where it has not written yet), upper half never written after fork, so
 * still the pre-fork pattern.  Neither may ever see the other's writes.
 *
 * After the deadline the parent sets `stop` and hands over; the child does
 * its full checks and exits 0 (1 with a "FAIL shm/child" line on error); the
 * parent reaps it (bounded), checks its status and the final contents, and
 * prints PASS shm.  A child whose parent is gone, or a parent whose child is,
 * fails instead of waiting.
 *
 * Usage: shm [SH_MIB [mapped] [forks]].  SH_MIB sizes SH (default 1); with
 * "mapped" both processes close the memfd once it is mapped, so it is
 * reachable through its mappings only (no pread checks then); with "forks"
 * the parent forks a helper every 50 ms, in its own turn, that checks
 * all of SH and MF through the mappings it inherited (a fresh process maps
 * none of their pages yet) and exits with the verdict.
 */
#include "common.h"

#include <sched.h>
#include <stdatomic.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>

#define PAGE 4096
#define PW (PAGE / 8) /* words per page */
#define MF_PAGES 128
#define PV_PAGES 64
#define PV_HALF 32
#define WORDS 64 /* words written per page per turn */
#define BOUND 30.0

enum { R_SH = 1, R_MF = 2, R_PRE = 3, R_PV = 4 /* + side */ };

struct ctl {
    _Atomic uint64_t turn;
    _Atomic int stop;
    _Atomic uint64_t turns[2]; /* writes done by parent (0), child (1) */
};

static struct ctl *ctl;
static uint64_t *sh, *mf1, *mf2, *pv;
static long sh_pages = 256; /* SH, page 0 the control block */
static int memfd;
static int keep_fd = 1; /* pread checks through the memfd */
static int forks;       /* fork checking helpers */
static int side; /* 0 parent, 1 child */
static pid_t parent_pid, child_pid;
static uint64_t own_gen; /* own PV generations written */

static uint64_t pat(uint64_t region, uint64_t t, uint64_t j)
{
    return wl_mix((region << 56) ^ (t << 10) ^ j);
}

/* Largest t' <= t with t' % period == q, or -1. */
static int64_t last_hit(int64_t t, int64_t q, int64_t period)
{
    if (t < q)
        return -1;
    return q + ((t - q) / period) * period;
}

static uint64_t *page_of(uint64_t *base, long p)
{
    return base + (size_t)p * PW;
}

/* Checks a page: words < WORDS hold pat(region, t) (t >= 0) or else the
 * base; the rest hold the base.  The base is zero, or pat(R_PRE, id) when
 * `pre` is set. */
static void check_page(const uint64_t *pg, const char *what, long p, uint64_t region,
                       int64_t t, int pre, uint64_t id)
{
    for (uint64_t j = 0; j < PW; j++) {
        uint64_t want = pre ? pat(R_PRE, id, j) : 0;
        if (j < WORDS && t >= 0)
            want = pat(region, (uint64_t)t, j);
        CHECK(pg[j] == want, "%s page %ld word %llu = %#llx, want %#llx (turn %lld)", what, p,
              (unsigned long long)j, (unsigned long long)pg[j], (unsigned long long)want,
              (long long)t);
    }
}

static void write_words(uint64_t *pg, uint64_t region, uint64_t t)
{
    for (uint64_t j = 0; j < WORDS; j++)
        pg[j] = pat(region, t, j);
}

/* MF page p through both views and pread. */
static void check_mf_page(long p, int64_t t)
{
    static uint64_t buf[PW];
    check_page(page_of(mf1, p), "memfd view 1", p, R_MF, t, 0, 0);
    check_page(page_of(mf2, p), "memfd view 2", p, R_MF, t, 0, 0);
    if (!keep_fd)
        return;
    ssize_t n = pread(memfd, buf, PAGE, (off_t)p * PAGE);
    CHECK(n == PAGE, "pread memfd page %ld: %zd (%s)", p, n, n < 0 ? strerror(errno) : "short");
    check_page(buf, "memfd pread", p, R_MF, t, 0, 0);
}

/* Everything in SH and MF after turns 0..last have written. */
static void full_check_shared(int64_t last)
{
    for (long q = 0; q < sh_pages - 1; q++)
        check_page(page_of(sh, 1 + q), "shared anon", 1 + q, R_SH,
                   last_hit(last, q, sh_pages - 1), 0, 0);
    for (long q = 0; q < MF_PAGES; q++)
        check_mf_page(q, last_hit(last, q, MF_PAGES));
    if (!keep_fd)
        return;
    struct stat st;
    CHECK_SYS(fstat(memfd, &st));
    CHECK(st.st_size == MF_PAGES * PAGE, "memfd size %lld", (long long)st.st_size);
}

/* All of PV for this side, after own_gen own generations. */
static void full_check_private(void)
{
    int64_t last = (int64_t)own_gen - 1;
    for (long q = 0; q < PV_PAGES; q++) {
        int64_t t = q < PV_HALF ? last_hit(last, q, PV_HALF) : -1;
        check_page(page_of(pv, q), side ? "child private" : "parent private", q,
                   R_PV + (uint64_t)side, t, 1, (uint64_t)q);
    }
}

static void private_turn(void)
{
    if (own_gen > 0) {
        long q = (long)((own_gen - 1) % PV_HALF);
        check_page(page_of(pv, q), side ? "child private" : "parent private", q,
                   R_PV + (uint64_t)side, (int64_t)own_gen - 1, 1, (uint64_t)q);
    }
    write_words(page_of(pv, (long)(own_gen % PV_HALF)), R_PV + (uint64_t)side, own_gen);
    own_gen++;
}

/* Is the other process still there? */
static void check_peer(void)
{
    if (side == 1) {
        CHECK(getppid() == parent_pid, "parent %d is gone (parent now %d)", (int)parent_pid,
              (int)getppid());
    } else {
        int st;
        pid_t r = waitpid(child_pid, &st, WNOHANG);
        CHECK(r == 0, "child %d ended early (wait status %#x)", (int)child_pid, r > 0 ? st : -1);
    }
}

/* Waits for a turn with parity `side`; returns it. */
static uint64_t wait_turn(void)
{
    double start = wl_now();
    for (unsigned spins = 0;; spins++) {
        uint64_t t = atomic_load_explicit(&ctl->turn, memory_order_acquire);
        if ((int)(t & 1) == side)
            return t;
        if (spins < 64) {
            sched_yield();
            continue;
        }
        usleep(50);
        if (spins % 256 == 0) {
            check_peer();
            CHECK(wl_now() - start < BOUND, "turn %llu never came", (unsigned long long)t + 1);
        }
    }
}

/* One own turn t: check t-1, write t, hand over. */
static void do_turn(uint64_t t)
{
    uint64_t other = (uint64_t)!side;
    uint64_t mine_done = atomic_load(&ctl->turns[side]);
    uint64_t other_done = atomic_load(&ctl->turns[other]);
    CHECK(mine_done == t / 2, "turn %llu: own count %llu", (unsigned long long)t,
          (unsigned long long)mine_done);
    CHECK(other_done == (t + 1) / 2, "turn %llu: other's count %llu", (unsigned long long)t,
          (unsigned long long)other_done);
    if (t > 0) {
        long q = (long)((t - 1) % (sh_pages - 1));
        check_page(page_of(sh, 1 + q), "shared anon", 1 + q, R_SH, (int64_t)t - 1, 0, 0);
        check_mf_page((long)((t - 1) % MF_PAGES), (int64_t)t - 1);
    }
    write_words(page_of(sh, 1 + (long)(t % (sh_pages - 1))), R_SH, t);
    write_words(page_of((t / 2) % 2 ? mf2 : mf1, (long)(t % MF_PAGES)), R_MF, t);
    private_turn();
    if ((int)(t % 128) == side) {
        full_check_shared((int64_t)t);
        full_check_private();
    }
    atomic_store(&ctl->turns[side], mine_done + 1);
    atomic_store_explicit(&ctl->turn, t + 1, memory_order_release);
}

/* In the parent's turn t (nobody writes): a fresh process checks what
 * turns 0..t-1 left in SH and MF. */
static void check_in_helper(uint64_t t)
{
    pid_t h = fork();
    CHECK_SYS(h);
    if (h == 0) {
        wl_init("shm/helper");
        full_check_shared((int64_t)t - 1);
        _exit(0);
    }
    double end = wl_now() + BOUND;
    int st;
    for (;;) {
        pid_t r = waitpid(h, &st, WNOHANG);
        if (r == h)
            break;
        CHECK(r == 0 || (r < 0 && errno == EINTR), "waitpid(helper): %s", strerror(errno));
        CHECK(wl_now() < end, "helper %d did not finish", (int)h);
        wl_sleep(0.001);
    }
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0, "helper ended with wait status %#x", st);
}

static void *map(size_t len, int flags, int fd)
{
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, flags, fd, 0);
    CHECK(p != MAP_FAILED, "mmap %zu bytes: %s", len, strerror(errno));
    return p;
}

static void run_child(void)
{
    wl_init("shm/child");
    side = 1;
    mf2 = map(MF_PAGES * PAGE, MAP_SHARED, memfd);
    if (!keep_fd)
        CHECK_SYS(close(memfd));
    for (;;) {
        uint64_t t = wait_turn();
        if (atomic_load(&ctl->stop)) {
            full_check_shared((int64_t)t - 2);
            full_check_private();
            _exit(0);
        }
        check_peer();
        do_turn(t);
    }
}

int main(int argc, char **argv)
{
    wl_init("shm");
    double secs = wl_secs(2.0);
    parent_pid = getpid();
    if (argc > 1) {
        long mib = atol(argv[1]);
        CHECK(mib >= 1 && mib <= 4096, "SH size %s MiB", argv[1]);
        sh_pages = mib * 256;
    }
    for (int i = 2; i < argc; i++) {
        if (strcmp(argv[i], "mapped") == 0)
            keep_fd = 0;
        else if (strcmp(argv[i], "forks") == 0)
            forks = 1;
        else
            wl_fail("unknown argument %s", argv[i]);
    }

    sh = map(sh_pages * PAGE, MAP_SHARED | MAP_ANONYMOUS, -1);
    ctl = (struct ctl *)sh;
    memfd = memfd_create("ferry-shm", 0);
    CHECK_SYS(memfd);
    CHECK_SYS(ftruncate(memfd, MF_PAGES * PAGE));
    mf1 = map(MF_PAGES * PAGE, MAP_SHARED, memfd);
    pv = map(PV_PAGES * PAGE, MAP_PRIVATE | MAP_ANONYMOUS, -1);
    for (long q = 0; q < PV_PAGES; q++)
        for (uint64_t j = 0; j < PW; j++)
            page_of(pv, q)[j] = pat(R_PRE, (uint64_t)q, j);

    child_pid = fork();
    CHECK_SYS(child_pid);
    if (child_pid == 0)
        run_child();

    mf2 = map(MF_PAGES * PAGE, MAP_SHARED, memfd);
    if (!keep_fd)
        CHECK_SYS(close(memfd));
    uint64_t t;
    /* Two rounds each before READY. */
    for (;;) {
        t = wait_turn();
        if (t >= 4)
            break;
        do_turn(t);
    }
    wl_ready(secs);
    double next_helper = 0;
    for (;;) {
        if (wl_time_up()) {
            /* Check the child's last turn, then tell it to stop. */
            long q = (long)((t - 1) % (sh_pages - 1));
            check_page(page_of(sh, 1 + q), "shared anon", 1 + q, R_SH, (int64_t)t - 1, 0, 0);
            atomic_store(&ctl->stop, 1);
            atomic_store_explicit(&ctl->turn, t + 1, memory_order_release);
            break;
        }
        if (forks && wl_now() >= next_helper) {
            check_in_helper(t);
            next_helper = wl_now() + 0.05;
        }
        do_turn(t);
        if (t % 512 == 0)
            usleep(500);
        t = wait_turn();
    }

    double end = wl_now() + BOUND;
    int st;
    for (;;) {
        pid_t r = waitpid(child_pid, &st, WNOHANG);
        if (r == child_pid)
            break;
        CHECK(r == 0 || (r < 0 && errno == EINTR), "waitpid(child): %s", strerror(errno));
        CHECK(wl_now() < end, "child did not exit after stop");
        wl_sleep(0.002);
    }
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0, "child ended with wait status %#x", st);
    full_check_shared((int64_t)t - 1);
    full_check_private();
    CHECK(atomic_load(&ctl->turns[0]) == t / 2 && atomic_load(&ctl->turns[1]) == t / 2,
          "turn counts %llu/%llu after %llu turns", (unsigned long long)atomic_load(&ctl->turns[0]),
          (unsigned long long)atomic_load(&ctl->turns[1]), (unsigned long long)t);
    wl_say("shm: %llu turns", (unsigned long long)t);
    wl_pass();
}
