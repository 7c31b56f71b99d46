// The Resolver's own behaviour that needs no DNS data: its deadline (a silent server), the counters it
// feeds, the telemetry family exported with zeros, and settings libunbound refuses. Answers from a real
// authoritative server are tested end to end in tests/integration/test_dns_route.py (knotd).
#include <utility>  // before Boost.Asio (Boost 1.74 + GCC 12)

#include <doctest/doctest.h>

#include <sys/resource.h>
#include <unistd.h>
#include <array>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/udp.hpp>
#include <boost/asio/steady_timer.hpp>
#include <chrono>
#include <exception>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "daemon/resolver.hpp"
#include "daemon/telemetry.hpp"

namespace {

namespace net = boost::asio;
using mailflow::DnsOutcome;
using mailflow::MxResult;
using mailflow::Resolver;

// The exposition line of one mailflow_dns_lookups_total series, e.g. `... {result="timeout",type="MX"} 1`.
std::string dns_sample(const std::string& metrics, std::string_view type, std::string_view result) {
  const std::string head =
      "mailflow_dns_lookups_total{result=\"" + std::string(result) + "\",type=\"" + std::string(type) + "\"} ";
  const auto at = metrics.find(head);
  if (at == std::string::npos) return "<missing>";
  return metrics.substr(at + head.size(), metrics.find('\n', at) - at - head.size());
}

TEST_CASE("mailflow_dns_lookups_total: every type x result exported from the start, zeros included") {
  mailflow::Telemetry telemetry;
  const std::string metrics = telemetry.metrics_text();
  CHECK(metrics.find("# TYPE mailflow_dns_lookups_total counter") != std::string::npos);
  for (const auto type : mailflow::all_dns_types) {
    for (const auto outcome : mailflow::all_dns_outcomes) {
      CAPTURE(to_string(type));
      CAPTURE(to_string(outcome));
      CHECK(dns_sample(metrics, to_string(type), to_string(outcome)) == "0");
    }
  }
  telemetry.dns_lookup(mailflow::DnsType::aaaa, DnsOutcome::nodata);
  telemetry.dns_lookup(mailflow::DnsType::aaaa, DnsOutcome::nodata);
  CHECK(dns_sample(telemetry.metrics_text(), "AAAA", "nodata") == "2");
  CHECK(dns_sample(telemetry.metrics_text(), "A", "nodata") == "0");
}

TEST_CASE("a lookup that a silent server never answers fails as a timeout within dns.timeout") {
  net::io_context io;
  // A UDP socket that is bound (no ICMP port unreachable) and never answers.
  net::ip::udp::socket silent(io, net::ip::udp::endpoint(net::ip::make_address("127.0.0.1"), 0));
  mailflow::config::Dns dns;
  dns.servers.push_back({"127.0.0.1", silent.local_endpoint().port(), "silent"});
  dns.timeout = std::chrono::milliseconds(400);
  mailflow::Telemetry telemetry;
  std::optional<MxResult> result;
  std::exception_ptr failure;
  const auto started = std::chrono::steady_clock::now();
  {
    Resolver resolver(io.get_executor(), mailflow::resolver_settings(dns), &telemetry, 1);
    net::co_spawn(
        io, [&]() -> net::awaitable<void> { result = co_await resolver.resolve_mx("example.net"); },
        [&](std::exception_ptr e) { failure = e; });
    io.run();  // returns: an idle resolver leaves nothing pending on the loop
  }
  const auto elapsed = std::chrono::steady_clock::now() - started;
  REQUIRE_FALSE(failure);
  REQUIRE(result.has_value());
  CHECK(result->status == MxResult::Status::failed);
  CHECK(result->outcome == DnsOutcome::timeout);
  CHECK(mailflow::is_temporary(result->outcome));
  CHECK(result->detail == "no answer within 400ms");
  CHECK(elapsed >= std::chrono::milliseconds(390));
  CHECK(elapsed < std::chrono::milliseconds(2000));
  CHECK(dns_sample(telemetry.metrics_text(), "MX", "timeout") == "1");
}

TEST_CASE("AAAA and A are asked at once: both time out within one dns.timeout, not two") {
  net::io_context io;
  net::ip::udp::socket silent(io, net::ip::udp::endpoint(net::ip::make_address("127.0.0.1"), 0));
  mailflow::config::Dns dns;
  dns.servers.push_back({"127.0.0.1", silent.local_endpoint().port(), "silent"});
  dns.timeout = std::chrono::milliseconds(400);
  mailflow::Telemetry telemetry;
  std::optional<mailflow::AddressResult> result;
  const auto started = std::chrono::steady_clock::now();
  {
    Resolver resolver(io.get_executor(), mailflow::resolver_settings(dns), &telemetry, 1);
    net::co_spawn(
        io, [&]() -> net::awaitable<void> { result = co_await resolver.resolve_addresses("mx1.example.net"); },
        [](std::exception_ptr) {});
    io.run();
  }
  const auto elapsed = std::chrono::steady_clock::now() - started;
  REQUIRE(result.has_value());
  CHECK(result->status == mailflow::AddressResult::Status::failed);
  CHECK(result->aaaa == DnsOutcome::timeout);
  CHECK(result->a == DnsOutcome::timeout);
  CHECK(result->addresses.empty());
  CHECK(elapsed < std::chrono::milliseconds(790));
  const std::string metrics = telemetry.metrics_text();
  CHECK(dns_sample(metrics, "AAAA", "timeout") == "1");
  CHECK(dns_sample(metrics, "A", "timeout") == "1");
}

TEST_CASE("cancel() gives up one shared Resolver's lookups at once, and not the others'") {
  net::io_context io;
  net::ip::udp::socket silent(io, net::ip::udp::endpoint(net::ip::make_address("127.0.0.1"), 0));
  mailflow::config::Dns dns;
  dns.servers.push_back({"127.0.0.1", silent.local_endpoint().port(), "silent"});
  dns.timeout = std::chrono::milliseconds(1500);
  mailflow::Telemetry telemetry;
  std::optional<mailflow::AddressResult> cancelled;
  std::optional<MxResult> later;
  std::optional<MxResult> other;
  std::chrono::steady_clock::duration cancelled_after{};
  const auto started = std::chrono::steady_clock::now();
  {
    auto loop =
        std::make_shared<Resolver>(io.get_executor(), mailflow::resolver_settings(dns), &telemetry, 1);
    auto session = Resolver::share(loop);
    auto bystander = Resolver::share(loop);
    net::co_spawn(
        io,
        [&]() -> net::awaitable<void> {
          cancelled = co_await session->resolve_addresses("mx1.example.net");
          cancelled_after = std::chrono::steady_clock::now() - started;
          later = co_await session->resolve_mx("example.net");  // after cancel(): given up before it starts
        },
        [](std::exception_ptr) {});
    net::co_spawn(
        io, [&]() -> net::awaitable<void> { other = co_await bystander->resolve_mx("example.org"); },
        [](std::exception_ptr) {});
    net::steady_timer timer(io, std::chrono::milliseconds(100));
    timer.async_wait([&](boost::system::error_code) { session->cancel(); });
    loop.reset();  // the shared ones keep its context
    io.run();
  }
  REQUIRE(cancelled.has_value());
  CHECK(cancelled->status == mailflow::AddressResult::Status::failed);
  CHECK(cancelled->aaaa == DnsOutcome::error);
  CHECK(cancelled->a == DnsOutcome::error);
  CHECK(cancelled_after < std::chrono::milliseconds(1000));  // at once, not at dns.timeout
  REQUIRE(later.has_value());
  CHECK(later->outcome == DnsOutcome::error);
  CHECK(later->detail == "cancelled");
  REQUIRE(other.has_value());
  CHECK(other->outcome == DnsOutcome::timeout);  // the other user's lookup waited for its own deadline
  const std::string metrics = telemetry.metrics_text();
  CHECK(dns_sample(metrics, "AAAA", "error") == "0");  // a lookup given up is no DNS result
  CHECK(dns_sample(metrics, "MX", "error") == "0");
  CHECK(dns_sample(metrics, "MX", "timeout") == "1");
}

// The sanitizers' runtime needs descriptors of its own at the limit
// (harness.skip_out_of_descriptors_if_sanitized).
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
constexpr bool kSanitized = true;
#else
constexpr bool kSanitized = false;
#endif

TEST_CASE(
    "a query libunbound had no socket for is local_resources though a descriptor is free by its answer" *
    doctest::skip(kSanitized)) {
  net::io_context io;
  net::ip::udp::socket silent(io, net::ip::udp::endpoint(net::ip::make_address("127.0.0.1"), 0));
  mailflow::config::Dns dns;
  dns.servers.push_back({"127.0.0.1", silent.local_endpoint().port(), "silent"});
  dns.timeout = std::chrono::milliseconds(3000);
  mailflow::Telemetry telemetry;
  Resolver resolver(io.get_executor(), mailflow::resolver_settings(dns), &telemetry, 1);
  std::optional<mailflow::AddressResult> result;
  // A first lookup, answered by libunbound itself, starts its worker thread (its event base is a descriptor).
  net::co_spawn(
      io, [&]() -> net::awaitable<void> { result = co_await resolver.resolve_addresses("localhost"); },
      [](std::exception_ptr) {});
  io.run();
  REQUIRE(result.has_value());
  REQUIRE(result->status == mailflow::AddressResult::Status::addresses);
  result.reset();
  io.restart();
  net::co_spawn(
      io, [&]() -> net::awaitable<void> { result = co_await resolver.resolve_addresses("mx1.example.net"); },
      [](std::exception_ptr) {});
  // No new descriptor while the queries are sent: the limit is the lowest free number.
  rlimit saved{};
  REQUIRE(::getrlimit(RLIMIT_NOFILE, &saved) == 0);
  const int lowest_free = ::dup(2);
  REQUIRE(lowest_free >= 0);
  ::close(lowest_free);
  rlimit low = saved;
  low.rlim_cur = static_cast<rlim_t>(lowest_free);
  REQUIRE(::setrlimit(RLIMIT_NOFILE, &low) == 0);
  io.poll();  // the queries are handed to libunbound's worker, which cannot make their sockets
  std::this_thread::sleep_for(std::chrono::milliseconds(1000));  // and answers SERVFAIL
  // A descriptor is free again before the loop takes the answers (another session closed its connection).
  REQUIRE(::setrlimit(RLIMIT_NOFILE, &saved) == 0);
  io.run();
  REQUIRE(result.has_value());
  CHECK(result->aaaa == DnsOutcome::local_resources);
  CHECK(result->a == DnsOutcome::local_resources);
  CHECK(result->local_failure());
  CHECK(resolver.spoiled());  // its cache holds those SERVFAILs: the loop makes a new context
  CHECK(result->detail.find("Too many open files") != std::string::npos);
  const std::string metrics = telemetry.metrics_text();
  CHECK(dns_sample(metrics, "A", "local_resources") == "1");
  CHECK(dns_sample(metrics, "A", "servfail") == "0");
}

TEST_CASE("settings libunbound refuses are an error at construction, with its reason") {
  net::io_context io;
  mailflow::config::Dns dns;
  dns.trust_anchor_file = "/nonexistent/root.key";
  CHECK_THROWS_WITH_AS(Resolver(io.get_executor(), mailflow::resolver_settings(dns), nullptr),
                       doctest::Contains("dns: dns.trust_anchor_file /nonexistent/root.key: cannot open it"),
                       std::runtime_error);
}

}  // namespace

