// /etc/hosts and /etc/resolv.conf text as a fixed upstream's host name is looked up with it
// (proto/hosts_file.hpp).
#include "proto/hosts_file.hpp"

#include <doctest/doctest.h>

#include <string>
#include <string_view>
#include <vector>

namespace {

using namespace mailflow::proto;

TEST_CASE("hosts_records: every name of each line with an IP address - other lines and odd names skipped") {
  const std::string text =
      "# comment\n127.0.0.1\tlocalhost\n"
      "::1 localhost ip6-localhost # a comment after the names\n"
      "  192.0.2.25   mail.example.org   mail  \r\n"
      "fe80::1%lo0 localhost\n"
      "not-an-address some.name\n"
      "192.0.2.26\n"
      "192.0.2.27 bad\"name good-name\n";
  CHECK(hosts_records(text) == std::vector<std::string>{"localhost A 127.0.0.1", "localhost AAAA ::1",
                                                        "ip6-localhost AAAA ::1",
                                                        "mail.example.org A 192.0.2.25", "mail A 192.0.2.25",
                                                        "good-name A 192.0.2.27"});
  CHECK(hosts_records("").empty());
}

TEST_CASE("hosts_records: a name that is no DNS name is skipped, the other names of its line kept") {
  const std::string label63(63, 'a');
  const std::string label64(64, 'a');
  const std::string text = "192.0.2.1 a..b kept-1 .lead trail.. " + label64 + ".example\n" + "192.0.2.2 " +
                           label63 + ".example absolute.example. .\n";
  CHECK(hosts_records(text) == std::vector<std::string>{"kept-1 A 192.0.2.1",
                                                        label63 + ".example A 192.0.2.2",
                                                        "absolute.example. A 192.0.2.2"});
}

TEST_CASE("read_search_list: search or domain, the last line winning, and ndots as glibc reads them") {
  std::vector<std::string> search;
  int ndots = 0;
  read_search_list(
      "nameserver 10.0.0.1\nsearch mail.svc.cluster.local. svc.cluster.local cluster.local\n"
      "options ndots:5 timeout:2 # comment\n",
      search, ndots);
  CHECK(search == std::vector<std::string>{"mail.svc.cluster.local", "svc.cluster.local", "cluster.local"});
  CHECK(ndots == 5);
  read_search_list("search a.example b.example\ndomain corp.example\noptions ndots:x ndots:99\n", search,
                   ndots);
  CHECK(search == std::vector<std::string>{"corp.example"});
  CHECK(ndots == 15);
  std::string many = "search";
  for (int i = 0; i < 40; ++i) many += " d" + std::to_string(i) + ".example";
  read_search_list(many + "\n", search, ndots);
  CHECK(search.size() == 32);  // glibc reads any number; Kubernetes allows 32
  CHECK(search[6] == "d6.example");
  CHECK(ndots == 1);
  read_search_list("", search, ndots);
  CHECK(search.empty());
}

TEST_CASE(
    "search_names: the search domains first below ndots, the name first from it, hosts-file names as "
    "written") {
  std::vector<std::string> search;
  int ndots = 1;
  std::vector<std::string> hosts;
  CHECK(search_names("mailstore", search, ndots, hosts) == std::vector<std::string>{"mailstore"});
  search = {"mail.svc.cluster.local", "cluster.local"};
  ndots = 1;
  CHECK(search_names("mailstore", search, ndots, hosts) ==
        std::vector<std::string>{"mailstore.mail.svc.cluster.local", "mailstore.cluster.local", "mailstore"});
  CHECK(search_names("mail.example.org", search, ndots, hosts) ==
        std::vector<std::string>{"mail.example.org", "mail.example.org.mail.svc.cluster.local",
                                 "mail.example.org.cluster.local"});
  CHECK(search_names("mail.example.org.", search, ndots, hosts) ==
        std::vector<std::string>{"mail.example.org."});
  ndots = 5;
  CHECK(search_names("mailstore.mail", search, ndots, hosts).front() ==
        "mailstore.mail.mail.svc.cluster.local");
  CHECK(search_names("mailstore.mail", search, ndots, hosts).back() == "mailstore.mail");
  hosts = {"Store A 127.0.0.9"};
  CHECK(search_names("store", search, ndots, hosts) == std::vector<std::string>{"store"});
}

TEST_CASE(
    "read_search_list: a search domain with an empty label is skipped, as glibc can ask no name under it") {
  std::vector<std::string> search;
  int ndots = 0;
  // "b.example.." kept its second dot: "store.b.example." would be asked, a name glibc's res_search never
  // makes (dn_comp refuses the empty label), and one under the root that libunbound takes as written.
  read_search_list("search a.example b.example.. .c.example d..example e.example.\n", search, ndots);
  CHECK(search == std::vector<std::string>{"a.example", "e.example"});
}

TEST_CASE("hosts and resolv.conf lines end at a NUL byte, as glibc reads each line as a C string") {
  using namespace std::string_view_literals;
  // glibc sees "192.0.2.1" without names on the first line, and "192.0.2.2 kept" on the second.
  CHECK(hosts_records("192.0.2.1\0junk cut.example\n192.0.2.2 kept\0 cut.example\n::1\0 x\n"sv) ==
        std::vector<std::string>{"kept A 192.0.2.2"});
  std::vector<std::string> search;
  int ndots = 0;
  // glibc sees "search a.example" and "options ndots:2": no domain with a NUL in it (libunbound would ask
  // the name cut short there), none from behind it.
  read_search_list("search a.example\0b.example c.example\noptions ndots:2\0 ndots:7\n"sv, search, ndots);
  CHECK(search == std::vector<std::string>{"a.example"});
  CHECK(ndots == 2);
}

TEST_CASE("read_search_list: ndots as glibc's atoi, an empty search line and an indented line as glibc") {
  std::vector<std::string> search;
  int ndots = 0;
  const auto ndots_of = [&](const std::string& options) {
    read_search_list("options ndots:3\noptions " + options + "\n", search, ndots);
    return ndots;
  };
  CHECK(ndots_of("ndots:5x") == 5);
  CHECK(ndots_of("ndots:+2") == 2);
  CHECK(ndots_of("ndots:") == 0);
  CHECK(ndots_of("ndots:x") == 0);
  CHECK(ndots_of("ndots:0100") == 15);
  CHECK(ndots_of("ndots:99999999999999999999") == 15);
  CHECK(ndots_of("ndots:-1") == 3);  // left out
  // A search or domain line without a name is no setting for glibc: the list before it stays.
  for (const std::string empty : {"search", "search   ", "domain", "domain\t"}) {
    CAPTURE(empty);
    read_search_list("search a.example b.example\n" + empty + "\n", search, ndots);
    CHECK(search == std::vector<std::string>{"a.example", "b.example"});
  }
  // glibc takes a keyword only at the start of a line.
  read_search_list("search a.example\n  search b.example\n\toptions ndots:4\n", search, ndots);
  CHECK(search == std::vector<std::string>{"a.example"});
  CHECK(ndots == 1);
}

TEST_CASE("read_search_list: a domain line gives its first name only, as glibc's res_init reads it") {
  std::vector<std::string> search;
  int ndots = 0;
  // glibc cuts "domain" at the first blank: corp.example alone, and a short name is never asked under
  // other.example, which the administrator did not put in a search list.
  read_search_list("search a.example\ndomain corp.example other.example\n", search, ndots);
  CHECK(search == std::vector<std::string>{"corp.example"});
  read_search_list("domain corp.example other.example\nsearch a.example b.example\n", search, ndots);
  CHECK(search == std::vector<std::string>{"a.example", "b.example"});
}

TEST_CASE("read_search_list: '#' and ';' start a comment at the start of a line only, as glibc's res_init") {
  std::vector<std::string> search;
  int ndots = 0;
  // res_init skips a line that starts with '#' or ';' and nothing else: behind "search" every blank-separated
  // word is a domain, "#" and ";" too, and the domains after them are searched as well.
  read_search_list("search a.example # b.example\n#search c.example\n;search d.example\n", search, ndots);
  CHECK(search == std::vector<std::string>{"a.example", "#", "b.example"});
  read_search_list("search a.example ; b.example\n", search, ndots);
  CHECK(search == std::vector<std::string>{"a.example", ";", "b.example"});
  read_search_list("search ; b.example\n", search, ndots);
  CHECK(search == std::vector<std::string>{";", "b.example"});
  // "domain" ends at its first blank, so a '#' in its word stays in it.
  read_search_list("domain corp.example#old\n", search, ndots);
  CHECK(search == std::vector<std::string>{"corp.example#old"});
  // res_setoptions reads every word of an "options" line: an ndots after a '#' is set.
  read_search_list("options ndots:2 # ndots:7\n", search, ndots);
  CHECK(ndots == 7);
  read_search_list("options ndots:2\n# options ndots:7\n; options ndots:9\n", search, ndots);
  CHECK(ndots == 2);
}

TEST_CASE("read_name_servers: as glibc's res_init takes them, at most three, a line it cannot read skipped") {
  CHECK(read_name_servers("nameserver 10.0.0.1\nnameserver\t::1 # a comment\n") ==
        std::vector<std::string>{"10.0.0.1", "::1"});
  // No address, no address glibc reads (a name, a typo'd keyword), an indented or commented line: skipped.
  CHECK(read_name_servers("nameserver\nnameserver   \nnameserver localhost\nnameservers 10.0.0.2\n"
                          "  nameserver 10.0.0.3\n#nameserver 10.0.0.4\nnameserver 10.0.0.5;x\n"
                          "nameserver 10.0.0.6\n") == std::vector<std::string>{"10.0.0.6"});
  // inet_aton's forms, written as inet_ntop writes them; an IPv6 zone kept where it is a name or a number.
  CHECK(read_name_servers("nameserver 10.1\nnameserver 0x7f.1\nnameserver FE80:0::1%eth0\n") ==
        std::vector<std::string>{"10.0.0.1", "127.0.0.1", "fe80::1%eth0"});
  CHECK(read_name_servers("nameserver fe80::1%eth0@53\nnameserver fe80::2%\n") ==
        std::vector<std::string>{"fe80::1", "fe80::2"});
  // glibc's MAXNS: the first three.
  CHECK(read_name_servers(
            "nameserver 10.0.0.1\nnameserver 10.0.0.2\nnameserver 10.0.0.3\nnameserver 10.0.0.4\n") ==
        std::vector<std::string>{"10.0.0.1", "10.0.0.2", "10.0.0.3"});
  CHECK(read_name_servers("search example.org\n").empty());
}

TEST_CASE("CRLF line ends in resolv.conf as glibc's res_init reads them: the CR stays in the word it ends") {
  // glibc 2.36 (getent ahosts in a mount namespace with such a file): "nameserver 127.0.7.21\r" sent no query
  // there, "search example.com\r" asked "mailstore.example.com\r" and then "mailstore".
  CHECK(read_name_servers("nameserver 10.0.0.1\r\nnameserver ::1\r\nnameserver fe80::1%eth0\r\n"
                          "nameserver 10.0.0.2\n") == std::vector<std::string>{"fe80::1", "10.0.0.2"});
  CHECK(read_name_servers("nameserver 10.0.0.1\f\nnameserver 10.0.0.3\v\n").empty());
  CHECK(read_name_servers("nameserver 10.0.0.1 \r\n") == std::vector<std::string>{"10.0.0.1"});
  std::vector<std::string> search;
  int ndots = 0;
  read_search_list("search a.example b.example\r\noptions ndots:3\r\n", search, ndots);
  CHECK(search == std::vector<std::string>{"a.example"});
  CHECK(ndots == 3);
  read_search_list("search corp.example.\r\n", search, ndots);
  CHECK(search.empty());
  read_search_list("domain corp.example\r\n", search, ndots);
  CHECK(search.empty());
  read_search_list("search a.example \r\n", search, ndots);
  CHECK(search == std::vector<std::string>{"a.example"});
  // "search\r" is no keyword for glibc (MATCH wants a blank or tab behind it): the list before it stays.
  read_search_list("search a.example\nsearch\r\n", search, ndots);
  CHECK(search == std::vector<std::string>{"a.example"});
  // "search \r" is: its one word, a CR, replaces the list, and no name is found under it.
  read_search_list("search a.example\nsearch \r\n", search, ndots);
  CHECK(search.empty());
  // The final dot is no CR: "search corp.example." is corp.example, as glibc asks "mailstore.corp.example".
  read_search_list("search corp.example.\n", search, ndots);
  CHECK(search == std::vector<std::string>{"corp.example"});
}

TEST_CASE("CR in /etc/hosts as glibc's files service reads it: white space between fields") {
  // nss_files splits with isspace(): "mx.example.com\r" is mx.example.com, "192.0.2.2\rcr.example" a line.
  CHECK(hosts_records("192.0.2.1 mx.example.com\r\n192.0.2.2\rcr.example\r\n") ==
        std::vector<std::string>{"mx.example.com A 192.0.2.1", "cr.example A 192.0.2.2"});
}

}  // namespace
