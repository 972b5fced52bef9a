/*
 * zero_probe.c - what is left of freed heap chunks, seen from inside.
 *
 * For each case a chunk is filled with 0xA5 and given back (free, realloc
 * moving it, realloc shrinking it); right away, before anything else can
 * reuse the memory, the probe reads its own /proc/self/pagemap (which pages
 * of the range are still present: bit 63) and then /proc/self/mem (how many
 * bytes of the range are non-zero). The ranges exclude what glibc itself
 * writes into a freed chunk: the first 32 bytes (tcache next/key or bin
 * fd/bk, fd_nextsize/bk_nextsize) and the last 8 (the next chunk's
 * prev_size). Pages are counted when they lie wholly inside the range.
 *
 * M_MMAP_THRESHOLD is raised so the large chunks live on the heap (mmapped
 * chunks are unmapped by free anyway) and M_TRIM_THRESHOLD so the heap is
 * not trimmed under them; a guard allocation keeps each chunk from merging
 * into the top chunk.
 *
 * Output, one line per case:  CASE pages=N present=N bytes=N nonzero=N
 * Build: gcc -O2 -o zero_probe zero_probe.c
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <malloc.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define PAGE 4096u

struct result {
    const char *name;
    size_t pages, present, bytes, nonzero;
};

static int pagemap_fd, mem_fd;
static struct result results[8];
static int nresults;

/* memset that the compiler cannot drop as a dead store before free(). */
static void fill(void *p, size_t n)
{
    memset(p, 0xA5, n);
    __asm__ volatile("" : : "r"(p) : "memory");
}

static void die(const char *what)
{
    perror(what);
    exit(2);
}

/* Inspects [start, end). Uses only syscalls and the stack: no malloc. */
static void inspect(const char *name, uintptr_t start, uintptr_t end)
{
    struct result *r = &results[nresults++];
    r->name = name;
    uintptr_t lo = (start + PAGE - 1) & ~(uintptr_t)(PAGE - 1);
    uintptr_t hi = end & ~(uintptr_t)(PAGE - 1);
    for (uintptr_t a = lo; a < hi; a += PAGE) {
        uint64_t e;
        if (pread(pagemap_fd, &e, 8, (off_t)(a / PAGE * 8)) != 8)
            die("pread pagemap");
        r->pages++;
        if (e >> 63)
            r->present++;
    }
    unsigned char buf[65536];
    for (uintptr_t a = start; a < end;) {
        size_t n = end - a < sizeof buf ? end - a : sizeof buf;
        ssize_t got = pread(mem_fd, buf, n, (off_t)a);
        if (got <= 0)
            die("pread /proc/self/mem");
        for (ssize_t i = 0; i < got; i++)
            r->nonzero += buf[i] != 0;
        r->bytes += (size_t)got;
        a += (size_t)got;
    }
}

int main(void)
{
    if (!mallopt(M_MMAP_THRESHOLD, 256 << 20) || !mallopt(M_TRIM_THRESHOLD, 1 << 30))
        die("mallopt");
    pagemap_fd = open("/proc/self/pagemap", O_RDONLY);
    mem_fd = open("/proc/self/mem", O_RDONLY);
    if (pagemap_fd < 0 || mem_fd < 0)
        die("open /proc/self");

    /* All chunks up front, from the untouched heap, each followed by a
     * guard: adjacent, so no chunk merges into the top chunk and the
     * realloc below cannot grow in place. */
    unsigned char *big = malloc(1 << 20), *mid = malloc(3000), *small = malloc(200);
    void *guard1 = malloc(100);
    unsigned char *mover = malloc(512 << 10);
    void *guard2 = malloc(100);
    unsigned char *shrink = malloc(1 << 20);
    void *guard3 = malloc(100);
    if (!big || !mid || !small || !guard1 || !mover || !guard2 || !shrink || !guard3)
        die("malloc");
    size_t us;
    uintptr_t a;

    /* 1 MiB heap chunk, freed. */
    us = malloc_usable_size(big);
    fill(big, us);
    a = (uintptr_t)big;
    free(big);
    inspect("free-1m", a + 32, a + us - 8);

    /* 3000 B chunk (unsorted/large bin, not tcache), freed. */
    us = malloc_usable_size(mid);
    fill(mid, us);
    a = (uintptr_t)mid;
    free(mid);
    inspect("free-3k", a + 32, a + us - 8);

    /* 200 B chunk (tcache: glibc writes only 16 bytes). */
    us = malloc_usable_size(small);
    fill(small, us);
    a = (uintptr_t)small;
    free(small);
    inspect("free-200", a + 16, a + us);

    /* realloc that must move: 512 KiB -> 2 MiB, a guard right after. */
    us = malloc_usable_size(mover);
    fill(mover, us);
    a = (uintptr_t)mover;
    unsigned char *q = realloc(mover, 2 << 20);
    if (!q || (uintptr_t)q == a)
        die("realloc did not move");
    inspect("realloc-move", a + 32, a + us - 8);
    for (size_t i = 0; i < us; i++)
        if (q[i] != 0xA5)
            die("realloc-move lost data");

    /* realloc shrinking 1 MiB -> 64 KiB in place: the cut-off tail. */
    us = malloc_usable_size(shrink);
    fill(shrink, us);
    a = (uintptr_t)shrink;
    unsigned char *s = realloc(shrink, 64 << 10);
    if ((uintptr_t)s != a)
        die("realloc shrink moved");
    inspect("realloc-shrink", a + (64 << 10) + 64, a + us - 8);
    for (size_t i = 0; i < (64 << 10); i++)
        if (s[i] != 0xA5)
            die("realloc-shrink lost data");

    for (int i = 0; i < nresults; i++)
        printf("%s pages=%zu present=%zu bytes=%zu nonzero=%zu\n", results[i].name,
               results[i].pages, results[i].present, results[i].bytes, results[i].nonzero);
    free(q);
    free(s);
    free(guard1);
    free(guard2);
    free(guard3);
    return 0;
}
