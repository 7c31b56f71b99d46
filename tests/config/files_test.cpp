// Files users read or write: the broken examples (with their expected errors), the shipped example configs,
// and docs/configuration.md (which must document exactly the keys the loader accepts, with its defaults).
#include <doctest/doctest.h>

#include <algorithm>
#include <array>
#include <filesystem>
#include <map>
#include <optional>
#include <regex>
#include <set>
#include <sstream>

#include <yaml-cpp/yaml.h>

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

// docs/configuration.md's table rows: key path -> its default cell.
std::map<std::string, std::string> documented_defaults() {
  std::map<std::string, std::string> out;
  const std::regex row(R"(^\| `([a-z0-9_.\[\]]+)` \| (.*?) \| (.*?) \| )");
  std::istringstream in(read_text(source_dir + "/docs/configuration.md"));
  for (std::string line; std::getline(in, line);) {
    std::smatch m;
    if (std::regex_search(line, m, row)) out[m[1]] = m[3];
  }
  return out;
}

// What a default cell states: "`300s`", "`36700160` (35 MiB)", "`postmaster@` + `hostname`" (terms: literals,
// or key paths whose value is the default, joined), or "`testing` with `mx: true`, `off` otherwise" (a
// default that depends on another key of the same item). Other cells ("required", "absent", "any", "see
// below") state none.
struct StatedDefault {
  std::vector<std::string> terms;
  std::string if_key, if_value;        // "with `if_key: if_value`"; empty: unconditional
  std::vector<std::string> otherwise;  // the terms where that is not so
};

std::vector<std::string> backticked(const std::string& text) {
  std::vector<std::string> out;
  const std::regex term("`([^`]+)`");
  for (auto it = std::sregex_iterator(text.begin(), text.end(), term); it != std::sregex_iterator(); ++it) {
    out.push_back((*it)[1]);
  }
  return out;
}

std::optional<StatedDefault> stated_default(const std::string& cell) {
  const std::string terms = R"(`[^`]+`(?: \+ `[^`]+`)*)";
  const std::string note = R"((?: \(.*\))?)";
  std::smatch m;
  if (std::regex_match(cell, m, std::regex("(" + terms + ")" + note)))
    return StatedDefault{backticked(m[1]), "", "", {}};
  if (std::regex_match(
          cell, m,
          std::regex("(" + terms + ") with `([a-z_]+): ([^`]+)`, (" + terms + ") otherwise" + note))) {
    return StatedDefault{backticked(m[1]), m[2], m[3], backticked(m[4])};
  }
  return std::nullopt;
}

// "listeners[].tls.min_version" -> {"listeners[]", "tls", "min_version"}
std::vector<std::string> segments_of(const std::string& key) {
  std::vector<std::string> out;
  std::istringstream in(key);
  for (std::string part; std::getline(in, part, '.');) out.push_back(part);
  return out;
}

// Every mapping that key's last segment can go into, as a path of map keys and list indexes ("#0").
void parents_of(const YAML::Node& node, const std::vector<std::string>& segments, std::size_t at,
                std::vector<std::string> path, std::vector<std::vector<std::string>>& out) {
  if (at + 1 == segments.size()) {
    out.push_back(path);
    return;
  }
  const std::string& segment = segments[at];
  if (segment.ends_with("[]")) {
    const std::string name = segment.substr(0, segment.size() - 2);
    if (!node.IsMap() || !node[name] || !node[name].IsSequence()) return;
    const YAML::Node list = node[name];
    for (std::size_t i = 0; i < list.size(); ++i) {
      auto next = path;
      next.push_back(name);
      next.push_back("#" + std::to_string(i));
      parents_of(list[i], segments, at + 1, next, out);
    }
    return;
  }
  path.push_back(segment);  // a mapping that is not there yet is made
  const bool there = node.IsMap() && node[segment] && node[segment].IsMap();
  parents_of(there ? node[segment] : YAML::Node(), segments, at + 1, path, out);
}

// Sets (value given) or removes `key` in the mapping at `path`, making the mappings on the way.
void edit(YAML::Node node, const std::vector<std::string>& path, std::size_t at, const std::string& key,
          const std::optional<YAML::Node>& value) {
  if (at == path.size()) {
    if (value) {
      node[key] = *value;
    } else if (node.IsMap()) {
      node.remove(key);
    }
    return;
  }
  if (path[at].starts_with("#")) {
    edit(node[std::stoul(path[at].substr(1))], path, at + 1, key, value);
    return;
  }
  if (!node[path[at]]) {
    if (!value) return;  // nothing to remove
    node[path[at]] = YAML::Node(YAML::NodeType::Map);
  }
  edit(node[path[at]], path, at + 1, key, value);
}

// The value at a key path without lists ("telemetry.defaults"), if the file has it.
std::optional<YAML::Node> value_at(const YAML::Node& node, const std::vector<std::string>& segments,
                                   std::size_t at = 0) {
  if (at == segments.size()) return node;
  if (!node.IsMap() || !node[segments[at]]) return std::nullopt;
  return value_at(node[segments[at]], segments, at + 1);
}

