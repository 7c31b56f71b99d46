#pragma once
// What a failed accept() says: about the one connection it was taking off the listen queue, or about the
// listener or this host (out of descriptors or memory, a security module's refusal, anything not known).
#include <boost/system/error_code.hpp>
#include <cerrno>

namespace mailflow {

// The connection went away before it was taken (reset, aborted), or Linux handed over a network error that
// was pending on it (accept(2): "treat them like EAGAIN by retrying"): it is gone from the queue, and the
// next accept() takes the next one. The listener accepts again at once, as nginx's ngx_event_accept.c does
// after ECONNABORTED; nothing was refused and no connection waits, so it is logged only (Asio itself retries
// ECONNABORTED and EPROTO, as those two are common; they are here for an Asio that hands them on).
// Not here, so that they pause and count: EPERM and EACCES, which Linux's security modules return before any
// connection is taken (security_socket_accept), and EOPNOTSUPP, which a listener that is no stream socket
// returns: both stay until something changes, and accepting again at once would spin.
inline bool connection_error_on_accept(const boost::system::error_code& ec) {
  // errno values, as Asio (system) or std::errc (generic) carry them.
  if (ec.category() != boost::system::system_category() && ec.category() != boost::system::generic_category())
    return false;
  switch (ec.value()) {
    case ECONNABORTED:
    case EPROTO:
    case ENETDOWN:
    case ENETUNREACH:
    case EHOSTDOWN:
    case EHOSTUNREACH:
    case ENONET:
    case ENOPROTOOPT:
      return true;
    default:
      return false;
  }
}

}  // namespace mailflow
