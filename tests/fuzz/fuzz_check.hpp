#pragma once
// A failed property in a fuzz target must crash (libFuzzer keeps the input), even in builds without asserts.
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

#define FUZZ_CHECK(cond)                                                               \
  do {                                                                                 \
    if (!(cond)) {                                                                     \
      std::fprintf(stderr, "%s:%d: property failed: %s\n", __FILE__, __LINE__, #cond); \
      std::abort();                                                                    \
    }                                                                                  \
  } while (0)

// The input as DNS TXT records: its pieces between NUL bytes (a TXT lookup's answer, one string per record).
inline std::vector<std::string> nul_separated_records(std::string_view input) {
  std::vector<std::string> records;
  for (std::size_t start = 0;;) {
    const auto nul = input.find('\0', start);
    records.emplace_back(
        input.substr(start, nul == std::string_view::npos ? std::string_view::npos : nul - start));
    if (nul == std::string_view::npos) return records;
    start = nul + 1;
  }
}