// The mapping at a path of parents_of, if the file has it.
std::optional<YAML::Node> mapping_at(const YAML::Node& node, const std::vector<std::string>& path,
                                     std::size_t at = 0) {
  if (at == path.size()) return node;
  if (path[at].starts_with("#")) return mapping_at(node[std::stoul(path[at].substr(1))], path, at + 1);
  if (!node.IsMap() || !node[path[at]]) return std::nullopt;
  return mapping_at(node[path[at]], path, at + 1);
}

// Whether the mapping has `key: value`.
bool holds(const std::optional<YAML::Node>& mapping, const std::string& key, const std::string& value) {
  if (!mapping || !mapping->IsMap()) return false;
  const YAML::Node& item = *mapping;
  return item[key] && item[key].IsScalar() && item[key].Scalar() == value;
}

// The configuration a file loads to, without where its values were written (a key that is given has a
// position).
std::optional<Config> load_node(const YAML::Node& root) {
  const auto result = load_config_string(YAML::Dump(root), "defaults.yaml");
  if (!result.config) return std::nullopt;
  Config config = *result.config;
  config.positions.clear();
  return config;
}

TEST_CASE("docs/configuration.md states the loader's defaults") {
  // A file that leaves a key out must load to the same configuration as one that gives it its documented
  // default, in every place the key can go in this file. It sets the keys that defaults refer to (hostname,
  // telemetry.defaults) to values other than their own defaults, so that such a reference is checked too.
  TempDir dir;
  const std::string cert = dir.write("c.pem", "x");
  YAML::Node base = YAML::Load(R"(
hostname: mx1.example.org
listeners:
  - name: inbound
    address: "127.0.0.1:2525"
    upstream: mailstore
    tls:
      certificates: [{cert: CERT, key: CERT}]
  - name: outbound
    address: "127.0.0.1:2587"
    direction: outbound
    upstream: internet
upstreams:
  - {name: mailstore, address: "10.0.0.5:25"}
  - {name: internet, mx: true}
connectors:
  - {name: partner, type: onpremises, match: {listener: inbound}}
telemetry:
  defaults: {tls10_share: 0.07, tls11_share: 0.08, no_tls_share: 0.09, min_messages: 7}
)");
  base["state_dir"] = (dir.path() / "state").string();
  base["listeners"][0]["tls"]["certificates"][0]["cert"] = cert;
  base["listeners"][0]["tls"]["certificates"][0]["key"] = cert;
  REQUIRE(load_node(base).has_value());
  const auto keys = known_keys();
  const std::set<std::string> accepted(keys.begin(), keys.end());

  // The documented default as YAML: a literal, another key's value in the file, or their concatenation.
  const auto value_of = [&](const std::vector<std::string>& terms) {
    YAML::Node value;
    std::string joined;
    for (const auto& term : terms) {
      if (accepted.count(term) == 0) {
        value = YAML::Load(term);
      } else {
        const auto referenced = value_at(base, segments_of(term));
        REQUIRE_MESSAGE(referenced.has_value(), "the test's file must set ", term,
                        " to check this reference");
        value = YAML::Clone(*referenced);
      }
      joined += value.IsScalar() ? value.Scalar() : "";
    }
    return terms.size() > 1 ? YAML::Node(joined) : value;
  };

  const auto documented = documented_defaults();
  CHECK(documented.size() == accepted.size());  // every key's row has its default cell where it is looked for
  std::size_t checked = 0;
  for (const auto& [key, cell] : documented) {
    const auto stated_as = stated_default(cell);
    if (!stated_as) continue;
    CAPTURE(key);
    CAPTURE(cell);
    const auto segments = segments_of(key);
    std::vector<std::vector<std::string>> parents;
    parents_of(base, segments, 0, {}, parents);
    // Per branch of a conditional default (one branch otherwise): where the key can be left out, and where
    // the documented default could be compared.
    std::array<bool, 2> left_out_loads{}, compared{};
    for (const auto& parent : parents) {
      const bool condition_holds = stated_as->if_key.empty() ||
                                   holds(mapping_at(base, parent), stated_as->if_key, stated_as->if_value);
      YAML::Node left_out = YAML::Clone(base);
      edit(left_out, parent, 0, segments.back(), std::nullopt);
      YAML::Node stated = YAML::Clone(base);
      edit(stated, parent, 0, segments.back(),
           value_of(condition_holds ? stated_as->terms : stated_as->otherwise));
      const auto without = load_node(left_out);
      const auto with = load_node(stated);
      left_out_loads[condition_holds] = left_out_loads[condition_holds] || without.has_value();
      if (!without || !with) continue;  // e.g. port: beside address:, which is an error whatever its value
      compared[condition_holds] = true;
      INFO("file with the default stated:\n", YAML::Dump(stated));
      const bool same = *without == *with;
      CHECK_MESSAGE(same, "leaving ", key, " out differs from writing its documented default");
    }
    // Nowhere to compare although the key can be left out: the documented default does not even load there.
    for (const bool branch : {false, true}) {
      const std::string where =
          stated_as->if_key.empty()
              ? ""
              : (branch ? " with " : " without ") + stated_as->if_key + ": " + stated_as->if_value;
      CHECK_MESSAGE((compared[branch] || !left_out_loads[branch]), "the documented default of ", key, where,
                    " is refused by the loader");
    }
    checked += compared[false] || compared[true] ? 1 : 0;
  }
  CHECK(checked >= 60);  // 63 when written
}

}  // namespace
}  // namespace mailflow::config
