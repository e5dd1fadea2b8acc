"""Bring up the harness region: two gateway replicas on PostgreSQL and Redis behind HAProxy.

Replica A runs `yiqiao demo` (it registers the demo region and runs the simulated hospitals in
process); replica B runs `yiqiao serve` on the same database, Redis and data directory (the same
federation and audit keys). HAProxy balances round-robin across both on one port, so a client's
consecutive requests alternate between replicas. Every wait has a deadline and says what it
waited for.
"""

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import uuid

import requests

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url, what, deadline_s=120, proc=None):
    end = time.time() + deadline_s
    last = None
    while time.time() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before {url} was ready")
        try:
            r = requests.get(url, timeout=2)
            if r.status_code == 200:
                return
            last = r.status_code
        except requests.RequestException as e:
            last = e
        time.sleep(0.3)
    raise RuntimeError(f"timed out after {deadline_s}s waiting for {what} at {url} (last: {last})")


class Region:
    def __init__(self, binary, workdir, database_admin_url, redis_url, institutions=8, extra_env=None):
        self.binary = binary
        self.workdir = workdir
        self.institutions = institutions
        self.procs = []
        self.extra_env = extra_env or {}
        self.admin_token = uuid.uuid4().hex
        self.steward_token = uuid.uuid4().hex
        self.db_name = f"yiqiao_harness_{os.getpid()}"
        parsed = urllib.parse.urlparse(database_admin_url)
        self.db_admin_url = database_admin_url
        self.database_url = urllib.parse.urlunparse(parsed._replace(path="/" + self.db_name))
        # A Redis logical database of its own, flushed before use.
        r = urllib.parse.urlparse(redis_url)
        self.redis_url = urllib.parse.urlunparse(r._replace(path="/13"))
        self.port_a, self.port_b, self.port_lb = free_port(), free_port(), free_port()
        self.mllp_port = free_port()
        self.base = f"http://127.0.0.1:{self.port_lb}"
        self.replicas = [f"http://127.0.0.1:{self.port_a}", f"http://127.0.0.1:{self.port_b}"]
        self.data_dir = os.path.join(workdir, "data")
        self.keys_dir = os.path.join(self.data_dir, "demo", "keys")

    # -- lifecycle -------------------------------------------------------------------------

    def _psql(self, sql):
        subprocess.run(["psql", "-q", "-v", "ON_ERROR_STOP=1", self.db_admin_url, "-c", sql],
                       check=True, capture_output=True, timeout=60)

    def env(self, port):
        env = {k: v for k, v in os.environ.items() if not k.startswith("YIQIAO_")}
        env.update({
            "YIQIAO_LISTEN": f"127.0.0.1:{port}",
            "YIQIAO_DATA_DIR": self.data_dir,
            "YIQIAO_DATABASE_URL": self.database_url,
            "YIQIAO_REDIS_URL": self.redis_url,
            "YIQIAO_ADMIN_TOKEN": self.admin_token,
            "YIQIAO_STEWARD_TOKEN": self.steward_token,
            "YIQIAO_PUBLIC_URL": self.base,
            "YIQIAO_LOG__FORMAT": "json",
            # The simulated hospitals (run by replica A's `yiqiao demo`) listen on plain HTTP at
            # 127.0.0.2 (demo::DEMO_SIM_ADDRESS), which the default outbound policy refuses;
            # `yiqiao demo` allow-lists that address alone, replica B gets the same policy
            # (docs/outbound.md). 127.0.0.1, where PostgreSQL and Redis listen, stays refused.
            "YIQIAO_OUTBOUND__ALLOW_HTTP": "true",
            "YIQIAO_OUTBOUND__ALLOW_CIDRS": '["127.0.0.2/32"]',
        })
        env.update(self.extra_env)
        if port == self.port_a:
            # The feed is on, with nobody allow-listed: the attack matrix connects anyway.
            env["YIQIAO_MLLP__ENABLED"] = "true"
            env["YIQIAO_MLLP__LISTEN"] = f"127.0.0.1:{self.mllp_port}"
        return env

    def _spawn(self, name, args, port):
        log = open(os.path.join(self.workdir, f"{name}.log"), "wb")
        proc = subprocess.Popen([self.binary, *args], env=self.env(port), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        proc.name = name
        self.procs.append(proc)
        return proc

    def start(self):
        shutil.rmtree(self.workdir, ignore_errors=True)
        os.makedirs(self.workdir)
        self._psql(f'DROP DATABASE IF EXISTS "{self.db_name}"')
        self._psql(f'CREATE DATABASE "{self.db_name}"')
        subprocess.run(["redis-cli", "-u", self.redis_url, "FLUSHDB"], check=True,
                       capture_output=True, timeout=30)
        self.a = self._spawn("replica-a", ["demo", "--institutions", str(self.institutions)],
                             self.port_a)
        wait_ready(self.replicas[0] + "/readyz", "replica A (yiqiao demo)", 300, self.a)
        self.b = self._spawn("replica-b", ["serve"], self.port_b)
        wait_ready(self.replicas[1] + "/readyz", "replica B (yiqiao serve)", 120, self.b)
        cfg = os.path.join(self.workdir, "haproxy.cfg")
        with open(cfg, "w") as f:
            f.write(f"""global
    maxconn 4096
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend fe
    bind 127.0.0.1:{self.port_lb}
    default_backend gw
backend gw
    balance roundrobin
    option httpchk GET /readyz
    server a 127.0.0.1:{self.port_a} check inter 1s
    server b 127.0.0.1:{self.port_b} check inter 1s
""")
        log = open(os.path.join(self.workdir, "haproxy.log"), "wb")
        self.lb = subprocess.Popen(["haproxy", "-f", cfg, "-db"], stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        self.lb.name = "haproxy"
        self.procs.append(self.lb)
        wait_ready(self.base + "/readyz", "HAProxy in front of both replicas", 60, self.lb)
        return self

    def sim_base(self):
        """The simulated region's base URL, read from replica A's walkthrough."""
        with open(os.path.join(self.workdir, "replica-a.log"), encoding="utf-8", errors="replace") as f:
            for line in f:
                if "simulator:" in line:
                    return line.split("simulator:")[1].split("/h/")[0].strip()
        raise RuntimeError("replica A printed no simulator address")

    def stop(self):
        for p in reversed(self.procs):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)
        try:
            self._psql(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')
        except subprocess.SubprocessError:
            pass

    def alive(self):
        return {p.name: p.poll() is None for p in self.procs}
