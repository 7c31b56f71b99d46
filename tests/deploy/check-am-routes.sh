#!/usr/bin/env bash
# The example Alertmanager routing sends each kind of mailflowd alert where its comment says.
# Usage: check-am-routes.sh AMTOOL alertmanager.yml
set -euo pipefail
amtool=$1 config=$2
fail=0
expect() {  # expected-receivers labels...
  local want=$1; shift
  local got
  got=$("$amtool" config routes test --config.file="$config" "$@" 2>/dev/null)
  if [ "$got" != "$want" ]; then
    echo "FAIL: {$*} -> '$got', expected '$want'"; fail=1
  else
    echo "ok:   {$*} -> $got"
  fi
}
expect partner-team             alertname=MailflowSignificantTLS10 severity=warning connector=partner-contoso direction=inbound
expect partner-team             alertname=MailflowSignificantNoTLS severity=warning connector=partner-fabrikam direction=outbound
expect partner-team             alertname=MailflowSignificantTLS11 severity=warning connector=partner-contoso direction=inbound
expect mail-admins              alertname=MailflowSignificantTLS11 severity=warning connector=internet direction=inbound
expect mail-admins              alertname=MailflowSignificantNoTLS severity=warning connector=internet direction=inbound
expect legacy-owners            alertname=MailflowSignificantTLS10 severity=warning connector=onprem-legacy direction=outbound
expect partner-team             alertname=MailflowOutboundPolicyFailures severity=warning connector=partner-contoso policy=mta-sts
expect mail-admins              alertname=MailflowOutboundPolicyFailures severity=warning connector=internet policy=dane
expect mail-admins              alertname=MailflowTLSHandshakeFailures severity=warning listener=inbound leg=client
expect mail-admins              alertname=MailflowCertificateExpiring severity=warning listener=inbound certificate=/etc/mailflowd/tls/mx1.pem instance=r1
expect mail-admins              alertname=MailflowDescriptorsLow severity=warning job=mailflowd instance=r1
expect mail-admins              alertname=MailflowConfigReloadFailed severity=warning job=mailflowd instance=r1
expect oncall-pager,mail-admins alertname=MailflowUpstreamDown severity=critical upstream=mailstore
expect oncall-pager,mail-admins alertname=MailflowAbsent severity=critical job=mailflowd
exit $fail
