/*
 * tree.c - a process tree: parent links, process groups, a zombie, pipes
 * between the processes with data in flight, all across a checkpoint.
 *
 *   root ──fork──> C     exits at once with status 7; root does not reap
 *    │                   it until the very end, so C is a zombie during the
 *    │                   whole working phase (checked with waitid(WNOWAIT))
 *    └──fork──> A ──fork──> B
 *               A and B form their own process group, led by A
 *
 * Pipes root->A, A->B and B->root form a ring.  The root keeps up to 8
 * numbered messages in flight (so the pipes usually hold data when a
 * checkpoint comes); A and B check each message's sequence number and
 * checksum, stamp it with their pid, getppid(), getpgrp(), getsid() and
 * their own message count, and pass it on.  The root checks every message
 * that comes back: in order, intact, A's parent is the root, B's parent is A,
 * both in process group A, same session as the root.  Every 100 ms the root
 * also checks getpgid(A) and getpgid(B) and that C is still an unreaped
 * zombie with exit status 7.
 *
 * After the deadline the root sends STOP round the ring; A stamps it and
 * forwards it, then reaps B (status must be 0) and exits 0; B stamps it,
 * passes it back to the root and exits 0.  The root checks the STOP
 * message's stamps and counts, reaps A (status 0) and C (status 7), checks
 * it has no other children and that its SIGCHLD handler ran (C's and A's
 * exits), then prints PASS tree.  Only the root prints PASS; A and B print
 * FAIL lines (as tree/A, tree/B) and exit 1 if their own checks fail.
 *
 * Every read is bounded (poll); a process whose neighbour dies gets EOF or
 * EPIPE (SIGPIPE is ignored) and fails instead of hanging.
 */
#include "common.h"

#include <poll.h>
#include <signal.h>
#include <sys/wait.h>

#define WINDOW 8
#define BOUND 30.0 /* seconds without progress before giving up */
#define MAGIC 0x7265e7u

enum { K_DATA = 1, K_STOP = 2 };

struct msg {
    uint32_t magic, kind;
    uint64_t seq, check;
    int32_t a_pid, a_ppid, a_pgrp, a_sid;
    int32_t b_pid, b_ppid, b_pgrp, b_sid;
    uint64_t a_count, b_count;
};

static volatile sig_atomic_t sigchld_count;

static void on_sigchld(int sig)
{
    (void)sig;
    sigchld_count++;
}

static void write_msg(int fd, const struct msg *m)
{
    const char *p = (const char *)m;
    size_t left = sizeof *m;
    while (left > 0) {
        ssize_t n = write(fd, p, left);
        if (n < 0) {
            CHECK(errno == EINTR, "write to pipe: %s", strerror(errno));
            continue;
        }
        p += n;
        left -= (size_t)n;
    }
}

/* Reads one whole message, waiting at most BOUND seconds. */
static void read_msg(int fd, struct msg *m)
{
    char *p = (char *)m;
    size_t got = 0;
    double end = wl_now() + BOUND;
    while (got < sizeof *m) {
        struct pollfd pfd = {.fd = fd, .events = POLLIN};
        int r = poll(&pfd, 1, 100);
        if (r < 0) {
            CHECK(errno == EINTR, "poll: %s", strerror(errno));
            continue;
        }
        if (r == 0) {
            CHECK(wl_now() < end, "no message for %.0f s (got %zu bytes)", BOUND, got);
            continue;
        }
        ssize_t n = read(fd, p + got, sizeof *m - got);
        if (n < 0) {
            CHECK(errno == EINTR || errno == EAGAIN, "read from pipe: %s",
                  strerror(errno));
            continue;
        }
        CHECK(n > 0, "pipe closed (neighbour died) after %zu bytes", got);
        got += (size_t)n;
    }
    CHECK(m->magic == MAGIC, "bad message magic %#x", m->magic);
    CHECK(m->check == wl_mix(m->seq ^ m->kind), "message %llu: bad checksum",
          (unsigned long long)m->seq);
}

