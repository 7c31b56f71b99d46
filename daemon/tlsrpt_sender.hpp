#pragma once
// Sends the TLS-RPT reports (RFC 8460 section 5) that TlsRptStore keeps, when tlsrpt.send is true: shortly
// after start and then every tlsrpt.interval, every finished UTC day (before today) x policy domain with rua
// addresses gets its report (JSON, gzip) delivered to each rua:
//   mailto:  the section 5.3 mail through mailflowd's own MX delivery (an UpstreamLeg to the address's domain
//            MX hosts on tlsrpt.smtp_port, opportunistic STARTTLS), MAIL FROM tlsrpt.from, dot-stuffed DATA;
//   https:   a POST (Boost.Beast) of the gzip body, certificate verified (tlsrpt.ca_file or the system
//            store), TLS1.2+, no redirects followed, only the answer's head read, all within
//            tlsrpt.https_timeout.
// A report is forgotten when every rua took it (2xx / 250) or refused it for good (5xx, 4xx other than 408
// and 429), or when it still fails tlsrpt.retry_for after its first try (gave_up); each try of each rua is
// counted in mailflow_tlsrpt_deliveries_total{method,result} and logged. At most tlsrpt.max_reports_per_run
// reports are tried per run, and a run ends once it has taken tlsrpt.interval; those never tried first
// (oldest day first), then the retries (the one tried longest ago first), so that a large store never stalls
// the loop, nor reports that keep failing, or hang until their deadline, the first try of the others. Which
// rua took a report and when its first try was (TlsRptLedger) is kept in state_dir/tlsrpt-ledger.state: saved
// after each rua's try (and by save_ledger() with the other state), loaded at start, so that a restart
// neither sends a report again to a rua that took it nor gives a failing report a new retry_for. Both files
// are written by the daemon's StateWriter, off the event loop and in order (a ledger write still queued takes
// the newer text).
#include <utility>  // before Asio (Boost 1.74 + GCC 12)

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/steady_timer.hpp>

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>

#include "config/config.hpp"
#include "daemon/tlsrpt_ledger.hpp"
#include "proto/tlsrpt.hpp"

namespace mailflow {

struct Runtime;
class Resolver;
class StateWriter;
class Telemetry;

// What a rua URI says where to deliver: "mailto:a%40b@example.net?subject=x" -> address, domain;
// "https://reports.example.net:8443/v1?x" -> host, port, target. Nullopt-like: `valid` false.
struct RuaTarget {
  enum class Method { mailto, https };
  Method method = Method::mailto;
  bool valid = false;
  std::string address;  // mailto: the recipient (percent-decoded, no query)
  std::string domain;   // mailto: its domain, lower-case
  std::string host;     // https: without brackets
  std::string port = "443";
  std::string target = "/";  // https: path and query
};
RuaTarget parse_rua(std::string_view uri);
std::string_view to_string(RuaTarget::Method method);  // "mailto", "https"

// Dot-stuffing (RFC 5321 4.5.2) of CRLF text and the terminating "CRLF.CRLF".
std::string dot_stuff_for_data(std::string_view text);

class TlsRptSender {
 public:
  using RuntimeSource = std::function<std::shared_ptr<const Runtime>()>;

  // `state_dir`: where the ledger is kept (the one the daemon started with; a reload does not change it);
  // `writer` writes it there (and tlsrpt.state after a run), off the event loop.
  TlsRptSender(boost::asio::any_io_executor executor, Telemetry& telemetry, RuntimeSource runtime,
               std::string state_dir, StateWriter& writer);

  // At start, before run(): a corrupt or oversized ledger file is moved aside (true, `error` says so, for the
  // caller to log and count as the other state files); false + error when the file cannot be read at all.
  bool load_ledger(std::int64_t now, std::string& error);
  // Hands the ledger to the writer if it changed since the last save; a failure is logged and counted there
  // (mailflow_state_errors_total{reason="save_failed"}) and tried again at the next call. Runs on the
  // sender's executor (the ledger is not thread-safe: it is serialized here, written on the writer's thread).
  void save_ledger();
  // The last save at stop, once tlsrpt.state has been written from the store as it is now (nothing queued
  // before it is left): the ledger forgets the reports the store no longer holds and is handed to the writer.
  // (A run does the same after its own save of the store, which a stop may cut short.)
  void forget_reports_saved_gone(std::int64_t now);

