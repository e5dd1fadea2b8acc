#!/usr/bin/env python3
"""Yiqiao's attack, fuzz and fault harness (issue 25). Run it through scripts/harness.sh.

    harness.py --binary target/release/yiqiao [--ci] [--scenarios attacks,schemathesis,fuzz]

Brings up two gateway replicas on PostgreSQL and Redis behind HAProxy with the simulated demo
region (scripts/harness/region.py), runs the named scenarios and writes
target/harness/result.json (machine-readable) and target/harness/result.md (the tables for
BENCHMARKS.md). Exits 1 on any leak, 5xx or crash.
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from attacks import Matrix  # noqa: E402
from faults import faults, soak  # noqa: E402
from region import ROOT, Region  # noqa: E402

# Faults and the soak measure what is lost under load, not the rate limits (the attack matrix
# checks those at their defaults): their region lifts them.
LOAD_ENV = {"YIQIAO_RATE_LIMITS__ENABLED": "false", "YIQIAO_AUTH__INSTITUTION_BURST": "1000",
            "YIQIAO_AUTH__INSTITUTION_PER_MINUTE": "6000", "YIQIAO_AUTH__IP_BURST": "1000",
            "YIQIAO_AUTH__IP_PER_MINUTE": "6000"}

FUZZ_TARGETS = ["hl7_message", "client_assertion", "fhir_patient", "sm_envelope", "mpi_csv",
                "search_params"]


def schemathesis(region, matrix, out_dir, ci):
    """schemathesis against /openapi.json with a member token: no 5xx, responses match the
    schema, every status code documented."""
    token = matrix.token("fz-004")
    report = os.path.join(out_dir, "schemathesis.json")
    cmd = ["schemathesis", "run", region.base + "/openapi.json",
           "-H", f"Authorization: Bearer {token}",
           "--checks", "not_a_server_error,status_code_conformance,response_schema_conformance,"
                       "content_type_conformance",
           "--max-examples", "8" if ci else "50",
           "--workers", "2", "--request-timeout", "30", "--seed", "25",
           # The coverage phase trips over a Hypothesis/CPython 3.11 error of its own ("AST
           # constructor recursion depth mismatch"), not over the API: the other three run.
           "--phases", "examples,fuzzing,stateful",
           "--generation-deterministic", "--no-shrink" if ci else "--continue-on-failure",
           # Logging out and the OpenID login redirect are people's routes, out of scope here.
           "--exclude-path-regex", "^/(login|logout)",
           "--max-time", "150" if ci else "600",
           "--report", "junit", "--report-junit-path", os.path.join(out_dir, "schemathesis.xml")]
    started = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    tail = (proc.stdout + proc.stderr)[-6000:]
    with open(os.path.join(out_dir, "schemathesis.log"), "w") as f:
        f.write(proc.stdout + proc.stderr)
    print(tail, flush=True)
    json.dump({"exit": proc.returncode, "seconds": round(time.time() - started)},
              open(report, "w"))
    return [{"category": "schemathesis", "case": "every operation of /openapi.json with a member token",
             "expected": "no 5xx, no schema violation, every status documented",
             "seen": f"exit {proc.returncode} after {round(time.time() - started)} s "
                     f"(target/harness/schemathesis.log)",
             "ok": proc.returncode == 0, "leak_if_failed": False}]


def fuzz(out_dir, seconds):
    rows = []
    fuzz_dir = os.path.join(ROOT, "fuzz")
    build = subprocess.run(["cargo", "+nightly", "fuzz", "build", "--fuzz-dir", fuzz_dir],
                           cwd=ROOT, capture_output=True, text=True, timeout=1800)
    if build.returncode != 0:
        print(build.stderr[-4000:])
        return [{"category": "fuzz", "case": "cargo fuzz build", "expected": "builds",
                 "seen": f"exit {build.returncode}", "ok": False, "leak_if_failed": False}]
    for target in FUZZ_TARGETS:
        corpus = os.path.join(fuzz_dir, "corpus", target)
        os.makedirs(corpus, exist_ok=True)
        work = os.path.join(out_dir, "fuzz", target)
        os.makedirs(work, exist_ok=True)
        started = time.time()
        proc = subprocess.run(
            ["cargo", "+nightly", "fuzz", "run", "--fuzz-dir", fuzz_dir, target, work, corpus,
             "--", f"-max_total_time={seconds}", "-rss_limit_mb=1024", "-timeout=10",
             f"-artifact_prefix={work}/"],
            cwd=ROOT, capture_output=True, text=True, timeout=seconds + 600)
        log = proc.stdout + proc.stderr
        with open(os.path.join(work, "log.txt"), "w") as f:
            f.write(log)
        execs = [line for line in log.splitlines() if "stat::number_of_executed_units" in line or
                 line.startswith("Done ")]
        peak = [line for line in log.splitlines() if "rss:" in line][-1:] or [""]
        rows.append({"category": "fuzz", "case": f"{target} for {seconds} s",
                     "expected": "no crash, no leak, RSS under 1 GiB",
                     "seen": f"exit {proc.returncode}; {execs[-1] if execs else ''} "
                             f"{peak[0].split('rss:')[-1].strip() if peak[0] else ''}".strip(),
                     "ok": proc.returncode == 0, "leak_if_failed": False,
                     "seconds": round(time.time() - started)})
        print(f"  fuzz {target}: exit {proc.returncode}", flush=True)
    return rows


def new_region(binary, workdir, extra_env=None):
    """A region on the test PostgreSQL and Redis (YIQIAO_TEST_DATABASE_URL, YIQIAO_TEST_REDIS_URL)."""
    return Region(binary, workdir,
                  os.environ.get("YIQIAO_TEST_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/test"),
                  os.environ.get("YIQIAO_TEST_REDIS_URL", "redis://127.0.0.1:6379"),
                  extra_env=extra_env)


def failed_row(category, case, e):
    return {"category": category, "case": case, "expected": "no exception",
            "seen": f"{type(e).__name__}: {e}", "ok": False, "leak_if_failed": False}


def table(rows):
    lines = ["| category | case | expected | seen | held |", "|---|---|---|---|---|"]
    for r in rows:
        seen = str(r["seen"]).replace("|", "\\|").replace("\n", " ")[:160]
        lines.append(f"| {r['category']} | {r['case'].replace('|', '/')} | {r['expected']} | {seen} | "
                     f"{'yes' if r['ok'] else '**NO**'} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", required=True)
    ap.add_argument("--ci", action="store_true", help="the CI-sized variant")
    ap.add_argument("--scenarios", default=None,
                    help="comma-separated: attacks,schemathesis,faults,soak,fuzz (default: all; "
                         "--ci: attacks,schemathesis)")
    ap.add_argument("--soak-seconds", type=int, default=600)
    ap.add_argument("--fuzz-seconds", type=int, default=None)
    args = ap.parse_args()
    scenarios = (args.scenarios or ("attacks,schemathesis" if args.ci else
                                    "attacks,schemathesis,faults,soak,fuzz")).split(",")
    out_dir = os.path.join(ROOT, "target", "harness")
    os.makedirs(out_dir, exist_ok=True)
    rows = []
    started = time.time()
    region = None
    if {"attacks", "schemathesis"} & set(scenarios):
        region = new_region(args.binary, os.path.join(out_dir, "region"))
        print(f"== region: two replicas behind HAProxy at {region.base}", flush=True)
        try:
            region.start()
            matrix = Matrix(region)
            if "attacks" in scenarios:
                print("== attack matrix", flush=True)
                rows += matrix.run()
            if "schemathesis" in scenarios:
                print("== schemathesis", flush=True)
                rows += schemathesis(region, matrix, out_dir, args.ci)
            alive = region.alive()
            rows.append({"category": "stability", "case": "every process of the region still running",
                         "expected": "all alive", "seen": str(alive), "ok": all(alive.values()),
                         "leak_if_failed": False})
        except Exception as e:
            rows.append(failed_row("harness", "region up and scenarios ran", e))
        finally:
            region.stop()
    if {"faults", "soak"} & set(scenarios):
        region = new_region(args.binary, os.path.join(out_dir, "region-load"), LOAD_ENV)
        print(f"== region for faults and soak at {region.base}", flush=True)
        try:
            region.start()
            matrix = Matrix(region)
            if "faults" in scenarios:
                print("== faults under load", flush=True)
                rows += faults(region, matrix)
            if "soak" in scenarios:
                print(f"== soak ({args.soak_seconds} s)", flush=True)
                rows += soak(region, matrix, args.soak_seconds, out_dir)
        except Exception as e:
            rows.append(failed_row("harness", "load region up and scenarios ran", e))
        finally:
            region.stop()
    if "fuzz" in scenarios:
        print("== fuzzing", flush=True)
        rows += fuzz(out_dir, args.fuzz_seconds or (30 if args.ci else 60))
    failed = [r for r in rows if not r["ok"]]
    leaks = [r for r in failed if r.get("leak_if_failed")]
    result = {"when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "ci": args.ci, "seconds": round(time.time() - started), "cases": len(rows),
              "failed": len(failed), "leaks": len(leaks), "rows": rows}
    json.dump(result, open(os.path.join(out_dir, "result.json"), "w"), ensure_ascii=False, indent=1)
    with open(os.path.join(out_dir, "result.md"), "w") as f:
        f.write(table(rows) + "\n")
    print(f"\n{len(rows)} cases, {len(failed)} failed ({len(leaks)} leaks) in "
          f"{result['seconds']} s; target/harness/result.json, result.md")
    for r in failed:
        print(f"  FAILED {r['category']}: {r['case']}: {r['seen']}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
