// libunbound behind an awaitable API; see resolver.hpp for the thread model.
#include "daemon/resolver.hpp"

#include <fcntl.h>
#include <unbound-event.h>
#include <unbound.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>
#include <boost/asio/redirect_error.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <deque>
#include <iterator>
#include <list>
#include <mutex>
#include <new>
#include <optional>
#include <random>
#include <set>
#include <stdexcept>

#include "daemon/failpoint.hpp"
#include "daemon/log.hpp"
#include "daemon/telemetry.hpp"
#include "proto/ascii.hpp"
#include "proto/hosts_file.hpp"
#include "proto/trust_anchor.hpp"

namespace mailflow {

namespace net = boost::asio;

std::string_view to_string(DnsType type) {
  switch (type) {
    case DnsType::mx:
      return "MX";
    case DnsType::a:
      return "A";
    case DnsType::aaaa:
      return "AAAA";
    case DnsType::tlsa:
      return "TLSA";
    case DnsType::txt:
      return "TXT";
    case DnsType::ptr:
      return "PTR";
  }
  return "MX";
}

std::string_view to_string(DnsOutcome outcome) {
  switch (outcome) {
    case DnsOutcome::success:
      return "success";
    case DnsOutcome::nodata:
      return "nodata";
    case DnsOutcome::nxdomain:
      return "nxdomain";
    case DnsOutcome::servfail:
      return "servfail";
    case DnsOutcome::timeout:
      return "timeout";
    case DnsOutcome::bogus:
      return "bogus";
    case DnsOutcome::error:
      return "error";
    case DnsOutcome::local_resources:
      return "local_resources";
  }
  return "error";
}

bool is_temporary(DnsOutcome outcome) {
  return outcome == DnsOutcome::servfail || outcome == DnsOutcome::timeout || outcome == DnsOutcome::bogus ||
         outcome == DnsOutcome::error || outcome == DnsOutcome::local_resources;
}

std::string_view to_string(MxResult::Status status) {
  switch (status) {
    case MxResult::Status::hosts:
      return "hosts";
    case MxResult::Status::null_mx:
      return "null_mx";
    case MxResult::Status::nxdomain:
      return "nxdomain";
    case MxResult::Status::failed:
      return "failed";
  }
  return "failed";
}

std::string_view to_string(AddressResult::Status status) {
  switch (status) {
    case AddressResult::Status::addresses:
      return "addresses";
    case AddressResult::Status::none:
      return "none";
    case AddressResult::Status::failed:
      return "failed";
  }
  return "failed";
}

namespace {

constexpr int kClassIn = 1;
constexpr int kTypeA = 1;
constexpr int kTypeMx = 15;
constexpr int kTypeAaaa = 28;
constexpr int kRcodeServfail = 2;
constexpr int kRcodeNxdomain = 3;

int rrtype(DnsType type) {
  switch (type) {
    case DnsType::mx:
      return kTypeMx;
    case DnsType::a:
      return kTypeA;
    case DnsType::aaaa:
      return kTypeAaaa;
    case DnsType::tlsa:
      return 52;
    case DnsType::txt:
      return 16;
    case DnsType::ptr:
      return 12;
  }
  return kTypeA;
}

// A host name in DNS wire format (uncompressed, as libunbound hands out rdata) as text without the final
// dot: "\3mx1\7example\3net\0" -> "mx1.example.net"; the root -> "". nullopt when malformed, or when a label
// holds anything but letters, digits, '-' and '_': an MX or PTR target is a host name, and a name with other
// bytes (a control character, a newline, a comma) is no host to connect to, nor one to print in a report or a
// log (Postfix drops such records as "malformed domain name in resource data" too).
std::optional<std::string> wire_name(const unsigned char* data, std::size_t size) {
  std::string out;
  std::size_t at = 0;
  while (at < size) {
    const std::size_t length = data[at++];
    if (length == 0) return out;
    if (length > 63 || at + length > size) return std::nullopt;
    if (!out.empty()) out += '.';
    for (std::size_t i = at; i < at + length; ++i) {
      const unsigned char c = data[i];
      const bool host_byte = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                             c == '-' || c == '_';
      if (!host_byte) return std::nullopt;
      out += static_cast<char>(c);
    }
    at += length;
  }
  return std::nullopt;  // no terminating root label
}

// libunbound's canonname of an answer (set only when a CNAME led elsewhere), lower-case and without the final
// dot; "" when there is none or it is `name` itself.
std::string canonical_name(std::string_view name, const ub_result* result) {
  if (result == nullptr || result->canonname == nullptr) return {};
  std::string canonical = proto::dns_name_key(result->canonname);
  return canonical == proto::dns_name_key(name) ? std::string() : canonical;
}

}  // namespace

std::optional<std::string> join_txt_rdata(std::string_view rdata) {
  std::string out;
  std::size_t at = 0;
  while (at < rdata.size()) {
    const std::size_t length = static_cast<unsigned char>(rdata[at++]);
    if (at + length > rdata.size()) return std::nullopt;
    out.append(rdata.substr(at, length));
    at += length;
  }
  return out;
}

// --------------------------------------------------------------------------------------------------------------
// libunbound's own messages ("error: can't create socket: Too many open files", about five per lookup at the
// descriptor limit) go into mailflowd's log as dns_library events, in its format and rate-limited: written to
// standard error as they were, they broke log.format json's one object per line, and a broken network could
// flood the journal with them. libunbound 1.17 keeps the file it logs to in one process-wide variable
// (ub_ctx_debugout sets it, each context sets it again when it is first used), and ub_ctx_delete of any
// context that set it resets it to none, so a keeper context that is never deleted sets it back after each
// delete. Both are serialised by library_log_mutex, so that no context is made while it is reset
// (ub_ctx_create then points the variable at standard error again). So is a context's first use, which sets
// up more of that process-wide state (context_finalize: the log file again, and listen_setup_locks' global
// mutexes, which ub_ctx_delete of any context destroys): one loop set up its context while another deleted
// one, and the two initialised and destroyed the same mutexes at once (found by the tsan preset).
namespace {

std::mutex library_log_mutex;

// The text of one line libunbound wrote, "[1733450000] libunbound[1234:0] error: ...", without its time and
// ident.
std::string_view library_message(std::string_view line) {
  if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
  if (!line.starts_with('[')) return line;
  const auto time_end = line.find("] ");
  if (time_end == std::string_view::npos) return line;
  const auto ident_end = line.find("] ", time_end + 2);
  if (ident_end == std::string_view::npos) return line;
  return line.substr(ident_end + 2);
}

// libunbound that cannot make the socket for a query (out of descriptors, memory, buffers) says so in its log
// ("can't create socket: Too many open files" for UDP, "outgoing tcp: socket: ... for 192.0.2.53 port 53")
// and answers SERVFAIL, as for a name server that failed: its message is what tells the two apart. It is
// written by the context's worker before the answer, so a query whose SERVFAIL comes after a message that
// came while it was in flight is taken for one that could not be sent (Impl::finish). The message may be
// another context's (libunbound logs to one process-wide file): that loop was short of the same process's
// descriptors. Before, a socket made on the loop after the answer was the test, and a descriptor freed in
// between (a session that ended) made such a query the name servers' SERVFAIL, the context not replaced with
// libunbound's cache holding it.
std::atomic<std::uint64_t> library_socket_failures{0};
std::mutex library_socket_failure_mutex;
std::string library_socket_failure;  // the reason libunbound gave last ("Too many open files")

void note_socket_failure(std::string_view message) {
  std::string_view reason;
  for (const std::string_view marker : {"can't create socket: ", "outgoing tcp: socket: "}) {
    if (const auto at = message.find(marker); at != std::string_view::npos) {
      reason = message.substr(at + marker.size());
      reason = reason.substr(0, reason.find(" for "));  // the TCP message's "for ADDRESS port N"
      break;
    }
  }
  if (reason.empty()) return;
  {
    std::lock_guard lock(library_socket_failure_mutex);
    library_socket_failure.assign(reason.substr(0, 200));
  }
  library_socket_failures.fetch_add(1, std::memory_order_release);
}

// Why libunbound last could not make a socket, when it said so after it had said so `count` times in all.
std::optional<std::string> socket_failure_since(std::uint64_t count) {
  if (library_socket_failures.load(std::memory_order_acquire) == count) return std::nullopt;
  std::lock_guard lock(library_socket_failure_mutex);
  return library_socket_failure;
}

// The FILE's cookie: what libunbound's threads write, cut into lines (a line may come in several writes).
struct LibraryLog {
  static constexpr std::size_t max_line = 4096;
  std::mutex mutex;
  std::string pending;

