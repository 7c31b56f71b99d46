#pragma once
// The text fields of the line-based state files (tlsrpt.state, tlsrpt-ledger.state): space-separated fields,
// each percent-encoded so that it never holds a space, comma or line break. Pure functions, no I/O.
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace mailflow::state_text {

// Everything outside printable ASCII, and '%', ',', space and tab, as %XX; the empty string as "-".
std::string encode(std::string_view text);
std::optional<std::string> decode(std::string_view text);  // nullopt: not something encode() writes
// Comma-separated encoded items; the empty list as "-".
std::string encode_list(const std::vector<std::string>& items);
std::optional<std::vector<std::string>> decode_list(std::string_view text);
std::vector<std::string_view> split_spaces(std::string_view line);
std::optional<std::uint64_t> number(std::string_view text);  // decimal digits only, at most 19
bool valid_date(std::string_view date);                      // YYYY-MM-DD, a day of the calendar

// The last line of the state files that have one (tlsrpt.state, tlsrpt-ledger.state, mta-sts.state from their
// format 2 on): a file cut exactly at a line end is a file of whole lines that lacks it.
inline constexpr std::string_view end_line = "end\n";
// The text without its last line "end"; nullopt when it does not end in that line (a cut file).
std::optional<std::string_view> before_end_line(std::string_view text);

}  // namespace mailflow::state_text
