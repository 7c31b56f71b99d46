"""A private Postfix instance as a real sending MTA for the integration tests (Debian's postfix package).

    pf = PostfixInstance(workdir, "pf", relayhost="[127.0.0.1]:10025", main={"queue_run_delay": "1s"}).start()
    pf.submit("from@corp.example", ["a@x.example", "b@y.example"], message_bytes)   # through its smtpd
    pf.log()    # its maillog (maillog_file, through postlogd)
    pf.stop()

Everything lives in a short directory of its own under /tmp (Postfix connects to its postlog socket by an
absolute path, and a unix socket path has at most 107 bytes, which a pytest basetemp in a build tree exceeds):
config_directory (main.cf, master.cf of its own), queue_directory, data_directory, the maillog. stop()
removes it and keeps the maillog as workdir/<name>.maillog. Its smtpd listens on 127.0.0.1:<free port> only; nothing is local
(mydestination is empty), every recipient goes to the relayhost, without TLS. Runs as root (postfix start
needs it); the daemons drop to the `postfix` user as usual. The system's /etc/postfix is only read for the
meta files (postfix-files) that `postfix check` needs; no system instance is started or touched.
"""
import grp
import os
import pwd
import shutil
import smtplib
import subprocess
import tempfile
import time
from pathlib import Path

import harness

POSTFIX = shutil.which("postfix") or "/usr/sbin/postfix"
DAEMON_DIR = Path("/usr/lib/postfix/sbin")

MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command
{smtpd}     inet  n       -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
mailflowd unix  -       -       n       -       -       smtp
"""


def postfix_usable():
    """None when a private Postfix can run here, else the reason why not."""
    if os.geteuid() != 0:
        return "a private Postfix instance needs root (postfix start)"
    if not os.access(POSTFIX, os.X_OK) or not (DAEMON_DIR / "master").exists():
        return "postfix is not installed (apt-get install postfix)"
    try:
        pwd.getpwnam("postfix")
        grp.getgrnam("postdrop")
    except KeyError:
        return "the postfix user or the postdrop group is missing"
    return None


class PostfixInstance:
    def __init__(self, workdir, name, relayhost, main=None):
        self.name = name
        self.dir = Path(tempfile.mkdtemp(prefix=f"mf-{name}-"))
        self.kept_log = Path(workdir) / f"{name}.maillog"
        self.conf = self.dir / "etc"
        self.queue = self.dir / "spool"
        self.data = self.dir / "data"
        self.maillog = self.dir / "maillog"
        self.smtpd_port = harness.free_port()
        self.main = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue),
            "data_directory": str(self.data),
            "meta_directory": "/etc/postfix",
            "daemon_directory": str(DAEMON_DIR),
            "command_directory": "/usr/sbin",
            "shlib_directory": "/usr/lib/postfix",
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": f"{name}.corp.example",
            "mydomain": "corp.example",
            "myorigin": "$myhostname",
            "mydestination": "",
            "local_recipient_maps": "",
            "relay_domains": "",
            "alias_maps": "",
            "alias_database": "",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks, reject",
            "relayhost": relayhost,
            "smtp_tls_security_level": "none",
            "smtpd_tls_security_level": "none",
            "maillog_file": str(self.maillog),
            "maillog_file_prefixes": str(self.dir),
            "biff": "no",
            "smtputf8_enable": "no",
            "delay_warning_time": "0h",
        }
        self.main.update(main or {})
        self.running = False

    def _write(self):
        for d in (self.conf, self.queue, self.data):
            d.mkdir(parents=True, exist_ok=True)
        owner = pwd.getpwnam(self.main["mail_owner"])
        os.chown(self.data, owner.pw_uid, owner.pw_gid)  # master.lock, caches: written as mail_owner
        self.dir.chmod(0o755)  # mkdtemp's 0700: the postfix user must reach the data directory by its path
        (self.conf / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in self.main.items()))
        (self.conf / "master.cf").write_text(MASTER_CF.format(smtpd=f"127.0.0.1:{self.smtpd_port}"))

    def postfix(self, *args, check=True):
        p = subprocess.run([POSTFIX, "-c", str(self.conf), *args], capture_output=True, text=True, timeout=60)
        if check and p.returncode != 0:
            raise RuntimeError(f"postfix {' '.join(args)} exited {p.returncode}:\n{p.stdout}\n{p.stderr}\n"
                               f"{self.log()[-4000:]}")
        return p

    def start(self, timeout=20.0):
        self._write()
        self.postfix("start")
        self.running = True
        harness.LIVE.append(self)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with smtplib.SMTP("127.0.0.1", self.smtpd_port, timeout=2) as s:
                    s.noop()
                return self
            except OSError:
                if time.monotonic() > deadline:
                    log = self.log()
                    self.stop()
                    raise RuntimeError(f"postfix {self.name}: smtpd not up in {timeout}s\n{log}")
                time.sleep(0.1)

    def stop(self):
        if self.running:
            self.postfix("stop", check=False)
            # postfix stop returns once master has been told; wait for master (its pid file) to go.
            pid_file = self.queue / "pid" / "master.pid"
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                try:
                    pid = int(pid_file.read_text().split()[0])
                    os.kill(pid, 0)
                except (OSError, ValueError, IndexError):
                    break
                time.sleep(0.1)
            self.running = False
        if self.dir.exists():
            self.kept_log.write_text(self.log())
            shutil.rmtree(self.dir, ignore_errors=True)
        if self in harness.LIVE:
            harness.LIVE.remove(self)

    def submit(self, sender, rcpts, data):
        """Through its own smtpd, as a client of this MTA would."""
        with smtplib.SMTP("127.0.0.1", self.smtpd_port, timeout=10) as s:
            s.ehlo("client.corp.example")
            refused = s.sendmail(sender, rcpts, data)
            assert not refused, refused

    def log(self):
        for path in (self.maillog, self.kept_log):
            try:
                return path.read_text(errors="replace")
            except OSError:
                pass
        return ""

    def log_tail(self):
        text = self.log()
        return text if len(text) < 8000 else "...\n" + text[-8000:]
