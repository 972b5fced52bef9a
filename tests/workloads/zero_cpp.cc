/*
 * zero_cpp.cc - C++ allocation through every operator new/delete variant,
 * from several threads; the C++ workload for crates/ferry-zero (the
 * LD_PRELOAD library that scrubs freed heap memory). It must PASS with and
 * without the library. Build: g++ -O2 -g -pthread -o zero_cpp zero_cpp.cc
 *
 * Each of three threads repeats, until the deadline, a round of:
 *  - new/delete of objects of 24 B .. 1 MiB (sized delete: _ZdlPvm),
 *  - new[]/delete[] of trivially destructible (_ZdaPv / _ZdaPvm) and of
 *    non-trivial elements (array cookie; destructor count checked),
 *  - over-aligned objects and arrays (alignas 64 and 4096: the
 *    align_val_t variants, sized and unsized),
 *  - nothrow new, and explicit calls of every operator delete variant
 *    (nothrow ones included) on memory from the matching operator new,
 *  - std::vector growth by push_back (capacity doubling: a chain of
 *    new/copy/delete up to 8 MiB) and std::string growth by append,
 *  - a std::map and a std::unordered_map filled and erased,
 * verifying every value it wrote before the memory is given back, and
 * keeping a running checksum that is compared with a closed form at the
 * end. The statistics line of ferry-zero is printed before PASS when the
 * library is loaded.
 */
#include "common.h"

#include <dlfcn.h>
#include <pthread.h>

#include <atomic>
#include <cstdint>
#include <map>
#include <new>
#include <string>
#include <unordered_map>
#include <vector>

namespace {

std::atomic<long> live_tracked{0};

struct Tracked {
    uint64_t v;
    uint64_t check;
    Tracked() : v(0), check(~0ull) { live_tracked.fetch_add(1, std::memory_order_relaxed); }
    ~Tracked()
    {
        if (check != ~v)
            wl_fail("Tracked destroyed with a bad value");
        live_tracked.fetch_sub(1, std::memory_order_relaxed);
    }
};

struct alignas(64) Line64 {
    uint64_t w[8];
};

struct alignas(4096) Page {
    uint64_t w[512 + 8]; /* a bit more than a page: sizeof == 8192 */
};

template <size_t N> struct Blob {
    uint64_t w[N / 8];
};

/* Keeps the optimiser from eliding new/delete pairs. */
template <typename T> T *escape(T *p)
{
    __asm__ volatile("" : : "r"(p) : "memory");
    return p;
}

void fill(uint64_t *w, size_t n, uint64_t seed)
{
    for (size_t i = 0; i < n; i++)
        w[i] = wl_mix(seed + i);
}

void verify(const uint64_t *w, size_t n, uint64_t seed, const char *what)
{
    for (size_t i = 0; i < n; i++)
        if (w[i] != wl_mix(seed + i))
            wl_fail("%s: word %zu of %zu differs", what, i, n);
}

template <size_t N> void one_blob(uint64_t seed)
{
    Blob<N> *b = escape(new Blob<N>);
    fill(b->w, N / 8, seed);
    verify(b->w, N / 8, seed, "new/delete blob");
    delete b; /* sized: operator delete(void*, size_t) */
}

struct Worker {
    int id;
    pthread_t thread;
    uint64_t rounds = 0;
    uint64_t sum = 0; /* sum of checked vector/string lengths */
};

void round_of(Worker &w)
{
    uint64_t seed = wl_mix(((uint64_t)w.id << 40) ^ w.rounds);

    one_blob<24>(seed);
    one_blob<256>(seed + 1);
    one_blob<4096>(seed + 2);
    one_blob<65536>(seed + 3);
    one_blob<(1 << 20)>(seed + 4);

    /* new[] / delete[] of a trivial type: no cookie. */
    size_t n = 16 + (size_t)(seed % 200000);
    uint64_t *a = escape(new uint64_t[n]);
    fill(a, n, seed);
    verify(a, n, seed, "new[] array");
    delete[] a;

    /* Non-trivial elements: cookie, sized delete[]. */
    size_t nt = 1 + (size_t)(seed % 5000);
    Tracked *t = escape(new Tracked[nt]);
    for (size_t i = 0; i < nt; i++) {
        t[i].v = seed + i;
        t[i].check = ~(seed + i);
    }
    delete[] t;
    if (live_tracked.load() < 0)
        wl_fail("negative Tracked count");

    /* Over-aligned objects and arrays. */
    Line64 *l = escape(new Line64);
    CHECK(((uintptr_t)l & 63) == 0, "Line64 misaligned");
    fill(l->w, 8, seed);
    verify(l->w, 8, seed, "Line64");
    delete l; /* sized aligned */
    Page *pg = escape(new Page[3]);
    CHECK(((uintptr_t)pg & 4095) == 0, "Page[] misaligned");
    fill(pg[2].w, 520, seed);
    verify(pg[2].w, 520, seed, "Page[]");
    delete[] pg; /* sized aligned array */

    /* nothrow new and explicit calls of every delete variant. */
    uint64_t *nt1 = escape(new (std::nothrow) uint64_t[1000]);
    CHECK(nt1, "nothrow new[] failed");
    fill(nt1, 1000, seed);
    verify(nt1, 1000, seed, "nothrow new[]");
    delete[] nt1;
    const std::align_val_t al{256};
    void *p;
    p = escape(::operator new(5000));
    ::operator delete(p);
    p = escape(::operator new[](5000));
    ::operator delete[](p);
    p = escape(::operator new(5000));
    ::operator delete(p, (size_t)5000);
    p = escape(::operator new[](5000));
    ::operator delete[](p, (size_t)5000);
    p = escape(::operator new(5000, al));
    CHECK(((uintptr_t)p & 255) == 0, "aligned new misaligned");
    ::operator delete(p, al);
    p = escape(::operator new[](5000, al));
    ::operator delete[](p, al);
    p = escape(::operator new(5000, al));
    ::operator delete(p, (size_t)5000, al);
    p = escape(::operator new[](5000, al));
    ::operator delete[](p, (size_t)5000, al);
    p = escape(::operator new(5000, std::nothrow));
    CHECK(p, "nothrow new failed");
    ::operator delete(p, std::nothrow);
    p = escape(::operator new[](5000, std::nothrow));
    ::operator delete[](p, std::nothrow);
    p = escape(::operator new(5000, al, std::nothrow));
    ::operator delete(p, al, std::nothrow);
    p = escape(::operator new[](5000, al, std::nothrow));
    ::operator delete[](p, al, std::nothrow);

    /* std::vector growth: every reallocation copies and deletes the old
     * buffer. */
    size_t vn = 1 + (size_t)(seed % (1u << 20));
    std::vector<uint64_t> v;
    for (size_t i = 0; i < vn; i++)
        v.push_back(wl_mix(seed ^ i));
    for (size_t i = 0; i < vn; i++)
        if (v[i] != wl_mix(seed ^ i))
            wl_fail("vector element %zu of %zu differs", i, vn);
    v.resize(vn / 3);
    v.shrink_to_fit();
    for (size_t i = 0; i < v.size(); i++)
        if (v[i] != wl_mix(seed ^ i))
            wl_fail("vector element %zu differs after shrink_to_fit", i);
    w.sum += vn;

    /* std::string growth. */
    std::string s;
    size_t sn = 1 + (size_t)(seed % 300000);
    for (size_t i = 0; i < sn; i++)
        s += (char)('a' + (wl_mix(seed + i) % 26));
    CHECK(s.size() == sn, "string size");
    for (size_t i = 0; i < sn; i++)
        if (s[i] != (char)('a' + (wl_mix(seed + i) % 26)))
            wl_fail("string char %zu of %zu differs", i, sn);
    std::string s2 = s.substr(sn / 2);
    s.clear();
    s.shrink_to_fit();
    CHECK(s2.size() == sn - sn / 2, "substr size");
    w.sum += sn;

    /* Node containers: many small new/delete. */
    std::map<uint64_t, std::string> m;
    std::unordered_map<uint64_t, std::vector<int>> um;
    for (int i = 0; i < 500; i++) {
        m[wl_mix(seed + (uint64_t)i)] = std::string(40 + i % 100, (char)('A' + i % 26));
        um[(uint64_t)i].assign((size_t)(i % 50), i);
    }
    size_t total = 0;
    for (auto &kv : m)
        total += kv.second.size();
    for (auto &kv : um) {
        for (int x : kv.second)
            CHECK(x == (int)kv.first, "unordered_map value");
        total += kv.second.size();
    }
    size_t expect = 0;
    for (int i = 0; i < 500; i++)
        expect += (size_t)(40 + i % 100) + (size_t)(i % 50);
    CHECK(total == expect, "container sizes %zu != %zu", total, expect);

    w.rounds++;
}

volatile int stop_flag;

void *worker_main(void *arg)
{
    Worker &w = *static_cast<Worker *>(arg);
    while (!stop_flag)
        round_of(w);
    return nullptr;
}

} // namespace

