#pragma once
// TLS session ticket keys (RFC 5077 / RFC 8446 4.6.1) that rotate. OpenSSL's default ticket key is made with
// its SSL_CTX and lives until the next reload: one key, for as long as the daemon runs, protects every
// resumable session. mailflowd installs its own: a new key every `lifetime`, the previous one kept to decrypt
// (the client then gets a fresh ticket), so no ticket is usable for longer than two lifetimes and a key that
// leaks exposes at most that window. Keys live in memory only; a restart starts with new ones.
#include <array>
#include <chrono>
#include <functional>
#include <mutex>

typedef struct ssl_st SSL;
typedef struct ssl_ctx_st SSL_CTX;
typedef struct evp_cipher_ctx_st EVP_CIPHER_CTX;
typedef struct evp_mac_ctx_st EVP_MAC_CTX;

namespace mailflow {

class TicketKeys {
 public:
  using Clock = std::function<std::chrono::steady_clock::time_point()>;
  static constexpr auto default_lifetime = std::chrono::hours(12);

  explicit TicketKeys(std::chrono::seconds lifetime = default_lifetime, Clock clock = {});

  // The keys every listener of the process uses (thread-safe).
  static TicketKeys& process();
  // Makes `ctx` encrypt and decrypt its tickets with process().
  static void install(SSL_CTX* ctx);

  // OpenSSL's ticket key callback (SSL_CTX_set_tlsext_ticket_key_evp_cb): `encrypt` 1 fills name, iv and the
  // contexts with the current key and returns 1; 0 looks the name up: 1 for the current key, 2 for the
  // previous one (decrypt, then issue a new ticket), 0 for an unknown or expired key (full handshake).
  int on_ticket(unsigned char name[16], unsigned char* iv, EVP_CIPHER_CTX* cipher, EVP_MAC_CTX* mac,
                int encrypt);

 private:
  struct Key {
    std::array<unsigned char, 16> name{};
    std::array<unsigned char, 32> aes{};
    std::array<unsigned char, 32> hmac{};
    std::chrono::steady_clock::time_point born;
  };
  static Key fresh(std::chrono::steady_clock::time_point now);
  void rotate_if_due(std::chrono::steady_clock::time_point now);  // with mutex_ held

  std::chrono::seconds lifetime_;
  Clock clock_;
  std::mutex mutex_;
  Key current_;
  Key previous_;
  bool has_previous_ = false;
};

}  // namespace mailflow
