// The DNSSEC trust anchor file (dns.trust_anchor_file) split into records: each record reaches libunbound
// whole (ub_ctx_add_ta takes a C string, so a record with a NUL byte would reach it cut short), is one line
// of zone file syntax (no line end, comment or parenthesis left in it) with no trailing blank, and the
// records keep every character of the file that is not a comment, a parenthesis or a blank, in order; a $
// directive is an error, never a record.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "fuzz_check.hpp"
#include "proto/trust_anchor.hpp"

namespace {

bool blank(char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\n'; }

// The file's characters that make up records: comments, parentheses and blanks left out.
std::string significant(std::string_view text) {
  std::string out;
  bool comment = false;
  for (const char c : text) {
    if (c == '\n') comment = false;
    if (c == ';') comment = true;
    if (!comment && !blank(c) && c != '(' && c != ')') out += c;
  }
  return out;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  std::string error;
  const auto records = mailflow::proto::trust_anchor_records(text, error);
  if (!records) {
    FUZZ_CHECK(!error.empty());
    return 0;
  }
  std::string kept;
  std::size_t lines = 1;
  for (const char c : text) lines += c == '\n' ? 1 : 0;
  FUZZ_CHECK(records->size() <= lines);
  for (const std::string& record : *records) {
    FUZZ_CHECK(!record.empty());
    FUZZ_CHECK(std::string(record.c_str()) == record);  // what ub_ctx_add_ta gets is the whole record
    FUZZ_CHECK(record.find_first_of("\n;()") == std::string::npos);
    FUZZ_CHECK(!blank(record.back()));
    FUZZ_CHECK(record.front() != '$');
    for (const char c : record)
      if (!blank(c)) kept += c;
  }
  FUZZ_CHECK(kept == significant(text));
  return 0;
}
