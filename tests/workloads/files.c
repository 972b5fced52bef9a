/*
 * files.c - file descriptors and per-process file system state.
 *
 * Works in a fresh directory $FERRY_TEST_TMP/ferry-files-PID (also the
 * cwd).  Before READY it sets up:
 *   fd_rw      rw.dat, O_RDWR, offset in the middle of the file
 *   fd_app     append.log, O_WRONLY|O_APPEND
 *   fd_dupA/B  dup.dat and dup(): one open file description, one offset
 *   fd_t1/t2   twice.dat opened twice: two descriptions, two offsets
 *   fd_ghost   ghost.dat written, then unlinked while open (nlink 0)
 *   fd_null    /dev/null
 *   pipe       both ends held, PIPE_BYTES buffered in it, read end O_NONBLOCK
 *   fd_cloexec a file opened with O_CLOEXEC
 *   fd 100     high.dat, moved up with dup2
 *   umask 027, RLIMIT_NOFILE soft limit lowered to 200, comm "ferry-files"
 * and records /proc/self/exe.  While working it checks offsets, flags and
 * the identity (dev/ino) of every fd, moving offsets and writing.  The
 * final phase reads back the ghost file and the pipe contents, appends to
 * the O_APPEND file and checks umask, rlimit, comm, cwd and exe.
 *
 * Named files keep their size and contents after READY: rw.dat and dup.dat
 * are only ever rewritten with the bytes they already hold, and the
 * append test truncates the file back.  A --leave-running image can then
 * be restored after the original exited, and a restorer that checks file
 * sizes still accepts it.
 */
#include "common.h"

#include <dirent.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>

#define FILE_SIZE 65536
#define RW_OFF 20000
#define T1_OFF 100
#define T2_OFF 5000
#define GHOST_SIZE 10000
#define GHOST_OFF 1234
#define PIPE_BYTES 3000
#define APP_RECORDS 10
#define REC_LEN 16
#define HIGH_FD 100
#define NOFILE_SOFT 200

/* Byte k of a named file with seed s: fixed forever. */
static unsigned char fbyte(unsigned s, off_t k)
{
    return (unsigned char)(wl_mix((uint64_t)s << 40 ^ (uint64_t)k) >> 17);
}

enum { S_RW = 1, S_DUP, S_TWICE, S_GHOST, S_PIPE, S_HIGH, S_CLOEXEC };

static char dir[PATH_MAX];

static void write_full(int fd, const void *buf, size_t len, const char *what)
{
    const char *p = buf;
    while (len > 0) {
        ssize_t n = write(fd, p, len);
        if (n < 0 && errno == EINTR)
            continue;
        CHECK(n > 0, "write %s: %s", what, n < 0 ? strerror(errno) : "0 bytes");
        p += n;
        len -= (size_t)n;
    }
}

/* Creates `name` in cwd with `size` bytes of seed s and opens it with flags. */
static int make_file(const char *name, unsigned s, size_t size, int flags)
{
    int fd = open(name, O_RDWR | O_CREAT | O_TRUNC, 0666);
    CHECK(fd >= 0, "create %s: %s", name, strerror(errno));
    unsigned char *buf = malloc(size);
    CHECK(buf, "malloc");
    for (size_t k = 0; k < size; k++)
        buf[k] = fbyte(s, (off_t)k);
    write_full(fd, buf, size, name);
    free(buf);
    close(fd);
    fd = open(name, flags);
    CHECK(fd >= 0, "open %s: %s", name, strerror(errno));
    return fd;
}

static off_t pos(int fd)
{
    off_t o = lseek(fd, 0, SEEK_CUR);
    CHECK(o >= 0, "lseek(%d, 0, SEEK_CUR): %s", fd, strerror(errno));
    return o;
}

static void expect_pos(int fd, off_t want, const char *what)
{
    off_t o = pos(fd);
    CHECK(o == want, "%s (fd %d): offset %lld, want %lld", what, fd,
          (long long)o, (long long)want);
}

/* Reads n bytes at the current offset (moving it) and checks them. */
static void read_check(int fd, unsigned s, size_t n, const char *what)
{
    unsigned char buf[512];
    CHECK(n <= sizeof buf, "read_check too big");
    off_t at = pos(fd);
    ssize_t got = read(fd, buf, n);
    CHECK(got == (ssize_t)n, "read %s: %zd (%s)", what, got, got < 0 ? strerror(errno) : "short");
    for (size_t k = 0; k < n; k++)
        CHECK(buf[k] == fbyte(s, at + (off_t)k), "%s byte %lld is %#x, want %#x",
              what, (long long)(at + (off_t)k), buf[k], fbyte(s, at + (off_t)k));
}

