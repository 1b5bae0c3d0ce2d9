"""Cog's real HTTP server (coglet) as a subprocess on loopback, for the tests and the serving benchmark."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent


def script_module(name: str) -> ModuleType:
    """scripts/<name>.py, a module beside its CLI (scripts/openapi-schema, scripts/docs), not a package."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # before it runs: dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules[name]


def cog_schema_module() -> ModuleType:
    """scripts/cog_schema.py, the OpenAPI generator."""
    return script_module("cog_schema")


def max_concurrency() -> int:
    """cog.yaml's concurrency.max, which cog build turns into COG_MAX_CONCURRENCY (1 without it)."""
    import yaml

    return int(yaml.safe_load((ROOT / "cog.yaml").read_text()).get("concurrency", {}).get("max", 1))


TERMINAL = {"succeeded", "failed", "canceled"}
# Cog frees a prediction slot a few milliseconds after it answers, so a request sent right after
# a response can get 409 "At capacity"; a client (like Replicate's) retries for this long.
BUSY_RETRY_S = 10.0


class CogServer:
    """One `python -m cog.server.http` on 127.0.0.1 with our predictor and a given weights directory.

    It runs in a scratch working directory that holds the generated OpenAPI schema, as a
    `cog build` image would, so input validation is the real server's.
    """

    def __init__(
        self,
        weights: Path,
        schema: Optional[Path],
        env: Optional[dict[str, str]] = None,
        predictor: Optional[str] = None,
        train: bool = False,
    ) -> None:
        """`predictor` is a Cog predictor ref ("path/to/file.py:Class"); default: predict.py:Predictor.

        `train`: the server in train mode (`--x-mode train`), running train.py:train for POST /trainings.
        """
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
            "COG_PREDICT_TYPE_STUB": predictor or f"{ROOT / 'predict.py'}:Predictor",
            "PYTHONPATH": str(ROOT),
            "LCM_WEIGHTS_DIR": str(weights),
            "LCM_DEVICE": "cpu",
            "COG_MAX_CONCURRENCY": str(max_concurrency()),  # what cog build sets from cog.yaml
            **(env or {}),
        }
        mode = []
        if train:
            full_env["COG_TRAIN_TYPE_STUB"] = f"{ROOT / 'train.py'}:train"
            mode = ["--x-mode", "train"]
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1", *mode],
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
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: Optional[dict] = None,
        timeout: float = 300,
        raw: Optional[bytes] = None,
    ) -> tuple[int, Any]:
        """Send one HTTP request; return (status, decoded JSON body or text).

        `raw` is sent as the body byte for byte, for bodies json.dumps would not write.
        """
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
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
        return self.send_when_free("POST", "/predictions", {"input": inputs})

    def send_when_free(
        self, method: str, path: str, body: Any = None, headers: Optional[dict] = None, **kwargs: Any
    ) -> tuple[int, Any]:
        """request(), retried while Cog answers 409 for the slot it is still freeing (bounded)."""
        deadline = time.monotonic() + BUSY_RETRY_S
        while True:
            status, answer = self.request(method, path, body, headers, **kwargs)
            if status != 409 or time.monotonic() > deadline:
                return status, answer
            time.sleep(0.02)

    def start(self, prediction_id: str, webhook: str, **inputs: Any) -> tuple[int, Any]:
        """Start a prediction in the background (202); its events go to `webhook`."""
        body = {"input": inputs, "webhook": webhook}
        return self.send_when_free("PUT", f"/predictions/{prediction_id}", body, {"Prefer": "respond-async"})

    def cancel(self, prediction_id: str) -> int:
        return self.request("POST", f"/predictions/{prediction_id}/cancel", timeout=10)[0]

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

    def worker_pids(self) -> list[int]:
        """The server's child processes: the coglet worker that runs the predictor."""
        pids = []
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():  # any server thread may spawn it
            try:
                pids += [int(pid) for pid in (task / "children").read_text().split()]
            except FileNotFoundError:  # the thread ended meanwhile
                continue
        return sorted(pids)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()


class WebhookReceiver:
    """A loopback HTTP server in a thread that keeps every webhook body Cog POSTs to it."""

    def __init__(self) -> None:
        self.events: list[dict] = []
        self._changed = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                self.send_response(200)
                self.end_headers()
                with receiver._changed:
                    receiver.events.append(body)
                    receiver._changed.notify_all()

            def log_message(self, *args: Any) -> None:
                """Quiet: the tests print their own summary."""

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}/webhook"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def completed(self, prediction_id: str, timeout: float = 120) -> dict:
        """The first event that shows `prediction_id` finished (succeeded, failed or canceled)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for event in self.events:
                    if event.get("id") == prediction_id and event.get("status") in TERMINAL:
                        return event
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no completed webhook for {prediction_id} in {timeout}s")
                self._changed.wait(left)

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
