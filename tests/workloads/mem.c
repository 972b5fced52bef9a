/*
 * mem.c - memory under constant writes.
 *
 * usage: mem [ANON_MiB]   (default 64)
 *
 * Lays out every common kind of memory a process has, fills it with a
 * pattern derived from (region, unit, generation), prints READY, then keeps
 * rewriting everything writable, generation after generation, verifying the
 * previous generation before each rewrite.  A restore that loses, shifts,
 * duplicates or zeroes a page, or that restores a stale copy, fails the
 * next verification.
 *
 * Regions:
 *   anon     large private anonymous mmap (argv[1] MiB)
 *   small    ~2000 small malloc blocks (brk heap)
 *   large    one large malloc block (an mmap chunk inside glibc)
 *   data     initialised global array (.data)
 *   bss      zero-initialised global array (.bss)
 *   stack    a 1 MiB array on the stack
 *   private  MAP_PRIVATE mapping of a file: even pages rewritten
 *            (copy-on-write), odd pages never written (must still show the
 *            file), and the file itself must never change
 *   shared   MAP_SHARED mapping of a file: rewritten, and the file seen
 *            through pread() must always equal the mapping
 *   prot_none filled, then PROT_NONE; must fault, and hold its contents
 *            when made readable again at the end
 *   ro       filled, then PROT_READ; must fault on write, contents checked
 *   untouched never accessed until the end; must read as zero
 *   zeroed   pages faulted in by writing zeros; must stay zero
 * At the end also: sbrk(0) equals its value at READY and the heap can still
 * grow with brk; clock_gettime works (vDSO where glibc cached it) and
 * agrees with the raw syscall.
 */
#include "common.h"

#include <fcntl.h>
#include <setjmp.h>
#include <signal.h>
#include <sys/auxv.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>

#define PAGE 4096
#define WPP (PAGE / 8) /* 64-bit words per page */
#define GOLDEN 0x9e3779b97f4a7c15ull

/* Region ids, mixed into the pattern so a page that ends up in the wrong
 * region (or at the wrong index) cannot match. */
enum { R_ANON = 1, R_SMALL, R_LARGE, R_DATA, R_BSS, R_STACK, R_PRIVATE,
       R_SHARED, R_PROT_NONE, R_RO, R_FILE };

static const char *region_name[] = {
    "?", "anon", "small", "large", "data", "bss", "stack", "private",
    "shared", "prot_none", "ro", "private-file",
};

/* .data: the non-zero initialiser puts the whole array in .data. */
static uint64_t g_data[16 * WPP] = {1};
/* .bss: 1 MiB, zero until first written. */
static uint64_t g_bss[256 * WPP];

/* Word w of unit `idx` of region `rid` in generation `gen`. */
static inline uint64_t pat_seed(unsigned rid, uint64_t idx, uint64_t gen)
{
    return wl_mix(((uint64_t)rid << 56) ^ (idx << 20) ^ gen);
}

/* A unit is the granule of verification: a page, or one malloc block. */
struct unit {
    uint64_t *p;
    size_t nwords;
    unsigned rid;
    uint64_t idx;
};

static struct unit *units;
static size_t nunits, cap_units;

static void add_unit(uint64_t *p, size_t nwords, unsigned rid, uint64_t idx)
{
    if (nunits == cap_units) {
        cap_units = cap_units ? 2 * cap_units : 1024;
        units = realloc(units, cap_units * sizeof *units);
        CHECK(units, "out of memory");
    }
    units[nunits++] = (struct unit){p, nwords, rid, idx};
}

/* Splits [p, p + nwords) into page-sized units of region rid. */
static void add_pages(uint64_t *p, size_t nwords, unsigned rid)
{
    for (size_t i = 0; i * WPP < nwords; i++) {
        size_t n = nwords - i * WPP;
        add_unit(p + i * WPP, n < WPP ? n : WPP, rid, i);
    }
}

static void fill(uint64_t *p, size_t n, unsigned rid, uint64_t idx, uint64_t gen)
{
    uint64_t s = pat_seed(rid, idx, gen);
    for (size_t w = 0; w < n; w++)
        p[w] = s + w * GOLDEN;
}

static void verify(const uint64_t *p, size_t n, unsigned rid, uint64_t idx, uint64_t gen)
{
    uint64_t s = pat_seed(rid, idx, gen);
    for (size_t w = 0; w < n; w++)
        if (p[w] != s + w * GOLDEN) {
            /* Say which generation the word does belong to, if a nearby
             * one: tells a stale page from a garbage one. */
            long found = -1;
            for (uint64_t g = gen > 64 ? gen - 64 : 0; g < gen + 64; g++)
                if (p[w] == pat_seed(rid, idx, g) + w * GOLDEN)
                    found = (long)g;
            wl_fail("%s unit %llu word %zu at %p: got %#llx want %#llx "
                    "(generation %llu; word matches generation %ld)",
                    region_name[rid], (unsigned long long)idx, w, (void *)&p[w],
                    (unsigned long long)p[w],
                    (unsigned long long)(s + w * GOLDEN),
                    (unsigned long long)gen, found);
        }
}

