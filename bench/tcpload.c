/*
 * tcpload: the load generator and echo backend of bench/proxy.py.
 *
 * Written in C so that the generator's own CPU stays small next to the proxies it measures
 * on a 2-core machine (a Python generator took as much CPU as a proxy). bench/proxy.py
 * compiles it with the system's cc into a temporary directory at each run.
 *
 *   tcpload echo PORT                     echo server on 127.0.0.1:PORT (epoll, one thread)
 *   tcpload bulk HOST PORT BYTES          one connection: send BYTES, read them back;
 *                                         prints "bytes seconds"
 *   tcpload rr HOST PORT CONC SECONDS SIZE
 *                                         CONC connections, each a loop of SIZE-byte request
 *                                         and its echo; prints "requests seconds p50_us p99_us"
 *   tcpload conn HOST PORT CONC SECONDS SIZE
 *                                         CONC loops of: connect, SIZE bytes each way, close;
 *                                         prints "connections seconds p50_us p99_us failures"
 *
 * Every mode is bounded in time or size and stops by itself; it talks to HOST only.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what) {
    perror(what);
    exit(2);
}

static void nodelay(int fd) {
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

static int dial(const char *host, int port, int nonblock) {
    int fd = socket(AF_INET, SOCK_STREAM | (nonblock ? SOCK_NONBLOCK : 0), 0);
    if (fd < 0) die("socket");
    nodelay(fd);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, host, &a.sin_addr);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0 && errno != EINPROGRESS) {
        close(fd);
        return -1;
    }
    return fd;
}

/* -- echo ----------------------------------------------------------------------------- */

static int echo(int port) {
    int ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0), one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
    if (bind(ls, (struct sockaddr *)&a, sizeof a) < 0) die("bind");
    if (listen(ls, 4096) < 0) die("listen");
    socklen_t len = sizeof a;
    getsockname(ls, (struct sockaddr *)&a, &len);
    printf("%d\n", ntohs(a.sin_port));
    fflush(stdout);
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = ls};
    epoll_ctl(ep, EPOLL_CTL_ADD, ls, &ev);
    static char buf[65536];
    struct epoll_event evs[256];
    for (;;) {
        int n = epoll_wait(ep, evs, 256, -1);
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == ls) {
                int c;
                while ((c = accept4(ls, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    nodelay(c);
                    struct epoll_event ce = {.events = EPOLLIN, .data.fd = c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, c, &ce);
                }
                continue;
            }
            ssize_t r = read(fd, buf, sizeof buf);
            if (r <= 0) {
                if (r < 0 && errno == EAGAIN) continue;
                close(fd);
                continue;
            }
            /* Echo back; block briefly if the peer is slow (a benchmark peer reads). */
            ssize_t off = 0;
            while (off < r) {
                ssize_t w = write(fd, buf + off, r - off);
                if (w < 0) {
                    if (errno == EAGAIN) {
                        struct timespec t = {0, 20000};
                        nanosleep(&t, NULL);
                        continue;
                    }
                    close(fd);
                    break;
                }
                off += w;
            }
        }
    }
}

/* -- bulk ----------------------------------------------------------------------------- */

static int bulk(const char *host, int port, long long total) {
    int fd = dial(host, port, 0);
    if (fd < 0) die("connect");
    fcntl(fd, F_SETFL, O_NONBLOCK);
    static char out[65536], in[65536];
    memset(out, 'b', sizeof out);
    long long sent = 0, got = 0;
    double t0 = now(), deadline = t0 + 120;
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.fd = fd};
    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    while (got < total && now() < deadline) {
        struct epoll_event e;
        if (epoll_wait(ep, &e, 1, 1000) <= 0) continue;
        if (e.events & EPOLLOUT && sent < total) {
            long long want = total - sent;
            ssize_t w = write(fd, out, want < (long long)sizeof out ? want : (long long)sizeof out);
            if (w > 0) sent += w;
            if (sent >= total) {
                ev.events = EPOLLIN;
                epoll_ctl(ep, EPOLL_CTL_MOD, fd, &ev);
            }
        }
        if (e.events & (EPOLLIN | EPOLLHUP)) {
            ssize_t r = read(fd, in, sizeof in);
            if (r == 0) break;
            if (r > 0) got += r;
        }
    }
    printf("%lld %.6f\n", got, now() - t0);
    return got == total ? 0 : 1;
}

