"""Cog's real HTTP server (coglet) run as a subprocess on loopback, for the tests."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent


class CogServer:
    """One `python -m cog.server.http` on 127.0.0.1 with our predictor and a given weights directory.

    It runs in a scratch working directory that holds the generated OpenAPI schema, as a
    `cog build` image would, so input validation is the real server's.
    """

    def __init__(self, weights: Path, schema: Optional[Path], env: Optional[dict[str, str]] = None) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="cogserver-"))
        if schema is not None:
            (self.workdir / ".cog").mkdir()
            (self.workdir / ".cog" / "openapi_schema.json").write_bytes(schema.read_bytes())
        self.stderr_path = self.workdir / "server.log"
        bindir = str(Path(sys.executable).parent)
        full_env = {
            **os.environ,
            "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}",
            "PORT": "0",
            "COG_PREDICT_TYPE_STUB": f"{ROOT / 'predict.py'}:Predictor",
            "PYTHONPATH": str(ROOT),
            "LCM_WEIGHTS_DIR": str(weights),
            "LCM_DEVICE": "cpu",
            **(env or {}),
        }
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1"],
                cwd=self.workdir,
                env=full_env,
                stdout=subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,
            )
        self.url = f"http://127.0.0.1:{self._wait_for_port()}"

    def _wait_for_port(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(r"Starting coglet server on [\d.]+:(\d+)", self.stderr_path.read_text())
            if found:
                return int(found.group(1))
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"cog server did not start:\n{self.stderr_path.read_text()}")

    def request(
        self, method: str, path: str, body: Any = None, headers: Optional[dict] = None, timeout: float = 300
    ) -> tuple[int, Any]:
        """Send one HTTP request; return (status, decoded JSON body or text)."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.url + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json", **(headers or {})},
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")

    def predict(self, **inputs: Any) -> tuple[int, Any]:
        return self.request("POST", "/predictions", {"input": inputs})

    def health(self) -> dict:
        return self.request("GET", "/health-check", timeout=10)[1]

    def wait_until(self, statuses: set[str], timeout: float = 120) -> dict:
        """Poll /health-check until its status is one of `statuses`."""
        deadline = time.monotonic() + timeout
        health: dict = {}
        while time.monotonic() < deadline:
            try:
                health = self.health()
            except (urllib.error.URLError, ConnectionError):
                health = {}
            if health.get("status") in statuses:
                return health
            time.sleep(0.2)
        raise TimeoutError(f"health stayed {health.get('status')!r}:\n{self.stderr_path.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()
