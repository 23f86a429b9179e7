"""`buf lint` passes over protos/ (buf.yaml: buf's STANDARD rules but the service-name suffix). The
buf binary comes from npm (@bufbuild/buf, pinned in tools/buf/package.json), installed on first use
as the Node client's packages are."""

import os
import subprocess

import pytest

from tests.helpers import ROOT
from tests.polyglot.npm import ATTEMPT_TIMEOUT_S, ATTEMPTS, npm_ci

TOOL_DIR = os.path.join(ROOT, "tools", "buf")
BUF = os.path.join(TOOL_DIR, "node_modules", ".bin", "buf")


@pytest.mark.timeout(ATTEMPTS * ATTEMPT_TIMEOUT_S + 150)
def test_buf_lint_passes():
    npm_ci(TOOL_DIR, os.path.join(".bin", "buf"))
    out = subprocess.run([BUF, "lint"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