namespace {

TEST_CASE("trust anchor file: read once, when the settings are made - unreadable or empty is a problem") {
  const auto path =
      std::filesystem::temp_directory_path() / ("mailflow-anchor-" + std::to_string(::getpid()));
  std::ofstream(path) << ". IN DS 1 13 2 ABCD\n";
  mailflow::config::Dns dns;
  dns.trust_anchor_file = path.string();
  const auto settings = mailflow::resolver_settings(dns);
  std::ofstream(path) << "; emptied after the read\n";
  CHECK(settings.problem.empty());
  CHECK(settings.trust_anchors == std::vector<std::string>{". IN DS 1 13 2 ABCD"});
  CHECK(mailflow::resolver_settings(dns).problem.find("no record") != std::string::npos);
  CHECK(mailflow::resolver_settings(dns).key != settings.key);
  std::filesystem::remove(path);
  CHECK(mailflow::resolver_settings(dns).problem.find("cannot open it") != std::string::npos);
}

TEST_CASE("trust anchor file: a directory in its place is a problem that says why, not an exception") {
  // It opens and every read fails (EISDIR). std::ifstream threw from the library here
  // ("basic_filebuf::underflow error reading the file"), past the settings' problem, as it did for
  // resolv.conf and /etc/hosts.
  const auto dir =
      std::filesystem::temp_directory_path() / ("mailflow-anchor-dir-" + std::to_string(::getpid()));
  std::filesystem::create_directory(dir);
  mailflow::config::Dns dns;
  dns.servers.push_back({"127.0.0.1", 53, "local"});
  dns.trust_anchor_file = dir.string();
  mailflow::ResolverSettings settings;
  CHECK_NOTHROW(settings = mailflow::resolver_settings(dns));
  std::filesystem::remove(dir);
  CHECK(settings.problem == "dns.trust_anchor_file " + dir.string() + ": cannot read it: Is a directory");
  CHECK(settings.trust_anchors.empty());
}

}  // namespace