static void verify_zero(const uint64_t *p, size_t nwords, const char *what)
{
    for (size_t w = 0; w < nwords; w++)
        CHECK(p[w] == 0, "%s word %zu at %p is %#llx, want 0", what, w,
              (void *)&p[w], (unsigned long long)p[w]);
}

/* ---- shared file mapping ----------------------------------------------
 * Word 0 of each page holds the generation the page was written in, the
 * rest follows that generation's pattern.  The check accepts any
 * self-consistent generation: the contents of a MAP_SHARED mapping live in
 * the file, not in the image, and after a --leave-running checkpoint the
 * original keeps writing the file, so a later restore legitimately sees
 * newer generations there.  What must hold is that every page is intact and
 * that the mapping really is shared with the file. */
#define SHARED_PAGES 32

static void shared_fill(uint64_t *page, uint64_t idx, uint64_t gen)
{
    fill(page + 1, WPP - 1, R_SHARED, idx, gen);
    page[0] = gen;
}

static void shared_verify(const uint64_t *page, uint64_t idx)
{
    uint64_t gen = page[0];
    CHECK(gen >= 1, "shared page %llu: generation word is %llu",
          (unsigned long long)idx, (unsigned long long)gen);
    verify(page + 1, WPP - 1, R_SHARED, idx, gen);
}

/* The file read with pread() must equal the mapping byte for byte. */
static void shared_compare_file(int fd, const uint64_t *map)
{
    static uint64_t buf[SHARED_PAGES * WPP];
    ssize_t n = pread(fd, buf, sizeof buf, 0);
    CHECK(n == (ssize_t)sizeof buf, "pread shared file: %zd (%s)", n,
          n < 0 ? strerror(errno) : "short");
    for (size_t w = 0; w < SHARED_PAGES * WPP; w++)
        CHECK(buf[w] == map[w],
              "shared file word %zu is %#llx but mapping has %#llx "
              "(mapping not shared with the file?)",
              w, (unsigned long long)buf[w], (unsigned long long)map[w]);
}

/* ---- fault probes -------------------------------------------------------- */
static sigjmp_buf probe_jmp;

static void on_segv(int sig)
{
    (void)sig;
    siglongjmp(probe_jmp, 1);
}

/* Returns 1 if accessing *p (a write if `write`, else a read) faults. */
static int faults(volatile uint64_t *p, int write)
{
    struct sigaction sa = {0}, old;
    sa.sa_handler = on_segv;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &old);
    volatile int faulted = 1;
    if (sigsetjmp(probe_jmp, 1) == 0) {
        if (write)
            *p = 42;
        else
            (void)*p;
        faulted = 0;
    }
    sigaction(SIGSEGV, &old, NULL);
    return faulted;
}

/* Start of the [vdso] mapping per /proc/self/maps, or 0. */
static unsigned long vdso_in_maps(void)
{
    FILE *f = fopen("/proc/self/maps", "r");
    CHECK(f, "open /proc/self/maps: %s", strerror(errno));
    char line[512];
    unsigned long start = 0;
    while (fgets(line, sizeof line, f))
        if (strstr(line, "[vdso]")) {
            start = strtoul(line, NULL, 16);
            break;
        }
    fclose(f);
    return start;
}

