"""Provenance of a run: git state, environment, run id and timestamps, with credentials stripped.

Everything here goes into `session_manifest.json` and per-example provenance, files that get shared,
so no secret may reach it: URLs lose their userinfo and secret-looking query values, and only an
allowlist of environment variables is recorded (never the environment wholesale).

Usage::

    from stage1_core.infra import provenance
    manifest = {"run_id": provenance.run_id(), "started": provenance.utc_now(),
                "git": provenance.git_info(Path.cwd()), "environment": provenance.environment_info()}

torch is imported lazily inside `environment_info` only; this module imports neither torch nor prefect.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import os
import platform
import re
import subprocess
import sys
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

REDACTED = "REDACTED"

ENV_ALLOWLIST: tuple[str, ...] = (
    "CUDA_VISIBLE_DEVICES",
    "CUDA_DEVICE_ORDER",
    "PYTORCH_CUDA_ALLOC_CONF",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "USE_HUB_KERNELS",
    "HF_HOME",
    "HF_HUB_CACHE",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "DO_NOT_TRACK",
    "PREFECT_API_URL",
    "PREFECT_PROFILE",
    "PREFECT_SERVER_ANALYTICS_ENABLED",
    "STAGE1_CACHE_DIR",
    "STAGE1_OUTPUT_ROOT",
)
"""Environment variables recorded in the manifest; nothing else is read into it. No name may match
TOKEN/KEY/SECRET/PASSWORD (so not even TOKENIZERS_PARALLELISM): such names are skipped at runtime."""

PACKAGES: tuple[str, ...] = ("torch", "transformers", "tokenizers", "kernels", "accelerate", "peft", "bitsandbytes",
                             "huggingface_hub", "numpy", "gguf", "safetensors", "pydantic", "prefect", "stage1")
"""Distributions whose versions are recorded (None when not installed): every package on the generation
and training path, so a manifest can explain a drift between two runs."""

LOCK_FILE = Path(__file__).resolve().parents[2] / "requirements" / "lock.txt"
"""The dependency lock scripts/setup.sh installs (present in a checkout, absent in a wheel install)."""

GIT_TIMEOUT_S = 10.0

# A name that could hold a secret: never recorded even if someone adds it to ENV_ALLOWLIST.
_SECRET_NAME = re.compile(r"TOKEN|KEY|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)
# Query/fragment parameter names whose values are redacted (access_token, api_key, X-Amz-Signature...).
_SECRET_PARAM = re.compile(r"token|key|secret|password|passwd|pwd|sig|auth|credential", re.IGNORECASE)
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>]+")
_USERINFO = re.compile(r"(://)[^/?#\s]*@")


def strip_credentials(url: str) -> str:
    """Remove credentials from every URL in a string.

    Userinfo (``user:password@``, ``token@``) is dropped from the authority, and the values of query
    (and fragment) parameters named like token/key/secret/password/sig/auth become "REDACTED".
    Text without ``scheme://`` is returned unchanged, so scp-style ``git@github.com:x/y.git``
    (no secret in it) is kept.

    Args:
        url: a URL, or any string that may contain URLs (e.g. an environment value).

    Returns:
        The string with credentials removed.
    """
    return _URL.sub(lambda m: _strip_one(m.group(0)), url)


def _strip_one(url: str) -> str:
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. a malformed IPv6 host: still drop anything that looks like userinfo
        return _USERINFO.sub(r"\1", url)
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, _redact_params(parts.query), _redact_params(parts.fragment)))


def _redact_params(params: str) -> str:
    if "=" not in params:
        return params
    out = []
    for item in params.split("&"):
        name, eq, _value = item.partition("=")
        out.append(f"{name}={REDACTED}" if eq and _SECRET_PARAM.search(unquote(name)) else item)
    return "&".join(out)


def git_info(repo_dir: Path) -> dict[str, Any]:
    """Git state of the code that runs.

    Args:
        repo_dir: a folder inside the repository.

    Returns:
        {sha, short_sha, branch, dirty, remote}: the HEAD commit (None without one), its 12-char
        prefix, the branch (None when detached), whether tracked or untracked-not-ignored files
        differ from HEAD (None when unknown), and the origin URL with credentials stripped (None
        without one). Outside a repository, or without git, every value is None. Never raises.
    """
    sha = _git(repo_dir, "rev-parse", "--verify", "-q", "HEAD")
    branch = _git(repo_dir, "symbolic-ref", "--short", "-q", "HEAD")
    status = _git(repo_dir, "status", "--porcelain", keep_empty=True)
    remote = _git(repo_dir, "remote", "get-url", "origin")
    return {
        "sha": sha,
        "short_sha": sha[:12] if sha else None,
        "branch": branch,
        "dirty": None if status is None else bool(status.strip()),
        "remote": strip_credentials(remote) if remote else None,
    }


def _git(repo_dir: Path, *args: str, keep_empty: bool = False) -> str | None:
    """Output of `git -C repo_dir ARGS` stripped, or None on any failure (or empty output)."""
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C", "GIT_OPTIONAL_LOCKS": "0"}
    try:
        proc = subprocess.run(["git", "-C", str(repo_dir), *args], capture_output=True, text=True,
                              timeout=GIT_TIMEOUT_S, env=env, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    if proc.returncode != 0:
        return None
    out = proc.stdout.strip()
    return out if out or keep_empty else None


def environment_info() -> dict[str, Any]:
    """The software and hardware a run used.

    Returns:
        {python, platform, machine, cpu_count, packages: {name: version or None}, lock_sha256 (of
        requirements/lock.txt, None outside a checkout),
        torch: {version, cuda_available, cuda_version, gpus} or None when torch is absent,
        env: {name: value or None} for `ENV_ALLOWLIST` names only, values credential-stripped}.
    """
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "packages": {name: package_version(name) for name in PACKAGES},
        "lock_sha256": lock_sha256(),
        "torch": _torch_info(),
        "env": allowed_env(),
    }


def lock_sha256(path: Path = LOCK_FILE) -> str | None:
    """sha256 of the dependency lock the checkout installs, or None when there is none.

    Args:
        path: the lock file (default: requirements/lock.txt of this checkout).
    Returns:
        64 hex characters, or None when the file cannot be read.
    """
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def allowed_env() -> dict[str, str | None]:
    """Allowlisted environment variables, credential-stripped; names that look secret are skipped.

    Returns:
        {name: value, or None when unset} for each name in `ENV_ALLOWLIST`.
    """
    out: dict[str, str | None] = {}
    for name in ENV_ALLOWLIST:
        if _SECRET_NAME.search(name):
            continue
        value = os.environ.get(name)
        out[name] = None if value is None else strip_credentials(value)
    return out


def package_version(dist: str) -> str | None:
    """The installed version of a distribution, or None when it is absent or its metadata is broken.

    Args:
        dist: a distribution name ("transformers", "huggingface_hub", ...).
    Returns:
        The version string, or None.
    """
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None
    except Exception:  # a broken distribution's metadata must not break a run's manifest
        return None


def _torch_info() -> dict[str, Any] | None:
    try:
        torch = sys.modules.get("torch") or importlib.import_module("torch")
    except Exception:
        return None
    info: dict[str, Any] = {"version": getattr(torch, "__version__", None), "cuda_available": False,
                            "cuda_version": getattr(getattr(torch, "version", None), "cuda", None), "gpus": []}
    try:
        info["cuda_available"] = bool(torch.cuda.is_available())
        if info["cuda_available"]:
            info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:  # a broken driver reads as "no CUDA" rather than failing the manifest
        info["cuda_available"] = False
    return info


def run_id() -> str:
    """A new run id.

    Returns:
        32 lowercase hex characters (uuid4).
    """
    return uuid.uuid4().hex


def utc_now() -> str:
    """The current UTC time.

    Returns:
        ISO 8601 with a Z suffix, second precision, e.g. "2025-01-31T12:00:00Z".
    """
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")
