#include "proto/command.hpp"

#include <cstdint>

namespace mailflow::proto {

namespace {

char to_upper(char c) { return (c >= 'a' && c <= 'z') ? static_cast<char>(c - 'a' + 'A') : c; }
char to_lower(char c) { return (c >= 'A' && c <= 'Z') ? static_cast<char>(c - 'A' + 'a') : c; }

bool iequals(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (to_upper(a[i]) != to_upper(b[i])) return false;
  }
  return true;
}

bool istarts_with(std::string_view text, std::string_view prefix) {
  return text.size() >= prefix.size() && iequals(text.substr(0, prefix.size()), prefix);
}

bool is_alpha(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); }
bool is_digit(char c) { return c >= '0' && c <= '9'; }

// RFC 5322 atext.
bool is_atext(char c) {
  if (is_alpha(c) || is_digit(c)) return true;
  switch (c) {
    case '!':
    case '#':
    case '$':
    case '%':
    case '&':
    case '\'':
    case '*':
    case '+':
    case '-':
    case '/':
    case '=':
    case '?':
    case '^':
    case '_':
    case '`':
    case '{':
    case '|':
    case '}':
    case '~':
      return true;
    default:
      return false;
  }
}

// A domain name (letters, digits, '-', '.'; no empty labels) or an address literal "[...]".
bool valid_domain(std::string_view d) {
  if (d.empty()) return false;
  if (d.front() == '[') {
    if (d.size() < 3 || d.back() != ']') return false;
    // IPv4 "[192.0.2.1]" or tagged "[IPv6:2001:db8::1]": letters, digits, '.', ':', '-' only.
    for (char c : d.substr(1, d.size() - 2)) {
      if (!is_alpha(c) && !is_digit(c) && c != '.' && c != ':' && c != '-') return false;
    }
    return true;
  }
  if (d.size() > 255) return false;
  std::size_t label = 0;
  for (std::size_t i = 0; i < d.size(); ++i) {
    const char c = d[i];
    if (c == '.') {
      if (label == 0) return false;
      label = 0;
      continue;
    }
    if (!is_alpha(c) && !is_digit(c) && c != '-' && c != '_') return false;
    if (++label > 63) return false;
  }
  // A trailing dot ("example.org.") is tolerated as in the wild.
  return d.back() == '.' ? d.size() > 1 : label > 0;
}

// Local part: a dot-string of atext (lenient about dot placement, as Postfix is) or a quoted string.
bool valid_local_part(std::string_view l) {
  if (l.empty() || l.size() > 256) return false;
  if (l.front() == '"') {
    if (l.size() < 2 || l.back() != '"') return false;
    for (std::size_t i = 1; i + 1 < l.size(); ++i) {
      if (l[i] == '\\') {
        if (++i + 1 >= l.size()) return false;  // escape must precede a character, not the closing quote
      } else if (l[i] == '"') {
        return false;
      }
    }
    return true;
  }
  for (char c : l) {
    if (!is_atext(c) && c != '.') return false;
  }
  return true;
}

enum class PathKind { mail, rcpt };

struct PathResult {
  bool ok = false;
  std::string address;
  std::string_view rest;  // after '>'
};

