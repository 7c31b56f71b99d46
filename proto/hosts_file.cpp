#include "proto/hosts_file.hpp"

#include <arpa/inet.h>  // inet_pton/inet_ntop: pure conversions, no I/O

#include <algorithm>
#include <optional>

#include "proto/ascii.hpp"

namespace mailflow::proto {

namespace {

// `text` as an IP address in its canonical spelling, and whether it is IPv6; nullopt when it is none (IPv6
// first, as boost::asio::ip::make_address tries them).
std::optional<std::string> canonical_address(const std::string& text, bool& v6) {
  unsigned char bin[16];
  char buf[INET6_ADDRSTRLEN];
  for (const int family : {AF_INET6, AF_INET}) {
    if (inet_pton(family, text.c_str(), bin) != 1) continue;
    if (inet_ntop(family, bin, buf, sizeof buf) == nullptr) return std::nullopt;
    v6 = family == AF_INET6;
    return std::string(buf);
  }
  return std::nullopt;
}

}  // namespace

std::vector<std::string> hosts_records(std::string_view text) {
  std::vector<std::string> out;
  const auto host_name = [](std::string_view name) {
    if (name.empty() || name.size() > 253 || !std::all_of(name.begin(), name.end(), [](char c) {
          return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' ||
                 c == '_' || c == '.';
        }))
      return false;
    // A DNS name: labels of 1 to 63 bytes, one final dot allowed. libunbound refuses local data for any other
    // ("a..b", ".a", a label of 64 bytes), and one such name made it refuse the whole file; no upstream's
    // host name is such a name, and glibc's files service still answers every other name of the file.
    if (name.ends_with('.')) name.remove_suffix(1);
    for (std::size_t at = 0;;) {
      const std::size_t dot = std::min(name.find('.', at), name.size());
      if (dot == at || dot - at > 63) return false;
      if (dot == name.size()) return true;
      at = dot + 1;
    }
  };
  while (!text.empty()) {
    const std::size_t end = text.find('\n');
    std::string_view line = text.substr(0, end);
    text = end == std::string_view::npos ? std::string_view() : text.substr(end + 1);
    // glibc reads each line as a C string (__nss_readline, res_init): nothing behind a NUL byte is seen.
    line = line.substr(0, line.find('\0'));
    line = line.substr(0, line.find('#'));
    std::vector<std::string_view> fields;
    for (std::size_t at = 0; at < line.size();) {
      at = line.find_first_not_of(" \t\r\f\v", at);
      if (at == std::string_view::npos) break;
      const std::size_t stop = std::min(line.find_first_of(" \t\r\f\v", at), line.size());
      fields.push_back(line.substr(at, stop - at));
      at = stop;
    }
    if (fields.size() < 2 || fields[0].find('%') != std::string_view::npos)
      continue;  // fe80::1%lo0: no use here
    bool v6 = false;
    const auto address = canonical_address(std::string(fields[0]), v6);
    if (!address) continue;
    for (std::size_t i = 1; i < fields.size(); ++i) {
      if (!host_name(fields[i])) continue;
      out.push_back(std::string(fields[i]) + (v6 ? " AAAA " : " A ") + *address);
    }
  }
  return out;
}

void read_search_list(std::string_view text, std::vector<std::string>& search, int& ndots) {
  search.clear();
  ndots = 1;
  while (!text.empty()) {
    const std::size_t end = text.find('\n');
    std::string_view line = text.substr(0, end);
    text = end == std::string_view::npos ? std::string_view() : text.substr(end + 1);
    line = line.substr(0, line.find('\0'));  // as in hosts_records
    // glibc's res_init takes a keyword only at the start of its line: an indented one is no setting. A
    // comment is a line that starts with '#' or ';'; behind a setting neither starts one (a "search" line's
    // words are all domains, an "options" line's all options), as res_init reads them.
    if (line.starts_with(' ') || line.starts_with('\t') || line.starts_with('#') || line.starts_with(';'))
      continue;
    // Words are separated by blanks and tabs only, as res_init splits them: the CR of a CRLF line end (a file
    // written on Windows) stays in the last word ("search corp.example\r", "nameserver 10.0.0.1\r").
    std::vector<std::string_view> fields;
    for (std::size_t at = 0; at < line.size();) {
      at = line.find_first_not_of(" \t", at);
      if (at == std::string_view::npos) break;
      const std::size_t stop = std::min(line.find_first_of(" \t", at), line.size());
      fields.push_back(line.substr(at, stop - at));
      at = stop;
    }
    if (fields.empty()) continue;
    if (fields[0] == "search" || fields[0] == "domain") {
      if (fields.size() < 2) continue;  // no name: glibc keeps the list it had
      search.clear();
      // "domain" names one domain: glibc's res_init cuts its line at the first blank.
      const std::size_t last =
          fields[0] == "domain" ? std::min<std::size_t>(fields.size(), 2) : fields.size();
      for (std::size_t i = 1; i < last && search.size() < max_search_domains; ++i) {
        std::string_view name = fields[i];
        if (name.ends_with('.')) name.remove_suffix(1);
        // A name with an empty label ("a..b", ".a", "a.." once its final dot is gone): no name under it can
        // be asked (glibc's dn_comp refuses it), and libunbound would take "host.a." as a name under the
        // root. A name with a control byte (the CR of a CRLF line end): glibc asks "host.corp.example\r", a
        // name no zone has, and then the next; here it is left out, as getaddrinfo finds nothing under it
        // either (the final dot is taken off before: "corp.example.\r" is no name under corp.example).
        const bool empty_label = name.starts_with('.') || name.ends_with('.') || name.find("..") != name.npos;
        const bool control = std::any_of(name.begin(), name.end(), [](char c) {
          return static_cast<unsigned char>(c) < 0x20 || c == 0x7f;
        });
        if (!name.empty() && name.size() <= 253 && !empty_label && !control) search.emplace_back(name);
      }
    } else if (fields[0] == "options") {
      for (std::size_t i = 1; i < fields.size(); ++i) {
        if (!fields[i].starts_with("ndots:")) continue;
        // As glibc's res_setoptions reads it: atoi() of what follows (its leading digits: "5x" is 5, "" and
        // "x" are 0), at most RES_MAXNDOTS (15). A negative value, which glibc stores into an unsigned field,
        // is left out.
        std::string_view text = fields[i].substr(6);
        if (text.starts_with('-')) continue;
        if (text.starts_with('+')) text.remove_prefix(1);
        int value = 0;
        for (std::size_t d = 0; d < text.size() && text[d] >= '0' && text[d] <= '9' && value <= 15; ++d)
          value = value * 10 + (text[d] - '0');
        ndots = std::min(value, 15);
      }
    }
  }
}

std::vector<std::string> read_name_servers(std::string_view text) {
  std::vector<std::string> out;
  constexpr std::string_view keyword = "nameserver";
  while (!text.empty() && out.size() < max_name_servers) {
    const std::size_t end = text.find('\n');
    std::string_view line = text.substr(0, end);
    text = end == std::string_view::npos ? std::string_view() : text.substr(end + 1);
    line = line.substr(0, line.find('\0'));  // as in hosts_records
    // res_init's MATCH: the keyword at the very start of the line, then a blank ("nameservers", an indented
    // line and a comment are no name server; libunbound's ub_ctx_resolvconf took the first two, and refused
    // the whole file for a word it could not read).
    if (!line.starts_with(keyword) || line.size() == keyword.size() ||
        (line[keyword.size()] != ' ' && line[keyword.size()] != '\t'))
      continue;
    line.remove_prefix(keyword.size());
    line.remove_prefix(std::min(line.find_first_not_of(" \t"), line.size()));
    // The word ends at a blank or tab only, as res_init cuts it: "10.0.0.1\r" (a CRLF line end) is no address
    // for glibc's __inet_aton_exact nor inet_pton, and the line is skipped (getent then asks 127.0.0.1, as
    // with no name server at all). inet_aton itself takes an address followed by any white space, so the
    // word is checked for it first.
    const std::string word(line.substr(0, std::min(line.find_first_of(" \t"), line.size())));
    if (word.empty()) continue;
    char buf[INET6_ADDRSTRLEN];
    in_addr v4{};
    if (word.find_first_of("\r\f\v") == std::string::npos && inet_aton(word.c_str(), &v4) != 0) {
      if (inet_ntop(AF_INET, &v4, buf, sizeof buf) != nullptr) out.emplace_back(buf);
      continue;
    }
    const std::size_t zone = word.find('%');
    in6_addr v6{};
    if (inet_pton(AF_INET6, word.substr(0, zone).c_str(), &v6) != 1) continue;
    if (inet_ntop(AF_INET6, &v6, buf, sizeof buf) == nullptr) continue;
    // The zone as written (an interface name or index; libunbound resolves it). One with other bytes is left
    // out, as glibc ignores a zone it cannot read: libunbound would take "@53" in it for a port.
    std::string_view scope =
        zone == std::string::npos ? std::string_view() : std::string_view(word).substr(zone + 1);
    const bool usable = !scope.empty() && std::all_of(scope.begin(), scope.end(), [](char c) {
      return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' ||
             c == '_' || c == '.';
    });
    out.push_back(std::string(buf) + (usable ? "%" + std::string(scope) : ""));
  }
  return out;
}

std::vector<std::string> search_names(const std::string& host, const std::vector<std::string>& search,
                                      int ndots, const std::vector<std::string>& hosts_records) {
  if (host.ends_with('.') || search.empty()) return {host};
  const std::string lower = ascii_lower(host) + " ";
  for (const auto& record : hosts_records)
    if (ascii_lower(std::string_view(record).substr(0, lower.size())) == lower) return {host};
  const auto dots = static_cast<int>(std::count(host.begin(), host.end(), '.'));
  std::vector<std::string> names;
  if (dots >= ndots) names.push_back(host);
  for (const auto& domain : search) names.push_back(host + "." + domain);
  if (dots < ndots) names.push_back(host);
  return names;
}

}  // namespace mailflow::proto
