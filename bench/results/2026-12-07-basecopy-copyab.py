#!/usr/bin/env python3
"""A/B base-copy timing: alternates binary sets (and cp + sync) on one env.

usage: copyab.py ENV CERTS OUT_DIR cache(cold|warm) runs label=bindir [label=bindir ...]
Env vars: PERF=label (perf record the standby+primary of that label's last run),
          NOCP=1 (skip cp)
"""
import os, sys, time, subprocess, socket, signal, statistics, shutil, json

env, certs, out, cache, runs = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
sets = [a.split("=", 1) for a in sys.argv[6:]]
os.makedirs(out, exist_ok=True)
HZ = os.sysconf("SC_CLK_TCK")


def cpu(pid):
    with open(f"/proc/{pid}/stat") as f:
        s = f.read().rsplit(")", 1)[1].split()
    return (int(s[11]) + int(s[12])) / HZ


def threads(pid):
    out = {}
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                comm = open(f"/proc/{pid}/task/{tid}/comm").read().strip()
                run, wait, n = open(f"/proc/{pid}/task/{tid}/schedstat").read().split()
                out[tid] = (comm, int(run) / 1e9, int(wait) / 1e9, int(n))
            except OSError:
                pass
    except OSError:
        pass
    return out


def thread_report(name, before, after, wall):
    lines = []
    for tid, (comm, run, wait, n) in sorted(after.items(), key=lambda kv: -kv[1][1]):
        b = before.get(tid, (comm, 0, 0, 0))
        r, w = run - b[1], wait - b[2]
        if r < 0.01:
            continue
        lines.append(f"  {name} {tid} {comm:16} cpu {r:6.2f} s ({100*r/wall:4.0f}%)  runq {w:5.2f} s  off-cpu {wall-r-w:6.2f} s  slices {n-b[3]}")
    return lines


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def files():
    out = []
    for root, _, names in os.walk(env):
        for n in names:
            rel = os.path.relpath(os.path.join(root, n), env)
            if n.startswith("__db.") or rel.startswith(".tandem") or "/.tandem" in rel:
                continue
            out.append(rel)
    return out


def prepare():
    subprocess.run(["sync"])
    if cache == "cold":
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    else:
        for n in files():
            with open(os.path.join(env, n), "rb") as f:
                while f.read(1 << 20):
                    pass


def certargs(role):
    return ["--cert", f"{certs}/{role}.pem", "--key", f"{certs}/{role}-key.pem", "--ca", f"{certs}/ca.pem"]


def metrics(addr):
    try:
        r = subprocess.run(["curl", "-s", "-m", "1", f"http://{addr}/metrics"], capture_output=True, text=True)
    except Exception:
        return {}
    m = {}
    for line in r.stdout.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        k, v = line.rsplit(" ", 1)
        try:
            m[k] = float(v)
        except ValueError:
            pass
    return m


def start_primary(bins, tag):
    addr_file = f"{out}/primary-{tag}.addr"
    if os.path.exists(addr_file):
        os.remove(addr_file)
    log = open(f"{out}/primary-{tag}.log", "w")
    p = subprocess.Popen([f"{bins}/tandem-primary", "run", "--env", env, "--listen", "127.0.0.1:0",
                          *certargs("primary"), "--bound-addr-file", addr_file], stdout=log, stderr=log)
    for _ in range(1500):
        if os.path.exists(addr_file) and open(addr_file).read().strip():
            return p, open(addr_file).read().strip()
        time.sleep(0.02)
    raise SystemExit("primary did not listen")


def tandem(bins, tag, perf=False):
    p, addr = start_primary(bins, tag)
    dest = f"{out}/standby-{tag}"
    shutil.rmtree(dest, ignore_errors=True)
    prepare()
    maddr = f"127.0.0.1:{free_port()}"
    p0 = cpu(p.pid)
    pt0 = threads(p.pid)
    log = open(f"{out}/standby-{tag}.log", "w")
    t0 = time.monotonic()
    s = subprocess.Popen([f"{bins}/tandem-standby", "run", "--dir", dest, "--primary", f"https://{addr}",
                          "--name", "ab", *certargs("standby"), "--metrics-listen", maddr], stdout=log, stderr=log)
    perfp = None
    if perf:
        perfp = subprocess.Popen(["perf", "record", "-F", os.environ.get("PERF_F", "499"), *os.environ.get("PERF_G", "-g").split(), "-o", f"{out}/perf-{tag}.data",
                                  "-p", f"{p.pid},{s.pid}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    scpu = 0
    while True:
        m = metrics(maddr)
        if m.get("tandem_standby_recoverable") == 1 and m.get("tandem_standby_connected") == 1 and m.get("tandem_standby_lag_bytes") == 0:
            scpu = cpu(s.pid)
            pt1, st1 = threads(p.pid), threads(s.pid)
            break
        if s.poll() is not None:
            raise SystemExit(f"standby exited {s.returncode}")
        if time.monotonic() - t0 > 600:
            raise SystemExit("timeout")
        time.sleep(0.02)
    took = time.monotonic() - t0
    pcpu = cpu(p.pid) - p0
    rep = thread_report("P", pt0, pt1, took) + thread_report("S", {}, st1, took)
    open(f"{out}/threads-{tag}.txt", "a").write(f"== {cache} {took:.2f} s\n" + "\n".join(rep) + "\n")
    if os.environ.get("THREADS"):
        print("\n".join(rep))
    if perfp:
        perfp.send_signal(signal.SIGINT)
        perfp.wait()
    s.send_signal(signal.SIGTERM)
    s.wait()
    p.send_signal(signal.SIGTERM)
    p.wait()
    shutil.rmtree(dest, ignore_errors=True)
    return took, pcpu, scpu


def cp():
    dest = f"{out}/cp"
    shutil.rmtree(dest, ignore_errors=True)
    os.makedirs(dest)
    prepare()
    names = [n for n in files()]
    t0 = time.monotonic()
    subprocess.run(["cp", "-r", *names, dest], cwd=env, check=True)
    subprocess.run(["sync"])
    took = time.monotonic() - t0
    shutil.rmtree(dest, ignore_errors=True)
    return took, 0, 0


res = {}
total = sum(os.path.getsize(os.path.join(env, n)) for n in files())
gib = total / (1 << 30)
for r in range(runs):
    order = list(sets)
    if r % 2:
        order.reverse()
    for label, bins in order:
        last = r == runs - 1
        t = tandem(bins, label, perf=(os.environ.get("PERF") == label and last))
        res.setdefault(label, []).append(t)
        print(f"run {r+1} {cache} {label}: {t[0]:.2f} s  primary {t[1]/gib:.2f} standby {t[2]/gib:.2f} CPU-s/GiB  load {os.getloadavg()[0]:.2f}", flush=True)
    if not os.environ.get("NOCP"):
        t = cp()
        res.setdefault("cp", []).append(t)
        print(f"run {r+1} {cache} cp: {t[0]:.2f} s  load {os.getloadavg()[0]:.2f}", flush=True)
print(f"== {cache}, {total} bytes ({gib:.2f} GiB), medians of {runs}")
for k, v in res.items():
    print(f"{k:10} wall {statistics.median(x[0] for x in v):.2f} s  (min {min(x[0] for x in v):.2f})  primary {statistics.median(x[1] for x in v)/gib:.2f}  standby {statistics.median(x[2] for x in v)/gib:.2f} CPU-s/GiB")
json.dump(res, open(f"{out}/result-{cache}-{int(time.time())}.json", "w"))
