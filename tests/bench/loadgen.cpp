// mailflow_loadgen — the SMTP load generator behind `make bench`.
//
// One thread, one Asio io_context, one C++20 coroutine per client session. Lock-step SMTP (no PIPELINING), so
// every figure is the same conversation for every path under test (direct, mailflowd, nginx, HAProxy):
//   banner, EHLO, [STARTTLS, handshake, EHLO], M x (MAIL, RCPT, DATA, message), QUIT.
//
// Modes
//   load (default): --concurrency N sessions run for --warmup + --duration seconds; each session sends
//                   --messages M messages (0 = as many as fit in the run: "reused" sessions) then QUITs and a
//                   new session takes its place. Only messages/sessions that complete inside the measured
//                   window (after the warm-up) count. Prints one JSON object.
//   idle:           opens --idle N sessions (banner, EHLO, optional STARTTLS + EHLO), prints
//                   "READY <opened> <failed>" and holds them open until stdin is closed.
#include <utility>  // Boost 1.74 + GCC 12: before any Asio header

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/connect.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/redirect_error.hpp>
#include <boost/asio/ssl/context.hpp>
#include <boost/asio/ssl/stream.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>
#include <openssl/ssl.h>
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "tests/bench/bench_message.hpp"

namespace {

namespace asio = boost::asio;
using tcp = asio::ip::tcp;
using boost::system::error_code;
using Clock = std::chrono::steady_clock;

struct Options {
  std::string host = "127.0.0.1";
  std::string port = "2525";
  std::string mode = "load";
  int concurrency = 8;
  int messages = 0;  // per session; 0 = until the run ends
  std::size_t size = 10240;
  int tls = 0;  // 0 = plaintext, 12 = STARTTLS TLS1.2, 13 = STARTTLS TLS1.3
  double duration = 3.0;
  double warmup = 0.5;
  double interval_ms = 0;  // pause before each message (low-load latency runs)
  int sender_domains = 1;  // MAIL FROM:<bench@dN.bench.example>, N cycling over this many domains
  int idle = 0;
};

[[noreturn]] void usage(const char* error) {
  std::fprintf(stderr,
               "mailflow_loadgen: %s\n"
               "usage: mailflow_loadgen --connect HOST:PORT [--mode load|idle] [--concurrency N] [--messages M]\n"
               "       [--size BYTES] [--tls none|1.2|1.3] [--duration S] [--warmup S] [--interval-ms MS]\n"
               "       [--sender-domains N] [--idle N]\n",
               error);
  std::exit(2);
}

Options parse_options(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string_view arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage("missing value");
      return argv[++i];
    };
    if (arg == "--connect") {
      std::string v = value();
      auto colon = v.rfind(':');
      if (colon == std::string::npos) usage("--connect wants HOST:PORT");
      o.host = v.substr(0, colon);
      o.port = v.substr(colon + 1);
    } else if (arg == "--mode") {
      o.mode = value();
    } else if (arg == "--concurrency") {
      o.concurrency = std::stoi(value());
    } else if (arg == "--messages") {
      o.messages = std::stoi(value());
    } else if (arg == "--size") {
      o.size = std::stoul(value());
    } else if (arg == "--tls") {
      std::string v = value();
      o.tls = v == "none" ? 0 : v == "1.2" ? 12 : v == "1.3" ? 13 : -1;
      if (o.tls < 0) usage("--tls wants none, 1.2 or 1.3");
    } else if (arg == "--duration") {
      o.duration = std::stod(value());
    } else if (arg == "--warmup") {
      o.warmup = std::stod(value());
    } else if (arg == "--interval-ms") {
      o.interval_ms = std::stod(value());
    } else if (arg == "--sender-domains") {
      o.sender_domains = std::max(1, std::stoi(value()));
    } else if (arg == "--idle") {
      o.idle = std::stoi(value());
    } else {
      usage("unknown option");
    }
  }
  if (o.mode != "load" && o.mode != "idle") usage("--mode wants load or idle");
  if (o.concurrency < 1) usage("--concurrency must be >= 1");
  return o;
}