namespace {

TEST_CASE("with_hosts_file: its names answered first in its order and others asked of DNS") {
  net::io_context io;
  net::ip::udp::socket silent(io, net::ip::udp::endpoint(net::ip::make_address("127.0.0.1"), 0));
  mailflow::config::Dns dns;
  dns.servers.push_back({"127.0.0.1", silent.local_endpoint().port(), "silent"});
  dns.timeout = std::chrono::milliseconds(300);
  const auto path = std::filesystem::temp_directory_path() / ("mailflow-hosts-" + std::to_string(::getpid()));
  std::ofstream(path) << "# comment\n127.0.0.9 store.example.org store\n127.0.0.8 store.example.org\n"
                         "::1 v6.example.org\n";
  const auto plain = mailflow::resolver_settings(dns);
  const std::vector<std::string> names{"store.example.org", "v6.example.org", "absent.example.org",
                                       "other.example.org"};
  std::string problem;
  const auto hosts =
      mailflow::with_hosts_file(plain, path.string(), "/nonexistent/resolv.conf", names, problem);
  CHECK(problem.empty());
  CHECK(hosts.hosts_file == path.string());
  CHECK(hosts.key != plain.key);
  std::ofstream(path, std::ios::app) << "127.0.0.7 other.example.org\n";
  CHECK(mailflow::with_hosts_file(plain, path.string(), "/nonexistent/resolv.conf", names, problem).key !=
        hosts.key);  // a reload after a change: new resolvers

  mailflow::Telemetry telemetry;
  std::vector<mailflow::AddressResult> from_hosts;
  std::optional<mailflow::AddressResult> from_plain;
  const auto started = std::chrono::steady_clock::now();
  {
    Resolver with(io.get_executor(), hosts, &telemetry, 1);
    Resolver without(io.get_executor(), plain, &telemetry, 1);
    net::co_spawn(
        io,
        [&]() -> net::awaitable<void> {
          std::vector<std::string> names{"store.example.org", "v6.example.org", "absent.example.org",
                                         "other.example.org"};
          from_hosts = co_await with.resolve_addresses(std::move(names));
        },
        [](std::exception_ptr) {});
    net::co_spawn(
        io,
        [&]() -> net::awaitable<void> {
          from_plain = co_await without.resolve_addresses("store.example.org");
        },
        [](std::exception_ptr) {});
    io.run();
  }
  std::filesystem::remove(path);
  REQUIRE(from_hosts.size() == 4);
  // Added to the file after the settings were made: not used until new ones are (a reload).
  CHECK(from_hosts[3].status == mailflow::AddressResult::Status::failed);
  CHECK(from_hosts[0].status == mailflow::AddressResult::Status::addresses);
  REQUIRE(from_hosts[0].addresses.size() == 2);
  CHECK(from_hosts[0].addresses[0].to_string() == "127.0.0.9");  // the file's order
  CHECK(from_hosts[0].addresses[1].to_string() == "127.0.0.8");
  CHECK(from_hosts[0].aaaa == DnsOutcome::nodata);  // the name is there: no AAAA asked of DNS
  REQUIRE(from_hosts[1].addresses.size() == 1);
  CHECK(from_hosts[1].addresses[0].to_string() == "::1");
  CHECK(from_hosts[2].status == mailflow::AddressResult::Status::failed);  // not there: DNS, which is silent
  CHECK(from_hosts[2].a == DnsOutcome::timeout);
  REQUIRE(from_plain.has_value());
  CHECK(from_plain->status == mailflow::AddressResult::Status::failed);  // the MX walk's resolver: DNS only
  CHECK(from_plain->a == DnsOutcome::timeout);
  CHECK(std::chrono::steady_clock::now() - started < std::chrono::milliseconds(1500));
}

TEST_CASE("with_hosts_file: only the fixed upstreams' names as written are kept, however long the file") {
  const auto dir = std::filesystem::temp_directory_path();
  const auto path = dir / ("mailflow-big-hosts-" + std::to_string(::getpid()));
  const auto resolv = dir / ("mailflow-big-resolv-" + std::to_string(::getpid()));
  {
    std::ofstream out(path);
    out << "10.0.0.1 Store\n10.0.0.2 other\n10.0.0.3 store.corp.example. store.corp.example alias\n"
           "10.0.0.4 mail.example.org\n10.0.0.5 MAIL.example.org.\n";
    for (int i = 0; i < 100000; ++i)
      out << "10.1." << i / 256 % 256 << "." << i % 256 << " host" << i << ".example\n";
  }
  std::ofstream(resolv) << "search corp.example\n";
  mailflow::config::Dns dns;
  dns.servers.push_back({"127.0.0.1", 53, "local"});
  const auto plain = mailflow::resolver_settings(dns);
  const std::vector<std::string> names{"store", "mail.example.org."};
  std::string problem;
  const auto hosts = mailflow::with_hosts_file(plain, path.string(), resolv.string(), names, problem);
  // Each name as written, as getaddrinfo asks the files service (`getent ahosts`): the records of "store" and
  // "mail.example.org.", any case, the final dot part of the name, in the file's order; not
  // store.corp.example, which the search list makes of "store" and which glibc asks of DNS alone, nor
  // "mail.example.org" without the dot; none of the 100,000 others.
  CHECK(hosts.hosts_records == std::vector<std::string>{"Store A 10.0.0.1", "MAIL.example.org. A 10.0.0.5"});
  // Another name of the file changed: the same settings, the loops' resolvers kept at a reload.
  std::ofstream(path, std::ios::app) << "10.0.0.9 other store.corp.example mail.example.org\n";
  CHECK(mailflow::with_hosts_file(plain, path.string(), resolv.string(), names, problem).key == hosts.key);
  std::ofstream(path, std::ios::app) << "10.0.0.8 store\n";
  CHECK(mailflow::with_hosts_file(plain, path.string(), resolv.string(), names, problem).key != hosts.key);
  std::filesystem::remove(path);
  std::filesystem::remove(resolv);
}

TEST_CASE("with_hosts_file: a file that does not exist leaves DNS alone, and is no problem") {
  net::io_context io;
  mailflow::config::Dns dns;
  dns.servers.push_back({"127.0.0.1", 53, "local"});
  std::string problem = "stale";
  const auto settings = mailflow::with_hosts_file(
      mailflow::resolver_settings(dns), "/nonexistent/mailflow-hosts", "/nonexistent/r", {"store"}, problem);
  CHECK(problem.empty());
  CHECK_NOTHROW(Resolver(io.get_executor(), settings, nullptr));
}

TEST_CASE("with_hosts_file: a file that exists and cannot be read leaves DNS alone, and says why") {
  // A directory mounted in its place: it opens and every read fails (EISDIR). Its search list is still read.
  const auto dir =
      std::filesystem::temp_directory_path() / ("mailflow-hosts-dir-" + std::to_string(::getpid()));
  const auto resolv =
      std::filesystem::temp_directory_path() / ("mailflow-dir-resolv-" + std::to_string(::getpid()));
  std::filesystem::create_directory(dir);
  std::ofstream(resolv) << "search corp.example\n";
  net::io_context io;
  mailflow::config::Dns dns;
  dns.servers.push_back({"127.0.0.1", 53, "local"});
  std::string problem;
  const auto settings = mailflow::with_hosts_file(mailflow::resolver_settings(dns), dir.string(),
                                                  resolv.string(), {"store"}, problem);
  std::filesystem::remove(dir);
  std::filesystem::remove(resolv);
  CHECK(problem == dir.string() + ": cannot read it: Is a directory");
  CHECK(settings.hosts_records.empty());
  CHECK(settings.search == std::vector<std::string>{"corp.example"});
  CHECK_NOTHROW(Resolver(io.get_executor(), settings, nullptr));
}

TEST_CASE("resolvers made and deleted on several event loops at once: each one set up whole") {
  // Every event loop makes its own resolvers and a reload replaces them on all loops at once. libunbound sets
  // up process-wide state when a context is first used (context_finalize: listen_setup_locks, the log file)
  // and tears it down in ub_ctx_delete of any context (listen_desetup_locks): a context set up on one loop
  // while another loop deleted one initialised and destroyed the same global mutexes at once (the tsan
  // preset reported it, test_threads.py). Each constructor's first use is serialised with the deletes now.
  mailflow::config::Dns dns;
  dns.servers.push_back({"127.0.0.1", 9, "unused"});  // the constructor's own probe is answered locally
  const auto settings = mailflow::resolver_settings(dns);
  constexpr int kPerLoop = 25;
  std::array<int, 3> made{};
  std::array<std::string, 3> failed;
  std::vector<std::thread> loops;
  for (std::size_t loop = 0; loop < made.size(); ++loop) {
    loops.emplace_back([&, loop] {
      net::io_context io;
      std::shared_ptr<Resolver> previous;
      for (int i = 0; i < kPerLoop; ++i) {
        try {
          // Deletes the one made before, as a reload's new resolver replaces the loop's old one.
          previous = std::make_shared<Resolver>(io.get_executor(), settings, nullptr);
          ++made[loop];
        } catch (const std::exception& e) {
          failed[loop] = e.what();
        }
      }
    });
  }
  for (auto& loop : loops) loop.join();
  for (std::size_t loop = 0; loop < made.size(); ++loop) {
    CAPTURE(loop);
    CHECK(failed[loop] == "");
    CHECK(made[loop] == kPerLoop);
  }
}

}  // namespace
