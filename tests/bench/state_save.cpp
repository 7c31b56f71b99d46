// How long the minute's state save takes with a large state: Telemetry's files (windows, remotes, TLS-RPT)
// serialized (under Telemetry's mutex) and then written (write, fsync, rename, fsync(dir)), timed apart.
//   mailflow_state_save_bench STATE_DIR [connectors per direction=1000] [days=90] [remotes per
//   connector-day=20]
// Meanwhile a thread opens and closes sessions (Telemetry::session_opened, as every new connection does) and
// the longest of those calls is reported: how long an event loop would wait on Telemetry's mutex. Every
// connector gets a message in every hour of the window (one TLS version per hour, in turn) and `remotes`
// distinct remote addresses per day (outbound: with a destination domain each).
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "daemon/state_file.hpp"
#include "daemon/telemetry.hpp"

using namespace std::chrono;
namespace config = mailflow::config;

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s STATE_DIR [connectors] [days] [remotes]\n", argv[0]);
    return 2;
  }
  const std::string dir = argv[1];
  const int connectors = argc > 2 ? std::atoi(argv[2]) : 1000;
  const int days = argc > 3 ? std::atoi(argv[3]) : 90;
  const int remotes = argc > 4 ? std::atoi(argv[4]) : 20;

  const auto start = sys_days(year{2026} / 11 / 1) + hours(12);
  auto now = start;
  mailflow::Telemetry telemetry([&now] { return now; });
  config::Config cfg;
  cfg.telemetry.window = hours(24 * days);
  for (const auto direction : {config::Direction::inbound, config::Direction::outbound}) {
    config::Listener listener;
    listener.name = direction == config::Direction::inbound ? "inbound" : "outbound";
    listener.direction = direction;
    listener.upstream = "sink";
    cfg.listeners.push_back(listener);
    for (int i = 0; i < connectors; ++i) {
      config::Connector connector;
      connector.name = listener.name.substr(0, 3) + "-" + std::to_string(i);
      connector.direction = direction;
      cfg.connectors.push_back(connector);
    }
  }
  telemetry.configure(cfg);

  const auto fill_started = steady_clock::now();
  std::vector<std::string> domain(1);
  for (int hour = 0; hour < days * 24; ++hour) {
    now = start + hours(hour);
    for (const auto& connector : cfg.connectors) {
      const auto version = mailflow::proto::all_tls_versions[hour % mailflow::proto::all_tls_versions.size()];
      const bool outbound = connector.direction == config::Direction::outbound;
      // The day's remotes arrive in its first hours, one per hour each.
      const int r = hour % 24;
      if (r < remotes || hour % 24 == 23) {
        for (int k = r; k < (hour % 24 == 23 ? remotes : r + 1); ++k) {
          const std::string address =
              "198.51." + std::to_string(k % 256) + "." + std::to_string((k / 256 + hour / 24) % 256);
          domain[0] = "d" + std::to_string(k) + ".example";
          const mailflow::Remote remote{
              address, "mx.example", "TLS_AES_256_GCM_SHA384",
              outbound ? std::span<const std::string>(domain) : std::span<const std::string>(),
              outbound ? "none" : ""};
          telemetry.message_delivered(connector.name, connector.direction, version, 10'000, 1, remote);
        }
      } else {
        telemetry.message_delivered(connector.name, connector.direction, version, 10'000, 1);
      }
    }
  }
  const double fill_s = duration<double>(steady_clock::now() - fill_started).count();

  for (int round = 0; round < 3; ++round) {
    std::atomic<bool> done{false};
    std::atomic<bool> sessions_started{false};
    steady_clock::duration longest{};
    std::thread sessions([&] {
      while (!done) {
        const auto before = steady_clock::now();
        telemetry.session_opened("inbound");
        telemetry.session_closed("inbound", 0.1);
        longest = std::max(longest, steady_clock::now() - before);
        sessions_started = true;
        std::this_thread::sleep_for(microseconds(100));
      }
    });
    while (!sessions_started) std::this_thread::yield();
    const auto t0 = steady_clock::now();
    const auto files = telemetry.state_files();
    const auto t1 = steady_clock::now();
    done = true;
    sessions.join();
    std::size_t bytes = 0;
    for (const auto& file : files) {
      std::string error;
      if (!mailflow::write_state_file(dir, file.name, file.text, error)) {
        std::fprintf(stderr, "%s\n", error.c_str());
        return 1;
      }
      bytes += file.text.size();
    }
    const auto t2 = steady_clock::now();
    std::printf(
        "connectors=%d/direction days=%d remotes=%d (filled in %.1f s): %zu bytes in %zu files, "
        "serialize %.1f ms (longest session_opened meanwhile %.1f ms), write %.1f ms\n",
        connectors, days, remotes, fill_s, bytes, files.size(), duration<double, std::milli>(t1 - t0).count(),
        duration<double, std::milli>(longest).count(), duration<double, std::milli>(t2 - t1).count());
  }
  return 0;
}
