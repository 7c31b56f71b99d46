// The declared reason vocabularies (daemon/reasons.hpp) cover every reason the code counts: the counting call
// sites in daemon/ and proto/ are read from the source tree, so a reason added without declaring it fails here.
#include "daemon/reasons.hpp"

#include <doctest/doctest.h>
#include <openssl/err.h>
#include <openssl/ssl.h>

#include <filesystem>
#include <fstream>
#include <iterator>
#include <regex>
#include <set>
#include <string>
#include <vector>

#include "daemon/tls.hpp"

namespace {

std::string read_file(const std::filesystem::path& path) {
  std::ifstream in(path);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// The reason-like string literals ("lower_case") in the arguments of every call of `call` in `text`
// (`call` ends with '(' for a call, or is an assignment like "reject_reason = " that ends at ';').
std::set<std::string> literals_of_calls(const std::string& text, const std::string& call) {
  std::set<std::string> out;
  static const std::regex literal("\"([a-z][a-z0-9_]*)\"");
  for (auto at = text.find(call); at != std::string::npos; at = text.find(call, at + 1)) {
    // A call of this very name, not the tail of a longer identifier (internal_upstream_error, ...).
    if (at > 0 && (std::isalnum(static_cast<unsigned char>(text[at - 1])) || text[at - 1] == '_')) continue;
    std::size_t end = at + call.size();
    if (call.back() == '(') {
      int depth = 1;
      while (end < text.size() && depth > 0) {
        if (text[end] == '(') ++depth;
        if (text[end] == ')') --depth;
        ++end;
      }
    } else {
      end = text.find(';', end);
    }
    const std::string arguments = text.substr(at + call.size(), end - at - call.size());
    for (std::sregex_iterator it(arguments.begin(), arguments.end(), literal), last; it != last; ++it) {
      out.insert((*it)[1].str());
    }
  }
  return out;
}

struct Site {
  const char* folder;  // daemon or proto
  const char* file;    // empty: every .cpp of the folder
  const char* call;
};

std::set<std::string> counted(const std::vector<Site>& sites) {
  const std::filesystem::path root = MAILFLOW_SOURCE_DIR;
  std::set<std::string> out;
  for (const auto& site : sites) {
    for (const auto& entry : std::filesystem::directory_iterator(root / site.folder)) {
      if (entry.path().extension() != ".cpp") continue;
      if (*site.file != '\0' && entry.path().filename() != site.file) continue;
      const auto found = literals_of_calls(read_file(entry.path()), site.call);
      out.insert(found.begin(), found.end());
    }
  }
  return out;
}

template <std::size_t N>
void check_declared(const std::set<std::string>& used, const std::array<std::string_view, N>& declared,
                    const char* family) {
  for (const auto& reason : used) {
    INFO(family, ": reason \"", reason, "\" is counted but not declared in daemon/reasons.hpp");
    CHECK(mailflow::reasons::is_listed(declared, reason));
  }
}

}  // namespace

TEST_CASE("every counted reject reason is declared") {
  const auto used = counted({{"daemon", "", "count_reject("},
                             {"daemon", "", "rejected("},
                             {"proto", "server_session.cpp", "refuse("},
                             {"proto", "server_session.cpp", "reject_reason = "},
                             {"proto", "relay_transaction.cpp", "rejects_.push_back("}});
  // The scan itself works: reasons from the daemon and both protocol engines are found.
  CHECK(used.count("tls_required") == 1);
  CHECK(used.count("recipient_route") == 1);
  CHECK(used.count("ip_limit") == 1);
  CHECK(used.count("bad_sequence") == 1);
  CHECK(used.count("too_many_bad_commands") == 1);
  check_declared(used, mailflow::reasons::rejects, "mailflow_rejects_total");
}

TEST_CASE("every counted upstream error reason is declared") {
  const auto used = counted({{"daemon", "upstream_leg.cpp", "fail("},
                             {"daemon", "", "upstream_error("},
                             {"proto", "client_session.cpp", "fail("}});
  CHECK(used.count("connect_failed") == 1);
  CHECK(used.count("ehlo_rejected") == 1);
  CHECK(used.count("rset_rejected") == 1);
  check_declared(used, mailflow::reasons::upstream_errors, "mailflow_upstream_errors_total");
}

TEST_CASE("every counted state error reason is declared") {
  const auto used = counted({{"daemon", "", "state_error("}, {"daemon", "", "count_state_error("}});
  CHECK(used.count("corrupt") == 1);
  CHECK(used.count("save_failed") == 1);
  check_declared(used, mailflow::reasons::state_errors, "mailflow_state_errors_total");
}

TEST_CASE("reason lists have no duplicates") {
  const auto unique = [](const auto& list) { return std::set<std::string_view>(list.begin(), list.end()).size() == list.size(); };
  CHECK(unique(mailflow::reasons::rejects));
  CHECK(unique(mailflow::reasons::tls_handshake_failures));
  CHECK(unique(mailflow::reasons::upstream_errors));
  CHECK(unique(mailflow::reasons::state_errors));
  CHECK(unique(mailflow::reasons::tls_offered));
}

TEST_CASE("TLS handshake failure reasons are the declared OpenSSL names, anything else is other") {
  OPENSSL_init_ssl(OPENSSL_INIT_LOAD_SSL_STRINGS | OPENSSL_INIT_LOAD_CRYPTO_STRINGS, nullptr);
  const auto ssl_error = [](int reason) { return ERR_PACK(ERR_LIB_SSL, 0, reason); };
  using mailflow::handshake_failure_reason;
  CHECK(handshake_failure_reason(0, true, false) == "timeout");
  CHECK(handshake_failure_reason(0, false, true) == "eof");
  CHECK(handshake_failure_reason(0, false, false) == "io_error");
  // Every OpenSSL-derived name in the list is what OpenSSL's reason string turns into.
  const std::vector<int> codes = {
      SSL_R_WRONG_VERSION_NUMBER, SSL_R_HTTP_REQUEST, SSL_R_UNKNOWN_PROTOCOL, SSL_R_UNSUPPORTED_PROTOCOL,
      SSL_R_VERSION_TOO_LOW, SSL_R_NO_PROTOCOLS_AVAILABLE, SSL_R_TLSV1_ALERT_PROTOCOL_VERSION,
      SSL_R_INAPPROPRIATE_FALLBACK, SSL_R_NO_SHARED_CIPHER, SSL_R_SSLV3_ALERT_HANDSHAKE_FAILURE,
      SSL_R_NO_SUITABLE_SIGNATURE_ALGORITHM, SSL_R_NO_SUITABLE_KEY_SHARE, SSL_R_BAD_KEY_SHARE,
      SSL_R_WRONG_SIGNATURE_TYPE, SSL_R_DH_KEY_TOO_SMALL, SSL_R_EE_KEY_TOO_SMALL,
      SSL_R_UNSAFE_LEGACY_RENEGOTIATION_DISABLED, SSL_R_TLSV1_UNRECOGNIZED_NAME, SSL_R_CERTIFICATE_VERIFY_FAILED,
      SSL_R_TLSV1_ALERT_UNKNOWN_CA, SSL_R_SSLV3_ALERT_BAD_CERTIFICATE, SSL_R_SSLV3_ALERT_CERTIFICATE_UNKNOWN,
      SSL_R_SSLV3_ALERT_CERTIFICATE_EXPIRED, SSL_R_UNEXPECTED_EOF_WHILE_READING, SSL_R_PACKET_LENGTH_TOO_LONG,
      SSL_R_BAD_PACKET_LENGTH, SSL_R_RECORD_LENGTH_MISMATCH, SSL_R_LENGTH_MISMATCH,
      SSL_R_DECRYPTION_FAILED_OR_BAD_RECORD_MAC, SSL_R_UNEXPECTED_MESSAGE, SSL_R_UNEXPECTED_RECORD,
      SSL_R_TLSV1_ALERT_DECODE_ERROR, SSL_R_TLSV1_ALERT_DECRYPT_ERROR, SSL_R_TLSV1_ALERT_INTERNAL_ERROR};
  std::set<std::string> produced;
  for (const int code : codes) {
    const std::string reason = handshake_failure_reason(ssl_error(code), false, false);
    CAPTURE(code);
    CHECK(reason != "other");
    CHECK(mailflow::reasons::is_listed(mailflow::reasons::tls_handshake_failures, reason));
    produced.insert(reason);
  }
  for (const auto reason : mailflow::reasons::tls_handshake_failures) {
    if (reason == "timeout" || reason == "eof" || reason == "io_error" || reason == "other") continue;
    CAPTURE(reason);
    CHECK(produced.count(std::string(reason)) == 1);  // a declared name OpenSSL never produces would stay 0
  }
  // A reason outside the list adds no series of its own.
  CHECK(handshake_failure_reason(ssl_error(SSL_R_BAD_ECPOINT), false, false) == "other");
}