  void write(std::string_view data) {
    std::lock_guard lock(mutex);
    pending.append(data);
    std::size_t start = 0;
    for (std::size_t end; (end = pending.find('\n', start)) != std::string::npos; start = end + 1)
      emit(std::string_view(pending).substr(start, end - start));
    pending.erase(0, start);
    if (pending.size() > max_line) {
      emit(pending);
      pending.clear();
    }
  }
  static void emit(std::string_view line) {
    const std::string_view message = library_message(line);
    if (message.empty()) return;
    note_socket_failure(message);
    log_limited(LogLevel::warn, "dns_library", {{"message", message.substr(0, max_line)}});
  }
};

// Made once, never closed or freed: libunbound's threads may write to it until the process ends. The cookie
// lives in static storage and is never destroyed (no static destructor runs under a writing thread at exit),
// so that it stays reachable: glibc keeps the cookie where LeakSanitizer does not look, and a heap one was
// reported as leaked by every test that made a resolver.
FILE* library_log_file() {
  static FILE* const file = [] {
    alignas(LibraryLog) static unsigned char storage[sizeof(LibraryLog)];
    static LibraryLog* const log = new (storage) LibraryLog;
    cookie_io_functions_t io{};
    io.write = [](void* cookie, const char* data, std::size_t size) -> ssize_t {
      static_cast<LibraryLog*>(cookie)->write(std::string_view(data, size));
      return static_cast<ssize_t>(size);
    };
    FILE* made = ::fopencookie(log, "w", io);
    if (made != nullptr) std::setvbuf(made, nullptr, _IOLBF, 0);
    return made;
  }();
  return file;
}

// Holds the process-wide setting between deletes; no descriptor, never used for a lookup, never deleted. Made
// again at the next call if it could not be made (out of memory). Called under library_log_mutex.
ub_ctx* library_log_keeper() {
  static ub_ctx* keeper = nullptr;
  if (keeper == nullptr) keeper = ub_ctx_create_ub_event(nullptr);
  return keeper;
}

// ub_ctx_create, with libunbound's messages routed into the log. Null if the context cannot be made.
ub_ctx* create_context() {
  std::lock_guard lock(library_log_mutex);
  FILE* file = library_log_file();
  ub_ctx* keeper = library_log_keeper();
  if (file != nullptr && keeper != nullptr) ub_ctx_debugout(keeper, file);
  ub_ctx* ctx = ub_ctx_create();
  if (ctx != nullptr && file != nullptr) ub_ctx_debugout(ctx, file);
  return ctx;
}

void delete_context(ub_ctx* ctx) {
  std::lock_guard lock(library_log_mutex);
  ub_ctx_delete(ctx);
  FILE* file = library_log_file();
  ub_ctx* keeper = library_log_keeper();
  if (file != nullptr && keeper != nullptr) ub_ctx_debugout(keeper, file);
}

// The context's first lookup, which sets it up (context_finalize) with the settings given so far: UB_NOERROR,
// or why the settings are refused. Answered locally: "localhost." is one of libunbound's own zones.
int finalize_context(ub_ctx* ctx) {
  std::lock_guard lock(library_log_mutex);
  ub_result* probe = nullptr;
  const int rc = ub_resolve(ctx, "localhost.", kTypeA, kClassIn, &probe);
  if (probe != nullptr) ub_resolve_free(probe);
  return rc;
}

// The tests' stand-in for libunbound out of memory at a query of `type` (Debug builds: failpoints
// resolver.no_memory.MX, .A, ...): the query is not handed to libunbound, which answers UB_NOMEM so.
bool no_memory_failpoint(DnsType type) {
  static constexpr std::array<std::string_view, all_dns_types.size()> names{
      "resolver.no_memory.MX",   "resolver.no_memory.A",   "resolver.no_memory.AAAA",
      "resolver.no_memory.TLSA", "resolver.no_memory.TXT", "resolver.no_memory.PTR"};
  try {
    failpoint(names[static_cast<std::size_t>(type)]);
  } catch (const std::exception&) {
    return true;
  }
  return false;
}

}  // namespace

// --------------------------------------------------------------------------------------------------------------
struct Resolver::Impl : std::enable_shared_from_this<Impl> {
  Impl(net::any_io_executor ex, const ResolverSettings& settings, Telemetry* counters, std::uint64_t seed)
      : executor(std::move(ex)),
        pipe(executor),
        timeout(settings.dns.timeout),
        telemetry(counters),
        random(seed) {
    if (!settings.problem.empty()) throw std::runtime_error("dns: " + settings.problem);
    const config::Dns& dns = settings.dns;
    ctx = create_context();
    if (ctx == nullptr) throw std::runtime_error("dns: cannot create a libunbound context");
    const auto check = [&](int rc, const std::string& what) {
      if (rc != 0) {
        const std::string reason = ub_strerror(rc);
        delete_context(ctx);
        ctx = nullptr;
        throw std::runtime_error("dns: " + what + ": " + reason);
      }
    };
    // Answers are handed back through ub_fd from a worker thread, not a forked process (this process has
    // threads of its own).
    check(ub_ctx_async(ctx, 1), "async mode");
    // Forwarders and resolv.conf name servers on loopback (a local unbound, systemd-resolved's 127.0.0.53) are
    // the common case for an MTA host; libunbound refuses to query localhost unless told.
    check(ub_ctx_set_option(ctx, "do-not-query-localhost:", "no"), "do-not-query-localhost");
    if (dns.servers.empty()) {
      // resolv.conf's name servers as read at start or reload (resolver_settings); none: 127.0.0.1, as glibc
      // and libunbound ask then.
      for (const auto& server : settings.name_servers)
        check(ub_ctx_set_fwd(ctx, server.c_str()), std::string(resolv_conf_path) + " nameserver " + server);
      if (settings.name_servers.empty()) check(ub_ctx_set_fwd(ctx, "127.0.0.1"), "nameserver 127.0.0.1");
    } else {
      for (const auto& server : dns.servers) {
        check(ub_ctx_set_fwd(ctx, (server.host + "@" + std::to_string(server.port)).c_str()),
              "forwarder " + server.text);
      }
    }
    // Addresses in the order of the answer (a hosts file's: its order, as getaddrinfo gave them; the first is
    // tried first), not rotated at random from one answer to the next (libunbound's default since 1.17). Set
    // in every context alike: libunbound keeps this one setting in a process-wide variable, which the context
    // made last decides. (The MX walk shuffles equal preferences itself, proto::plan_mx.)
    check(ub_ctx_set_option(ctx, "rrset-roundrobin:", "no"), "rrset-roundrobin");
    // The hosts file as read at start or reload (with_hosts_file): local data, answered before the forwarders
    // are asked; for a name it has, a type it lacks is NODATA, as getaddrinfo stops at the files service when
    // the name is there.
    for (const auto& record : settings.hosts_records)
      check(ub_ctx_set_option(ctx, "local-data:", record.c_str()), settings.hosts_file + ": " + record);
    // Reverse names of loopback and private clients are asked of the configured resolver, not answered by
    // libunbound's built-in local zones (RFC 6303 defaults): a site's own DNS serves its PTRs, and the tests'
    // clients are on 127.0.0.x ("transparent": 127.0.0.1 is still localhost; "nodefault" is not honoured here).
    check(ub_ctx_set_option(ctx, "local-zone:", "127.in-addr.arpa. transparent"), "local-zone 127.in-addr.arpa");
    check(ub_ctx_set_option(ctx, "unblock-lan-zones:", "yes"), "unblock-lan-zones");
    check(ub_ctx_set_option(ctx, "insecure-lan-zones:", "yes"), "insecure-lan-zones");
    // The records read at start or reload (resolver_settings), not the file as it is now.
    for (const auto& record : settings.trust_anchors)
      check(ub_ctx_add_ta(ctx, record.c_str()), "trust anchor " + dns.trust_anchor_file);
    // libunbound reads the trust anchor and checks its settings only when the context is first used. Use it
    // now, for a name its built-in local zone answers without any network (no blocking wait), so that a
    // broken setting fails at start and on reload, not at the first delivery.
    check(finalize_context(ctx), "settings (dns.servers, dns.trust_anchor_file)");
    const int fd = ub_fd(ctx);
    if (fd < 0) check(UB_PIPE, "result pipe");
    pipe.assign(fd);
  }

