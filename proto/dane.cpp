#include "proto/dane.hpp"

namespace mailflow::proto {

std::optional<TlsaRecord> parse_tlsa_rdata(std::string_view rdata) {
  if (rdata.size() < 3) return std::nullopt;
  TlsaRecord record;
  record.usage = static_cast<std::uint8_t>(rdata[0]);
  record.selector = static_cast<std::uint8_t>(rdata[1]);
  record.matching = static_cast<std::uint8_t>(rdata[2]);
  record.data.assign(rdata.substr(3));
  return record;
}

bool usable_for_smtp(const TlsaRecord& record) {
  if (record.usage != 2 && record.usage != 3) return false;
  if (record.selector > 1) return false;
  switch (record.matching) {
    case 0:
      return !record.data.empty();
    case 1:
      return record.data.size() == 32;
    case 2:
      return record.data.size() == 64;
    default:
      return false;
  }
}

DanePlan plan_dane(bool host_secure, const TlsaAnswer* answer) {
  DanePlan plan;
  if (!host_secure || answer == nullptr) {
    plan.why = "MX or address records not DNSSEC-validated";
    return plan;
  }
  switch (answer->kind) {
    case TlsaAnswer::Kind::failed:
      plan.kind = DanePlan::Kind::skip;
      plan.why = "TLSA lookup failed";
      return plan;
    case TlsaAnswer::Kind::none:
      plan.why = "no TLSA records";
      return plan;
    case TlsaAnswer::Kind::records:
      break;
  }
  if (!answer->secure) {
    plan.why = "TLSA records not DNSSEC-validated";
    return plan;
  }
  for (const auto& record : answer->records)
    if (usable_for_smtp(record)) plan.records.push_back(record);
  plan.kind = plan.records.empty() ? DanePlan::Kind::encrypt : DanePlan::Kind::authenticate;
  plan.why = plan.records.empty() ? "no usable TLSA records" : "usable TLSA records";
  return plan;
}

std::string_view to_string(DanePlan::Kind kind) {
  switch (kind) {
    case DanePlan::Kind::none:
      return "none";
    case DanePlan::Kind::authenticate:
      return "authenticate";
    case DanePlan::Kind::encrypt:
      return "encrypt";
    case DanePlan::Kind::skip:
      return "skip";
  }
  return "none";
}

}  // namespace mailflow::proto
