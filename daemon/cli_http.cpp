#include "daemon/cli_http.hpp"

#include <utility>  // before Boost.Asio (Boost 1.74 + GCC 12)

#include <openssl/ssl.h>
#include <openssl/x509_vfy.h>
#include <algorithm>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/ssl.hpp>
#include <cctype>
#include <charconv>
#include <cstdlib>
#include <fstream>
#include <ostream>

#include "config/config.hpp"
#include "proto/tlsrpt.hpp"

#ifndef MAILFLOW_VERSION
#define MAILFLOW_VERSION "dev"
#endif

namespace mailflow::cli {
namespace {

namespace beast = boost::beast;
namespace http = boost::beast::http;
namespace net = boost::asio;
using tcp = boost::asio::ip::tcp;

std::optional<Url> parse_url_impl(std::string_view text, std::string& error) {
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
    // RFC 3986 3.2.1: a '/', '?', '#' or '@' in the password is written %2F, %3F, %23, %40 (a '/' would end
    // the authority), and '%' itself %25.
    const std::string_view userinfo = authority.substr(0, at);
    for (std::size_t i = 0; i < userinfo.size(); ++i) {
      if (userinfo[i] != '%') {
        url.userinfo += userinfo[i];
        continue;
      }
      unsigned value = 0;
      const char* digits = userinfo.data() + i + 1;
      const bool two = i + 2 < userinfo.size() && std::isxdigit(static_cast<unsigned char>(digits[0])) &&
                       std::isxdigit(static_cast<unsigned char>(digits[1]));
      if (!two || std::from_chars(digits, digits + 2, value, 16).ec != std::errc()) {
        error = "bad %-escape in the URL's user:password (write a '%' as %25)";
        return std::nullopt;
      }
      url.userinfo += static_cast<char>(value);
      i += 2;
    }
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
    if (!url.userinfo.empty()) request_.set(http::field::authorization, "Basic " + proto::tlsrpt::base64(url.userinfo));
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
    // A hint that starts with ':' continues OpenSSL's words ("certificate verify failed: hostname mismatch").
    if (!hint.empty()) result_.error += (hint.front() == ':' ? "" : " ") + std::string(hint);
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
          return failed("no valid HTTP answer from", ec, plain_ ? tls_hint(ec) : "");
        const auto& response = parser_.get();
        result_.status = response.result_int();
        result_.reason = std::string(response.reason());
        result_.server = std::string(response[http::field::server]);
        result_.content_type = std::string(response[http::field::content_type]);
        result_.body = response.body();
        beast::error_code ignored;
        beast::get_lowest_layer(stream).socket().shutdown(tcp::socket::shutdown_both, ignored);
      });
    });
  }

  std::chrono::milliseconds timeout() const { return timeout_; }


 private:
  // A TLS server that gets a plaintext request answers with a TLS record (an alert, 0x15, or a handshake,
  // 0x16, then version 3.x) or closes without a byte; an HTTP server's answer starts with "HTTP/". A peer that
  // said nothing before the deadline, or whose answer began and then stalled or broke off, is a slow or
  // broken HTTP server, not a TLS one.
  std::string_view tls_hint(const beast::error_code& ec) const {
    if (buffer_.size() == 0) {
      if (ec == beast::error::timeout || parser_.got_some()) return {};
      return "(it closed without answering: if http.tls is set there, use an https:// URL)";
    }
    const auto* bytes = static_cast<const unsigned char*>(buffer_.data().data());
    if (!parser_.is_header_done() && (bytes[0] == 0x15 || bytes[0] == 0x16) &&
        (buffer_.size() < 2 || bytes[1] == 0x03))
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

Fetch fetch_impl(const Url& url, const std::string& target, const TlsOptions& tls,
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
  if (!tls.insecure) {
    // OpenSSL's own name check (X509_check_host / X509_check_ip_asc, as asio's host_name_verification calls
    // them): a mismatch is then a verify result of its own, which the error below names; a callback that
    // returned false left it X509_V_OK, and the message sent an administrator who had given the right CA to
    // --ca-file.
    X509_VERIFY_PARAM* param = SSL_get0_param(stream.native_handle());
    if (is_ip_literal(url.host))
      X509_VERIFY_PARAM_set1_ip_asc(param, url.host.c_str());
    else
      X509_VERIFY_PARAM_set1_host(param, url.host.c_str(), url.host.size());
  }
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
        const long verified = SSL_get_verify_result(stream.native_handle());
        if (tls.insecure || verified == X509_V_OK)
          return exchange.failed(
              "TLS handshake failed with", ec,
              "(--ca-file FILE to trust its certificate, --insecure to skip verification)");
        // The verify result says what to fix: a certificate for another name needs another --url, not a CA.
        const std::string reason = X509_verify_cert_error_string(verified);
        const bool other_name =
            verified == X509_V_ERR_HOSTNAME_MISMATCH || verified == X509_V_ERR_IP_ADDRESS_MISMATCH;
        return exchange.failed(
            "TLS handshake failed with", ec,
            ": " + reason +
                (other_name ? " (its certificate is not for " + url.host + ": use --url https://NAME:" +
                                  url.port + " with a name it is for, or --insecure to skip verification)"
                            : " (--ca-file FILE to trust its certificate, --insecure to skip verification)"));
      }
      exchange.send(stream);
    });
  });
  io.run();
  return result;
}

}  // namespace