int main()
{
    wl_init("zero_cpp");
    double secs = wl_secs(2);
    const int nthreads = 3;
    Worker workers[nthreads];
    for (int i = 0; i < nthreads; i++) {
        workers[i].id = i;
        round_of(workers[i]); /* one round before READY */
    }
    for (int i = 0; i < nthreads; i++)
        CHECK(pthread_create(&workers[i].thread, nullptr, worker_main, &workers[i]) == 0,
              "pthread_create");
    wl_ready(secs);
    while (!wl_time_up())
        wl_sleep(0.05);
    stop_flag = 1;
    uint64_t rounds = 0;
    for (int i = 0; i < nthreads; i++) {
        CHECK(pthread_join(workers[i].thread, nullptr) == 0, "pthread_join");
        rounds += workers[i].rounds;
        /* Closed form of the lengths checked by this worker's rounds. */
        uint64_t expect = 0;
        for (uint64_t r = 0; r < workers[i].rounds; r++) {
            uint64_t seed = wl_mix(((uint64_t)i << 40) ^ r);
            expect += 1 + seed % (1u << 20);
            expect += 1 + seed % 300000;
        }
        CHECK(workers[i].sum == expect, "worker %d checksum %llu != %llu", i,
              (unsigned long long)workers[i].sum, (unsigned long long)expect);
    }
    CHECK(live_tracked.load() == 0, "%ld Tracked objects leaked", live_tracked.load());
    CHECK(rounds >= (uint64_t)nthreads, "only %llu rounds", (unsigned long long)rounds);
    wl_say("rounds %llu", (unsigned long long)rounds);

    auto stats = (size_t(*)(char *, size_t))dlsym(RTLD_DEFAULT, "ferry_zero_stats");
    if (stats) {
        char line[600];
        stats(line, sizeof line);
        line[strcspn(line, "\n")] = 0;
        wl_say("%s", line);
    }
    wl_pass();
}
