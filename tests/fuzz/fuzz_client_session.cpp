// ClientSession against an arbitrary upstream: replies come from the input (through parse_reply), options
// too. The engine must always end in ready or fail, only ever send single well-formed command lines, honour
// the TLS policy, and never loop.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "fuzz_check.hpp"
#include "proto/client_session.hpp"
#include "proto/reply.hpp"

using namespace mailflow::proto;
using Kind = ClientSession::ActionKind;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 4) return 0;
  ClientSession::Options o;
  o.tls = static_cast<UpstreamTlsPolicy>(data[0] % 3);
  o.xclient_allowed = data[0] & 4;
  o.client_esmtp = data[0] & 8;
  o.client_port = static_cast<std::uint16_t>(data[1] << 8 | data[2]);
  o.client_address = (data[0] & 16) ? "2001:db8::1" : "192.0.2.1";
  const std::size_t helo_len = data[3] % 16;
  std::string_view rest(reinterpret_cast<const char*>(data + 4), size - 4);
  o.client_helo = std::string(rest.substr(0, helo_len));  // arbitrary bytes, CR/LF included
  rest.remove_prefix(std::min(helo_len, rest.size()));
  const UpstreamTlsPolicy policy = o.tls;

  ClientSession engine(o);
  auto action = engine.start();
  FUZZ_CHECK(action.kind == Kind::read_reply);
  int steps = 0;
  while (true) {
    FUZZ_CHECK(++steps < 64);  // banner, EHLO, STARTTLS, EHLO, XCLIENT, EHLO, HELOs: bounded
    if (action.kind == Kind::ready) {
      if (policy == UpstreamTlsPolicy::required) FUZZ_CHECK(engine.tls_active());
      if (engine.xclient_done()) FUZZ_CHECK(o.xclient_allowed);
      return 0;
    }
    if (action.kind == Kind::fail) {
      FUZZ_CHECK(!action.reason.empty());
      return 0;
    }
    if (action.kind == Kind::start_tls) {
      FUZZ_CHECK(policy != UpstreamTlsPolicy::none);
      FUZZ_CHECK(!engine.tls_active());
      action = engine.on_tls_started();
      continue;
    }
    if (action.kind == Kind::send) {
      const std::string& d = action.data;
      FUZZ_CHECK(d.size() >= 2 && d.compare(d.size() - 2, 2, "\r\n") == 0);
      for (std::size_t i = 0; i + 2 < d.size(); ++i) {
        const auto b = static_cast<unsigned char>(d[i]);
        FUZZ_CHECK(b >= 0x20 && b < 0x7f);
      }
    }
    // Next reply from the input; out of input = the upstream went away.
    const ReplyParseResult r = parse_reply(rest);
    if (r.status != ReplyStatus::complete) return 0;
    rest.remove_prefix(r.consumed);
    action = engine.on_reply(r.reply);
  }
}