// Parses "<...>" at the start of `text`.
PathResult parse_path(std::string_view text, PathKind kind) {
  PathResult r;
  if (text.empty() || text.front() != '<') return r;
  // Find the closing '>' outside a quoted local part.
  bool quoted = false;
  std::size_t close = std::string_view::npos;
  for (std::size_t i = 1; i < text.size(); ++i) {
    const char c = text[i];
    if (quoted && c == '\\') {
      ++i;
      continue;
    }
    if (c == '"') quoted = !quoted;
    if (!quoted && c == '>') {
      close = i;
      break;
    }
  }
  if (close == std::string_view::npos) return r;
  std::string_view inner = text.substr(1, close - 1);
  r.rest = text.substr(close + 1);
  if (inner.empty()) {
    r.ok = kind == PathKind::mail;  // "<>" is the null sender; never a recipient
    return r;
  }
  // Source route "@a,@b:" (RFC 5321 §4.1.2, deprecated): validated loosely and dropped.
  if (inner.front() == '@') {
    const std::size_t colon = inner.find(':');
    if (colon == std::string_view::npos) return r;
    std::string_view route = inner.substr(0, colon);
    while (!route.empty()) {
      if (route.front() != '@') return r;
      const std::size_t comma = route.find(',');
      const std::string_view hop = route.substr(1, comma == std::string_view::npos ? route.npos : comma - 1);
      if (!valid_domain(hop)) return r;
      route = comma == std::string_view::npos ? std::string_view{} : route.substr(comma + 1);
    }
    inner = inner.substr(colon + 1);
  }
  const std::size_t at = inner.rfind('@');
  if (at == std::string_view::npos) {
    // RFC 5321 §4.5.1: "<postmaster>" without a domain must be accepted as a recipient.
    if (kind == PathKind::rcpt && iequals(inner, "postmaster")) {
      r.ok = true;
      r.address.assign(inner);
    }
    return r;
  }
  if (!valid_local_part(inner.substr(0, at)) || !valid_domain(inner.substr(at + 1))) return r;
  r.ok = true;
  r.address.assign(inner);
  return r;
}

struct VerbName {
  std::string_view name;
  Verb verb;
};
constexpr VerbName verbs[] = {
    {"EHLO", Verb::ehlo}, {"HELO", Verb::helo},         {"MAIL", Verb::mail}, {"RCPT", Verb::rcpt},
    {"DATA", Verb::data}, {"RSET", Verb::rset},         {"NOOP", Verb::noop}, {"QUIT", Verb::quit},
    {"VRFY", Verb::vrfy}, {"EXPN", Verb::expn},         {"HELP", Verb::help}, {"AUTH", Verb::auth},
    {"BDAT", Verb::bdat}, {"STARTTLS", Verb::starttls},
};

ParsedCommand fail(ParsedCommand p, CommandError error, std::string message) {
  p.error = error;
  p.message = std::move(message);
  return p;
}

std::string_view trim_spaces(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  return s;
}

// MAIL FROM:/RCPT TO: argument: prefix, optional single space, path, parameters.
ParsedCommand parse_path_command(ParsedCommand p, PathKind kind) {
  // A view into p's own argument: valid as long as p is not moved (only the returns move it).
  std::string_view arg = p.command.argument;
  const std::string_view prefix = kind == PathKind::mail ? "FROM:" : "TO:";
  const char* syntax = kind == PathKind::mail ? "Syntax: MAIL FROM:<address>" : "Syntax: RCPT TO:<address>";
  if (!istarts_with(arg, prefix)) return fail(std::move(p), CommandError::syntax, syntax);
  arg.remove_prefix(prefix.size());
  if (!arg.empty() && arg.front() == ' ') arg.remove_prefix(1);
  if (arg.empty()) return fail(std::move(p), CommandError::syntax, syntax);
  PathResult path = parse_path(arg, kind);
  const char* bad = kind == PathKind::mail ? "Bad sender address syntax" : "Bad recipient address syntax";
  if (!path.ok) return fail(std::move(p), CommandError::bad_address, bad);
  if (!path.rest.empty() && path.rest.front() != ' ')
    return fail(std::move(p), CommandError::bad_address, bad);
  p.command.address = std::move(path.address);

  std::string_view params = path.rest;
  while (true) {
    while (!params.empty() && params.front() == ' ') params.remove_prefix(1);
    if (params.empty()) break;
    const std::size_t space = params.find(' ');
    const std::string_view param = params.substr(0, space);
    params = space == std::string_view::npos ? std::string_view{} : params.substr(space);
    const std::size_t eq = param.find('=');
    std::string keyword(param.substr(0, eq));
    for (char& c : keyword) c = to_upper(c);
    const std::string_view value = eq == std::string_view::npos ? std::string_view{} : param.substr(eq + 1);
    const std::string unsupported = "Unsupported option: " + std::string(param);
    if (kind == PathKind::rcpt || eq == std::string_view::npos) {
      return fail(std::move(p), CommandError::unknown_parameter, unsupported);
    }
    if (keyword == "SIZE") {
      if (value.empty() || value.size() > 19)
        return fail(std::move(p), CommandError::unknown_parameter, "Bad message size syntax");
      std::uint64_t size = 0;
      for (char c : value) {
        if (!is_digit(c))
          return fail(std::move(p), CommandError::unknown_parameter, "Bad message size syntax");
        size = size * 10 + static_cast<std::uint64_t>(c - '0');
      }
      p.command.size = size;
    } else if (keyword == "BODY") {
      if (!iequals(value, "7BIT") && !iequals(value, "8BITMIME")) {
        return fail(std::move(p), CommandError::unknown_parameter, unsupported);
      }
    } else {
      return fail(std::move(p), CommandError::unknown_parameter, unsupported);
    }
    p.command.parameters.emplace_back(std::move(keyword), std::string(value));
  }
  return p;
}

}  // namespace

