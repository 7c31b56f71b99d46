#include "daemon/crypt_check.hpp"

#include <crypt.h>
#include <openssl/crypto.h>

#include <cstring>
#include <memory>

namespace mailflow {

bool password_matches(std::string_view password, const std::string& hash) {
  if (hash.empty() || password.find('\0') != std::string_view::npos) return false;
  const std::string phrase(password);
  auto data = std::make_unique<crypt_data>();  // ~32 KiB: not on a coroutine stack; zeroed as crypt_rn wants
  const char* result = crypt_rn(phrase.c_str(), hash.c_str(), data.get(), sizeof(crypt_data));
  // crypt_rn returns NULL on failure (never the "*0" failure token that crypt() may return).
  if (result == nullptr || result[0] == '*') return false;
  const std::size_t length = std::strlen(result);
  return length == hash.size() && CRYPTO_memcmp(result, hash.data(), length) == 0;
}

}  // namespace mailflow
