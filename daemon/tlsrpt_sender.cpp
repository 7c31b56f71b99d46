// TLS-RPT sending; see tlsrpt_sender.hpp.
#include "daemon/tlsrpt_sender.hpp"

#include <fmt/format.h>

#include <boost/asio/post.hpp>
#include <boost/asio/redirect_error.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <ctime>
#include <optional>
#include <random>
#include <set>

#include "daemon/deadlines.hpp"
#include "daemon/https_client.hpp"
#include "daemon/log.hpp"
#include "daemon/reasons.hpp"
#include "daemon/resolver.hpp"
#include "daemon/runtime.hpp"
#include "daemon/state_file.hpp"
#include "daemon/state_writer.hpp"
#include "daemon/telemetry.hpp"
#include "daemon/tlsrpt.hpp"
#include "daemon/upstream_leg.hpp"
#include "proto/ascii.hpp"
#include "proto/reply.hpp"

namespace mailflow {

namespace asio = boost::asio;
using boost::system::error_code;

namespace {

// The report mails go out as sessions of mailflowd's own: this is their listener and upstream label.
constexpr std::string_view kLabel = reasons::tlsrpt_sessions;
// A first run shortly after start (not a whole interval later), so that a restart does not delay the reports.
constexpr auto kFirstRun = std::chrono::seconds(60);
constexpr std::string_view kLedgerFile = "tlsrpt-ledger.state";
// A line per unsent report (at most the store's max_days x max_domains_per_day): far below this; a larger
// file is not one this daemon wrote.
constexpr std::size_t kMaxLedgerBytes = 64u << 20;

std::optional<std::string> percent_decode(std::string_view text) {
  std::string out;
  for (std::size_t i = 0; i < text.size(); ++i) {
    if (text[i] != '%') {
      out += text[i];
      continue;
    }
    if (i + 2 >= text.size() || !std::isxdigit(static_cast<unsigned char>(text[i + 1])) ||
        !std::isxdigit(static_cast<unsigned char>(text[i + 2])))
      return std::nullopt;
    out += static_cast<char>(std::stoi(std::string(text.substr(i + 1, 2)), nullptr, 16));
    i += 2;
  }
  return out;
}

bool valid_host(std::string_view host) {
  return !host.empty() && host.size() <= 253 && std::all_of(host.begin(), host.end(), [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '-' || c == '_' || c == ':';
  });
}

std::string utc_date(std::int64_t unix_seconds) {
  const std::chrono::year_month_day ymd{std::chrono::sys_days{std::chrono::days{unix_seconds / 86400}}};
  return fmt::format("{:04}-{:02}-{:02}", static_cast<int>(ymd.year()), static_cast<unsigned>(ymd.month()),
                     static_cast<unsigned>(ymd.day()));
}

// The oldest day the store may still hold (max_days before today): the ledger keeps a report done with until
// then, so that sessions recorded for its day after it was sent never make a second report of that day.
std::string oldest_kept_date(std::int64_t now) {
  return utc_date(now - std::int64_t{TlsRptLimits{}.max_days} * 86400);
}

std::string rfc5322_date(std::int64_t unix_seconds) {
  const std::time_t t = static_cast<std::time_t>(unix_seconds);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buffer[64];
  std::strftime(buffer, sizeof buffer, "%a, %d %b %Y %H:%M:%S +0000", &tm);
  return buffer;
}

std::int64_t unix_now() {
  return std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// The reply text for a log line: its first line, without the CRLF.
std::string first_line(std::string_view wire) {
  return std::string(wire.substr(0, wire.find_first_of("\r\n")));
}

// RFC 8460 5.3 asks for a 2xx; the rest is HTTP's own meaning: 408, 429 and 5xx may pass, other answers
// (redirects, which are not followed, and 4xx) will not.
TlsRptDelivery from_http(unsigned status) {
  if (status >= 200 && status < 300) return TlsRptDelivery::success;
  if (status == 408 || status == 429 || status >= 500) return TlsRptDelivery::temporary_failure;
  return TlsRptDelivery::permanent_failure;
}

// One SMTP conversation of mailflowd's own: an UpstreamLeg with the Deadlines it waits through.
struct Conversation {
  Conversation(const Runtime& runtime, Telemetry& telemetry, const asio::any_io_executor& executor, std::string id)
      : id(std::move(id)),
        deadlines(executor, [this] { leg.cancel(); }),
        leg(UpstreamLeg::Session{runtime, telemetry, deadlines, this->id, listener}, executor) {}
  std::string id;
  std::string listener{kLabel};
  Deadlines deadlines;
  UpstreamLeg leg;
};

// MAIL, RCPT, DATA and the message over a connection that `open` makes to the rua domain's MX hosts.
// `timed_out`: the try ended because a deadline passed (UpstreamLeg::timed_out()), not at a refusal or a
// connection that the far side closed, or failed after its walk waited for a host that hung.
asio::awaitable<TlsRptDelivery> converse(Conversation& conversation, const config::Upstream& upstream,
                                         const RuaTarget& rua, const config::Config& config,
                                         const std::string& message, std::string& detail, bool& timed_out) {
  UpstreamLeg& leg = conversation.leg;
  timed_out = false;
  UpstreamLeg::Client client;
  client.helo = config.hostname;
  bool reused = false;
  // Not `if (auto refusal = co_await ...)`: GCC 12 frees the awaited frame early in that form.
  const auto refusal = co_await leg.open(upstream, rua.domain, client, {}, true, reused);
  if (refusal) {
    detail = first_line(refusal->reply);
    timed_out = leg.timed_out();
    co_return refusal->reply.starts_with('5') ? TlsRptDelivery::permanent_failure
                                              : TlsRptDelivery::temporary_failure;
  }
  detail = "via " + leg.host() + " (" + leg.address() + ")";
  // The walk hung at a host before this one: a try that fails here (a 4xx, a lost connection) costs the next
  // report to the domain that wait again before it gets as far, so it marks the domain as a timeout does.
  const bool walk_hung = leg.timed_out();
  const std::string commands[] = {"MAIL FROM:<" + config.tlsrpt.from + ">\r\n", "RCPT TO:<" + rua.address + ">\r\n",
                                  "DATA\r\n", dot_stuff_for_data(message)};
  static constexpr std::string_view names[] = {"MAIL", "RCPT", "DATA", "end of data"};
  static constexpr int expected[] = {2, 2, 3, 2};  // the reply class that lets the conversation go on
  for (std::size_t i = 0; i < 4; ++i) {
    const auto timeout = i == 3 ? config.timeouts.data_end : config.timeouts.command;
    std::optional<proto::Reply> reply;
    if (co_await leg.write(commands[i], Deadlines::in(timeout))) reply = co_await leg.read_reply(Deadlines::in(timeout));
    if (!reply) {
      const bool stalled = leg.timed_out();
      timed_out = walk_hung || stalled;
      detail += (stalled ? ": timed out at " : ": connection lost at ") + std::string(names[i]);
      co_return TlsRptDelivery::temporary_failure;
    }
    if (reply->code / 100 != expected[i]) {
      timed_out = walk_hung;
      detail += ": " + std::string(names[i]) + " answered " + std::to_string(reply->code) +
                (reply->lines.empty() ? "" : " " + reply->lines.front());
      // A 3xx where a 2xx belongs (or the reverse) is a broken server: tried again later.
      co_return reply->code >= 500 ? TlsRptDelivery::permanent_failure : TlsRptDelivery::temporary_failure;
    }
  }
  detail += ", " + std::string(proto::to_string(leg.tls_version()));
  co_return TlsRptDelivery::success;
}

}  // namespace

std::string_view to_string(RuaTarget::Method method) {
  return method == RuaTarget::Method::mailto ? "mailto" : "https";
}

RuaTarget parse_rua(std::string_view uri) {
  RuaTarget out;
  const std::string scheme = proto::ascii_lower(uri.substr(0, uri.find(':') + 1));
  if (scheme == "mailto:") {
    out.method = RuaTarget::Method::mailto;
    auto rest = uri.substr(7);
    rest = rest.substr(0, rest.find('?'));  // RFC 6068 headers (?subject=...) are not used
    auto address = percent_decode(rest);
    if (!address) return out;
    // The root's final dot names the same domain, and RFC 5321's Domain has none: RCPT TO with it is refused.
    if (address->ends_with('.')) address->pop_back();
    const auto at = address->rfind('@');
    if (at == std::string::npos || at == 0 || !valid_host(address->substr(at + 1))) return out;
    const bool printable = std::all_of(address->begin(), address->end(), [](char c) {
      const auto u = static_cast<unsigned char>(c);
      return u > 0x20 && u < 0x7f && c != '<' && c != '>';
    });
    if (!printable) return out;
    out.address = *address;
    out.domain = proto::ascii_lower(address->substr(at + 1));
    out.valid = true;
    return out;
  }
  if (scheme != "https:" || !uri.substr(6).starts_with("//")) return out;
  out.method = RuaTarget::Method::https;
  auto rest = uri.substr(8);
  const auto slash = rest.find_first_of("/?#");
  auto authority = rest.substr(0, slash);
  if (slash != std::string_view::npos) {
    auto target = rest.substr(slash);
    target = target.substr(0, target.find('#'));
    out.target = target.starts_with('/') ? std::string(target) : "/" + std::string(target);
  }
  if (authority.find('@') != std::string_view::npos) return out;  // no credentials in a report URI
  if (authority.starts_with('[')) {
    const auto close = authority.find(']');
    if (close == std::string_view::npos) return out;
    out.host = std::string(authority.substr(1, close - 1));
    authority.remove_prefix(close + 1);
    if (!authority.empty() && !authority.starts_with(':')) return out;
    if (!authority.empty()) out.port = std::string(authority.substr(1));
  } else {
    const auto colon = authority.rfind(':');
    out.host = proto::ascii_lower(authority.substr(0, colon));
    if (colon != std::string_view::npos) out.port = std::string(authority.substr(colon + 1));
    // A fully qualified name's final dot (the root) names the same host, and is in no certificate's names nor
    // in SNI (RFC 6066 3): kept, the certificate check failed at every try until the report was given up.
    if (out.host.ends_with('.')) out.host.pop_back();
  }
  const bool port_ok = !out.port.empty() && out.port.size() <= 5 &&
                       std::all_of(out.port.begin(), out.port.end(), [](char c) { return c >= '0' && c <= '9'; }) &&
                       std::stoul(out.port) >= 1 && std::stoul(out.port) <= 65535;
  out.valid = port_ok && valid_host(out.host);
  return out;
}

std::string dot_stuff_for_data(std::string_view text) {
  std::string out;
  out.reserve(text.size() + text.size() / 64 + 8);
  bool line_start = true;
  for (const char c : text) {
    if (line_start && c == '.') out += '.';
    out += c;
    line_start = c == '\n';
  }
  if (!out.ends_with("\r\n")) out += "\r\n";
  out += ".\r\n";
  return out;
}

TlsRptSender::TlsRptSender(asio::any_io_executor executor, Telemetry& telemetry, RuntimeSource runtime,
                           std::string state_dir, StateWriter& writer)
    : executor_(std::move(executor)),
      telemetry_(telemetry),
      runtime_(std::move(runtime)),
      state_dir_(std::move(state_dir)),
      writer_(writer),
      timer_(executor_) {
  std::random_device random;
  unique_ = (static_cast<std::uint64_t>(random()) << 32) ^ random();
}

bool TlsRptSender::load_ledger(std::int64_t now, std::string& error) {
  std::string text;
  error.clear();
  const auto read = read_state_file(state_dir_, kLedgerFile, kMaxLedgerBytes, text, error);
  if (read == StateRead::absent) return true;
  if (read == StateRead::failed) return false;
  std::string why = error;
  if (read == StateRead::read) {
    if (auto loaded = TlsRptLedger::parse(text, why)) {
      ledger_ = std::move(*loaded);
      error.clear();
      return true;
    }
  }
  error = std::string(kLedgerFile) + " is unusable (" + why + "); " +
          move_state_file_aside(state_dir_, kLedgerFile, now) + ", starting with an empty TLS-RPT ledger";
  return true;
}

void TlsRptSender::save_ledger() {
  if (!ledger_changed_.exchange(false)) return;
  {
    // A write still waiting in the writer's queue takes this newer text instead: a run of many reports on a
    // slow disk queues one ledger write, not one per try.
    std::lock_guard lock(unsaved_ledger_->mutex);
    const bool queued = unsaved_ledger_->text.has_value();
    unsaved_ledger_->text = ledger_.serialize();
    if (queued) return;
  }
  writer_.write(
      [unsaved = unsaved_ledger_] {
        std::lock_guard lock(unsaved->mutex);
        std::vector<StateFile> files;
        if (unsaved->text) files.push_back({std::string(kLedgerFile), std::move(*unsaved->text)});
        unsaved->text.reset();
        return files;
      },
      [this](bool saved) {
        if (!saved) ledger_changed_ = true;
      });
}

void TlsRptSender::forget_reports_saved_gone(std::int64_t now) {
  if (ledger_.keep_only(telemetry_.tlsrpt().reports_before(utc_date(now)), oldest_kept_date(now)) > 0)
    ledger_changed_ = true;
  save_ledger();
}

asio::awaitable<void> TlsRptSender::run(const std::atomic<bool>& stopping) {
  stopping_ = &stopping;
  // The wait is measured from `since` with the interval of the current configuration: a reload
  // (reconfigured()) wakes it to measure it again, so that a shorter interval, or send turned on, applies now
  // and not at the end of a wait begun under the old one (up to a whole old interval).
  auto since = std::chrono::steady_clock::now();
  bool first = true;  // the first run comes shortly after start
  for (;;) {
    const auto interval = runtime_()->config->tlsrpt.interval;
    timer_.expires_at(since + (first ? std::min<std::chrono::steady_clock::duration>(interval, kFirstRun)
                                     : std::chrono::steady_clock::duration(interval)));
    error_code ec;
    co_await timer_.async_wait(asio::redirect_error(asio::use_awaitable, ec));
    if (stopping) co_return;
    if (ec == asio::error::operation_aborted) continue;  // reconfigured(): measured again
    first = false;
    if (runtime_()->config->tlsrpt.send) co_await run_once(unix_now());  // else kept and served, never sent
    since = std::chrono::steady_clock::now();
  }
}

void TlsRptSender::reconfigured() { timer_.cancel(); }

void TlsRptSender::stop() {
  stopped_ = true;
  if (close_in_flight_) close_in_flight_();
}

void TlsRptSender::on_stop(std::function<void()> close) {
  close_in_flight_ = std::move(close);
  if (stopped_) close_in_flight_();
}

asio::awaitable<std::size_t> TlsRptSender::run_once(std::int64_t now) {
  *running_ = true;
  struct NotRunning {  // also when a try throws, or the frame is destroyed with the event loop
    std::shared_ptr<bool> running;
    ~NotRunning() { *running = false; }
  } not_running{running_};
  const auto current = runtime_();
  const config::Config& config = *current->config;
  const auto started = std::chrono::steady_clock::now();
  TlsRptStore& store = telemetry_.tlsrpt();
  auto keys = store.reports_before(utc_date(now));
  if (ledger_.keep_only(keys, oldest_kept_date(now)) > 0) ledger_changed_ = true;
  std::erase_if(last_turn_,
                [&](const auto& turn) { return !std::binary_search(keys.begin(), keys.end(), turn.first); });
  // Reports never tried first (oldest day first), then those tried again, the one whose last try in this
  // process was longest ago first. A run tries at most max_reports_per_run and ends once it has taken
  // tlsrpt.interval, and a report whose rua keeps failing (an https rua that never answers holds each try for
  // https_timeout) is tried at every run until retry_for gives it up: in plain date and domain order, enough
  // of them at the front kept every report behind them from its first try until they were given up, day after
  // day, and the retries at the back would never get the time left.
  const auto turn = [&](const TlsRptLedger::Key& key) {
    const auto last = last_turn_.find(key);
    return std::pair{ledger_.tried_before(key), last == last_turn_.end() ? std::uint64_t{0} : last->second};
  };
  std::vector<std::pair<std::pair<bool, std::uint64_t>, TlsRptLedger::Key>> ranked;  // each looked up once
  ranked.reserve(keys.size());
  for (auto& key : keys) ranked.emplace_back(turn(key), std::move(key));
  std::stable_sort(ranked.begin(), ranked.end(),
                   [](const auto& a, const auto& b) { return a.first < b.first; });
  for (std::size_t i = 0; i < keys.size(); ++i) keys[i] = std::move(ranked[i].second);
  if (keys.empty()) {
    save_ledger();
    co_return 0;
  }

  // The report mails' route: an mx upstream of mailflowd's own with opportunistic STARTTLS, in a copy of the
  // runtime that carries its TLS context (UpstreamLeg finds it by the upstream's name).
  config::Upstream upstream;
  upstream.name = std::string(kLabel);
  upstream.mx = true;
  upstream.port = config.tlsrpt.smtp_port;
  upstream.tls = config::UpstreamTls::opportunistic;
  upstream.xclient = false;
  upstream.mta_sts = config::MtaStsMode::off;
  auto runtime = std::make_shared<Runtime>(*current);
  runtime->upstream_tls[upstream.name] = std::make_shared<const ClientTls>(upstream);

  const auto submitter = store.submitter();
  // The destinations that held a try of this run until its deadline: their other reports wait for the next
  // run. A host that is down (or drops the packets, or stalls) for the run held every report of its rua for
  // the whole timeout, one after another: a thousand domains that send their reports to one reporting service
  // took the run's whole interval, and the reports to every other rua waited behind them. An https rua's host
  // and port (tlsrpt.https_timeout); a mailto: rua's mail domain (timeouts.upstream_open, dns.timeout of its
  // MX lookup, or the timeouts.* of the step where one of its MX hosts hung in a walk that no host took), as
  // Postfix's queue manager suspends delivery to a destination (the next-hop domain, not one of its hosts)
  // after a failed try: its MX walk already tried every host of the domain in that time, and a try of
  // another report to it walks the same hosts in the same order.
  std::set<std::string, std::less<>> unreachable;  // "https://host:port", "the mail hosts of DOMAIN"
  std::size_t skipped = 0;                         // reports with a rua not tried for that
  std::size_t tried = 0;
  bool forgot = false;  // a report was done with (sent to every rua, or given up)
  bool cut_short = false;  // stop() ended a try: the run ends, the report stays as it was
  for (std::size_t at = 0; at < keys.size(); ++at) {
    const auto& key = keys[at];
    if (cut_short || stopped_ || (stopping_ != nullptr && *stopping_)) break;
    // A reload that turned tlsrpt.send off ends the run here, not at its end: the operator stopped the
    // sending (reports going where they should not), and a run may take up to tlsrpt.interval (an hour by
    // default).
    if (!runtime_()->config->tlsrpt.send) {
      log_event(LogLevel::info, "tlsrpt_deferred",
                {{"reports", keys.size() - at}, {"reason", "tlsrpt.send was turned off by a reload"}});
      break;
    }
    // The reports left are those from here on: keys.size() - tried also counted the reports before this one
    // that were not tried (every rua skipped, said in the other tlsrpt_deferred line) or had left the store.
    if (tried >= config.tlsrpt.max_reports_per_run) {
      log_event(LogLevel::info, "tlsrpt_deferred",
                {{"reports", keys.size() - at}, {"reason", "tlsrpt.max_reports_per_run reached"}});
      break;
    }
    // Each try has its deadline (https_timeout; the report mail's timeouts.*, up to half an hour), but with
    // 10 rua per report and max_reports_per_run reports, a run of destinations that hang until their deadline
    // would last days (1000 x 30s for one silent https rua each: 8 hours), and no next run, with the new
    // day's reports that go first, could begin: one interval is the run's share, the rest waits for the next
    // run.
    if (tried > 0 && std::chrono::steady_clock::now() - started >= config.tlsrpt.interval) {
      log_event(
          LogLevel::info, "tlsrpt_deferred",
          {{"reports", keys.size() - at},
           {"reason", "the run took tlsrpt.interval " + config::format_duration(config.tlsrpt.interval)}});
      break;
    }
    const auto day = store.find(key.first, key.second);
    if (!day || day->rua.empty()) continue;
    ++tried;
    // Its turn, taken back below if none of its rua was tried (every one skipped).
    const auto previous_turn = last_turn_.find(key);
    const std::optional<std::uint64_t> turn_before =
        previous_turn == last_turn_.end() ? std::nullopt : std::optional(previous_turn->second);
    last_turn_[key] = ++turns_;
    const std::string gzipped = gzip(proto::tlsrpt::render_json(*day, submitter));
    const auto pending = ledger_.to_try(key, day->rua);
    if (pending.empty()) {
      // Every rua took (or refused) this day's report already: sessions recorded for the day after its report
      // went out (the clock was stepped back over midnight), or a crash before the store's save. RFC 8460
      // section 4: a report covers one UTC day; a second one for the same day would be counted twice.
      log_event(LogLevel::warn, "tlsrpt_not_sent_again",
                {{"date", day->date},
                 {"domain", day->domain},
                 {"reason", "the report of this day was already sent to every rua"}});
    }
    std::set<std::string, std::less<>> skipped_here;  // its rua not tried in this run
    for (const auto& uri : pending) {
      const RuaTarget target = parse_rua(uri);
      const std::string destination = !target.valid ? std::string()
                                      : target.method == RuaTarget::Method::https
                                          ? "https://" + proto::ascii_lower(target.host) + ":" + target.port
                                          : "the mail hosts of " + target.domain;
      if (!destination.empty() && unreachable.contains(destination)) {
        // Not tried (nor put in the ledger as tried): counted, and said once at the end of the run.
        skipped_here.insert(uri);
        telemetry_.tlsrpt_delivery(to_string(target.method), "skipped");
        continue;
      }
      std::string detail;
      TlsRptDelivery result = TlsRptDelivery::permanent_failure;
      bool timed_out = false;
      if (!target.valid) {
        detail = "unusable rua URI";
      } else if (target.method == RuaTarget::Method::mailto) {
        result = co_await deliver_mailto(*runtime, upstream, *day, target, gzipped, detail, timed_out);
      } else {
        result = co_await deliver_https(*runtime, target, gzipped, detail, timed_out);
      }
      if (stopped_ && result != TlsRptDelivery::success) {
        log_event(LogLevel::info, "tlsrpt_delivery",
                  {{"date", day->date},
                   {"domain", day->domain},
                   {"rua", uri},
                   {"method", to_string(target.method)},
                   {"result", "shutdown"},
                   {"detail", "the daemon is stopping; sent at the next start"}});
        cut_short = true;
        break;
      }
      telemetry_.tlsrpt_delivery(to_string(target.method), to_string(result));
      log_event(result == TlsRptDelivery::success ? LogLevel::info : LogLevel::warn, "tlsrpt_delivery",
                {{"date", day->date},
                 {"domain", day->domain},
                 {"rua", uri},
                 {"method", to_string(target.method)},
                 {"result", to_string(result)},
                 {"bytes", gzipped.size()},
                 {"detail", detail}});
      if (timed_out && result == TlsRptDelivery::temporary_failure) unreachable.insert(destination);
      // Saved at once, before the next rua: a stop or crash while a later one is tried (or later in the run)
      // must not send this report again where it was taken.
      ledger_.tried(key, uri, result, now);
      ledger_changed_ = true;
      save_ledger();
    }
    if (cut_short) break;
    if (!skipped_here.empty()) ++skipped;
    // A report none of whose rua was tried took none of the run's time: not one of max_reports_per_run. Its
    // verdict below still starts its retry_for (the skip is for a destination that just failed a try): a rua
    // down for all of retry_for gives up the reports to it, not only the one tried at each run.
    // Nor did it take its turn: it goes before the report that timed out at the next run. A report whose own
    // POST times out (a large one on a slow link, a path of the host that hangs) went first again at every
    // run, being the one tried longest ago, and the host's other reports, which it would have taken, were
    // skipped behind it at each run until retry_for gave them up, never tried.
    const bool untried = !skipped_here.empty() && skipped_here.size() == pending.size();
    if (untried) {
      --tried;
      if (turn_before)
        last_turn_[key] = *turn_before;
      else
        last_turn_.erase(key);
    }
    // Its retry_for starts (a host down for all of it gives up every report to it, not one per run), but a
    // rua is given up only at a run that tried it: one whose time ran out was given up in the very run that
    // skipped it (with retry_for 0 every report behind the first one to a host that did not answer, the host
    // never asked for them; and the skipped rua of a report whose other rua were tried), although retry_for
    // counts from a report's first try. The report is then kept for them.
    const auto verdict = ledger_.verdict(
        key, day->rua, now, std::chrono::duration_cast<std::chrono::seconds>(config.tlsrpt.retry_for),
        skipped_here);
    ledger_changed_ = true;
    save_ledger();
    for (const auto& uri : verdict.given_up) {
      telemetry_.tlsrpt_delivery(to_string(parse_rua(uri).method), "gave_up");
      log_event(LogLevel::warn, "tlsrpt_gave_up",
                {{"date", day->date},
                 {"domain", day->domain},
                 {"rua", uri},
                 {"reason", "still failing after tlsrpt.retry_for"}});
    }
    if (verdict.kind == TlsRptLedger::Verdict::Kind::retry) continue;
    store.forget(key.first, key.second);
    forgot = true;
  }
  resolver_.reset();  // the next run uses the dns settings of its time
  if (skipped > 0) {
    std::string destinations;
    for (const auto& destination : unreachable)
      destinations += (destinations.empty() ? "" : ", ") + destination;
    log_event(
        LogLevel::warn, "tlsrpt_deferred",
        {{"reports", skipped}, {"reason", "their rua timed out earlier in this run (" + destinations + ")"}});
  }
  if (forgot) {
    // The reports done with are saved gone from the store at once (the writer writes jobs in order: this one
    // before the ledger's below), and only then forgotten by the ledger (which has them, nothing left to try,
    // since their last try): after a crash none comes back from an older tlsrpt.state unknown to the ledger,
    // to go out again to every rua. The reports kept are read before the text is serialized: one done with in
    // between stays in the ledger until the next save.
    auto kept = std::make_shared<std::vector<TlsRptLedger::Key>>();
    writer_.write(
        [&store, kept, today = utc_date(now)] {
          *kept = store.reports_before(today);
          return std::vector{store.state_file()};
        },
        [this, kept, oldest = oldest_kept_date(now)](bool saved) {
          if (!saved) return;
          asio::post(executor_, [this, kept, oldest] {
            if (ledger_.keep_only(*kept, oldest) > 0) {
              ledger_changed_ = true;
              save_ledger();
            }
          });
        });
  }
  save_ledger();
  co_return tried;
}

asio::awaitable<TlsRptDelivery> TlsRptSender::deliver_mailto(const Runtime& runtime,
                                                             const config::Upstream& upstream,
                                                             const proto::tlsrpt::DomainDay& day,
                                                             const RuaTarget& rua, const std::string& gzipped,
                                                             std::string& detail, bool& timed_out) {
  const config::Config& config = *runtime.config;
  const std::int64_t now = unix_now();
  const std::uint64_t sequence = ++sequence_;
  const std::string unique = fmt::format("{:016x}.{}", unique_, sequence);
  proto::tlsrpt::MailParts parts;
  parts.from = config.tlsrpt.from;
  parts.to = rua.address;
  parts.date_header = rfc5322_date(now);
  parts.message_id = fmt::format("tlsrpt.{}.{}.{}@{}", day.date, now, unique, config.hostname);
  parts.boundary = "----=_tlsrpt_" + unique;
  const std::string message = proto::tlsrpt::render_mail(day, telemetry_.tlsrpt().submitter(), gzipped, parts);

  auto conversation = std::make_shared<Conversation>(runtime, telemetry_, executor_, "tlsrpt-" + unique);
  conversation->deadlines.start(conversation);
  struct StopWatchdog {  // also when converse() throws: the watchdog holds the conversation until stopped
    Deadlines& deadlines;
    ~StopWatchdog() { deadlines.stop(); }
  } stop_watchdog{conversation->deadlines};
  on_stop([weak = std::weak_ptr<Conversation>(conversation)] {
    if (const auto in_flight = weak.lock()) in_flight->leg.force_close();
  });
  const TlsRptDelivery result =
      co_await converse(*conversation, upstream, rua, config, message, detail, timed_out);
  close_in_flight_ = nullptr;
  co_await conversation->leg.close(true);
  co_return result;
}

asio::awaitable<TlsRptDelivery> TlsRptSender::deliver_https(const Runtime& runtime, const RuaTarget& rua,
                                                            const std::string& gzipped, std::string& detail,
                                                            bool& timed_out) {
  timed_out = false;
  const config::Config& config = *runtime.config;
  HttpsLimits limits;
  limits.deadline = std::chrono::steady_clock::now() + config.tlsrpt.https_timeout;
  HttpsRequest request;
  request.method = "POST";
  request.host = rua.host;
  request.authority = (rua.host.find(':') != std::string::npos ? "[" + rua.host + "]" : rua.host) +
                      (rua.port == "443" ? "" : ":" + rua.port);
  request.target = rua.target;
  request.headers = proto::tlsrpt::https_post_headers(gzipped.size());
  request.body = gzipped;
  request.ca_file = config.tlsrpt.ca_file;
  request.port = rua.port;
  request.head_only = true;  // the status is what counts (from_http): a body that stalls holds nothing
  error_code ec;
  const auto literal = asio::ip::make_address(rua.host, ec);
  if (!ec) {
    request.addresses.push_back(literal);
  } else {
    // The daemon's resolver (dns.*), as for MX hosts.
    if (!resolver_ || resolver_->spoiled()) {  // spoiled: its cache holds a SERVFAIL of ours (resolver.hpp)
      try {
        resolver_ = std::make_shared<Resolver>(executor_, *runtime.resolver, &telemetry_);
      } catch (const std::exception& e) {
        detail = std::string("DNS resolver unavailable: ") + e.what();
        co_return TlsRptDelivery::temporary_failure;
      }
    }
    // The lookup is part of the POST: given up at its deadline (dns.timeout alone may be longer). A lookup of
    // its own, so that giving it up leaves the run's resolver to the next rua.
    const auto lookup = Resolver::share(resolver_);
    asio::steady_timer deadline(executor_, limits.deadline);
    deadline.async_wait([lookup](const error_code& e) {
      if (!e) lookup->cancel();
    });
    on_stop([lookup] { lookup->cancel(); });  // stop(): its result is not waited for
    const AddressResult addresses = co_await lookup->resolve_addresses(rua.host);
    close_in_flight_ = nullptr;
    deadline.cancel();
    if (stopped_) {
      detail = "stopped while looking up " + rua.host;
      co_return TlsRptDelivery::temporary_failure;
    }
    request.addresses = addresses.addresses;
    if (request.addresses.empty() && std::chrono::steady_clock::now() >= limits.deadline) {
      timed_out = true;
      detail = "looking up " + rua.host + " timed out (tlsrpt.https_timeout " +
               config::format_duration(config.tlsrpt.https_timeout) + ")";
      co_return TlsRptDelivery::temporary_failure;
    }
    // A query that got no answer within dns.timeout (shorter than https_timeout) held the try as long, and
    // the next report to the host asks again (libunbound keeps no record of it): a try that fails after it is
    // marked as a POST that timed out is, also where the other family's query gave an address (a name server
    // that drops AAAA queries). A SERVFAIL or NXDOMAIN answers at once.
    timed_out = addresses.aaaa == DnsOutcome::timeout || addresses.a == DnsOutcome::timeout;
    if (request.addresses.empty()) {
      detail = "no address for " + rua.host + (addresses.detail.empty() ? "" : ": " + addresses.detail);
      co_return addresses.status == AddressResult::Status::none ? TlsRptDelivery::permanent_failure
                                                                 : TlsRptDelivery::temporary_failure;
    }
  }

  // stop() ends the POST where it is, as it closes a report mail in flight.
  request.abort = std::make_shared<HttpsAbort>();
  on_stop([abort = request.abort] { abort->abort(); });
  const auto response = co_await https_request(executor_, std::move(request), limits);
  close_in_flight_ = nullptr;
  using Step = HttpsResponse::Step;
  // The status is what counts: a complete head is enough (a truncated close or an oversized body after it
  // does not change the answer).
  if (!response.head) {
    const std::string where = rua.host + " (" + response.address + "): ";
    timed_out = timed_out || response.error == HttpsResponse::Error::timed_out;
    const std::string why =
        response.error == HttpsResponse::Error::timed_out ? "timed out" : response.error_text;
    switch (response.step) {
      case Step::ca_file:
        detail = "cannot load CA certificates: " + response.error_text;
        break;
      case Step::connect:
        detail = "cannot connect to " + where + why;
        break;
      case Step::handshake:
        detail = response.error == HttpsResponse::Error::certificate_invalid
                     ? "certificate of " + where + response.error_text
                     : "TLS handshake failed with " + where + why;
        break;
      case Step::write:
        detail = "cannot send the report to " + where + why;
        break;
      default:  // resolve is not asked for (addresses are given); read, or done without a head
        detail = "no valid HTTP answer from " + where + why;
    }
    co_return TlsRptDelivery::temporary_failure;
  }
  detail = rua.host + " (" + response.address + ") answered " + std::to_string(response.status);
  if (response.status / 100 == 3) detail += " (redirects are not followed)";
  co_return from_http(response.status);
}

}  // namespace mailflow
