#pragma once
// The HTTP client side of the commands that read a running daemon (`mailflowd report`, `mailflowd tlsrpt`): the
// options they share (--config, --url, --user, --password-file, --ca-file, --insecure, MAILFLOWD_PASSWORD), the
// daemon's URL and credentials resolved from them, one GET over HTTP/1.1 or HTTPS with a deadline per step, and
// the messages for a failed fetch (connection trouble, 401 hints, the server's own message).
#include <chrono>
#include <iosfwd>
#include <initializer_list>
#include <optional>
#include <string>
#include <string_view>

namespace mailflow::cli {

struct Url {
  bool https = false;
  std::string host;  // without brackets
  std::string port = "80";
  std::string base_path;  // "" or "/prefix" (no trailing slash)
  std::string userinfo;   // "user:password" or ""
};
std::optional<Url> parse_url(std::string_view text, std::string& error);
std::string authority(const Url& url);  // "host:port", "[v6]:port"

struct TlsOptions {
  bool insecure = false;  // no certificate verification (self-signed dev certificates)
  std::string ca_file;    // empty: the system's trust store
};

struct Fetch {
  unsigned status = 0;
  std::string reason;
  std::string server;  // the Server: header, "mailflowd/VERSION" from a daemon
  std::string content_type;  // the Content-Type: header as sent
  std::string body;
  std::string error;  // non-empty: no usable answer
};
Fetch fetch(const Url& url, const std::string& target, const TlsOptions& tls, std::chrono::milliseconds timeout);

// The options every daemon-reading command takes.
struct DaemonOptions {
  std::optional<std::string> url;
  std::optional<std::string> config_path;
  std::optional<std::string> user;
  std::optional<std::string> password_file;
  TlsOptions tls;
};
// The usage text of those options (for a command's --help).
extern const std::string_view daemon_options_usage;
// argv[i] is one of the shared options: consumed (with its value; i advanced) and true. False and `error` empty:
// not one of them; false with `error`: a usage error (a missing value).
bool parse_daemon_option(int argc, char** argv, int& i, DaemonOptions& options, std::string& error);

// `text` for a terminal: bytes outside printable ASCII as \xNN.
std::string shown(std::string_view text);

// An option that takes a value: "--name=value", or "--name value" (the value is argv[i + 1]: consumed, i advanced).
struct ValuedOption {
  std::string_view name;
  std::string_view value;
};
// argv[i] is one of `names` with its value: true. False and `error` empty: not one of them; false with `error`: a
// usage error (a missing value).
bool parse_valued_option(int argc, char** argv, int& i, std::initializer_list<std::string_view> names,
                         ValuedOption& option, std::string& error);

struct Daemon {
  Url url;              // with userinfo when a user is known
  bool password = false;  // a password was given (--password-file or MAILFLOWD_PASSWORD)
};
// --config's http.* (errors printed to `err`, exit code 1), then --url, then the password. Returns 0 with
// `daemon` set, 1 (printed), or 2 with `usage` set (the caller prints it with its usage text).
int resolve_daemon(const DaemonOptions& options, std::string_view program, std::ostream& err, Daemon& daemon,
                   std::string& usage);
// A fetch without a 200: why, on `err` ("<program>: ..." with hints for 401 and connection failures); returns 1.
int print_failure(const Fetch& result, const Daemon& daemon, const DaemonOptions& options, const std::string& target,
                  std::string_view program, std::ostream& err);

}  // namespace mailflow::cli