/* waitpid(pid) bounded; returns the status. */
static int reap(pid_t pid, const char *what)
{
    double end = wl_now() + BOUND;
    for (;;) {
        int st;
        pid_t r = waitpid(pid, &st, WNOHANG);
        if (r == pid)
            return st;
        CHECK(r == 0 || (r < 0 && errno == EINTR), "waitpid(%s %d): %s", what, (int)pid,
              strerror(errno));
        CHECK(wl_now() < end, "%s (pid %d) did not exit", what, (int)pid);
        wl_sleep(0.002);
    }
}

static int exited_with(int st, int code)
{
    return WIFEXITED(st) && WEXITSTATUS(st) == code;
}

static void describe_status(int st, char *buf, size_t len)
{
    if (WIFEXITED(st))
        snprintf(buf, len, "exit status %d", WEXITSTATUS(st));
    else if (WIFSIGNALED(st))
        snprintf(buf, len, "killed by signal %d", WTERMSIG(st));
    else
        snprintf(buf, len, "wait status %#x", st);
}

/* B: reads from A, writes to the root. */
static void run_b(int in, int out, pid_t a_pid, pid_t sid)
{
    wl_init("tree/B");
    uint64_t count = 0;
    for (;;) {
        struct msg m;
        read_msg(in, &m);
        CHECK(getppid() == a_pid, "B's parent is %d, want A %d", (int)getppid(),
              (int)a_pid);
        CHECK(getpgrp() == a_pid, "B's process group is %d, want %d", (int)getpgrp(),
              (int)a_pid);
        CHECK(getsid(0) == sid, "B's session is %d, want %d", (int)getsid(0), (int)sid);
        if (m.kind == K_DATA) {
            count++;
            CHECK(m.seq == count, "B got message %llu, want %llu",
                  (unsigned long long)m.seq, (unsigned long long)count);
            CHECK(m.a_count == count, "A's count %llu at message %llu",
                  (unsigned long long)m.a_count, (unsigned long long)m.seq);
        } else {
            CHECK(m.kind == K_STOP, "B got message kind %u", m.kind);
            CHECK(m.seq == count + 1, "B got STOP %llu after %llu messages",
                  (unsigned long long)m.seq, (unsigned long long)count);
        }
        m.b_pid = getpid();
        m.b_ppid = getppid();
        m.b_pgrp = getpgrp();
        m.b_sid = getsid(0);
        m.b_count = count;
        write_msg(out, &m);
        if (m.kind == K_STOP)
            _exit(0);
    }
}

/* A: forks B, then reads from the root and writes to B. */
static void run_a(int in, int to_root, pid_t root, pid_t sid)
{
    wl_init("tree/A");
    pid_t me = getpid();
    CHECK_SYS(setpgid(0, 0));
    int ab[2];
    CHECK_SYS(pipe(ab));
    pid_t b = fork();
    CHECK_SYS(b);
    if (b == 0) {
        close(in);
        close(ab[1]);
        /* Either of these may run first; both are harmless if repeated. */
        setpgid(0, me);
        run_b(ab[0], to_root, me, sid);
    }
    setpgid(b, me);
    close(ab[0]);
    close(to_root);
    int out = ab[1];
    uint64_t count = 0;
    for (;;) {
        struct msg m;
        read_msg(in, &m);
        CHECK(getppid() == root, "A's parent is %d, want the root %d", (int)getppid(),
              (int)root);
        CHECK(getpgrp() == me, "A's process group is %d, want %d", (int)getpgrp(),
              (int)me);
        CHECK(getsid(0) == sid, "A's session is %d, want %d", (int)getsid(0), (int)sid);
        if (m.kind == K_DATA) {
            count++;
            CHECK(m.seq == count, "A got message %llu, want %llu",
                  (unsigned long long)m.seq, (unsigned long long)count);
        } else {
            CHECK(m.kind == K_STOP, "A got message kind %u", m.kind);
            CHECK(m.seq == count + 1, "A got STOP %llu after %llu messages",
                  (unsigned long long)m.seq, (unsigned long long)count);
        }
        m.a_pid = me;
        m.a_ppid = getppid();
        m.a_pgrp = getpgrp();
        m.a_sid = getsid(0);
        m.a_count = count;
        write_msg(out, &m);
        if (m.kind == K_STOP)
            break;
    }
    int st = reap(b, "B");
    char buf[64];
    describe_status(st, buf, sizeof buf);
    CHECK(exited_with(st, 0), "B ended with %s", buf);
    _exit(0);
}

