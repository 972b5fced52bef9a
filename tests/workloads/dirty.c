/*
 * dirty.c - a workload that writes the pages it is told to, for the
 * dirty-page tracker tests (crates/ferry/tests/track_uffd.rs).
 *
 * Not a self-verifying PASS/FAIL workload like the others in this folder:
 * it is driven line by line over stdin and answers each command with one
 * line starting with "ok" (or "bad ..."). Build: gcc -O2 -o dirty dirty.c
 *
 *   dirty [NPAGES]   maps a private anonymous region of NPAGES pages
 *                    (default 256, no THP), fills every page, prints
 *                    "READY <addr> <npages>" (addresses in hex)
 * Commands:
 *   w I J ...   write pages I, J, ... of the region       -> ok
 *   k I         read() 16 bytes from a pipe into page I (a write made by
 *               the kernel on the process's behalf; the bytes are the
 *               ones already there)                       -> ok
 *   R I         read page I only                          -> ok <byte>
 *   m N         map a new N-page region and fill it       -> ok <addr>
 *   r           mremap the region to a new address        -> ok <addr>
 *   u           munmap the second half of the region      -> ok <npages>
 *   d I N       madvise(MADV_DONTNEED) N pages from I     -> ok
 *   b N         map a big N-page region (no THP), fill it -> ok <addr>
 *   W K         write K pages spread evenly over it       -> ok <usecs>
 *   n N         map an N-page PROT_NONE area              -> ok <addr>
 *   P A N R     mprotect N pages at address A (hex) to R:
 *               0 none, 1 read, 3 read+write              -> ok
 *   y A         write one byte at address A (hex)         -> ok
 *   s           verify every page of the region against the process's
 *               own record of what it wrote               -> ok <checksum>
 *                                                          | bad <page>
 *   x           exit 0
 * Page I of the region holds, in its first 8 bytes, the number of writes
 * made to it so far plus I << 32, and the byte (I * 7 + writes) & 0xff
 * everywhere else; pages zapped with "d" read as zero and restart at 0.
 */
#define _GNU_SOURCE
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PG 4096UL

static char *region;
static size_t npages;
static uint64_t *writes; /* per page of the region, outside it */
static char *big;
static size_t big_pages;

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...)
{
	char line[256];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(line, sizeof line - 1, fmt, ap);
	va_end(ap);
	line[n++] = '\n';
	if (write(1, line, n) != n)
		exit(3);
}

static void fill(size_t i)
{
	char *p = region + i * PG;
	memset(p + 8, (int)((i * 7 + writes[i]) & 0xff), PG - 8);
	uint64_t head = writes[i] | ((uint64_t)i << 32);
	memcpy(p, &head, 8);
}

static char *map(size_t pages)
{
	char *p = mmap(NULL, pages * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED) {
		perror("mmap");
		exit(2);
	}
	madvise(p, pages * PG, MADV_NOHUGEPAGE);
	return p;
}

