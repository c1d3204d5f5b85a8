/* Sends one Ethernet frame over and over from an AF_PACKET socket, batched with sendmmsg,
 * at a given rate (packets/s; 0 = as fast as it goes) for a given time; prints how many it sent.
 * bench/capture.py builds it with cc; it exists because a Python loop tops out far below 1M frames/s.
 * usage: capture_sender IFNAME RATE SECONDS FRAME_BYTES [DST_MAC]   (default: broadcast)
 *        FRAME_BYTES @FILE: send FILE's bytes, a whole Ethernet frame (bench/terminate.py's tunnel packets) */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <linux/if_packet.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#define BATCH 32

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc != 5 && argc != 6) {
        fprintf(stderr, "usage: %s IFNAME RATE SECONDS FRAME_BYTES [DST_MAC]\n", argv[0]);
        return 2;
    }
    double rate = atof(argv[2]), seconds = atof(argv[3]);
    int size = atoi(argv[4]);
    int fd = socket(AF_PACKET, SOCK_RAW, 0);
    if (fd < 0) { perror("socket"); return 1; }
    struct sockaddr_ll to = {.sll_family = AF_PACKET, .sll_ifindex = if_nametoindex(argv[1]), .sll_halen = 6};
    if (!to.sll_ifindex) { perror(argv[1]); return 1; }
    unsigned char frame[2048] = {0};
    memset(frame, 0xff, 6);                      /* broadcast */
    if (argc == 6 && sscanf(argv[5], "%hhx:%hhx:%hhx:%hhx:%hhx:%hhx", &frame[0], &frame[1], &frame[2], &frame[3], &frame[4], &frame[5]) != 6) {
        fprintf(stderr, "%s: not a MAC address\n", argv[5]);
        return 2;
    }
    memcpy(frame + 6, "\x02\x00\x00\x00\x00\x01", 6);
    frame[12] = 0x88; frame[13] = 0xb5;          /* local experimental ethertype */
    if (argv[4][0] == '@') {
        FILE *f = fopen(argv[4] + 1, "rb");
        if (!f) { perror(argv[4] + 1); return 1; }
        size = fread(frame, 1, sizeof frame, f);
        fclose(f);
    }
    struct iovec iov = {frame, size};
    struct mmsghdr messages[BATCH];
    for (int i = 0; i < BATCH; i++)
        messages[i].msg_hdr = (struct msghdr){.msg_name = &to, .msg_namelen = sizeof to, .msg_iov = &iov, .msg_iovlen = 1};
    double start = now(), end = start + seconds;
    long sent = 0;
    for (double t = start; t < end; t = now()) {
        if (rate > 0 && sent >= (t - start) * rate) {
            struct timespec pause = {0, 20000};
            nanosleep(&pause, NULL);
            continue;
        }
        int n = sendmmsg(fd, messages, BATCH, 0);
        if (n > 0) sent += n;
    }
    printf("%ld %.6f\n", sent, now() - start);
    return 0;
}
