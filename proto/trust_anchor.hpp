#pragma once
// The DNSSEC trust anchor file (dns.trust_anchor_file) split into records, without I/O: daemon/resolver reads
// the file and gives each record to libunbound (ub_ctx_add_ta); the split is here, where the fuzz targets
// reach it.
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace mailflow::proto {

// The records of a trust anchor file (DS or DNSKEY, zone file syntax), one string each as ub_ctx_add_ta takes
// them: a record ends at a line end outside parentheses; comments (';' to the line end) and empty lines are
// left out. nullopt and `error` for a $ directive ($ORIGIN, $TTL, $INCLUDE: each record is written with its
// owner) and for a NUL byte outside a comment (libunbound takes each record as a C string).
std::optional<std::vector<std::string>> trust_anchor_records(std::string_view text, std::string& error);

}  // namespace mailflow::proto
