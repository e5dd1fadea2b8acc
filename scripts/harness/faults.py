"""Faults under steady mixed load, and the soak.

A load of mixed requests (patient registrations by one member, PDQm searches by another,
federated Observation queries by a hospital treating a simulated person) runs through HAProxy
while faults are injected one after another: kill -9 of one replica (then restarted),
PostgreSQL restarted, Redis stopped and started, hospitals that hang, fail, answer garbage or
tampered envelopes. After each: the audit chain verifies (`yiqiao audit verify`), every response
the client saw with 2xx has its audit record (by X-Request-Id), every registration answered 201
is stored, and no registration event is stored twice.
"""

import os
import random
import subprocess
import threading
import time
import uuid

import requests

from attacks import Matrix, system_of


class Load:
    """Mixed traffic from `threads` workers at up to `rate` requests/s in all (None: as fast as
    they go). Every response is recorded: (kind, request id, status, created id, seconds)."""

    def __init__(self, region, matrix, rate=None, threads=6):
        self.region, self.matrix, self.rate, self.threads = region, matrix, rate, threads
        self.stop_flag = threading.Event()
        self.lock = threading.Lock()
        self.seen = []
        self.person, self.asker = federation_target(region)
        self._workers = []

    def token(self, inst, refresh=False):
        with self.lock:
            if refresh:
                self.matrix.tokens.pop((inst, None), None)
            for attempt in range(20):
                try:
                    return self.matrix.token(inst)
                except Exception:
                    time.sleep(0.5)
            return "none"

    def one(self, session, kind):
        rid = str(uuid.uuid4())
        created = None
        if kind == "register":
            mrn = "LD-" + uuid.uuid4().hex[:12]
            body = {"resourceType": "Patient",
                    "identifier": [{"system": system_of(4), "value": mrn}],
                    "name": [{"text": "林" + random.choice("一二三四五六七八九十") + "负载",
                              "family": "林", "given": ["负载"]}],
                    "gender": random.choice(["male", "female"]), "birthDate": "1975-06-0" + str(random.randint(1, 9))}
            inst, method, path, kw = "fz-004", "POST", "/fhir/Patient", {"json": body}
            created = mrn
        elif kind == "pdqm":
            inst, method, path, kw = "fz-005", "GET", "/fhir/Patient?family=林&birthdate=1975-06-03", {}
        else:
            inst, method, path, kw = self.asker, "GET", f"/fhir/Observation?patient={self.person}&_count=5", {}
        started = time.time()
        status = "error"
        for attempt in range(2):
            headers = {"X-Request-Id": rid, "Authorization": f"Bearer {self.token(inst, attempt > 0)}"}
            try:
                r = session.request(method, self.region.base + path, headers=headers, timeout=30, **kw)
                status = r.status_code
                if status == 401 and attempt == 0:
                    rid = str(uuid.uuid4())
                    continue
            except requests.RequestException as e:
                status = type(e).__name__
            break
        with self.lock:
            self.seen.append((kind, rid, status, created, time.time() - started))

    def worker(self, n):
        session = requests.Session()
        kinds = ["register", "pdqm", "pdqm", "federation"]
        interval = (self.threads / self.rate) if self.rate else 0
        next_at = time.time()
        i = n
        while not self.stop_flag.is_set():
            self.one(session, kinds[i % len(kinds)])
            i += 1
            if interval:
                next_at += interval
                delay = next_at - time.time()
                if delay > 0:
                    time.sleep(delay)
                else:
                    next_at = time.time()

    def start(self):
        for n in range(self.threads):
            t = threading.Thread(target=self.worker, args=(n,), daemon=True)
            t.start()
            self._workers.append(t)
        return self

    def stop(self):
        self.stop_flag.set()
        for t in self._workers:
            t.join(timeout=60)

    def take(self):
        with self.lock:
            out, self.seen = self.seen, []
        return out


def federation_target(region):
    """The walkthrough's person and the hospital that treats it (replica A's log)."""
    person = asker = None
    with open(os.path.join(region.workdir, "replica-a.log"), encoding="utf-8", errors="replace") as f:
        for line in f:
            if "Federated query: hospital " in line:
                asker = line.split("Federated query: hospital ")[1].split(",")[0].strip()
            if "/fhir/Observation?patient=" in line and person is None:
                person = line.split("/fhir/Observation?patient=")[1].split("&")[0]
    if not (person and asker):
        raise RuntimeError("replica A's walkthrough names no federated person")
    return person, asker


