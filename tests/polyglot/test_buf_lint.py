"""`buf lint` passes over protos/ (buf.yaml: buf's STANDARD rules but the service-name suffix). The
buf binary comes from npm (@bufbuild/buf, pinned in tools/buf/package.json), installed on first use
as the Node client's packages are."""

import os
import shutil
import subprocess

from tests.helpers import ROOT

TOOL_DIR = os.path.join(ROOT, "tools", "buf")
BUF = os.path.join(TOOL_DIR, "node_modules", ".bin", "buf")


def test_buf_lint_passes():
    if not os.path.exists(BUF):
        assert shutil.which("npm"), "npm is needed to install buf (@bufbuild/buf)"
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=TOOL_DIR, check=True, timeout=600,
                       capture_output=True)
    out = subprocess.run([BUF, "lint"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
