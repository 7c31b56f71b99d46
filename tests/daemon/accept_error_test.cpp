#include "daemon/accept_error.hpp"

#include <utility>  // before Asio (Boost 1.74 + GCC 12)

#include <doctest/doctest.h>
#include <boost/asio/error.hpp>
#include <cerrno>

#include "daemon/local_shortage.hpp"

using boost::system::error_code;
using boost::system::system_category;

namespace {
error_code os_error(int value) { return error_code(value, system_category()); }
}  // namespace

TEST_CASE("accept: a connection that went away before it was taken is accepted past at once") {
  // ECONNABORTED (Asio's own name for it too), EPROTO, and the network errors Linux's accept(2) says were
  // pending on the new connection.
  CHECK(mailflow::connection_error_on_accept(boost::asio::error::connection_aborted));
  for (const int value :
       {ECONNABORTED, EPROTO, ENETDOWN, ENETUNREACH, EHOSTDOWN, EHOSTUNREACH, ENONET, ENOPROTOOPT}) {
    CAPTURE(value);
    CHECK(mailflow::connection_error_on_accept(os_error(value)));
  }
  CHECK(mailflow::connection_error_on_accept(make_error_code(boost::system::errc::connection_aborted)));
}

TEST_CASE("accept: a shortage of this host's, a refusal of the listener's or an unknown error pauses") {
  // Out of descriptors or memory: the connection stays queued, an accept at once would fail again (and spin).
  for (const int value : {EMFILE, ENFILE, ENOBUFS, ENOMEM}) {
    CAPTURE(value);
    CHECK(mailflow::local_shortage(os_error(value)));
    CHECK_FALSE(mailflow::connection_error_on_accept(os_error(value)));
  }
  // A security module's EPERM/EACCES comes before any connection is taken; EOPNOTSUPP, EINVAL, EBADF say that
  // the listener itself is wrong: each stays, so none is accepted past at once.
  for (const int value : {EPERM, EACCES, EOPNOTSUPP, EINVAL, EBADF, ENOTSOCK}) {
    CAPTURE(value);
    CHECK_FALSE(mailflow::connection_error_on_accept(os_error(value)));
  }
  CHECK_FALSE(mailflow::connection_error_on_accept(error_code()));
  CHECK_FALSE(mailflow::connection_error_on_accept(boost::asio::error::operation_aborted));
  CHECK_FALSE(mailflow::connection_error_on_accept(boost::asio::error::eof));  // another category's 2
}