using mailflow::bench::make_message;

constexpr auto use_awaitable = asio::use_awaitable;
auto with(error_code& ec) { return asio::redirect_error(use_awaitable, ec); }

class Connection {
 public:
  explicit Connection(asio::io_context& io) : socket_(io) {}

  asio::awaitable<void> connect(const tcp::resolver::results_type& endpoints, error_code& ec) {
    co_await asio::async_connect(socket_, endpoints, with(ec));
    if (!ec) socket_.set_option(tcp::no_delay(true), ec);
  }

  asio::awaitable<void> handshake(asio::ssl::context& context, error_code& ec) {
    tls_ = std::make_unique<asio::ssl::stream<tcp::socket&>>(socket_, context);
    co_await tls_->async_handshake(asio::ssl::stream_base::client, with(ec));
  }

  asio::awaitable<void> write(std::string_view data, error_code& ec) {
    if (tls_)
      co_await asio::async_write(*tls_, asio::buffer(data), with(ec));
    else
      co_await asio::async_write(socket_, asio::buffer(data), with(ec));
  }

  // Reads one complete (possibly multi-line) reply; returns its code, or 0 on error/garbage.
  asio::awaitable<int> reply(error_code& ec) {
    for (;;) {
      std::size_t start = 0;
      for (;;) {
        auto end = in_.find("\r\n", start);
        if (end == std::string::npos) break;
        std::string_view line(in_.data() + start, end - start);
        if (line.size() < 3) {
          ec = asio::error::invalid_argument;
          co_return 0;
        }
        if (line.size() == 3 || line[3] == ' ') {
          int code = (line[0] - '0') * 100 + (line[1] - '0') * 10 + (line[2] - '0');
          in_.erase(0, end + 2);
          co_return code;
        }
        start = end + 2;
      }
      char buffer[4096];
      std::size_t n = tls_ ? co_await tls_->async_read_some(asio::buffer(buffer), with(ec))
                           : co_await socket_.async_read_some(asio::buffer(buffer), with(ec));
      if (ec) co_return 0;
      in_.append(buffer, n);
    }
  }

  // Sends `command` and expects a reply with code `want`.
  asio::awaitable<bool> command(std::string_view command, int want, error_code& ec, std::string& error) {
    co_await write(command, ec);
    if (ec) {
      error = "write: " + ec.message();
      co_return false;
    }
    int code = co_await reply(ec);
    if (ec) {
      error = "read: " + ec.message();
      co_return false;
    }
    if (code != want) {
      error = "unexpected reply " + std::to_string(code) + " to " + std::string(command.substr(0, 4));
      co_return false;
    }
    co_return true;
  }

  void close() {
    error_code ignored;
    socket_.shutdown(tcp::socket::shutdown_both, ignored);
    socket_.close(ignored);
  }

 private:
  tcp::socket socket_;
  std::unique_ptr<asio::ssl::stream<tcp::socket&>> tls_;
  std::string in_;
};

struct Run {
  Options options;
  asio::io_context& io;
  asio::ssl::context tls_context{asio::ssl::context::tls_client};
  tcp::resolver::results_type endpoints;
  std::string message;
  Clock::time_point measure_from;
  Clock::time_point stop_at;

  std::vector<std::uint32_t> latencies_us;
  std::uint64_t messages = 0;
  std::uint64_t sessions = 0;
  // Whole run, warm-up and the tail after stop_at included: what a server's CPU time over the process's
  // lifetime is divided by (run_bench.py's CPU per message and per new session).
  std::uint64_t messages_total = 0;
  std::uint64_t sessions_opened_total = 0;
  std::uint64_t errors = 0;
  std::uint64_t sequence = 0;
  std::string first_error;

