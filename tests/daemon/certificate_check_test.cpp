// check_certificates: what --check-config reports about certificates and keys, loaded with the daemon's own
// ServerTls (garbage, a key of another certificate, expiry), with the position of each cert in the file; and
// served_certificates: the same for what start and reload loaded.
#include "daemon/certificate_check.hpp"

#include "daemon/http_server.hpp"
#include "daemon/runtime.hpp"
#include "daemon/telemetry.hpp"

#include <doctest/doctest.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <stdlib.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <string>

namespace {

using namespace std::chrono_literals;

struct Pem {
  std::string cert;
  std::string key;
};

// A self-signed certificate valid from now-1d until now + `valid_for` (negative: already expired).
Pem make_pem(std::chrono::seconds valid_for, const char* cn) {
  EVP_PKEY* key = EVP_PKEY_Q_keygen(nullptr, nullptr, "EC", "P-256");
  REQUIRE(key != nullptr);
  X509* cert = X509_new();
  X509_set_version(cert, 2);
  ASN1_INTEGER_set(X509_get_serialNumber(cert), 1);
  X509_gmtime_adj(X509_getm_notBefore(cert), -86400 * 30);
  X509_gmtime_adj(X509_getm_notAfter(cert), static_cast<long>(valid_for.count()));
  X509_NAME_add_entry_by_txt(X509_get_subject_name(cert), "CN", MBSTRING_ASC,
                             reinterpret_cast<const unsigned char*>(cn), -1, -1, 0);
  X509_set_issuer_name(cert, X509_get_subject_name(cert));
  X509_set_pubkey(cert, key);
  REQUIRE(X509_sign(cert, key, EVP_sha256()) > 0);
  Pem out;
  for (int part = 0; part < 2; ++part) {
    BIO* bio = BIO_new(BIO_s_mem());
    if (part == 0) PEM_write_bio_X509(bio, cert);
    else PEM_write_bio_PrivateKey(bio, key, nullptr, nullptr, 0, nullptr, nullptr);
    char* data = nullptr;
    const long size = BIO_get_mem_data(bio, &data);
    (part == 0 ? out.cert : out.key).assign(data, static_cast<std::size_t>(size));
    BIO_free(bio);
  }
  X509_free(cert);
  EVP_PKEY_free(key);
  return out;
}

struct Dir {
  std::filesystem::path path;
  Dir() {
    std::string name = (std::filesystem::temp_directory_path() / "mailflow-certcheck-XXXXXX").string();
    path = ::mkdtemp(name.data());
  }
  ~Dir() { std::filesystem::remove_all(path); }
  std::string write(const std::string& name, const std::string& content) const {
    std::ofstream(path / name) << content;
    return (path / name).string();
  }
};

}  // namespace

