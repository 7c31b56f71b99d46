#include "daemon/tls.hpp"

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include <algorithm>
#include <cctype>
#include <cstdint>
#include <ctime>
#include <stdexcept>

#include "daemon/reasons.hpp"
#include "daemon/ticket_keys.hpp"

namespace mailflow {
namespace {

std::string openssl_error_text() {
  unsigned long code = ERR_get_error();
  ERR_clear_error();
  if (code == 0) return "unknown OpenSSL error";
  char buffer[256];
  ERR_error_string_n(code, buffer, sizeof buffer);
  return buffer;
}

int to_openssl_version(proto::TlsVersion version) {
  switch (version) {
    case proto::TlsVersion::tls10:
      return TLS1_VERSION;
    case proto::TlsVersion::tls11:
      return TLS1_1_VERSION;
    case proto::TlsVersion::tls12:
      return TLS1_2_VERSION;
    case proto::TlsVersion::tls13:
      return TLS1_3_VERSION;
    case proto::TlsVersion::none:
      break;
  }
  return TLS1_VERSION;
}

// SSL ex_data slot for the highest version a client offered (0: no ClientHello seen).
int offered_index() {
  static const int index = SSL_get_ex_new_index(0, nullptr, nullptr, nullptr, nullptr);
  return index;
}

bool known_version(unsigned version) { return version >= SSL3_VERSION && version <= TLS1_3_VERSION; }

// The server name a client asked for, without one trailing dot: "mx.example.org." names the same host as
// "mx.example.org" (RFC 6066 3 says SNI carries no trailing dot, but clients send it). Certificates and
// connectors' `sni:` patterns are matched against it, and it is what is recorded. Empty without SNI.
std::string_view server_name(const SSL* ssl) {
  const char* name = SSL_get_servername(ssl, TLSEXT_NAMETYPE_host_name);
  std::string_view view = name == nullptr ? std::string_view() : std::string_view(name);
  if (view.ends_with('.')) view.remove_suffix(1);
  return view;
}

}  // namespace

std::string_view offered_tls_version(const SSL* ssl) {
  const auto offered =
      static_cast<unsigned>(reinterpret_cast<std::uintptr_t>(SSL_get_ex_data(ssl, offered_index())));
  switch (offered) {
    case 0:
      return "no_hello";
    case TLS1_VERSION:
      return "TLS1.0";
    case TLS1_1_VERSION:
      return "TLS1.1";
    case TLS1_2_VERSION:
      return "TLS1.2";
    case TLS1_3_VERSION:
      return "TLS1.3";
    default:
      return "other";
  }
}

// Runs before OpenSSL chooses a version, so a client refused by min_version is still known by what it offered.
int ServerTls::on_client_hello(SSL* ssl, int* /*alert*/, void* /*arg*/) {
  unsigned best = 0;
  const unsigned char* ext = nullptr;
  std::size_t len = 0;
  if (SSL_client_hello_get0_ext(ssl, TLSEXT_TYPE_supported_versions, &ext, &len) == 1 && len >= 1) {
    // RFC 8446 4.2.1: a one-byte length, then two-byte versions; GREASE and drafts are not versions.
    const std::size_t list = std::min<std::size_t>(ext[0], len - 1);
    for (std::size_t i = 1; i + 1 <= list; i += 2) {
      const unsigned version = (static_cast<unsigned>(ext[i]) << 8) | ext[i + 1];
      if (known_version(version)) best = std::max(best, version);
    }
  }
  if (best == 0) {
    const unsigned legacy = SSL_client_hello_get0_legacy_version(ssl);
    best = known_version(legacy) ? legacy : 1;  // 1: a ClientHello with no version we know ("other")
  }
  SSL_set_ex_data(ssl, offered_index(), reinterpret_cast<void*>(static_cast<std::uintptr_t>(best)));
  return SSL_CLIENT_HELLO_SUCCESS;
}

TlsInfo tls_info(const SSL* ssl) {
  TlsInfo info;
  switch (SSL_version(ssl)) {
    case TLS1_VERSION:
      info.version = proto::TlsVersion::tls10;
      break;
    case TLS1_1_VERSION:
      info.version = proto::TlsVersion::tls11;
      break;
    case TLS1_2_VERSION:
      info.version = proto::TlsVersion::tls12;
      break;
    case TLS1_3_VERSION:
      info.version = proto::TlsVersion::tls13;
      break;
    default:
      info.version = proto::TlsVersion::none;
      break;
  }
  if (const char* cipher = SSL_get_cipher_name(ssl)) info.cipher = cipher;
  info.sni = server_name(ssl);
  if (!SSL_is_server(ssl)) info.verify_error = SSL_get_verify_result(ssl);
  return info;
}

std::string handshake_failure_reason(unsigned long openssl_error, bool timed_out, bool eof) {
  if (timed_out) return "timeout";
  if (openssl_error == 0) return eof ? "eof" : "io_error";
  const char* reason = ERR_reason_error_string(openssl_error);
  if (reason == nullptr) return "other";
  std::string label;
  for (const char* p = reason; *p != '\0' && label.size() < 48; ++p) {
    unsigned char c = static_cast<unsigned char>(*p);
    label += std::isalnum(c) ? static_cast<char>(std::tolower(c)) : '_';
  }
  // The declared vocabulary only (daemon/reasons.hpp): every series exists from the start, and a rare OpenSSL
  // reason cannot add series of its own.
  return reasons::is_listed(reasons::tls_handshake_failures, label) ? label : "other";
}

namespace {
// OpenSSL's default asks for a passphrase on the controlling terminal: a reload started from one waited there
// with the event loop held, and without one the error said only "UI routines::processing error". Never asked:
// a flag says that the key wanted one.
int refuse_passphrase(char*, int, int, void* asked) {
  if (asked != nullptr) *static_cast<bool*>(asked) = true;
  return 0;
}
}  // namespace

void use_private_key_file(SSL_CTX* ctx, const std::string& key, const std::string& cert) {
  bool asked = false;
  SSL_CTX_set_default_passwd_cb(ctx, &refuse_passphrase);
  SSL_CTX_set_default_passwd_cb_userdata(ctx, &asked);
  const int loaded = SSL_CTX_use_PrivateKey_file(ctx, key.c_str(), SSL_FILETYPE_PEM);
  SSL_CTX_set_default_passwd_cb_userdata(ctx, nullptr);
  if (loaded != 1) {
    if (asked) {
      ERR_clear_error();
      throw std::runtime_error("key " + key +
                               " is encrypted: mailflowd cannot ask for its passphrase; store it unencrypted "
                               "(openssl pkey -in KEY -out KEY.new), readable only by root and mailflowd");
    }
    // OpenSSL compares the key with the certificate while loading it: say which two do not belong together.
    const unsigned long code = ERR_peek_last_error();
    if (ERR_GET_LIB(code) == ERR_LIB_X509 && ERR_GET_REASON(code) == X509_R_KEY_VALUES_MISMATCH) {
      ERR_clear_error();
      throw std::runtime_error("key " + key + " does not match certificate " + cert +
                               " (key values mismatch)");
    }
    throw std::runtime_error("cannot load key " + key + ": " + openssl_error_text());
  }
  if (SSL_CTX_check_private_key(ctx) != 1)
    throw std::runtime_error("key " + key + " does not match certificate " + cert);
}

namespace {
std::string set_cipher_list(SSL_CTX* ctx, const std::string& ciphers) {
  if (SSL_CTX_set_cipher_list(ctx, ciphers.c_str()) == 1) return {};
  return "invalid ciphers '" + ciphers + "': " + openssl_error_text();
}
}  // namespace

std::string cipher_list_problem(const std::string& ciphers) {
  SSL_CTX* ctx = SSL_CTX_new(TLS_server_method());
  if (ctx == nullptr) return "SSL_CTX_new: " + openssl_error_text();
  std::string problem = set_cipher_list(ctx, ciphers);
  SSL_CTX_free(ctx);
  return problem;
}

struct ServerTls::Entry {
  SSL_CTX* ctx = nullptr;
  X509* leaf = nullptr;  // owned by ctx
  std::string cert_path;
  ~Entry() { SSL_CTX_free(ctx); }
};

ServerTls::ServerTls(const config::ListenerTls& tls, std::string_view listener) {
  // All listeners share the ticket keys (TicketKeys::process()), and without a session ID context of its own
  // a listener resumed any listener's session (ticket or cache): a client could resume, on a listener with
  // another certificate, a session authenticated by the first one's. The context is the listener's name
  // (hashed: it may be longer than SSL_MAX_SID_CTX_LENGTH), the same for all its certificates, so that the
  // SNI callback's switch to another certificate's context leaves it as it is; and the same across reloads,
  // which keep the keys.
  unsigned char sid_context[EVP_MAX_MD_SIZE];
  unsigned int sid_length = 0;
  const std::string sid_input = "mailflowd listener " + std::string(listener);
  if (EVP_Digest(sid_input.data(), sid_input.size(), sid_context, &sid_length, EVP_sha256(), nullptr) != 1)
    throw std::runtime_error("session id context: " + openssl_error_text());
  for (const auto& pair : tls.certificates) {
    auto entry = std::make_unique<Entry>();
    entry->ctx = SSL_CTX_new(TLS_server_method());
    if (entry->ctx == nullptr) throw std::runtime_error("SSL_CTX_new: " + openssl_error_text());
    SSL_CTX* ctx = entry->ctx;
    // Legacy versions must stay negotiable: measuring who still uses them is the point.
    SSL_CTX_set_min_proto_version(ctx, to_openssl_version(tls.min_version));
    SSL_CTX_set_max_proto_version(ctx, 0);
    SSL_CTX_set_options(ctx,
                        SSL_OP_NO_COMPRESSION | SSL_OP_NO_RENEGOTIATION | SSL_OP_CIPHER_SERVER_PREFERENCE);
    SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS);
    if (const std::string problem = set_cipher_list(ctx, tls.ciphers); !problem.empty())
      throw std::runtime_error(problem);
    if (SSL_CTX_use_certificate_chain_file(ctx, pair.cert.c_str()) != 1)
      throw std::runtime_error("cannot load certificate " + pair.cert + ": " + openssl_error_text());
    use_private_key_file(ctx, pair.key, pair.cert);
    TicketKeys::install(ctx);  // rotating ticket keys instead of one per SSL_CTX for the daemon's life
    if (SSL_CTX_set_session_id_context(ctx, sid_context,
                                       std::min(sid_length, unsigned{SSL_MAX_SID_CTX_LENGTH})) != 1)
      throw std::runtime_error("session id context: " + openssl_error_text());
    entry->leaf = SSL_CTX_get0_certificate(ctx);
    entry->cert_path = pair.cert;
    entries_.push_back(std::move(entry));
  }
  if (entries_.empty()) throw std::runtime_error("tls: no certificates");
  // Every session starts on the first context (SNI may switch it later): the ClientHello is seen there.
  SSL_CTX_set_client_hello_cb(entries_.front()->ctx, &ServerTls::on_client_hello, nullptr);
  SSL_CTX_set_tlsext_servername_callback(entries_.front()->ctx, &ServerTls::on_servername);
  SSL_CTX_set_tlsext_servername_arg(entries_.front()->ctx, this);
}

