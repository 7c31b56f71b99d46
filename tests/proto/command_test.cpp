#include "proto/command.hpp"

#include <doctest/doctest.h>

#include <string>

using namespace mailflow::proto;

namespace {
ParsedCommand ok(std::string_view line) {
  ParsedCommand p = parse_command(line);
  INFO("line: " << std::string(line) << " message: " << p.message);
  CHECK(p.error == CommandError::none);
  return p;
}
void fails(std::string_view line, CommandError expected) {
  ParsedCommand p = parse_command(line);
  INFO("line: " << std::string(line));
  CHECK(p.error == expected);
  CHECK_FALSE(p.message.empty());
}
}  // namespace

TEST_CASE("parse_command: verbs, case-insensitive") {
  CHECK(ok("EHLO client.example").command.verb == Verb::ehlo);
  CHECK(ok("ehlo client.example").command.verb == Verb::ehlo);
  CHECK(ok("HeLo client").command.verb == Verb::helo);
  CHECK(ok("DATA").command.verb == Verb::data);
  CHECK(ok("rset").command.verb == Verb::rset);
  CHECK(ok("NOOP").command.verb == Verb::noop);
  CHECK(ok("NOOP anything goes").command.verb == Verb::noop);
  CHECK(ok("QUIT").command.verb == Verb::quit);
  CHECK(ok("STARTTLS").command.verb == Verb::starttls);
  CHECK(ok("VRFY root").command.verb == Verb::vrfy);
  CHECK(ok("EXPN list").command.verb == Verb::expn);
  CHECK(ok("HELP").command.verb == Verb::help);
  CHECK(ok("AUTH PLAIN xyz").command.verb == Verb::auth);
  CHECK(ok("BDAT 10 LAST").command.verb == Verb::bdat);
  CHECK(ok("DATA  ").command.verb == Verb::data);  // trailing blanks tolerated
  auto p = ok("MaIl FROM:<a@b.example>");
  CHECK(p.command.verb_text == "MaIl");
  CHECK(p.command.argument == "FROM:<a@b.example>");
}

TEST_CASE("parse_command: unknown verbs and bad bytes") {
  fails("", CommandError::unrecognized);
  fails("FOO bar", CommandError::unrecognized);
  fails(" MAIL FROM:<a@b.c>", CommandError::unrecognized);
  fails("MAILFROM:<a@b.c>", CommandError::unrecognized);
  fails("GET / HTTP/1.1", CommandError::unrecognized);
  fails(std::string_view("NOOP\0x", 6), CommandError::bad_bytes);
  fails("NOOP \x80", CommandError::bad_bytes);
  fails("MAIL FROM:<\xc3\xa9@b.c>", CommandError::bad_bytes);
  fails("NOOP \x1b[2J", CommandError::bad_bytes);
  fails("NOOP \x7f", CommandError::bad_bytes);
  fails("NOOP \r", CommandError::bad_bytes);
}

TEST_CASE("parse_command: EHLO/HELO need a domain") {
  CHECK(ok("EHLO mail.example.org").command.domain == "mail.example.org");
  CHECK(ok("EHLO [192.0.2.1]").command.domain == "[192.0.2.1]");
  CHECK(ok("HELO  spaced ").command.domain == "spaced");
  CHECK(ok("EHLO name extra words").command.domain == "name");
  fails("EHLO", CommandError::syntax);
  fails("EHLO ", CommandError::syntax);
  fails("HELO", CommandError::syntax);
}

