"""A fixed upstream's host name that only /etc/hosts has, asked by a session that began before a reload which
renamed the upstream's host: the session runs under the configuration it began with, so it asks the old name.

Only the records of the configuration's own upstream names are taken from /etc/hosts (d04dae4), and an event loop's
resolver follows the newest settings (loop_resolver): once a session after the reload had looked a name up on that
loop, the earlier session's lookup of the old name went to a context that lacked its record, past the file to DNS:
451 4.4.1 for a name the file alone has (here under .test, which libunbound answers NXDOMAIN itself, RFC 6761), or
another address where DNS knows the name. The daemon runs in a mount namespace of its own with the test's
/etc/hosts; one event loop, so that both sessions share it."""
import json
import signal

import harness
import hostile_helpers as hh

OLD_HOST, NEW_HOST = "127.0.7.41", "127.0.7.42"  # old-store.test and new-store.test in the hosts file


def deliver(c, subject):
    """A transaction on an open session: the final reply (code, text), or the refusal that ended it."""
    code, text = c.cmd(f"MAIL FROM:<{hh.SENDER}>")
    if code != 250:
        return code, f"MAIL: {text}"
    code, text = c.cmd(f"RCPT TO:<{hh.RCPT}>")
    if code != 250:
        return code, f"RCPT: {text}"
    code, text = c.cmd("DATA")
    if code != 354:
        return code, f"DATA: {text}"
    c.send(hh.message(subject) + b".\r\n")
    return c.reply()


def test_a_session_from_before_a_reload_that_renamed_its_upstream_host_still_reaches_it(workdir, mailflowd_bin,
                                                                                        sink_factory):
    hosts = workdir / "reload-names-hosts"
    hosts.write_text(f"127.0.0.1 localhost\n{OLD_HOST} old-store.test\n{NEW_HOST} new-store.test\n")
    resolv = workdir / "reload-names-resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\n")
    port = harness.free_port(OLD_HOST, NEW_HOST)
    sinks = {a: sink_factory(f"reload-names-{a}", host=a, port=port) for a in (OLD_HOST, NEW_HOST)}
    listen = harness.free_port()
    state = workdir / "reload-names-state"
    state.mkdir(exist_ok=True)
    cfg = harness.default_config(state, harness.free_port(), [hh.listener("in", listen, "store")],
                                 [{"name": "store", "address": f"old-store.test:{port}", "tls": "none"}],
                                 performance={"event_loops": 1}, dns={"timeout": "2s"},
                                 timeouts={"greeting": "30s", "command": "30s", "upstream_connect": "5s"})
    d = harness.Daemon(mailflowd_bin, workdir, cfg, name="reload-names", wrapper=harness.in_own_files(hosts, resolv))
    d.start()
    try:
        before = hh.greeted(listen, timeout=30)  # under the configuration with old-store.test
        try:
            cfg["upstreams"][0]["address"] = f"new-store.test:{port}"
            d.config_path.write_text(json.dumps(cfg, indent=2) + "\n")
            d.proc.send_signal(signal.SIGHUP)
            harness.wait_for(lambda: " reloaded " in d.stderr(), 10, what="the reload")
            after = hh.greeted(listen, timeout=30)
            try:
                code, text = deliver(after, "after the reload")
                assert code == 250, f"the session after the reload: {text}"
            finally:
                after.close()
            sinks[NEW_HOST].wait_messages(1)
            code, text = deliver(before, "before the reload")
            assert code == 250, f"the session from before the reload, its upstream at old-store.test: {text}"
        finally:
            before.close()
        sinks[OLD_HOST].wait_messages(1)
        assert sinks[NEW_HOST].count() == 1, d.log_tail()
    finally:
        harness.stop_exits_0(d)
