#pragma once
// The HTTP side (Boost.Beast): /metrics, /, /api/v1/report, /api/v1/report.csv, /api/v1/report.txt, /healthz,
// /readyz. Optional basic auth (crypt(3) hash) and TLS from config.http. Runs on a thread and event loop of its
// own (not the relay's), with one more thread for password checks; connections are capped in total and per
// client address, and every refusal is counted in mailflow_http_rejects_total{reason}.
#include <functional>
#include <memory>
#include <optional>

#include "config/config.hpp"
#include "daemon/tls.hpp"  // CertificateInfo

namespace mailflow {

class Telemetry;

class HttpServer {
 public:
  // `ready` answers /readyz (200 when true, 503 otherwise); it and `telemetry` are used on the HTTP thread.
  HttpServer(const config::Http& http, Telemetry& telemetry, std::function<bool()> ready);
  // Stops, then waits for the HTTP thread (a password check in progress finishes first).
  ~HttpServer();

  // Binds (throws std::system_error with a clear message when the address is unusable: startup error), then
  // starts the HTTP thread.
  void start();
  // Any thread: stops accepting and closes open HTTP connections; returns without waiting for them.
  void stop();
  // What a reload can change of http: basic_auth and http.tls's pair, loaded.
  struct Settings;
  // Loads http.tls's pair as start() does, for update(): throws (naming the file) when the certificate or key
  // is unusable, and changes nothing that runs. A reload loads everything before it applies any of it.
  static std::shared_ptr<const Settings> prepare(const config::Http& http);
  // SIGHUP: `next` (from prepare()) in force, cannot fail: its basic_auth for every request from now on (on
  // kept-alive connections too), its TLS certificate/key for connections accepted from now on (the address
  // needs a restart).
  void update(std::shared_ptr<const Settings> next);
  // Loads http.tls's pair as start() and prepare() do (OpenSSL's default security level, not a listener's):
  // throws what they would throw. For --check-config.
  static void check_tls(const config::CertificatePair& pair);
  // Any thread: http.tls's certificate as start() loaded it or the last update() put it in force, the one new
  // connections get; none without http.tls.
  std::optional<CertificateInfo> certificate() const;
  // The bound port (after start(); useful with port 0 in tests).
  unsigned short port() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace mailflow