TEST_CASE("check_certificates: garbage, a foreign key, expired and expiring certificates, http.tls") {
  Dir dir;
  const Pem good = make_pem(std::chrono::hours(24 * 365), "mx1.example.org");
  const Pem other = make_pem(std::chrono::hours(24 * 365), "other.example.org");
  const Pem expired = make_pem(-std::chrono::hours(48), "old.example.org");
  const Pem soon = make_pem(std::chrono::hours(24 * 5) + 1h, "soon.example.org");
  const std::string good_cert = dir.write("good.pem", good.cert);
  const std::string good_key = dir.write("good.key", good.key);
  const std::string other_key = dir.write("other.key", other.key);
  const std::string garbage = dir.write("garbage.pem", "this is not a certificate\n");
  const std::string expired_cert = dir.write("expired.pem", expired.cert);
  const std::string expired_key = dir.write("expired.key", expired.key);
  const std::string soon_cert = dir.write("soon.pem", soon.cert);
  const std::string soon_key = dir.write("soon.key", soon.key);

  const std::string yaml = "listeners:\n"
                           "  - name: inbound\n"
                           "    address: \"127.0.0.1:2525\"\n"
                           "    upstream: up\n"
                           "    tls:\n"
                           "      certificates:\n"
                           "        - {cert: " + good_cert + ", key: " + good_key + "}\n"
                           "        - {cert: " + garbage + ", key: " + good_key + "}\n"
                           "        - {cert: " + good_cert + ", key: " + other_key + "}\n"
                           "        - {cert: " + expired_cert + ", key: " + expired_key + "}\n"
                           "upstreams:\n"
                           "  - {name: up, address: \"127.0.0.1:25\"}\n"
                           "  - {name: verified, address: \"127.0.0.1:26\", tls: verify, ca_file: " + garbage + "}\n"
                           "http:\n"
                           "  tls: {cert: " + soon_cert + ", key: " + soon_key + "}\n";
  const auto loaded = mailflow::config::load_config_string(yaml, "mailflowd.yaml");
  REQUIRE(loaded.errors.empty());
  const auto findings = mailflow::check_certificates(*loaded.config, std::chrono::system_clock::now());

  REQUIRE(findings.errors.size() == 3);
  CHECK(findings.errors[0].file == "mailflowd.yaml");
  CHECK(findings.errors[0].line == 8);
  CHECK(findings.errors[0].column == 18);
  CHECK_FALSE(findings.errors[0].warning);
  CHECK(findings.errors[0].message.starts_with("listeners[0].tls.certificates[1]: cannot load certificate " + garbage));
  CHECK(findings.errors[1].line == 9);
  CHECK(findings.errors[1].message == "listeners[0].tls.certificates[2]: key " + other_key +
                                          " does not match certificate " + good_cert + " (key values mismatch)");
  CHECK(findings.errors[2].line == 13);
  CHECK(findings.errors[2].column == 69);
  CHECK(findings.errors[2].message.starts_with("upstreams[1]: cannot load ca_file " + garbage));

  REQUIRE(findings.warnings.size() == 2);
  CHECK(findings.warnings[0].line == 10);
  CHECK(findings.warnings[0].warning);
  CHECK(findings.warnings[0].message.starts_with("listeners[0].tls.certificates[3].cert: certificate " + expired_cert +
                                                 " (CN old.example.org) expired on "));
  CHECK(findings.warnings[1].line == 15);
  CHECK(findings.warnings[1].column == 15);
  CHECK(findings.warnings[1].message.starts_with("http.tls.cert: certificate " + soon_cert +
                                                 " (CN soon.example.org) expires on "));
  CHECK(findings.warnings[1].message.ends_with(" (in 5 days)"));

  // notAfter of every certificate that loaded, for mailflow_certificate_expiry_timestamp_seconds.
  REQUIRE(findings.expiries.size() == 3);
  CHECK(findings.expiries[0].listener == "inbound");
  CHECK(findings.expiries[0].certificate == good_cert);
  const auto now = std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch());
  CHECK(findings.expiries[0].not_after > now.count() + 364 * 86400);
  CHECK(findings.expiries[0].not_after < now.count() + 366 * 86400);
  CHECK(findings.expiries[1].certificate == expired_cert);
  CHECK(findings.expiries[1].not_after < now.count());
  CHECK(findings.expiries[2].listener == "http");
  CHECK(findings.expiries[2].certificate == soon_cert);
}

// libunbound reads dns.trust_anchor_file only when its resolver is made, which the daemon did at the first lookup:
// a file that is no trust anchor passed --check-config, the start and every reload, then deferred each delivery
// through an mx upstream with 451 (dns_unavailable).
TEST_CASE("check_certificates: dns.trust_anchor_file as the resolver loads it") {
  Dir dir;
  const std::string garbage = dir.write("root.key", "this is no trust anchor\n");
  const std::string yaml = "listeners:\n"
                           "  - {name: out, address: \"127.0.0.1:2525\", direction: outbound, upstream: internet}\n"
                           "upstreams:\n"
                           "  - {name: internet, mx: true}\n"
                           "dns:\n"
                           "  trust_anchor_file: " + garbage + "\n";
  const auto loaded = mailflow::config::load_config_string(yaml, "mailflowd.yaml");
  REQUIRE(loaded.errors.empty());
  const auto findings = mailflow::check_certificates(*loaded.config, std::chrono::system_clock::now());
  REQUIRE(findings.errors.size() == 1);
  CHECK(findings.errors[0].line == 6);
  CHECK(findings.errors[0].column == 22);
  CHECK(findings.errors[0].message.starts_with("dns: settings (dns.servers, dns.trust_anchor_file): "));
}