std::optional<Url> parse_url(std::string_view text, std::string& error) { return parse_url_impl(text, error); }

std::string authority(const Url& url) { return Exchange::authority(url); }

Fetch fetch(const Url& url, const std::string& target, const TlsOptions& tls, std::chrono::milliseconds timeout) {
  return fetch_impl(url, target, tls, timeout);
}

const std::string_view daemon_options_usage =
    "  -c, --config     read http.address (https:// when http.tls is set) and http.basic_auth's user from\n"
    "                   the daemon's configuration file\n"
    "  --url            where the daemon's HTTP side listens (default http://127.0.0.1:9725; overrides\n"
    "                   --config's address); https:// when http.tls is set\n"
    "  --user           basic auth user (http.basic_auth.user, no ':'; default: --config's)\n"
    "  --password-file  basic auth password: the first line of FILE; else the environment variable\n"
    "                   MAILFLOWD_PASSWORD. (http://user:password@host:port works too, a '/' in the\n"
    "                   password written %2F, a '%' %25; but it shows in ps.)\n"
    "  --ca-file        PEM file of CA certificates to verify an https:// server with (default: system "
    "store)\n"
    "  -k, --insecure   https:// without certificate verification (self-signed certificates)\n";

std::string shown(std::string_view text) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out;
  for (const unsigned char c : text) {
    if (c >= 0x20 && c < 0x7f) {
      out += static_cast<char>(c);
    } else {
      out += "\\x";
      out += kHex[c >> 4];
      out += kHex[c & 0xf];
    }
  }
  return out;
}

bool parse_valued_option(int argc, char** argv, int& i, std::initializer_list<std::string_view> names,
                         ValuedOption& option, std::string& error) {
  error.clear();
  const std::string_view arg = argv[i];
  const auto eq = arg.starts_with("--") ? arg.find('=') : std::string_view::npos;
  option.name = arg.substr(0, eq);
  if (std::find(names.begin(), names.end(), option.name) == names.end()) return false;
  if (eq != std::string_view::npos) {
    option.value = arg.substr(eq + 1);
  } else if (i + 1 < argc) {
    option.value = argv[++i];
  } else {
    error = std::string(arg) + " needs a value";
    return false;
  }
  return true;
}

bool parse_daemon_option(int argc, char** argv, int& i, DaemonOptions& options, std::string& error) {
  error.clear();
  const std::string_view arg = argv[i];
  if (arg == "--insecure" || arg == "-k") {
    options.tls.insecure = true;
    return true;
  }
  ValuedOption option;
  if (!parse_valued_option(argc, argv, i,
                           {"--url", "--config", "-c", "--user", "--password-file", "--ca-file"}, option,
                           error))
    return false;
  const std::string value(option.value);
  // As a missing one: not a file named "" (as mailflowd --config), nor the system store for --ca-file, nor a
  // user named "" in place of --config's http.basic_auth user.
  if (value.empty() && option.name != "--url") {
    error = std::string(option.name) + " needs a value";
    return false;
  }
  // RFC 7617 2: a user-id with a colon is invalid (http.basic_auth.user refuses one). curl's --user
  // USER:PASSWORD sent as the user: "admin:secret:" reached the daemon, whose user is "admin", as a wrong
  // password (a 401 counted in auth_failed against this address, "wrong user or password"), the password
  // shown in ps.
  if (option.name == "--user" && value.find(':') != std::string::npos) {
    error = "--user must contain no ':' (the password goes in --password-file or MAILFLOWD_PASSWORD)";
    return false;
  }
  if (option.name == "--url") options.url = value;
  else if (option.name == "--config" || option.name == "-c")
    options.config_path = value;
  else if (option.name == "--user") options.user = value;
  else if (option.name == "--password-file") options.password_file = value;
  else options.tls.ca_file = value;
  return true;
}

