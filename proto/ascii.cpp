#include "proto/ascii.hpp"

namespace mailflow::proto {

std::string ascii_lower(std::string_view text) {
  std::string out(text);
  for (auto& c : out) {
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
  }
  return out;
}

std::string dns_name_key(std::string_view name) {
  if (name.ends_with('.')) name.remove_suffix(1);
  return ascii_lower(name);
}

}  // namespace mailflow::proto
