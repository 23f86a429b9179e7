"""The fault-injection switch (pure logic): its modes, its file, and that every point is wired."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from genrpc import faults
from genrpc.launch import ROOT


def fires(arm, calls: int) -> list[bool]:
    return [arm.fire() for _ in range(calls)]


def test_modes():
    arms = faults.parse("runner.execute=once, sampler.sample=always,tokenizer.encode=after:2,model.dispatch=from:1")
    assert fires(arms["runner.execute"], 4) == [True, False, False, False]
    assert fires(arms["sampler.sample"], 3) == [True, True, True]
    assert fires(arms["tokenizer.encode"], 5) == [False, False, True, False, False]
    assert fires(arms["model.dispatch"], 4) == [False, True, True, True]
    assert faults.parse("") == {}


@pytest.mark.parametrize("spec, message", [
    ("runner.exec=once", "unknown fault point 'runner.exec'"),
    ("runner.execute=twice", "once, always, after:N or from:N"),
    ("runner.execute=after:x", "once, always, after:N or from:N"),
    ("runner.execute", "once, always, after:N or from:N"),
])
def test_a_wrong_spec_names_what_is_wrong(spec, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        faults.parse(spec)


def test_the_file_is_reread_when_it_changes_and_each_read_arms_afresh(tmp_path):
    path = tmp_path / "faults"
    switch = faults._Faults("", str(path))
    switch.check("runner.execute")  # no file: nothing armed
    path.write_text("runner.execute=once\n")
    with pytest.raises(faults.InjectedFault, match="runner.execute"):
        switch.check("runner.execute")
    switch.check("runner.execute")  # once
    switch.check("sampler.sample")
    os.replace(_write(tmp_path / "next", "runner.execute=once"), path)  # the same text again: armed again
    with pytest.raises(faults.InjectedFault):
        switch.check("runner.execute")
    path.write_text("nonsense=once")  # refused: nothing armed, the process goes on
    switch.check("runner.execute")


def _write(path, text: str):
    path.write_text(text)
    return path


def test_every_point_is_checked_somewhere_and_every_check_names_a_point():
    sources = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    named = set()
    for name in sources:
        if name.startswith("tests/") or name == "genrpc/faults.py":
            continue
        with open(os.path.join(ROOT, name)) as f:
            named.update(re.findall(r'faults\.check\("([^"]+)"\)', f.read()))
    assert named == set(faults.POINTS)


def test_make_run_refuses_fault_injection():
    env = dict(os.environ, GENRPC_FAULTS="runner.execute=once")
    done = subprocess.run([sys.executable, "-m", "genrpc.supervisor"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 1 and "for tests only" in done.stderr
