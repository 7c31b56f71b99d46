#pragma once
// Password check against a crypt(3) hash (libxcrypt: $2b$ bcrypt, $y$ yescrypt, $6$, $5$).
#include <string>
#include <string_view>

namespace mailflow {

// True when `password` hashes to `hash`. False for an unsupported/invalid hash or a password with a NUL byte.
// Deliberately slow for bcrypt/yescrypt (that is the point of those hashes): callers cache a success.
bool password_matches(std::string_view password, const std::string& hash);

}  // namespace mailflow
