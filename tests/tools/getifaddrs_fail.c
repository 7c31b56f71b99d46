/* getifaddrs_fail.so: makes a process's getifaddrs(3) fail as glibc's does where no netlink socket can be
 * made (socket(AF_NETLINK) refused with EAFNOSUPPORT by a unit's RestrictAddressFamilies= without AF_NETLINK,
 * or by a seccomp profile), for tests/integration/test_interface_addresses.py (LD_PRELOAD). With
 * GETIFADDRS_FAIL_IF_EXISTS=FILE in the environment it fails only while FILE exists and is glibc's own
 * otherwise (a failure that begins at a reload). Build: cc -O2 -shared -fPIC -o getifaddrs_fail.so
 * getifaddrs_fail.c
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <ifaddrs.h>
#include <stddef.h>
#include <stdlib.h>
#include <unistd.h>

int getifaddrs(struct ifaddrs** list) {
  const char* when = getenv("GETIFADDRS_FAIL_IF_EXISTS");
  if (when != NULL && access(when, F_OK) != 0) {
    int (*real)(struct ifaddrs**) = (int (*)(struct ifaddrs**))dlsym(RTLD_NEXT, "getifaddrs");
    if (real != NULL) return real(list);
  }
  *list = NULL;
  errno = EAFNOSUPPORT;
  return -1;
}