  ~Impl() {
    if (pipe.is_open()) pipe.release();  // libunbound's descriptor: ub_ctx_delete closes it
    if (ctx != nullptr) delete_context(ctx);
  }

  // One ub_resolve_async in flight. Lives in the awaiting coroutine's frame; its destructor cancels a query
  // that is still outstanding, so libunbound never calls back into a destroyed frame.
  // It is one of `lookups`' (Resolver::cancel()) while it lives.
  struct Query {
    Query(std::shared_ptr<Impl> owner, const std::shared_ptr<Lookups>& of, DnsType t, std::string n);
    ~Query();
    Query(const Query&) = delete;
    Query& operator=(const Query&) = delete;

    std::shared_ptr<Impl> impl;
    std::shared_ptr<Lookups> lookups;
    DnsType type;
    std::string name;
    net::steady_timer wakeup;  // expires at the deadline; cancelled early by the answer
    int id = 0;
    bool started = false;
    bool done = false;
    bool cancelled = false;  // Resolver::cancel(): given up, no answer waited for
    int error = 0;  // libunbound's error code (not the DNS rcode)
    std::uint64_t socket_failures = 0;  // library_socket_failures when it was started
    ub_result* result = nullptr;
    DnsOutcome outcome = DnsOutcome::error;
    std::string detail;
    std::list<Query*>::iterator on_context;  // its place in impl->queries
  };

