/*
 * avx.c - register state across a checkpoint.
 *
 * Build: gcc -O2 -g -pthread -mavx2 -o avx avx.c
 *
 * The work is a sequence of ~100 ms "blocks".  Each block is one inline-asm
 * statement with no calls in it: it loads known values into the vector
 * registers, the opmask registers, ten general purpose registers and two x87
 * stack slots, then spins, incrementing a counter in rdx and decrementing one
 * in rcx, and every 256 iterations checks every one of those registers
 * against the values in memory.  A checkpoint almost always lands inside a
 * block, so a restore must bring back the full register file (GPRs, flags,
 * x87/SSE/AVX/AVX-512 XSAVE state) or the next check fails.
 *
 * Blocks alternate between two variants:
 *   - AVX2: ymm0-15 (VEX encoded);
 *   - AVX-512 (only if __builtin_cpu_supports("avx512f")): zmm0-31 at full
 *     width and k1-k7.
 * Every block uses new values, so a restore that reuses stale state fails.
 *
 * Before READY the process also switches MXCSR to round-up and the x87
 * control word to round-toward-zero / double precision; both are checked
 * in every block (from asm) and between blocks (from C, also by an actual
 * rounding-dependent division).
 */
#include "common.h"

#include <stddef.h>

/* Shared with the asm by fixed offsets (checked below). */
struct tab {
    uint64_t gpr[16];       /*   0: expected rbx, rsi, r8..r15 */
    uint64_t iters;         /* 128: iterations this block (multiple of 256) */
    uint64_t err;           /* 136: id of the check being made */
    uint32_t mxcsr_tmp;     /* 144 */
    uint16_t cw_tmp;        /* 148 */
    uint16_t pad0;          /* 150 */
    uint32_t mxcsr_want;    /* 152: MXCSR with the sticky flags masked out */
    uint32_t cw_want;       /* 156: x87 control word */
    uint64_t pad1[4];       /* 160 */
    uint16_t kmask[8];      /* 192: expected k0..k7 (k0 unused) */
    uint8_t pad2[48];       /* 208 */
    uint8_t vec[32][64] __attribute__((aligned(64))); /* 256: v0..v31 */
};
_Static_assert(offsetof(struct tab, iters) == 128, "layout");
_Static_assert(offsetof(struct tab, err) == 136, "layout");
_Static_assert(offsetof(struct tab, mxcsr_tmp) == 144, "layout");
_Static_assert(offsetof(struct tab, cw_tmp) == 148, "layout");
_Static_assert(offsetof(struct tab, mxcsr_want) == 152, "layout");
_Static_assert(offsetof(struct tab, cw_want) == 156, "layout");
_Static_assert(offsetof(struct tab, kmask) == 192, "layout");
_Static_assert(offsetof(struct tab, vec) == 256, "layout");

static struct tab tab __attribute__((aligned(64)));

/* MXCSR: default 0x1f80 (all exceptions masked, round to nearest) with the
 * rounding control set to round up (RC = 10b, bit 14). */
#define MXCSR_WANT 0x5f80u
#define MXCSR_FLAGS 0x3fu /* sticky exception flags, set by any FP op */
/* x87 CW: default 0x037f with PC = 10b (double) and RC = 11b (chop). */
#define CW_WANT 0x0e7fu

/* Check ids, reported as "check N failed". */
static const char *check_name(uint64_t id)
{
    static char buf[64];
    static const char *gpr[] = {"rbx", "rsi", "r8", "r9", "r10", "r11",
                                "r12", "r13", "r14", "r15"};
    if (id < 10)
        return gpr[id];
    if (id == 10)
        return "rdx+rcx counters";
    if (id == 11)
        return "rdx final count";
    if (id == 12)
        return "MXCSR";
    if (id == 13)
        return "x87 control word";
    if (id == 14)
        return "x87 stack st(0)/st(1)";
    if (id >= 100 && id < 132) {
        snprintf(buf, sizeof buf, "vector register %llu", (unsigned long long)(id - 100));
        return buf;
    }
    if (id >= 200 && id < 208) {
        snprintf(buf, sizeof buf, "k%llu", (unsigned long long)(id - 200));
        return buf;
    }
    return "?";
}

#define STR_(x) #x
#define STR(x) STR_(x)
#define VOFF(n) (256 + 64 * n)
#define KOFF(n) (192 + 2 * n)