ServerTls::~ServerTls() = default;

SSL_CTX* ServerTls::context() const { return entries_.front()->ctx; }

CertificateInfo certificate_info(const SSL_CTX* ctx, std::string cert_path) {
  CertificateInfo info;
  info.cert_path = std::move(cert_path);
  const X509* leaf = SSL_CTX_get0_certificate(ctx);
  if (leaf == nullptr) return info;
  const X509_NAME* subject = X509_get_subject_name(leaf);
  const int index = X509_NAME_get_index_by_NID(subject, NID_commonName, -1);
  if (index >= 0) {
    const ASN1_STRING* cn = X509_NAME_ENTRY_get_data(X509_NAME_get_entry(subject, index));
    info.subject.assign(reinterpret_cast<const char*>(ASN1_STRING_get0_data(cn)),
                        static_cast<std::size_t>(ASN1_STRING_length(cn)));
  }
  std::tm tm{};
  if (ASN1_TIME_to_tm(X509_get0_notAfter(leaf), &tm) == 1) info.not_after = timegm(&tm);
  return info;
}

std::vector<CertificateInfo> ServerTls::certificates() const {
  std::vector<CertificateInfo> out;
  for (const auto& entry : entries_) out.push_back(certificate_info(entry->ctx, entry->cert_path));
  return out;
}