  // idle mode
  std::vector<std::unique_ptr<Connection>> held;
  int next_idle = 0;
  int idle_failed = 0;

  Run(Options o, asio::io_context& context) : options(std::move(o)), io(context) {
    SSL_CTX* ctx = tls_context.native_handle();
    int version = options.tls == 12 ? TLS1_2_VERSION : TLS1_3_VERSION;
    SSL_CTX_set_min_proto_version(ctx, version);
    SSL_CTX_set_max_proto_version(ctx, version);
    SSL_CTX_set_cipher_list(ctx, "DEFAULT:@SECLEVEL=0");
    SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, nullptr);
    // Every new session is a full handshake: no client-side session cache.
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    message = make_message(options.size);
  }

  void fail(const std::string& error) {
    ++errors;
    if (first_error.empty()) first_error = error;
  }

  // Connect, banner, EHLO, optional STARTTLS + EHLO.
  asio::awaitable<bool> open(Connection& c) {
    error_code ec;
    std::string error;
    co_await c.connect(endpoints, ec);
    if (ec) {
      fail("connect: " + ec.message());
      co_return false;
    }
    int banner = co_await c.reply(ec);
    if (ec || banner != 220) {
      fail(ec ? "banner: " + ec.message() : "banner " + std::to_string(banner));
      co_return false;
    }
    if (!co_await c.command("EHLO loadgen.bench.example\r\n", 250, ec, error)) {
      fail(error);
      co_return false;
    }
    if (options.tls != 0) {
      if (!co_await c.command("STARTTLS\r\n", 220, ec, error)) {
        fail(error);
        co_return false;
      }
      co_await c.handshake(tls_context, ec);
      if (ec) {
        fail("handshake: " + ec.message());
        co_return false;
      }
      if (!co_await c.command("EHLO loadgen.bench.example\r\n", 250, ec, error)) {
        fail(error);
        co_return false;
      }
    }
    ++sessions_opened_total;
    co_return true;
  }

  asio::awaitable<bool> send_message(Connection& c) {
    error_code ec;
    std::string error;
    const auto domain = sequence++ % static_cast<std::uint64_t>(options.sender_domains);
    const std::string mail = "MAIL FROM:<bench@d" + std::to_string(domain) + ".bench.example>\r\n";
    const auto start = Clock::now();
    bool ok = co_await c.command(mail, 250, ec, error) &&
              co_await c.command("RCPT TO:<sink@sink.example>\r\n", 250, ec, error) &&
              co_await c.command("DATA\r\n", 354, ec, error) && co_await c.command(message, 250, ec, error);
    if (!ok) {
      fail(error);
      co_return false;
    }
    const auto end = Clock::now();
    ++messages_total;
    if (end >= measure_from && end <= stop_at) {
      ++messages;
      latencies_us.push_back(
          static_cast<std::uint32_t>(std::chrono::duration_cast<std::chrono::microseconds>(end - start).count()));
    }
    co_return true;
  }

  asio::awaitable<void> worker() {
    asio::steady_timer pause(io);
    while (Clock::now() < stop_at) {
      Connection c(io);
      if (!co_await open(c)) {
        c.close();
        pause.expires_after(std::chrono::milliseconds(10));
        error_code ignored;
        co_await pause.async_wait(with(ignored));
        continue;
      }
      bool ok = true;
      for (int m = 0; (options.messages == 0 || m < options.messages) && Clock::now() < stop_at; ++m) {
        if (options.interval_ms > 0) {
          pause.expires_after(std::chrono::microseconds(static_cast<long>(options.interval_ms * 1000)));
          error_code ignored;
          co_await pause.async_wait(with(ignored));
          if (Clock::now() >= stop_at) break;
        }
        if (!(ok = co_await send_message(c))) break;
      }
      if (ok) {
        error_code ec;
        std::string error;
        if (co_await c.command("QUIT\r\n", 221, ec, error)) {
          const auto end = Clock::now();
          if (end >= measure_from && end <= stop_at) ++sessions;
        } else {
          fail(error);
        }
      }
      c.close();
    }
  }

  asio::awaitable<void> idle_opener() {
    while (next_idle < options.idle) {
      ++next_idle;
      auto c = std::make_unique<Connection>(io);
      if (co_await open(*c))
        held.push_back(std::move(c));
      else
        ++idle_failed;
    }
  }
};

