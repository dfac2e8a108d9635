// Loopback TCP: CPU per byte of send() with and without MSG_ZEROCOPY (64 KiB sends).
// Usage: zc MODE(0 copy, 1 zerocopy) SECONDS SENDER_CPU RECEIVER_CPU
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/errqueue.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#ifndef SO_ZEROCOPY
#define SO_ZEROCOPY 60
#endif
#ifndef MSG_ZEROCOPY
#define MSG_ZEROCOPY 0x4000000
#endif
static void pin(int cpu) { cpu_set_t s; CPU_ZERO(&s); CPU_SET(cpu, &s); sched_setaffinity(0, sizeof s, &s); }
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }
static double cpu(void) { struct rusage r; getrusage(RUSAGE_SELF, &r);
  return r.ru_utime.tv_sec + r.ru_utime.tv_usec / 1e6 + r.ru_stime.tv_sec + r.ru_stime.tv_usec / 1e6; }
int main(int argc, char **argv) {
  int zc = atoi(argv[1]); double secs = atof(argv[2]);
  int l = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(0x7f000001)};
  bind(l, (void *)&a, sizeof a); listen(l, 1); socklen_t al = sizeof a; getsockname(l, (void *)&a, &al);
  if (fork() == 0) {
    pin(atoi(argv[4]));
    int c = accept(l, 0, 0); static char b[1 << 20]; long n; while ((n = read(c, b, sizeof b)) > 0) {}
    _exit(0);
  }
  pin(atoi(argv[3]));
  int s = socket(AF_INET, SOCK_STREAM, 0);
  connect(s, (void *)&a, sizeof a);
  int one = 1; if (zc && setsockopt(s, SOL_SOCKET, SO_ZEROCOPY, &one, sizeof one)) { perror("SO_ZEROCOPY"); return 1; }
  enum { N = 64 * 1024, BUFS = 64 };
  char *buf = aligned_alloc(4096, (size_t)N * BUFS); memset(buf, 'x', (size_t)N * BUFS);
  double t0 = now(), c0 = cpu(); long bytes = 0, sends = 0, pending = 0, copied = 0, notes = 0;
  while (now() - t0 < secs) {
    char *p = buf + (size_t)(sends % BUFS) * N;
    long off = 0;
    while (off < N) {
      ssize_t n = send(s, p + off, N - off, zc ? MSG_ZEROCOPY : 0);
      if (n < 0) { if (errno == ENOBUFS || errno == EAGAIN) { n = 0; } else { perror("send"); return 1; } }
      off += n;
      if (zc) pending++;
      // Reap completions (zerocopy): the buffer ring must not be reused before its notification.
      while (zc && pending > BUFS / 2) {
        char ctl[128]; struct msghdr m = {.msg_control = ctl, .msg_controllen = sizeof ctl};
        if (recvmsg(s, &m, MSG_ERRQUEUE) < 0) { struct pollfd pf = {s, POLLERR, 0}; poll(&pf, 1, 10); continue; }
        struct cmsghdr *cm = CMSG_FIRSTHDR(&m);
        struct sock_extended_err *e = (void *)CMSG_DATA(cm);
        long k = (long)e->ee_data - e->ee_info + 1; pending -= k; notes++;
        if (e->ee_code & SO_EE_CODE_ZEROCOPY_COPIED) copied += k;
      }
    }
    bytes += N; sends++;
  }
  double el = now() - t0, used = cpu() - c0;
  printf("%s: %.2f GiB/s, sender CPU %.2f s of %.2f s: %.3f CPU-s per GiB; sends %ld, zerocopy-copied %ld of %ld notified\n",
         zc ? "MSG_ZEROCOPY" : "copy", bytes / el / (1 << 30), used, el, used / (bytes / (double)(1 << 30)), sends, copied, notes);
  shutdown(s, SHUT_WR); close(s);
  struct rusage rr; int st; wait4(-1, &st, 0, &rr);
  double rc = rr.ru_utime.tv_sec + rr.ru_utime.tv_usec / 1e6 + rr.ru_stime.tv_sec + rr.ru_stime.tv_usec / 1e6;
  printf("   receiver CPU %.2f s: %.3f CPU-s per GiB; both %.3f\n", rc, rc / (bytes / (double)(1 << 30)), (used + rc) / (bytes / (double)(1 << 30)));
  return 0;
}