/* Sets the id of the check about to be made (for the error message). */
#define SET_ID(id) "movq $" STR(id) ", 136(%%rdi)\n\t"

/* ---- pieces shared by both variants ---- */
#define GPR_LOAD                                                             \
    "mov 0(%%rdi), %%rbx\n\t"                                                \
    "mov 8(%%rdi), %%rsi\n\t"                                                \
    "mov 16(%%rdi), %%r8\n\t"                                                \
    "mov 24(%%rdi), %%r9\n\t"                                                \
    "mov 32(%%rdi), %%r10\n\t"                                               \
    "mov 40(%%rdi), %%r11\n\t"                                               \
    "mov 48(%%rdi), %%r12\n\t"                                               \
    "mov 56(%%rdi), %%r13\n\t"                                               \
    "mov 64(%%rdi), %%r14\n\t"                                               \
    "mov 72(%%rdi), %%r15\n\t"

#define GPR_CHECK1(id, reg) SET_ID(id) "cmp " STR(8 * id) "(%%rdi), %%" reg "\n\t" "jne 9f\n\t"
#define GPR_CHECK                                                            \
    GPR_CHECK1(0, "rbx") GPR_CHECK1(1, "rsi") GPR_CHECK1(2, "r8")            \
    GPR_CHECK1(3, "r9") GPR_CHECK1(4, "r10") GPR_CHECK1(5, "r11")            \
    GPR_CHECK1(6, "r12") GPR_CHECK1(7, "r13") GPR_CHECK1(8, "r14")           \
    GPR_CHECK1(9, "r15")                                                     \
    /* the two counters always add up to the block's iteration count */     \
    SET_ID(10)                                                               \
    "lea (%%rdx,%%rcx), %%rax\n\t"                                           \
    "cmp 128(%%rdi), %%rax\n\t"                                              \
    "jne 9f\n\t"

#define CTRL_CHECK                                                           \
    SET_ID(12)                                                               \
    "stmxcsr 144(%%rdi)\n\t"                                                 \
    "mov 144(%%rdi), %%eax\n\t"                                              \
    "and $~" STR(MXCSR_FLAGS) ", %%eax\n\t"                                  \
    "cmp 152(%%rdi), %%eax\n\t"                                              \
    "jne 9f\n\t"                                                             \
    SET_ID(13)                                                               \
    "fnstcw 148(%%rdi)\n\t"                                                  \
    "movzwl 148(%%rdi), %%eax\n\t"                                           \
    "cmp 156(%%rdi), %%eax\n\t"                                              \
    "jne 9f\n\t"

/* Loop head: counters, x87 slots (st0 = pi, st1 = 1). */
#define LOOP_START                                                           \
    "mov 128(%%rdi), %%rcx\n\t"                                              \
    "xor %%edx, %%edx\n\t"                                                   \
    "fld1\n\t"                                                               \
    "fldpi\n\t"                                                              \
    "1:\n\t"                                                                 \
    "inc %%rdx\n\t"                                                          \
    "dec %%rcx\n\t"                                                          \
    "test $0xff, %%cl\n\t" /* full check every 256 iterations */             \
    "jnz 1b\n\t"

/* Loop tail and the end-of-block checks.  Every "jne 9f" is taken with two
 * values on the x87 stack, which label 9 pops. */
#define LOOP_END                                                             \
    "test %%rcx, %%rcx\n\t"                                                  \
    "jnz 1b\n\t"                                                             \
    SET_ID(11)                                                               \
    "cmp 128(%%rdi), %%rdx\n\t"                                              \
    "jne 9f\n\t"                                                             \
    SET_ID(14)                                                               \
    "fld1\n\t"                                                               \
    "fucomip %%st(2), %%st\n\t" /* 1 == st(1)? pops the new 1 */             \
    "jne 9f\n\t"                                                             \
    "jp 9f\n\t"                                                              \
    "fldpi\n\t"                                                              \
    "fucomip %%st(1), %%st\n\t" /* pi == st(0)? */                           \
    "jne 9f\n\t"                                                             \
    "jp 9f\n\t"                                                              \
    "fstp %%st(0)\n\t"                                                       \
    "fstp %%st(0)\n\t"                                                       \
    "xor %%eax, %%eax\n\t"                                                   \
    "jmp 8f\n\t"                                                             \
    "9:\n\t"                                                                 \
    "fstp %%st(0)\n\t"                                                       \
    "fstp %%st(0)\n\t"                                                       \
    "mov $1, %%eax\n\t"                                                      \
    "8:\n\t"

