#pragma once
// Whether a socket operation failed for a reason of this host's own: out of descriptors (EMFILE, ENFILE),
// kernel memory or buffers (ENOMEM, ENOBUFS), or ephemeral ports (EADDRNOTAVAIL on connect). Such a failure
// says nothing about the peer, so it is never counted, cached or reported as the peer's (Postfix's SMTP
// client likewise treats a failed socket() as its own fatal error, not as a failure of the destination).
#include <boost/system/error_code.hpp>

namespace mailflow {

inline bool local_shortage(const boost::system::error_code& ec) {
  namespace errc = boost::system::errc;
  return ec == errc::too_many_files_open || ec == errc::too_many_files_open_in_system ||
         ec == errc::no_buffer_space || ec == errc::not_enough_memory || ec == errc::address_not_available;
}

}  // namespace mailflow
