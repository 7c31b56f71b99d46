#include "daemon/ticket_keys.hpp"

#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <openssl/ssl.h>

#include <algorithm>
#include <cstring>
#include <stdexcept>

namespace mailflow {

TicketKeys::TicketKeys(std::chrono::seconds lifetime, Clock clock)
    : lifetime_(lifetime),
      clock_(clock ? std::move(clock) : Clock([] { return std::chrono::steady_clock::now(); })) {
  current_ = fresh(clock_());
}

TicketKeys& TicketKeys::process() {
  static TicketKeys keys;
  return keys;
}

namespace {
int ticket_callback(SSL*, unsigned char name[16], unsigned char iv[EVP_MAX_IV_LENGTH], EVP_CIPHER_CTX* cipher,
                    EVP_MAC_CTX* mac, int encrypt) {
  return TicketKeys::process().on_ticket(name, iv, cipher, mac, encrypt);
}
}  // namespace

void TicketKeys::install(SSL_CTX* ctx) { SSL_CTX_set_tlsext_ticket_key_evp_cb(ctx, &ticket_callback); }

TicketKeys::Key TicketKeys::fresh(std::chrono::steady_clock::time_point now) {
  Key key;
  if (RAND_bytes(key.name.data(), key.name.size()) != 1 || RAND_bytes(key.aes.data(), key.aes.size()) != 1 ||
      RAND_bytes(key.hmac.data(), key.hmac.size()) != 1)
    throw std::runtime_error("RAND_bytes failed for a session ticket key");
  key.born = now;
  return key;
}

void TicketKeys::rotate_if_due(std::chrono::steady_clock::time_point now) {
  // A key encrypts for one lifetime from its birth and decrypts until two lifetimes from it: checked at every
  // use, since a rotation comes only with a handshake and may come late (the new key is then younger than
  // it).
  if (has_previous_ && now - previous_.born >= 2 * lifetime_) has_previous_ = false;
  if (now - current_.born < lifetime_) return;
  previous_ = current_;
  has_previous_ = now - current_.born < 2 * lifetime_;
  current_ = fresh(now);
}

int TicketKeys::on_ticket(unsigned char name[16], unsigned char* iv, EVP_CIPHER_CTX* cipher, EVP_MAC_CTX* mac,
                          int encrypt) {
  std::lock_guard lock(mutex_);
  rotate_if_due(clock_());
  const Key* key = nullptr;
  int found = 1;
  if (encrypt == 1) {
    key = &current_;
    std::memcpy(name, key->name.data(), key->name.size());
    if (RAND_bytes(iv, EVP_CIPHER_get_iv_length(EVP_aes_256_cbc())) != 1) return -1;
  } else if (std::equal(current_.name.begin(), current_.name.end(), name)) {
    key = &current_;
  } else if (has_previous_ && std::equal(previous_.name.begin(), previous_.name.end(), name)) {
    key = &previous_;
    found = 2;  // still valid, but the client gets a ticket under the current key
  } else {
    return 0;
  }
  OSSL_PARAM params[] = {
      OSSL_PARAM_construct_octet_string(OSSL_MAC_PARAM_KEY, const_cast<unsigned char*>(key->hmac.data()),
                                        key->hmac.size()),
      OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, const_cast<char*>("SHA256"), 0),
      OSSL_PARAM_construct_end()};
  if (EVP_MAC_CTX_set_params(mac, params) != 1) return -1;
  const int ok = encrypt == 1 ? EVP_EncryptInit_ex(cipher, EVP_aes_256_cbc(), nullptr, key->aes.data(), iv)
                              : EVP_DecryptInit_ex(cipher, EVP_aes_256_cbc(), nullptr, key->aes.data(), iv);
  return ok == 1 ? found : -1;
}

}  // namespace mailflow
