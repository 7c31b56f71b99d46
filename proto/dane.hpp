#pragma once
// DANE for SMTP (RFC 7672) without I/O: TLSA records (RFC 6698) as they come from DNS, which of them an SMTP
// client may use, and what a set of them means for one MX host. The lookups are daemon/resolver's, the
// certificate matching OpenSSL's (SSL_dane_tlsa_add), the decision here.
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace mailflow::proto {

struct TlsaRecord {
  std::uint8_t usage = 0;     // 2: DANE-TA, 3: DANE-EE (0 and 1, PKIX-TA/EE, are not for SMTP)
  std::uint8_t selector = 0;  // 0: the whole certificate, 1: its SubjectPublicKeyInfo
  std::uint8_t matching = 0;  // 0: exact, 1: SHA2-256, 2: SHA2-512
  std::string data;           // binary
};

// The RDATA of one TLSA record; nullopt when shorter than its fixed part.
std::optional<TlsaRecord> parse_tlsa_rdata(std::string_view rdata);

// RFC 7672 3.1: an SMTP client uses DANE-TA(2) and DANE-EE(3) records with a known selector and matching type
// (and a digest of the right length); PKIX-TA(0) and PKIX-EE(1) are unusable for SMTP.
bool usable_for_smtp(const TlsaRecord& record);

// The TLSA RRset of one MX host (_PORT._tcp.HOST), as the resolver classified it.
struct TlsaAnswer {
  enum class Kind {
    records,  // NOERROR with TLSA records
    none,     // NXDOMAIN or NODATA: the host publishes none
    failed,   // SERVFAIL, timeout, a DNSSEC validation failure: the host's policy is unknown
  };
  Kind kind = Kind::failed;
  bool secure = false;  // DNSSEC-validated
  std::vector<TlsaRecord> records;
};

// What DANE asks of the connection to one MX host.
struct DanePlan {
  enum class Kind {
    none,          // DANE does not apply (insecure DNS, no TLSA): the upstream's other policy (opportunistic)
    authenticate,  // TLS is mandatory and the certificate must match one of `records`
    encrypt,       // secure TLSA records, none usable: TLS is mandatory, without authentication (RFC 7672 2.2)
    skip,          // the TLSA lookup failed: this host must not be used (RFC 7672 2.2)
  };
  Kind kind = Kind::none;
  std::vector<TlsaRecord> records;  // authenticate: the usable ones
  // authenticate, encrypt: the TLSA RRset as DNS gave it, unusable and malformed records too: the policy that
  // governs the host, which a TLS report names record by record (RFC 8460 4.1). Set by the caller.
  std::vector<TlsaRecord> rrset;
  // authenticate: the reference names (RFC 7672 3.2.2) that DANE-TA(2) records check the certificate against:
  // the TLSA base domain first (also the SNI name, RFC 7672 8.1), then, where the MX host name is an alias, the
  // other of the host name and its CNAME expansion. Set by the caller, which knows the names.
  std::vector<std::string> names;
  std::string_view why;  // for logs
};

// `host_secure`: the MX RRset and the host's address records were DNSSEC-validated (RFC 7672 2.2.1, 2.2.2;
// without that no TLSA lookup is made and `answer` is null).
DanePlan plan_dane(bool host_secure, const TlsaAnswer* answer);

std::string_view to_string(DanePlan::Kind kind);  // none, authenticate, encrypt, skip

}  // namespace mailflow::proto
