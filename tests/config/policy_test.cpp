// The outbound policy keys (issue #19): upstreams[].mta_sts, mta_sts, tlsrpt; defaults and the errors a user
// sees (text and exact line:col).
#include <doctest/doctest.h>

#include "config/config.hpp"
#include "tests/config/test_util.hpp"

namespace mailflow::config {
namespace {

using test::all_errors;
using test::load;

constexpr std::string_view listeners = R"(hostname: mx1.example.org
listeners:
  - {name: out, address: "127.0.0.1:2587", direction: outbound, upstream: internet}
)";

std::string with(std::string_view rest) { return std::string(listeners) + std::string(rest); }

std::string only_error(const LoadResult& result) {
  INFO(all_errors(result));
  REQUIRE(result.errors.size() == 1);
  CHECK(result.config == nullptr);
  return result.errors.front().to_string();
}

TEST_CASE("mta_sts and tlsrpt defaults: testing for mx upstreams, off for fixed ones, reports not sent") {
  const auto result = load(with("upstreams:\n  - {name: internet, mx: true}\n  - {name: store, address: "
                                "\"10.0.0.5:25\"}\n"));
  INFO(all_errors(result));
  REQUIRE(result.config);
  const Config& c = *result.config;
  CHECK(c.upstreams.at(0).mta_sts == MtaStsMode::testing);
  CHECK(c.upstreams.at(1).mta_sts == MtaStsMode::off);
  CHECK(c.mta_sts.ca_file.empty());
  CHECK(c.mta_sts.fetch_timeout == std::chrono::seconds(10));
  CHECK(c.mta_sts.max_policies == 10000);
  CHECK_FALSE(c.tlsrpt.send);
  CHECK(c.tlsrpt.organization_name == "mx1.example.org");
  CHECK(c.tlsrpt.contact_info == "postmaster@mx1.example.org");
  CHECK(c.tlsrpt.submitter == "mx1.example.org");
  CHECK(summarize(c).find("  internet mx (port 25) tls=opportunistic xclient=auto mta_sts=testing\n") !=
        std::string::npos);
}

// mta_sts with tls: none is an error; the default must not make that pair either (it fetched every recipient
// domain's policy and recorded each delivery as an MTA-STS failure for its TLS report).
TEST_CASE("mta_sts defaults to off for an mx upstream with tls: none") {
  const auto result = load(with("upstreams:\n  - {name: internet, mx: true, tls: none}\n"));
  INFO(all_errors(result));
  REQUIRE(result.config);
  CHECK(result.config->upstreams.at(0).mta_sts == MtaStsMode::off);
}

TEST_CASE("mta_sts and tlsrpt with explicit values") {
  const auto result = load(with(R"(upstreams:
  - {name: internet, mx: true, mta_sts: enforce}
  - {name: store, address: "10.0.0.5:25", mta_sts: off}
mta_sts: {ca_file: /etc/ssl/certs/ca-certificates.crt, fetch_timeout: 3s, max_policies: 5}
tlsrpt: {send: true, organization_name: Example Org, contact_info: "tls@example.org", submitter: example.org}
)"));
  INFO(all_errors(result));
  REQUIRE(result.config);
  const Config& c = *result.config;
  CHECK(c.upstreams.at(0).mta_sts == MtaStsMode::enforce);
  CHECK(c.upstreams.at(1).mta_sts == MtaStsMode::off);
  CHECK(c.mta_sts.ca_file == "/etc/ssl/certs/ca-certificates.crt");
  CHECK(c.mta_sts.fetch_timeout == std::chrono::seconds(3));
  CHECK(c.mta_sts.max_policies == 5);
  CHECK(c.tlsrpt.send);
  CHECK(c.tlsrpt.organization_name == "Example Org");
  CHECK(c.tlsrpt.contact_info == "tls@example.org");
  CHECK(c.tlsrpt.submitter == "example.org");
}

TEST_CASE("mta_sts and tlsrpt errors name the key, with line and column") {
  CHECK(only_error(load(with("upstreams:\n  - {name: internet, address: \"10.0.0.5:25\", mta_sts: testing}\n"))) ==
        "test.yaml:5:46: upstreams[0].mta_sts: only for mx: true (an MTA-STS policy lists a recipient domain's MX "
        "hosts; this upstream delivers to a fixed address)");
  CHECK(only_error(load(with("upstreams:\n  - {name: internet, mx: true, mta_sts: strict}\n"))) ==
        "test.yaml:5:41: upstreams[0].mta_sts: expected one of off, testing, enforce, got \"strict\"");
  CHECK(only_error(load(with("upstreams:\n  - {name: internet, mx: true, tls: none, mta_sts: enforce}\n"))) ==
        "test.yaml:5:43: upstreams[0].mta_sts: needs STARTTLS (tls is none); set mta_sts: off or tls: "
        "opportunistic");
  CHECK(only_error(load(with("upstreams:\n  - {name: internet, mx: true}\nmta_sts: {fetch_timeout: 1h}\n")))
            .find("mta_sts.fetch_timeout") != std::string::npos);
  CHECK(only_error(load(with("upstreams:\n  - {name: internet, mx: true}\nmta_sts: {ca_file: /nonexistent}\n")))
            .find("mta_sts.ca_file") != std::string::npos);
  CHECK(only_error(load(with("upstreams:\n  - {name: internet, mx: true}\nmta_sts: {cache: 1}\n")))
            .find("unknown key \"cache\"") != std::string::npos);
  CHECK(only_error(load(with("upstreams:\n  - {name: internet, mx: true}\ntlsrpt: {submitter: \"not a name\"}\n"))) ==
        "test.yaml:6:21: tlsrpt.submitter: expected a domain name like mx1.example.org, got \"not a name\"");
  CHECK(only_error(load(with("upstreams:\n  - {name: internet, mx: true}\ntlsrpt: {send: maybe}\n")))
            .find("tlsrpt.send") != std::string::npos);
  CHECK(only_error(load(with("upstreams:\n  - {name: internet, mx: true}\ntlsrpt: {organization_name: \"\"}\n")))
            .find("tlsrpt.organization_name: must be printable ASCII") != std::string::npos);
  // It goes into a text line of the report mail (proto::tlsrpt::max_organization_name).
  const auto with_name = [](std::size_t size) {
    return with("upstreams:\n  - {name: internet, mx: true}\ntlsrpt: {organization_name: " +
                std::string(size, 'O') + "}\n");
  };
  CHECK(only_error(load(with_name(257))) ==
        "test.yaml:6:29: tlsrpt.organization_name: at most 256 characters (it goes into a line of the report "
        "mail, and mail lines end at 998), got 257");
  CHECK(load(with_name(256)).config);
}

}  // namespace
}  // namespace mailflow::config
