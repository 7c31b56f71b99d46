// The CLIs' options that take a value: "--name=value" and "--name value", one parser for all of them.
#include <doctest/doctest.h>

#include <string>
#include <vector>

#include "daemon/cli_http.hpp"

namespace {

using mailflow::cli::parse_valued_option;
using mailflow::cli::ValuedOption;

struct Argv {
  explicit Argv(std::vector<std::string> args) : strings(std::move(args)) {
    for (auto& s : strings) pointers.push_back(s.data());
  }
  int argc() const { return static_cast<int>(pointers.size()); }
  char** argv() { return pointers.data(); }
  std::vector<std::string> strings;
  std::vector<char*> pointers;
};

TEST_CASE("parse_valued_option: --name=value and --name value, unknown names and missing values") {
  Argv a({"cmd", "--days=7", "--format", "csv", "--days", "--bogus=1", "-c", "x.yaml", "--format="});
  ValuedOption option;
  std::string error;
  int i = 1;
  REQUIRE(parse_valued_option(a.argc(), a.argv(), i, {"--days", "--format", "-c"}, option, error));
  CHECK((option.name == "--days" && option.value == "7" && i == 1));
  i = 2;
  REQUIRE(parse_valued_option(a.argc(), a.argv(), i, {"--days", "--format", "-c"}, option, error));
  CHECK((option.name == "--format" && option.value == "csv" && i == 3));  // the value consumed
  i = 5;
  CHECK_FALSE(parse_valued_option(a.argc(), a.argv(), i, {"--days", "--format", "-c"}, option, error));
  CHECK(error.empty());  // not one of ours: the caller says "unknown argument"
  CHECK(i == 5);
  i = 6;
  REQUIRE(parse_valued_option(a.argc(), a.argv(), i, {"--days", "--format", "-c"}, option, error));
  CHECK((option.name == "-c" && option.value == "x.yaml" && i == 7));
  i = 8;
  REQUIRE(parse_valued_option(a.argc(), a.argv(), i, {"--days", "--format", "-c"}, option, error));
  CHECK((option.name == "--format" && option.value.empty()));  // an empty value is the caller's to refuse
  Argv last({"cmd", "--days"});
  i = 1;
  CHECK_FALSE(parse_valued_option(last.argc(), last.argv(), i, {"--days"}, option, error));
  CHECK(error == "--days needs a value");
}

}  // namespace
