// log_event as an operator's tools see it: JSON numbers for numeric fields, and under the systemd journal
// (JOURNAL_STREAM names stderr) an sd-daemon "<N>" priority prefix instead of a timestamp.
#include "daemon/log.hpp"

#include <doctest/doctest.h>

#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>

namespace {

// Runs `body` with stderr redirected to a fresh file; returns what was written. `journal`: JOURNAL_STREAM is
// set to that file's device:inode for the duration, as systemd sets it for a service's stderr.
template <class Body>
std::string capture_stderr(bool journal, Body body) {
  const auto path = std::filesystem::temp_directory_path() / ("mailflow-log-test-" + std::to_string(::getpid()));
  std::fflush(stderr);
  const int saved = ::dup(STDERR_FILENO);
  std::FILE* file = std::fopen(path.c_str(), "w");
  REQUIRE(file != nullptr);
  ::dup2(::fileno(file), STDERR_FILENO);
  if (journal) {
    struct stat info {};
    ::fstat(STDERR_FILENO, &info);
    const std::string stream = std::to_string(info.st_dev) + ":" + std::to_string(info.st_ino);
    ::setenv("JOURNAL_STREAM", stream.c_str(), 1);
  } else {
    ::unsetenv("JOURNAL_STREAM");
  }
  body();
  std::fflush(stderr);
  ::dup2(saved, STDERR_FILENO);
  ::close(saved);
  std::fclose(file);
  ::unsetenv("JOURNAL_STREAM");
  std::ifstream in(path);
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::filesystem::remove(path);
  return text;
}

mailflow::config::Log log_config(mailflow::config::LogFormat format) {
  mailflow::config::Log log;
  log.level = "debug";
  log.format = format;
  return log;
}

}  // namespace

TEST_CASE("LogField carries integers as numbers, whatever their type") {
  CHECK(mailflow::LogField("n", 0).value() == "0");
  CHECK(mailflow::LogField("n", std::size_t{18446744073709551615u}).value() == "18446744073709551615");
  CHECK(mailflow::LogField("n", std::int64_t{-9223372036854775807 - 1}).value() == "-9223372036854775808");
  CHECK(mailflow::LogField("n", -42).numeric());
  CHECK_FALSE(mailflow::LogField("s", "42").numeric());
  CHECK_FALSE(mailflow::LogField("s", std::string("x")).numeric());
}

TEST_CASE("json format: numeric fields are JSON numbers, text fields strings") {
  const std::string text = capture_stderr(false, [] {
    mailflow::setup_logging(log_config(mailflow::config::LogFormat::json));
    mailflow::log_event(mailflow::LogLevel::info, "stopped",
                        {{"messages", std::uint64_t{12}}, {"client", "192.0.2.1"}, {"id", std::string("0042")}});
  });
  CAPTURE(text);
  CHECK(text.starts_with("{\"time\":\""));
  CHECK(text.find(R"("level":"info","event":"stopped","messages":12,"client":"192.0.2.1","id":"0042"})") !=
        std::string::npos);
  CHECK(text.ends_with("}\n"));
}

TEST_CASE("a measured quantity is a number with three decimals, in JSON and text alike") {
  CHECK(mailflow::LogField("duration", 0.1154).numeric());
  CHECK(mailflow::LogField("duration", 0.1154).value() == "0.115");
  CHECK(mailflow::LogField("duration", 1234567.0).value() == "1234567.000");
  CHECK_FALSE(mailflow::LogField("duration", std::nan("")).numeric());
  CHECK(mailflow::LogField("duration", std::nan("")).value() == "out_of_range");
  CHECK_FALSE(mailflow::LogField("duration", 1e300).numeric());  // 301 digits do not fit
  const std::string json = capture_stderr(false, [] {
    mailflow::setup_logging(log_config(mailflow::config::LogFormat::json));
    mailflow::log_event(mailflow::LogLevel::info, "session", {{"messages", 1}, {"duration", 0.0126}});
  });
  CAPTURE(json);
  CHECK(json.find(R"("event":"session","messages":1,"duration":0.013})") != std::string::npos);
  const std::string text = capture_stderr(false, [] {
    mailflow::setup_logging(log_config(mailflow::config::LogFormat::text));
    mailflow::log_event(mailflow::LogLevel::info, "session", {{"duration", 2.5}});
  });
  CAPTURE(text);
  CHECK(text.find("session duration=2.500") != std::string::npos);
}