static struct msg make_msg(uint32_t kind, uint64_t seq)
{
    struct msg m;
    memset(&m, 0, sizeof m);
    m.magic = MAGIC;
    m.kind = kind;
    m.seq = seq;
    m.check = wl_mix(seq ^ kind);
    return m;
}

/* C must still be an unreaped zombie that exited with 7. */
static void check_zombie(pid_t c)
{
    siginfo_t si;
    memset(&si, 0, sizeof si);
    int r = waitid(P_PID, (id_t)c, &si, WEXITED | WNOHANG | WNOWAIT);
    CHECK(r == 0, "waitid(C %d, WNOWAIT): %s", (int)c, strerror(errno));
    CHECK(si.si_pid == c, "C (pid %d) is not a zombie", (int)c);
    CHECK(si.si_code == CLD_EXITED && si.si_status == 7,
          "zombie C: code %d status %d, want exited 7", si.si_code, si.si_status);
}

int main(void)
{
    wl_init("tree");
    double secs = wl_secs(2.0);
    pid_t root = getpid(), sid = getsid(0), pgrp = getpgrp();
    signal(SIGPIPE, SIG_IGN);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_sigchld;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    CHECK_SYS(sigaction(SIGCHLD, &sa, NULL));

    pid_t c = fork();
    CHECK_SYS(c);
    if (c == 0)
        _exit(7);
    /* Wait (without reaping) until C is a zombie. */
    double end = wl_now() + BOUND;
    for (;;) {
        siginfo_t si;
        memset(&si, 0, sizeof si);
        CHECK_SYS(waitid(P_PID, (id_t)c, &si, WEXITED | WNOHANG | WNOWAIT));
        if (si.si_pid == c)
            break;
        CHECK(wl_now() < end, "C never exited");
        wl_sleep(0.001);
    }
    check_zombie(c);

    int ra[2], br[2];
    CHECK_SYS(pipe(ra));
    CHECK_SYS(pipe(br));
    pid_t a = fork();
    CHECK_SYS(a);
    if (a == 0) {
        close(ra[1]);
        close(br[0]);
        run_a(ra[0], br[1], root, sid);
    }
    setpgid(a, a);
    close(ra[0]);
    close(br[1]);
    int to_a = ra[1], from_b = br[0];

    /* One round trip to learn B's pid before READY. */
    uint64_t sent = 0, recvd = 0;
    pid_t b = 0;
    struct msg m = make_msg(K_DATA, ++sent);
    write_msg(to_a, &m);
    read_msg(from_b, &m);
    recvd++;
    b = m.b_pid;
    CHECK(b > 0 && b != a && b != root, "B reported pid %d", (int)b);

    wl_ready(secs);
    double last_check = 0;
    uint64_t sleeps = 0;
    for (;;) {
        int up = wl_time_up();
        while (!up && sent - recvd < WINDOW) {
            m = make_msg(K_DATA, ++sent);
            write_msg(to_a, &m);
        }
        if (up && recvd == sent)
            break;
        read_msg(from_b, &m);
        recvd++;
        CHECK(m.kind == K_DATA && m.seq == recvd, "root got message %llu kind %u, want %llu",
              (unsigned long long)m.seq, m.kind, (unsigned long long)recvd);
        CHECK(m.a_count == recvd && m.b_count == recvd, "message %llu: counts A %llu B %llu",
              (unsigned long long)recvd, (unsigned long long)m.a_count,
              (unsigned long long)m.b_count);
        CHECK(m.a_pid == a && m.b_pid == b, "message %llu went through %d and %d, want %d and %d",
              (unsigned long long)recvd, m.a_pid, m.b_pid, (int)a, (int)b);
        CHECK(m.a_ppid == root, "A's parent %d, want the root %d", m.a_ppid, (int)root);
        CHECK(m.b_ppid == a, "B's parent %d, want A %d", m.b_ppid, (int)a);
        CHECK(m.a_pgrp == a && m.b_pgrp == a, "process groups A %d B %d, want %d", m.a_pgrp,
              m.b_pgrp, (int)a);
        CHECK(m.a_sid == sid && m.b_sid == sid, "sessions A %d B %d, want %d", m.a_sid,
              m.b_sid, (int)sid);
        if (wl_now() - last_check >= 0.1) {
            check_zombie(c);
            CHECK(getpgid(a) == a, "getpgid(A) = %d, want %d", (int)getpgid(a), (int)a);
            CHECK(getpgid(b) == a, "getpgid(B) = %d, want %d", (int)getpgid(b), (int)a);
            CHECK(getpgrp() == pgrp, "root's process group changed to %d", (int)getpgrp());
            CHECK(getsid(0) == sid, "root's session changed to %d", (int)getsid(0));
            last_check = wl_now();
        }
        /* Now and then let the ring drain so A and B sleep in poll. */
        if (recvd % 64 == 0) {
            sleeps++;
            wl_sleep(0.001);
        }
    }

    m = make_msg(K_STOP, ++sent);
    write_msg(to_a, &m);
    read_msg(from_b, &m);
    CHECK(m.kind == K_STOP && m.seq == sent, "root got message %llu kind %u, want STOP %llu",
          (unsigned long long)m.seq, m.kind, (unsigned long long)sent);
    CHECK(m.a_count == recvd && m.b_count == recvd, "STOP: counts A %llu B %llu, want %llu",
          (unsigned long long)m.a_count, (unsigned long long)m.b_count,
          (unsigned long long)recvd);
    CHECK(m.a_pid == a && m.a_ppid == root, "STOP: A is %d with parent %d", m.a_pid, m.a_ppid);
    CHECK(m.b_pid == b && m.b_ppid == a, "STOP: B is %d with parent %d", m.b_pid, m.b_ppid);
    CHECK(m.a_pgrp == a && m.b_pgrp == a, "STOP: process groups A %d B %d", m.a_pgrp,
          m.b_pgrp);
    CHECK(m.a_sid == sid && m.b_sid == sid, "STOP: sessions A %d B %d", m.a_sid, m.b_sid);
    check_zombie(c);

    char buf[64];
    int st = reap(a, "A");
    describe_status(st, buf, sizeof buf);
    CHECK(exited_with(st, 0), "A ended with %s", buf);
    st = reap(c, "C");
    describe_status(st, buf, sizeof buf);
    CHECK(exited_with(st, 7), "C ended with %s, want exit status 7", buf);
    errno = 0;
    pid_t extra = waitpid(-1, &st, WNOHANG);
    CHECK(extra == -1 && errno == ECHILD, "unexpected child left: waitpid(-1) = %d (%s)",
          (int)extra, strerror(errno));
    /* C's and A's exits (stops, if SIGSTOPped, add more). */
    CHECK(sigchld_count >= 2, "SIGCHLD handler ran %d times, want >= 2", (int)sigchld_count);
    wl_say("tree: %llu messages round the ring", (unsigned long long)recvd);
    wl_pass();
}