// state_dir is made at start where it is missing; a path through a regular file passed --check-config and
// then failed the start ("Not a directory").
TEST_CASE(
    "check_certificates: a state_dir whose path runs through a file is an error, a missing one is not") {
  Dir dir;
  const std::string file = dir.write("not-a-dir", "x\n");
  const auto check = [](const std::string& state_dir) {
    const std::string yaml =
        "listeners:\n"
        "  - {name: in, address: \"127.0.0.1:2525\", upstream: up}\n"
        "upstreams:\n"
        "  - {name: up, address: \"127.0.0.1:25\"}\n"
        "state_dir: " +
        state_dir + "\n";
    const auto loaded = mailflow::config::load_config_string(yaml, "mailflowd.yaml");
    REQUIRE(loaded.errors.empty());
    return mailflow::check_certificates(*loaded.config, std::chrono::system_clock::now());
  };
  for (const std::string& bad : {file, file + "/state"}) {
    CAPTURE(bad);
    const auto findings = check(bad);
    REQUIRE(findings.errors.size() == 1);
    CHECK(findings.errors[0].line == 5);
    CHECK(findings.errors[0].message == "state_dir " + bad + ": " + file + " is not a directory");
  }
  CHECK(check(dir.path.string() + "/new/state").errors.empty());
  CHECK(check(dir.path.string()).errors.empty());
}

// Start and reload set mailflow_certificate_expiry_timestamp_seconds and log the expiry warnings from what
// the listeners' contexts and the HTTP server loaded. They read every file again for it (check_certificates),
// once the reload was done: a certificate renewed in between was reported while the old one was served (or
// its series vanished, where the second read failed).
TEST_CASE(
    "served_certificates: the loaded certificates, not the files as they are now, with check_certificates' "
    "warnings") {
  Dir dir;
  const Pem loaded_pem = make_pem(std::chrono::hours(24 * 5) + 1h, "mx1.example.org");
  const Pem renewed_pem = make_pem(std::chrono::hours(24 * 90), "mx1.example.org");
  const std::string cert = dir.write("cert.pem", loaded_pem.cert);
  const std::string key = dir.write("key.pem", loaded_pem.key);
  const std::string yaml =
      "listeners:\n"
      "  - name: inbound\n"
      "    address: \"127.0.0.1:2525\"\n"
      "    upstream: up\n"
      "    tls:\n"
      "      certificates:\n"
      "        - {cert: " +
      cert + ", key: " + key +
      "}\n"
      "upstreams:\n"
      "  - {name: up, address: \"127.0.0.1:25\"}\n"
      "http:\n"
      "  tls: {cert: " +
      cert + ", key: " + key + "}\n";
  const auto loaded = mailflow::config::load_config_string(yaml, "mailflowd.yaml");
  REQUIRE(loaded.errors.empty());
  const auto now = std::chrono::system_clock::now();
  const auto checked = mailflow::check_certificates(*loaded.config, now);
  const auto runtime = mailflow::Runtime::build(loaded.config);
  mailflow::Telemetry telemetry;
  mailflow::HttpServer http(loaded.config->http, telemetry, [] { return true; });
  http.update(mailflow::HttpServer::prepare(loaded.config->http));  // as start() loads it
  REQUIRE(http.certificate().has_value());

  // The renewal lands now, after the listener and the HTTP server loaded their pair.
  dir.write("cert.pem", renewed_pem.cert);
  dir.write("key.pem", renewed_pem.key);
  const auto served = mailflow::served_certificates(*runtime, http.certificate(), now);

  REQUIRE(served.expiries.size() == 2);
  REQUIRE(checked.expiries.size() == 2);
  for (std::size_t i = 0; i < 2; ++i) {
    CHECK(served.expiries[i].listener == checked.expiries[i].listener);
    CHECK(served.expiries[i].certificate == cert);
    CHECK(served.expiries[i].not_after == checked.expiries[i].not_after);  // the loaded certificate's
  }
  CHECK(served.expiries[1].listener == "http");
  REQUIRE(served.warnings.size() == 2);  // it expires in 5 days: the same warnings, at the same places
  for (std::size_t i = 0; i < 2; ++i) {
    CHECK(served.warnings[i].to_string() == checked.warnings[i].to_string());
    CHECK(served.warnings[i].line == checked.warnings[i].line);
  }
  CHECK(served.errors.empty());
  // What the files say now is another date, which nothing serves yet.
  const auto reread = mailflow::check_certificates(*loaded.config, now);
  REQUIRE(reread.expiries.size() == 2);
  CHECK(reread.expiries[0].not_after > served.expiries[0].not_after + 80 * 86400);
  CHECK(reread.warnings.empty());
}