/* Writes the bytes the file already holds at the current offset. */
static void rewrite_same(int fd, unsigned s, size_t n, const char *what)
{
    unsigned char buf[512];
    off_t at = pos(fd);
    for (size_t k = 0; k < n; k++)
        buf[k] = fbyte(s, at + (off_t)k);
    write_full(fd, buf, n, what);
}

static struct stat st_of(int fd, const char *what)
{
    struct stat st;
    CHECK(fstat(fd, &st) == 0, "fstat %s (fd %d): %s", what, fd, strerror(errno));
    return st;
}

/* The fd must refer to the file `name` (same dev and inode). */
static void expect_file(int fd, const char *name)
{
    struct stat a = st_of(fd, name), b;
    CHECK(stat(name, &b) == 0, "stat %s: %s", name, strerror(errno));
    CHECK(a.st_dev == b.st_dev && a.st_ino == b.st_ino,
          "fd %d is not %s (ino %llu vs %llu)", fd, name,
          (unsigned long long)a.st_ino, (unsigned long long)b.st_ino);
}

static void expect_flags(int fd, int want_fl, int want_fd, const char *what)
{
    int fl = fcntl(fd, F_GETFL);
    CHECK(fl >= 0, "F_GETFL %s (fd %d): %s", what, fd, strerror(errno));
    /* Compare the access mode and the flags we set; the kernel adds
     * O_LARGEFILE on 64-bit, which is not ours to check. */
    int mask = O_ACCMODE | O_APPEND | O_NONBLOCK;
    CHECK((fl & mask) == want_fl, "%s (fd %d): F_GETFL %#o, want %#o (of %#o)",
          what, fd, fl & mask, want_fl, mask);
    int fdf = fcntl(fd, F_GETFD);
    CHECK(fdf == want_fd, "%s (fd %d): F_GETFD %d, want %d", what, fd, fdf, want_fd);
}

static int cmp_int(const void *a, const void *b)
{
    return *(const int *)a - *(const int *)b;
}

/* Sorted list of open fds from /proc/self/fd (minus the one reading it). */
static int fd_set_now(int *out)
{
    DIR *d = opendir("/proc/self/fd");
    CHECK(d, "opendir /proc/self/fd: %s", strerror(errno));
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) && n < 1024) {
        if (e->d_name[0] == '.')
            continue;
        int fd = atoi(e->d_name);
        if (fd != dirfd(d))
            out[n++] = fd;
    }
    closedir(d);
    qsort(out, (size_t)n, sizeof *out, cmp_int);
    return n;
}

static int fds0[1024];

