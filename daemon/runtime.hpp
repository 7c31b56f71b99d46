#pragma once
// One immutable snapshot of everything a session needs from configuration: the validated Config and the TLS
// contexts built from it. Swapped whole on reload; a session keeps the snapshot it started with.
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "config/config.hpp"
#include "daemon/own_listeners.hpp"
#include "daemon/resolver.hpp"
#include "daemon/tls.hpp"

namespace mailflow {

// The CA files of mailflowd's own HTTPS requests that `config` uses, mta_sts.ca_file where an upstream has
// mta_sts on (the policy fetches) and tlsrpt.ca_file while tlsrpt.send is true (https: reports), that do not
// load as those requests load them: {key, problem}. Runtime::build refuses them, --check-config reports them
// at their line.
std::vector<std::pair<std::string, std::string>> https_ca_file_problems(const config::Config& config);

// Fixed upstreams whose address (an IP literal) reaches one of mailflowd's own listeners as `own` sees them:
// the listener's address itself, "[::ffff:a.b.c.d]" as a.b.c.d, 0.0.0.0 and "[::]" (a connect() there reaches
// this host's loopback address), and on a wildcard listener's port a loopback address or one of this host's
// interface addresses (an upstream at 192.0.2.7:25 where a 0.0.0.0:25 listener runs on 192.0.2.7). Each
// message to it would come back into mailflowd, session inside session. One error per upstream, at
// upstreams[N].address's file:line:col: the one check that --check-config, start and reload (Runtime::build)
// make; the loader cannot make it (it does not read the interfaces). A host name is not resolved here.
std::vector<config::ConfigError> upstream_loops(const config::Config& config, const OwnListeners& own);

struct Runtime {
  std::shared_ptr<const config::Config> config;
  std::map<std::string, std::shared_ptr<const ServerTls>, std::less<>> listener_tls;  // by listener name
  std::map<std::string, std::shared_ptr<const ClientTls>, std::less<>> upstream_tls;  // by upstream name
  std::shared_ptr<const OwnListeners> own_listeners;  // where delivering to an MX host would loop
  // dns with the trust anchor file as read at this start or reload; its key: a resolver made for another is
  // replaced.
  std::shared_ptr<const ResolverSettings> resolver;
  // The same with /etc/hosts answered first: for fixed upstreams' host names (not under tls: dane). DNS only
  // (the same settings as `resolver`) when libunbound cannot take the file, none of its names (resolv.conf's
  // search list still applied) when it cannot be read: why, in hosts_file_problem.
  std::shared_ptr<const ResolverSettings> hosts_resolver;
  std::string hosts_file_problem;  // empty when /etc/hosts is in hosts_resolver (or does not exist)

  // Throws std::runtime_error (naming the file) when a certificate, key or CA file cannot be loaded. Logs
  // nothing itself: a later step may still refuse the reload it is built for.
  static std::shared_ptr<const Runtime> build(std::shared_ptr<const config::Config> config);

  // What this runtime runs without, as warnings: interface_addresses (own_listeners could not read the host's
  // addresses), hosts_file (hosts_file_problem) and resolv_conf (hosts_resolver's search_problem). By whoever
  // puts it in force (the start, a reload at its apply step): a reload refused after build() never ran with
  // it.
  void log_problems() const;

  const ServerTls* server_tls(std::string_view listener) const;
  const ClientTls* client_tls(std::string_view upstream) const;
};

}  // namespace mailflow