int resolve_daemon(const DaemonOptions& options, std::string_view program, std::ostream& err, Daemon& daemon,
                   std::string& usage) {
  // --config: the daemon's own file, through the daemon's loader (same errors as --check-config).
  std::string url_text = "http://127.0.0.1:9725";
  std::optional<std::string> user = options.user;
  if (options.config_path) {
    const auto loaded = config::load_config_file(*options.config_path);
    if (!loaded.errors.empty()) {
      for (const auto& e : loaded.errors) err << shown(e.to_string()) << "\n";
      err << program << ": cannot use --config " << shown(*options.config_path) << ": "
          << loaded.errors.size() << " error(s)\n";
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
  if (options.url) url_text = *options.url;

  std::string error;
  auto url = parse_url(url_text, error);
  if (!url) {
    usage = "bad --url \"" + url_text + "\": " + error;
    return 2;
  }

  // The password from a file or the environment, never from the command line (ps shows it to everyone).
  std::optional<std::string> password;
  if (options.password_file) {
    std::ifstream in(*options.password_file);
    std::string line;
    if (!in || !std::getline(in, line)) {
      err << program << ": cannot read a password from --password-file " << shown(*options.password_file)
          << "\n";
      return 1;
    }
    if (!line.empty() && line.back() == '\r') line.pop_back();
    password = line;
  } else if (const char* env = std::getenv("MAILFLOWD_PASSWORD"); env != nullptr && *env != '\0') {
    password = std::string(env);
  }
  if (url->userinfo.empty()) {
    // MAILFLOWD_PASSWORD alone (no user known) is left unused: it may be set for another daemon's sake.
    if (options.password_file && !user) {
      usage = "--password-file needs a user: --user USER, or --config FILE with http.basic_auth";
      return 2;
    }
    if (user) url->userinfo = *user + ":" + password.value_or("");
  } else if (url->userinfo.find(':') == std::string::npos) {
    // http://user@host: the user only (RFC 7617 credentials are user:password, never the user alone).
    url->userinfo += ":" + password.value_or("");
  }
  daemon.url = std::move(*url);
  daemon.password = password.has_value();
  return 0;
}

int print_failure(const Fetch& result, const Daemon& daemon, const DaemonOptions& options, const std::string& target,
                  std::string_view program, std::ostream& err) {
  if (!result.error.empty()) {
    err << program << ": " << shown(result.error);
    if (result.error.starts_with("cannot connect") || result.error.starts_with("cannot resolve"))
      err << " (is mailflowd running, and is "
          << (options.config_path && !options.url ? "--config's http.address" : "--url") << " its http.address?)";
    err << "\n";
    return 1;
  }
  // The server's words go to a terminal: its control bytes (an escape sequence) are shown, not sent; its
  // lines stay lines.
  std::string message;
  for (std::string_view body = std::string_view(result.body).substr(0, 2000); !body.empty();) {
    std::string_view line = body.substr(0, body.find('\n'));
    body.remove_prefix(std::min(body.size(), line.size() + 1));
    if (line.ends_with('\r')) line.remove_suffix(1);
    message += (message.empty() ? "" : "\n") + shown(line);
  }
  while (!message.empty() && message.back() == '\n') message.pop_back();
  if (result.body.size() > 2000) message += "...";
  err << program << ": GET " << shown(target) << " answered " << result.status
      << (result.reason.empty() ? "" : " ") << shown(result.reason) << (message.empty() ? "" : ": ")
      << message;
  if (result.status == 401) {
    if (daemon.url.userinfo.empty())
      err << " (http.basic_auth is set there: --user USER, or --config FILE, with --password-file FILE or "
             "MAILFLOWD_PASSWORD)";
    else if (daemon.url.userinfo.ends_with(":") && !daemon.password)
      err << " (no password given: --password-file FILE or MAILFLOWD_PASSWORD)";
    else
      err << " (wrong user or password)";
  }
  err << "\n";
  return 1;
}

}  // namespace mailflow::cli
