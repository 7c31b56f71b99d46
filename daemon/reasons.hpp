#pragma once
// The `reason` label values of mailflow_rejects_total, mailflow_tls_handshake_failures_total,
// mailflow_upstream_errors_total and mailflow_state_errors_total: one declared vocabulary per family.
//
// Telemetry exports every reason below from the start with a zero (per listener, leg or upstream), so that
// dashboards and alert rules see the series before the first event, and tests/daemon/reasons_test.cpp fails
// when the code counts a reason that is not listed here (it reads the counting call sites in daemon/ and
// proto/). To add a reason: append it to its list (keep the comment), then count it. A reason counted without
// being listed still counts, but only shows up after its first event.
#include <algorithm>
#include <array>
#include <string_view>

namespace mailflow::reasons {

// mailflow_rejects_total{listener, reason}: every refusal of a client command, message or connection.
inline constexpr auto rejects = std::to_array<std::string_view>({
    // proto/server_session.hpp (the reply that carries each one is listed there)
    "bad_sequence",
    "no_valid_recipients",
    "unrecognized_command",
    "bad_bytes",
    "syntax_error",
    "bad_address",
    "unknown_parameter",
    "message_too_big",
    "too_many_recipients",
    "vrfy_disabled",
    "not_implemented",
    "starttls_unavailable",
    "starttls_twice",
    "line_too_long",
    "bare_newline_command",
    "too_many_bad_commands",
    "unauth_pipelining",
    // daemon/relay_session.cpp: limits at connect, PROXY header, timing, STARTTLS, DATA
    "session_limit",
    "ip_limit",
    "proxy_invalid",
    "proxy_timeout",
    "proxy_truncated",
    "proxy_untrusted",
    "early_talker",
    "timeout",
    "starttls_pipelining",
    "tls_required",
    "data_line_too_long",
    "bare_newline",
    "bare_newline_normalized",
    // proto/relay_transaction.cpp: a later RCPT whose connector or route differs from the transaction's
    // (452 4.5.3); daemon/relay_session.cpp: a message with more Received: fields than limits.max_hops
    // (554 5.4.6)
    "recipient_route",
    "too_many_hops",
    // the MX route of an mx upstream's recipient domain (daemon/mx_route.hpp MxRoute::Result, reply at RCPT)
    "null_mx",
    "nxdomain",
    "no_addresses",
    "dns_failure",
    "loop",
    "address_literal",
    "no_domain",
    // daemon/server.cpp: accept() failed (out of descriptors or memory, a security module's refusal); the
    // connection waits in the listen queue, each failed try counts (one per 100 ms pause). Not a connection
    // that went away before it was taken (daemon/accept_error.hpp): that is only logged.
    "accept_failed",
});

// mailflow_tls_handshake_failures_total{listener, leg, reason}: daemon/tls.cpp handshake_failure_reason().
// OpenSSL's reason strings in snake_case for the handshake failures seen from SMTP clients and servers;
// any other OpenSSL reason counts as "other".
inline constexpr auto tls_handshake_failures = std::to_array<std::string_view>({
    "timeout", "eof", "io_error", "other",
    // the client or server speaks something else, or too old a protocol
    "wrong_version_number", "http_request", "unknown_protocol", "unsupported_protocol", "version_too_low",
    "no_protocols_available", "tlsv1_alert_protocol_version", "inappropriate_fallback",
    // no common ground
    "no_shared_cipher", "sslv3_alert_handshake_failure", "no_suitable_signature_algorithm",
    "no_suitable_key_share", "bad_key_share", "wrong_signature_type", "dh_key_too_small", "ee_key_too_small",
    "unsafe_legacy_renegotiation_disabled", "tlsv1_unrecognized_name",
    // certificates (either side's verdict)
    "certificate_verify_failed", "tlsv1_alert_unknown_ca", "sslv3_alert_bad_certificate",
    "sslv3_alert_certificate_unknown", "sslv3_alert_certificate_expired",
    // broken or cut-off records
    "unexpected_eof_while_reading", "packet_length_too_long", "bad_packet_length", "record_length_mismatch",
    "length_mismatch", "decryption_failed_or_bad_record_mac", "unexpected_message", "unexpected_record",
    "tlsv1_alert_decode_error", "tlsv1_alert_decrypt_error", "tlsv1_alert_internal_error",
});

// mailflow_upstream_errors_total{upstream, reason}: daemon/upstream_leg.cpp, and the `reason` of
// proto::ClientSession's fail actions (proto/client_session.hpp).
inline constexpr auto upstream_errors = std::to_array<std::string_view>({
    "connect_failed", "connect_timeout", "connection_lost", "timeout", "protocol", "tls_failed", "tls_policy",
    "starttls_pipelining", "rset_rejected",
    // daemon/upstream_leg.cpp connect_failure_reason(): the socket could not be made or connected for a
    // reason of this host's (EMFILE, ENFILE, ENOBUFS, ENOMEM, EADDRNOTAVAIL: out of descriptors, memory or
    // ephemeral ports); no failure of the upstream's, so MailflowUpstreamDown leaves it out. Also an MTA-STS
    // policy fetch that failed so (or mta_sts.ca_file unreadable): daemon/upstream_leg.cpp open_mx()
    "local_resources",
    // timeouts.upstream_open passed while an upstream was being opened (DNS, MTA-STS, the connect
    // attempts, their setup): once per open, its RCPT gets 451 4.4.2
    "open_timeout",
    // proto/client_session.cpp (xclient_rejected: XCLIENT answered 421, the upstream's goodbye)
    "greeting_rejected", "ehlo_rejected", "starttls_unavailable", "starttls_rejected", "xclient_rejected",
});

// mailflow_mx_attempts_total{upstream, result}: one per connection attempt to an MX host (mx upstreams),
// daemon/upstream_leg.cpp.
inline constexpr auto mx_attempts = std::to_array<std::string_view>({
    "success", "connect_failed", "connect_timeout", "banner_rejected", "tls_failed", "tls_policy", "failed",
    "open_timeout",  // cut short by timeouts.upstream_open: the walk ends there
    // no socket to try the host with (out of descriptors, ...: connect_failure_reason()): not the host's
    "local_resources",
});

// mailflow_outbound_policy_total{connector, policy, result}: policy is one of outbound_policies; result is
// "success" or an RFC 8460 result type (proto::tlsrpt::to_string(ResultType), e.g. "sts-policy-fetch-error").
inline constexpr auto outbound_policies = std::to_array<std::string_view>({"dane", "mta-sts", "none"});

// mailflow_tlsrpt_deliveries_total{method, result}: one per TLS-RPT report and rua address tried
// (daemon/tlsrpt_sender.cpp); gave_up: still failing after tlsrpt.retry_for (the report is then dropped);
// skipped: not tried in a run where an earlier try of the same https host and port, or of the same mailto:
// mail domain, timed out.
inline constexpr auto tlsrpt_methods = std::to_array<std::string_view>({"mailto", "https"});
inline constexpr auto tlsrpt_results = std::to_array<std::string_view>(
    {"success", "temporary_failure", "permanent_failure", "gave_up", "skipped"});

// The listener and upstream label of mailflowd's own TLS-RPT report mails (tlsrpt.send; daemon/tlsrpt_sender.cpp):
// mailflow_sessions_total{listener="tlsrpt",leg="upstream"}, mailflow_mx_attempts_total{upstream="tlsrpt"},
// mailflow_upstream_errors_total{upstream="tlsrpt"}, mailflow_tls_handshake_failures_total{listener="tlsrpt",
// leg="upstream"}; exported from the start while tlsrpt.send is true.
inline constexpr std::string_view tlsrpt_sessions = "tlsrpt";

// mailflow_state_errors_total{reason}: the files in state_dir (daemon/telemetry.cpp, server.cpp,
// tlsrpt_sender.cpp).
// save_skipped: the minute's save came while the previous one was still being written (a slow disk).
inline constexpr auto state_errors =
    std::to_array<std::string_view>({"corrupt", "save_failed", "save_skipped"});

template <std::size_t N>
constexpr bool is_listed(const std::array<std::string_view, N>& list, std::string_view reason) {
  return std::find(list.begin(), list.end(), reason) != list.end();
}

// mailflow_tls_handshake_refused_total{listener, connector, offered}: the highest version a client offered in a
// client-leg handshake that failed (daemon/tls.cpp offered_tls_version()); not reasons, but a closed vocabulary
// exported the same way. "other": SSL3 or no version we know; "no_hello": no ClientHello was parsed.
inline constexpr auto tls_offered =
    std::to_array<std::string_view>({"TLS1.0", "TLS1.1", "TLS1.2", "TLS1.3", "other", "no_hello"});

}  // namespace mailflow::reasons
