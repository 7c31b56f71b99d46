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

std::string_view trim_wsp(std::string_view text) {
  while (!text.empty() && is_wsp(text.front())) text.remove_prefix(1);
  while (!text.empty() && is_wsp(text.back())) text.remove_suffix(1);
  return text;
}

}  // namespace mailflow::proto