def psql(region, sql):
    out = subprocess.run(["psql", "-At", region.database_url, "-c", sql], capture_output=True,
                         text=True, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"psql: {out.stderr.strip()}")
    return out.stdout.strip()


def count_present(region, sql, values):
    """How many of `values` the query (with one `{}` for the quoted list) finds, 500 at a time.
    The values are UUIDs and record numbers the harness made itself."""
    found = 0
    for i in range(0, len(values), 500):
        quoted = ",".join(f"'{v}'" for v in values[i:i + 500])
        found += int(psql(region, sql.format(quoted)) or 0)
    return found


def check_after(region, seen, label):
    """What was lost: audit records of 2xx responses, registrations answered 201, duplicates."""
    ok_ids = [rid for (_, rid, status, _, _) in seen if isinstance(status, int) and 200 <= status < 300]
    missing_audit = len(ok_ids) - count_present(
        region, "SELECT count(DISTINCT request_id) FROM audit_events WHERE request_id IN ({})", ok_ids)
    created = [mrn for (kind, _, status, mrn, _) in seen if kind == "register" and status == 201]
    lost = len(created) - count_present(
        region, "SELECT count(*) FROM empi_source_records WHERE id_value IN ({})", created)
    dup_events = int(psql(region, "SELECT count(*) FROM (SELECT record_id FROM empi_events WHERE kind = "
                                  "'register' AND record_id IS NOT NULL GROUP BY record_id HAVING count(*) > 1) d") or 0)
    env = region.env(region.port_a)
    verify = subprocess.run([region.binary, "audit", "verify"], env=env, capture_output=True, text=True,
                            timeout=600)
    statuses = {}
    for (_, _, status, _, _) in seen:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    lost_total = missing_audit + lost + dup_events + (0 if verify.returncode == 0 else 1)
    return {"category": "fault", "case": label,
            "expected": "chain verifies; every 2xx audited; every 201 stored; no duplicate event",
            "seen": f"client saw {statuses}; 2xx without audit record: {missing_audit}; 201 not stored: {lost}; "
                    f"duplicate register events: {dup_events}; audit verify exit {verify.returncode}",
            "ok": lost_total == 0, "leak_if_failed": False,
            "client_saw": statuses, "missing_audit": missing_audit, "lost_registrations": lost,
            "duplicate_events": dup_events, "audit_verify_exit": verify.returncode}


def pg_restart():
    version = sorted(os.listdir("/etc/postgresql"))[0]
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart"],
                   check=True, timeout=120)


def redis_stop_start(region, down_seconds):
    subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", "6379", "shutdown", "nosave"],
                   capture_output=True, timeout=30)
    time.sleep(down_seconds)
    os.makedirs("/var/lib/redis", exist_ok=True)
    os.makedirs("/var/log/redis", exist_ok=True)
    subprocess.run(["redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "-::1", "--port", "6379",
                    "--save", "", "--appendonly", "no", "--dir", "/var/lib/redis",
                    "--logfile", "/var/log/redis/ci.log"], check=True, timeout=30)


def set_knobs(sim, knobs):
    requests.put(f"{sim}/_sim/knobs/*", json=knobs, timeout=10).raise_for_status()


