/*
 * churn.c - a job that reshapes its memory while it runs.
 *
 * usage: churn [MiB]   (default 32: size of each of the two big regions)
 *
 * Made for post-copy migration, where the restored job's pages arrive
 * while it runs: every operation below hits pages that may still be
 * missing on the target, so the pager must follow madvise(DONTNEED),
 * mremap, munmap and fork through userfaultfd events.
 *
 * Before READY: region A (read-only pattern, never rewritten) and region B
 * (pattern) are filled. After READY, round k (every ~20 ms) works on chunk
 * k of B (1/64 of it):
 *   - madvise(MADV_DONTNEED) on its first half: must then read as zero;
 *     rewritten with round k's pattern and checked;
 *   - its second half is moved with mremap(MAYMOVE|FIXED) to a spare area,
 *     checked there (the old pattern must have moved along), moved back;
 *   - the last page of the chunk is munmapped and mapped again: zero.
 * Every fourth round the process forks: the child checks all of A and the
 * already processed chunks of B, and exits 0 or 1; the parent checks the
 * status. At the deadline all of A and B are verified once more.
 */
#include "common.h"

#include <sys/mman.h>
#include <sys/wait.h>

#define PAGE 4096ul
#define WPP (PAGE / 8)

static uint64_t *A, *B;
static size_t npages; /* per region */
static unsigned char *round_of; /* per chunk of B: round that rewrote it, 0 = original */

static uint64_t pat(int region, size_t page, size_t word, unsigned gen)
{
    return wl_mix(((uint64_t)region << 56) ^ ((uint64_t)gen << 40) ^ (page * WPP + word));
}

static void fill(uint64_t *base, int region, size_t first, size_t n, unsigned gen)
{
    for (size_t p = first; p < first + n; p++)
        for (size_t w = 0; w < WPP; w++)
            base[p * WPP + w] = pat(region, p, w, gen);
}

/* 0 if pages [first, first+n) of base hold gen's pattern (or zeros if zero). */
static int check(const uint64_t *base, int region, size_t first, size_t n, unsigned gen, int zero,
                 const char *what)
{
    for (size_t p = first; p < first + n; p++)
        for (size_t w = 0; w < WPP; w++) {
            uint64_t want = zero ? 0 : pat(region, p, w, gen);
            if (base[p * WPP + w] != want) {
                wl_say("mismatch in %s: page %zu word %zu: %#lx, want %#lx", what, p, w,
                       (unsigned long)base[p * WPP + w], (unsigned long)want);
                return -1;
            }
        }
    return 0;
}

#define CHUNKS 64

/* Checks chunk c of B as the rounds left it. */
static int check_chunk(size_t c, const char *what)
{
    size_t per = npages / CHUNKS, first = c * per, half = per / 2;
    unsigned r = round_of[c];
    if (r == 0)
        return check(B, 2, first, per, 0, 0, what);
    if (check(B, 2, first, half, r, 0, what))
        return -1;
    if (check(B, 2, first + half, per - half - 1, 0, 0, what))
        return -1;
    return check(B, 2, first + per - 1, 1, 0, 1, what);
}

int main(int argc, char **argv)
{
    wl_init("churn");
    size_t mib = argc > 1 ? strtoul(argv[1], 0, 10) : 32;
    if (mib < 1)
        mib = 1;
    npages = mib * 256;
    if (npages < CHUNKS * 4)
        npages = CHUNKS * 4;
    size_t len = npages * PAGE, per = npages / CHUNKS, half = per / 2;
    A = mmap(0, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    B = mmap(0, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    /* Where halves of chunks are moved to and back from. */
    char *spare = mmap(0, (per - half) * PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    round_of = calloc(CHUNKS, 1);
    if (A == MAP_FAILED || B == MAP_FAILED || spare == MAP_FAILED || !round_of)
        wl_fail("mmap: %s", strerror(errno));
    fill(A, 1, 0, npages, 0);
    fill(B, 2, 0, npages, 0);
    wl_ready(wl_secs(6));

    unsigned k = 0;
    int forks = 0;
    while (!wl_time_up()) {
        size_t c = k % CHUNKS, first = c * per;
        unsigned r = k / CHUNKS + 1;
        if (r > 250)
            break;
        char *chunk = (char *)B + first * PAGE;
        /* DONTNEED: zero, then rewritten. */
        if (madvise(chunk, half * PAGE, MADV_DONTNEED))
            wl_fail("madvise: %s", strerror(errno));
        if (check(B, 2, first, half, 0, 1, "B after MADV_DONTNEED"))
            wl_fail("round %u: DONTNEED'd pages of chunk %zu are not zero", k, c);
        fill(B, 2, first, half, r);
        /* Move the second half (minus the last page) away and back. */
        size_t mlen = (per - half - 1) * PAGE;
        char *mid = chunk + half * PAGE;
        if (round_of[c] == 0 && check(B, 2, first + half, per - half - 1, 0, 0, "B before mremap"))
            wl_fail("round %u: chunk %zu changed before mremap", k, c);
        void *moved = mremap(mid, mlen, mlen, MREMAP_MAYMOVE | MREMAP_FIXED, spare);
        if (moved == MAP_FAILED)
            wl_fail("mremap away: %s", strerror(errno));
        for (size_t p = 0; p < per - half - 1; p++)
            for (size_t w = 0; w < WPP; w++)
                if (((uint64_t *)moved)[p * WPP + w] != pat(2, first + half + p, w, 0))
                    wl_fail("round %u: moved page %zu of chunk %zu is wrong", k, p, c);
        if (mremap(moved, mlen, mlen, MREMAP_MAYMOVE | MREMAP_FIXED, mid) == MAP_FAILED)
            wl_fail("mremap back: %s", strerror(errno));
        /* The spare area is gone with the move: map it again for next time. */
        spare = mmap(spare, mlen, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
        if (spare == MAP_FAILED)
            wl_fail("mmap spare: %s", strerror(errno));
        /* munmap + mmap the last page: zero. */
        char *last = chunk + (per - 1) * PAGE;
        if (munmap(last, PAGE) ||
            mmap(last, PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1,
                 0) == MAP_FAILED)
            wl_fail("munmap/mmap: %s", strerror(errno));
        round_of[c] = r;
        if (check_chunk(c, "B after a round"))
            wl_fail("round %u: chunk %zu is wrong after its round", k, c);
        if (k % 4 == 3) {
            pid_t child = fork();
            if (child < 0)
                wl_fail("fork: %s", strerror(errno));
            if (child == 0) {
                int bad = check(A, 1, 0, npages, 0, 0, "A in a child") != 0;
                for (size_t d = 0; d < CHUNKS && !bad; d++)
                    bad = check_chunk(d, "B in a child") != 0;
                _exit(bad);
            }
            int st;
            if (waitpid(child, &st, 0) != child || !WIFEXITED(st) || WEXITSTATUS(st) != 0)
                wl_fail("round %u: the forked child found wrong memory (status %#x)", k, st);
            forks++;
        }
        k++;
        wl_sleep(0.02);
    }
    if (check(A, 1, 0, npages, 0, 0, "A at the end"))
        wl_fail("region A is wrong at the end");
    for (size_t d = 0; d < CHUNKS; d++)
        if (check_chunk(d, "B at the end"))
            wl_fail("chunk %zu of B is wrong at the end", d);
    wl_say("rounds %u forks %d", k, forks);
    wl_pass();
    return 0;
}
