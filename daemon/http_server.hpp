#pragma once
// The HTTP side (Boost.Beast, same io_context as the relay): /metrics, /, /api/v1/report, /api/v1/report.csv,
// /api/v1/report.txt, /healthz, /readyz. Optional basic auth (crypt(3) hash) and TLS from config.http.
#include <functional>
#include <memory>

#include "config/config.hpp"

namespace boost::asio {
class io_context;
}

namespace mailflow {

class Telemetry;

class HttpServer {
 public:
  // `ready` answers /readyz (200 when true, 503 otherwise).
  HttpServer(boost::asio::io_context& io, const config::Http& http, Telemetry& telemetry,
             std::function<bool()> ready);
  ~HttpServer();

  // Binds (throws std::system_error with a clear message when the address is unusable: startup error).
  void start();
  // Stops accepting and closes open HTTP connections.
  void stop();
  // SIGHUP: new basic_auth and TLS certificate/key for connections accepted from now on (the address needs a
  // restart). Throws std::system_error and keeps the old settings when the certificate or key is unusable.
  void update(const config::Http& http);
  // The bound port (after start(); useful with port 0 in tests).
  unsigned short port() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace mailflow
