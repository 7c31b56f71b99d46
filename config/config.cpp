// YAML -> validated, immutable Config. Every error found is collected with the position of the offending key
// or value; the loader never stops at the first one (except for YAML syntax errors, after which nothing is
// reliable).
#include "config/config.hpp"
#include "proto/ascii.hpp"
#include "proto/tlsrpt.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <yaml-cpp/depthguard.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <set>
#include <sstream>

namespace mailflow::config {

bool valid_name(std::string_view name) {
  return !name.empty() && name.size() <= 64 && std::all_of(name.begin(), name.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_' || c == '-';
  });
}

namespace {

// The most work one password check may take: a bcrypt cost of 15, 2^15 rounds, some 2.5 s of one CPU on an
// idle host (8 s measured at a load of 10 on 2 CPUs, 20 s for cost 16), and SHA-crypt's rounds= of as long
// (1,000,000: 1.5-2 s). Checks run one at a time on the password thread; a scraper whose credentials a start
// or reload has not yet cached waits for its own check and at most the one running ahead of it, which must
// fit in Prometheus's default scrape_timeout of 10 s. A cost of 31 is a check of days: the password thread is
// held, every request with basic_auth waits or gets 503, and the exit at SIGTERM waits for the hash under
// way.
constexpr int kMaxBcryptCost = 15;
constexpr unsigned long kMaxShaCryptRounds = 1'000'000;

// Why a whole hash costs a check more than that ("" when it does not). yescrypt's cost (its N and r, in the
// hash's own base-64 parameters) is not read: mkpasswd's -R goes up to 11, some 1 GiB and a few seconds.
std::string cost_problem(std::string_view hash, std::string_view prefix) {
  if (prefix.starts_with("$2")) {
    const int cost = (hash[4] - '0') * 10 + (hash[5] - '0');
    if (cost <= kMaxBcryptCost) return {};
    return "bcrypt cost " + std::to_string(cost) + " is over " + std::to_string(kMaxBcryptCost) +
           ", the most a password check may take (cost 15 is some 2.5 s of one CPU, each step doubles it: " +
           std::to_string(1ul << (cost - kMaxBcryptCost)) +
           " times that is past a scrape's timeout and holds the password thread); make one with: "
           "mkpasswd -m bcrypt -R 12";
  }
  constexpr std::string_view kRounds = "rounds=";
  if ((prefix == "$5$" || prefix == "$6$") && hash.substr(3).starts_with(kRounds)) {
    const std::string_view digits = hash.substr(3 + kRounds.size(), hash.find('$', 3) - 3 - kRounds.size());
    // crypt(3) reads up to 999,999,999 (more is clamped to it); digits beyond nine are over the bound too.
    unsigned long rounds = 0;
    const auto [end, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), rounds);
    const bool over =
        ec == std::errc::result_out_of_range || (ec == std::errc() && rounds > kMaxShaCryptRounds);
    if (!over) return {};
    return std::string(prefix) + " rounds=" + std::string(digits) + " is over " +
           std::to_string(kMaxShaCryptRounds) +
           ", the most a password check may take (1,000,000 rounds is some 2 s of one CPU, past a scrape's "
           "timeout beyond that, holding the password thread); make one with: mkpasswd -m bcrypt -R 12";
  }
  return {};
}

// Why http.basic_auth.password_hash cannot work ("" when it can). Beyond the method, the checksum that
// crypt(3) writes is checked (its length and alphabet, bcrypt's cost), without hashing (that would cost a
// reload up to a second): a hash truncated or altered in copying is never what crypt(3) yields, so no
// password would match it and every request would get 401 without a word of why.
std::string password_hash_problem(std::string_view hash) {
  struct Method {
    std::string_view prefix;
    std::size_t checksum;  // characters after the last '$' (bcrypt: salt and checksum, 22 + 31)
  };
  static constexpr Method methods[] = {{"$2b$", 53}, {"$2a$", 53}, {"$2y$", 53}, {"$y$", 43},
                                       {"$gy$", 43}, {"$7$", 43},  {"$6$", 86},  {"$5$", 43}};
  const auto method = std::find_if(std::begin(methods), std::end(methods),
                                   [&](const Method& m) { return hash.starts_with(m.prefix); });
  if (method == std::end(methods)) {
    return "expected a crypt(3) hash starting with $2b$, $y$, $6$ or $5$ (never a plain password; "
           "make one with: mkpasswd -m bcrypt)";
  }
  const auto last = hash.rfind('$');
  const std::string_view checksum = hash.substr(last + 1);
  const bool alphabet =
      checksum.find_first_not_of("./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz") ==
      std::string_view::npos;
  bool ok = last >= method->prefix.size() && checksum.size() == method->checksum && alphabet;
  if (ok && method->prefix.starts_with("$2")) {  // $2b$NN$: a cost of 04..31, then nothing but the 53
    const std::string_view cost = hash.substr(4, last - 4);
    ok = cost.size() == 2 && cost >= "04" && cost <= "31" && cost[1] >= '0' && cost[1] <= '9';
  }
  if (ok) return cost_problem(hash, method->prefix);
  return "not a whole crypt(3) hash: a " + std::string(method->prefix) + " hash ends in " +
         std::to_string(method->checksum) + " characters of [./0-9A-Za-z] after its last '$'" +
         (method->prefix.starts_with("$2") ? " (and has a cost of 04..31)" : "") +
         ", so no password can match it (truncated or altered in copying?); make one with: "
         "mkpasswd -m bcrypt";
}

// The accepted keys of every mapping, by schema path ("[]" = each item of a list). This one table drives both
// the unknown-key check and known_keys(), so the documentation test sees exactly what the loader accepts.
struct Section {
  std::string_view path;
  std::vector<std::string_view> keys;
};

const std::vector<Section>& schema() {
  static const std::vector<Section> sections = {
      {"",
       {"hostname", "state_dir", "listeners", "upstreams", "connectors", "dns", "mta_sts", "tlsrpt", "telemetry",
        "http", "limits", "log", "timeouts", "performance"}},
      {"listeners[]", {"name", "address", "direction", "tls", "proxy_protocol", "upstream"}},
      {"listeners[].tls", {"certificates", "min_version", "ciphers"}},
      {"listeners[].tls.certificates[]", {"cert", "key"}},
      {"listeners[].proxy_protocol", {"trusted"}},
      {"upstreams[]",
       {"name", "address", "mx", "port", "tls", "min_version", "verify_names", "ca_file", "xclient", "mta_sts"}},
      {"dns", {"servers", "timeout", "trust_anchor_file"}},
      {"mta_sts", {"ca_file", "fetch_timeout", "max_policies"}},
      {"tlsrpt",
       {"send", "organization_name", "contact_info", "submitter", "from", "smtp_port", "ca_file", "interval",
        "retry_for", "https_timeout", "max_reports_per_run"}},
      {"connectors[]", {"name", "type", "direction", "match", "require_tls", "upstream", "alerts"}},
      {"connectors[].match", {"listener", "client_cidrs", "sender_domains", "recipient_domains", "ehlo", "sni"}},
      {"connectors[].alerts", {"tls10_share", "tls11_share", "no_tls_share", "min_messages"}},
      {"telemetry", {"window", "defaults", "top_domains", "top_remotes", "remotes"}},
      {"telemetry.defaults", {"tls10_share", "tls11_share", "no_tls_share", "min_messages"}},
      {"http", {"address", "basic_auth", "tls"}},
      {"http.basic_auth", {"user", "password_hash"}},
      {"http.tls", {"cert", "key"}},
      {"limits",
       {"max_sessions", "max_sessions_per_ip", "max_message_size", "max_recipients", "max_bad_commands",
        "max_junk_commands", "max_line", "drain_timeout", "greet_pause", "bare_newline", "max_hops"}},
      {"log", {"level", "format", "output"}},
      {"timeouts",
       {"greeting", "command", "data_block", "data_end", "tls_handshake", "upstream_connect",
        "upstream_open"}},
      {"performance", {"busy_poll", "event_loops"}},
  };
  return sections;
}

const std::vector<std::string_view>& keys_of(std::string_view schema_path) {
  for (const auto& section : schema()) {
    if (section.path == schema_path) return section.keys;
  }
  static const std::vector<std::string_view> none;
  return none;
}

std::string quoted(std::string_view text) {
  std::string out = "\"";
  for (char c : text.substr(0, 80)) {
    const auto u = static_cast<unsigned char>(c);
    if (c == '"' || c == '\\') out += '\\';
    if (u < 0x20 || u == 0x7f) {
      static constexpr char hex[] = "0123456789abcdef";
      out += "\\x";
      out += hex[u >> 4];
      out += hex[u & 15];
    } else {
      out += c;
    }
  }
  if (text.size() > 80) out += "...";
  return out + "\"";
}

