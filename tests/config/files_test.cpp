// Files users read or write: the broken examples (with their expected errors), the shipped example configs,
// and docs/configuration.md (which must document exactly the keys the loader accepts).
#include <doctest/doctest.h>

#include <algorithm>
#include <filesystem>
#include <regex>
#include <set>
#include <sstream>

#include "config/config.hpp"
#include "tests/config/test_util.hpp"

namespace mailflow::config {
namespace {

using test::all_errors;
using test::read_text;
using test::TempDir;

const std::string source_dir = MAILFLOW_SOURCE_DIR;

// "# expect: LINE:COL: message" lines: each names one error, in order; together they are all the errors.
std::vector<std::string> expectations(const std::string& path) {
  std::vector<std::string> out;
  std::istringstream in(read_text(path));
  for (std::string line; std::getline(in, line);) {
    if (line.starts_with("# expect: ")) out.push_back(line.substr(10));
  }
  return out;
}

TEST_CASE("broken configs report exactly the expected errors") {
  std::vector<std::string> files;
  for (const auto& entry : std::filesystem::directory_iterator(source_dir + "/tests/config/broken")) {
    if (entry.path().extension() == ".yaml") files.push_back(entry.path().string());
  }
  std::sort(files.begin(), files.end());
  CHECK(files.size() >= 5);
  for (const auto& file : files) {
    CAPTURE(file);
    const auto expected = expectations(file);
    REQUIRE_MESSAGE(!expected.empty(), "no '# expect:' line in ", file);
    const auto result = load_config_file(file);
    INFO(all_errors(result));
    CHECK(result.config == nullptr);
    REQUIRE(result.errors.size() == expected.size());
    for (std::size_t i = 0; i < expected.size(); ++i) {
      CHECK(result.errors[i].to_string().starts_with(file + ":" + expected[i]));
    }
  }
}

TEST_CASE("the reference example is valid and mentions every key") {
  const std::string path = source_dir + "/config/examples/mailflowd.yaml";
  const auto result = load_config_file(path);
  INFO(all_errors(result));
  REQUIRE(result.config);
  CHECK(result.config->hostname == "mx1.example.org");
  CHECK(result.config->listeners.size() == 2);
  // Keys that need files of your own (certificates, a password hash) are commented out, so the file is valid
  // on any machine; they must still be there to be uncommented.
  const std::string text = read_text(path);
  for (const auto& key : known_keys()) {
    const std::string leaf =
        key.substr(key.find_last_of(".]") == std::string::npos ? 0 : key.find_last_of(".]") + 1);
    CAPTURE(key);
    CHECK(std::regex_search(text, std::regex("(\\n|[{ ,])" + leaf + ":")));
  }
  // The commented-out blocks are themselves valid once uncommented (with certificate files that exist).
  TempDir dir;
  const std::string cert = dir.write("c.pem", "x");
  std::string uncommented;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) {
    for (const char* block : {"    # tls:", "    #   ", "  # basic_auth:", "  #   user:",
                              "  #   password_hash:", "  # tls:", "  #   cert:", "  #   key:"}) {
      if (line.starts_with(block)) {
        line.erase(line.find('#'), 2);
        break;
      }
    }
    line = std::regex_replace(line, std::regex("/etc/mailflowd/tls/[a-z0-9]+\\.(pem|key)"), cert);
    line = std::regex_replace(line, std::regex("\\$2b\\$12\\$\\.\\.\\."),
                              "$$2b$$12$$abcdefghijklmnopqrstuuOeZ2hQ32AyBh8ZYFFLfYoUxWKOV2GcS");
    uncommented += line + "\n";
  }
  const auto full = load_config_string(uncommented, "uncommented.yaml");
  INFO(uncommented);
  INFO(all_errors(full));
  REQUIRE(full.config);
  REQUIRE(full.config->listeners[0].tls.has_value());
  CHECK(full.config->listeners[0].tls->certificates.size() == 2);
  CHECK(full.config->http.basic_auth.has_value());
  CHECK(full.config->http.tls.has_value());
}

TEST_CASE("the make run example is valid where run/ has the dev certificate") {
  TempDir dir;
  dir.write("run/dev-cert.pem", "cert");
  dir.write("run/dev-key.pem", "key");
  const auto cwd = std::filesystem::current_path();
  std::filesystem::current_path(dir.path());
  const auto result = load_config_file(source_dir + "/config/examples/dev.yaml");
  std::filesystem::current_path(cwd);
  INFO(all_errors(result));
  REQUIRE(result.config);
  const Config& c = *result.config;
  REQUIRE(c.find_listener("inbound"));
  CHECK(c.find_listener("inbound")->address.text == "127.0.0.1:2525");
  CHECK(c.find_listener("inbound")->tls->certificates[0].cert == "run/dev-cert.pem");
  REQUIRE(c.find_upstream("sink"));
  CHECK(c.find_upstream("sink")->address.text == "127.0.0.1:2526");
  CHECK(c.find_upstream("sink")->tls == UpstreamTls::none);
  CHECK(c.http.address.text == "127.0.0.1:9725");
  CHECK(c.state_dir == "run/state");
  REQUIRE(c.connectors.size() == 2);
  CHECK(c.connectors[0].match.client_cidrs[0].contains(*parse_ip_address("127.0.0.2")));
  CHECK(c.connectors[1].match.sender_domains == std::vector<std::string>{"contoso.com", "*.contoso.com"});
}

TEST_CASE("docs/configuration.md documents exactly the accepted keys") {
  // Every table row whose first cell is a `key.path` is a documented key.
  const std::string doc = read_text(source_dir + "/docs/configuration.md");
  REQUIRE_FALSE(doc.empty());
  std::set<std::string> documented;
  const std::regex row(R"(^\| `([a-z0-9_.\[\]]+)` \|)");
  std::istringstream in(doc);
  for (std::string line; std::getline(in, line);) {
    std::smatch m;
    if (std::regex_search(line, m, row)) documented.insert(m[1]);
  }
  const auto keys = known_keys();
  const std::set<std::string> accepted(keys.begin(), keys.end());
  CHECK(accepted.size() == keys.size());
  for (const auto& key : accepted) {
    CAPTURE(key);
    CHECK_MESSAGE(documented.count(key) == 1, "accepted but not documented: ", key);
  }
  for (const auto& key : documented) {
    CAPTURE(key);
    CHECK_MESSAGE(accepted.count(key) == 1, "documented but not accepted: ", key);
  }
}

}  // namespace
}  // namespace mailflow::config
