// RFC 8461: the _mta-sts TXT record (3.1), the policy file (3.2) and MX matching (4.1), with hostile input.
#include <doctest/doctest.h>

#include <string>
#include <vector>

#include "proto/mta_sts.hpp"

namespace {

using namespace mailflow::proto::mta_sts;
using Status = TxtLookup::Status;

TEST_CASE("mta-sts TXT: one valid v=STSv1 record gives its id - others are discarded") {
  auto r = parse_txt_records({"v=spf1 -all", "v=STSv1; id=20160831085700Z;"});
  CHECK(r.status == Status::policy);
  CHECK(r.id == "20160831085700Z");
  CHECK(parse_txt_records({"v=STSv1;id=abc"}).id == "abc");
  CHECK(parse_txt_records({"v=STSv1 ;  id=abc ; ext=x-1 ;"}).status == Status::policy);
  CHECK(parse_txt_records({}).status == Status::none);
  CHECK(parse_txt_records({"v=STSv10; id=1"}).status == Status::none);
  CHECK(parse_txt_records({"v=STSv1 id=1"}).status == Status::none);  // does not begin with "v=STSv1;"
  CHECK(parse_txt_records({"hello", "v=spf1"}).status == Status::none);
  // RFC 8461 3.2: of a field other than mx given twice, all but the first are ignored (the record stays
  // valid).
  for (const std::string record : {"v=STSv1; id=1; id=2", "v=STSv1; id=1; id=not-alnum;"}) {
    CAPTURE(record);
    const auto first = parse_txt_records({record});
    CHECK(first.status == Status::policy);
    CHECK(first.id == "1");
  }
}

TEST_CASE("mta-sts TXT: invalid records make the domain's MTA-STS invalid, never a policy") {
  const std::vector<std::string> bad = {
      "v=STSv1",                                        // no id
      "v=STSv1;",                                       // no id
      "v=STSv1; id=",                                   // empty id
      "v=STSv1; id=abc-def",                            // id: letters and digits only
      "v=STSv1; id=123456789012345678901234567890123",  // 33 characters
      "v=STSv1; id=1; junk",                            // field without '='
      "v=STSv1; id=1; =x",                              // empty extension name
      "v=STSv1; id=1; e=a=b",                           // '=' in an extension value
      std::string("v=STSv1; id=1; e=\x01", 18),         // control byte
      "v=STSv1; id=1; e=\xff",                          // binary
  };
  for (const auto& record : bad) {
    CAPTURE(record);
    const auto r = parse_txt_records({record});
    CHECK(r.status == Status::invalid);
    CHECK_FALSE(r.error.empty());
  }
  const auto two = parse_txt_records({"v=STSv1; id=1", "v=STSv1; id=2"});
  CHECK(two.status == Status::invalid);
  CHECK(two.error == "2 v=STSv1 records (exactly one allowed)");
  CHECK(parse_txt_records({std::string(100000, 'v')}).status == Status::none);
  CHECK(parse_txt_records({"v=STSv1; id=1; x=" + std::string(100000, 'a')}).status == Status::policy);
}

constexpr std::string_view kPolicy =
    "version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.example.net\r\nmx: backupmx.example.com\r\n"
    "max_age: 604800\r\n";

TEST_CASE("mta-sts policy: the RFC's example, CRLF or LF, in any order, unknown keys ignored") {
  std::string error;
  auto policy = parse_policy(kPolicy, error);
  REQUIRE(policy.has_value());
  CHECK(error.empty());
  CHECK(policy->mode == Mode::enforce);
  CHECK(policy->max_age == 604800);
  CHECK(policy->mx == std::vector<std::string>{"mail.example.com", "*.example.net", "backupmx.example.com"});
  CHECK(policy->lines == std::vector<std::string>{"version: STSv1", "mode: enforce", "mx: mail.example.com",
                                                  "mx: *.example.net", "mx: backupmx.example.com",
                                                  "max_age: 604800"});
  auto lf = parse_policy("max_age:86400\nfuture_key: whatever it says\nmx: MX1.Example.ORG\nmode: testing\n"
                         "version: STSv1",
                         error);
  REQUIRE(lf.has_value());
  CHECK(lf->mode == Mode::testing);
  CHECK(lf->mx == std::vector<std::string>{"mx1.example.org"});
  CHECK(lf->lines.size() == 4);  // future_key is not a policy string
  auto none = parse_policy("version: STSv1\nmode: none\nmax_age: 0\n", error);
  REQUIRE(none.has_value());
  CHECK(none->mode == Mode::none);
  CHECK(none->mx.empty());
  CHECK(parse_policy("version: STSv1\nmode: none\nmax_age: 31557600\n", error).has_value());
  // Above RFC 8461 3.2's "max value is 31557600" (a year): the policy is cached for that, not refused (mox
  // and postfix-mta-sts-resolver take it too; refusing it would leave the domain unprotected).
  for (const char* above : {"31557601", "9999999999"}) {
    CAPTURE(above);
    const auto capped = parse_policy(
        std::string("version: STSv1\nmode: enforce\nmx: a.example\nmax_age: ") + above + "\n", error);
    REQUIRE(capped.has_value());
    CHECK(capped->max_age == max_max_age);
  }
  // An extension's value may be UTF-8 (sts-policy-vchar includes UTF8-2/3/4); it is ignored all the same.
  const auto utf8 = parse_policy(
      "version: STSv1\nmode: enforce\nmx: mx.example\nmax_age: 60\n"
      "comment: Gr\xc3\xbc\xc3\x9f\x65 aus K\xc3\xb6ln \xe2\x9c\x89\n",
      error);
  REQUIRE_MESSAGE(utf8.has_value(), error);
  CHECK(utf8->mode == Mode::enforce);
  CHECK(utf8->lines.size() == 4);
}

TEST_CASE("mta-sts policy: a field other than mx given again - the first counts, the others are ignored") {
  // RFC 8461 3.2: "If any non-repeated field -- i.e., all fields except the mx field -- is duplicated, all
  // entries except for the first SHALL be ignored."
  std::string error;
  const auto policy = parse_policy(
      "version: STSv1\nmode: enforce\nmode: none\nmx: a.example\nmax_age: 60\n"
      "max_age: 2\nversion: STSv2\nmode: bogus\nmax_age: x\nmx: b.example\n",
      error);
  REQUIRE_MESSAGE(policy.has_value(), error);
  CHECK(policy->mode == Mode::enforce);
  CHECK(policy->max_age == 60);
  CHECK(policy->mx == std::vector<std::string>{"a.example", "b.example"});
  CHECK(policy->lines == std::vector<std::string>{"version: STSv1", "mode: enforce", "mx: a.example",
                                                  "max_age: 60", "mx: b.example"});
  CHECK_FALSE(parse_policy("version: STSv2\nversion: STSv1\nmode: none\nmax_age: 1\n", error).has_value());
  CHECK(error == "version must be STSv1 (line 1)");
}

TEST_CASE("mta-sts policy: missing fields, bad values, binary and huge bodies are invalid") {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"mode: enforce\nmx: a.example\nmax_age: 1\n", "missing version"},
      {"version: STSv1\nmx: a.example\nmax_age: 1\n", "missing mode"},
      {"version: STSv1\nmode: enforce\nmx: a.example\n", "missing max_age"},
      {"version: STSv1\nmode: enforce\nmax_age: 1\n", "no mx in a policy whose mode is enforce"},
      {"version: STSv2\nmode: enforce\nmx: a.example\nmax_age: 1\n", "version must be STSv1 (line 1)"},
      {"version: STSv1\nmode: Enforce\nmx: a.example\nmax_age: 1\n",
       "mode must be enforce, testing or none (line 2)"},
      {"version: STSv1\nmode: enforce\nmx: a.example\nmax_age: -1\n",
       "max_age must be 1 to 10 digits (seconds) (line 4)"},
      {"version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 99999999999\n",
       "max_age must be 1 to 10 digits (seconds) (line 4)"},
      {"version: STSv1\nmode: enforce\nmx: *.*.example\nmax_age: 1\n",
       "mx must be a host name or *.domain (line 3)"},
      {"version: STSv1\nmode: enforce\nmx: a..example\nmax_age: 1\n",
       "mx must be a host name or *.domain (line 3)"},
      {"version: STSv1\nmode: enforce\nmx: -a.example\nmax_age: 1\n",
       "mx must be a host name or *.domain (line 3)"},
      {"version: STSv1\nmode: enforce\nmx:\nmax_age: 1\n", "mx must be a host name or *.domain (line 3)"},
      {"version: STSv1\nmode: enforce\n\nmx: a.example\nmax_age: 1\n", "empty line (line 3)"},
      {"version: STSv1\nmode enforce\n", "not a \"key: value\" line (line 2)"},
      {"version: STSv1\n: enforce\n", "malformed key (line 2)"},
      {std::string("version: STSv1\nmode: enforce\0\nmx: a.example\nmax_age: 1\n", 50),
       "a control byte (line 2)"},
      {"version: STSv1\nmode: enforce\nmx: \xc3\xa9.example\nmax_age: 1\n",
       "mx must be a host name or *.domain (line 3)"},
      {"version: STSv1\nmode: enforce\xc2\xa0\nmx: a.example\nmax_age: 1\n",
       "mode must be enforce, testing or none (line 2)"},
      {"version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 1\nnote: a\x7f\n", "a control byte (line 5)"},
      {"<html><body>Not found</body></html>", "not a \"key: value\" line (line 1)"},
      {"", "missing version"},
  };
  for (const auto& [body, why] : cases) {
    CAPTURE(body);
    std::string error;
    CHECK_FALSE(parse_policy(body, error).has_value());
    CHECK(error == why);
  }
  std::string huge = std::string(kPolicy);
  while (huge.size() <= max_policy_bytes) huge += "x-padding: " + std::string(100, 'p') + "\n";
  std::string error;
  CHECK_FALSE(parse_policy(huge, error).has_value());
  CHECK(error == "policy larger than 65536 bytes");
  huge.resize(max_policy_bytes);  // just inside the bound (the cut last line is still key: value)
  CHECK(parse_policy(huge.substr(0, huge.rfind('\n') + 1), error).has_value());
  CHECK(error.empty());
}