int main(void)
{
    wl_init("files");
    double secs = wl_secs(2.0);

    char exe0[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", exe0, sizeof exe0 - 1);
    CHECK(n > 0, "readlink /proc/self/exe: %s", strerror(errno));
    exe0[n] = 0;

    snprintf(dir, sizeof dir, "%s/ferry-files-%d", wl_tmpdir(), getpid());
    CHECK(mkdir(dir, 0700) == 0 || errno == EEXIST, "mkdir %s: %s", dir, strerror(errno));
    CHECK_SYS(chdir(dir));
    char cwd0[PATH_MAX];
    CHECK(getcwd(cwd0, sizeof cwd0), "getcwd: %s", strerror(errno));

    umask(027);

    int fd_rw = make_file("rw.dat", S_RW, FILE_SIZE, O_RDWR);
    CHECK_SYS(lseek(fd_rw, RW_OFF, SEEK_SET));

    int fd_app = open("append.log", O_WRONLY | O_CREAT | O_TRUNC | O_APPEND, 0666);
    CHECK(fd_app >= 0, "open append.log: %s", strerror(errno));
    for (int i = 0; i < APP_RECORDS; i++) {
        char rec[REC_LEN + 1];
        snprintf(rec, sizeof rec, "record %08d\n", i);
        write_full(fd_app, rec, REC_LEN, "append.log");
    }

    int fd_dupA = make_file("dup.dat", S_DUP, FILE_SIZE, O_RDWR);
    int fd_dupB = dup(fd_dupA);
    CHECK_SYS(fd_dupB);

    int fd_t1 = make_file("twice.dat", S_TWICE, FILE_SIZE, O_RDONLY);
    int fd_t2 = open("twice.dat", O_RDONLY);
    CHECK(fd_t2 >= 0, "open twice.dat: %s", strerror(errno));
    CHECK_SYS(lseek(fd_t1, T1_OFF, SEEK_SET));
    CHECK_SYS(lseek(fd_t2, T2_OFF, SEEK_SET));

    int fd_ghost = make_file("ghost.dat", S_GHOST, GHOST_SIZE, O_RDWR);
    CHECK_SYS(unlink("ghost.dat"));
    CHECK_SYS(lseek(fd_ghost, GHOST_OFF, SEEK_SET));

    int fd_null = open("/dev/null", O_WRONLY);
    CHECK_SYS(fd_null);

    int p[2];
    CHECK_SYS(pipe(p));
    {
        unsigned char buf[PIPE_BYTES];
        for (int k = 0; k < PIPE_BYTES; k++)
            buf[k] = fbyte(S_PIPE, k);
        write_full(p[1], buf, PIPE_BYTES, "pipe");
    }
    CHECK_SYS(fcntl(p[0], F_SETFL, O_NONBLOCK));

    int fd_cloexec = make_file("cloexec.dat", S_CLOEXEC, 4096, O_RDONLY | O_CLOEXEC);

    int fd_high0 = make_file("high.dat", S_HIGH, 4096, O_RDONLY);
    CHECK(dup2(fd_high0, HIGH_FD) == HIGH_FD, "dup2: %s", strerror(errno));
    close(fd_high0);

    struct rlimit rl;
    CHECK_SYS(getrlimit(RLIMIT_NOFILE, &rl));
    rlim_t hard0 = rl.rlim_max;
    CHECK(hard0 == RLIM_INFINITY || hard0 >= NOFILE_SOFT, "hard NOFILE %llu too low",
          (unsigned long long)hard0);
    rl.rlim_cur = NOFILE_SOFT;
    CHECK_SYS(setrlimit(RLIMIT_NOFILE, &rl));

    CHECK_SYS(prctl(PR_SET_NAME, "ferry-files", 0, 0, 0));

    struct stat st_null0 = st_of(fd_null, "/dev/null");
    int nfds0 = fd_set_now(fds0);

    wl_ready(secs);

    long rounds = 0;
    do {
        /* rw.dat: offset parked in the middle; read and rewrite around it. */
        expect_pos(fd_rw, RW_OFF, "rw.dat");
        read_check(fd_rw, S_RW, 100, "rw.dat");
        expect_pos(fd_rw, RW_OFF + 100, "rw.dat after read");
        rewrite_same(fd_rw, S_RW, 200, "rw.dat");
        expect_pos(fd_rw, RW_OFF + 300, "rw.dat after write");
        CHECK_SYS(lseek(fd_rw, RW_OFF, SEEK_SET));
        expect_flags(fd_rw, O_RDWR, 0, "rw.dat");
        expect_file(fd_rw, "rw.dat");

        /* append.log: flags only until the final phase (keeps its size). */
        expect_flags(fd_app, O_WRONLY | O_APPEND, 0, "append.log");
        expect_file(fd_app, "append.log");

        /* dup: one offset seen through both fds. */
        off_t base = 1000 + (rounds % 50) * 100;
        CHECK_SYS(lseek(fd_dupA, base, SEEK_SET));
        expect_pos(fd_dupB, base, "dup B after seeking A");
        rewrite_same(fd_dupA, S_DUP, 64, "dup.dat");
        expect_pos(fd_dupB, base + 64, "dup B after writing A");
        read_check(fd_dupB, S_DUP, 64, "dup.dat via B");
        expect_pos(fd_dupA, base + 128, "dup A after reading B");
        expect_file(fd_dupA, "dup.dat");
        expect_file(fd_dupB, "dup.dat");

        /* twice: independent offsets. */
        expect_pos(fd_t1, T1_OFF, "twice.dat #1");
        expect_pos(fd_t2, T2_OFF, "twice.dat #2");
        read_check(fd_t1, S_TWICE, 10, "twice.dat #1");
        expect_pos(fd_t2, T2_OFF, "twice.dat #2 after reading #1");
        CHECK_SYS(lseek(fd_t1, T1_OFF, SEEK_SET));
        struct stat a = st_of(fd_t1, "twice #1"), b = st_of(fd_t2, "twice #2");
        CHECK(a.st_ino == b.st_ino, "the two twice.dat fds differ in inode");

        /* ghost: still unlinked, offset kept. */
        expect_pos(fd_ghost, GHOST_OFF, "ghost.dat");
        struct stat g = st_of(fd_ghost, "ghost.dat");
        CHECK(g.st_nlink == 0, "ghost.dat has nlink %lu", (unsigned long)g.st_nlink);
        CHECK(g.st_size == GHOST_SIZE, "ghost.dat size %lld", (long long)g.st_size);

        /* /dev/null swallows everything. */
        CHECK(write(fd_null, "x", 1) == 1, "write /dev/null: %s", strerror(errno));

        /* fd flags. */
        expect_flags(fd_cloexec, O_RDONLY, FD_CLOEXEC, "cloexec.dat");
        expect_flags(HIGH_FD, O_RDONLY, 0, "fd 100");
        expect_file(HIGH_FD, "high.dat");
        expect_flags(p[0], O_RDONLY | O_NONBLOCK, 0, "pipe read end");
        expect_flags(p[1], O_WRONLY, 0, "pipe write end");

        rounds++;
        wl_sleep(0.005);
    } while (!wl_time_up());

    /* ---- final phase ---- */

    /* Ghost contents via read(), from the saved offset to the end. */
    {
        unsigned char buf[GHOST_SIZE];
        ssize_t got = read(fd_ghost, buf, sizeof buf);
        CHECK(got == GHOST_SIZE - GHOST_OFF, "read ghost.dat: %zd", got);
        for (ssize_t k = 0; k < got; k++)
            CHECK(buf[k] == fbyte(S_GHOST, GHOST_OFF + k), "ghost.dat byte %lld wrong",
                  (long long)(GHOST_OFF + k));
        got = pread(fd_ghost, buf, sizeof buf, 0);
        CHECK(got == GHOST_SIZE, "pread ghost.dat: %zd", got);
        for (ssize_t k = 0; k < got; k++)
            CHECK(buf[k] == fbyte(S_GHOST, k), "ghost.dat byte %lld wrong", (long long)k);
        /* Still writable, still unlinked. */
        CHECK(pwrite(fd_ghost, buf, 16, 0) == 16, "pwrite ghost.dat: %s", strerror(errno));
        CHECK(st_of(fd_ghost, "ghost.dat").st_nlink == 0, "ghost.dat got a link");
    }

    /* Pipe: exactly the buffered bytes, then empty (EAGAIN: O_NONBLOCK). */
    {
        struct stat s0 = st_of(p[0], "pipe read end"), s1 = st_of(p[1], "pipe write end");
        CHECK(S_ISFIFO(s0.st_mode) && s0.st_ino == s1.st_ino,
              "pipe ends are not one pipe (ino %llu / %llu)",
              (unsigned long long)s0.st_ino, (unsigned long long)s1.st_ino);
        struct pollfd pfd = {.fd = p[0], .events = POLLIN};
        CHECK(poll(&pfd, 1, 0) == 1 && (pfd.revents & POLLIN), "pipe not readable");
        unsigned char buf[PIPE_BYTES + 100];
        ssize_t got = read(p[0], buf, sizeof buf);
        CHECK(got == PIPE_BYTES, "pipe held %zd bytes, want %d", got, PIPE_BYTES);
        for (int k = 0; k < PIPE_BYTES; k++)
            CHECK(buf[k] == fbyte(S_PIPE, k), "pipe byte %d wrong", k);
        got = read(p[0], buf, sizeof buf);
        CHECK(got == -1 && errno == EAGAIN, "pipe not empty after reading it (%zd)", got);
        /* And the pipe still works end to end. */
        write_full(p[1], "ping", 4, "pipe");
        CHECK(read(p[0], buf, 8) == 4 && memcmp(buf, "ping", 4) == 0, "pipe round trip");
    }

    /* O_APPEND: a write goes to the end whatever the offset, then the file
     * is truncated back so its size never changes for good. */
    {
        struct stat s = st_of(fd_app, "append.log");
        CHECK(s.st_size == APP_RECORDS * REC_LEN, "append.log size %lld, want %d",
              (long long)s.st_size, APP_RECORDS * REC_LEN);
        CHECK_SYS(lseek(fd_app, 0, SEEK_SET));
        write_full(fd_app, "record appended\n", REC_LEN, "append.log");
        expect_pos(fd_app, s.st_size + REC_LEN, "append.log after append");
        CHECK(st_of(fd_app, "append.log").st_size == s.st_size + REC_LEN,
              "append did not grow append.log");
        int rd = open("append.log", O_RDONLY);
        CHECK(rd >= 0, "open append.log: %s", strerror(errno));
        char buf[REC_LEN];
        CHECK(pread(rd, buf, REC_LEN, s.st_size) == REC_LEN &&
                  memcmp(buf, "record appended\n", REC_LEN) == 0,
              "appended record not at the end");
        CHECK(pread(rd, buf, REC_LEN, 0) == REC_LEN && memcmp(buf, "record 00000000\n", REC_LEN) == 0,
              "append overwrote the start of append.log");
        close(rd);
        CHECK_SYS(ftruncate(fd_app, s.st_size));
    }

    /* /dev/null is still the null device. */
    {
        struct stat s = st_of(fd_null, "/dev/null");
        CHECK(S_ISCHR(s.st_mode) && s.st_rdev == makedev(1, 3) && s.st_rdev == st_null0.st_rdev,
              "fd %d is no longer /dev/null (rdev %u:%u)", fd_null,
              major(s.st_rdev), minor(s.st_rdev));
        expect_flags(fd_null, O_WRONLY, 0, "/dev/null");
    }

    /* Process state. */
    mode_t um = umask(0);
    umask(um);
    CHECK(um == 027, "umask %#o, want 027", (unsigned)um);

    CHECK_SYS(getrlimit(RLIMIT_NOFILE, &rl));
    CHECK(rl.rlim_cur == NOFILE_SOFT && rl.rlim_max == hard0,
          "RLIMIT_NOFILE %llu/%llu, want %d/%llu", (unsigned long long)rl.rlim_cur,
          (unsigned long long)rl.rlim_max, NOFILE_SOFT, (unsigned long long)hard0);

    char comm[17] = {0};
    CHECK_SYS(prctl(PR_GET_NAME, comm, 0, 0, 0));
    CHECK(strcmp(comm, "ferry-files") == 0, "comm is \"%s\"", comm);

    char cwd[PATH_MAX];
    CHECK(getcwd(cwd, sizeof cwd), "getcwd: %s", strerror(errno));
    CHECK(strcmp(cwd, cwd0) == 0, "cwd is %s, want %s", cwd, cwd0);
    struct stat here;
    CHECK(stat("rw.dat", &here) == 0, "rw.dat not found relative to cwd");

    char exe[PATH_MAX];
    n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    CHECK(n > 0, "readlink /proc/self/exe: %s", strerror(errno));
    exe[n] = 0;
    CHECK(strcmp(exe, exe0) == 0, "/proc/self/exe is %s, want %s", exe, exe0);

    /* umask applies to new files. */
    int um_fd = open("umask.chk", O_WRONLY | O_CREAT | O_TRUNC, 0666);
    CHECK(um_fd >= 0, "create umask.chk: %s", strerror(errno));
    CHECK((st_of(um_fd, "umask.chk").st_mode & 0777) == 0640,
          "new file has mode %#o under umask 027", st_of(um_fd, "umask.chk").st_mode & 0777);
    close(um_fd);
    unlink("umask.chk");

    /* Exactly the fds we had at READY: none lost, none leaked in (by a
     * restorer's helpers, say). */
    static int fds1[1024];
    int nfds1 = fd_set_now(fds1);
    CHECK(nfds1 == nfds0, "%d fds open, %d at READY", nfds1, nfds0);
    for (int i = 0; i < nfds0; i++)
        CHECK(fds0[i] == fds1[i], "fd %d open, %d at READY", fds1[i], fds0[i]);

    /* The lowered soft limit is enforced. */
    int probe = open("/dev/null", O_RDONLY);
    CHECK(probe >= 0, "open /dev/null: %s", strerror(errno));
    CHECK(dup2(probe, NOFILE_SOFT) == -1 && errno == EBADF,
          "dup2 to fd %d succeeded despite the lowered RLIMIT_NOFILE", NOFILE_SOFT);
    close(probe);

    wl_say("rounds %ld", rounds);
    if (!wl_keep_files()) {
        const char *names[] = {"rw.dat", "append.log", "dup.dat", "twice.dat",
                               "cloexec.dat", "high.dat"};
        for (size_t i = 0; i < sizeof names / sizeof *names; i++)
            unlink(names[i]);
        CHECK_SYS(chdir("/"));
        rmdir(dir);
    }
    wl_pass();
}
