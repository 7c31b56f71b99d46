/* accept_drop.so: makes a process's accept() fail as Linux's does for a connection that went away in the
 * listen queue, for tests/integration/test_accept.py (LD_PRELOAD).
 *
 * On the listening sockets bound to the ports in $ACCEPT_DROP_PORTS (comma-separated), the first
 * $ACCEPT_DROP_COUNT connections that accept() or accept4() take off the queue are closed at once and
 * reported as failed with errno $ACCEPT_DROP_ERRNO (default ENETUNREACH, one of the network errors that
 * accept(2) says Linux passes on from the new connection). Each such connection is gone from the queue, as
 * with the real error; later ones are accepted as usual. Only while the file $ACCEPT_DROP_ARMED exists (when
 * set), so that a test arms it once the daemon is up (its readiness probe and scrapes go through). Build: cc
 * -O2 -shared -fPIC -o accept_drop.so accept_drop.c
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

enum { max_ports = 8 };
static int ports[max_ports];
static int dropped[max_ports];
static int nports;
static int count;
static int error = ENETUNREACH;
static const char* armed;

__attribute__((constructor)) static void read_settings(void) {
  const char* list = getenv("ACCEPT_DROP_PORTS");
  const char* n = getenv("ACCEPT_DROP_COUNT");
  const char* e = getenv("ACCEPT_DROP_ERRNO");
  if (n != NULL) count = atoi(n);
  if (e != NULL) error = atoi(e);
  armed = getenv("ACCEPT_DROP_ARMED");
  while (list != NULL && *list != '\0' && nports < max_ports) {
    ports[nports++] = atoi(list);
    list = strchr(list, ',');
    if (list != NULL) ++list;
  }
}

/* The index of the listening socket's port in ports[], or -1. */
static int watched(int listener) {
  struct sockaddr_storage local;
  socklen_t len = sizeof local;
  if (getsockname(listener, (struct sockaddr*)&local, &len) != 0) return -1;
  int port = 0;
  if (local.ss_family == AF_INET) port = ntohs(((struct sockaddr_in*)&local)->sin_port);
  if (local.ss_family == AF_INET6) port = ntohs(((struct sockaddr_in6*)&local)->sin6_port);
  for (int i = 0; i < nports; ++i)
    if (ports[i] == port) return i;
  return -1;
}

static int dropping(int listener, int fd) {
  if (fd < 0 || (armed != NULL && access(armed, F_OK) != 0)) return fd;
  const int i = watched(listener);
  if (i < 0 || __atomic_fetch_add(&dropped[i], 1, __ATOMIC_RELAXED) >= count) return fd;
  close(fd);
  errno = error;
  return -1;
}

int accept(int s, struct sockaddr* addr, socklen_t* len) {
  static int (*real)(int, struct sockaddr*, socklen_t*);
  if (real == NULL) real = (int (*)(int, struct sockaddr*, socklen_t*))dlsym(RTLD_NEXT, "accept");
  return dropping(s, real(s, addr, len));
}

int accept4(int s, struct sockaddr* addr, socklen_t* len, int flags) {
  static int (*real)(int, struct sockaddr*, socklen_t*, int);
  if (real == NULL) real = (int (*)(int, struct sockaddr*, socklen_t*, int))dlsym(RTLD_NEXT, "accept4");
  return dropping(s, real(s, addr, len, flags));
}