ParsedCommand parse_command(std::string_view line) {
  ParsedCommand p;
  for (char ch : line) {
    const auto c = static_cast<unsigned char>(ch);
    if ((c < 0x20 && c != '\t') || c >= 0x7f) {
      // Keep the verb for logs only when it is printable; the reply does not depend on it.
      return fail(std::move(p), CommandError::bad_bytes, "Error: bad characters in command");
    }
  }
  // Trailing white space is common (and harmless); leading white space is not a verb.
  while (!line.empty() && (line.back() == ' ' || line.back() == '\t')) line.remove_suffix(1);

  const std::size_t space = line.find(' ');
  const std::string_view verb_text = line.substr(0, space);
  p.command.verb_text.assign(verb_text);
  p.command.argument.assign(space == std::string_view::npos ? std::string_view{} : line.substr(space + 1));
  for (const auto& v : verbs) {
    if (iequals(verb_text, v.name)) {
      p.command.verb = v.verb;
      break;
    }
  }
  const std::string_view arg = p.command.argument;
  switch (p.command.verb) {
    case Verb::unknown:
      return fail(std::move(p), CommandError::unrecognized, "Error: command not recognized");
    case Verb::ehlo:
    case Verb::helo: {
      const std::string_view domain = trim_spaces(arg);
      const char* syntax = p.command.verb == Verb::ehlo ? "Syntax: EHLO hostname" : "Syntax: HELO hostname";
      if (domain.empty()) return fail(std::move(p), CommandError::syntax, syntax);
      // Only the first word is the name; anything after it is tolerated (and ignored) as Postfix does.
      p.command.domain.assign(domain.substr(0, domain.find_first_of(" \t")));
      return p;
    }
    case Verb::mail:
      return parse_path_command(std::move(p), PathKind::mail);
    case Verb::rcpt:
      return parse_path_command(std::move(p), PathKind::rcpt);
    case Verb::data:
      if (!arg.empty()) return fail(std::move(p), CommandError::syntax, "Syntax: DATA");
      return p;
    case Verb::rset:
      if (!arg.empty()) return fail(std::move(p), CommandError::syntax, "Syntax: RSET");
      return p;
    case Verb::quit:
      if (!arg.empty()) return fail(std::move(p), CommandError::syntax, "Syntax: QUIT");
      return p;
    case Verb::starttls:
      if (!arg.empty()) return fail(std::move(p), CommandError::syntax, "Syntax: STARTTLS");
      return p;
    case Verb::noop:  // RFC 5321 §4.1.1.9: NOOP may carry a string that is ignored
    case Verb::vrfy:
    case Verb::expn:
    case Verb::help:
    case Verb::auth:
    case Verb::bdat:
      return p;
  }
  return p;
}

std::string address_domain(std::string_view address) {
  const std::size_t at = address.rfind('@');
  if (at == std::string_view::npos) return {};
  std::string domain(address.substr(at + 1));
  for (char& c : domain) c = to_lower(c);
  // "example.org." is example.org (valid_domain tolerates the dot): one name for connectors, routes and
  // reports.
  if (domain.size() > 1 && domain.back() == '.') domain.pop_back();
  return domain;
}

}  // namespace mailflow::proto
