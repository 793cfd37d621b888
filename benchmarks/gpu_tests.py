"""Runs GPU-marked tests on the GPU host and writes their raw outcome as JSON.

    python benchmarks/gpu_tests.py NAME [PYTEST_ARGS...]

writes benchmarks/results/gpu-tests-NAME-<device>-<date>.json: provenance (device, vLLM
and torch versions, git commit, command) and every test's outcome and duration.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import ROOT, provenance  # noqa: E402

# kept of each failure's report: enough for the assertion and the lines around it
MESSAGE_CHARS = 4000


def main() -> int:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    name, pytest_args = sys.argv[1], sys.argv[2:]
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-ra", f"--junitxml={junit}", *pytest_args]
        code = subprocess.run(cmd, cwd=ROOT).returncode
        cases = []
        for case in ET.parse(junit).getroot().iter("testcase"):
            outcome, message = "passed", None
            for child in case:
                if child.tag in ("failure", "error", "skipped"):
                    outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                    # the end of the report holds the failing line and the exception
                    message = (child.get("message") or "") + "\n" + (child.text or "")[-MESSAGE_CHARS:]
            cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                          "seconds": float(case.get("time", 0)), "message": message})
    report = provenance()
    report.update(pytest_command=" ".join(cmd[1:]), exit_code=code, cases=cases,
                  summary={k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "error", "skipped")})
    device = re.sub(r"[^A-Za-z0-9]+", "-", report["device"]).strip("-")
    out = ROOT / "benchmarks" / "results" / f"gpu-tests-{name}-{device}-{report['date'][:10]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"{report['summary']} -> {out}")
    return code


if __name__ == "__main__":
    sys.exit(main())