TEST_CASE("rate-limited lines: a flood of one reason does not silence another") {
  const std::string text = capture_stderr(false, [] {
    mailflow::setup_logging(log_config(mailflow::config::LogFormat::text));
    for (int i = 0; i < 50; ++i)
      mailflow::log_limited(mailflow::LogLevel::warn, "limit_test", {{"reason", "busy"}, {"n", i}});
    mailflow::log_limited(mailflow::LogLevel::warn, "limit_test", {{"reason", "failed"}, {"n", 50}});
  });
  CAPTURE(text);
  CHECK(text.find("limit_test reason=failed n=50") != std::string::npos);
  std::size_t busy = 0;
  for (auto at = text.find("reason=busy"); at != std::string::npos; at = text.find("reason=busy", at + 1)) ++busy;
  CHECK(busy >= 10);
  CHECK(busy <= 20);  // ten per second: the loop may straddle one second boundary, not two
}

TEST_CASE("text format: numbers unquoted, timestamps without the journal") {
  const std::string text = capture_stderr(false, [] {
    mailflow::setup_logging(log_config(mailflow::config::LogFormat::text));
    mailflow::log_event(mailflow::LogLevel::warn, "drain_timeout", {{"sessions", 3}});
  });
  CAPTURE(text);
  CHECK(text.size() > 25);
  CHECK(text[4] == '-');  // 2026-12-04T...
  CHECK(text.ends_with(" warning drain_timeout sessions=3\n"));
}

TEST_CASE("under the journal: sd-daemon priority prefixes, no timestamp of our own") {
  const std::string text = capture_stderr(true, [] {
    mailflow::setup_logging(log_config(mailflow::config::LogFormat::text));
    mailflow::log_event(mailflow::LogLevel::error, "startup_failed", {{"error", "address in use"}});
    mailflow::log_event(mailflow::LogLevel::warn, "config_warning", {{"warning", "x"}});
    mailflow::log_event(mailflow::LogLevel::info, "started", {{"listeners", 2}});
    mailflow::log_event(mailflow::LogLevel::debug, "detail", {});
  });
  CHECK(text == "<3>error startup_failed error=\"address in use\"\n"
                "<4>warning config_warning warning=x\n"
                "<6>info started listeners=2\n"
                "<7>debug detail\n");
  const std::string json = capture_stderr(true, [] {
    mailflow::setup_logging(log_config(mailflow::config::LogFormat::json));
    mailflow::log_event(mailflow::LogLevel::error, "startup_failed", {{"error", "address in use"}});
  });
  CHECK(json == "<3>{\"level\":\"error\",\"event\":\"startup_failed\",\"error\":\"address in use\"}\n");
}

TEST_CASE("a JOURNAL_STREAM that names another file is not the journal (stderr was redirected)") {
  ::setenv("JOURNAL_STREAM", "1:1", 1);
  CHECK_FALSE(mailflow::stderr_is_journal());
  ::unsetenv("JOURNAL_STREAM");
  CHECK_FALSE(mailflow::stderr_is_journal());
}

TEST_CASE("log.output syslog: nothing on stderr, and back to stderr after a reload without it") {
  auto syslog = log_config(mailflow::config::LogFormat::text);
  syslog.output = mailflow::config::LogOutput::syslog;
  const std::string quiet = capture_stderr(false, [&] {
    mailflow::setup_logging(syslog);
    mailflow::log_event(mailflow::LogLevel::info, "started", {{"listeners", 1}});
  });
  CHECK(quiet.empty());
  const std::string back = capture_stderr(false, [] {
    mailflow::setup_logging(log_config(mailflow::config::LogFormat::text));
    mailflow::log_event(mailflow::LogLevel::info, "reloaded", {{"listeners", 1}});
  });
  CHECK(back.ends_with(" info reloaded listeners=1\n"));
}
