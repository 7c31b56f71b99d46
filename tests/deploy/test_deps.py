"""deploy/dev/deps.sh's boot cleanup: the units of the packages its install added are disabled again, and it says
which. Run with stand-ins for apt, dpkg and systemctl on PATH (and for tee, chmod, rm, so that no policy-rc.d is
written): nothing is installed and no unit of this machine is touched."""
import os
import shutil
import stat
import subprocess

import deploylib as d

DEPS = d.REPO / "deploy" / "dev" / "deps.sh"
REAL_TOOLS = ("env", "bash", "id", "grep", "awk", "sort", "comm", "cat", "touch")

# Installed after the install: nginx-common's unit is enabled for the next boot; man-db ships a timer (enabled)
# and the service the timer starts (static: no [Install] section, nothing to disable); postfix a template.
UNITS = {"nginx-common": ["/lib/systemd/system/nginx.service"],
         "man-db": ["/lib/systemd/system/man-db.service", "/lib/systemd/system/man-db.timer"],
         "postfix": ["/lib/systemd/system/postfix.service", "/lib/systemd/system/postfix@.service"],
         "python3-yaml": []}
STATE = {"nginx.service": "enabled", "man-db.timer": "enabled", "man-db.service": "static",
         "postfix.service": "disabled", "postfix@.service": "indirect"}


def script(path, text):
    path.write_text("#!/bin/bash\n" + text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def fake_bin(tmp_path, with_systemctl=True):
    bin_dir, log = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    for tool in REAL_TOOLS:
        (bin_dir / tool).symlink_to(shutil.which(tool))
    installed = tmp_path / "installed"
    new = "\\n".join(f"ii {p}" for p in UNITS)
    script(bin_dir / "dpkg-query", f"""case "$*" in
  *Status-Abbrev*) printf 'ii base-files\\n'; [ -e {installed} ] && printf '{new}\\n'; exit 0 ;;
  *) exit 1 ;;  # every wanted package is missing
esac
""")
    script(bin_dir / "apt-get", f'[ "$1" = install ] && touch {installed}; exit 0\n')
    listing = "\n".join(f"  {p}) printf '%s\\n' {' '.join(files)} ;;" if files else
                        f"  {p}) echo \"Package '{p}' does not contain any files (!)\" ;;"
                        for p, files in UNITS.items())
    script(bin_dir / "dpkg", f'case "$2" in\n{listing}\nesac\n')
    for tool in ("debconf-set-selections", "tee", "chmod", "rm"):
        script(bin_dir / tool, "cat >/dev/null 2>&1 || true\n" if tool in ("tee", "debconf-set-selections")
               else "exit 0\n")
    if with_systemctl:
        states = "\n".join(f"  {u}) state={s} ;;" for u, s in STATE.items())
        # systemctl(1): is-enabled exits 0 for enabled, static, indirect, alias, generated, ...
        script(bin_dir / "systemctl", f"""echo "$*" >>{log}
unit=${{@: -1}}
case "$unit" in
{states}
  *) state=not-found ;;
esac
if [ "$1" = is-enabled ]; then
  [ "$2" = --quiet ] || echo "$state"
  case "$state" in enabled|enabled-runtime|static|indirect|alias|generated|transient) exit 0 ;; *) exit 1 ;; esac
fi
exit 0
""")
    return bin_dir, log


def run_deps(bin_dir):
    env = {"PATH": str(bin_dir), "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run([str(bin_dir / "bash"), str(DEPS), "test"], env=env, capture_output=True, text=True,
                          timeout=60)


def test_only_enabled_units_of_new_packages_are_disabled_and_named(tmp_path):
    bin_dir, log = fake_bin(tmp_path)
    p = run_deps(bin_dir)
    assert p.returncode == 0, p.stdout + p.stderr
    disabled = sorted(line.split()[-1] for line in log.read_text().splitlines() if line.startswith("disable"))
    said = sorted(line.split()[2] for line in p.stdout.splitlines() if line.startswith("deps: disabled "))
    assert disabled == ["man-db.timer", "nginx.service"], f"systemctl calls:\n{log.read_text()}"
    # A static unit has nothing to disable: "deps: disabled man-db.service" would be untrue.
    assert said == disabled, p.stdout


def test_a_machine_without_systemctl(tmp_path):
    bin_dir, _ = fake_bin(tmp_path, with_systemctl=False)
    p = run_deps(bin_dir)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "deps: disabled" not in p.stdout, p.stdout
