#pragma once
// OpenSSL contexts built from a config snapshot: one server context per listener (SNI picks among its
// certificates) and one client context per upstream. Built at start and on reload; a failure to load a
// certificate is a startup error / a refused reload.
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "config/config.hpp"
#include "proto/dane.hpp"
#include "proto/tls_version.hpp"

typedef struct ssl_st SSL;
typedef struct ssl_ctx_st SSL_CTX;
typedef struct x509_store_st X509_STORE;

namespace mailflow {

// What a finished handshake negotiated.
struct TlsInfo {
  proto::TlsVersion version = proto::TlsVersion::none;
  std::string cipher;
  std::string sni;  // server name the client asked for (client leg)
  // Client leg: OpenSSL's verdict on the server's certificate (X509_V_OK = 0), recorded even where the
  // handshake does not require it; meaningful against a trust store (ClientTls::check_names()). Also set when
  // the handshake failed (Link::handshake), so that a refused certificate's reason is known.
  long verify_error = -1;
};
TlsInfo tls_info(const SSL* ssl);

// A short, bounded label for mailflow_tls_handshake_failures_total{reason}: OpenSSL's reason string in
// snake_case ("unsupported_protocol", "no_shared_cipher", "certificate_verify_failed", ...) when it is one
// of reasons::tls_handshake_failures (daemon/reasons.hpp), else "other"; or "eof"/"io_error"/"timeout".
std::string handshake_failure_reason(unsigned long openssl_error, bool timed_out, bool eof);

// The highest TLS version a client offered in its ClientHello (supported_versions, else legacy_version), as
// recorded on a server-side SSL by ServerTls's ClientHello callback: "TLS1.0".."TLS1.3", "other" (SSL3 or
// unknown), or "no_hello" when no ClientHello was parsed (a timeout, garbage, not TLS at all). One of
// reasons::tls_offered; the label of mailflow_tls_handshake_refused_total{offered}.
std::string_view offered_tls_version(const SSL* ssl);

// Loads the PEM private key `key` into `ctx`, whose certificate `cert` is loaded already; never asks for a
// passphrase. Throws std::runtime_error that says what is wrong: unreadable, encrypted, or not the key of
// `cert`.
void use_private_key_file(SSL_CTX* ctx, const std::string& key, const std::string& cert);

// Why OpenSSL refuses `ciphers` as a listener's cipher list ("invalid ciphers '...': ..."); empty when it
// takes it.
std::string cipher_list_problem(const std::string& ciphers);

// What a loaded certificate says about itself (the leaf of a chain file).
struct CertificateInfo {
  std::string cert_path;      // as configured
  std::string subject;        // the subject's CN, empty when it has none
  std::int64_t not_after = 0; // notAfter as unix seconds
};
// What `ctx` serves: the leaf it holds (SSL_CTX_use_certificate_chain_file's first), as loaded, with the path
// of the file it came from.
CertificateInfo certificate_info(const SSL_CTX* ctx, std::string cert_path);

class ServerTls {
 public:
  // Throws std::runtime_error naming the file when a certificate or key cannot be loaded. `listener`: the
  // listener's name, its session ID context (a session resumes only on the listener that made it).
  ServerTls(const config::ListenerTls& tls, std::string_view listener);
  ~ServerTls();
  ServerTls(const ServerTls&) = delete;
  ServerTls& operator=(const ServerTls&) = delete;

  SSL_CTX* context() const;  // the default context; SNI switches the SSL to another certificate's context
  // What it serves, as loaded (the expiry gauge and warnings), in configuration order.
  std::vector<CertificateInfo> certificates() const;