  static void on_answer(void* data, int error, ub_result* result) {
    auto* query = static_cast<Query*>(data);
    query->done = true;
    query->error = error;
    query->result = result;
    --query->impl->outstanding;
    query->wakeup.cancel();
  }

  // Starts the query (the deadline runs from here).
  void start(Query& query) {
    if (query.cancelled) {
      query.done = true;
      return;
    }
    if (pipe_failed) {  // no answer could come back: an error at once (a Resolver that shares it, until
                        // replaced)
      query.done = true;
      query.error = UB_PIPE;
      return;
    }
    query.wakeup.expires_after(timeout);
    query.socket_failures = library_socket_failures.load(std::memory_order_acquire);
    const int rc = no_memory_failpoint(query.type)
                       ? UB_NOMEM
                       : ub_resolve_async(ctx, query.name.c_str(), rrtype(query.type), kClassIn, &query,
                                          &Impl::on_answer, &query.id);
    if (rc != 0) {
      query.done = true;
      query.error = rc;
      return;
    }
    query.started = true;
    ++outstanding;
    if (!pumping) {
      pumping = true;
      net::co_spawn(executor, pump(shared_from_this()), net::detached);
    }
  }

  // Waits for the answer or the deadline, classifies and counts it.
  net::awaitable<void> finish(Query& query) {
    if (!query.done && !query.cancelled &&
        !pipe_failed) {  // (a timer's cancel() reaches only a pending wait)
      boost::system::error_code ec;
      co_await query.wakeup.async_wait(net::redirect_error(net::use_awaitable, ec));
    }
    // The result pipe failed while it waited: its answer cannot come, an error of the resolver's, not a
    // timeout.
    const bool answered = query.done || pipe_failed;
    if (!query.done) {
      ub_cancel(ctx, query.id);
      forget_one();
      query.done = true;  // nothing left to cancel in ~Query
      if (pipe_failed) query.error = UB_PIPE;
    }
    if (query.cancelled && query.result == nullptr) {
      query.outcome = DnsOutcome::error;
      query.detail = "cancelled";
      co_return;  // given up by Resolver::cancel(): no answer, and no timeout of the DNS's to count
    }
    if (!answered) {
      query.outcome = DnsOutcome::timeout;
      query.detail = "no answer within " + config::format_duration(timeout);
    } else if (query.error == UB_PIPE) {
      // The pipe between this context and libunbound's worker failed (the result pipe's wait, logged
      // dns_resolver_failed, or the query could not be handed over): the query may never have been sent and
      // no answer can come back, so nothing is known about the name. The relay's own failure, as a query
      // that could not be sent for want of a socket: counted and answered as such (451 4.4.3 DNS resolver
      // unavailable, dns_unavailable), not as the domain's DNS failure; the context is replaced.
      query.outcome = DnsOutcome::local_resources;
      spoiled = true;
      query.detail = pipe_error.empty() ? std::string("resolver error: ") + ub_strerror(query.error)
                                        : "resolver failed: " + pipe_error;
    } else if (query.error == UB_NOMEM) {
      // libunbound could not allocate the query (ub_resolve_async) or its worker could not take it on (the
      // answer's error): it was never sent, and nothing is known about the name. The relay's own failure, as
      // a query without a socket: before, the domain's (an MX lookup's 451 Temporary DNS failure, counted as
      // its dns_failure; a TLSA lookup's host skipped and reported as the domain's dnssec-invalid). The
      // context is kept: nothing of it is cached.
      query.outcome = DnsOutcome::local_resources;
      query.detail = std::string("resolver error: ") + ub_strerror(query.error);
    } else if (query.error != 0) {
      query.outcome = DnsOutcome::error;
      query.detail = std::string("resolver error: ") + ub_strerror(query.error);
    } else if (query.result->bogus) {
      query.outcome = DnsOutcome::bogus;
      query.detail = std::string("DNSSEC validation failed: ") +
                     (query.result->why_bogus != nullptr ? query.result->why_bogus : "bogus");
    } else if (query.result->rcode == kRcodeNxdomain) {
      query.outcome = DnsOutcome::nxdomain;
    } else if (query.result->rcode == kRcodeServfail) {
      query.outcome = DnsOutcome::servfail;
      query.detail = "SERVFAIL";
    } else if (query.result->rcode != 0) {
      query.outcome = DnsOutcome::error;
      query.detail = "rcode " + std::to_string(query.result->rcode);
    } else {
      query.outcome = query.result->havedata ? DnsOutcome::success : DnsOutcome::nodata;
    }
    // A SERVFAIL or an error after libunbound said that it could not make a socket (note_socket_failure).
    if (answered && (query.outcome == DnsOutcome::servfail || query.outcome == DnsOutcome::error)) {
      if (const auto reason = socket_failure_since(query.socket_failures)) {
        query.outcome = DnsOutcome::local_resources;
        spoiled = true;
        query.detail = "no socket for the query: " + *reason + " (" + query.detail + ")";
      }
    }
    if (telemetry != nullptr) telemetry->dns_lookup(query.type, query.outcome);
  }