int ServerTls::on_servername(SSL* ssl, int*, void* arg) {
  const auto* self = static_cast<const ServerTls*>(arg);
  const std::string_view name = server_name(ssl);
  if (name.empty()) return SSL_TLSEXT_ERR_OK;
  for (const auto& entry : self->entries_) {
    if (X509_check_host(entry->leaf, name.data(), name.size(), 0, nullptr) == 1) {
      if (entry.get() != self->entries_.front().get()) SSL_set_SSL_CTX(ssl, entry->ctx);
      return SSL_TLSEXT_ERR_OK;
    }
  }
  return SSL_TLSEXT_ERR_OK;  // unknown name: the default certificate answers
}

TrustStores::TrustStores(std::string webpki_ca_file) : webpki_ca_file_(std::move(webpki_ca_file)) {}

TrustStores::~TrustStores() {
  for (auto& [key, entry] : stores_) X509_STORE_free(entry.store);
}

X509_STORE* TrustStores::web_pki() const { return get(webpki_ca_file_, "the Web PKI trust store"); }

X509_STORE* TrustStores::ca_file(const std::string& path) const { return get(path, "ca_file"); }

// `path` empty: the system's default locations.
X509_STORE* TrustStores::get(const std::string& path, const std::string& what) const {
  Store& entry = stores_[what + "\n" + path];
  if (entry.store == nullptr && entry.error.empty()) {
    entry.store = X509_STORE_new();
    const bool loaded =
        entry.store != nullptr && (path.empty() ? X509_STORE_set_default_paths(entry.store) == 1
                                                : X509_STORE_load_file(entry.store, path.c_str()) == 1);
    if (!loaded) {
      entry.error = "cannot load " + what + " " + (path.empty() ? std::string("(system default)") : path) +
                    ": " + openssl_error_text();
      X509_STORE_free(entry.store);
      entry.store = nullptr;
    }
  }
  if (entry.store == nullptr) throw std::runtime_error(entry.error);
  return entry.store;
}

