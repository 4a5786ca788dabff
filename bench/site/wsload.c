/* wsload: N websocket viewers of one room on one epoll loop, for bench/site/fanout.py.
 *
 * Why C: the load must cost less CPU per socket than the server it measures (issue 15); a
 * Python client per socket inflated the latencies it reported.  One thread, one epoll loop,
 * one shared receive buffer read in large batches; per socket only a small frame-parser state.
 *
 *   wsload HOST PORT PATH N INFLIGHT [NAP_US]
 *
 * NAP_US (default 250): after each round of ready sockets the loop sleeps that long before
 * asking epoll again, so the frames a fan-out writes meanwhile are read in one batch.  Why: on
 * loopback the server's write() runs the receiving side's TCP input and, when the client is
 * parked in epoll_wait, wakes it (an inter-processor interrupt, dear in a VM) -- charged to
 * the server.  A client that drains faster than the server writes parks again and again
 * during one fan-out (`perf`: 13 % of the server's CPU in sock_def_readable, the wake-up), a
 * cost 5000 viewers on their own machines never put on it.  Asleep in nanosleep the client is
 * not on epoll's wait queue, so those writes wake nobody (3 interleaved pairs, bench/RESULTS.md:
 * server 17.6-17.8 us per delivery against 17.8-20.6, client 5.2-6.4 against 7.8-9.2).  The
 * cost to the figures: an arrival is stamped when epoll returns it, so at most NAP_US late
 * (against the server).
 *
 * Opens N sockets (at most INFLIGHT handshakes at once), prints "joined <ok> <failed>" on
 * stderr when every handshake has finished, then reads frames until SIGUSR1 or SIGTERM.  A
 * text frame whose payload holds "bench <seq> <ns>" (the sender's CLOCK_MONOTONIC stamp at
 * send time; Python's time.monotonic_ns() reads the same clock) is one delivery: on exit it
 * prints one line per delivery on stdout, "<seq> <socket> <arrival_ns - ns>", and a last
 * line "closed <n>" (sockets the server closed).  Pings are answered (masked pongs) so the
 * server's keep-alive never cuts a viewer.  Only loopback addresses are given by the driver.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define KEEP 512 /* payload bytes kept per frame: the marker is near the start of a chat event */

enum { CONNECTING, HANDSHAKE, OPEN, DEAD };

typedef struct {
    int fd, state;
    char head[256]; /* handshake reply head */
    int head_len;
    uint8_t hdr[14]; /* current frame header */
    int hdr_len, hdr_need;
    uint64_t payload_len, payload_got;
    int opcode;
    char keep[KEEP + 1];
} conn_t;

typedef struct { uint32_t seq, sock; int64_t ns; } hit_t;

static volatile sig_atomic_t stopping = 0;
static void on_signal(int sig) { (void)sig; stopping = 1; }

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static hit_t *hits; static size_t nhits, caphits;
static void record(uint32_t seq, uint32_t sock, int64_t ns) {
    if (nhits == caphits) {
        caphits = caphits ? caphits * 2 : 65536;
        hits = realloc(hits, caphits * sizeof(hit_t));
        if (!hits) { perror("realloc"); exit(2); }
    }
    hits[nhits++] = (hit_t){seq, sock, ns};
}

static void frame_done(conn_t *c, uint32_t index, int64_t at) {
    if (c->opcode == 0x1) {
        c->keep[c->payload_got < KEEP ? c->payload_got : KEEP] = 0;
        char *m = strstr(c->keep, "bench ");
        unsigned long seq; long long sent;
        if (m && sscanf(m + 6, "%lu %lld", &seq, &sent) == 2)
            record((uint32_t)seq, index, at - sent);
    } else if (c->opcode == 0x9) { /* ping: a masked pong (mask key 0) with the same payload */
        uint8_t out[6 + 125];
        size_t n = c->payload_got < 125 ? c->payload_got : 125;
        out[0] = 0x8A; out[1] = 0x80 | (uint8_t)n; memset(out + 2, 0, 4);
        memcpy(out + 6, c->keep, n);
        if (write(c->fd, out, 6 + n) < 0) { /* the socket's end shows on the next read */ }
    } else if (c->opcode == 0x8) {
        c->state = DEAD;
    }
}

/* Feed bytes of the open websocket stream to the frame parser. */
static void feed(conn_t *c, uint32_t index, const uint8_t *p, size_t n, int64_t at) {
    while (n > 0 && c->state == OPEN) {
        if (c->hdr_len < c->hdr_need) {
            c->hdr[c->hdr_len++] = *p++; n--;
            if (c->hdr_len == 2) {
                uint8_t len7 = c->hdr[1] & 0x7F;
                c->hdr_need = 2 + (len7 == 126 ? 2 : len7 == 127 ? 8 : 0);
            }
            if (c->hdr_len == c->hdr_need) {
                uint8_t len7 = c->hdr[1] & 0x7F;
                uint64_t len = len7;
                if (len7 == 126) len = ((uint64_t)c->hdr[2] << 8) | c->hdr[3];
                else if (len7 == 127) { len = 0; for (int i = 2; i < 10; i++) len = (len << 8) | c->hdr[i]; }
                c->opcode = c->hdr[0] & 0x0F;
                c->payload_len = len; c->payload_got = 0;
                if (len == 0) { frame_done(c, index, at); c->hdr_len = 0; c->hdr_need = 2; }
            }
            continue;
        }
        uint64_t want = c->payload_len - c->payload_got;
        size_t take = n < want ? n : (size_t)want;
        if (c->payload_got < KEEP) {
            size_t room = KEEP - (size_t)c->payload_got;
            memcpy(c->keep + c->payload_got, p, take < room ? take : room);
        }
        c->payload_got += take; p += take; n -= take;
        if (c->payload_got == c->payload_len) {
            frame_done(c, index, at);
            c->hdr_len = 0; c->hdr_need = 2;
        }
    }
}

