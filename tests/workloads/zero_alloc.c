/*
 * zero_alloc.c - malloc/calloc/memalign/realloc/free in every size class
 * from 16 B to 64 MiB, from several threads, with cross-thread frees; the
 * workload for crates/ferry-zero (the LD_PRELOAD library that zeroes or
 * releases freed heap memory). It must PASS with and without the library,
 * in every FERRY_ZERO mode.
 *
 * Four workers each own a table of live blocks. Every block's contents are
 * a function of (seed, offset), so a block is verified in full whenever it
 * is freed, realloc'd or handed over, and every live block is re-verified
 * at the end. Each worker also keeps the sum of the checksums of its live
 * blocks (computed when they are filled) and at the end recomputes it from
 * memory. Operations: malloc / calloc (must read zero) / posix_memalign /
 * aligned_alloc / memalign allocations, realloc growing and shrinking (the
 * preserved prefix must be intact), realloc(p, 0) and reallocarray, free,
 * and hand-over of a block to the next worker, which frees it (a chunk of
 * another thread's arena).
 *
 * Sizes are log-uniform over 16 B .. 64 KiB most of the time, up to 4 MiB
 * one time in 16 and up to 64 MiB one time in 512 (at most one such block
 * per worker at a time), so both heap chunks and mmapped chunks (and
 * glibc's moving mmap threshold) are exercised.
 *
 * With ferry-zero loaded, its statistics line is printed before PASS.
 */
#include "common.h"

#include <dlfcn.h>
#include <malloc.h>
#include <pthread.h>

#define NWORKERS 4
#define SLOTS 192
#define BIG (4u << 20)
#define MAX_SIZE (64u << 20)
#define MAILBOX 64

struct block {
    unsigned char *p;
    size_t size;
    uint64_t seed;
    uint64_t sum; /* checksum of the contents, computed when filled */
};

struct mailbox {
    pthread_mutex_t lock;
    int n;
    struct block b[MAILBOX];
};

struct worker {
    int id;
    pthread_t thread;
    uint64_t rng;
    struct block slot[SLOTS];
    uint64_t live_sum; /* sum of slot[].sum over live slots */
    int big_live;      /* live blocks > BIG */
    struct mailbox in; /* blocks handed to this worker */
    uint64_t ops, reallocs, handed, bytes;
};

static struct worker workers[NWORKERS];
static volatile int stop;

static uint64_t rnd(struct worker *w)
{
    w->rng = w->rng * 6364136223846793005ull + 1442695040888963407ull;
    return wl_mix(w->rng);
}

/* Byte i of a block with this seed. Word-wise for speed: byte i is byte
 * (i % 8) of wl_mix(seed + i / 8). */
static void fill(unsigned char *p, size_t size, uint64_t seed, uint64_t *sum)
{
    uint64_t s = 0;
    size_t i = 0;
    for (; i + 8 <= size; i += 8) {
        uint64_t v = wl_mix(seed + i / 8);
        memcpy(p + i, &v, 8);
        s += v;
    }
    if (i < size) {
        uint64_t v = wl_mix(seed + i / 8);
        memcpy(p + i, &v, size - i);
        s += v & (~0ull >> (8 * (8 - (size - i))));
    }
    *sum = s;
}

/* Verifies the first n bytes against the pattern; returns the offset of
 * the first difference or (size_t)-1. */
static size_t check(const unsigned char *p, size_t n, uint64_t seed)
{
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t v = wl_mix(seed + i / 8), m;
        memcpy(&m, p + i, 8);
        if (m != v)
            return i;
    }
    if (i < n) {
        uint64_t v = wl_mix(seed + i / 8);
        if (memcmp(p + i, &v, n - i) != 0)
            return i;
    }
    return (size_t)-1;
}

/* Checksum recomputed from memory (same definition as in fill). */
static uint64_t sum_of(const unsigned char *p, size_t size)
{
    uint64_t s = 0, v;
    size_t i = 0;
    for (; i + 8 <= size; i += 8) {
        memcpy(&v, p + i, 8);
        s += v;
    }
    if (i < size) {
        v = 0;
        memcpy(&v, p + i, size - i);
        s += v;
    }
    return s;
}

static void verify(struct worker *w, const struct block *b, const char *what)
{
    size_t bad = check(b->p, b->size, b->seed);
    if (bad != (size_t)-1)
        wl_fail("worker %d: %s: block %p size %zu differs at offset %zu",
                w->id, what, (void *)b->p, b->size, bad);
    if (malloc_usable_size(b->p) < b->size)
        wl_fail("worker %d: %s: usable size %zu < %zu", w->id, what,
                malloc_usable_size(b->p), b->size);
}