ClientTls::ClientTls(const config::Upstream& upstream, const TrustStores& stores)
    : verify_(upstream.tls == config::UpstreamTls::verify) {
  ctx_ = SSL_CTX_new(TLS_client_method());
  if (ctx_ == nullptr) throw std::runtime_error("SSL_CTX_new: " + openssl_error_text());
  SSL_CTX_set_options(ctx_, SSL_OP_NO_COMPRESSION | SSL_OP_NO_RENEGOTIATION);
  SSL_CTX_set_mode(ctx_, SSL_MODE_RELEASE_BUFFERS);
  // upstreams[].min_version is not a handshake floor: every version is offered, so that a host below the
  // minimum is still measured (and named in the reply); the relay refuses it after the handshake.
  if (verify_) {
    SSL_CTX_set_min_proto_version(ctx_, TLS1_2_VERSION);
    verify_names_ = upstream.verify_names;
    try {
      SSL_CTX_set1_cert_store(ctx_, stores.ca_file(upstream.ca_file));  // shared, referenced
    } catch (...) {
      SSL_CTX_free(ctx_);
      throw;
    }
    SSL_CTX_set_verify(ctx_, SSL_VERIFY_PEER, nullptr);
    // ca_file is this upstream's own requirement (it may be a private CA); MTA-STS asks the Web PKI, as the
    // policy host's certificate is asked (mta_sts.ca_file, else the system's), whatever ca_file trusts.
    if (upstream.mta_sts != config::MtaStsMode::off) {
      try {
        webpki_store_ = stores.web_pki();
      } catch (...) {
        SSL_CTX_free(ctx_);
        throw;
      }
      X509_STORE_up_ref(webpki_store_);
    }
  } else {
    // Opportunistic/required TLS to a mail server: encryption without authentication (RFC 7435), and
    // old servers must still be reachable so that their version can be recorded.
    SSL_CTX_set_min_proto_version(ctx_, TLS1_VERSION);
    SSL_CTX_set_cipher_list(ctx_, "DEFAULT:@SECLEVEL=0");
    SSL_CTX_set_verify(ctx_, SSL_VERIFY_NONE, nullptr);
    // tls: dane: a host with usable TLSA records is verified against them, per connection (Link::handshake).
    if (upstream.tls == config::UpstreamTls::dane && SSL_CTX_dane_enable(ctx_) <= 0) {
      SSL_CTX_free(ctx_);
      throw std::runtime_error("SSL_CTX_dane_enable: " + openssl_error_text());
    }
    // MTA-STS (RFC 8461 4.2) asks whether the MX's certificate is valid for its name in the Web PKI: the
    // handshake still never fails for it (SSL_VERIFY_NONE), but the verdict is recorded (TlsInfo::verify_error).
    if (upstream.mta_sts != config::MtaStsMode::off) {
      try {
        SSL_CTX_set1_cert_store(ctx_, stores.web_pki());  // shared, referenced
      } catch (...) {
        SSL_CTX_free(ctx_);
        throw;
      }
      check_names_ = true;
    }
  }
}