  // The task: a first run shortly after start, then one every tlsrpt.interval while tlsrpt.send is true (a
  // reload may turn it on or off); returns when `stopping` is set.
  boost::asio::awaitable<void> run(const std::atomic<bool>& stopping);
  // After a reload, on the sender's executor: the wait under way is measured again with the new
  // tlsrpt.interval (a run that is due by it starts now), and tlsrpt.send applies from then.
  void reconfigured();
  // One run at unix time `now`: returns how many reports were tried.
  boost::asio::awaitable<std::size_t> run_once(std::int64_t now);

  // At stop, once the sessions are done: the report mail or POST in flight (if any, its lookup included) is
  // ended where it is, as a stop closes a relay session's upstream leg. The daemon's own doing, so nobody's
  // failure: a try that ends after this is logged with result=shutdown and neither counted nor put in the
  // ledger (the report goes out at the next start), and no upstream error or MX attempt is counted for it.
  // The run ends after that try.
  void stop();
  bool running() const { return *running_; }  // a run is in progress (the daemon waits for it to end)

 private:
  // `upstream`: the mx upstream the mail goes through (its TLS context is in `runtime`). `timed_out`: the try
  // ended because a deadline passed (UpstreamLeg::timed_out()), so the rua domain's other reports in the run
  // are not tried (run_once()).
  boost::asio::awaitable<TlsRptDelivery> deliver_mailto(const Runtime& runtime,
                                                        const config::Upstream& upstream,
                                                        const proto::tlsrpt::DomainDay& day,
                                                        const RuaTarget& rua, const std::string& gzipped,
                                                        std::string& detail, bool& timed_out);
  // `timed_out`: the POST (its lookup included) waited until tlsrpt.https_timeout, so the host's other
  // reports in the run are not tried (run_once()).
  boost::asio::awaitable<TlsRptDelivery> deliver_https(const Runtime& runtime, const RuaTarget& rua,
                                                       const std::string& gzipped, std::string& detail,
                                                       bool& timed_out);

  boost::asio::any_io_executor executor_;
  Telemetry& telemetry_;
  RuntimeSource runtime_;
  std::string state_dir_;
  StateWriter& writer_;
  TlsRptLedger ledger_;
  boost::asio::steady_timer timer_;          // run()'s wait between runs, which reconfigured() cancels
  std::atomic<bool> ledger_changed_{false};  // since the last save (set again by the writer when it failed)
  // The ledger's text handed to the writer and not yet taken by it (nullopt: no ledger write is queued).
  struct UnsavedLedger {
    std::mutex mutex;
    std::optional<std::string> text;
  };
  std::shared_ptr<UnsavedLedger> unsaved_ledger_ = std::make_shared<UnsavedLedger>();
  const std::atomic<bool>* stopping_ = nullptr;
  bool stopped_ = false;                   // stop() was called
  // run_once() is in progress. Shared with the run's frame, which says when it ends: a run that outlasted the
  // drain's wait is destroyed with the event loop, after this sender (it wrote the flag in freed memory).
  std::shared_ptr<bool> running_ = std::make_shared<bool>(false);
  std::function<void()> close_in_flight_;  // ends the try in flight (report mail, POST, lookup): on_stop()
  // Installs how stop() ends the step that begins now; after a stop() that came between two steps (when
  // nothing was in flight to end), ends it at once, before it waits.
  void on_stop(std::function<void()> close);
  std::shared_ptr<Resolver> resolver_;  // https: rua host names, during one run (dns settings of that run)
  // When each report was last tried in this process (a count of tries): the retries of a run, the one tried
  // longest ago first, so that those in front which hang until their deadline do not take every run's time.
  std::map<TlsRptLedger::Key, std::uint64_t> last_turn_;
  std::uint64_t turns_ = 0;
  std::uint64_t unique_ = 0;            // random, with sequence_: Message-IDs, MIME boundaries, session ids
  std::uint64_t sequence_ = 0;
};

}  // namespace mailflow