static size_t pick_size(struct worker *w)
{
    uint64_t r = rnd(w);
    unsigned lo = 4, hi = 16; /* 16 B .. 64 KiB */
    if (r % 512 == 0 && w->big_live == 0)
        hi = 26; /* .. 64 MiB */
    else if (r % 16 == 1)
        hi = 22; /* .. 4 MiB */
    unsigned e = lo + (unsigned)((r >> 16) % (hi - lo + 1));
    size_t size = ((size_t)1 << e) + (size_t)((r >> 32) % ((size_t)1 << e));
    if (size > MAX_SIZE)
        size = MAX_SIZE;
    if (size > BIG && w->big_live)
        size = BIG;
    return size;
}

static void account_add(struct worker *w, const struct block *b)
{
    w->live_sum += b->sum;
    if (b->size > BIG)
        w->big_live++;
    w->bytes += b->size;
}

static void account_remove(struct worker *w, const struct block *b)
{
    w->live_sum -= b->sum;
    if (b->size > BIG)
        w->big_live--;
}

static void allocate(struct worker *w, struct block *b)
{
    size_t size = pick_size(w);
    unsigned kind = (unsigned)(rnd(w) % 8);
    void *p = NULL;
    switch (kind) {
    case 0: /* calloc: must read as zeros */
        p = calloc(1, size);
        CHECK(p, "calloc(%zu) failed", size);
        {
            const unsigned char *c = p;
            for (size_t i = 0; i < size; i += (i < 8192 ? 1 : 61))
                CHECK(c[i] == 0, "worker %d: calloc(%zu) byte %zu is %u",
                      w->id, size, i, c[i]);
            CHECK(c[size - 1] == 0, "calloc(%zu): last byte non-zero", size);
        }
        break;
    case 1: {
        size_t align = (size_t)16 << (rnd(w) % 9); /* 16 .. 4096 */
        CHECK(posix_memalign(&p, align, size) == 0, "posix_memalign(%zu, %zu)",
              align, size);
        CHECK(((uintptr_t)p & (align - 1)) == 0, "misaligned %p", p);
        break;
    }
    case 2:
        p = aligned_alloc(64, (size + 63) & ~(size_t)63);
        CHECK(p, "aligned_alloc failed");
        size = (size + 63) & ~(size_t)63;
        break;
    case 3:
        p = memalign(4096, size);
        CHECK(p && ((uintptr_t)p & 4095) == 0, "memalign(4096, %zu)", size);
        break;
    default:
        p = malloc(size);
        CHECK(p, "malloc(%zu) failed", size);
        break;
    }
    b->p = p;
    b->size = size;
    b->seed = rnd(w);
    fill(b->p, b->size, b->seed, &b->sum);
    account_add(w, b);
}

static void release(struct worker *w, struct block *b, const char *what)
{
    verify(w, b, what);
    account_remove(w, b);
    free(b->p);
    b->p = NULL;
}

static void do_realloc(struct worker *w, struct block *b)
{
    verify(w, b, "before realloc");
    account_remove(w, b);
    uint64_t r = rnd(w);
    size_t keep, size;
    unsigned char *q;
    switch (r % 6) {
    case 0: /* realloc(p, 0) frees (glibc); then a fresh block */
        q = realloc(b->p, 0);
        if (q)
            free(q);
        b->p = NULL;
        allocate(w, b);
        return;
    case 1: /* reallocarray */
        size = b->size + (size_t)(r >> 8) % 4096 + 1;
        if (size > MAX_SIZE)
            size = MAX_SIZE;
        size = (size + 7) & ~(size_t)7;
        q = reallocarray(b->p, size / 8, 8);
        break;
    case 2: /* shrink to a fraction */
        size = b->size / (2 + (r >> 8) % 7) + 1;
        q = realloc(b->p, size);
        break;
    case 3: /* shrink by a little */
        size = b->size > 64 ? b->size - (size_t)(r >> 8) % (b->size / 4 + 1) : b->size;
        q = realloc(b->p, size);
        break;
    default: /* grow: double-ish, or by a page */
        if (r & 0x100)
            size = b->size * 2 + (size_t)(r >> 16) % 1024;
        else
            size = b->size + 4096;
        if (size > MAX_SIZE || (size > BIG && w->big_live))
            size = b->size + 16 > MAX_SIZE ? b->size : b->size + 16;
        q = realloc(b->p, size);
        break;
    }
    CHECK(q, "worker %d: realloc(%zu -> %zu) failed", w->id, b->size, size);
    keep = size < b->size ? size : b->size;
    size_t bad = check(q, keep, b->seed);
    if (bad != (size_t)-1)
        wl_fail("worker %d: realloc %zu -> %zu lost data at offset %zu",
                w->id, b->size, size, bad);
    CHECK(malloc_usable_size(q) >= size, "realloc: usable %zu < %zu",
          malloc_usable_size(q), size);
    b->p = q;
    b->size = size;
    b->seed = rnd(w);
    fill(b->p, b->size, b->seed, &b->sum);
    account_add(w, b);
    w->reallocs++;
}

