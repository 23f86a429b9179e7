"""`npm ci` that survives a stalled registry connection: npm's own default waits five minutes on a
socket that never answers (a CI run lost a whole test to one), so each fetch gets a short timeout
and more retries, and the install as a whole is tried again before the test fails with npm's words."""

from __future__ import annotations

import os
import shutil
import subprocess

ATTEMPTS = 3
ATTEMPT_TIMEOUT_S = 200
FETCH = ["--fetch-timeout=30000", "--fetch-retries=5", "--fetch-retry-mintimeout=2000",
         "--fetch-retry-maxtimeout=15000"]


def npm_ci(directory: str, marker: str) -> None:
    """Installs `directory`'s package-lock.json unless `marker` (a path under node_modules) exists."""
    if os.path.exists(os.path.join(directory, "node_modules", marker)):
        return
    assert shutil.which("npm"), f"npm is needed to install {directory}'s packages"
    errors = []
    for attempt in range(1, ATTEMPTS + 1):
        try:
            out = subprocess.run(["npm", "ci", "--no-audit", "--no-fund", *FETCH], cwd=directory,
                                 capture_output=True, text=True, timeout=ATTEMPT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            errors.append(f"attempt {attempt}: npm ci ran past {ATTEMPT_TIMEOUT_S} s")
            continue
        if out.returncode == 0:
            return
        errors.append(f"attempt {attempt}: exit {out.returncode}: {out.stderr.strip()[-800:]}")
    raise AssertionError(f"npm ci in {directory} failed {ATTEMPTS} times:\n" + "\n".join(errors))