/* -- request/response and new connections ---------------------------------------------- */

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

struct conn {
    int fd;
    int sent, got;
    double start;
    int connecting;
};

static double *lat;
static long nlat, caplat;

static void record(double us) {
    if (nlat == caplat) {
        caplat = caplat ? caplat * 2 : 1 << 16;
        lat = realloc(lat, caplat * sizeof *lat);
    }
    lat[nlat++] = us;
}

static int loop(const char *host, int port, int conc, double seconds, int size, int reconnect) {
    static char out[65536], in[65536];
    memset(out, 'r', sizeof out);
    int ep = epoll_create1(0);
    struct conn *cs = calloc(conc, sizeof *cs);
    long done = 0, failures = 0;
    double t0 = now(), end = t0 + seconds;
    for (int i = 0; i < conc; i++) {
        cs[i].fd = dial(host, port, 1);
        if (cs[i].fd < 0) die("connect");
        cs[i].start = now();
        cs[i].connecting = 1;
        struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.u32 = i};
        epoll_ctl(ep, EPOLL_CTL_ADD, cs[i].fd, &ev);
    }
    struct epoll_event evs[512];
    while (now() < end) {
        int n = epoll_wait(ep, evs, 512, 100);
        for (int k = 0; k < n; k++) {
            struct conn *c = &cs[evs[k].data.u32];
            int fd = c->fd;
            int restart = 0;
            if (c->sent < size && (evs[k].events & EPOLLOUT)) {
                ssize_t w = write(fd, out, size - c->sent);
                if (w > 0) {
                    c->sent += w;
                    c->connecting = 0;
                } else if (w < 0 && errno != EAGAIN) {
                    failures++;
                    restart = 1;
                }
                if (c->sent == size) {
                    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = evs[k].data.u32};
                    epoll_ctl(ep, EPOLL_CTL_MOD, fd, &ev);
                }
            }
            if (!restart && (evs[k].events & (EPOLLIN | EPOLLHUP | EPOLLERR))) {
                ssize_t r = read(fd, in, sizeof in);
                if (r > 0) {
                    c->got += r;
                } else if (r == 0 || errno != EAGAIN) {
                    failures++;
                    restart = 1;
                }
            }
            if (!restart && c->got >= size) {
                record((now() - c->start) * 1e6);
                done++;
                if (reconnect) {
                    restart = 1;
                } else {
                    c->sent = c->got = 0;
                    c->start = now();
                    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT,
                                             .data.u32 = evs[k].data.u32};
                    epoll_ctl(ep, EPOLL_CTL_MOD, fd, &ev);
                }
            }
            if (restart) {
                epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
                close(fd);
                c->fd = dial(host, port, 1);
                if (c->fd < 0) die("connect");
                c->sent = c->got = 0;
                c->start = now();
                struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT,
                                         .data.u32 = evs[k].data.u32};
                epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev);
            }
        }
    }
    double el = now() - t0;
    qsort(lat, nlat, sizeof *lat, cmp);
    double p50 = nlat ? lat[nlat / 2] : 0, p99 = nlat ? lat[(long)(nlat * 0.99)] : 0;
    printf("%ld %.6f %.1f %.1f %ld\n", done, el, p50, p99, failures);
    return 0;
}

int main(int argc, char **argv) {
    if (argc >= 3 && !strcmp(argv[1], "echo")) return echo(atoi(argv[2]));
    if (argc == 5 && !strcmp(argv[1], "bulk")) return bulk(argv[2], atoi(argv[3]), atoll(argv[4]));
    if (argc == 7 && (!strcmp(argv[1], "rr") || !strcmp(argv[1], "conn")))
        return loop(argv[2], atoi(argv[3]), atoi(argv[4]), atof(argv[5]), atoi(argv[6]),
                    !strcmp(argv[1], "conn"));
    fprintf(stderr, "usage: see the comment at the top of tcpload.c\n");
    return 2;
}
