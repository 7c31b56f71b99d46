// mailflow_proto_driver — a stable, noise-free cost figure for the sans-I/O engines.
//
// Plays one client session through CommandFramer + ServerSession + DataFilter exactly as the relay drives them
// (command bytes framed into lines, lines into actions, upstream outcomes fed back, the message streamed through
// the DataFilter in 4 KiB reads): banner, EHLO, N x (MAIL, RCPT, DATA, 10 KiB message), QUIT.
// Run under `valgrind --tool=callgrind` with N and with 1 message; (Ir(N) - Ir(1)) / (N - 1) is the number of
// instructions the engines spend per message. Prints a checksum so nothing can be optimized away.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>

#include "proto/data_filter.hpp"
#include "proto/line_framer.hpp"
#include "proto/server_session.hpp"
#include "tests/bench/bench_message.hpp"

namespace {

using mailflow::proto::CommandFramer;
using mailflow::proto::DataFilter;
using mailflow::proto::ServerSession;
using Kind = ServerSession::ActionKind;

using mailflow::bench::make_message;

struct Driver {
  ServerSession session;
  CommandFramer framer;
  DataFilter::Limits limits;
  std::string message;
  std::uint64_t checksum = 0;
  std::string out;

  explicit Driver(ServerSession::Options options) : session(std::move(options)), message(make_message(10240)) {
    out.reserve(65536);
  }

  // Frames `input` into lines and performs each action as the relay would, with every upstream step answered 250
  // (354 for DATA) and the message streamed through a fresh DataFilter.
  void commands(std::string_view input) {
    while (!input.empty()) {
      auto event = framer.next(input);
      input.remove_prefix(event.consumed);
      if (event.kind == CommandFramer::Kind::need_more) break;
      if (event.kind != CommandFramer::Kind::line) {
        checksum += session.on_framing_error(event.kind).reply.size();
        continue;
      }
      auto action = session.on_line(event.line, !input.empty());  // the rest of the input is read already
      checksum += action.reply.size();
      switch (action.kind) {
        case Kind::begin_mail: session.on_mail_reply(250); break;
        case Kind::forward_rcpt: session.on_rcpt_reply(250); break;
        case Kind::begin_data: data(); break;
        case Kind::start_tls: session.on_tls_started(); break;
        default: break;
      }
    }
  }

  void data() {
    DataFilter filter(limits);
    std::string_view rest = message;
    while (!filter.done() && !rest.empty()) {
      std::string_view chunk = rest.substr(0, 4096);
      const std::size_t consumed = filter.feed(chunk, out);
      rest.remove_prefix(consumed);
      if (out.size() >= 65536 || filter.done()) {
        checksum += out.size();
        out.clear();
      }
    }
    checksum += filter.message_bytes();
    session.on_data_finished();
  }
};

}  // namespace

int main(int argc, char** argv) {
  const long messages = argc > 1 ? std::strtol(argv[1], nullptr, 10) : 100;
  if (messages < 0) return 2;
  ServerSession::Options options;
  options.hostname = "bench.localhost";
  options.starttls_available = true;
  Driver driver(options);
  driver.checksum += driver.session.banner().size();
  driver.commands("EHLO loadgen.bench.example\r\n");
  for (long i = 0; i < messages; ++i) {
    driver.commands("MAIL FROM:<bench@d1.bench.example>\r\nRCPT TO:<sink@sink.example>\r\nDATA\r\n");
  }
  driver.commands("QUIT\r\n");
  if (driver.session.state() != ServerSession::State::closed) {
    std::fprintf(stderr, "mailflow_proto_driver: session did not end with QUIT\n");
    return 1;
  }
  std::printf("messages=%ld checksum=%llu\n", messages, static_cast<unsigned long long>(driver.checksum));
  return 0;
}
