"""Tests of stage1_core.infra.provenance: credential stripping, env allowlist, git info, ids and time."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from stage1_core.infra import provenance
from stage1_core.infra.provenance import ENV_ALLOWLIST, environment_info, git_info, run_id, strip_credentials, utc_now


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://tok@github.com/x", "https://github.com/x"),
        ("https://user:s3cr3t@github.com/org/repo.git", "https://github.com/org/repo.git"),
        ("postgresql+asyncpg://user:pw@host/db", "postgresql+asyncpg://host/db"),
        ("postgresql+asyncpg://user:pw@db.local:5432/prefect", "postgresql+asyncpg://db.local:5432/prefect"),
        ("https://user:p@ss@host.example/x", "https://host.example/x"),
        ("http://127.0.0.1:4200/api", "http://127.0.0.1:4200/api"),
        ("https://api.example.com/v1?token=abc&page=2", "https://api.example.com/v1?token=REDACTED&page=2"),
        ("https://h/p?api_key=abc&X-Amz-Signature=ff&q=cats", "https://h/p?api_key=REDACTED&X-Amz-Signature=REDACTED&q=cats"),
        ("https://h/p?client_secret=a&password=b&sig=c", "https://h/p?client_secret=REDACTED&password=REDACTED&sig=REDACTED"),
        ("https://h/cb#access_token=abc&state=1", "https://h/cb#access_token=REDACTED&state=1"),
        ("git@github.com:x/y.git", "git@github.com:x/y.git"),
        ("not a url", "not a url"),
        ("0,1", "0,1"),
        ("", ""),
        ("a=https://u:pw@h/x, b=https://h2/?key=z", "a=https://h/x, b=https://h2/?key=REDACTED"),
    ],
)
def test_strip_credentials(url: str, expected: str) -> None:
    assert strip_credentials(url) == expected


def test_env_allowlist_has_no_secret_names() -> None:
    for name in ENV_ALLOWLIST:
        assert not re.search(r"TOKEN|KEY|SECRET|PASSWORD", name), name


def test_environment_info_allowlist_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_s3cr3t")
    monkeypatch.setenv("PREFECT_API_KEY", "pnu_s3cr3t")
    monkeypatch.setenv("MY_PASSWORD", "s3cr3t")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setenv("PREFECT_API_URL", "https://user:s3cr3t@prefect.example/api?token=s3cr3t")
    monkeypatch.delenv("STAGE1_OUTPUT_ROOT", raising=False)
    # Even if someone adds a secret-looking name to the allowlist, it is not recorded.
    monkeypatch.setattr(provenance, "ENV_ALLOWLIST", (*ENV_ALLOWLIST, "HF_TOKEN"))
    info = environment_info()
    env = info["env"]
    assert set(env) <= set(ENV_ALLOWLIST)
    assert "HF_TOKEN" not in env and "PREFECT_API_KEY" not in env
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert env["PREFECT_API_URL"] == "https://prefect.example/api?token=REDACTED"
    assert env["STAGE1_OUTPUT_ROOT"] is None
    assert "s3cr3t" not in json.dumps(info)


def test_environment_info_shape() -> None:
    info = environment_info()
    assert set(info) == {"python", "platform", "machine", "cpu_count", "packages", "lock_sha256", "torch", "env"}
    # every package on the generation path (issue 19: a manifest must be able to explain a drift)
    assert {"torch", "transformers", "tokenizers", "kernels", "accelerate", "peft", "bitsandbytes", "huggingface_hub",
            "numpy", "gguf"} <= set(info["packages"])
    import transformers

    assert info["packages"]["transformers"] == transformers.__version__
    lock = Path(__file__).resolve().parents[2] / "requirements" / "lock.txt"
    assert info["lock_sha256"] == hashlib.sha256(lock.read_bytes()).hexdigest()
    assert provenance.lock_sha256(lock.with_name("absent.txt")) is None
    import pydantic

    assert info["packages"]["pydantic"] == pydantic.VERSION
    if info["torch"] is not None:
        assert set(info["torch"]) == {"version", "cuda_available", "cuda_version", "gpus"}
        assert isinstance(info["torch"]["gpus"], list)
    json.dumps(info)  # JSON-able


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
def test_git_info_strips_token_from_remote(tmp_path: Path) -> None:
    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    git("init", "-q", "-b", "main")
    git("remote", "add", "origin", "https://user:s3cr3t@example.com/r.git")
    (tmp_path / "a.txt").write_text("a\n")
    git("add", "a.txt")
    git("-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-q", "-m", "one")
    info = git_info(tmp_path)
    assert info["remote"] == "https://example.com/r.git"
    assert info["branch"] == "main"
    assert info["dirty"] is False
    assert isinstance(info["sha"], str) and re.fullmatch(r"[0-9a-f]{40}", info["sha"])
    assert info["short_sha"] == info["sha"][:12]
    assert "s3cr3t" not in json.dumps(info)

    (tmp_path / "a.txt").write_text("changed\n")
    assert git_info(tmp_path)["dirty"] is True


def test_git_info_outside_a_repo_never_raises(tmp_path: Path) -> None:
    info = git_info(tmp_path / "does-not-exist")
    assert info == {"sha": None, "short_sha": None, "branch": None, "dirty": None, "remote": None}


def test_run_id_and_utc_now() -> None:
    a, b = run_id(), run_id()
    assert a != b and re.fullmatch(r"[0-9a-f]{32}", a)
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z", utc_now())


def test_module_imports_neither_torch_nor_prefect() -> None:
    src = Path(provenance.__file__).read_text()
    assert not re.search(r"^(import|from) (torch|prefect)\b", src, re.MULTILINE)
    seeds_src = (Path(provenance.__file__).parents[1] / "phases" / "seeds.py").read_text()
    assert not re.search(r"^\s*(import|from) (torch|prefect)\b", seeds_src, re.MULTILINE)
