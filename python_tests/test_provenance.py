"""gaqat_kernels.provenance: the commit and environment recorded beside results."""
import os
import shutil
import subprocess

import pytest
import torch

import gaqat_kernels
from gaqat_kernels import provenance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_commit_id_prefers_the_environment(monkeypatch):
    monkeypatch.setenv("GAQAT_COMMIT", "abc1234")
    assert provenance.commit_id() == "abc1234"


@pytest.mark.skipif(shutil.which("git") is None or not os.path.isdir(os.path.join(ROOT, ".git")),
                    reason="needs git and a git checkout")
def test_commit_id_is_the_checkouts_head(monkeypatch, tmp_path):
    monkeypatch.delenv("GAQAT_COMMIT", raising=False)
    monkeypatch.chdir(tmp_path)  # the package's checkout counts, not the working directory
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=ROOT).stdout.strip()
    assert provenance.commit_id() == head


def test_commit_id_without_git(monkeypatch):
    monkeypatch.delenv("GAQAT_COMMIT", raising=False)
    monkeypatch.setenv("PATH", "")  # no git executable to be found
    assert provenance.commit_id() is None


def test_environment_names_versions_and_device():
    env = provenance.environment("cpu")
    assert env["gaqat_kernels"] == gaqat_kernels.__version__ and env["torch"] == torch.__version__
    assert env["cuda"] == torch.version.cuda and env["python"].count(".") == 2 and env["device"]