/* Hands slot b over to the next worker (it verifies and frees it). */
static void hand_over(struct worker *w, struct block *b)
{
    struct worker *to = &workers[(w->id + 1) % NWORKERS];
    pthread_mutex_lock(&to->in.lock);
    if (to->in.n < MAILBOX) {
        account_remove(w, b);
        to->in.b[to->in.n++] = *b;
        b->p = NULL;
        w->handed++;
    }
    pthread_mutex_unlock(&to->in.lock);
}

static void drain(struct worker *w)
{
    struct block got[MAILBOX];
    int n;
    pthread_mutex_lock(&w->in.lock);
    n = w->in.n;
    memcpy(got, w->in.b, sizeof(struct block) * (size_t)n);
    w->in.n = 0;
    pthread_mutex_unlock(&w->in.lock);
    for (int i = 0; i < n; i++) {
        verify(w, &got[i], "handed-over block");
        free(got[i].p);
    }
}

static void step(struct worker *w)
{
    struct block *b = &w->slot[rnd(w) % SLOTS];
    if (!b->p) {
        allocate(w, b);
        return;
    }
    switch (rnd(w) % 8) {
    case 0:
    case 1:
    case 2:
        release(w, b, "before free");
        allocate(w, b);
        break;
    case 3:
    case 4:
        do_realloc(w, b);
        break;
    case 5:
        hand_over(w, b);
        break;
    case 6:
        release(w, b, "before free");
        break;
    default: /* rewrite in place */
        verify(w, b, "before rewrite");
        account_remove(w, b);
        b->seed = rnd(w);
        fill(b->p, b->size, b->seed, &b->sum);
        account_add(w, b);
        break;
    }
    w->ops++;
}

static void final_check(struct worker *w)
{
    uint64_t sum = 0;
    for (int i = 0; i < SLOTS; i++) {
        struct block *b = &w->slot[i];
        if (!b->p)
            continue;
        verify(w, b, "final");
        sum += sum_of(b->p, b->size);
    }
    CHECK(sum == w->live_sum,
          "worker %d: live checksum %016llx, recomputed %016llx", w->id,
          (unsigned long long)w->live_sum, (unsigned long long)sum);
}

static void *worker_main(void *arg)
{
    struct worker *w = arg;
    while (!stop) {
        for (int i = 0; i < 64; i++)
            step(w);
        drain(w);
    }
    return NULL;
}

int main(void)
{
    wl_init("zero_alloc");
    double secs = wl_secs(2);

    for (int i = 0; i < NWORKERS; i++) {
        struct worker *w = &workers[i];
        w->id = i;
        w->rng = 0x5eed0000u + (uint64_t)i;
        pthread_mutex_init(&w->in.lock, NULL);
        for (int s = 0; s < SLOTS / 2; s++)
            allocate(w, &w->slot[s]);
    }
    for (int i = 0; i < NWORKERS; i++)
        CHECK(pthread_create(&workers[i].thread, NULL, worker_main,
                             &workers[i]) == 0,
              "pthread_create");

    wl_ready(secs);
    while (!wl_time_up())
        wl_sleep(0.05);
    stop = 1;
    for (int i = 0; i < NWORKERS; i++)
        CHECK(pthread_join(workers[i].thread, NULL) == 0, "pthread_join");

    uint64_t ops = 0, reallocs = 0, handed = 0, bytes = 0;
    for (int i = 0; i < NWORKERS; i++) {
        drain(&workers[i]);
        final_check(&workers[i]);
        ops += workers[i].ops;
        reallocs += workers[i].reallocs;
        handed += workers[i].handed;
        bytes += workers[i].bytes;
    }
    CHECK(ops > 1000, "only %llu operations", (unsigned long long)ops);
    wl_say("ops %llu reallocs %llu handed-over %llu allocated %llu MiB",
           (unsigned long long)ops, (unsigned long long)reallocs,
           (unsigned long long)handed, (unsigned long long)(bytes >> 20));

    /* Free everything (the library scrubs it on the way out). */
    for (int i = 0; i < NWORKERS; i++)
        for (int s = 0; s < SLOTS; s++)
            if (workers[i].slot[s].p)
                release(&workers[i], &workers[i].slot[s], "last free");

    size_t (*stats)(char *, size_t) =
        (size_t (*)(char *, size_t))dlsym(RTLD_DEFAULT, "ferry_zero_stats");
    if (stats) {
        char line[600];
        stats(line, sizeof line);
        line[strcspn(line, "\n")] = 0;
        wl_say("%s", line);
    }
    wl_pass();
}