std::size_t edit_distance(std::string_view a, std::string_view b) {
  std::vector<std::size_t> row(b.size() + 1);
  for (std::size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (std::size_t i = 1; i <= a.size(); ++i) {
    std::size_t diagonal = row[0];
    row[0] = i;
    for (std::size_t j = 1; j <= b.size(); ++j) {
      const std::size_t above = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diagonal + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diagonal = above;
    }
  }
  return row[b.size()];
}

// Labels of 1-63 letters, digits, '-' and '_' (not starting with '-'), separated by single dots, without the
// root's trailing dot: the hostname goes into the banner, EHLO and Received: as it is (RFC 5321 4.1.2).
bool valid_hostname(std::string_view name) {
  if (name.empty() || name.size() > 253) return false;
  std::size_t start = 0;
  for (;;) {
    const std::size_t dot = std::min(name.find('.', start), name.size());
    const std::string_view label = name.substr(start, dot - start);
    if (label.empty() || label.size() > 63 || label.front() == '-') return false;
    if (!std::all_of(label.begin(), label.end(), [](char c) {
          return std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_';
        }))
      return false;
    if (dot == name.size()) return true;
    start = dot + 1;
  }
}

template <class Int>
std::optional<Int> parse_integer(std::string_view text) {
  if (text.empty() || !std::all_of(text.begin(), text.end(), [](char c) { return c >= '0' && c <= '9'; })) {
    return std::nullopt;
  }
  Int value{};
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (ec != std::errc{} || end != text.data() + text.size()) return std::nullopt;
  return value;
}

// Sizes: plain bytes, or a number with B, KB/MB/GB (powers of 1000) or KiB/MiB/GiB (powers of 1024).
std::optional<std::uint64_t> parse_size(std::string_view text) {
  std::size_t digits = 0;
  while (digits < text.size() && text[digits] >= '0' && text[digits] <= '9') ++digits;
  const auto number = parse_integer<std::uint64_t>(text.substr(0, digits));
  if (!number) return std::nullopt;
  const std::string_view unit = text.substr(digits);
  std::uint64_t scale = 0;
  if (unit.empty() || unit == "B")
    scale = 1;
  else if (unit == "KB")
    scale = 1000;
  else if (unit == "MB")
    scale = 1000 * 1000;
  else if (unit == "GB")
    scale = 1000 * 1000 * 1000;
  else if (unit == "KiB")
    scale = 1024;
  else if (unit == "MiB")
    scale = 1024 * 1024;
  else if (unit == "GiB")
    scale = 1024 * 1024 * 1024;
  else
    return std::nullopt;
  if (*number > std::numeric_limits<std::uint64_t>::max() / scale) return std::nullopt;
  return *number * scale;
}

std::optional<double> parse_double(std::string_view text) {
  double value = 0;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (text.empty() || ec != std::errc{} || end != text.data() + text.size() || !std::isfinite(value)) {
    return std::nullopt;
  }
  return value;
}

std::optional<proto::TlsVersion> parse_min_version(std::string_view text) {
  // The contract spells them TLS1.x; OpenSSL/Postfix/nginx spell them TLSv1.x, which admins paste from there.
  static constexpr std::pair<std::string_view, proto::TlsVersion> versions[] = {
      {"TLS1.0", proto::TlsVersion::tls10},  {"TLS1.1", proto::TlsVersion::tls11},
      {"TLS1.2", proto::TlsVersion::tls12},  {"TLS1.3", proto::TlsVersion::tls13},
      {"TLSv1.0", proto::TlsVersion::tls10}, {"TLSv1", proto::TlsVersion::tls10},
      {"TLSv1.1", proto::TlsVersion::tls11}, {"TLSv1.2", proto::TlsVersion::tls12},
      {"TLSv1.3", proto::TlsVersion::tls13}};
  for (const auto& [name, version] : versions) {
    if (name == text) return version;
  }
  return std::nullopt;
}

// One key of a mapping with the nodes of both sides (the key node carries the position when the value is
// null).
struct Field {
  YAML::Node key;
  YAML::Node value;
};
using Fields = std::map<std::string, Field, std::less<>>;

// The line (0-based) where a second YAML document starts: a "---" or "..." marker at a line's start behind
// the first document's content, with content of its own behind it (on its line or later); nullopt when there
// is none (a leading "---", a trailing empty one). YAML 1.2 allows no such marker inside a scalar, so the
// lines tell.
std::optional<int> second_document_line(std::string_view text) {
  bool content = false;       // the first document has content
  std::optional<int> marker;  // the first marker behind it
  int number = 0;
  for (std::size_t start = 0; start < text.size(); ++number) {
    const auto end = text.find('\n', start);
    std::string_view line =
        text.substr(start, end == std::string_view::npos ? std::string_view::npos : end - start);
    start = end == std::string_view::npos ? text.size() : end + 1;
    if ((line.starts_with("---") || line.starts_with("...")) &&
        (line.size() == 3 || line[3] == ' ' || line[3] == '\t' || line[3] == '\r')) {
      if (content && !marker) marker = number;
      line.remove_prefix(3);
    }
    const auto first = line.find_first_not_of(" \t\r");
    if (first == std::string_view::npos || line[first] == '#') continue;
    if (marker) return marker;
    content = true;
  }
  return std::nullopt;
}

YAML::Mark mark_at(int line) {
  YAML::Mark mark = YAML::Mark::null_mark();
  mark.pos = 0;
  mark.line = line;
  mark.column = 0;
  return mark;
}

class Loader {
 public:
  explicit Loader(std::string file) : file_(std::move(file)) {}

  LoadResult load(std::string_view text) {
    const std::optional<OpenQuote> open_quote = find_open_quote(text);
    try {
      // YAML::Load reads the first document only: settings after a "---" line would be dropped unseen.
      // (Not YAML::LoadAll: yaml-cpp 0.7's loops forever on some inputs, fuzz_config found one.)
      const YAML::Node root = YAML::Load(std::string(text));
      // yaml-cpp reads a quote that is never closed up to the end of the file without complaint.
      if (open_quote && open_quote->closed_line < 0) {
        error_at(open_quote->mark, "unclosed quote: the value " + open_quote->what + " has no closing " +
                                       open_quote->quote + " (YAML would read the rest of the file into it)");
      } else {
        load_root(root);
      }
      if (const auto line = second_document_line(text))
        error_at(mark_at(*line),
                 "a second YAML document (after \"---\") is not read: the configuration is one "
                 "document (remove the \"---\" line)");
    } catch (const YAML::Exception& e) {
      // A quote left open on an earlier line makes YAML read on to the next quote character and fail
      // there, far from the mistake: blame the quote, and keep yaml-cpp's own words and position.
      if (open_quote && !e.mark.is_null() && open_quote->mark.line <= e.mark.line) {
        error_at(open_quote->mark, "unclosed quote: the value " + open_quote->what + " has no closing " +
                                       open_quote->quote + " on its line; YAML syntax error at line " +
                                       std::to_string(e.mark.line + 1) + " column " +
                                       std::to_string(e.mark.column + 1) + ": " + e.msg);
      } else if (dynamic_cast<const YAML::DeepRecursion*>(&e) != nullptr) {
        // yaml-cpp words its depth limit (some hundreds of levels) as "bad file".
        error_at(e.mark, "YAML syntax error: lists or mappings nested deeper than the YAML parser reads");
      } else {
        error_at(e.mark, "YAML syntax error: " + e.msg + syntax_hint(text, e.mark));
      }
    }
    const auto by_position = [](const ConfigError& a, const ConfigError& b) {
      return std::pair(a.line, a.column) < std::pair(b.line, b.column);
    };
    std::stable_sort(errors_.begin(), errors_.end(), by_position);
    std::stable_sort(warnings_.begin(), warnings_.end(), by_position);
    config_.source_path = file_;
    LoadResult result;
    result.errors = std::move(errors_);
    result.warnings = std::move(warnings_);
    if (result.errors.empty()) result.config = std::make_shared<const Config>(std::move(config_));
    return result;
  }

 private:
  std::string file_;
  std::vector<ConfigError> errors_;
  std::vector<ConfigError> warnings_;
  Config config_;
  YAML::Mark root_mark_;

  // A quoted scalar that does not end on the line where it starts: legal YAML, but in a configuration file
  // nearly always a missing closing quote.
  struct OpenQuote {
    YAML::Mark mark;         // the opening quote
    std::string quote;       // "\"" or "'"
    std::string what;        // the quote and the rest of its line (at most 60 characters)
    int closed_line = -1;    // 0-based line of the closing quote; -1: never closed
  };
  static std::optional<OpenQuote> find_open_quote(std::string_view text) {
    int line = 0;
    std::size_t line_start = 0;
    std::optional<OpenQuote> open;  // set while inside a quoted scalar
    for (std::size_t i = 0; i < text.size(); ++i) {
      const char c = text[i];
      if (c == '\n') {
        ++line;
        line_start = i + 1;
        continue;
      }
      if (!open) {
        // A quote starts a scalar only after a blank or a flow indicator; inside a plain scalar (don't) it
        // is an ordinary character.
        const char before = i == line_start ? ' ' : text[i - 1];
        if (before != ' ' && before != '\t' && before != '[' && before != '{' && before != ',') continue;
        if (c == '#') {  // a comment: skip to the end of the line
          i = std::min(text.find('\n', i), text.size()) - 1;
          continue;
        }
        if (c != '"' && c != '\'') continue;
        std::string_view rest = text.substr(i, std::min(text.find('\n', i), text.size()) - i);
        if (!rest.empty() && rest.back() == '\r') rest.remove_suffix(1);
        open.emplace();
        open->mark.pos = static_cast<int>(i);
        open->mark.line = line;
        open->mark.column = static_cast<int>(i - line_start);
        open->quote = std::string(1, c);
        open->what = std::string(rest.substr(0, 60)) + (rest.size() > 60 ? "..." : "");
        continue;
      }
      if (open->quote[0] == '"' && c == '\\') {
        ++i;  // an escape: the next character never closes
        continue;
      }
      if (c != open->quote[0]) continue;
      if (c == '\'' && i + 1 < text.size() && text[i + 1] == '\'') {
        ++i;  // '' is a quote inside a single-quoted scalar
        continue;
      }
      if (open->mark.line != line) {
        open->closed_line = line;
        return open;
      }
      open.reset();
    }
    return open;  // still open at the end of the file (closed_line -1), or nullopt
  }

  // The classic: an unquoted "[::]:25" is a YAML flow list followed by garbage.
  static std::string syntax_hint(std::string_view text, const YAML::Mark& mark) {
    if (mark.is_null() || mark.line < 0) return "";
    std::size_t start = 0;
    for (int line = 0; line <= mark.line && start != std::string_view::npos; ++line) {
      // A tab in the indentation, here or above: YAML allows none, and yaml-cpp's words do not say so.
      const std::size_t indent_end = text.find_first_not_of(" \t", start);
      const bool content = indent_end != std::string_view::npos && text[indent_end] != '\n' &&
                           text[indent_end] != '\r' && text[indent_end] != '#';
      if (content && text.substr(start, indent_end - start).find('\t') != std::string_view::npos)
        return " (line " + std::to_string(line + 1) +
               " is indented with a tab; YAML indents with spaces only)";
      if (line == mark.line) break;
      start = text.find('\n', start);
      if (start != std::string_view::npos) ++start;
    }
    if (start == std::string_view::npos) return "";
    const std::string_view line = text.substr(start, text.find('\n', start) - start);
    const auto open = line.find(": [");
    if (open != std::string_view::npos && line.find("]:", open) != std::string_view::npos) {
      return " (quote addresses like \"[::]:25\")";
    }
    return "";
  }

  // ---- error reporting
  // -------------------------------------------------------------------------------------
  void error_at(const YAML::Mark& mark, std::string message) {
    ConfigError error;
    error.file = file_;
    if (!mark.is_null() && mark.line >= 0) {
      error.line = mark.line + 1;
      error.column = mark.column + 1;
    }
    error.message = std::move(message);
    errors_.push_back(std::move(error));
  }
  void error_at(const YAML::Node& node, std::string message) { error_at(node.Mark(), std::move(message)); }
  // A null value has no position of its own (yaml-cpp gives the next token's): blame the key instead.
  void error_at(const Field& field, std::string message) {
    error_at(field.value.IsNull() ? field.key.Mark() : field.value.Mark(), std::move(message));
  }
  void remember_position(const std::string& path, const YAML::Node& node) {
    const YAML::Mark mark = node.Mark();
    if (!mark.is_null() && mark.line >= 0) config_.positions[path] = {mark.line + 1, mark.column + 1};
  }
  // Warnings: the same shape as errors, collected apart (they never make a configuration invalid).
  void warn_at(const YAML::Mark& mark, std::string message) {
    errors_.swap(warnings_);
    error_at(mark, std::move(message));
    errors_.swap(warnings_);
    warnings_.back().warning = true;
  }

  static std::string join(std::string_view where, std::string_view key) {
    return where.empty() ? std::string(key) : std::string(where) + "." + std::string(key);
  }
  static std::string describe(const YAML::Node& node) {
    if (node.IsSequence()) return "a list";
    if (node.IsMap()) return "a mapping";
    if (node.IsNull()) return "nothing";
    return quoted(node.Scalar());
  }

  // ---- structure
  // --------------------------------------------------------------------------------------------- The keys of
  // a mapping, after reporting non-scalar, duplicate and unknown keys. A null node is an empty mapping (a
  // section whose entries are all commented out); anything else that is not a mapping is an error.
  std::optional<Fields> fields(const YAML::Node& node, const YAML::Mark& mark, std::string_view schema_path,
                               const std::string& where) {
    Fields out;
    if (!node.IsDefined() || node.IsNull()) return out;
    if (!node.IsMap()) {
      error_at(mark, (where.empty() ? "the configuration" : where) + ": expected a mapping of keys, got " +
                         describe(node));
      return std::nullopt;
    }
    const auto& allowed = keys_of(schema_path);
    for (auto it = node.begin(); it != node.end(); ++it) {
      const YAML::Node key = it->first;
      if (!key.IsScalar()) {
        error_at(key, (where.empty() ? "" : where + ": ") + "keys must be plain names, got " + describe(key));
        continue;
      }
      const std::string& name = key.Scalar();
      if (name ==
          "<<") {  // yaml-cpp reads a YAML 1.1 merge key as an ordinary key: its keys would go missing
        error_at(key,
                 (where.empty() ? "" : where + ": ") +
                     "YAML merge keys (\"<<\") are not supported: write the keys out (an alias of a whole "
                     "value, like *name, works)");
        continue;
      }
      if (std::find(allowed.begin(), allowed.end(), name) == allowed.end()) {
        std::string message = "unknown key " + quoted(name) + (where.empty() ? "" : " in " + where);
        std::string_view best;
        std::size_t best_distance = 3;
        for (const auto& candidate : allowed) {
          const std::size_t distance = edit_distance(name, candidate);
          if (distance < best_distance) {
            best = candidate;
            best_distance = distance;
          }
        }
        if (!best.empty()) {
          message += " (did you mean " + quoted(best) + "?)";
        } else {
          message += " (expected one of:";
          for (const auto& candidate : allowed) message += " " + std::string(candidate);
          message += ")";
        }
        error_at(key, std::move(message));
        continue;
      }
      const auto [previous, inserted] = out.emplace(name, Field{key, it->second});
      if (!inserted) {
        error_at(key, "duplicate key " + quoted(name) + (where.empty() ? "" : " in " + where) +
                          " (first at line " + std::to_string(previous->second.key.Mark().line + 1) + ")");
      }
    }
    return out;
  }
  std::optional<Fields> fields(const Field& field, std::string_view schema_path, const std::string& where) {
    return fields(field.value, field.key.Mark(), schema_path, where);
  }

  static const Field* get(const Fields& fields, std::string_view key) {
    const auto it = fields.find(key);
    return it == fields.end() ? nullptr : &it->second;
  }

  const Field* require(const Fields& fields, std::string_view key, const YAML::Mark& mark,
                       const std::string& where) {
    const Field* field = get(fields, key);
    if (field == nullptr) error_at(mark, where + ": missing required key " + quoted(key));
    return field;
  }

  // The items of a list; a null value is an empty list.
  std::vector<YAML::Node> items(const Field& field, const std::string& where) {
    std::vector<YAML::Node> out;
    if (field.value.IsNull()) return out;
    if (!field.value.IsSequence()) {
      error_at(field, where + ": expected a list, got " + describe(field.value));
      return out;
    }
    for (const auto& item : field.value) out.push_back(item);
    return out;
  }

  // A scalar's text, or nullopt after reporting what was expected.
  std::optional<std::string> scalar(const Field& field, const std::string& where, std::string_view expected) {
    if (field.value.IsNull()) {
      error_at(field, where + ": missing value (expected " + std::string(expected) + ")");
      return std::nullopt;
    }
    if (!field.value.IsScalar()) {
      std::string message = where + ": expected " + std::string(expected) + ", got " + describe(field.value);
      // Unquoted [::]:25 is a YAML flow list; say so instead of leaving the user puzzled.
      if (field.value.IsSequence() && where.ends_with("address"))
        message += " (quote addresses like \"[::]:25\")";
      error_at(field, std::move(message));
      return std::nullopt;
    }
    return field.value.Scalar();
  }
  std::optional<std::string> scalar_item(const YAML::Node& node, const std::string& where,
                                         std::string_view expected) {
    return scalar(Field{node, node}, where, expected);
  }

  // A string or a list of strings, each with its node (for positions).
  std::vector<std::pair<std::string, YAML::Node>> string_list(const Field& field, const std::string& where,
                                                              std::string_view expected) {
    std::vector<std::pair<std::string, YAML::Node>> out;
    if (field.value.IsScalar()) {
      out.emplace_back(field.value.Scalar(), field.value);
      return out;
    }
    const auto list = items(field, where);
    for (std::size_t i = 0; i < list.size(); ++i) {
      if (auto text = scalar_item(list[i], where + "[" + std::to_string(i) + "]", expected)) {
        out.emplace_back(std::move(*text), list[i]);
      }
    }
    return out;
  }

  // ---- typed values
  // ------------------------------------------------------------------------------------------ Each reader
  // leaves `out` unchanged when the key is absent (the default stays) or invalid (an error is recorded).
  template <class T, class Parse>
  bool read(const Fields& fields, std::string_view key, const std::string& where, std::string_view expected,
            T& out, Parse parse) {
    const Field* field = get(fields, key);
    if (field == nullptr) return false;
    const std::string path = join(where, key);
    const auto text = scalar(*field, path, expected);
    if (!text) return false;
    std::string problem;
    std::optional<T> value = parse(*text, problem);
    if (!value) {
      error_at(*field, path + ": " +
                           (problem.empty() ? "expected " + std::string(expected) + ", got " + quoted(*text)
                                            : problem));
      return false;
    }
    out = std::move(*value);
    return true;
  }

  bool read_string(const Fields& fields, std::string_view key, const std::string& where, std::string& out) {
    return read(fields, key, where, "a string", out, [](const std::string& text, std::string& problem) {
      if (text.empty()) problem = "must not be empty";
      return text.empty() ? std::nullopt : std::optional<std::string>(text);
    });
  }

  bool read_name(const Fields& fields, std::string_view key, const std::string& where, std::string& out) {
    return read(fields, key, where, "a name", out, [](const std::string& text, std::string& problem) {
      if (!valid_name(text)) {
        problem = "invalid name " + quoted(text) + ": use 1-64 characters of a-z, 0-9, '_' and '-'";
        return std::optional<std::string>{};
      }
      return std::optional<std::string>(text);
    });
  }

  bool read_bool(const Fields& fields, std::string_view key, const std::string& where, bool& out) {
    return read(fields, key, where, "true or false", out, [](const std::string& text, std::string&) {
      if (text == "true" || text == "True" || text == "TRUE" || text == "yes")
        return std::optional<bool>(true);
      if (text == "false" || text == "False" || text == "FALSE" || text == "no")
        return std::optional<bool>(false);
      return std::optional<bool>{};
    });
  }

  template <class Int>
  bool read_integer(const Fields& fields, std::string_view key, const std::string& where, Int& out,
                    std::uint64_t min, std::uint64_t max, bool size) {
    const std::string expected = size ? "a size in bytes like 36700160 or 35MiB" : "a whole number";
    return read(fields, key, where, expected, out, [&](const std::string& text, std::string& problem) {
      const auto value = size ? parse_size(text) : parse_integer<std::uint64_t>(text);
      if (!value) return std::optional<Int>{};
      if (*value < min || *value > max) {
        problem = "must be between " + std::to_string(min) + " and " + std::to_string(max) + ", got " + text;
        return std::optional<Int>{};
      }
      return std::optional<Int>(static_cast<Int>(*value));
    });
  }

  bool read_duration(const Fields& fields, std::string_view key, const std::string& where,
                     std::chrono::milliseconds& out, std::chrono::milliseconds min,
                     std::chrono::milliseconds max) {
    return read(
        fields, key, where, "a duration like 30s", out, [&](const std::string& text, std::string& problem) {
          const auto value = parse_duration(text);
          if (!value) return std::optional<std::chrono::milliseconds>{};
          if (*value < min || *value > max) {
            problem =
                "must be between " + format_duration(min) + " and " + format_duration(max) + ", got " + text;
            return std::optional<std::chrono::milliseconds>{};
          }
          return value;
        });
  }

  bool read_share(const Fields& fields, std::string_view key, const std::string& where, double& out) {
    return read(fields, key, where, "a share between 0 and 1 like 0.05", out,
                [](const std::string& text, std::string& problem) {
                  const auto value = parse_double(text);
                  if (value && (*value < 0.0 || *value > 1.0)) {
                    problem = "must be a share between 0 and 1 (0.05 = 5%), got " + text;
                    return std::optional<double>{};
                  }
                  return value;
                });
  }

  template <class Enum>
  bool read_enum(const Fields& fields, std::string_view key, const std::string& where, Enum& out,
                 const std::vector<std::pair<std::string_view, Enum>>& choices) {
    std::string expected = "one of";
    for (std::size_t i = 0; i < choices.size(); ++i) {
      expected += (i == 0 ? " " : ", ") + std::string(choices[i].first);
    }
    return read(fields, key, where, expected, out, [&](const std::string& text, std::string&) {
      for (const auto& [name, value] : choices) {
        if (name == text) return std::optional<Enum>(value);
      }
      return std::optional<Enum>{};
    });
  }

  // "host:port" or "[v6]:port"; `bind` requires an IP literal (something to listen on).
  bool read_endpoint(const Fields& fields, std::string_view key, const std::string& where, Endpoint& out,
                     bool bind) {
    const std::string expected =
        bind ? "an address like 0.0.0.0:25 or \"[::]:25\"" : "an address like mail.example.org:25";
    return read(fields, key, where, expected, out, [&](const std::string& text, std::string& problem) {
      Endpoint endpoint;
      endpoint.text = text;
      std::string_view port_text;
      if (!text.empty() && text.front() == '[') {
        const auto close = text.find(']');
        if (close == std::string::npos || close + 1 >= text.size() || text[close + 1] != ':') {
          return std::optional<Endpoint>{};
        }
        endpoint.host = text.substr(1, close - 1);
        port_text = std::string_view(text).substr(close + 2);
        if (endpoint.host.find(':') == std::string::npos || !parse_ip_address(endpoint.host)) {
          problem = "expected an IPv6 address inside [...], got " + quoted(text);
          return std::optional<Endpoint>{};
        }
      } else {
        const auto colon = text.rfind(':');
        if (colon == std::string::npos) {
          problem = "missing port in " + quoted(text) + " (expected host:port)";
          return std::optional<Endpoint>{};
        }
        endpoint.host = text.substr(0, colon);
        port_text = std::string_view(text).substr(colon + 1);
        if (endpoint.host.find(':') != std::string::npos) {
          problem = "IPv6 addresses need brackets: write \"[" + endpoint.host +
                    "]:" + std::string(port_text) + "\"";
          return std::optional<Endpoint>{};
        }
        if (endpoint.host.empty()) {
          problem =
              "missing host in " + quoted(text) + (bind ? " (use 0.0.0.0:port for all IPv4 addresses)" : "");
          return std::optional<Endpoint>{};
        }
        if (bind && !parse_ip_address(endpoint.host)) {
          problem = "expected an IP address to listen on, got " + quoted(endpoint.host) +
                    " (use 127.0.0.1, 0.0.0.0 or \"[::]\")";
          return std::optional<Endpoint>{};
        }
        // A host name may end with the root's dot: an absolute name, which is asked as written and never
        // completed by resolv.conf's search list (as glibc's res_search takes it).
        std::string_view name = endpoint.host;
        if (name.size() > 1 && name.ends_with('.')) name.remove_suffix(1);
        if (!bind && !parse_ip_address(endpoint.host) && !valid_hostname(name)) {
          problem = "invalid host name " + quoted(endpoint.host);
          return std::optional<Endpoint>{};
        }
      }
      const auto port = parse_integer<std::uint32_t>(port_text);
      if (!port || *port < 1 || *port > 65535) {
        problem = "invalid port " + quoted(port_text) + " in " + quoted(text) + " (expected 1..65535)";
        return std::optional<Endpoint>{};
      }
      endpoint.port = static_cast<std::uint16_t>(*port);
      return std::optional<Endpoint>(std::move(endpoint));
    });
  }

  // A certificate/key/CA file: checked now so that --check-config and SIGHUP catch a wrong path before it
  // matters. Relative paths are relative to the daemon's working directory (like the command line), not the
  // config file.
  bool read_file(const Fields& fields, std::string_view key, const std::string& where, std::string& out) {
    return read(fields, key, where, "a file path", out, [](const std::string& path, std::string& problem) {
      if (path.empty()) {
        problem = "must not be empty";
        return std::optional<std::string>{};
      }
      struct stat info {};
      if (::stat(path.c_str(), &info) != 0) {
        problem = "cannot read " + quoted(path) + ": " + std::strerror(errno);
        return std::optional<std::string>{};
      }
      if (!S_ISREG(info.st_mode)) {
        problem = quoted(path) + " is not a regular file";
        return std::optional<std::string>{};
      }
      const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
      if (fd < 0) {
        problem = "cannot read " + quoted(path) + ": " + std::strerror(errno);
        return std::optional<std::string>{};
      }
      ::close(fd);
      return std::optional<std::string>(path);
    });
  }

  std::vector<Cidr> read_cidrs(const Field& field, const std::string& where) {
    std::vector<Cidr> out;
    for (const auto& [text, node] : string_list(field, where, "a CIDR like 203.0.113.0/24")) {
      const auto cidr = Cidr::parse(text);
      if (!cidr) {
        error_at(node, where + ": expected a CIDR like 203.0.113.0/24 or 2001:db8::/32, got " + quoted(text));
        continue;
      }
      // "203.0.113.5/24" is nearly always a typo for a host or for the network; refuse rather than guess.
      const Cidr exact = Cidr::parse(text.substr(0, text.find('/'))).value();
      if (exact.network != cidr->network) {
        error_at(node,
                 where + ": " + quoted(text) + " has host bits set; did you mean " + cidr->to_string() + "?");
        continue;
      }
      out.push_back(*cidr);
    }
    return out;
  }

  // ---- sections
  // ----------------------------------------------------------------------------------------------
  void load_root(const YAML::Node& root) {
    root_mark_ = root.Mark();
    if (!root.IsDefined() || root.IsNull()) {
      error_at(YAML::Mark::null_mark(), "the configuration is empty: at least one listener is required");
      return;
    }
    const auto top = fields(root, root.Mark(), "", "");
    if (!top) return;

    config_.hostname = machine_hostname();
    read(*top, "hostname", "", "a host name", config_.hostname,
         [](const std::string& text, std::string& problem) {
           if (!valid_hostname(text)) problem = "invalid host name " + quoted(text);
           return valid_hostname(text) ? std::optional<std::string>(text) : std::nullopt;
         });
    if (read_string(*top, "state_dir", "", config_.state_dir))
      remember_position("state_dir", get(*top, "state_dir")->value);

    // Telemetry first: connectors inherit its alert defaults. Upstreams before listeners and listeners before
    // connectors, so that references can be checked as they are read, whatever order the file uses.
    if (const Field* field = get(*top, "telemetry")) load_telemetry(*field);
    if (const Field* field = get(*top, "upstreams")) load_upstreams(*field);
    const Field* listeners = get(*top, "listeners");
    if (listeners != nullptr) load_listeners(*listeners);
    if (config_.listeners.empty()) {
      error_at(listeners != nullptr ? listeners->key.Mark() : root.Mark(),
               "at least one listener is required");
    }
    if (const Field* field = get(*top, "connectors")) load_connectors(*field);
    if (const Field* field = get(*top, "dns")) load_dns(*field);
    if (config_.dns.trust_anchor_file.empty()) {
      // DANE rests on DNSSEC: without a trust anchor no answer is ever secure, and DANE would never apply.
      for (const auto& mark : dane_marks_) {
        error_at(mark, "tls: dane needs dns.trust_anchor_file (DNSSEC validation); without it no TLSA record "
                       "can be trusted");
      }
    }
    if (const Field* field = get(*top, "mta_sts")) load_mta_sts(*field);
    if (const Field* field = get(*top, "tlsrpt")) load_tlsrpt(*field);
    // TLS-RPT names its sender: the hostname unless said otherwise.
    if (config_.tlsrpt.organization_name.empty()) config_.tlsrpt.organization_name = config_.hostname;
    if (config_.tlsrpt.contact_info.empty()) config_.tlsrpt.contact_info = "postmaster@" + config_.hostname;
    if (config_.tlsrpt.submitter.empty()) config_.tlsrpt.submitter = config_.hostname;
    if (config_.tlsrpt.from.empty()) config_.tlsrpt.from = "tlsrpt-noreply@" + config_.hostname;
    if (const Field* field = get(*top, "http")) load_http(*field);
    if (!http_address_given_) {
      for (const auto& listener : bound_) {
        if (bind_clash(listener.address, config_.http.address) == Clash::none) continue;
        error_at(listener.mark, listener.path + ": " + quoted(listener.address.text) +
                                    " cannot listen beside http.address, whose default is " +
                                    quoted(config_.http.address.text) + " (set http.address to another one)");
      }
    }
    if (const Field* field = get(*top, "limits")) load_limits(*field);
    if (const Field* field = get(*top, "log")) load_log(*field);
    if (const Field* field = get(*top, "timeouts")) load_timeouts(*field);
    if (const Field* field = get(*top, "performance")) load_performance(*field);
  }

  static std::string machine_hostname() {
    char buffer[256] = {};
    if (::gethostname(buffer, sizeof buffer - 1) != 0 || buffer[0] == '\0') return "localhost";
    return buffer;
  }

  void load_alerts(const Field& field, std::string_view schema_path, const std::string& where,
                   AlertThresholds& out) {
    const auto map = fields(field, schema_path, where);
    if (!map) return;
    read_share(*map, "tls10_share", where, out.tls10_share);
    read_share(*map, "tls11_share", where, out.tls11_share);
    read_share(*map, "no_tls_share", where, out.no_tls_share);
    read_integer(*map, "min_messages", where, out.min_messages, 0, std::uint64_t{1} << 62, false);
  }

  void load_telemetry(const Field& field) {
    const auto map = fields(field, "telemetry", "telemetry");
    if (!map) return;
    std::chrono::milliseconds window = config_.telemetry.window;
    if (read_duration(*map, "window", "telemetry", window, std::chrono::hours(24),
                      std::chrono::hours(24 * 90))) {
      // Reports, insights and alerts speak in days ("in the last 7 days"), so the window is whole days.
      if (window % std::chrono::hours(24) != std::chrono::milliseconds(0)) {
        error_at(get(*map, "window")->value, "telemetry.window: must be a whole number of days (1d..90d)");
      } else {
        config_.telemetry.window = std::chrono::duration_cast<std::chrono::hours>(window);
      }
    }
    if (const Field* defaults = get(*map, "defaults")) {
      load_alerts(*defaults, "telemetry.defaults", "telemetry.defaults", config_.telemetry.defaults);
    }
    read_integer(*map, "top_domains", "telemetry", config_.telemetry.top_domains, 1, 10'000, false);
    read_integer(*map, "top_remotes", "telemetry", config_.telemetry.top_remotes, 1, 10'000, false);
    read_bool(*map, "remotes", "telemetry", config_.telemetry.remotes);
  }

  void load_upstreams(const Field& field) {
    const auto list = items(field, "upstreams");
    std::map<std::string, int> seen;
    for (std::size_t i = 0; i < list.size(); ++i) {
      const std::string where = "upstreams[" + std::to_string(i) + "]";
      const auto map = fields(list[i], list[i].Mark(), "upstreams[]", where);
      if (!map) continue;
      Upstream upstream;
      if (require(*map, "name", list[i].Mark(), where) && read_name(*map, "name", where, upstream.name)) {
        check_unique(seen, upstream.name, get(*map, "name")->value, "upstream");
      }
      load_upstream_route(*map, list[i].Mark(), where, upstream);
      read_enum(*map, "tls", where, upstream.tls,
                {{"none", UpstreamTls::none},
                 {"opportunistic", UpstreamTls::opportunistic},
                 {"required", UpstreamTls::required},
                 {"verify", UpstreamTls::verify},
                 {"dane", UpstreamTls::dane}});
      load_upstream_tls_policy(*map, where, upstream);
      if (upstream.tls == UpstreamTls::dane) {
        const Field* tls = get(*map, "tls");
        if (!upstream.mx && !upstream.address.host.empty() && parse_ip_address(upstream.address.host)) {
          error_at(tls->value, where + ".tls: dane needs a host name (its TLSA records are looked up under "
                                       "_PORT._tcp.HOST); address " + quoted(upstream.address.text) +
                                       " is an IP address");
        }
        dane_marks_.push_back(tls->value.Mark());
      }
      if (upstream.tls == UpstreamTls::verify) {
        if (get(*map, "ca_file") != nullptr) {
          if (read_file(*map, "ca_file", where, upstream.ca_file))
            remember_position(where + ".ca_file", get(*map, "ca_file")->value);
        } else if (::access(upstream.ca_file.c_str(), R_OK) != 0) {
          error_at(get(*map, "tls")->value, where + ".tls: verify needs a CA file, and the default " +
                                                quoted(upstream.ca_file) + " is not readable; set ca_file");
        }
      } else {
        read_string(*map, "ca_file", where, upstream.ca_file);
      }
      read_enum(*map, "xclient", where, upstream.xclient, {{"auto", true}, {"off", false}});
      load_upstream_mta_sts(*map, where, upstream);
      config_.upstreams.push_back(std::move(upstream));
    }
  }

  // Where an upstream delivers: a fixed `address` (which carries its port), or `mx: true` with `port`.
  void load_upstream_route(const Fields& map, const YAML::Mark& mark, const std::string& where, Upstream& upstream) {
    if (get(map, "mx") != nullptr && !read_bool(map, "mx", where, upstream.mx)) return;  // reported
    const Field* address = get(map, "address");
    if (upstream.mx) {
      if (address != nullptr) {
        error_at(address->key, where + ": \"address\" and \"mx: true\" exclude each other (mx: true delivers to "
                                       "the recipient domain's MX hosts; remove one)");
      }
      read_integer(map, "port", where, upstream.port, 1, 65535, false);
      return;
    }
    if (address == nullptr) {
      if (get(map, "mx") == nullptr) error_at(mark, where + ": missing required key \"address\" (or mx: true)");
      else error_at(get(map, "mx")->value, where + ": missing required key \"address\" (mx is false)");
    } else if (read_endpoint(map, "address", where, upstream.address, false)) {
      // Whether it is one of mailflowd's own listeners is the daemon's check (upstream_loops: it needs this
      // host's interfaces), reported at this position by --check-config, start and reload.
      remember_position(where + ".address", address->value);
    }
    if (const Field* port = get(map, "port")) {
      error_at(port->key, where + ".port: only for mx: true; an address carries its own port (\"host:port\")");
    }
  }

  void load_upstream_tls_policy(const Fields& map, const std::string& where, Upstream& upstream) {
    proto::TlsVersion min_version{};
    if (read(map, "min_version", where, "one of TLS1.0, TLS1.1, TLS1.2, TLS1.3", min_version,
             [](const std::string& text, std::string&) { return parse_min_version(text); })) {
      if (upstream.tls == UpstreamTls::none) {
        error_at(get(map, "min_version")->key, where + ".min_version: needs tls: opportunistic, required or verify "
                                                        "(tls is none)");
      } else {
        upstream.min_version = min_version;
      }
    }
    const Field* names = get(map, "verify_names");
    if (names == nullptr) return;
    const std::string path = where + ".verify_names";
    if (upstream.tls != UpstreamTls::verify) {
      error_at(names->key, path + ": only for tls: verify (the names a verified certificate must match; tls is " +
                               std::string(to_string(upstream.tls)) + ")");
      return;
    }
    for (const auto& [text, node] : string_list(*names, path, "a host name like mx1.example.com or *.example.com")) {
      const auto name = parse_domain_pattern(text);
      if (!name) {
        error_at(node, path + ": expected a host name like mx1.example.com or *.example.com, got " + quoted(text));
        continue;
      }
      upstream.verify_names.push_back(*name);
    }
  }

  // MTA-STS applies to the recipient domain's MX hosts: on by default (testing) for mx upstreams that speak TLS; a
  // fixed address has no recipient domain whose policy could name it, and without STARTTLS every delivery would
  // fail the policy.
  void load_upstream_mta_sts(const Fields& map, const std::string& where, Upstream& upstream) {
    upstream.mta_sts = upstream.mx && upstream.tls != UpstreamTls::none ? MtaStsMode::testing : MtaStsMode::off;
    const Field* field = get(map, "mta_sts");
    if (field == nullptr) return;
    MtaStsMode mode = upstream.mta_sts;
    if (!read_enum(map, "mta_sts", where, mode,
                   {{"off", MtaStsMode::off}, {"testing", MtaStsMode::testing}, {"enforce", MtaStsMode::enforce}}))
      return;
    if (!upstream.mx && mode != MtaStsMode::off) {
      error_at(field->key, where + ".mta_sts: only for mx: true (an MTA-STS policy lists a recipient domain's MX "
                                   "hosts; this upstream delivers to a fixed address)");
      return;
    }
    if (mode != MtaStsMode::off && upstream.tls == UpstreamTls::none) {
      error_at(field->key, where + ".mta_sts: needs STARTTLS (tls is none); set mta_sts: off or tls: opportunistic");
      return;
    }
    upstream.mta_sts = mode;
  }

  void load_mta_sts(const Field& field) {
    const auto map = fields(field, "mta_sts", "mta_sts");
    if (!map) return;
    // Its position: where --check-config says that the file does not load.
    if (read_file(*map, "ca_file", "mta_sts", config_.mta_sts.ca_file))
      remember_position("mta_sts.ca_file", get(*map, "ca_file")->value);
    read_duration(*map, "fetch_timeout", "mta_sts", config_.mta_sts.fetch_timeout, std::chrono::milliseconds(100),
                  std::chrono::minutes(5));
    read_integer(*map, "max_policies", "mta_sts", config_.mta_sts.max_policies, 1, 10'000'000, false);
  }

  void load_tlsrpt(const Field& field) {
    const auto map = fields(field, "tlsrpt", "tlsrpt");
    if (!map) return;
    read_bool(*map, "send", "tlsrpt", config_.tlsrpt.send);
    if (config_.tlsrpt.send) {
      // The report mails are sessions of mailflowd's own, counted under listener and upstream "tlsrpt"
      // (daemon/reasons.hpp tlsrpt_sessions): one of the configuration's own by that name would share its series.
      const auto mark = get(*map, "send")->key.Mark();
      for (const auto& listener : config_.listeners) {
        if (listener.name == "tlsrpt")
          warn_at(mark, "tlsrpt.send: the report mails are counted as listener \"tlsrpt\", which is also the name "
                        "of a configured listener: their metrics share series (rename the listener)");
      }
      for (const auto& upstream : config_.upstreams) {
        if (upstream.name == "tlsrpt")
          warn_at(mark, "tlsrpt.send: the report mails are counted as upstream \"tlsrpt\", which is also the name "
                        "of a configured upstream: their metrics share series (rename the upstream)");
      }
    }
    // Printable ASCII: these go into the report's JSON and the organization name into a text line of the
    // report mail as they are; that line has a length limit (proto::tlsrpt::max_organization_name).
    const auto ascii = [&](std::string_view key, std::string& out, std::size_t max_size) {
      const auto parse = [max_size](const std::string& text, std::string& problem) {
        const bool ok = !text.empty() && std::all_of(text.begin(), text.end(), [](char c) {
          return static_cast<unsigned char>(c) >= 0x20 && static_cast<unsigned char>(c) < 0x7f;
        });
        if (!ok) problem = "must be printable ASCII, not empty";
        if (ok && text.size() > max_size)
          problem = "at most " + std::to_string(max_size) +
                    " characters (it goes into a line of the report mail, and mail lines end at 998), got " +
                    std::to_string(text.size());
        return problem.empty() ? std::optional<std::string>(text) : std::nullopt;
      };
      return read(*map, key, "tlsrpt", "a string", out, parse);
    };
    ascii("organization_name", config_.tlsrpt.organization_name, proto::tlsrpt::max_organization_name);
    ascii("contact_info", config_.tlsrpt.contact_info, std::string::npos);
    read(*map, "submitter", "tlsrpt", "a domain name", config_.tlsrpt.submitter,
         [](const std::string& text, std::string& problem) {
           if (!valid_hostname(text)) problem = "expected a domain name like mx1.example.org, got " + quoted(text);
           return valid_hostname(text) ? std::optional<std::string>(text) : std::nullopt;
         });
    read(*map, "from", "tlsrpt", "a mail address", config_.tlsrpt.from,
         [](const std::string& text, std::string& problem) {
           // local@domain, printable ASCII without spaces or <>: it goes into MAIL FROM and the From: header.
           const auto at = text.rfind('@');
           const bool ok = at != std::string::npos && at > 0 && valid_hostname(text.substr(at + 1)) &&
                           std::all_of(text.begin(), text.begin() + static_cast<std::ptrdiff_t>(at), [](char c) {
                             const auto u = static_cast<unsigned char>(c);
                             return u > 0x20 && u < 0x7f && c != '<' && c != '>' && c != '@' && c != '"';
                           });
           if (!ok) problem = "expected an address like tlsrpt-noreply@mx1.example.org, got " + quoted(text);
           return ok ? std::optional<std::string>(text) : std::nullopt;
         });
    read_integer(*map, "smtp_port", "tlsrpt", config_.tlsrpt.smtp_port, 1, 65535, false);
    if (read_file(*map, "ca_file", "tlsrpt", config_.tlsrpt.ca_file))
      remember_position("tlsrpt.ca_file", get(*map, "ca_file")->value);
    read_duration(*map, "interval", "tlsrpt", config_.tlsrpt.interval, std::chrono::seconds(1),
                  std::chrono::hours(24));
    read_duration(*map, "retry_for", "tlsrpt", config_.tlsrpt.retry_for, std::chrono::milliseconds(0),
                  std::chrono::hours(24 * 14));
    read_duration(*map, "https_timeout", "tlsrpt", config_.tlsrpt.https_timeout, std::chrono::milliseconds(100),
                  std::chrono::minutes(5));
    read_integer(*map, "max_reports_per_run", "tlsrpt", config_.tlsrpt.max_reports_per_run, 1, 1'000'000, false);
  }

  void load_dns(const Field& field) {
    const auto map = fields(field, "dns", "dns");
    if (!map) return;
    if (const Field* servers = get(*map, "servers")) {
      const auto list = items(*servers, "dns.servers");
      // Not the default in disguise: an empty list (or one whose items are all commented out) is more likely
      // a mistake than a way to say /etc/resolv.conf, which leaving the key out says.
      if (list.empty() && (servers->value.IsNull() || servers->value.IsSequence()))
        error_at(*servers,
                 "dns.servers: an empty list names no DNS server; leave the key out to use the name servers "
                 "of /etc/resolv.conf");
      for (std::size_t i = 0; i < list.size(); ++i) {
        const std::string key = "servers[" + std::to_string(i) + "]";
        const auto text = scalar_item(list[i], "dns." + key, "an address like 127.0.0.1:53");
        if (!text) continue;
        Endpoint server;
        if (parse_ip_address(*text)) {  // a bare IP: the DNS port
          server = Endpoint{*text, 53, *text};
        } else {
          Fields one;
          one.emplace(key, Field{list[i], list[i]});
          if (!read_endpoint(one, key, "dns", server, false)) continue;
          if (!parse_ip_address(server.host)) {
            error_at(list[i], "dns." + key + ": expected the IP address of a DNS server, got " + quoted(*text));
            continue;
          }
        }
        config_.dns.servers.push_back(std::move(server));
      }
    }
    read_duration(*map, "timeout", "dns", config_.dns.timeout, std::chrono::milliseconds(100),
                  std::chrono::minutes(5));
    if (read_file(*map, "trust_anchor_file", "dns", config_.dns.trust_anchor_file))
      remember_position("dns.trust_anchor_file", get(*map, "trust_anchor_file")->value);
  }

  void check_unique(std::map<std::string, int>& seen, const std::string& name, const YAML::Node& node,
                    std::string_view kind) {
    const auto [it, inserted] = seen.emplace(name, node.Mark().line + 1);
    if (!inserted) {
      error_at(node, "duplicate " + std::string(kind) + " name " + quoted(name) + " (first defined at line " +
                         std::to_string(it->second) + ")");
    }
  }

  // "a, b" for "(known: a, b)" hints: valid names once each, in file order.
  template <class Item>
  static std::string known_names(const std::vector<Item>& items) {
    std::string out;
    std::set<std::string> seen;
    for (const auto& item : items) {
      if (!valid_name(item.name) || !seen.insert(item.name).second) continue;
      out += (out.empty() ? "" : ", ") + item.name;
    }
    return out;
  }

  void check_upstream_reference(const Fields& map, const std::string& where, std::string& out) {
    if (!read_name(map, "upstream", where, out)) return;
    if (config_.find_upstream(out) == nullptr) {
      const std::string known = known_names(config_.upstreams);
      error_at(get(map, "upstream")->value,
               where + ".upstream: no upstream named " + quoted(out) +
                   (known.empty() ? " (upstreams: is empty)" : " (known: " + known + ")"));
    }
  }

  void load_listeners(const Field& field) {
    const auto list = items(field, "listeners");
    std::map<std::string, int> seen;
    for (std::size_t i = 0; i < list.size(); ++i) {
      const std::string where = "listeners[" + std::to_string(i) + "]";
      const auto map = fields(list[i], list[i].Mark(), "listeners[]", where);
      if (!map) continue;
      Listener listener;
      if (require(*map, "name", list[i].Mark(), where) && read_name(*map, "name", where, listener.name)) {
        check_unique(seen, listener.name, get(*map, "name")->value, "listener");
      }
      if (require(*map, "address", list[i].Mark(), where) &&
          read_endpoint(*map, "address", where, listener.address, true)) {
        const YAML::Mark mark = get(*map, "address")->value.Mark();
        // --check-config says at a wildcard listener's address that it could not read the host's addresses.
        remember_position(where + ".address", get(*map, "address")->value);
        if (const auto v4 = ipv4_mapped(listener.address)) {
          // The daemon binds a listener's IPv6 address IPv6-only, and Linux refuses a mapped one there
          // (EINVAL).
          error_at(
              mark,
              where + ".address: " + quoted(listener.address.text) +
                  " is an IPv4-mapped IPv6 address, which a listener (IPv6-only) cannot listen on: write " +
                  quoted(*v4 + ":" + std::to_string(listener.address.port)));
        } else {
          check_bind(listener.address, mark, where + ".address");
          bound_.push_back({listener.name, listener.address, where + ".address", mark});
        }
      }
      read_enum(*map, "direction", where, listener.direction,
                {{"inbound", Direction::inbound}, {"outbound", Direction::outbound}});
      if (const Field* tls = get(*map, "tls")) load_listener_tls(*tls, where + ".tls", listener);
      if (const Field* proxy = get(*map, "proxy_protocol")) {
        const auto proxy_map = fields(*proxy, "listeners[].proxy_protocol", where + ".proxy_protocol");
        if (proxy_map) {
          if (const Field* trusted = get(*proxy_map, "trusted")) {
            listener.proxy_trusted = read_cidrs(*trusted, where + ".proxy_protocol.trusted");
          }
        }
      }
      if (get(*map, "upstream") == nullptr) {
        error_at(list[i].Mark(),
                 where + ": missing required key \"upstream\" (the default route for its mail)");
      } else {
        check_upstream_reference(*map, where, listener.upstream);
      }
      config_.listeners.push_back(std::move(listener));
    }
  }

  // "::ffff:192.0.2.1" (written in brackets) -> "192.0.2.1"; nullopt for any other address.
  static std::optional<std::string> ipv4_mapped(const Endpoint& address) {
    const auto ip = parse_ip_address(address.host);
    if (!ip || address.host.find(':') == std::string::npos) return std::nullopt;
    static constexpr std::array<std::uint8_t, 12> prefix{0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
    if (!std::equal(prefix.begin(), prefix.end(), ip->begin())) return std::nullopt;
    return std::to_string((*ip)[12]) + "." + std::to_string((*ip)[13]) + "." + std::to_string((*ip)[14]) +
           "." + std::to_string((*ip)[15]);
  }

  // The listeners' addresses so far: http.address and each further listener must be able to listen beside them.
  struct Bound {
    std::string listener;
    Endpoint address;
    std::string path;  // "listeners[N].address"
    YAML::Mark mark;
  };
  std::vector<Bound> bound_;
  bool http_address_given_ = false;

  // Whether `address` can listen beside `other`. Linux lets no two sockets listen on one port where their
  // addresses are the same or one of them is the wildcard of the other's family (0.0.0.0, or "::", which the
  // daemon binds IPv6-only), SO_REUSEADDR or not: refused here, not with "Address already in use" at start.
  enum class Clash { none, same, this_wildcard, that_wildcard };
  static Clash bind_clash(const Endpoint& address, const Endpoint& other) {
    if (other.port != address.port) return Clash::none;
    if (parse_ip_address(other.host) == parse_ip_address(address.host)) return Clash::same;
    const auto family_wildcard = [](const Endpoint& e) {
      const bool v6 = e.host.find(':') != std::string::npos;
      return std::pair(v6, parse_ip_address(e.host) == parse_ip_address(v6 ? "::" : "0.0.0.0"));
    };
    const auto [v6, wildcard] = family_wildcard(address);
    const auto [other_v6, other_wildcard] = family_wildcard(other);
    if (other_v6 != v6) return Clash::none;
    return wildcard ? Clash::this_wildcard : other_wildcard ? Clash::that_wildcard : Clash::none;
  }

  // The HTTP server binds "[::]" dual-stack (a listener's "[::]" is IPv6-only): it takes the port on the IPv4
  // addresses too, so no IPv4 listener can listen beside it.
  void check_http_dual_stack(const YAML::Mark& mark) {
    const Endpoint& http = config_.http.address;
    if (parse_ip_address(http.host) != parse_ip_address("::")) return;
    for (const auto& other : bound_) {
      if (other.address.port != http.port || other.address.host.find(':') != std::string::npos) continue;
      error_at(mark, "http.address: " + quoted(http.text) + " cannot listen beside listener " +
                         quoted(other.listener) + " on " + quoted(other.address.text) +
                         " (http.address \"[::]\" takes IPv4 clients too, on every local address)");
      return;
    }
  }

  // False when `address` cannot listen beside one of the listeners (the error is recorded).
  bool check_bind(const Endpoint& address, const YAML::Mark& mark, const std::string& path) {
    for (const auto& other : bound_) {
      const Clash clash = bind_clash(address, other.address);
      if (clash == Clash::none) continue;
      std::string message = path + ": " + quoted(address.text);
      if (clash == Clash::same) {
        message += " is already used by listener " + quoted(other.listener);
      } else {
        message += " cannot listen beside listener " + quoted(other.listener) + " on " + quoted(other.address.text) +
                   " (" + (clash == Clash::this_wildcard ? "this" : "that") +
                   " address takes the port on every local address of its family)";
      }
      error_at(mark, std::move(message));
      return false;
    }
    return true;
  }

  void load_listener_tls(const Field& field, const std::string& where, Listener& listener) {
    const auto map = fields(field, "listeners[].tls", where);
    if (!map) return;
    ListenerTls tls;
    if (const Field* certificates = require(*map, "certificates", field.key.Mark(), where)) {
      const auto list = items(*certificates, where + ".certificates");
      if (list.empty()) {
        error_at(*certificates, where + ".certificates: at least one {cert, key} pair is required");
      }
      for (std::size_t i = 0; i < list.size(); ++i) {
        const std::string item_where = where + ".certificates[" + std::to_string(i) + "]";
        const auto pair_map = fields(list[i], list[i].Mark(), "listeners[].tls.certificates[]", item_where);
        if (!pair_map) continue;
        CertificatePair pair;
        if (require(*pair_map, "cert", list[i].Mark(), item_where) &&
            read_file(*pair_map, "cert", item_where, pair.cert))
          remember_position(item_where + ".cert", get(*pair_map, "cert")->value);
        if (require(*pair_map, "key", list[i].Mark(), item_where))
          read_file(*pair_map, "key", item_where, pair.key);
        tls.certificates.push_back(std::move(pair));
      }
    }
    read(*map, "min_version", where, "one of TLS1.0, TLS1.1, TLS1.2, TLS1.3", tls.min_version,
         [](const std::string& text, std::string&) { return parse_min_version(text); });
    if (read_string(*map, "ciphers", where, tls.ciphers))
      remember_position(where + ".ciphers", get(*map, "ciphers")->value);  // OpenSSL's verdict is said there
    listener.tls = std::move(tls);
  }

  void load_connectors(const Field& field) {
    const auto list = items(field, "connectors");
    std::map<std::string, int> seen;
    for (std::size_t i = 0; i < list.size(); ++i) {
      const std::string where = "connectors[" + std::to_string(i) + "]";
      const auto map = fields(list[i], list[i].Mark(), "connectors[]", where);
      if (!map) continue;
      Connector connector;
      connector.alerts = config_.telemetry.defaults;
      const bool named =
          require(*map, "name", list[i].Mark(), where) && read_name(*map, "name", where, connector.name);
      if (named) check_unique(seen, connector.name, get(*map, "name")->value, "connector");
      read_enum(*map, "type", where, connector.type,
                {{"partner", ConnectorType::partner},
                 {"onpremises", ConnectorType::onpremises},
                 {"internet", ConnectorType::internet}});
      if (named && connector.name == "internet" && connector.type != ConnectorType::internet) {
        error_at(get(*map, "name")->value,
                 where +
                     ".name: \"internet\" is reserved for unmatched traffic; choose another name or set "
                     "type: internet");
      }
      const bool has_direction =
          read_enum(*map, "direction", where, connector.direction,
                    {{"inbound", Direction::inbound}, {"outbound", Direction::outbound}});
      std::optional<std::vector<MatchedListener>> matched;
      if (const Field* match = get(*map, "match"))
        matched = load_match(*match, where + ".match", connector.match);
      if (!matched && get(*map, "direction") == nullptr) {
        error_at(list[i].Mark(),
                 where + ": missing required key \"direction\" (needed when match.listener is not given)");
      }
      if (matched)
        check_direction(*matched, has_direction ? get(*map, "direction") : nullptr, where, connector);
      read_bool(*map, "require_tls", where, connector.require_tls);
      if (get(*map, "upstream") != nullptr) check_upstream_reference(*map, where, connector.upstream);
      if (const Field* alerts = get(*map, "alerts")) {
        load_alerts(*alerts, "connectors[].alerts", where + ".alerts", connector.alerts);
      }
      config_.connectors.push_back(std::move(connector));
      ConnectorMarks marks;
      marks.item = named ? get(*map, "name")->value.Mark() : list[i].Mark();
      if (const Field* direction = get(*map, "direction")) marks.direction = direction->value.Mark();
      if (const Field* require_tls = get(*map, "require_tls")) marks.require_tls = require_tls->value.Mark();
      if (!config_.connectors.back().match.sni.empty()) marks.sni = get(*map, "match")->value["sni"].Mark();
      marks.line = list[i].Mark().line + 1;
      connector_marks_.push_back(marks);
    }
    check_connectors();
  }

  // Where a loaded connector was written, for the checks across connectors (parallel to config_.connectors).
  struct ConnectorMarks {
    YAML::Mark item;         // its name (or the list item)
    YAML::Mark direction;    // null when not given
    YAML::Mark require_tls;  // null when not given
    YAML::Mark sni;          // match.sni; null when not given
    int line = 0;
  };
  std::vector<ConnectorMarks> connector_marks_;
  std::vector<YAML::Mark> dane_marks_;  // upstreams with tls: dane (checked against dns.trust_anchor_file)

  // The listeners whose traffic a connector can see: those of match.listener, else every listener of its
  // direction (connector_match.cpp compares the direction first).
  std::vector<const Listener*> reachable_listeners(const Connector& connector) const {
    std::vector<const Listener*> out;
    for (const auto& listener : config_.listeners) {
      if (listener.direction != connector.direction) continue;
      const auto& named = connector.match.listeners;
      if (named.empty() || std::find(named.begin(), named.end(), listener.name) != named.end())
        out.push_back(&listener);
    }
    return out;
  }

  static bool cidrs_cover(const std::vector<Cidr>& outer, const std::vector<Cidr>& inner) {
    if (outer.empty()) return true;  // any address
    if (inner.empty()) return false;
    return std::all_of(inner.begin(), inner.end(), [&](const Cidr& in) {
      return std::any_of(outer.begin(), outer.end(),
                         [&](const Cidr& out) { return out.prefix <= in.prefix && out.contains(in.network); });
    });
  }

  // Every name that matches a pattern of `inner` matches one of `outer` (glob_match of a pattern against a
  // pattern is sound here: a '*' of the inner pattern can only be consumed by a '*' of the outer one).
  static bool patterns_cover(const std::vector<std::string>& outer, const std::vector<std::string>& inner) {
    if (outer.empty()) return true;
    if (inner.empty()) return false;
    return std::all_of(inner.begin(), inner.end(), [&](const std::string& in) {
      return std::any_of(outer.begin(), outer.end(), [&](const std::string& out) { return glob_match(out, in); });
    });
  }

  // True when every transaction that `later` would match is matched by `earlier` first.
  bool match_covers(const Connector& earlier, const Connector& later) const {
    if (earlier.direction != later.direction) return false;
    const auto outer = reachable_listeners(earlier);
    for (const Listener* listener : reachable_listeners(later)) {
      if (std::find(outer.begin(), outer.end(), listener) == outer.end()) return false;
    }
    const ConnectorMatch& a = earlier.match;
    const ConnectorMatch& b = later.match;
    return cidrs_cover(a.client_cidrs, b.client_cidrs) && patterns_cover(a.sender_domains, b.sender_domains) &&
           patterns_cover(a.recipient_domains, b.recipient_domains) && patterns_cover(a.ehlo, b.ehlo) &&
           patterns_cover(a.sni, b.sni);
  }

  // Checks that need all connectors and listeners: require_tls where no STARTTLS is offered (an error: its
  // clients would get 530 for ever), and connectors that can never match (warnings).
  void check_connectors() {
    for (std::size_t i = 0; i < config_.connectors.size() && i < connector_marks_.size(); ++i) {
      const Connector& connector = config_.connectors[i];
      const ConnectorMarks& marks = connector_marks_[i];
      const std::string where = "connectors[" + std::to_string(i) + "]";
      const std::string direction(to_string(connector.direction));
      const auto listeners = reachable_listeners(connector);
      if (listeners.empty()) {
        // match.listener naming unknown listeners is an error already.
        if (connector.match.listeners.empty()) {
          warn_at(marks.direction.is_null() ? marks.item : marks.direction,
                  where + ": no " + direction + " listener is configured, so connector " + quoted(connector.name) +
                      " never matches (a connector sees only the traffic of listeners with its direction)");
        }
        continue;
      }
      if (connector.require_tls) {
        std::vector<std::string> plain;
        for (const Listener* listener : listeners) {
          if (!listener->tls) plain.push_back(quoted(listener->name));
        }
        std::string names;
        for (const auto& name : plain) names += (names.empty() ? "" : ", ") + name;
        const std::string offer = plain.size() == 1 ? "listener " + names + " offers" : "listeners " + names + " offer";
        if (!plain.empty() && plain.size() == listeners.size()) {
          error_at(marks.require_tls, where + ".require_tls: " + offer +
                                          " no STARTTLS (no tls: block), so every client of connector " +
                                          quoted(connector.name) +
                                          " would get 530 5.7.0 and its mail would bounce; add a tls: block with "
                                          "certificates to the listener, or set require_tls: false");
        } else if (!plain.empty()) {
          warn_at(marks.require_tls,
                  where + ".require_tls: " + offer + " no STARTTLS (no tls: block): clients of connector " +
                      quoted(connector.name) +
                      " that connect there get 530 5.7.0; restrict the connector with match.listener to "
                      "listeners with tls:");
        }
      }
      // SNI comes with a TLS handshake: on listeners without STARTTLS no client sends one, and a connector
      // that needs it sees nothing but "internet" traffic there.
      if (!connector.match.sni.empty() &&
          std::none_of(listeners.begin(), listeners.end(),
                       [](const Listener* l) { return l->tls.has_value(); })) {
        std::string names;
        for (const Listener* listener : listeners)
          names += (names.empty() ? "" : ", ") + quoted(listener->name);
        warn_at(
            marks.sni,
            where + ".match.sni: " +
                (listeners.size() == 1 ? "listener " + names + " offers" : "listeners " + names + " offer") +
                " no STARTTLS (no tls: block), so no client sends an SNI there and connector " +
                quoted(connector.name) +
                " never matches; add a tls: block with certificates to the listener, or leave "
                "match.sni out");
      }
      for (std::size_t j = 0; j < i; ++j) {
        const Connector& earlier = config_.connectors[j];
        if (!match_covers(earlier, connector)) continue;
        const bool catch_all = earlier.match.listeners.empty() && earlier.match.client_cidrs.empty() &&
                               earlier.match.sender_domains.empty() && earlier.match.recipient_domains.empty() &&
                               earlier.match.ehlo.empty() && earlier.match.sni.empty();
        warn_at(marks.item, where + ": connector " + quoted(connector.name) + " never matches: connector " +
                                quoted(earlier.name) + " (line " + std::to_string(connector_marks_[j].line) +
                                ") comes first and " +
                                (catch_all ? "matches all " + direction + " traffic"
                                           : "matches everything this one would") +
                                " (first match wins); move it above " + quoted(earlier.name) +
                                " or narrow that one's match");
        break;
      }
    }
  }

  struct MatchedListener {
    const Listener* listener;
    YAML::Node node;
  };

  // A connector's direction is its listeners': taken from them when not given, an error when it differs.
  void check_direction(const std::vector<MatchedListener>& matched, const Field* direction_field,
                       const std::string& where, Connector& connector) {
    for (std::size_t i = 0; i < matched.size(); ++i) {
      const Listener& listener = *matched[i].listener;
      if (direction_field != nullptr) {
        if (listener.direction != connector.direction) {
          error_at(*direction_field, where + ".direction: the connector is " +
                                         std::string(to_string(connector.direction)) + " but its listener " +
                                         quoted(listener.name) + " is " +
                                         std::string(to_string(listener.direction)) +
                                         " (a connector's direction is its listener's)");
        }
      } else if (i == 0) {
        connector.direction = listener.direction;
      } else if (listener.direction != connector.direction) {
        error_at(matched[i].node, where + ".match.listener: listener " + quoted(listener.name) + " is " +
                                      std::string(to_string(listener.direction)) + " but " +
                                      quoted(matched[0].listener->name) + " is " +
                                      std::string(to_string(connector.direction)) +
                                      "; a connector has one direction");
      }
    }
  }

  // Reads match; returns the listeners named by match.listener (nullopt when that key is absent).
  std::optional<std::vector<MatchedListener>> load_match(const Field& field, const std::string& where,
                                                         ConnectorMatch& match) {
    const auto map = fields(field, "connectors[].match", where);
    if (!map) return std::nullopt;
    // Each list matches if any of its items does: an empty one (or one whose items are all commented out) would
    // match nothing, and is no way to say "any" (that is leaving the key out).
    for (const auto& key : keys_of("connectors[].match")) {
      const Field* list = get(*map, key);
      if (list != nullptr && (list->value.IsNull() || (list->value.IsSequence() && list->value.size() == 0)))
        error_at(*list, join(where, key) + ": an empty list matches nothing; leave the key out to match any");
    }
    std::optional<std::vector<MatchedListener>> matched;
    if (const Field* listeners = get(*map, "listener")) {
      matched.emplace();
      for (const auto& [name, node] : string_list(*listeners, where + ".listener", "a listener name")) {
        const Listener* listener = config_.find_listener(name);
        if (listener == nullptr) {
          const std::string known = known_names(config_.listeners);
          error_at(node, where + ".listener: no listener named " + quoted(name) +
                             (known.empty() ? "" : " (known: " + known + ")"));
          continue;
        }
        match.listeners.push_back(name);
        matched->push_back(MatchedListener{listener, node});
      }
    }
    if (const Field* cidrs = get(*map, "client_cidrs"))
      match.client_cidrs = read_cidrs(*cidrs, where + ".client_cidrs");
    const auto domains = [&](std::string_view key, std::vector<std::string>& out) {
      const Field* domains_field = get(*map, key);
      if (domains_field == nullptr) return;
      const std::string path = join(where, key);
      for (const auto& [text, node] : string_list(*domains_field, path, "a domain")) {
        auto domain = parse_domain_pattern(text);
        if (!domain) {
          error_at(node, path + ": expected a domain like example.com or *.example.com, got " + quoted(text));
          continue;
        }
        out.push_back(std::move(*domain));
      }
    };
    domains("sender_domains", match.sender_domains);
    domains("recipient_domains", match.recipient_domains);
    const auto patterns = [&](std::string_view key, std::vector<std::string>& out) {
      const Field* patterns_field = get(*map, key);
      if (patterns_field == nullptr) return;
      const std::string path = join(where, key);
      for (const auto& [text, node] :
           string_list(*patterns_field, path, "a name pattern like *.example.com")) {
        const bool ok = !text.empty() &&
                        std::all_of(text.begin(), text.end(), [](char c) { return c > ' ' && c < 0x7f; });
        if (!ok) {
          error_at(node, path + ": expected a name pattern like *.example.com, got " + quoted(text));
          continue;
        }
        // Clients send EHLO names and SNI without the root's dot (RFC 6066 forbids it in SNI).
        if (text.size() > 1 && text.back() == '.') {
          warn_at(node.Mark(), path + ": " + quoted(text) + " ends with a dot, but names are compared as "
                                   "clients send them, without it, so this pattern never matches (write " +
                                   quoted(std::string_view(text).substr(0, text.size() - 1)) + ")");
        }
        out.push_back(proto::ascii_lower(text));
      }
    };
    patterns("ehlo", match.ehlo);
    patterns("sni", match.sni);
    return matched;
  }

  void load_http(const Field& field) {
    const auto map = fields(field, "http", "http");
    if (!map) return;
    http_address_given_ = get(*map, "address") != nullptr;
    if (read_endpoint(*map, "address", "http", config_.http.address, true)) {
      const YAML::Mark mark = get(*map, "address")->value.Mark();
      if (check_bind(config_.http.address, mark, "http.address")) check_http_dual_stack(mark);
    }
    if (const Field* auth = get(*map, "basic_auth")) {
      const auto auth_map = fields(*auth, "http.basic_auth", "http.basic_auth");
      if (auth_map) {
        BasicAuth basic;
        if (require(*auth_map, "user", auth->key.Mark(), "http.basic_auth")) {
          read(*auth_map, "user", "http.basic_auth", "a user name", basic.user,
               [](const std::string& text, std::string& problem) {
                 const bool ok = !text.empty() && text.find(':') == std::string::npos;
                 if (!ok) problem = "must be non-empty and contain no ':'";
                 return ok ? std::optional<std::string>(text) : std::nullopt;
               });
        }
        if (require(*auth_map, "password_hash", auth->key.Mark(), "http.basic_auth")) {
          read(*auth_map, "password_hash", "http.basic_auth", "a crypt(3) hash", basic.password_hash,
               [](const std::string& text, std::string& problem) {
                 problem = password_hash_problem(text);
                 return problem.empty() ? std::optional<std::string>(text) : std::nullopt;
               });
        }
        config_.http.basic_auth = std::move(basic);
      }
    }
    if (const Field* tls = get(*map, "tls")) {
      const auto tls_map = fields(*tls, "http.tls", "http.tls");
      if (tls_map) {
        CertificatePair pair;
        if (require(*tls_map, "cert", tls->key.Mark(), "http.tls") &&
            read_file(*tls_map, "cert", "http.tls", pair.cert))
          remember_position("http.tls.cert", get(*tls_map, "cert")->value);
        if (require(*tls_map, "key", tls->key.Mark(), "http.tls"))
          read_file(*tls_map, "key", "http.tls", pair.key);
        config_.http.tls = std::move(pair);
        // http.tls's certificate is exported as listener "http" (daemon/telemetry.cpp): a listener of that
        // name with certificates of its own would share the label value.
        for (const auto& listener : config_.listeners) {
          if (listener.name == "http" && listener.tls && !listener.tls->certificates.empty())
            warn_at(tls->key.Mark(),
                    "http.tls: its certificate is exported as listener \"http\" in "
                    "mailflow_certificate_expiry_timestamp_seconds, which is also the name of a configured "
                    "listener "
                    "with certificates: their series cannot be told apart (rename the listener)");
        }
      }
    }
  }

  void load_limits(const Field& field) {
    const auto map = fields(field, "limits", "limits");
    if (!map) return;
    Limits& limits = config_.limits;
    read_integer(*map, "max_sessions", "limits", limits.max_sessions, 1, 1'000'000, false);
    read_integer(*map, "max_sessions_per_ip", "limits", limits.max_sessions_per_ip, 1, 1'000'000, false);
    read_integer(*map, "max_message_size", "limits", limits.max_message_size, 1024, std::uint64_t{1} << 40,
                 true);
    read_integer(*map, "max_recipients", "limits", limits.max_recipients, 1, 100'000, false);
    read_integer(*map, "max_bad_commands", "limits", limits.max_bad_commands, 1, 10'000, false);
    read_integer(*map, "max_junk_commands", "limits", limits.max_junk_commands, 0, 1'000'000, false);
    // RFC 5321 §4.5.3.1.6: a server must accept text lines of 1000 octets including CRLF.
    read_integer(*map, "max_line", "limits", limits.max_line, 1000, 1 << 20, false);
    read_duration(*map, "drain_timeout", "limits", limits.drain_timeout, std::chrono::milliseconds(0),
                  std::chrono::hours(24));
    read_duration(*map, "greet_pause", "limits", limits.greet_pause, std::chrono::milliseconds(0),
                  std::chrono::minutes(5));
    read_enum(
        *map, "bare_newline", "limits", limits.bare_newline,
        {{"normalize", proto::BareNewlinePolicy::normalize}, {"reject", proto::BareNewlinePolicy::reject}});
    read_integer(*map, "max_hops", "limits", limits.max_hops, 1, 1000, false);
  }

  void load_log(const Field& field) {
    const auto map = fields(field, "log", "log");
    if (!map) return;
    read_enum(*map, "level", "log", config_.log.level,
              {{"trace", std::string("trace")},
               {"debug", std::string("debug")},
               {"info", std::string("info")},
               {"warn", std::string("warn")},
               {"error", std::string("error")},
               {"critical", std::string("critical")},
               {"off", std::string("off")}});
    read_enum(*map, "format", "log", config_.log.format,
              {{"text", LogFormat::text}, {"json", LogFormat::json}});
    read_enum(*map, "output", "log", config_.log.output,
              {{"stderr", LogOutput::standard_error}, {"syslog", LogOutput::syslog}});
  }

  void load_performance(const Field& field) {
    const auto map = fields(field, "performance", "performance");
    if (!map) return;
    read_bool(*map, "busy_poll", "performance", config_.performance.busy_poll);
    read(*map, "event_loops", "performance", "a whole number from 1 to 1024, or auto",
         config_.performance.event_loops, [](const std::string& text, std::string&) {
           if (text == "auto") return std::optional<unsigned>(0);
           const auto value = parse_integer<std::uint64_t>(text);
           if (!value || *value < 1 || *value > 1024) return std::optional<unsigned>{};
           return std::optional<unsigned>(static_cast<unsigned>(*value));
         });
  }

  void load_timeouts(const Field& field) {
    const auto map = fields(field, "timeouts", "timeouts");
    if (!map) return;
    Timeouts& t = config_.timeouts;
    const auto one = [&](std::string_view key, std::chrono::milliseconds& out) {
      read_duration(*map, key, "timeouts", out, std::chrono::milliseconds(1), std::chrono::hours(24));
    };
    one("greeting", t.greeting);
    one("command", t.command);
    one("data_block", t.data_block);
    one("data_end", t.data_end);
    one("tls_handshake", t.tls_handshake);
    one("upstream_connect", t.upstream_connect);
    one("upstream_open", t.upstream_open);
    // upstream_open bounds the whole opening of an upstream, every connect attempt included: no longer than
    // one attempt, it leaves no time for the next MX host or address.
    if (t.upstream_open <= t.upstream_connect) {
      const Field* at = get(*map, "upstream_open");
      if (at == nullptr) at = get(*map, "upstream_connect");
      warn_at(at->value.Mark(), "timeouts.upstream_open (" + format_duration(t.upstream_open) +
                                    ") is not longer than timeouts.upstream_connect (" +
                                    format_duration(t.upstream_connect) +
                                    "): a host that does not answer leaves no time to try the next one");
    }
  }
};

}  // namespace

std::vector<std::string> known_keys() {
  std::vector<std::string> out;
  for (const auto& section : schema()) {
    for (const auto& key : section.keys) {
      out.push_back(section.path.empty() ? std::string(key)
                                         : std::string(section.path) + "." + std::string(key));
    }
  }
  return out;
}

LoadResult load_config_string(std::string_view yaml, const std::string& file_name) {
  return Loader(file_name).load(yaml);
}

LoadResult load_config_file(const std::string& path) {
  const auto unreadable = [&](int error) {
    LoadResult result;
    result.errors.push_back(
        ConfigError{path, 0, 0, std::string("cannot read the configuration: ") + std::strerror(error)});
    return result;
  };
  std::ifstream in(path, std::ios::binary);
  if (!in) return unreadable(errno);
  // A directory opens like a file and reads as nothing, which is no empty configuration.
  struct stat info {};
  if (::stat(path.c_str(), &info) == 0 && S_ISDIR(info.st_mode)) return unreadable(EISDIR);
  std::string text;
  std::vector<char> buffer(65536);
  while (in.read(buffer.data(), static_cast<std::streamsize>(buffer.size())) || in.gcount() > 0) {
    text.append(buffer.data(), static_cast<std::size_t>(in.gcount()));
    if (text.size() > max_config_bytes) {
      LoadResult result;
      const std::string size = std::to_string(max_config_bytes / (1024 * 1024)) + " MiB";
      result.errors.push_back(ConfigError{path, 0, 0,
                                          "the configuration is larger than " + size +
                                              " (no configuration is that large: is it the right file?)"});
      return result;
    }
  }
  if (in.bad()) return unreadable(errno);
  return load_config_string(text, path);
}

}  // namespace mailflow::config