  bool secure(const Query& query) const {
    return query.result != nullptr && query.result->secure != 0 && query.result->bogus == 0;
  }

  // An answer came (records, NODATA or NXDOMAIN), validated or not. A failed lookup (a bogus answer included)
  // is not used, and says nothing about whether the name is signed.
  static bool answered(const Query& query) {
    return query.outcome == DnsOutcome::success || query.outcome == DnsOutcome::nodata ||
           query.outcome == DnsOutcome::nxdomain;
  }

  // A query given up (deadline, or its coroutine destroyed): no answer is coming for it. When it was the last
  // one, the pump's wait is cancelled so that an idle resolver leaves no operation pending on its loop (an
  // io_context with nothing else to do then returns from run()).
  void forget_one() {
    if (--outstanding == 0 && pumping) {
      boost::system::error_code ignored;
      pipe.cancel(ignored);
    }
  }

  // Watches libunbound's result pipe while queries are outstanding; ub_process runs their callbacks here.
  static net::awaitable<void> pump(std::shared_ptr<Impl> self) {
    while (self->outstanding > 0 && !self->closed) {
      boost::system::error_code ec;
      try {
        failpoint("resolver.result_pipe");
      } catch (const std::exception&) {
        // The tests' descriptor that went bad: given up under the wait, which fails (EBADF) now and ever
        // after.
        self->pipe.release();
      }
      co_await self->pipe.async_wait(net::posix::descriptor_base::wait_read,
                                     net::redirect_error(net::use_awaitable, ec));
      if (self->closed) break;
      if (ec == net::error::operation_aborted) continue;  // forget_one; the loop condition decides
      if (ec) {
        // No answer can come back through this context any more. Before, the pump ended silently here, and a
        // descriptor that stayed unusable had every later lookup on the loop wait for dns.timeout, counted as
        // a timeout, with the context never replaced. Spoiled: the loop's next lookup gets a fresh one.
        self->fail("result pipe: " + ec.message());
        break;
      }
      try {
        failpoint("resolver.result_message");
      } catch (const std::exception&) {
        // The tests' stand-in for libunbound's "tube read out of memory": a message's length read off the
        // pipe, its body left in it.
        std::uint32_t length = 0;
        [[maybe_unused]] const auto n = ::read(self->pipe.native_handle(), &length, sizeof length);
      }
      // UB_PIPE: the pipe ended, or a message could not be read whole (libunbound out of memory for it:
      // "tube read out of memory") or made no sense. Its reads are out of step with the messages then: the
      // next call takes a piece of one for the length of the next and reads that many bytes with the
      // descriptor made blocking, which held the event loop until the worker wrote as much (never, for a
      // length of megabytes). Before, the result was not looked at and the pump went on reading so.
      if (const int processed = ub_process(self->ctx); processed != 0) {
        self->fail(std::string("result pipe: ") + ub_strerror(processed));
        break;
      }
    }
    self->pumping = false;
  }

  // No answer comes back through this context any more: every later lookup fails at once, the loop's next one
  // gets a fresh context (spoiled), and the lookups waiting for their answers (every user's of this context)
  // end now, as the relay's own failure (finish()). Before, each waited for its deadline first: an RCPT held
  // for all of dns.timeout for a 451 that was known at once, the MX walk's address lookups after it one
  // another.
  void fail(std::string why) {
    pipe_failed = true;
    spoiled = true;
    pipe_error = std::move(why);
    log_limited(LogLevel::error, "dns_resolver_failed", {{"error", pipe_error}});
    for (Query* query : queries)
      if (!query->done) query->wakeup.cancel();
  }

