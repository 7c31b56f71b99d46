// The _smtp._tls TXT records (RFC 8460 3) that a recipient domain publishes (NUL-separated in the input): a
// report record names 1..max_rua distinct usable destinations (mailto: with an address, https://), each a
// printable URI without ',' ';' or space, and the canonical record of exactly those destinations means the
// same, as does that record with each destination named twice (one more past the bound is one left out); the
// order of the records and records of other kinds do not change the result; anything else is refused with a
// reason.
#include <algorithm>
#include <cctype>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "fuzz_check.hpp"
#include "proto/tlsrpt.hpp"

namespace tlsrpt = mailflow::proto::tlsrpt;

namespace {

bool starts_with_nocase(std::string_view text, std::string_view prefix) {
  return text.size() >= prefix.size() &&
         std::equal(prefix.begin(), prefix.end(), text.begin(),
                    [](char p, char c) { return p == std::tolower(static_cast<unsigned char>(c)); });
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  const std::vector<std::string> records = nul_separated_records(input);
  const auto lookup = tlsrpt::parse_txt_records(records);
  switch (lookup.status) {
    case tlsrpt::TxtLookup::Status::none:
      FUZZ_CHECK(lookup.rua.empty());
      break;
    case tlsrpt::TxtLookup::Status::invalid:
      FUZZ_CHECK(!lookup.error.empty());
      break;
    case tlsrpt::TxtLookup::Status::report: {
      FUZZ_CHECK(lookup.error.empty());
      FUZZ_CHECK(!lookup.rua.empty() && lookup.rua.size() <= tlsrpt::max_rua);
      FUZZ_CHECK(lookup.rua_left_out == 0 || lookup.rua.size() == tlsrpt::max_rua);
      std::string canonical = "v=TLSRPTv1; rua=";
      for (std::size_t i = 0; i < lookup.rua.size(); ++i) {
        const auto& uri = lookup.rua[i];
        FUZZ_CHECK(std::count_if(lookup.rua.begin(), lookup.rua.end(), [&](const std::string& other) {
                     return tlsrpt::rua_destination(other) == tlsrpt::rua_destination(uri);
                   }) == 1);
        FUZZ_CHECK((starts_with_nocase(uri, "mailto:") && uri.find('@') != std::string::npos) ||
                   (starts_with_nocase(uri, "https://") && uri.size() > 8));
        FUZZ_CHECK(std::all_of(uri.begin(), uri.end(), [](char c) {
          const auto u = static_cast<unsigned char>(c);
          return u > 0x20 && u < 0x7f && c != ',' && c != ';';
        }));
        canonical += (i ? "," : "") + uri;
      }
      const auto again = tlsrpt::parse_txt_records({canonical});
      FUZZ_CHECK(again.status == tlsrpt::TxtLookup::Status::report);
      FUZZ_CHECK(again.rua == lookup.rua);
      FUZZ_CHECK(again.rua_left_out == 0);
      // A URI named twice is one destination, within the bound or past it.
      std::string doubled = "v=TLSRPTv1; rua=";
      for (const auto& uri : lookup.rua) doubled += uri + "," + uri + ",";
      constexpr std::string_view past = "mailto:past@bound.example";
      const bool full = lookup.rua.size() == tlsrpt::max_rua &&
                        std::none_of(lookup.rua.begin(), lookup.rua.end(), [&](const std::string& uri) {
                          return tlsrpt::rua_destination(uri) == tlsrpt::rua_destination(past);
                        });
      if (full) doubled += std::string(past) + "," + std::string(past) + ",";
      doubled += lookup.rua.front();
      const auto twice = tlsrpt::parse_txt_records({doubled});
      FUZZ_CHECK(twice.rua == lookup.rua);
      FUZZ_CHECK(twice.rua_left_out == (full ? 1u : 0u));
      break;
    }
  }
  auto reordered = records;
  std::reverse(reordered.begin(), reordered.end());
  reordered.push_back("v=spf1 -all");
  const auto again = tlsrpt::parse_txt_records(reordered);
  FUZZ_CHECK(again.status == lookup.status);
  FUZZ_CHECK(again.rua == lookup.rua);
  FUZZ_CHECK(again.rua_left_out == lookup.rua_left_out);
  return 0;
}
