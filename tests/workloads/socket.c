/*
 * socket.c - holds a listening TCP socket, which ferry cannot checkpoint.
 *
 * Used by the refusal tests: `ferry checkpoint` must refuse with an error
 * naming the socket's fd (SOCKET_FD, moved there with dup2 so the number is
 * easy to spot in the message) and leave the process running untouched.
 * The workload prints "socket fd 42 port P" and READY, idles until the
 * deadline checking the socket is still bound to the same port, then
 * proves it still listens by connecting to it and accepting the
 * connection.
 */
#include "common.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>

#define SOCKET_FD 42

static int bound_port(int fd)
{
    struct sockaddr_in a;
    socklen_t len = sizeof a;
    CHECK_SYS(getsockname(fd, (struct sockaddr *)&a, &len));
    CHECK(a.sin_family == AF_INET && a.sin_addr.s_addr == htonl(INADDR_LOOPBACK),
          "socket no longer bound to 127.0.0.1");
    return ntohs(a.sin_port);
}

int main(void)
{
    wl_init("socket");
    double secs = wl_secs(2.0);

    int s = socket(AF_INET, SOCK_STREAM, 0);
    CHECK_SYS(s);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = 0};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    CHECK_SYS(bind(s, (struct sockaddr *)&a, sizeof a));
    CHECK_SYS(listen(s, 4));
    CHECK(dup2(s, SOCKET_FD) == SOCKET_FD, "dup2: %s", strerror(errno));
    close(s);
    int port = bound_port(SOCKET_FD);
    wl_say("socket fd %d port %d", SOCKET_FD, port);

    wl_ready(secs);
    while (!wl_time_up()) {
        CHECK(bound_port(SOCKET_FD) == port, "port changed");
        wl_sleep(0.02);
    }

    /* Still listening: a loopback connect is accepted. */
    int c = socket(AF_INET, SOCK_STREAM, 0);
    CHECK_SYS(c);
    a.sin_port = htons((uint16_t)port);
    CHECK(connect(c, (struct sockaddr *)&a, sizeof a) == 0, "connect to own listener: %s",
          strerror(errno));
    struct pollfd p = {.fd = SOCKET_FD, .events = POLLIN};
    CHECK(poll(&p, 1, 5000) == 1, "listener never became readable");
    int acc = accept(SOCKET_FD, NULL, NULL);
    CHECK(acc >= 0, "accept: %s", strerror(errno));
    CHECK(write(c, "hi", 2) == 2, "write: %s", strerror(errno));
    char buf[2];
    CHECK(read(acc, buf, 2) == 2 && memcmp(buf, "hi", 2) == 0, "no data through the socket");
    close(acc);
    close(c);
    wl_pass();
}