 private:
  struct Entry;
  std::vector<std::unique_ptr<Entry>> entries_;
  static int on_servername(SSL* ssl, int* alert, void* arg);
  static int on_client_hello(SSL* ssl, int* alert, void* arg);
};

// A recorded certificate verdict, in the words TLS-RPT reports it with.
enum class CertificateVerdict { valid, expired, host_mismatch, not_trusted };
CertificateVerdict certificate_verdict(long verify_error);
// OpenSSL's DANE found no TLSA record that matches the chain (X509_V_ERR_DANE_NO_MATCH); any other error of a
// DANE handshake comes from a chain that a record did match (DANE-TA) and failed a check of its own.
bool dane_no_match(long verify_error);

// Whether OpenSSL can load a TLSA record's data: a full certificate or key (matching type 0) must be one DER
// object, exactly (a digest's length is proto::usable_for_smtp's check). SSL_dane_tlsa_add leaves out a
// record that fails this, and a handshake left without records verifies against the Web PKI instead of DANE.
bool tlsa_data_loads(const proto::TlsaRecord& record);

// The trust stores of the upstreams' contexts, each file loaded at most once however many upstreams use it:
// the Web PKI that MTA-STS verdicts are made against (mta_sts.ca_file, empty: the system's) and each tls:
// verify upstream's ca_file (the system bundle by default). OpenSSL 3 takes some 50 ms to load the system
// bundle (it parses each of its ~140 certificates), which every such upstream paid at every start, reload and
// --check-config, on the event loop that accepts and relays. Not thread-safe while loading; the stores it
// gives are (OpenSSL locks them), and every ClientTls made from them holds references of its own.
class TrustStores {
 public:
  explicit TrustStores(std::string webpki_ca_file = {});
  ~TrustStores();
  TrustStores(const TrustStores&) = delete;
  TrustStores& operator=(const TrustStores&) = delete;

  // Loaded at the first call; throw std::runtime_error when the file cannot be loaded (at every call, with
  // the same message).
  X509_STORE* web_pki() const;
  X509_STORE* ca_file(const std::string& path) const;

 private:
  struct Store {
    X509_STORE* store = nullptr;
    std::string error;
  };
  X509_STORE* get(const std::string& path, const std::string& what) const;

  std::string webpki_ca_file_;
  mutable std::map<std::string, Store> stores_;  // by "what\npath"
};

class ClientTls {
 public:
  // verify: the upstream's certificate must chain to ca_file and match its host name. With
  // upstreams[].mta_sts on, the Web PKI trust store records a verdict for every handshake. Both from
  // `stores`.
  ClientTls(const config::Upstream& upstream, const TrustStores& stores);
  // With stores of its own (`webpki_ca_file`, empty: the system's).
  explicit ClientTls(const config::Upstream& upstream, const std::string& webpki_ca_file = {})
      : ClientTls(upstream, TrustStores(webpki_ca_file)) {}
  ~ClientTls();
  ClientTls(const ClientTls&) = delete;
  ClientTls& operator=(const ClientTls&) = delete;

  SSL_CTX* context() const { return ctx_; }
  bool verify() const { return verify_; }
  // verify: the names the certificate must match (upstreams[].verify_names); empty: the host connected to.
  const std::vector<std::string>& verify_names() const { return verify_names_; }
  // The host name is set on every connection so that the recorded verdict covers it (MTA-STS).
  bool check_names() const { return check_names_; }
  // After a handshake on `ssl`: the MTA-STS verdict on the peer's chain (RFC 8461 4.2), X509_V_OK or why not,
  // always against the Web PKI trust store (`webpki_ca_file`). Without verify that is the handshake's own
  // verdict; with verify the handshake checked ca_file, so the chain is verified again here (its name is
  // Link::certificate_matches's check).
  long webpki_verdict(SSL* ssl) const;

 private:
  SSL_CTX* ctx_ = nullptr;
  X509_STORE* webpki_store_ = nullptr;  // verify with mta_sts on: the Web PKI, apart from ca_file
  bool verify_ = false;
  bool check_names_ = false;
  std::vector<std::string> verify_names_;
};

}  // namespace mailflow
