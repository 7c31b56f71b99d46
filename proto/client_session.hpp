#pragma once
// The upstream-facing SMTP conversation up to the point where transactions can be relayed:
// banner -> EHLO (HELO fallback) -> STARTTLS per policy -> EHLO -> XCLIENT when allowed -> EHLO <client helo>.
// Sans-I/O: returns what to send next; the daemon does the I/O and the TLS handshake.
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "proto/reply.hpp"

namespace mailflow::proto {

enum class UpstreamTlsPolicy { none, opportunistic, required };  // "verify" is "required" + certificate checks

// What the server announced in its last EHLO reply (none after HELO) that the relay's transactions depend on:
// a client uses an extension, and the MAIL parameters it defines, only where the server announced it (RFC
// 5321 2.2.1; a server answers a parameter it does not know with 555, 4.1.1.11).
struct UpstreamExtensions {
  bool pipelining = false;      // RFC 2920
  bool size = false;            // RFC 1870: MAIL SIZE=
  bool eight_bit_mime = false;  // RFC 6152: MAIL BODY=
};

class ClientSession {
 public:
  struct Options {
    std::string ehlo_name = "localhost";  // our hostname
    UpstreamTlsPolicy tls = UpstreamTlsPolicy::opportunistic;
    bool xclient_allowed = false;
    // XCLIENT attributes of the real client (sent only if the upstream advertises XCLIENT and allowed):
    std::string client_address;  // "192.0.2.1" or "IPV6:2001:db8::1" form is produced by the engine
    std::uint16_t client_port = 0;
    std::string client_helo;     // also the EHLO name used after XCLIENT
    bool client_esmtp = true;    // PROTO=ESMTP or SMTP
  };

  enum class ActionKind {
    read_reply,  // wait for the next reply and call on_reply()
    send,        // send `data`, then wait for a reply and call on_reply()
    start_tls,   // run the TLS handshake now, then call on_tls_started()
    ready,       // the connection can relay transactions
    fail,        // give up: `reason` is the mailflow_upstream_errors_total label, `reply` what the upstream said
  };

  struct Action {
    ActionKind kind = ActionKind::read_reply;
    std::string data;           // send only (wire form, CRLF included)
    std::string_view reason;    // fail only: greeting_rejected, ehlo_rejected, starttls_unavailable,
                                // starttls_rejected, xclient_rejected (421), protocol
    Reply reply;                // fail only
  };

  explicit ClientSession(Options options);

  Action start();                       // always read_reply (the banner)
  Action on_reply(const Reply& reply);
  Action on_tls_started();              // sends EHLO again

  bool tls_active() const { return tls_active_; }
  bool xclient_done() const { return xclient_done_; }
  const UpstreamExtensions& extensions() const { return extensions_; }
  std::uint64_t size_limit() const { return size_limit_; }  // upstream SIZE, 0 if none
  // The reply that declined STARTTLS under UpstreamTlsPolicy::opportunistic (a 454, say), after which the
  // session went on in plaintext; nullopt when it was not declined.
  const std::optional<Reply>& starttls_declined() const { return starttls_declined_; }

 private:
  enum class Step { banner, ehlo, helo, starttls, xclient, ehlo_after_xclient, done };
  Action after_ehlo();
  Action send(std::string data, Step next);
  Action fail(std::string_view reason, const Reply& reply);
  void parse_capabilities(const Reply& reply);
  std::string xclient_command() const;

  Options options_;
  Step step_ = Step::banner;
  bool tls_active_ = false;
  bool starttls_offered_ = false;
  bool xclient_offered_ = false;
  bool xclient_done_ = false;
  bool xclient_tried_ = false;
  std::optional<Reply> starttls_declined_;  // opportunistic STARTTLS refused: go on in plaintext
  bool helo_after_xclient_ = false;  // the HELO being answered replaces the EHLO after XCLIENT
  UpstreamExtensions extensions_;
  std::uint64_t size_limit_ = 0;
};

}  // namespace mailflow::proto
