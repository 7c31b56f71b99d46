/* getifaddrs_fail.so: makes a process's getifaddrs(3) fail as glibc's does where no netlink socket can be
 * made (socket(AF_NETLINK) refused with EAFNOSUPPORT by a unit's RestrictAddressFamilies= without AF_NETLINK,
 * or by a seccomp profile), for tests/integration/test_interface_addresses.py (LD_PRELOAD). Build: cc -O2
 * -shared -fPIC -o getifaddrs_fail.so getifaddrs_fail.c
 */
#include <errno.h>
#include <ifaddrs.h>
#include <stddef.h>

int getifaddrs(struct ifaddrs** list) {
  *list = NULL;
  errno = EAFNOSUPPORT;
  return -1;
}