std::uint32_t percentile(std::vector<std::uint32_t>& sorted, double p) {
  if (sorted.empty()) return 0;
  auto index = static_cast<std::size_t>(p * static_cast<double>(sorted.size() - 1) + 0.5);
  return sorted[std::min(index, sorted.size() - 1)];
}

std::string json_escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    if (static_cast<unsigned char>(c) < 0x20) continue;
    out += c;
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  Options options = parse_options(argc, argv);
  // Thousands of idle sessions need thousands of descriptors.
  rlimit limit{};
  if (getrlimit(RLIMIT_NOFILE, &limit) == 0) {
    limit.rlim_cur = limit.rlim_max;
    setrlimit(RLIMIT_NOFILE, &limit);
  }

  asio::io_context io(1);
  Run run(options, io);
  error_code ec;
  tcp::resolver resolver(io);
  run.endpoints = resolver.resolve(options.host, options.port, ec);
  if (ec) {
    std::fprintf(stderr, "mailflow_loadgen: cannot resolve %s:%s: %s\n", options.host.c_str(), options.port.c_str(),
                 ec.message().c_str());
    return 1;
  }

  if (options.mode == "idle") {
    const int openers = std::min(options.idle, 128);
    for (int i = 0; i < openers; ++i) asio::co_spawn(io, run.idle_opener(), asio::detached);
    io.run();
    std::printf("READY %zu %d %s\n", run.held.size(), run.idle_failed, json_escape(run.first_error).c_str());
    std::fflush(stdout);
    std::string ignored;
    while (std::getline(std::cin, ignored)) {
    }
    for (auto& c : run.held) c->close();
    return 0;
  }

  const auto start = Clock::now();
  run.measure_from = start + std::chrono::microseconds(static_cast<long>(options.warmup * 1e6));
  run.stop_at = run.measure_from + std::chrono::microseconds(static_cast<long>(options.duration * 1e6));
  for (int i = 0; i < options.concurrency; ++i) asio::co_spawn(io, run.worker(), asio::detached);
  io.run();

  std::sort(run.latencies_us.begin(), run.latencies_us.end());
  const double seconds = options.duration;
  std::printf(
      "{\"messages\": %llu, \"sessions\": %llu, \"errors\": %llu, \"duration_s\": %.3f, \"msgs_per_s\": %.1f, "
      "\"sessions_per_s\": %.1f, \"p50_us\": %u, \"p99_us\": %u, \"max_us\": %u, \"concurrency\": %d, "
      "\"messages_per_session\": %d, \"size\": %zu, \"tls\": \"%s\", \"messages_total\": %llu, "
      "\"sessions_opened_total\": %llu, \"first_error\": \"%s\"}\n",
      static_cast<unsigned long long>(run.messages), static_cast<unsigned long long>(run.sessions),
      static_cast<unsigned long long>(run.errors), seconds, static_cast<double>(run.messages) / seconds,
      static_cast<double>(run.sessions) / seconds, percentile(run.latencies_us, 0.50),
      percentile(run.latencies_us, 0.99), run.latencies_us.empty() ? 0u : run.latencies_us.back(),
      options.concurrency, options.messages, options.size,
      options.tls == 0 ? "none" : options.tls == 12 ? "TLS1.2" : "TLS1.3",
      static_cast<unsigned long long>(run.messages_total),
      static_cast<unsigned long long>(run.sessions_opened_total),
      json_escape(run.first_error).c_str());
  return 0;
}
