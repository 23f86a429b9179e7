"""The generated stubs match protos/: regenerate into a temporary folder and compare."""

import filecmp
import glob
import os

from genrpc.stubs import ROOT, generate


def test_stubs_are_fresh(tmp_path):
    generate(str(tmp_path))
    fresh = sorted(glob.glob(str(tmp_path / "genrpc" / "v1" / "*_pb2*.py*")))
    assert len(fresh) == 9
    for path in fresh:
        committed = os.path.join(ROOT, "genrpc", "v1", os.path.basename(path))
        assert os.path.exists(committed), f"{committed} is missing: run make stubs"
        assert filecmp.cmp(path, committed, shallow=False), f"{committed} is stale: run make stubs"