/* ---- AVX2 variant: ymm0-15 ---- */
#define Y_LOAD(n) "vmovdqu " STR(VOFF(n)) "(%%rdi), %%ymm" #n "\n\t"
/* x ^= want leaves 0 iff x == want; vptest sets ZF iff all zero; the second
 * xor restores x.  No scratch vector register is needed. */
#define Y_CHECK(n)                                                           \
    SET_ID(100 + n)                                                          \
    "vpxor " STR(VOFF(n)) "(%%rdi), %%ymm" #n ", %%ymm" #n "\n\t"            \
    "vptest %%ymm" #n ", %%ymm" #n "\n\t"                                    \
    "jnz 9f\n\t"                                                             \
    "vpxor " STR(VOFF(n)) "(%%rdi), %%ymm" #n ", %%ymm" #n "\n\t"
#define Y_ALL(M) M(0) M(1) M(2) M(3) M(4) M(5) M(6) M(7) M(8) M(9) M(10)     \
    M(11) M(12) M(13) M(14) M(15)

__attribute__((noinline, target("avx2")))
static int block_avx2(struct tab *t)
{
    int fail;
    __asm__ volatile(
        GPR_LOAD
        Y_ALL(Y_LOAD)
        LOOP_START
        GPR_CHECK
        CTRL_CHECK
        Y_ALL(Y_CHECK)
        LOOP_END
        : "=a"(fail)
        : "D"(t)
        : "rbx", "rcx", "rdx", "rsi", "r8", "r9", "r10", "r11", "r12", "r13",
          "r14", "r15", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5",
          "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13",
          "xmm14", "xmm15", "st", "st(1)", "memory", "cc");
    return fail;
}

/* ---- AVX-512 variant: zmm0-31, k1-k7 ---- */
#define Z_LOAD(n) "vmovdqu64 " STR(VOFF(n)) "(%%rdi), %%zmm" #n "\n\t"
/* Same xor trick; vptestmq + kortestw (k0 as the only scratch) for ZF. */
#define Z_CHECK(n)                                                           \
    SET_ID(100 + n)                                                          \
    "vpxorq " STR(VOFF(n)) "(%%rdi), %%zmm" #n ", %%zmm" #n "\n\t"           \
    "vptestmq %%zmm" #n ", %%zmm" #n ", %%k0\n\t"                            \
    "kortestw %%k0, %%k0\n\t"                                                \
    "jnz 9f\n\t"                                                             \
    "vpxorq " STR(VOFF(n)) "(%%rdi), %%zmm" #n ", %%zmm" #n "\n\t"
#define Z_ALL(M) Y_ALL(M) M(16) M(17) M(18) M(19) M(20) M(21) M(22) M(23)    \
    M(24) M(25) M(26) M(27) M(28) M(29) M(30) M(31)
#define K_LOAD(n) "kmovw " STR(KOFF(n)) "(%%rdi), %%k" #n "\n\t"
#define K_CHECK(n)                                                           \
    SET_ID(200 + n)                                                          \
    "kmovw %%k" #n ", %%eax\n\t"                                             \
    "cmp " STR(KOFF(n)) "(%%rdi), %%ax\n\t"                                  \
    "jne 9f\n\t"
#define K_ALL(M) M(1) M(2) M(3) M(4) M(5) M(6) M(7)

__attribute__((noinline, target("avx512f")))
static int block_avx512(struct tab *t)
{
    int fail;
    __asm__ volatile(
        GPR_LOAD
        Z_ALL(Z_LOAD)
        K_ALL(K_LOAD)
        LOOP_START
        GPR_CHECK
        CTRL_CHECK
        K_ALL(K_CHECK)
        Z_ALL(Z_CHECK)
        LOOP_END
        : "=a"(fail)
        : "D"(t)
        : "rbx", "rcx", "rdx", "rsi", "r8", "r9", "r10", "r11", "r12", "r13",
          "r14", "r15", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5",
          "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13",
          "xmm14", "xmm15", "xmm16", "xmm17", "xmm18", "xmm19", "xmm20",
          "xmm21", "xmm22", "xmm23", "xmm24", "xmm25", "xmm26", "xmm27",
          "xmm28", "xmm29", "xmm30", "xmm31", "k0", "k1", "k2", "k3", "k4",
          "k5", "k6", "k7", "st", "st(1)", "memory", "cc");
    return fail;
}

