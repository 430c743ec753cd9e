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


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_commit_id_ignores_a_repository_around_an_installed_copy(monkeypatch, tmp_path):
    monkeypatch.delenv("GAQAT_COMMIT", raising=False)
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)  # a user's project, venv inside it
    subprocess.run(["git", "-c", "user.name=u", "-c", "user.email=u@example.com", "commit", "-q", "--allow-empty",
                    "-m", "user's project"], cwd=tmp_path, check=True)
    package = tmp_path / "venv" / "site-packages" / "gaqat_kernels"
    package.mkdir(parents=True)
    monkeypatch.setattr(provenance, "__file__", str(package / "provenance.py"))
    assert provenance.commit_id() is None