bool tlsa_data_loads(const proto::TlsaRecord& record) {
  if (record.matching != 0) return true;
  const auto* data = reinterpret_cast<const unsigned char*>(record.data.data());
  const auto size = static_cast<long>(record.data.size());
  const unsigned char* end = data;
  bool loaded = false;
  if (record.selector == 0) {
    X509* cert = d2i_X509(nullptr, &end, size);
    loaded = cert != nullptr;
    X509_free(cert);
  } else {
    EVP_PKEY* key = d2i_PUBKEY(nullptr, &end, size);
    loaded = key != nullptr;
    EVP_PKEY_free(key);
  }
  ERR_clear_error();
  return loaded && end == data + size;
}

bool dane_no_match(long verify_error) { return verify_error == X509_V_ERR_DANE_NO_MATCH; }

CertificateVerdict certificate_verdict(long verify_error) {
  switch (verify_error) {
    case X509_V_OK:
      return CertificateVerdict::valid;
    case X509_V_ERR_CERT_HAS_EXPIRED:
      return CertificateVerdict::expired;
    case X509_V_ERR_HOSTNAME_MISMATCH:
      return CertificateVerdict::host_mismatch;
    default:
      return CertificateVerdict::not_trusted;
  }
}

long ClientTls::webpki_verdict(SSL* ssl) const {
  if (webpki_store_ == nullptr) return SSL_get_verify_result(ssl);
  X509* leaf = SSL_get0_peer_certificate(ssl);
  if (leaf == nullptr) return X509_V_ERR_UNSPECIFIED;
  X509_STORE_CTX* check = X509_STORE_CTX_new();
  long verdict = X509_V_ERR_UNSPECIFIED;
  // The chain the peer sent (its leaf first, on the client side), as the handshake verified it: purpose and
  // trust of a TLS server, the current time.
  if (check != nullptr &&
      X509_STORE_CTX_init(check, webpki_store_, leaf, SSL_get_peer_cert_chain(ssl)) == 1 &&
      X509_STORE_CTX_set_default(check, "ssl_server") == 1) {
    verdict = X509_verify_cert(check) == 1 ? X509_V_OK : X509_STORE_CTX_get_error(check);
  }
  X509_STORE_CTX_free(check);
  ERR_clear_error();
  return verdict;
}

ClientTls::~ClientTls() {
  X509_STORE_free(webpki_store_);
  SSL_CTX_free(ctx_);
}

}  // namespace mailflow
