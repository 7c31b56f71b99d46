#include "daemon/report_cli.hpp"

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/ssl.hpp>
#include <charconv>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <optional>
#include <string>
#include <string_view>
#include <utility>  // before Boost.Asio (Boost 1.74 + GCC 12)

#include "config/config.hpp"

#ifndef MAILFLOW_VERSION
#define MAILFLOW_VERSION "dev"
#endif

namespace mailflow {
namespace {

namespace beast = boost::beast;
namespace http = boost::beast::http;
namespace net = boost::asio;
using tcp = boost::asio::ip::tcp;

constexpr std::string_view kUsage =
    "usage: mailflowd report [--config FILE] [--url http://127.0.0.1:9725] [--days N] [--format table|json|csv]\n"
    "                        [--summary | --connector NAME | --domains]\n"
    "                        [--user USER] [--password-file FILE] [--ca-file FILE] [--insecure]\n"
    "  --config         read http.address (https:// when http.tls is set) and http.basic_auth's user from\n"
    "                   the daemon's configuration file\n"
    "  --url            where the daemon's HTTP side listens (default http://127.0.0.1:9725; overrides\n"
    "                   --config's address); https:// when http.tls is set\n"
    "  --days           UTC days to show, today included (default 7, at most the telemetry window)\n"
    "  --format         table (default), json or csv\n"
    "  --connector      the drill-down of one connector: its remote servers (and, outbound, destination\n"
    "                   domains) with messages per TLS version, legacy TLS first. --format csv: every\n"
    "                   connector's servers (/api/v1/remotes.csv); json: the whole report\n"
    "  --domains        the destination domains of every outbound connector (csv: /api/v1/domains.csv)\n"
    "  --summary        only the whole-window summary per connector (messages per TLS version), not the days\n"
    "  --user           basic auth user (http.basic_auth.user; default: --config's)\n"
    "  --password-file  basic auth password: the first line of FILE; else the environment variable\n"
    "                   MAILFLOWD_PASSWORD. (http://user:password@host:port works too, but shows in ps.)\n"
    "  --ca-file        PEM file of CA certificates to verify an https:// server with (default: system store)\n"
    "  --insecure       https:// without certificate verification (self-signed certificates)\n";

struct Url {
  bool https = false;
  std::string host;  // without brackets
  std::string port = "80";
  std::string base_path;  // "" or "/prefix" (no trailing slash)
  std::string userinfo;   // "user:password" or ""
};

std::optional<Url> parse_url(std::string_view text, std::string& error) {
  Url url;
  if (text.starts_with("http://")) {
    text.remove_prefix(7);
  } else if (text.starts_with("https://")) {
    text.remove_prefix(8);
    url.https = true;
    url.port = "443";
  } else if (text.find("://") != std::string_view::npos) {
    error = "only http:// and https:// URLs are supported";
    return std::nullopt;
  }
  const auto slash = text.find('/');
  std::string_view authority = text.substr(0, slash);
  if (slash != std::string_view::npos) {
    std::string_view path = text.substr(slash);
    while (!path.empty() && path.back() == '/') path.remove_suffix(1);
    url.base_path = std::string(path);
  }
  if (const auto at = authority.rfind('@'); at != std::string_view::npos) {
    url.userinfo = std::string(authority.substr(0, at));
    authority.remove_prefix(at + 1);
  }
  std::string_view port;
  if (authority.starts_with('[')) {
    const auto close = authority.find(']');
    if (close == std::string_view::npos) {
      error = "unterminated [IPv6] address";
      return std::nullopt;
    }
    url.host = std::string(authority.substr(1, close - 1));
    std::string_view after = authority.substr(close + 1);
    if (!after.empty()) {
      if (after[0] != ':') {
        error = "unexpected text after ]";
        return std::nullopt;
      }
      port = after.substr(1);
    }
  } else {
    const auto colon = authority.rfind(':');
    url.host = std::string(authority.substr(0, colon));
    if (colon != std::string_view::npos) port = authority.substr(colon + 1);
  }
  if (url.host.empty()) {
    error = "no host";
    return std::nullopt;
  }
  if (!port.empty()) {
    unsigned value = 0;
    const auto [ptr, ec] = std::from_chars(port.data(), port.data() + port.size(), value);
    if (ec != std::errc() || ptr != port.data() + port.size() || value == 0 || value > 65535) {
      error = "bad port \"" + std::string(port) + "\"";
      return std::nullopt;
    }
    url.port = std::string(port);
  }
  return url;
}

std::string base64(std::string_view in) {
  static constexpr char table[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  std::size_t i = 0;
  for (; i + 2 < in.size(); i += 3) {
    const unsigned v = (static_cast<unsigned char>(in[i]) << 16) |
                       (static_cast<unsigned char>(in[i + 1]) << 8) | static_cast<unsigned char>(in[i + 2]);
    out += table[(v >> 18) & 63];
    out += table[(v >> 12) & 63];
    out += table[(v >> 6) & 63];
    out += table[v & 63];
  }
  if (i + 1 == in.size()) {
    const unsigned v = static_cast<unsigned char>(in[i]) << 16;
    out += table[(v >> 18) & 63];
    out += table[(v >> 12) & 63];
    out += "==";
  } else if (i + 2 == in.size()) {
    const unsigned v =
        (static_cast<unsigned char>(in[i]) << 16) | (static_cast<unsigned char>(in[i + 1]) << 8);
    out += table[(v >> 18) & 63];
    out += table[(v >> 12) & 63];
    out += table[(v >> 6) & 63];
    out += '=';
  }
  return out;
}

struct Fetch {
  unsigned status = 0;
  std::string reason;
  std::string server;  // the Server: header, "mailflowd/VERSION" from a daemon
  std::string body;
  std::string error;  // non-empty: no usable answer
};

struct TlsOptions {
  bool insecure = false;  // no certificate verification (self-signed dev certificates)
  std::string ca_file;    // empty: the system's trust store
};

bool is_ip_literal(const std::string& host) {
  beast::error_code ec;
  net::ip::make_address(host, ec);
  return !ec;
}

// One GET over `stream` (plain or TLS), every step with its own deadline. Everything lives in fetch()'s
// frame, which outlives io.run(), so the handlers capture by reference.
class Exchange {
 public:
  Exchange(const Url& url, const std::string& target, std::chrono::milliseconds timeout, Fetch& result)
      : timeout_(timeout), result_(result), where_(authority(url)) {
    parser_.body_limit(1024ull * 1024 * 1024);  // a 90-day report over many connectors is tens of MB
    request_ = {http::verb::get, target, 11};
    request_.set(http::field::host, where_);
    request_.set(http::field::user_agent, "mailflowd-report/" MAILFLOW_VERSION);
    request_.set(http::field::connection, "close");
    if (!url.userinfo.empty()) request_.set(http::field::authorization, "Basic " + base64(url.userinfo));
    plain_ = !url.https;
  }

  static std::string authority(const Url& url) {
    const bool v6 = url.host.find(':') != std::string::npos;
    return (v6 ? "[" + url.host + "]" : url.host) + ":" + url.port;
  }

  void failed(std::string_view what, const beast::error_code& ec, std::string_view hint = {}) {
    const bool timed_out = ec == beast::error::timeout;
    result_.error =
        std::string(what) + " " + where_ + ": " + (timed_out ? std::string("timed out") : ec.message());
    if (!hint.empty()) result_.error += std::string(" ") + std::string(hint);
  }

  template <class Stream, class Connected>
  void start(net::io_context& io, Stream& stream, const Url& url, Connected connected) {
    resolver_.emplace(io);
    resolver_->async_resolve(
        url.host, url.port,
        [this, &stream, connected](beast::error_code ec, tcp::resolver::results_type endpoints) {
          if (ec) return failed("cannot resolve", ec);
          beast::get_lowest_layer(stream).expires_after(timeout_);
          beast::get_lowest_layer(stream).async_connect(
              endpoints, [this, connected](beast::error_code ec, const tcp::endpoint&) {
                if (ec) return failed("cannot connect to", ec);
                connected();
              });
        });
  }

  template <class Stream>
  void send(Stream& stream) {
    beast::get_lowest_layer(stream).expires_after(timeout_);
    http::async_write(stream, request_, [this, &stream](beast::error_code ec, std::size_t) {
      if (ec) return failed("cannot send the request to", ec);
      beast::get_lowest_layer(stream).expires_after(timeout_);
      http::async_read(stream, buffer_, parser_, [this, &stream](beast::error_code ec, std::size_t) {
        // A TLS peer that closes without close_notify after a complete answer is not an error here.
        if (ec && !(ec == net::ssl::error::stream_truncated && parser_.is_done()))
          return failed("no valid HTTP answer from", ec, plain_ ? tls_hint() : "");
        const auto& response = parser_.get();
        result_.status = response.result_int();
        result_.reason = std::string(response.reason());
        result_.server = std::string(response[http::field::server]);
        result_.body = response.body();
        beast::error_code ignored;
        beast::get_lowest_layer(stream).socket().shutdown(tcp::socket::shutdown_both, ignored);
      });
    });
  }

  std::chrono::milliseconds timeout() const { return timeout_; }


 private:
  // A TLS server that gets a plaintext request answers with a TLS record (an alert, 0x15, or a handshake,
  // 0x16, then version 3.x) or closes without a byte; an HTTP server's answer starts with "HTTP/".
  std::string_view tls_hint() const {
    if (buffer_.size() == 0)
      return "(it closed without answering: if http.tls is set there, use an https:// URL)";
    const auto* bytes = static_cast<const unsigned char*>(buffer_.data().data());
    if ((bytes[0] == 0x15 || bytes[0] == 0x16) && (buffer_.size() < 2 || bytes[1] == 0x03))
      return "(it answered in TLS: http.tls is set there, use an https:// URL; --insecure for a self-signed "
             "certificate)";
    return {};
  }

  bool plain_ = true;
  std::chrono::milliseconds timeout_;
  Fetch& result_;
  std::string where_;
  std::optional<tcp::resolver> resolver_;
  http::request<http::empty_body> request_;
  beast::flat_buffer buffer_;
  http::response_parser<http::string_body> parser_;
};

Fetch fetch(const Url& url, const std::string& target, const TlsOptions& tls,
            std::chrono::milliseconds timeout) {
  Fetch result;
  net::io_context io;
  Exchange exchange(url, target, timeout, result);
  if (!url.https) {
    beast::tcp_stream stream(io);
    exchange.start(io, stream, url, [&] { exchange.send(stream); });
    io.run();
    return result;
  }

  net::ssl::context context(net::ssl::context::tls_client);
  beast::error_code ec;
  if (tls.insecure) {
    context.set_verify_mode(net::ssl::verify_none);
  } else {
    context.set_verify_mode(net::ssl::verify_peer);
    if (tls.ca_file.empty())
      context.set_default_verify_paths(ec);
    else
      context.load_verify_file(tls.ca_file, ec);
    if (ec) {
      result.error = "cannot load CA certificates" +
                     (tls.ca_file.empty() ? std::string() : " from " + tls.ca_file) + ": " + ec.message();
      return result;
    }
  }
  beast::ssl_stream<beast::tcp_stream> stream(io, context);
  if (!tls.insecure) stream.set_verify_callback(net::ssl::host_name_verification(url.host));
  if (!is_ip_literal(url.host)) SSL_set_tlsext_host_name(stream.native_handle(), url.host.c_str());
  exchange.start(io, stream, url, [&] {
    beast::get_lowest_layer(stream).expires_after(exchange.timeout());
    stream.async_handshake(net::ssl::stream_base::client, [&](beast::error_code ec) {
      if (ec) {
        // OpenSSL's words for a peer that answers a ClientHello with something that is not TLS (plain HTTP).
        const std::string message = ec.message();
        if (message.find("wrong version number") != std::string::npos ||
            message.find("packet length too long") != std::string::npos ||
            message.find("http request") != std::string::npos)
          return exchange.failed("TLS handshake failed with", ec,
                                 "(it does not speak TLS: without http.tls there, use an http:// URL)");
        return exchange.failed("TLS handshake failed with", ec,
                               "(--ca-file FILE to trust its certificate, --insecure to skip verification)");
      }
      exchange.send(stream);
    });
  });
  io.run();
  return result;
}

}  // namespace

int run_report_cli(int argc, char** argv) { return run_report_cli(argc, argv, std::cout, std::cerr); }

int run_report_cli(int argc, char** argv, std::ostream& out, std::ostream& err,
                   std::chrono::milliseconds timeout) {
  std::optional<std::string> url_option;
  std::optional<std::string> config_path;
  std::optional<std::string> user;
  std::optional<std::string> password_file;
  std::optional<int> days;
  std::string format = "table";
  std::optional<std::string> connector;  // --connector NAME: that connector's drill-down
  bool domains = false;                  // --domains: the destination domains
  bool summary = false;                  // --summary: the whole-window summary per connector
  TlsOptions tls;

  int i = 1;
  if (i < argc && std::string_view(argv[i]) == "report") ++i;
  const auto usage_error = [&](const std::string& message) {
    err << "mailflowd report: " << message << "\n" << kUsage;
    return 2;
  };
  for (; i < argc; ++i) {
    std::string_view arg = argv[i];
    if (arg == "-h" || arg == "--help") {
      out << kUsage;
      return 0;
    }
    if (arg == "--insecure" || arg == "-k") {
      tls.insecure = true;
      continue;
    }
    if (arg == "--domains") {
      domains = true;
      continue;
    }
    if (arg == "--summary") {
      summary = true;
      continue;
    }
    std::string_view value;
    std::string_view name = arg;
    if (const auto eq = arg.find('='); arg.starts_with("--") && eq != std::string_view::npos) {
      name = arg.substr(0, eq);
      value = arg.substr(eq + 1);
    } else if (arg == "--url" || arg == "--days" || arg == "--format" || arg == "--ca-file" || arg == "--config" ||
               arg == "--user" || arg == "--password-file" || arg == "--connector") {
      if (i + 1 >= argc) return usage_error(std::string(arg) + " needs a value");
      value = argv[++i];
    } else {
      return usage_error("unknown argument \"" + std::string(arg) + "\"");
    }
    if (name == "--url") {
      url_option = std::string(value);
    } else if (name == "--connector") {
      if (value.empty()) return usage_error("--connector needs a connector name");
      connector = std::string(value);
    } else if (name == "--config") {
      config_path = std::string(value);
    } else if (name == "--user") {
      user = std::string(value);
    } else if (name == "--password-file") {
      password_file = std::string(value);
    } else if (name == "--days") {
      int n = 0;
      const auto [ptr, ec] = std::from_chars(value.data(), value.data() + value.size(), n);
      if (ec != std::errc() || ptr != value.data() + value.size() || n < 1)
        return usage_error("--days must be a positive whole number, not \"" + std::string(value) + "\"");
      days = n;
    } else if (name == "--ca-file") {
      tls.ca_file = std::string(value);
    } else if (name == "--format") {
      if (value != "table" && value != "json" && value != "csv")
        return usage_error("--format must be table, json or csv, not \"" + std::string(value) + "\"");
      format = std::string(value);
    } else {
      return usage_error("unknown option \"" + std::string(name) + "\"");
    }
  }

  // --config: the daemon's own file, through the daemon's loader (same errors as --check-config).
  std::string url_text = "http://127.0.0.1:9725";
  if (config_path) {
    const auto loaded = config::load_config_file(*config_path);
    if (!loaded.errors.empty()) {
      for (const auto& e : loaded.errors) err << e.to_string() << "\n";
      err << "mailflowd report: cannot use --config " << *config_path << ": " << loaded.errors.size()
          << " error(s)\n";
      return 1;
    }
    const auto& http_config = loaded.config->http;
    // A wildcard listen address is reached on loopback.
    std::string host = http_config.address.host;
    if (host.empty() || host == "0.0.0.0") host = "127.0.0.1";
    if (host == "::") host = "::1";
    if (host.find(':') != std::string::npos) host = "[" + host + "]";
    url_text = std::string(http_config.tls ? "https://" : "http://") + host + ":" +
               std::to_string(http_config.address.port);
    if (!user && http_config.basic_auth) user = http_config.basic_auth->user;
  }
  if (url_option) url_text = *url_option;

  std::string error;
  auto url = parse_url(url_text, error);
  if (!url) return usage_error("bad --url \"" + url_text + "\": " + error);

  // The password from a file or the environment, never from the command line (ps shows it to everyone).
  std::optional<std::string> password;
  if (password_file) {
    std::ifstream in(*password_file);
    std::string line;
    if (!in || !std::getline(in, line)) {
      err << "mailflowd report: cannot read a password from --password-file " << *password_file << "\n";
      return 1;
    }
    if (!line.empty() && line.back() == '\r') line.pop_back();
    password = line;
  } else if (const char* env = std::getenv("MAILFLOWD_PASSWORD"); env != nullptr && *env != '\0') {
    password = std::string(env);
  }
  if (url->userinfo.empty()) {
    // MAILFLOWD_PASSWORD alone (no user known) is left unused: it may be set for another daemon's sake.
    if (password_file && !user)
      return usage_error("--password-file needs a user: --user USER, or --config FILE with http.basic_auth");
    if (user) url->userinfo = *user + ":" + password.value_or("");
  }

  if (int{summary} + int{connector.has_value()} + int{domains} > 1)
    return usage_error("--summary, --connector and --domains exclude each other");
  std::string target = url->base_path + (summary ? "/api/v1/connectors" : "/api/v1/report");
  if (format == "csv") target += ".csv";
  if (format == "table") target += ".txt";
  // The drill-down: its own CSV and text forms; JSON carries it in the report itself.
  if ((connector || domains) && format != "json") {
    target = url->base_path + (domains ? "/api/v1/domains" : "/api/v1/remotes") + (format == "csv" ? ".csv" : ".txt");
  }
  std::string query;
  if (days) query += "days=" + std::to_string(*days);
  if (connector && !domains && format == "table") query += (query.empty() ? "" : "&") + ("connector=" + *connector);
  if (!query.empty()) target += "?" + query;

  const Fetch result = fetch(*url, target, tls, timeout);
  if (!result.error.empty()) {
    err << "mailflowd report: " << result.error;
    if (result.error.starts_with("cannot connect") || result.error.starts_with("cannot resolve"))
      err << " (is mailflowd running, and is " << (config_path && !url_option ? "--config's http.address" : "--url")
          << " its http.address?)";
    err << "\n";
    return 1;
  }
  if (result.status != 200) {
    std::string message = result.body;
    while (!message.empty() && (message.back() == '\n' || message.back() == '\r')) message.pop_back();
    if (message.size() > 2000) message = message.substr(0, 2000) + "...";
    err << "mailflowd report: GET " << target << " answered " << result.status
        << (result.reason.empty() ? "" : " ") << result.reason << (message.empty() ? "" : ": ") << message;
    if (result.status == 401) {
      if (url->userinfo.empty())
        err << " (http.basic_auth is set there: --user USER, or --config FILE, with --password-file FILE or "
               "MAILFLOWD_PASSWORD)";
      else if (url->userinfo.ends_with(":") && !password)
        err << " (no password given: --password-file FILE or MAILFLOWD_PASSWORD)";
      else
        err << " (wrong user or password)";
    }
    err << "\n";
    return 1;
  }
  // Which daemon this is, for a human: the table only (json and csv stay machine-readable as they come).
  if (format == "table") {
    std::string version = "version unknown";
    if (result.server.starts_with("mailflowd/")) version = "version " + result.server.substr(10);
    const std::string shown = (url->https ? "https://" : "http://") + Exchange::authority(*url) + url->base_path;
    out << "mailflowd at " << shown << " (" << version << ")\n";
  }
  out << result.body;
  if (!result.body.empty() && result.body.back() != '\n') out << '\n';
  out.flush();
  return 0;
}

}  // namespace mailflow
