// The config loader: whatever YAML (or garbage) it is given, it never crashes or throws, and it either
// returns a config or at least one error, each with a position inside the input when it has one.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "config/config.hpp"
#include "fuzz_check.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  const auto result = mailflow::config::load_config_string(input, "fuzz.yaml");
  FUZZ_CHECK((result.config != nullptr) != !result.errors.empty());
  const auto lines = static_cast<int>(std::count(input.begin(), input.end(), '\n')) + 1;
  for (const auto& error : result.errors) {
    FUZZ_CHECK(!error.message.empty());
    FUZZ_CHECK(error.line >= 0 && error.line <= lines + 1);
  }
  return 0;
}