  net::any_io_executor executor;
  net::posix::stream_descriptor pipe;
  std::chrono::milliseconds timeout;
  Telemetry* telemetry;
  std::mt19937_64 random;
  ub_ctx* ctx = nullptr;
  int outstanding = 0;
  bool pumping = false;
  bool closed = false;
  bool spoiled = false;  // Resolver::spoiled()
  bool pipe_failed = false;  // the wait on the result pipe failed: no answer comes back through this context
  std::string pipe_error;    // pipe_failed: why ("result pipe: Bad file descriptor")
  // Every Query on this context while it lives, whichever Resolver (share()) asked: woken when the pipe
  // fails. A list, so that a query leaves it in constant time however many a loop has in flight.
  std::list<Query*> queries;
};

struct Resolver::Lookups {
  bool cancelled = false;
  std::vector<Impl::Query*> queries;  // in flight
};

Resolver::Impl::Query::Query(std::shared_ptr<Impl> owner, const std::shared_ptr<Lookups>& of, DnsType t,
                             std::string n)
    : impl(std::move(owner)),
      lookups(of),
      type(t),
      name(std::move(n)),
      wakeup(impl->executor),
      cancelled(of->cancelled) {
  lookups->queries.push_back(this);
  on_context = impl->queries.insert(impl->queries.end(), this);
}

Resolver::Impl::Query::~Query() {
  std::erase(lookups->queries, this);
  impl->queries.erase(on_context);
  if (started && !done) {
    ub_cancel(impl->ctx, id);
    impl->forget_one();
  }
  if (result != nullptr) ub_resolve_free(result);
}

Resolver::Resolver(net::any_io_executor executor, const ResolverSettings& settings, Telemetry* telemetry,
                   std::uint64_t seed)
    : impl_(std::make_shared<Impl>(std::move(executor), settings, telemetry,
                                   seed != 0 ? seed : std::random_device{}())),
      lookups_(std::make_shared<Lookups>()) {}

Resolver::Resolver(std::shared_ptr<Resolver> shared)
    : impl_(shared->impl_), shared_(std::move(shared)), lookups_(std::make_shared<Lookups>()) {}

Resolver::~Resolver() {
  if (shared_) return;  // the context is shared_'s
  impl_->closed = true;
  boost::system::error_code ignored;
  impl_->pipe.cancel(ignored);  // the pump (holding the Impl) ends; the Impl goes with the last query
}

std::shared_ptr<Resolver> Resolver::share(std::shared_ptr<Resolver> shared) {
  return std::shared_ptr<Resolver>(new Resolver(std::move(shared)));
}

bool Resolver::spoiled() const { return impl_->spoiled; }

void Resolver::cancel() {
  lookups_->cancelled = true;
  for (Impl::Query* query : lookups_->queries) {
    if (query->done) continue;  // answered: its coroutine is about to take the answer
    query->cancelled = true;
    query->wakeup.cancel();  // finish() resumes at once and gives the query up
  }
}

net::awaitable<MxResult> Resolver::resolve_mx(std::string domain) {
  auto impl = impl_;
  Impl::Query query(impl, lookups_, DnsType::mx, domain);
  impl->start(query);
  co_await impl->finish(query);

  MxResult out;
  out.outcome = query.outcome;
  out.secure = impl->secure(query);
  out.detail = query.detail;
  switch (query.outcome) {
    case DnsOutcome::nxdomain:
      out.status = MxResult::Status::nxdomain;
      co_return out;
    case DnsOutcome::nodata:
      out.status = MxResult::Status::hosts;
      out.plan = proto::plan_mx(domain, {}, impl->random());
      co_return out;
    case DnsOutcome::success:
      break;
    default:
      out.status = MxResult::Status::failed;
      co_return out;
  }
  std::vector<proto::MxRecord> records;
  for (int i = 0; query.result->data[i] != nullptr; ++i) {
    const auto* rdata = reinterpret_cast<const unsigned char*>(query.result->data[i]);
    const auto size = static_cast<std::size_t>(query.result->len[i]);
    if (size < 3) continue;
    auto exchange = wire_name(rdata + 2, size - 2);
    if (!exchange) continue;
    records.push_back(proto::MxRecord{static_cast<std::uint16_t>(rdata[0] << 8 | rdata[1]),
                                      exchange->empty() ? std::string(".") : std::move(*exchange)});
  }
  if (records.empty()) {  // every record malformed: nothing usable, and no reason to bounce
    out.status = MxResult::Status::failed;
    out.outcome = DnsOutcome::error;
    out.detail = "malformed MX records";
    co_return out;
  }
  out.plan = proto::plan_mx(domain, records, impl->random());
  out.status = out.plan.kind == proto::MxPlanKind::null_mx ? MxResult::Status::null_mx : MxResult::Status::hosts;
  co_return out;
}

net::awaitable<AddressResult> Resolver::resolve_addresses(std::string host) {
  std::vector<std::string> hosts(1, std::move(host));  // not a braced list beside co_await (GCC 12)
  std::vector<AddressResult> out = co_await resolve_addresses(std::move(hosts));
  co_return std::move(out.front());
}

net::awaitable<std::vector<AddressResult>> Resolver::resolve_addresses(std::vector<std::string> hosts) {
  auto impl = impl_;
  // Every query in flight at once: the slowest one decides how long this takes (one dns.timeout at most), not
  // their sum. A deque, because libunbound holds each Query's address until it answers.
  std::deque<Impl::Query> queries;
  for (const auto& host : hosts) {
    impl->start(queries.emplace_back(impl, lookups_, DnsType::aaaa, host));
    impl->start(queries.emplace_back(impl, lookups_, DnsType::a, host));
  }
  for (auto& query : queries) co_await impl->finish(query);

  std::vector<AddressResult> results;
  results.reserve(hosts.size());
  for (std::size_t i = 0; i < hosts.size(); ++i) {
    const Impl::Query& aaaa = queries[2 * i];
    const Impl::Query& a = queries[2 * i + 1];
    const std::string& host = hosts[i];
    AddressResult& out = results.emplace_back();
    out.aaaa = aaaa.outcome;
    out.a = a.outcome;
    // Secure when every answer that came is validated. A lookup that failed (a forged, bogus answer, or none
    // in time) does not make the host insecure: that would let whoever forges one answer turn DANE off for
    // the host (RFC 7672 2.1.1: bogus is not insecure). Its records, and its CNAME expansion, are not used.
    out.secure = (Impl::answered(aaaa) || Impl::answered(a)) &&
                 (!Impl::answered(aaaa) || impl->secure(aaaa)) && (!Impl::answered(a) || impl->secure(a));
    if (Impl::answered(aaaa)) out.canonical = canonical_name(host, aaaa.result);
    if (out.canonical.empty() && Impl::answered(a)) out.canonical = canonical_name(host, a.result);
    std::vector<net::ip::address> v6;
    std::vector<net::ip::address> v4;
    if (aaaa.outcome == DnsOutcome::success) {
      for (int j = 0; aaaa.result->data[j] != nullptr; ++j) {
        if (aaaa.result->len[j] != 16) continue;
        net::ip::address_v6::bytes_type bytes;
        std::memcpy(bytes.data(), aaaa.result->data[j], 16);
        v6.emplace_back(net::ip::address_v6(bytes));
      }
    }
    if (a.outcome == DnsOutcome::success) {
      for (int j = 0; a.result->data[j] != nullptr; ++j) {
        if (a.result->len[j] != 4) continue;
        net::ip::address_v4::bytes_type bytes;
        std::memcpy(bytes.data(), a.result->data[j], 4);
        v4.emplace_back(net::ip::address_v4(bytes));
      }
    }
    out.addresses = proto::interleave_families(v6, v4);
    if (!out.addresses.empty()) {
      out.status = AddressResult::Status::addresses;
    } else if (is_temporary(aaaa.outcome) || is_temporary(a.outcome)) {
      out.status = AddressResult::Status::failed;
      out.detail = is_temporary(aaaa.outcome) ? "AAAA: " + aaaa.detail : "A: " + a.detail;
    } else {
      out.status = AddressResult::Status::none;
      out.detail =
          "AAAA " + std::string(to_string(aaaa.outcome)) + ", A " + std::string(to_string(a.outcome));
    }
  }
  co_return results;
}

net::awaitable<TlsaResult> Resolver::resolve_tlsa(std::string name) {
  auto impl = impl_;
  Impl::Query query(impl, lookups_, DnsType::tlsa, name);
  impl->start(query);
  co_await impl->finish(query);

  TlsaResult out;
  out.outcome = query.outcome;
  out.detail = query.detail;
  out.answer.secure = impl->secure(query);
  switch (query.outcome) {
    case DnsOutcome::success:
      out.answer.kind = proto::TlsaAnswer::Kind::records;
      break;
    case DnsOutcome::nxdomain:
    case DnsOutcome::nodata:
      out.answer.kind = proto::TlsaAnswer::Kind::none;
      co_return out;
    default:
      out.answer.kind = proto::TlsaAnswer::Kind::failed;
      co_return out;
  }
  for (int i = 0; query.result->data[i] != nullptr; ++i) {
    auto record = proto::parse_tlsa_rdata(
        std::string_view(query.result->data[i], static_cast<std::size_t>(query.result->len[i])));
    if (record) out.answer.records.push_back(std::move(*record));
  }
  co_return out;
}

std::string reverse_name(const net::ip::address& address) {
  std::string out;
  if (address.is_v4() || (address.is_v6() && address.to_v6().is_v4_mapped())) {
    const auto v4 = address.is_v4() ? address.to_v4() : net::ip::make_address_v4(net::ip::v4_mapped, address.to_v6());
    const auto bytes = v4.to_bytes();
    for (auto it = bytes.rbegin(); it != bytes.rend(); ++it) out += std::to_string(*it) + ".";
    return out + "in-addr.arpa";
  }
  static constexpr char kHex[] = "0123456789abcdef";
  const auto bytes = address.to_v6().to_bytes();
  for (auto it = bytes.rbegin(); it != bytes.rend(); ++it) {
    out += kHex[*it & 15];
    out += '.';
    out += kHex[*it >> 4];
    out += '.';
  }
  return out + "ip6.arpa";
}

net::awaitable<PtrResult> Resolver::resolve_ptr(net::ip::address address) {
  auto impl = impl_;
  Impl::Query query(impl, lookups_, DnsType::ptr, reverse_name(address));
  impl->start(query);
  co_await impl->finish(query);
  PtrResult out;
  out.outcome = query.outcome;
  out.detail = query.detail;
  if (query.outcome != DnsOutcome::success) co_return out;
  for (int i = 0; query.result->data[i] != nullptr; ++i) {
    auto name = wire_name(reinterpret_cast<const unsigned char*>(query.result->data[i]),
                          static_cast<std::size_t>(query.result->len[i]));
    if (name && !name->empty()) out.names.push_back(std::move(*name));
  }
  co_return out;
}

net::awaitable<TxtResult> Resolver::resolve_txt(std::string name) {
  auto impl = impl_;
  Impl::Query query(impl, lookups_, DnsType::txt, name);
  impl->start(query);
  co_await impl->finish(query);

  TxtResult out;
  out.outcome = query.outcome;
  out.secure = impl->secure(query);
  out.detail = query.detail;
  if (query.outcome != DnsOutcome::success) co_return out;
  for (int i = 0; query.result->data[i] != nullptr; ++i) {
    const auto joined = join_txt_rdata(std::string_view(query.result->data[i],
                                                        static_cast<std::size_t>(query.result->len[i])));
    if (joined) out.records.push_back(*joined);  // a malformed rdata is skipped, as resolve_mx does
  }
  if (out.records.empty()) {
    out.outcome = DnsOutcome::error;
    out.detail = "malformed TXT records";
  }
  co_return out;
}

std::string dns_settings_problem(const ResolverSettings& settings) {
  try {
    net::io_context io;
    const Resolver probe(io.get_executor(), settings, nullptr);
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

namespace {

// `path`'s text. A file that does not exist is empty, and a problem only where `absent_is_a_problem`; one
// that exists and cannot be read whole (a directory in its place, permissions, EIO) is empty too, and
// `problem` says why. (std::ifstream read a directory as an exception, "basic_filebuf::underflow error
// reading the file", which refused the start, and which --check-config did not catch: it aborted.)
std::string read_text(const std::string& path, std::string& problem, bool absent_is_a_problem = false) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    if (errno != ENOENT || absent_is_a_problem) problem = path + ": cannot open it: " + std::strerror(errno);
    return "";
  }
  std::string text;
  char buffer[65536];
  for (;;) {
    const ssize_t n = ::read(fd, buffer, sizeof buffer);
    if (n > 0) {
      text.append(buffer, static_cast<std::size_t>(n));
    } else if (n == 0) {
      break;
    } else if (errno != EINTR) {
      problem = path + ": cannot read it: " + std::strerror(errno);
      text.clear();  // part of a file: none of it, rather than some names from it and others from DNS
      break;
    }
  }
  ::close(fd);
  return text;
}

}  // namespace

ResolverSettings resolver_settings(const config::Dns& dns) {
  ResolverSettings settings;
  settings.dns = dns;
  settings.key = std::to_string(dns.timeout.count());
  for (const auto& server : dns.servers) settings.key += " " + server.text;
  if (dns.servers.empty()) {
    // Without dns.servers, resolv.conf's name servers, read here once (start, reload) as glibc reads them,
    // and given to every context made from these settings, as the trust anchor is. They are part of the key,
    // so a reload after the file changed gives every loop the name servers it names now. (libunbound's own
    // ub_ctx_resolvconf read the file again for each context, whenever a loop made one, and refused the whole
    // file, and with it the start or the reload, for a line glibc skips: "nameserver" without an address.)
    std::string unreadable;
    const std::string text = read_text(resolv_conf_path, unreadable, true);
    if (!unreadable.empty())
      settings.problem = unreadable + " (without dns.servers its name servers are asked)";
    settings.name_servers = proto::read_name_servers(text);
    settings.key += std::string("\n") + resolv_conf_path + ":";
    for (const auto& server : settings.name_servers) settings.key += " " + server;
  }
  if (dns.trust_anchor_file.empty()) return settings;
  // read_text, as resolv.conf and /etc/hosts: std::ifstream threw from the library for a directory in its
  // place ("basic_filebuf::underflow error reading the file"), past this problem.
  std::string unreadable;
  const std::string text = read_text(dns.trust_anchor_file, unreadable, true);
  settings.key += " " + dns.trust_anchor_file + "\n" + text;
  std::string error;
  const std::string where = "dns.trust_anchor_file " + dns.trust_anchor_file + ": ";
  if (!unreadable.empty()) {
    settings.problem = "dns.trust_anchor_file " + unreadable;
  } else if (auto records = proto::trust_anchor_records(text, error); !records) {
    settings.problem = where + error;
  } else if (records->empty()) {
    settings.problem = where + "no record in it";
  } else {
    settings.trust_anchors = std::move(*records);
  }
  return settings;
}

ResolverSettings with_hosts_file(ResolverSettings settings, const std::string& hosts_file,
                                 const std::string& resolv_conf, const std::vector<std::string>& names,
                                 std::string& problem) {
  problem.clear();
  settings.hosts_file = hosts_file;
  // A resolv.conf that cannot be read has no search list, as glibc's res_init passes it over (EACCES, EISDIR:
  // "persistent errors caused by file system contents"); without dns.servers resolver_settings refuses it.
  // That was silent where dns.servers names the name servers: said now (Runtime::log_problems, route), as an
  // unreadable hosts file is, where there is a name for the search list to complete.
  std::string unread_resolv_conf;
  proto::read_search_list(read_text(resolv_conf, unread_resolv_conf), settings.search, settings.ndots);
  if (!names.empty()) settings.search_problem = unread_resolv_conf;
  // The names getaddrinfo asks of the files service: each as written, matched whole in any case (glibc's
  // nss_files compares with strcasecmp: "mail.example.org." is not the file's "mail.example.org"). The names
  // the search list makes are asked of DNS only (res_search), never of the file.
  std::set<std::string, std::less<>> asked;
  for (const auto& name : names) asked.insert(proto::ascii_lower(name));
  for (auto& record : proto::hosts_records(read_text(hosts_file, problem))) {
    if (asked.contains(proto::ascii_lower(std::string_view(record).substr(0, record.find(' ')))))
      settings.hosts_records.push_back(std::move(record));
  }
  settings.hosts_names.assign(asked.begin(), asked.end());
  settings.key += "\nhosts " + hosts_file;
  for (const auto& record : settings.hosts_records) settings.key += "\n" + record;
  // The search list changes no lookup's answer, only which names are asked; resolv.conf's text is in the key
  // of `settings` already where its name servers are used (resolver_settings).
  return settings;
}

ResolverSettings fixed_upstream_settings(const ResolverSettings& dns, const config::Config& config,
                                         std::string& problem) {
  problem.clear();
  if (!dns.problem.empty()) return dns;  // no resolver at all (resolv.conf, the trust anchor): said as such
  std::vector<std::string> names;
  for (const auto& upstream : config.upstreams) {
    boost::system::error_code literal;
    if (!upstream.mx && (net::ip::make_address(upstream.address.host, literal), literal))
      names.push_back(upstream.address.host);
  }
  auto hosts = with_hosts_file(dns, hosts_file_path, resolv_conf_path, names, problem);
  if (!problem.empty()) return hosts;  // unreadable: none of its names, the search list still applied
  problem = dns_settings_problem(hosts);
  if (problem.empty()) return hosts;
  return dns;
}

net::awaitable<std::string> Resolver::verified_name(net::ip::address address, bool& failed) {
  failed = false;
  if (address.is_v6() && address.to_v6().is_v4_mapped())
    address = net::ip::make_address_v4(net::ip::v4_mapped, address.to_v6());
  const PtrResult ptr = co_await resolve_ptr(address);
  if (is_temporary(ptr.outcome)) failed = true;
  constexpr std::size_t kMostNames = 3;  // a PTR set is usually one name; a long one is not worth a walk
  for (std::size_t i = 0; i < ptr.names.size() && i < kMostNames; ++i) {
    const AddressResult forward = co_await resolve_addresses(ptr.names[i]);
    if (forward.status == AddressResult::Status::failed) failed = true;
    for (const auto& a : forward.addresses)
      if (a == address) co_return ptr.names[i];
  }
  co_return std::string();
}

}  // namespace mailflow