static double ts_sec(struct timespec t)
{
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static void *map_anon(size_t len)
{
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK(p != MAP_FAILED, "mmap %zu: %s", len, strerror(errno));
    return p;
}

/* Creates `path` with `pages` pages of the R_FILE pattern, returns the fd. */
static int make_file(const char *path, size_t pages)
{
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    CHECK(fd >= 0, "create %s: %s", path, strerror(errno));
    static uint64_t page[WPP];
    for (size_t i = 0; i < pages; i++) {
        fill(page, WPP, R_FILE, i, 0);
        CHECK(write(fd, page, PAGE) == PAGE, "write %s: %s", path, strerror(errno));
    }
    return fd;
}

#define PRIV_PAGES 64
#define PROTNONE_PAGES 16
#define RO_PAGES 16
#define UNTOUCHED_PAGES 256
#define ZEROED_PAGES 64
#define SMALL_BLOCKS 2000
#define STACK_WORDS (256 * WPP) /* 1 MiB */

static uint64_t *priv_map, *shared_map, *protnone, *ro, *untouched, *zeroed;
static int priv_fd, shared_fd;

/* One pass: verify generation `gen` everywhere, write generation gen+1. */
static void pass(uint64_t gen, int rewrite)
{
    for (size_t i = 0; i < nunits; i++) {
        struct unit *u = &units[i];
        verify(u->p, u->nwords, u->rid, u->idx, gen);
        if (rewrite)
            fill(u->p, u->nwords, u->rid, u->idx, gen + 1);
    }
    /* Private file mapping: odd pages were never written and must still
     * show the file's contents. */
    for (size_t i = 1; i < PRIV_PAGES; i += 2)
        verify(priv_map + i * WPP, WPP, R_FILE, i, 0);
    for (size_t i = 0; i < SHARED_PAGES; i++) {
        shared_verify(shared_map + i * WPP, i);
        if (rewrite)
            shared_fill(shared_map + i * WPP, i, gen + 1);
    }
    shared_compare_file(shared_fd, shared_map);
    for (size_t i = 0; i < RO_PAGES; i++)
        verify(ro + i * WPP, WPP, R_RO, i, 1);
    verify_zero(zeroed, ZEROED_PAGES * WPP, "zeroed");
}

/* noinline so the big stack array really lives in this frame for the whole
 * run, below main's. */
__attribute__((noinline)) static void run(double secs)
{
    uint64_t stack_buf[STACK_WORDS];
    add_pages(stack_buf, STACK_WORDS, R_STACK);
    for (size_t i = 0; i < nunits; i++)
        fill(units[i].p, units[i].nwords, units[i].rid, units[i].idx, 1);

    wl_ready(secs);
    void *brk0 = sbrk(0);

    uint64_t gen = 1;
    for (;;) {
        pass(gen, 1);
        gen++;
        if (wl_time_up())
            break;
    }
    pass(gen, 0); /* final verification, nothing rewritten */

    /* The private mapping's file must never have seen the COW writes. */
    static uint64_t page[WPP];
    for (size_t i = 0; i < PRIV_PAGES; i++) {
        CHECK(pread(priv_fd, page, PAGE, (off_t)i * PAGE) == PAGE,
              "pread private file: %s", strerror(errno));
        verify(page, WPP, R_FILE, i, 0);
    }

    /* Protections: PROT_NONE must fault on read, PROT_READ on write. */
    CHECK(faults(protnone + 7, 0), "reading the PROT_NONE region did not fault");
    CHECK(faults(ro + 3, 1), "writing the PROT_READ region did not fault");
    CHECK(!faults(ro + 3, 0), "reading the PROT_READ region faulted");
    CHECK_SYS(mprotect(protnone, PROTNONE_PAGES * PAGE, PROT_READ));
    for (size_t i = 0; i < PROTNONE_PAGES; i++)
        verify(protnone + i * WPP, WPP, R_PROT_NONE, i, 1);

    verify_zero(untouched, UNTOUCHED_PAGES * WPP, "untouched");

    /* brk: unchanged since READY (nothing here mallocs in the loop), and
     * the heap must still grow: 4 MiB of blocks below the mmap threshold
     * come from the brk heap. */
    void *brk1 = sbrk(0);
    CHECK(brk1 == brk0, "sbrk(0) is %p, was %p at READY", brk1, brk0);
    enum { NB = 64, BS = 64 * 1024 };
    uint64_t *blocks[NB];
    for (int i = 0; i < NB; i++) {
        blocks[i] = malloc(BS);
        CHECK(blocks[i], "malloc(%d) failed after restore", BS);
        fill(blocks[i], BS / 8, R_SMALL, 100000 + (uint64_t)i, gen);
    }
    for (int i = 0; i < NB; i++)
        verify(blocks[i], BS / 8, R_SMALL, 100000 + (uint64_t)i, gen);
    void *brk2 = sbrk(0);
    CHECK((char *)brk2 > (char *)brk0,
          "heap did not grow with brk (sbrk(0) %p, was %p): brk broken", brk2, brk0);

    /* vDSO: glibc cached its address at startup; it must be mapped there
     * and agree with the kernel's clock. */
    unsigned long aux = getauxval(AT_SYSINFO_EHDR);
    unsigned long in_maps = vdso_in_maps();
    CHECK(aux != 0 && aux == in_maps,
          "AT_SYSINFO_EHDR %#lx but [vdso] is at %#lx", aux, in_maps);
    CHECK(memcmp((void *)aux, "\177ELF", 4) == 0, "no ELF header at the vDSO");
    struct timespec v1, s, v2;
    CHECK_SYS(clock_gettime(CLOCK_MONOTONIC, &v1));
    CHECK_SYS(syscall(SYS_clock_gettime, CLOCK_MONOTONIC, &s));
    CHECK_SYS(clock_gettime(CLOCK_MONOTONIC, &v2));
    /* Ordered reads of one clock; 1 ms slack only for rounding. */
    CHECK(ts_sec(v1) <= ts_sec(s) + 1e-3 && ts_sec(s) <= ts_sec(v2) + 1e-3,
          "vDSO and syscall clocks disagree: %.9f %.9f %.9f",
          ts_sec(v1), ts_sec(s), ts_sec(v2));
    CHECK(ts_sec(v2) >= wl_deadline, "monotonic clock went backwards");
    struct timespec rv, rs;
    CHECK_SYS(clock_gettime(CLOCK_REALTIME, &rv));
    CHECK_SYS(syscall(SYS_clock_gettime, CLOCK_REALTIME, &rs));
    CHECK(ts_sec(rs) - ts_sec(rv) > -1e-3 && ts_sec(rs) - ts_sec(rv) < 5.0,
          "realtime vDSO %.6f vs syscall %.6f", ts_sec(rv), ts_sec(rs));

    wl_say("generations %llu", (unsigned long long)gen);
}

int main(int argc, char **argv)
{
    wl_init("mem");
    double secs = wl_secs(2.0);
    long mib = argc > 1 ? strtol(argv[1], NULL, 10) : 64;
    CHECK(mib > 0 && mib <= 65536, "bad size %s MiB", argv[1]);

    /* anon */
    size_t anon_words = (size_t)mib << 17;
    add_pages(map_anon(anon_words * 8), anon_words, R_ANON);

    /* small heap blocks of assorted sizes, 16..1032 bytes */
    for (uint64_t i = 0; i < SMALL_BLOCKS; i++) {
        size_t words = 2 + (size_t)(wl_mix(i) % 128);
        uint64_t *b = malloc(words * 8);
        CHECK(b, "malloc");
        add_unit(b, words, R_SMALL, i);
    }
    /* one large block: above the mmap threshold, so glibc mmaps it */
    size_t large_words = 8 << 17; /* 8 MiB */
    uint64_t *large = malloc(large_words * 8);
    CHECK(large, "malloc large");
    add_pages(large, large_words, R_LARGE);

    add_pages(g_data, sizeof g_data / 8, R_DATA);
    add_pages(g_bss, sizeof g_bss / 8, R_BSS);

    /* file mappings */
    char priv_path[4096], shared_path[4096];
    snprintf(priv_path, sizeof priv_path, "%s/ferry-mem-%d-private.dat", wl_tmpdir(), getpid());
    snprintf(shared_path, sizeof shared_path, "%s/ferry-mem-%d-shared.dat", wl_tmpdir(), getpid());
    priv_fd = make_file(priv_path, PRIV_PAGES);
    shared_fd = make_file(shared_path, SHARED_PAGES);
    priv_map = mmap(NULL, PRIV_PAGES * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE, priv_fd, 0);
    CHECK(priv_map != MAP_FAILED, "mmap private: %s", strerror(errno));
    shared_map = mmap(NULL, SHARED_PAGES * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, shared_fd, 0);
    CHECK(shared_map != MAP_FAILED, "mmap shared: %s", strerror(errno));
    /* Only even pages of the private mapping are written (copy-on-write);
     * odd pages keep reading through to the file. */
    for (size_t i = 0; i < PRIV_PAGES; i += 2)
        add_unit(priv_map + i * WPP, WPP, R_PRIVATE, i);
    for (size_t i = 0; i < SHARED_PAGES; i++)
        shared_fill(shared_map + i * WPP, i, 1);

    protnone = map_anon(PROTNONE_PAGES * PAGE);
    for (size_t i = 0; i < PROTNONE_PAGES; i++)
        fill(protnone + i * WPP, WPP, R_PROT_NONE, i, 1);
    CHECK_SYS(mprotect(protnone, PROTNONE_PAGES * PAGE, PROT_NONE));

    ro = map_anon(RO_PAGES * PAGE);
    for (size_t i = 0; i < RO_PAGES; i++)
        fill(ro + i * WPP, WPP, R_RO, i, 1);
    CHECK_SYS(mprotect(ro, RO_PAGES * PAGE, PROT_READ));

    untouched = map_anon(UNTOUCHED_PAGES * PAGE);

    /* Fault the pages in with non-zero data, then overwrite with zeros:
     * present pages whose contents are zero (a checkpointer may store them
     * as "zero", and must restore them as zero). */
    zeroed = map_anon(ZEROED_PAGES * PAGE);
    memset(zeroed, 0xa5, ZEROED_PAGES * PAGE);
    __asm__ volatile("" ::: "memory"); /* keep the first memset */
    memset(zeroed, 0, ZEROED_PAGES * PAGE);

    run(secs);

    if (!wl_keep_files()) {
        unlink(priv_path);
        unlink(shared_path);
    }
    wl_pass();
}
