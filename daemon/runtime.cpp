#include "daemon/runtime.hpp"

#include <algorithm>
#include <atomic>
#include <stdexcept>
#include <tuple>

#include "daemon/failpoint.hpp"
#include "daemon/https_client.hpp"
#include "daemon/log.hpp"
#include "daemon/resolver.hpp"

namespace mailflow {

std::vector<std::pair<std::string, std::string>> https_ca_file_problems(const config::Config& config) {
  std::vector<std::pair<std::string, std::string>> out;
  const bool mta_sts =
      std::any_of(config.upstreams.begin(), config.upstreams.end(),
                  [](const auto& upstream) { return upstream.mta_sts != config::MtaStsMode::off; });
  if (mta_sts && !config.mta_sts.ca_file.empty()) {
    if (std::string problem = ca_file_problem(config.mta_sts.ca_file); !problem.empty())
      out.emplace_back("mta_sts.ca_file", std::move(problem));
  }
  if (config.tlsrpt.send && !config.tlsrpt.ca_file.empty()) {
    if (std::string problem = ca_file_problem(config.tlsrpt.ca_file); !problem.empty())
      out.emplace_back("tlsrpt.ca_file", std::move(problem));
  }
  return out;
}

std::vector<config::ConfigError> upstream_loops(const config::Config& config, const OwnListeners& own) {
  std::vector<config::ConfigError> out;
  for (std::size_t i = 0; i < config.upstreams.size(); ++i) {
    const auto& upstream = config.upstreams[i];
    if (upstream.mx) continue;
    boost::system::error_code ec;
    const auto address = boost::asio::ip::make_address(upstream.address.host, ec);
    if (ec) continue;  // a host name: what it resolves to is known only when a session connects
    const config::Listener* listener = own.owner(address, upstream.address.port);
    if (listener == nullptr) continue;
    const std::string key = "upstreams[" + std::to_string(i) + "].address";
    config::ConfigError& error = out.emplace_back();
    error.file = config.source_path;
    if (const auto it = config.positions.find(key); it != config.positions.end())
      std::tie(error.line, error.column) = it->second;
    error.message = key + ": \"" + upstream.address.text + "\" reaches mailflowd's own listener \"" +
                    listener->name + "\" (\"" + listener->address.text +
                    "\") on this host: its mail would come back to it, in a loop";
  }
  return out;
}

std::shared_ptr<const Runtime> Runtime::build(std::shared_ptr<const config::Config> config) {
  // The sessions make their resolvers when they first need one: settings that libunbound refuses fail the start
  // or the reload here, not every delivery afterwards.
  static std::atomic<std::uint64_t> generations{0};
  auto settings = resolver_settings(config->dns);
  settings.generation = ++generations;
  auto resolver = std::make_shared<const ResolverSettings>(std::move(settings));
  if (const std::string problem = dns_settings_problem(*resolver); !problem.empty())
    throw std::runtime_error(problem);
  for (const auto& [key, problem] : https_ca_file_problems(*config))
    throw std::runtime_error(key + ": " + problem);
  auto runtime = std::make_shared<Runtime>();
  for (const auto& listener : config->listeners) {
    if (listener.tls)
      runtime->listener_tls.emplace(listener.name,
                                    std::make_shared<const ServerTls>(*listener.tls, listener.name));
  }
  const TrustStores stores(config->mta_sts.ca_file);  // each file loaded once, for all the upstreams using it
  for (const auto& upstream : config->upstreams) {
    if (upstream.tls != config::UpstreamTls::none)
      runtime->upstream_tls.emplace(upstream.name, std::make_shared<const ClientTls>(upstream, stores));
  }
  runtime->own_listeners = std::make_shared<const OwnListeners>(*config);
  if (const auto loops = upstream_loops(*config, *runtime->own_listeners); !loops.empty())
    throw std::runtime_error(loops.front().to_string());
  // /etc/hosts for fixed upstreams' host names. A name that is no DNS name ("a..b") is skipped as it is read
  // (proto::hosts_records); a file that cannot be read, or that libunbound still cannot take, must not stop
  // delivery to every fixed upstream, nor refuse a start or a reload for a file that is no setting of
  // mailflowd's: their names are looked up in DNS alone then, logged at each start and reload that puts it in
  // force until it is fixed (log_problems()).
  auto hosts = fixed_upstream_settings(*resolver, *config, runtime->hosts_file_problem);
  try {
    // The tests' stand-in for such a file: no file is known that gets past proto::hosts_records and that
    // libunbound then refuses.
    failpoint("runtime.hosts_file");
  } catch (const std::exception& e) {
    runtime->hosts_file_problem = e.what();
    hosts = *resolver;
  }
  runtime->hosts_resolver = std::make_shared<const ResolverSettings>(std::move(hosts));
  runtime->resolver = std::move(resolver);
  runtime->config = std::move(config);
  return runtime;
}

void Runtime::log_problems() const {
  // The loop check blind to the host's other addresses: said at every start and reload that puts it in force.
  if (own_listeners && !own_listeners->interfaces_error().empty())
    log_event(LogLevel::warn, "interface_addresses",
              {{"error", own_listeners->interfaces_error()}, {"effect", interfaces_unread_effect}});
  if (hosts_resolver && !hosts_resolver->search_problem.empty())
    log_event(LogLevel::warn, "resolv_conf",
              {{"file", resolv_conf_path},
               {"error", hosts_resolver->search_problem},
               {"effect", "no search list: fixed upstreams' host names are asked as written"}});
  if (hosts_file_problem.empty()) return;
  log_event(LogLevel::warn, "hosts_file",
            {{"file", hosts_file_path},
             {"error", hosts_file_problem},
             {"effect", "fixed upstreams' host names are looked up in DNS only"}});
}

const ServerTls* Runtime::server_tls(std::string_view listener) const {
  auto it = listener_tls.find(listener);
  return it == listener_tls.end() ? nullptr : it->second.get();
}

const ClientTls* Runtime::client_tls(std::string_view upstream) const {
  auto it = upstream_tls.find(upstream);
  return it == upstream_tls.end() ? nullptr : it->second.get();
}

}  // namespace mailflow