/* New expected values for block number b. */
static void prepare(uint64_t b, uint64_t iters)
{
    for (int i = 0; i < 16; i++)
        tab.gpr[i] = wl_mix(b << 8 | (uint64_t)i);
    for (int r = 0; r < 32; r++)
        for (int l = 0; l < 8; l++) {
            uint64_t v = wl_mix(b << 16 | (uint64_t)r << 8 | (uint64_t)l) | 1;
            memcpy(&tab.vec[r][8 * l], &v, 8);
        }
    for (int k = 0; k < 8; k++)
        tab.kmask[k] = (uint16_t)(wl_mix(b << 8 | 0x80 | (uint64_t)k) | 1);
    tab.iters = iters;
    tab.err = 0;
    tab.mxcsr_want = MXCSR_WANT;
    tab.cw_want = CW_WANT;
}

static uint32_t get_mxcsr(void)
{
    uint32_t m;
    __asm__ volatile("stmxcsr %0" : "=m"(m));
    return m;
}

static uint16_t get_cw(void)
{
    uint16_t cw;
    __asm__ volatile("fnstcw %0" : "=m"(cw));
    return cw;
}

/* The control registers, read back and exercised from C. */
static void check_controls(const char *when)
{
    uint32_t m = get_mxcsr() & ~MXCSR_FLAGS;
    CHECK(m == MXCSR_WANT, "%s: MXCSR %#x, want %#x", when, m, MXCSR_WANT);
    uint16_t cw = get_cw();
    CHECK(cw == CW_WANT, "%s: x87 control word %#x, want %#x", when, cw, CW_WANT);
    /* Under round-to-nearest x/3 and -((-x)/3) are equal; under round-up
     * the first rounds away from zero and the second towards it.  (The
     * operands are volatile: gcc would otherwise fold -(-1/3) into 1/3.) */
    volatile double one = 1.0, minus_one = -1.0, three = 3.0;
    double up = one / three, down = -(minus_one / three);
    CHECK(up > down, "%s: SSE division does not round up (%a vs %a)", when, up, down);
}

int main(void)
{
    wl_init("avx");
    double secs = wl_secs(2.0);
    __builtin_cpu_init();
    CHECK(__builtin_cpu_supports("avx2"), "CPU lacks AVX2");
    int have512 = __builtin_cpu_supports("avx512f");

    uint32_t mxcsr = MXCSR_WANT;
    __asm__ volatile("ldmxcsr %0" : : "m"(mxcsr));
    uint16_t cw = CW_WANT;
    __asm__ volatile("fldcw %0" : : "m"(cw));
    check_controls("before READY");

    /* Calibrate the block length to ~100 ms. */
    uint64_t iters = 1u << 20, b = 0;
    for (int i = 0; i < 2; i++) {
        prepare(++b, iters);
        double t0 = wl_now();
        CHECK(block_avx2(&tab) == 0, "calibration: %s", check_name(tab.err));
        double dt = wl_now() - t0;
        double want = (double)iters * 0.1 / (dt > 1e-4 ? dt : 1e-4);
        if (want < 65536)
            want = 65536;
        if (want > 4e9)
            want = 4e9;
        iters = (uint64_t)want & ~(uint64_t)255;
    }

    wl_ready(secs);
    uint64_t blocks = 0, blocks512 = 0;
    do {
        int wide = have512 && (b & 1);
        prepare(++b, iters);
        int fail = wide ? block_avx512(&tab) : block_avx2(&tab);
        CHECK(!fail, "%s block %llu: check of %s failed",
              wide ? "AVX-512" : "AVX2", (unsigned long long)b, check_name(tab.err));
        check_controls("between blocks");
        blocks++;
        blocks512 += wide;
    } while (!wl_time_up());

    check_controls("at the end");
    wl_say("blocks %llu (AVX-512 %llu, %llu iterations each)",
           (unsigned long long)blocks, (unsigned long long)blocks512,
           (unsigned long long)iters);
    wl_pass();
}