static double now_us(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

int main(int argc, char **argv)
{
	npages = argc > 1 ? strtoul(argv[1], NULL, 0) : 256;
	region = map(npages);
	writes = calloc(npages, sizeof *writes);
	for (size_t i = 0; i < npages; i++)
		fill(i);
	say("READY %lx %zu", (unsigned long)region, npages);
	int kp[2];
	if (pipe(kp))
		return 2;
	char line[4096];
	while (fgets(line, sizeof line, stdin)) {
		char *s = line + 1;
		char *end;
		switch (line[0]) {
		case 'w':
			for (;;) {
				unsigned long i = strtoul(s, &end, 0);
				if (end == s)
					break;
				s = end;
				if (i >= npages) {
					say("bad page %lu", i);
					goto next;
				}
				writes[i]++;
				fill(i);
			}
			say("ok");
			break;
		case 'k': {
			unsigned long i = strtoul(s, NULL, 0);
			if (i >= npages) {
				say("bad page %lu", i);
				break;
			}
			/* The pipe carries the bytes the page already holds at offset
			 * 100: the kernel writes the page, its contents stay valid. */
			char want[16];
			memset(want, (int)((i * 7 + writes[i]) & 0xff), sizeof want);
			if (write(kp[1], want, sizeof want) != sizeof want ||
			    read(kp[0], region + i * PG + 100, sizeof want) != sizeof want) {
				say("bad pipe");
				break;
			}
			say("ok");
			break;
		}
		case 'R': {
			unsigned long i = strtoul(s, NULL, 0);
			volatile char *p = region + (i % npages) * PG + 9;
			say("ok %d", *p & 0xff);
			break;
		}
		case 'm': {
			size_t n = strtoul(s, NULL, 0);
			char *p = map(n ? n : 16);
			for (size_t i = 0; i < (n ? n : 16); i++)
				p[i * PG] = 1;
			say("ok %lx", (unsigned long)p);
			break;
		}
		case 'r': {
			/* Reserve a destination, then move the region onto it. */
			char *dst = mmap(NULL, npages * PG, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
			char *p = mremap(region, npages * PG, npages * PG, MREMAP_MAYMOVE | MREMAP_FIXED, dst);
			if (p == MAP_FAILED) {
				say("bad mremap");
				break;
			}
			region = p;
			say("ok %lx", (unsigned long)p);
			break;
		}
		case 'u':
			munmap(region + npages / 2 * PG, (npages - npages / 2) * PG);
			npages /= 2;
			say("ok %zu", npages);
			break;
		case 'd': {
			unsigned long i = strtoul(s, &end, 0);
			unsigned long n = strtoul(end, NULL, 0);
			if (i + n > npages) {
				say("bad range");
				break;
			}
			madvise(region + i * PG, n * PG, MADV_DONTNEED);
			for (unsigned long j = i; j < i + n; j++)
				writes[j] = (uint64_t)-1; /* zero now */
			say("ok");
			break;
		}
		case 'b':
			big_pages = strtoul(s, NULL, 0);
			big = map(big_pages);
			for (size_t i = 0; i < big_pages; i++)
				big[i * PG] = 1;
			say("ok %lx", (unsigned long)big);
			break;
		case 'W': {
			size_t k = strtoul(s, NULL, 0);
			if (!big || !k || k > big_pages) {
				say("bad W");
				break;
			}
			size_t step = big_pages / k;
			double t0 = now_us();
			for (size_t j = 0; j < k; j++)
				big[j * step * PG] ^= 1;
			say("ok %.0f", now_us() - t0);
			break;
		}
		case 's': {
			uint64_t sum = 0;
			for (size_t i = 0; i < npages; i++) {
				const unsigned char *p = (const unsigned char *)region + i * PG;
				if (writes[i] == (uint64_t)-1) {
					for (size_t b = 0; b < PG; b++)
						if (p[b]) {
							say("bad %zu (not zero)", i);
							goto next;
						}
					continue;
				}
				uint64_t head;
				memcpy(&head, p, 8);
				unsigned char want = (unsigned char)((i * 7 + writes[i]) & 0xff);
				if (head != (writes[i] | ((uint64_t)i << 32))) {
					say("bad %zu (head)", i);
					goto next;
				}
				for (size_t b = 8; b < PG; b++)
					if (p[b] != want) {
						say("bad %zu (byte %zu)", i, b);
						goto next;
					}
				for (size_t b = 0; b < PG; b++)
					sum = sum * 31 + p[b];
			}
			say("ok %llx", (unsigned long long)sum);
			break;
		}
		case 'n': {
			size_t n = strtoul(s, NULL, 0);
			char *p = mmap(NULL, n * PG, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
			if (p == MAP_FAILED) {
				say("bad mmap");
				break;
			}
			say("ok %lx", (unsigned long)p);
			break;
		}
		case 'P': {
			unsigned long a = strtoul(s, &end, 16);
			unsigned long n = strtoul(end, &end, 0);
			int r = (int)strtol(end, NULL, 0);
			int prot = (r & 1 ? PROT_READ : 0) | (r & 2 ? PROT_WRITE : 0);
			if (mprotect((void *)a, n * PG, prot)) {
				say("bad mprotect");
				break;
			}
			say("ok");
			break;
		}
		case 'y': {
			volatile char *p = (char *)strtoul(s, NULL, 16);
			*p += 1;
			say("ok");
			break;
		}
		case 'x':
			return 0;
		default:
			say("bad command");
		}
next:;
	}
	return 0;
}