TEST_CASE("parse_command: MAIL FROM paths and parameters") {
  auto p = ok("MAIL FROM:<alice@example.org>");
  CHECK(p.command.verb == Verb::mail);
  CHECK(p.command.address == "alice@example.org");
  CHECK(p.command.size == 0);
  CHECK(p.command.parameters.empty());

  CHECK(ok("MAIL FROM:<>").command.address == "");
  CHECK(ok("mail from:<a@b.example>").command.address == "a@b.example");
  CHECK(ok("MAIL FROM: <a@b.example>").command.address == "a@b.example");  // one space tolerated
  CHECK(ok("MAIL FROM:<@relay1.example,@relay2.example:a@b.example>").command.address == "a@b.example");
  CHECK(ok("MAIL FROM:<\"john smith\"@b.example>").command.address == "\"john smith\"@b.example");
  CHECK(ok("MAIL FROM:<\"a>b\"@b.example>").command.address == "\"a>b\"@b.example");
  CHECK(ok("MAIL FROM:<user+tag@[192.0.2.1]>").command.address == "user+tag@[192.0.2.1]");
  CHECK(ok("MAIL FROM:<a@b.example.>").command.address == "a@b.example.");

  p = ok("MAIL FROM:<a@b.example> SIZE=12345 BODY=8BITMIME");
  CHECK(p.command.size == 12345);
  REQUIRE(p.command.parameters.size() == 2);
  CHECK(p.command.parameters[0].first == "SIZE");
  CHECK(p.command.parameters[0].second == "12345");
  CHECK(p.command.parameters[1].first == "BODY");
  p = ok("MAIL FROM:<a@b.example> size=7  body=7bit");
  CHECK(p.command.size == 7);
  CHECK(p.command.parameters[0].first == "SIZE");
  CHECK(p.command.parameters[1].first == "BODY");
}

TEST_CASE("parse_command: MAIL/RCPT errors") {
  fails("MAIL", CommandError::syntax);
  fails("MAIL TO:<a@b.example>", CommandError::syntax);
  fails("MAIL FROM:", CommandError::syntax);
  fails("MAIL FROM:  <a@b.example>", CommandError::bad_address);
  fails("MAIL FROM:a@b.example", CommandError::bad_address);
  fails("MAIL FROM:<a@b.example", CommandError::bad_address);
  fails("MAIL FROM:<a b@b.example>", CommandError::bad_address);
  fails("MAIL FROM:<a@>", CommandError::bad_address);
  fails("MAIL FROM:<@b.example>", CommandError::bad_address);
  fails("MAIL FROM:<a@b..example>", CommandError::bad_address);
  fails("MAIL FROM:<a@b_example!>", CommandError::bad_address);
  fails("MAIL FROM:<alice>", CommandError::bad_address);
  fails("MAIL FROM:<a@b.example>junk", CommandError::bad_address);
  fails("MAIL FROM:<\"unterminated@b.example>", CommandError::bad_address);
  fails("MAIL FROM:<a@b.example> SIZE=", CommandError::unknown_parameter);
  fails("MAIL FROM:<a@b.example> SIZE=12x", CommandError::unknown_parameter);
  fails("MAIL FROM:<a@b.example> SIZE=99999999999999999999", CommandError::unknown_parameter);
  fails("MAIL FROM:<a@b.example> BODY=BINARYMIME", CommandError::unknown_parameter);
  fails("MAIL FROM:<a@b.example> SMTPUTF8", CommandError::unknown_parameter);
  fails("MAIL FROM:<a@b.example> AUTH=<>", CommandError::unknown_parameter);

  fails("RCPT", CommandError::syntax);
  fails("RCPT FROM:<a@b.example>", CommandError::syntax);
  fails("RCPT TO:<>", CommandError::bad_address);
  fails("RCPT TO:<bob>", CommandError::bad_address);
  fails("RCPT TO:<b@c.example> NOTIFY=NEVER", CommandError::unknown_parameter);
  fails("DATA now", CommandError::syntax);
  fails("RSET x", CommandError::syntax);
  fails("STARTTLS please", CommandError::syntax);
  fails("QUIT now", CommandError::syntax);
}

TEST_CASE("parse_command: RCPT TO") {
  auto p = ok("RCPT TO:<bob@example.net>");
  CHECK(p.command.verb == Verb::rcpt);
  CHECK(p.command.address == "bob@example.net");
  CHECK(ok("rcpt to: <bob@example.net>").command.address == "bob@example.net");
  CHECK(ok("RCPT TO:<Postmaster>").command.address == "Postmaster");
  CHECK(ok("RCPT TO:<@hop.example:bob@example.net>").command.address == "bob@example.net");
}

TEST_CASE("address_domain") {
  CHECK(address_domain("alice@Example.ORG") == "example.org");
  CHECK(address_domain("") == "");
  CHECK(address_domain("postmaster") == "");
  CHECK(address_domain("\"a@b\"@c.example") == "c.example");
  CHECK(address_domain("a@[192.0.2.1]") == "[192.0.2.1]");
  // The trailing dot the parser tolerates names the same domain (connectors, MX route, TLS reports).
  CHECK(address_domain("alice@Example.ORG.") == "example.org");
}