int main(int argc, char **argv) {
    if (argc != 6 && argc != 7) {
        fprintf(stderr, "usage: wsload HOST PORT PATH N INFLIGHT [NAP_US]\n"); return 2;
    }
    const char *host = argv[1], *path = argv[3];
    int port = atoi(argv[2]), total = atoi(argv[4]), inflight_max = atoi(argv[5]);
    long nap_us = argc == 7 ? atol(argv[6]) : 250;
    if (nap_us < 0 || nap_us > 100000) { fprintf(stderr, "NAP_US: 0 to 100000\n"); return 2; }
    struct timespec nap = {.tv_sec = 0, .tv_nsec = nap_us * 1000};
    signal(SIGUSR1, on_signal); signal(SIGTERM, on_signal); signal(SIGPIPE, SIG_IGN);

    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (inet_pton(AF_INET, host, &addr.sin_addr) != 1) { fprintf(stderr, "bad host\n"); return 2; }
    char request[512];
    int request_len = snprintf(request, sizeof request,
        "GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        path, host, port);

    conn_t *conns = calloc((size_t)total, sizeof(conn_t));
    int ep = epoll_create1(0);
    int started = 0, inflight = 0, ok = 0, failed = 0, closed = 0, announced = 0;
    static uint8_t buf[1 << 18];
    struct epoll_event events[512];

    while (!stopping) {
        while (started < total && inflight < inflight_max) {
            conn_t *c = &conns[started];
            c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
            if (c->fd < 0) { failed++; c->state = DEAD; started++; continue; }
            int one = 1;
            setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
            if (connect(c->fd, (struct sockaddr *)&addr, sizeof addr) < 0 && errno != EINPROGRESS) {
                close(c->fd); c->state = DEAD; failed++; started++; continue;
            }
            c->state = CONNECTING;
            struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.u32 = (uint32_t)started};
            epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev);
            started++; inflight++;
        }
        if (!announced && started == total && inflight == 0) {
            fprintf(stderr, "joined %d %d\n", ok, failed);
            announced = 1;
        }
        int n = epoll_wait(ep, events, 512, 100);
        int64_t at = now_ns(); /* one clock read per batch of ready sockets */
        for (int i = 0; i < n; i++) {
            uint32_t index = events[i].data.u32;
            conn_t *c = &conns[index];
            if (c->state == CONNECTING) {
                int err = 0; socklen_t len = sizeof err;
                getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
                if (err || write(c->fd, request, (size_t)request_len) != request_len) {
                    close(c->fd); c->state = DEAD; failed++; inflight--; continue;
                }
                c->state = HANDSHAKE;
                struct epoll_event ev = {.events = EPOLLIN, .data.u32 = index};
                epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
                continue;
            }
            for (;;) {
                ssize_t got = read(c->fd, buf, sizeof buf);
                if (got == 0 || (got < 0 && errno != EAGAIN && errno != EINTR)) {
                    if (c->state == HANDSHAKE) { failed++; inflight--; } else if (c->state == OPEN) closed++;
                    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
                    close(c->fd); c->state = DEAD;
                    break;
                }
                if (got < 0) break;
                const uint8_t *p = buf; size_t left = (size_t)got;
                if (c->state == HANDSHAKE) {
                    size_t take = 0;
                    while (take < left) {
                        if (c->head_len < (int)sizeof c->head - 1) c->head[c->head_len++] = (char)p[take];
                        take++;
                        if (c->head_len >= 4 && memcmp(c->head + c->head_len - 4, "\r\n\r\n", 4) == 0) break;
                    }
                    p += take; left -= take;
                    if (c->head_len >= 4 && memcmp(c->head + c->head_len - 4, "\r\n\r\n", 4) == 0) {
                        inflight--;
                        if (strncmp(c->head, "HTTP/1.1 101", 12) == 0) {
                            c->state = OPEN; c->hdr_need = 2; ok++;
                        } else {
                            failed++; epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
                            close(c->fd); c->state = DEAD; break;
                        }
                    } else if (c->head_len >= (int)sizeof c->head - 1) {
                        failed++; inflight--; epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
                        close(c->fd); c->state = DEAD; break;
                    }
                }
                if (c->state == OPEN && left) feed(c, index, p, left, at);
                if (c->state == DEAD) {
                    closed++; epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL); close(c->fd); break;
                }
                if ((size_t)got < sizeof buf) break; /* drained: the kernel had no more */
            }
        }
        /* Let the next frames gather (see NAP_US above); not while handshakes are under way. */
        if (n > 0 && nap_us > 0 && announced) nanosleep(&nap, NULL);
    }
    if (!announced) fprintf(stderr, "joined %d %d\n", ok, failed);
    for (size_t i = 0; i < nhits; i++)
        printf("%u %u %lld\n", hits[i].seq, hits[i].sock, (long long)hits[i].ns);
    printf("closed %d\n", closed);
    return 0;
}
