"""Full-size input-safety fuzz of the service: schemathesis against its OpenAPI schema.

    python bench/fuzz.py                 # 1,000 generated requests (half valid, half invalid)
    python bench/fuzz.py --examples 5000

Runs the fuzz test of ``make test`` (``tests/integration/test_service_fuzz.py``, which sends
100 requests there) at full size: the service's own ASGI app with a model trained on synthetic
data, every generated request checked for "no 5xx", valid requests for an answer and invalid
ones for a 4xx naming the field. Prints a table of the status codes seen and writes JSON
(``bench/results/fuzz.json``). Exits non-zero if the test failed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from stratarec.tables import text_table

ROOT = Path(__file__).resolve().parents[1]
TEST = "tests/integration/test_service_fuzz.py::test_fuzzed_requests_never_get_a_5xx"
# The test prints: "<mode> fuzzing: <n> requests in <s> s, statuses {200: 10, 400: 3}"
LINE = re.compile(r"(positive|negative) fuzzing: (\d+) requests in ([0-9.]+) s, statuses (\{.*\})")


def parse(output: str) -> list[dict]:
    """One row per fuzzing mode found in the test's output."""
    rows = []
    for m in LINE.finditer(output):
        statuses = {int(k): int(v) for k, v in re.findall(r"(\d+): (\d+)", m.group(4))}
        rows.append(
            {
                "mode": m.group(1),
                "requests": int(m.group(2)),
                "seconds": float(m.group(3)),
                "server_errors": sum(n for code, n in statuses.items() if code >= 500),
                "statuses": statuses,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=int, default=1000, help="generated requests in all (split between valid and invalid)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "fuzz.json"))
    args = p.parse_args(argv)
    env = {**os.environ, "STRATAREC_FUZZ_EXAMPLES": str(args.examples)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", TEST]
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    rows = parse(done.stdout)
    report = {
        "benchmark": "fuzz",
        "examples_asked": args.examples,
        "requests": sum(r["requests"] for r in rows),
        "server_errors": sum(r["server_errors"] for r in rows),
        "passed": done.returncode == 0,
        "wall_seconds": round(seconds, 1),
        "modes": rows,
        "pytest_tail": done.stdout.strip().splitlines()[-3:],
    }
    table_rows = [{**r, "statuses": " ".join(f"{c}:{n}" for c, n in sorted(r["statuses"].items()))} for r in rows]
    print(text_table(table_rows, ["mode", "requests", "server_errors", "seconds", "statuses"]))
    print(f"{report['requests']} requests, {report['server_errors']} server errors, test {'passed' if report['passed'] else 'FAILED'}")
    if not report["passed"]:
        print(done.stdout[-4000:], done.stderr[-2000:], sep="\n")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0 if report["passed"] and rows else 1


if __name__ == "__main__":
    sys.exit(main())
