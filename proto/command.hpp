#pragma once
// SMTP commands from clients (RFC 5321 §4.1). Pure parsing: no state.
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace mailflow::proto {

enum class Verb { ehlo, helo, mail, rcpt, data, rset, noop, quit, starttls, vrfy, expn, help, auth, bdat, unknown };

enum class CommandError {
  none,
  bad_bytes,          // NUL, bytes >= 0x80 or other control characters: 500 5.5.2
  unrecognized,       // unknown verb: 500 5.5.2
  syntax,             // verb known, arguments malformed (e.g. "MAIL TO:", EHLO without domain): 501 5.5.4
  bad_address,        // MAIL FROM / RCPT TO path with invalid syntax: 501 5.1.7 (MAIL) / 501 5.1.3 (RCPT)
  unknown_parameter,  // ESMTP parameter we do not support or with a bad value: 555 5.5.4
};

struct Command {
  Verb verb = Verb::unknown;
  std::string verb_text;  // as the client wrote it (for logs)
  std::string argument;   // everything after the verb and one space
  std::string domain;     // EHLO/HELO
  std::string address;    // MAIL/RCPT: the path without '<' '>' (empty for the null sender "<>")
  std::vector<std::pair<std::string, std::string>> parameters;  // MAIL params, keyword upper-cased
  std::uint64_t size = 0;  // MAIL SIZE= value, 0 if absent
};

struct ParsedCommand {
  Command command;
  CommandError error = CommandError::none;
  std::string message;  // human text for the error reply
};

// `line` excludes the CRLF. Accepted MAIL parameters: SIZE=<digits>, BODY=7BIT|8BITMIME. RCPT takes none.
// Paths: "<local@domain>" with an optional source route "@a,@b:" that is dropped; "<>" only for MAIL.
// A single space after "FROM:"/"TO:" is tolerated (common in the wild).
ParsedCommand parse_command(std::string_view line);

// The domain part of an address, lower-cased and without a trailing dot ("" for the null sender or an address
// without '@').
std::string address_domain(std::string_view address);

}  // namespace mailflow::proto