TEST_CASE("mta-sts mx matching: exact names and one-label wildcards, any case, trailing dot") {
  CHECK(mx_matches("mail.example.com", "mail.example.com"));
  CHECK(mx_matches("mail.example.com", "MAIL.Example.com."));
  CHECK_FALSE(mx_matches("mail.example.com", "mail.example.com.evil"));
  CHECK_FALSE(mx_matches("mail.example.com", "xmail.example.com"));
  CHECK(mx_matches("*.example.net", "mx1.example.net"));
  CHECK(mx_matches("*.example.net", "MX1.EXAMPLE.NET."));
  CHECK_FALSE(mx_matches("*.example.net", "example.net"));
  CHECK_FALSE(mx_matches("*.example.net", "a.b.example.net"));  // one label only (section 4.1)
  CHECK_FALSE(mx_matches("*.example.net", "mx1.notexample.net"));
  CHECK_FALSE(mx_matches("*.example.net", ".example.net"));
  std::string error;
  const auto policy = parse_policy(kPolicy, error);
  REQUIRE(policy.has_value());
  CHECK(policy_lists(*policy, "backupmx.example.com"));
  CHECK(policy_lists(*policy, "mx9.example.net"));
  CHECK_FALSE(policy_lists(*policy, "mx.example.org"));
}

}  // namespace
