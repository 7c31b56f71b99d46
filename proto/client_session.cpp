#include "proto/client_session.hpp"

namespace mailflow::proto {

namespace {

char to_upper(char c) { return (c >= 'a' && c <= 'z') ? static_cast<char>(c - 'a' + 'A') : c; }

// RFC 3461 xtext: printable US-ASCII except '+' and '=' as is, everything else as "+XX".
std::string xtext(std::string_view value) {
  static constexpr char hex[] = "0123456789ABCDEF";
  std::string out;
  out.reserve(value.size());
  for (char ch : value) {
    const auto c = static_cast<unsigned char>(ch);
    if (c >= '!' && c <= '~' && c != '+' && c != '=') {
      out.push_back(ch);
    } else {
      out.push_back('+');
      out.push_back(hex[c >> 4]);
      out.push_back(hex[c & 0x0F]);
    }
  }
  return out;
}

// Names go into command lines verbatim: never let a CR, LF or other control byte through (the client's HELO
// name comes from the network, even if ServerSession already only accepts printable ones).
std::string command_safe(std::string_view name) {
  std::string out(name);
  for (char& c : out) {
    const auto b = static_cast<unsigned char>(c);
    if (b <= 0x20 || b >= 0x7f) c = '_';
  }
  return out;
}

}  // namespace

ClientSession::ClientSession(Options options) : options_(std::move(options)) {
  options_.ehlo_name = command_safe(options_.ehlo_name);
  if (options_.ehlo_name.empty()) options_.ehlo_name = "localhost";
  options_.client_helo = command_safe(options_.client_helo);
}

ClientSession::Action ClientSession::start() {
  step_ = Step::banner;
  return Action{};
}

ClientSession::Action ClientSession::send(std::string data, Step next) {
  step_ = next;
  Action a;
  a.kind = ActionKind::send;
  a.data = std::move(data);
  return a;
}

ClientSession::Action ClientSession::fail(std::string_view reason, const Reply& reply) {
  step_ = Step::done;
  Action a;
  a.kind = ActionKind::fail;
  a.reason = reason;
  a.reply = reply;
  return a;
}

void ClientSession::parse_capabilities(const Reply& reply) {
  starttls_offered_ = false;
  xclient_offered_ = false;
  extensions_ = {};
  size_limit_ = 0;
  // The first line is the server's name and greeting; each further line is "KEYWORD [params]".
  for (std::size_t i = 1; i < reply.lines.size(); ++i) {
    const std::string& line = reply.lines[i];
    const std::size_t space = line.find(' ');
    std::string keyword = line.substr(0, space);
    for (char& c : keyword) c = to_upper(c);
    if (keyword == "STARTTLS") {
      starttls_offered_ = true;
    } else if (keyword == "XCLIENT") {
      xclient_offered_ = true;
    } else if (keyword == "PIPELINING") {
      extensions_.pipelining = true;
    } else if (keyword == "8BITMIME") {
      extensions_.eight_bit_mime = true;
    } else if (keyword == "SIZE") {
      extensions_.size = true;
      std::uint64_t size = 0;
      if (space != std::string::npos) {
        for (std::size_t j = space + 1; j < line.size() && line[j] >= '0' && line[j] <= '9'; ++j) {
          if (size > (UINT64_MAX - 9) / 10) break;  // absurd values: keep what fits
          size = size * 10 + static_cast<std::uint64_t>(line[j] - '0');
        }
      }
      size_limit_ = size;
    }
  }
}

std::string ClientSession::xclient_command() const {
  std::string cmd = "XCLIENT";
  if (!options_.client_address.empty()) {
    std::string addr = options_.client_address;
    const bool tagged = addr.size() >= 5 && to_upper(addr[0]) == 'I' && to_upper(addr[1]) == 'P' &&
                        to_upper(addr[2]) == 'V' && addr[3] == '6' && addr[4] == ':';
    if (addr.find(':') != std::string::npos && !tagged) addr = "IPV6:" + addr;
    cmd += " ADDR=" + xtext(addr);
    cmd += " PORT=" + std::to_string(options_.client_port);
  }
  if (!options_.client_helo.empty()) cmd += " HELO=" + xtext(options_.client_helo);
  cmd += options_.client_esmtp ? " PROTO=ESMTP" : " PROTO=SMTP";
  cmd += "\r\n";
  return cmd;
}

ClientSession::Action ClientSession::after_ehlo() {
  if (!tls_active_ && !starttls_declined_ && options_.tls != UpstreamTlsPolicy::none) {
    if (starttls_offered_) return send("STARTTLS\r\n", Step::starttls);
    if (options_.tls == UpstreamTlsPolicy::required) {
      Reply none;
      none.code = 0;
      none.lines = {"STARTTLS not offered"};
      return fail("starttls_unavailable", none);
    }
  }
  if (options_.xclient_allowed && xclient_offered_ && !xclient_tried_) {
    xclient_tried_ = true;
    return send(xclient_command(), Step::xclient);
  }
  step_ = Step::done;
  Action a;
  a.kind = ActionKind::ready;
  return a;
}

ClientSession::Action ClientSession::on_reply(const Reply& reply) {
  switch (step_) {
    case Step::banner:
      if (reply.code != 220) return fail("greeting_rejected", reply);
      return send("EHLO " + options_.ehlo_name + "\r\n", Step::ehlo);
    case Step::ehlo:
      if (reply.positive()) {
        parse_capabilities(reply);
        return after_ehlo();
      }
      // An old server that does not know EHLO says 500/502: fall back to HELO (no extensions, so no
      // STARTTLS).
      if (reply.permanent()) {
        helo_after_xclient_ = false;
        return send("HELO " + options_.ehlo_name + "\r\n", Step::helo);
      }
      return fail("ehlo_rejected", reply);
    case Step::helo:
      if (!reply.positive()) return fail("ehlo_rejected", reply);
      parse_capabilities(Reply{});
      if (helo_after_xclient_) {
        step_ = Step::done;
        Action a;
        a.kind = ActionKind::ready;
        return a;
      }
      return after_ehlo();
    case Step::starttls:
      if (reply.code == 220) {
        step_ = Step::starttls;
        Action a;
        a.kind = ActionKind::start_tls;
        return a;
      }
      // A 421 is the server closing the connection (RFC 5321 3.8), not a STARTTLS it declined: going on in
      // plaintext would send the next commands to a closed channel, so the host's session ends here.
      if (options_.tls == UpstreamTlsPolicy::required || reply.code == 421)
        return fail("starttls_rejected", reply);
      starttls_declined_ = reply;
      return after_ehlo();
    case Step::xclient:
      if (reply.positive()) {
        // Postfix answers XCLIENT with a fresh 220 greeting; the session restarts and needs a new EHLO.
        xclient_done_ = true;
        const std::string& name = options_.client_helo.empty() ? options_.ehlo_name : options_.client_helo;
        return send("EHLO " + name + "\r\n", Step::ehlo_after_xclient);
      }
      // 421: the upstream closes the channel (RFC 5321 3.8), which going on without XCLIENT would find only
      // at MAIL, as a lost connection.
      if (reply.code == 421) return fail("xclient_rejected", reply);
      // Refused (not authorized for XCLIENT, ...): the session is still the one after our EHLO.
      step_ = Step::done;
      {
        Action a;
        a.kind = ActionKind::ready;
        return a;
      }
    case Step::ehlo_after_xclient:
      if (reply.positive()) {
        parse_capabilities(reply);
        step_ = Step::done;
        Action a;
        a.kind = ActionKind::ready;
        return a;
      }
      if (reply.permanent()) {
        helo_after_xclient_ = true;
        const std::string& name = options_.client_helo.empty() ? options_.ehlo_name : options_.client_helo;
        return send("HELO " + name + "\r\n", Step::helo);
      }
      return fail("ehlo_rejected", reply);
    case Step::done:
      break;
  }
  return fail("protocol", reply);
}

ClientSession::Action ClientSession::on_tls_started() {
  tls_active_ = true;
  // RFC 3207 §4.2: forget everything learned before the handshake.
  parse_capabilities(Reply{});
  return send("EHLO " + options_.ehlo_name + "\r\n", Step::ehlo);
}

}  // namespace mailflow::proto
