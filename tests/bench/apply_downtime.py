#!/usr/bin/env python3
"""How long the application is down while lanup installs a release of 500
files: from the old process gone to the new one started, as `lanup apply`
reports it, over several releases in a row (each replaces every file).

Beside it, in the same run and on the same filesystem, the part of the
classic updater's downtime that lanup's renames replace: deleting the old
files and copying the new ones in from a temporary folder while the program
is closed. Medians of both, and their ratio.

Usage: tests/bench/apply_downtime.py [RUNS] [FILES] [KIB_PER_FILE]
(defaults 7, 500, 64); SHOW_STEPS=1 prints each apply's steps as
`lanup apply` does. Builds the release binaries first.
"""

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

RUNS = int(sys.argv[1]) if len(sys.argv) > 1 else 7
FILES = int(sys.argv[2]) if len(sys.argv) > 2 else 500
KIB = int(sys.argv[3]) if len(sys.argv) > 3 else 64

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def sh(*args, **kw):
    return subprocess.run(args, check=True, capture_output=True, text=True, **kw)


def build():
    subprocess.run(
        ["cargo", "build", "--release", "--quiet", "-p", "lanup-cli", "-p", "lanup-tests",
         "--bin", "lanup", "--bin", "lanup-sample-app"],
        cwd=ROOT, check=True)
    target = os.path.join(ROOT, "target", "release")
    return os.path.join(target, "lanup"), os.path.join(target, "lanup-sample-app")


def release_tree(dest, version, app_exe):
    """The sample app plus FILES-2 data files, all new content."""
    shutil.rmtree(dest, ignore_errors=True)
    os.makedirs(os.path.join(dest, "bin"))
    shutil.copy2(app_exe, os.path.join(dest, "bin", "sample-app"))
    with open(os.path.join(dest, "VERSION"), "w") as f:
        f.write(version + "\n")
    for i in range(FILES - 2):
        d = os.path.join(dest, "data", f"d{i % 20:02}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"f{i:04}.bin"), "wb") as f:
            f.write(os.urandom(KIB * 1024))


def wait_staged(lanup, state, version, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = subprocess.run([lanup, "status", "--state", state, "--json"],
                             capture_output=True, text=True)
        if out.returncode == 0:
            me = [n for n in json.loads(out.stdout)["nodes"] if n.get("self")][0]
            if me["staged_version"] == version:
                return
        time.sleep(0.2)
    raise SystemExit(f"{version} was not staged in {timeout} s")


def apply(lanup, state, version):
    out = subprocess.run([lanup, "apply", version, "--state", state, "--json"],
                         capture_output=True, text=True)
    lines = [json.loads(l) for l in out.stdout.splitlines() if l.strip()]
    if out.returncode != 0:
        raise SystemExit(f"apply {version} failed: {out.stderr}\n{out.stdout}")
    steps = {l["event"]["step"]: l["event"]["ms"] for l in lines if "event" in l}
    if os.environ.get("SHOW_STEPS"):
        for l in lines:
            if "event" in l:
                e = l["event"]
                print(f"{e['ms']:>7} ms  {e['step']:<11} {e['message']}")
    return lines[-1]["outcome"], steps


def classic_replace(staged, install):
    """Delete the listed files, copy the new ones in (the classic updater's
    work while the program is closed). Returns seconds."""
    names = []
    for dirpath, _, files in os.walk(staged):
        for f in files:
            names.append(os.path.relpath(os.path.join(dirpath, f), staged))
    start = time.perf_counter()
    for n in names:
        try:
            os.remove(os.path.join(install, n))
        except FileNotFoundError:
            pass
    for n in names:
        dest = os.path.join(install, n)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copy2(os.path.join(staged, n), dest)
    fd = os.open(install, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    os.sync()
    return time.perf_counter() - start


def main():
    lanup, app_exe = build()
    tmp = tempfile.mkdtemp(prefix="lanup-downtime-")
    procs = []
    try:
        www = os.path.join(tmp, "www")
        state = os.path.join(tmp, "state")
        install = os.path.join(tmp, "install")
        os.makedirs(www)
        key = os.path.join(tmp, "publisher.key")
        public = sh(lanup, "keygen", "--out", key).stdout.strip()
        origin = subprocess.Popen([lanup, "origin", "--dir", www, "--listen", "127.0.0.1:0"],
                                  stdout=subprocess.PIPE, text=True)
        procs.append(origin)
        url = [w for w in origin.stdout.readline().split() if w.startswith("http://")][0]
        config = os.path.join(tmp, "lanup.toml")
        with open(config, "w") as f:
            f.write(f'[app]\nname = "sample-app"\ninstall_dir = "{install}"\n'
                    f'start = ["bin/sample-app"]\nhealth_after = "200ms"\n')
        node = subprocess.Popen(
            [lanup, "node", "--state", state, "--config", config, "--origin", url,
             "--trust-publisher", public, "--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns",
             "--poll-interval", "1h", "--site", f"bench-{os.getpid()}"],
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp, "node.log"), "w"))
        procs.append(node)
        lanup_ms, classic_ms, renames = [], [], []
        for k in range(1, RUNS + 2):
            version = f"{k}.0.0"
            tree = os.path.join(tmp, "tree")
            release_tree(tree, version, app_exe)
            sh(lanup, "publish", "--dir", tree, "--version", version, "--app", "sample-app",
               "--url", url, "--key", key, "--out", www)
            if k == 1:
                time.sleep(3.5)  # the node's start-up grace, before it may fetch
            sh(lanup, "check", "--state", state)
            wait_staged(lanup, state, version)
            outcome, steps = apply(lanup, state, version)
            if k == 1:
                continue  # the first install has nothing to stop
            lanup_ms.append(outcome["downtime_ms"])
            renames.append(steps.get("in", 0) - steps.get("stop", 0))
            # The classic way, same files, same filesystem, app stopped.
            scratch = os.path.join(tmp, "classic")
            shutil.rmtree(scratch, ignore_errors=True)
            shutil.copytree(install, scratch, ignore=shutil.ignore_patterns(".lanup-apply"))
            classic_ms.append(1000 * classic_replace(os.path.join(state, "staging", version), scratch))
            print(f"release {version}: lanup down {outcome['downtime_ms']} ms "
                  f"(stop→files in {renames[-1]} ms); classic delete+copy {classic_ms[-1]:.0f} ms",
                  flush=True)
        lm, cm = statistics.median(lanup_ms), statistics.median(classic_ms)
        print(f"\n{FILES} files of {KIB} KiB, {RUNS} releases: lanup downtime median {lm:.0f} ms "
              f"(range {min(lanup_ms)}–{max(lanup_ms)}); classic delete+copy median {cm:.0f} ms; "
              f"ratio {lm / cm:.2f}")
    finally:
        for p in procs:
            p.kill()
            p.wait()
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    if os.readlink(f"/proc/{pid}/cwd").startswith(tmp):
                        os.kill(int(pid), 9)
                except OSError:
                    pass
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
