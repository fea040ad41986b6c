"""Fail on known vulnerabilities that have a fix, in the dependencies as installed.

What is audited: ``pip freeze`` of the CI venv, i.e. the exact versions that
``pip install -c constraints.txt -e ".[demo,dev]"`` resolved (the lock in effect), with
pip-audit (PyPA) against PyPI's advisory data. A vulnerability with a fixed release fails
the run; one without a fix is printed and left for a human to weigh.

pip-audit reports a package it cannot look up as "skipped", not as a failure, so an
unreachable advisory service would look like a clean audit. A canary guards against that:
a release with published advisories must come back vulnerable, or the audit says loudly
that it could not run. That is a failure when FEDSYNTH_REQUIRE_AUDIT=1 (set it wherever
PyPI's JSON API is reachable); otherwise a warning, because some build machines reach
only a package mirror (this project's own, see docs/reliability.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CANARY = "jinja2==2.10"  # CVE-2019-10906 and later advisories, fixed in 2.10.1+


def audit(requirements: str) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "requirements.txt"
        path.write_text(requirements)
        done = subprocess.run(
            [sys.executable, "-m", "pip_audit", "-r", str(path), "--no-deps", "--disable-pip"]
            + ["--vulnerability-service", "pypi", "--format", "json", "--progress-spinner", "off"],
            capture_output=True,
            text=True,
        )
    if not done.stdout.strip():
        raise SystemExit(f"pip-audit failed (exit {done.returncode}):\n{done.stderr}")
    return json.loads(done.stdout)["dependencies"]


def main() -> int:
    if not any(d.get("vulns") for d in audit(CANARY + "\n")):
        print(
            "\n"
            "##################################################################\n"
            "# DEPENDENCIES NOT AUDITED: the advisory service (PyPI's JSON API)\n"
            f"# did not report the known vulnerabilities of {CANARY}; it is\n"
            "# unreachable from this machine. Run this script where it is.\n"
            "##################################################################\n",
            file=sys.stderr,
        )
        return 1 if os.environ.get("FEDSYNTH_REQUIRE_AUDIT") == "1" else 0

    frozen = subprocess.run(
        [sys.executable, "-m", "pip", "freeze", "--exclude-editable"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    pinned = "".join(line + "\n" for line in frozen.splitlines() if "==" in line)
    dependencies = audit(pinned)
    fixable, unfixed = [], []
    for dep in dependencies:
        for vuln in dep.get("vulns", []):
            line = f"{dep['name']}=={dep['version']}: {vuln['id']}"
            if vuln.get("fix_versions"):
                fixable.append(f"{line} (fixed in {', '.join(vuln['fix_versions'])})")
            else:
                unfixed.append(f"{line} (no fixed release)")
    skipped = [d["name"] for d in dependencies if d.get("skip_reason")]
    print(f"audited {len(dependencies) - len(skipped)} packages; skipped: {skipped or 'none'}")
    for line in unfixed:
        print(f"  known, no fix yet: {line}")
    for line in fixable:
        print(f"  VULNERABLE: {line}")
    return 1 if fixable else 0


if __name__ == "__main__":
    raise SystemExit(main())
