#include "proto/trust_anchor.hpp"

#include <algorithm>

namespace mailflow::proto {

std::optional<std::vector<std::string>> trust_anchor_records(std::string_view text, std::string& error) {
  std::vector<std::string> records;
  std::string record;
  int depth = 0;
  bool comment = false;
  const auto finish = [&] {
    const auto last = record.find_last_not_of(" \t\r");
    if (last != std::string::npos) records.push_back(record.substr(0, last + 1));
    record.clear();
  };
  for (const char c : text) {
    if (comment && c != '\n') continue;
    comment = false;
    if (c == ';') {
      comment = true;
    } else if (c == '\0') {
      // ub_ctx_add_ta takes a C string: the record would be loaded cut short, another trust anchor.
      error = "a NUL byte in the trust anchor file (it is a text file of zone-file records)";
      return std::nullopt;
    } else if (c == '$' && record.find_first_not_of(" \t\r") == std::string::npos) {
      error =
          "a $ directive in the trust anchor file (write each record with its owner name, without $ORIGIN, "
          "$TTL or $INCLUDE)";
      return std::nullopt;
    } else if (c == '(') {
      ++depth;
      record += ' ';
    } else if (c == ')') {
      depth = std::max(0, depth - 1);
      record += ' ';
    } else if (c == '\n') {
      if (depth == 0)
        finish();
      else
        record += ' ';
    } else {
      record += c;
    }
  }
  finish();
  return records;
}

}  // namespace mailflow::proto
