// RFC 8460: the _smtp._tls TXT record (section 3), the JSON report (4.4) and the report mail (5.3).
#include <doctest/doctest.h>

#include <string>
#include <vector>

#include "proto/tlsrpt.hpp"

namespace {

using namespace mailflow::proto::tlsrpt;
using Status = TxtLookup::Status;

TEST_CASE("tlsrpt TXT: rua lists of mailto: and https: URIs - other schemes ignored") {
  auto r = parse_txt_records({"v=spf1 -all", "v=TLSRPTv1; rua=mailto:reports@example.com"});
  CHECK(r.status == Status::report);
  CHECK(r.rua == std::vector<std::string>{"mailto:reports@example.com"});
  r = parse_txt_records({"v=TLSRPTv1;rua=mailto:a@example.com, https://reporting.example.com/v1/tlsrpt ,ftp://x;"});
  CHECK(r.status == Status::report);
  CHECK(r.rua == std::vector<std::string>{"mailto:a@example.com", "https://reporting.example.com/v1/tlsrpt"});
  CHECK(parse_txt_records({"v=TLSRPTv1; rua=mailto:a@example.com; future=1"}).status == Status::report);
  CHECK(parse_txt_records({}).status == Status::none);
  CHECK(parse_txt_records({"v=TLSRPTv10; rua=mailto:a@example.com"}).status == Status::none);
}

TEST_CASE("tlsrpt TXT: a rua listed twice is one destination - the report goes there once") {
  const auto r = parse_txt_records({"v=TLSRPTv1; rua=mailto:a@example.com,https://r.example.com/v1,"
                                    "mailto:a@example.com, https://r.example.com/v1"});
  CHECK(r.status == Status::report);
  CHECK(r.rua == std::vector<std::string>{"mailto:a@example.com", "https://r.example.com/v1"});
  // Written otherwise, the same destination: the domain's case, the root's final dot, the scheme's case, a
  // mailto: query (not used). The first spelling is kept; a local part or path of another case is another
  // one.
  const auto same = parse_txt_records(
      {"v=TLSRPTv1; rua=mailto:a@example.com,https://r.example.com:8443/v1,MAILTO:a@Example.COM.,"
       "mailto:a@example.com?subject=x,HTTPS://R.Example.com.:8443/v1,mailto:A@example.com,https://"
       "r.example.com/V1"});
  CHECK(same.rua == std::vector<std::string>{"mailto:a@example.com", "https://r.example.com:8443/v1",
                                             "mailto:A@example.com", "https://r.example.com/V1"});
}

TEST_CASE("tlsrpt TXT: a record lists at most max_rua destinations - the rest are left out, and counted") {
  std::string record = "v=TLSRPTv1; rua=";
  for (int i = 0; i < 1000; ++i)
    record += (i ? ",mailto:r" : "mailto:r") + std::to_string(i) + "@victim.example";
  const auto r = parse_txt_records({record});
  CHECK(r.status == Status::report);
  REQUIRE(r.rua.size() == max_rua);
  CHECK(r.rua.front() == "mailto:r0@victim.example");
  CHECK(r.rua.back() == "mailto:r" + std::to_string(max_rua - 1) + "@victim.example");
  CHECK(r.rua_left_out == 1000 - max_rua);
  CHECK(parse_txt_records({"v=TLSRPTv1; rua=mailto:a@example.com"}).rua_left_out == 0);
  // A destination past the bound named again is still one left out (as one within the bound is one kept).
  const auto twice = parse_txt_records({record + ",mailto:r999@victim.example,mailto:r999@victim.example"});
  CHECK(twice.rua_left_out == 1000 - max_rua);
}

TEST_CASE("tlsrpt TXT: malformed, duplicated or unusable records are invalid") {
  const std::vector<std::string> bad = {
      "v=TLSRPTv1",
      "v=TLSRPTv1;",
      "v=TLSRPTv1; rua=",
      "v=TLSRPTv1; rua=ftp://example.com/x",            // nothing usable
      "v=TLSRPTv1; rua=mailto:a@example.com; rua=mailto:b@example.com",  // duplicate rua
      "v=TLSRPTv1; rua=mailto:a@example.com,,mailto:b@example.com",     // empty URI
      "v=TLSRPTv1; rua=mailto:a@example.com; junk",
      "v=TLSRPTv1; rua=mailto:a@\x01.com",
      "v=TLSRPTv1; rua=mailto:noat",
  };
  for (const auto& record : bad) {
    CAPTURE(record);
    const auto r = parse_txt_records({record});
    CHECK(r.status == Status::invalid);
    CHECK_FALSE(r.error.empty());
  }
  CHECK(parse_txt_records({"v=TLSRPTv1; rua=mailto:a@x.example", "v=TLSRPTv1; rua=mailto:b@x.example"}).status ==
        Status::invalid);
}

TEST_CASE("tlsrpt names: policy types and result types round-trip") {
  for (const auto type : all_policy_types) CHECK(parse_policy_type(to_string(type)) == type);
  for (const auto type : all_result_types) CHECK(parse_result_type(to_string(type)) == type);
  CHECK(to_string(ResultType::sts_policy_fetch_error) == "sts-policy-fetch-error");
  CHECK_FALSE(parse_result_type("success").has_value());
}

DomainDay sample_day() {
  DomainDay day;
  day.date = "2016-04-01";
  day.domain = "company-y.example";
  PolicyKey sts{PolicyType::sts, {"version: STSv1", "mode: testing", "mx: *.mail.company-y.example", "max_age: 86400"},
                {"*.mail.company-y.example"}};
  auto& counts = day.policies[sts];
  counts.successful = 5326;
  counts.failed = 303;
  counts.failures[FailureKey{ResultType::certificate_expired, "2001:db8:abcd:0012::1", "mx1.mail.company-y.example",
                             "2001:db8:abcd:0013::1", ""}] = 100;
  counts.failures[FailureKey{ResultType::starttls_not_supported, "2001:db8:abcd:0013::1",
                             "mx2.mail.company-y.example", "203.0.113.56", "tls \"quoted\""}] = 200;
  day.policies[PolicyKey{}].successful = 2;
  return day;
}

TEST_CASE("tlsrpt JSON: the section 4.4 fields, report-id unique per day, domain and submitter") {
  const Submitter submitter{"Company-X", "sts-reporting@company-x.example", "mail.company-x.example"};
  const std::string json = render_json(sample_day(), submitter);
  CHECK(json.find("\"organization-name\": \"Company-X\"") != std::string::npos);
  CHECK(json.find("\"date-range\": {\"start-datetime\": \"2016-04-01T00:00:00Z\", \"end-datetime\": "
                  "\"2016-04-01T23:59:59Z\"}") != std::string::npos);
  CHECK(json.find("\"report-id\": \"2016-04-01.company-y.example@mail.company-x.example\"") !=
        std::string::npos);
  CHECK(json.find("\"policy-type\": \"sts\", \"policy-string\": [\"version: STSv1\", \"mode: testing\"") !=
        std::string::npos);
  CHECK(json.find("\"mx-host\": [\"*.mail.company-y.example\"]") != std::string::npos);
  CHECK(json.find("\"total-successful-session-count\": 5326, \"total-failure-session-count\": 303") !=
        std::string::npos);
  CHECK(json.find("{\"result-type\": \"certificate-expired\", \"sending-mta-ip\": \"2001:db8:abcd:0012::1\", "
                  "\"receiving-mx-hostname\": \"mx1.mail.company-y.example\", \"receiving-ip\": "
                  "\"2001:db8:abcd:0013::1\", \"failed-session-count\": 100}") != std::string::npos);
  CHECK(json.find("\"failure-reason-code\": \"tls \\\"quoted\\\"\"") != std::string::npos);
  CHECK(json.find("{\"policy-type\": \"no-policy-found\", \"policy-domain\": \"company-y.example\"}") !=
        std::string::npos);
  DomainDay empty;
  empty.date = "2016-04-02";
  empty.domain = "x.example";
  CHECK(render_json(empty, submitter).find("\"policies\": []}") != std::string::npos);
}

TEST_CASE("tlsrpt mail: section 5.3 headers, multipart/report with the base64 gzip attachment") {
  const Submitter submitter{"Company-X", "sts-reporting@company-x.example", "mail.company-x.example"};
  const std::string attachment(200, '\x8b');
  const std::string mail = render_mail(
      sample_day(), submitter, attachment,
      MailParts{"tlsrpt-noreply@mail.company-x.example", "reports@company-y.example",
                "Fri, 02 Apr 2016 00:05:00 +0000", "r1@mail.company-x.example", "----=_tlsrpt_1"});
  CHECK(mail.starts_with("From: <tlsrpt-noreply@mail.company-x.example>\r\nTo: <reports@company-y.example>\r\n"));
  CHECK(mail.find("\r\nSubject: Report Domain: company-y.example Submitter: mail.company-x.example Report-ID: "
                  "<2016-04-01.company-y.example@mail.company-x.example>\r\n") != std::string::npos);
  CHECK(mail.find("\r\nTLS-Report-Domain: company-y.example\r\n") != std::string::npos);
  CHECK(mail.find("\r\nTLS-Report-Submitter: mail.company-x.example\r\n") != std::string::npos);
  CHECK(mail.find("Content-Type: multipart/report; report-type=\"tlsrpt\";\r\n\tboundary=\"----=_tlsrpt_1\"") !=
        std::string::npos);
  CHECK(mail.find("Content-Type: application/tlsrpt+gzip\r\nContent-Transfer-Encoding: base64\r\n") !=
        std::string::npos);
  // 2016-04-01T00:00:00Z is 1459468800.
  CHECK(mail.find("filename=\"mail.company-x.example!company-y.example!1459468800!1459555199.json.gz\"") !=
        std::string::npos);
  const auto body = mail.find("\r\n\r\n", mail.find("application/tlsrpt+gzip")) + 4;
  const auto end = mail.find("\r\n\r\n--", body);
  std::string encoded;
  for (std::size_t at = body; at < end;) {
    const auto eol = mail.find("\r\n", at);
    CHECK(eol - at <= 76);
    encoded += mail.substr(at, eol - at);
    at = eol + 2;
  }
  CHECK(encoded == base64(attachment));
  CHECK(mail.ends_with("\r\n------=_tlsrpt_1--\r\n"));
  for (const char c : mail) CHECK_MESSAGE(static_cast<unsigned char>(c) < 0x80, "7bit only");
}

// config refuses a longer tlsrpt.organization_name: with it, and a submitter and a domain of 253 octets each,
// the text line still fits RFC 5322's 998 octets (a longer line makes receivers refuse every report).
TEST_CASE("tlsrpt mail: the longest organization name allowed keeps the text line within 998 octets") {
  const std::string longest_name = std::string(63, 'a') + "." + std::string(63, 'b') + "." +
                                   std::string(63, 'c') + "." + std::string(61, 'd');
  REQUIRE(longest_name.size() == 253);
  const Submitter submitter{std::string(max_organization_name, 'O'), "c@x.example", longest_name};
  DomainDay day = sample_day();
  day.domain = longest_name;
  const MailParts parts{"t@x.example", "r@y.example", "Fri, 02 Apr 2016 00:05:00 +0000", "r1@x.example",
                        "----=_tlsrpt_1"};
  const std::string mail = render_mail(day, submitter, "gz", parts);
  const auto start = mail.find("This is an aggregate TLS report from ");
  REQUIRE(start != std::string::npos);
  const auto line = mail.substr(start, mail.find("\r\n", start) - start);
  CHECK(line.find(submitter.organization_name + " (" + longest_name + ") for " + longest_name) !=
        std::string::npos);
  CHECK(line.size() <= 998);
  CHECK(max_organization_name >= 253);  // the default, the hostname, always fits
  // Every line of the mail, the Subject too (two names and a Report-ID that holds both again: ~1,070 octets
  // on one line), which is folded before "Submitter:" and "Report-ID:" where it would not fit.
  for (std::size_t at = 0; at < mail.size();) {
    const auto eol = mail.find("\r\n", at);
    REQUIRE(eol != std::string::npos);
    CHECK_MESSAGE(eol - at <= 998, mail.substr(at, 60));
    at = eol + 2;
  }
  const std::string subject = "Subject: Report Domain: " + longest_name + "\r\n Submitter: " + longest_name +
                              "\r\n Report-ID: <2016-04-01." + longest_name + "@" + longest_name + ">\r\n";
  CHECK(mail.find("\r\n" + subject) != std::string::npos);
}

TEST_CASE("base64: RFC 4648 test vectors") {
  CHECK(base64("") == "");
  CHECK(base64("f") == "Zg==");
  CHECK(base64("fo") == "Zm8=");
  CHECK(base64("foo") == "Zm9v");
  CHECK(base64("foobar") == "Zm9vYmFy");
  CHECK(https_post_headers(12) ==
        std::vector<std::pair<std::string, std::string>>{{"Content-Type", "application/tlsrpt+gzip"},
                                                        {"Content-Length", "12"}});
}

}  // namespace
