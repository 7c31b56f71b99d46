#pragma once
// Whether a socket operation failed for a reason of this host's own: out of descriptors (EMFILE, ENFILE),
// kernel memory or buffers (ENOMEM, ENOBUFS), or ephemeral ports (EADDRNOTAVAIL on connect). Such a failure
// says nothing about the peer, so it is never counted, cached or reported as the peer's (Postfix's SMTP
// client likewise treats a failed socket() as its own fatal error, not as a failure of the destination).
#include <sys/socket.h>
#include <unistd.h>

#include <boost/system/error_code.hpp>
#include <cerrno>

namespace mailflow {

inline bool local_shortage(const boost::system::error_code& ec) {
  namespace errc = boost::system::errc;
  return ec == errc::too_many_files_open || ec == errc::too_many_files_open_in_system ||
         ec == errc::no_buffer_space || ec == errc::not_enough_memory || ec == errc::address_not_available;
}

// Why this process can make no socket now, where that is such a reason (else no error): asked after a failure
// whose error does not say why. The system resolver (getaddrinfo) that can open neither /etc/hosts nor a
// socket to its name server for want of descriptors answers EAI_NONAME, "Name or service not known", with
// errno EMFILE, which the error code it becomes loses.
inline boost::system::error_code socket_shortage() {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd >= 0) {
    ::close(fd);
    return {};
  }
  const boost::system::error_code ec(errno, boost::system::system_category());
  return local_shortage(ec) ? ec : boost::system::error_code();
}

}  // namespace mailflow
