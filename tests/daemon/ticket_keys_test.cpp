#include "daemon/ticket_keys.hpp"

#include <doctest/doctest.h>
#include <openssl/evp.h>

#include <array>
#include <memory>
#include <string>

using mailflow::TicketKeys;

namespace {

struct Contexts {
  std::unique_ptr<EVP_CIPHER_CTX, decltype(&EVP_CIPHER_CTX_free)> cipher{EVP_CIPHER_CTX_new(),
                                                                         &EVP_CIPHER_CTX_free};
  std::unique_ptr<EVP_MAC, decltype(&EVP_MAC_free)> mac_algorithm{EVP_MAC_fetch(nullptr, "HMAC", nullptr),
                                                                  &EVP_MAC_free};
  std::unique_ptr<EVP_MAC_CTX, decltype(&EVP_MAC_CTX_free)> mac{EVP_MAC_CTX_new(mac_algorithm.get()),
                                                                &EVP_MAC_CTX_free};
};

struct Ticket {
  std::array<unsigned char, 16> name{};
  std::array<unsigned char, EVP_MAX_IV_LENGTH> iv{};
  std::string sealed;
};

Ticket issue(TicketKeys& keys, const std::string& state) {
  Ticket ticket;
  Contexts c;
  REQUIRE(keys.on_ticket(ticket.name.data(), ticket.iv.data(), c.cipher.get(), c.mac.get(), 1) == 1);
  ticket.sealed.resize(state.size() + 32);
  int n = 0, tail = 0;
  REQUIRE(EVP_EncryptUpdate(c.cipher.get(), reinterpret_cast<unsigned char*>(ticket.sealed.data()), &n,
                            reinterpret_cast<const unsigned char*>(state.data()),
                            static_cast<int>(state.size())) == 1);
  REQUIRE(EVP_EncryptFinal_ex(c.cipher.get(), reinterpret_cast<unsigned char*>(ticket.sealed.data()) + n,
                              &tail) == 1);
  ticket.sealed.resize(static_cast<std::size_t>(n + tail));
  return ticket;
}

// What OpenSSL does with a ticket it receives: the callback's verdict, and the state when it decrypts.
int redeem(TicketKeys& keys, Ticket ticket, std::string& state) {
  Contexts c;
  const int verdict = keys.on_ticket(ticket.name.data(), ticket.iv.data(), c.cipher.get(), c.mac.get(), 0);
  if (verdict <= 0) return verdict;
  std::string out(ticket.sealed.size() + 32, '\0');
  int n = 0, tail = 0;
  REQUIRE(EVP_DecryptUpdate(c.cipher.get(), reinterpret_cast<unsigned char*>(out.data()), &n,
                            reinterpret_cast<const unsigned char*>(ticket.sealed.data()),
                            static_cast<int>(ticket.sealed.size())) == 1);
  REQUIRE(EVP_DecryptFinal_ex(c.cipher.get(), reinterpret_cast<unsigned char*>(out.data()) + n, &tail) == 1);
  out.resize(static_cast<std::size_t>(n + tail));
  state = out;
  return verdict;
}

}  // namespace

TEST_CASE("TicketKeys: a ticket is honoured for one rotation, renewed, then refused") {
  auto now = std::chrono::steady_clock::time_point{} + std::chrono::hours(1000);
  TicketKeys keys(std::chrono::hours(12), [&] { return now; });
  const Ticket ticket = issue(keys, "session state");
  std::string state;
  CHECK(redeem(keys, ticket, state) == 1);
  CHECK(state == "session state");

  now += std::chrono::hours(12);  // rotated: the old key only decrypts, and asks for a new ticket
  state.clear();
  CHECK(redeem(keys, ticket, state) == 2);
  CHECK(state == "session state");
  const Ticket renewed = issue(keys, "renewed");
  CHECK(renewed.name != ticket.name);

  now += std::chrono::hours(12);  // a second rotation: the first key is gone
  CHECK(redeem(keys, ticket, state) == 0);
  CHECK(redeem(keys, renewed, state) == 2);
}

TEST_CASE("TicketKeys: after a long idle time no old key survives") {
  auto now = std::chrono::steady_clock::time_point{} + std::chrono::hours(1000);
  TicketKeys keys(std::chrono::hours(12), [&] { return now; });
  const Ticket ticket = issue(keys, "x");
  now += std::chrono::hours(30);  // more than two lifetimes since the key was made
  std::string state;
  CHECK(redeem(keys, ticket, state) == 0);
}

TEST_CASE("TicketKeys: unknown key names are refused") {
  TicketKeys keys;
  Ticket forged = issue(keys, "x");
  forged.name[0] ^= 0xff;
  std::string state;
  CHECK(redeem(keys, forged, state) == 0);
}

TEST_CASE("TicketKeys: after a late rotation the old key lasts two lifetimes from its birth, no longer") {
  auto now = std::chrono::steady_clock::time_point{} + std::chrono::hours(1000);
  TicketKeys keys(std::chrono::hours(12), [&] { return now; });
  const Ticket ticket = issue(keys, "x");
  now += std::chrono::hours(18);  // no handshake for 18 hours: the rotation comes now, late
  std::string state;
  CHECK(redeem(keys, ticket, state) == 2);
  now += std::chrono::hours(7);  // 25 hours after the key was made, the new key only 7 hours old
  CHECK(redeem(keys, ticket, state) == 0);
}