def faults(region, matrix, phase_seconds=20):
    rows = []
    sim = region.sim_base()
    load = Load(region, matrix, rate=None, threads=6).start()
    try:
        time.sleep(phase_seconds)
        rows.append(check_after(region, load.take(), "steady load, no fault (baseline)"))

        os.killpg(region.b.pid, 9)
        region.b.wait(timeout=30)
        time.sleep(phase_seconds / 2)
        region.procs.remove(region.b)
        region.b = region._spawn("replica-b", ["serve"], region.port_b)
        from region import wait_ready
        wait_ready(region.replicas[1] + "/readyz", "replica B after kill -9", 120, region.b)
        time.sleep(phase_seconds / 2)
        rows.append(check_after(region, load.take(), "kill -9 of replica B mid-load, then restarted"))

        pg_restart()
        time.sleep(phase_seconds)
        rows.append(check_after(region, load.take(), "PostgreSQL restarted mid-load"))

        redis_stop_start(region, phase_seconds / 2)
        time.sleep(phase_seconds / 2)
        rows.append(check_after(region, load.take(), "Redis stopped for a while, then started (empty)"))

        for name, knobs in [("hang (timeout_rate 0.5, 5 s)", {"timeout_rate": 0.5, "hang_ms": 5000}),
                            ("reset/fail (error_rate 0.5)", {"error_rate": 0.5}),
                            ("garbage answers (garbage_rate 0.5)", {"garbage_rate": 0.5}),
                            ("tampered envelopes (tampered_rate 0.5)", {"tampered_rate": 0.5})]:
            set_knobs(sim, dict({"latency_min_ms": 0, "latency_max_ms": 0, "error_rate": 0.0,
                                 "timeout_rate": 0.0, "garbage_rate": 0.0, "tampered_rate": 0.0,
                                 "hang_ms": 60000}, **knobs))
            time.sleep(phase_seconds)
            seen = load.take()
            row = check_after(region, seen, f"every hospital: {name}")
            fed = [s for (k, _, s, _, _) in seen if k == "federation"]
            row["seen"] += f"; federation answers {dict((str(x), fed.count(x)) for x in set(fed))}"
            rows.append(row)
        set_knobs(sim, {"latency_min_ms": 0, "latency_max_ms": 0, "error_rate": 0.0, "timeout_rate": 0.0,
                        "garbage_rate": 0.0, "tampered_rate": 0.0, "hang_ms": 60000})
    finally:
        load.stop()
    rows.append(check_after(region, load.take(), "after the load stopped"))
    return rows


def rss_kb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def soak(region, matrix, seconds=600, out_dir="."):
    """Capacity for 30 s, then `seconds` at 80 % of it; RSS of both replicas every 10 s."""
    load = Load(region, matrix, rate=None, threads=6).start()
    time.sleep(30)
    load.stop()
    seen = load.take()
    capacity = len(seen) / 30.0
    rate = 0.8 * capacity
    load = Load(region, matrix, rate=rate, threads=6).start()
    curve = []
    started = time.time()
    try:
        while time.time() - started < seconds:
            time.sleep(10)
            curve.append((round(time.time() - started), rss_kb(region.a.pid), rss_kb(region.b.pid)))
    finally:
        load.stop()
    seen = load.take()
    errors = [s for (_, _, s, _, _) in seen if not (isinstance(s, int) and s < 500)]
    with open(os.path.join(out_dir, "soak_memory.csv"), "w") as f:
        f.write("seconds,replica_a_rss_kb,replica_b_rss_kb\n")
        for t, a, b in curve:
            f.write(f"{t},{a},{b}\n")
    # Flat = no trend once warm: the first third of the run fills what is bounded (consent and
    # directory caches, pooled connections, the allocator's arenas, the blocking pool's
    # threads); the mean RSS of the last minute must then be within 10 % of the minute that
    # ends the warm-up (the curve, all of it, is in soak_memory.csv and BENCHMARKS.md).
    warm = seconds / 3.0
    def growth(i):
        base = [c[i] for c in curve if warm - 60 <= c[0] < warm and c[i]]
        last = [c[i] for c in curve if c[0] >= curve[-1][0] - 60 and c[i]]
        return (sum(last) / len(last)) / (sum(base) / len(base)) if base and last else None
    ga, gb = growth(1), growth(2)
    flat = all(g is not None and g < 1.10 for g in (ga, gb))
    rows = [{"category": "soak", "case": f"{seconds} s at 80 % of measured capacity ({rate:.0f} of {capacity:.0f} requests/s)",
             "expected": f"zero errors, flat memory (after a warm-up of {warm:.0f} s, the last minute's RSS within 10 % of the warm-up's last minute)",
             "seen": f"{len(seen)} requests, {len(errors)} errors; RSS last/warm A {ga and round(ga, 3)}, B {gb and round(gb, 3)} "
                     f"(target/harness/soak_memory.csv)",
             "ok": not errors and flat, "leak_if_failed": False,
             "curve": curve}]
    rows.append(check_after(region, seen, "soak: nothing lost"))
    return rows
