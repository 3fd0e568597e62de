"""Fault injectors of the reliability suite: a flaky S3 endpoint, a clip that holds its Ray worker
until the test kills it, process helpers that only ever touch this test process's descendants,
and code-carrying pickle payloads.

Everything here injects faults from the outside (HTTP status codes, SIGKILL, bytes on disk); the
only hook inside the job is :class:`HoldingEmotion`, the ordinary Emotion label extractor that
additionally waits on one chosen clip so the test can SIGKILL the worker at a known moment
(the pipeline code path, the Ray task, the retry and the accounting are the real ones).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import sys
import hashlib
import http.client
import os
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from pipeline import config
from pipeline.data import features

# tests/conftest.py's dummy S3 secret (set before this module is imported): a credential like any
# other, so it must not appear in anything a run writes or says either.
SESSION_SECRET = os.environ.get("AWS_SECRET_ACCESS_KEY", "")
FRAMES = 50            # 2 s clips; seq_len 50 = one diffusion window of the ``small`` preset

# ---------------------------------------------------------------------------------------------
# A flaky S3 endpoint: an HTTP proxy in front of moto that answers 503 SlowDown to chosen requests


@dataclasses.dataclass
class Rule:
    method: str            # GET, PUT, HEAD, POST, DELETE or "*"
    contains: str          # substring of the request path (key), "" = any
    remaining: int         # how many more matching requests fail
    status: int = 503
    code: str = "SlowDown"


class FlakyS3:
    """``http://127.0.0.1:<port>`` forwarding to ``upstream``; :meth:`fail` arms failures.

    A failed request gets the status and S3 error code S3 itself sends when overloaded
    (503 SlowDown), which botocore's "standard" retry mode treats as transient.
    """

    HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade",
           "expect", "content-length"}

    def __init__(self, upstream: str):
        u = urlparse(upstream)
        self.host, self.port = u.hostname, u.port
        self.rules: list[Rule] = []
        self.injected: list[tuple[str, str, int]] = []     # (method, path, status) answered by us
        self.forwarded: list[tuple[str, str, int]] = []    # (method, path, status) from upstream
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):   # quiet
                pass

            def _body(self) -> bytes:
                if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _handle(self):
                body = self._body()
                method, path = self.command, self.path
                rule = proxy._match(method, path)
                if rule is not None:
                    xml = (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{rule.code}</Code>"
                           f"<Message>injected by the reliability suite</Message></Error>").encode()
                    self.send_response(rule.status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(xml)))
                    self.end_headers()
                    if method != "HEAD":
                        self.wfile.write(xml)
                    with proxy._lock:
                        proxy.injected.append((method, path, rule.status))
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in FlakyS3.HOP}
                headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(proxy.host, proxy.port, timeout=60)
                try:
                    conn.request(method, path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    self.send_response(resp.status)
                    length = None
                    for k, v in resp.getheaders():
                        if k.lower() == "content-length":
                            length = v
                        elif k.lower() not in FlakyS3.HOP and k.lower() not in ("server", "date"):
                            self.send_header(k, v)
                    self.send_header("Content-Length", length if method == "HEAD" and length else str(len(data)))
                    self.end_headers()
                    if method != "HEAD":
                        self.wfile.write(data)
                    with proxy._lock:
                        proxy.forwarded.append((method, path, resp.status))
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, name="flaky-s3", daemon=True)
        self._thread.start()

    def fail(self, method: str, times: int, contains: str = "", status: int = 503, code: str = "SlowDown"):
        with self._lock:
            self.rules.append(Rule(method.upper(), contains, times, status, code))

    def _match(self, method: str, path: str) -> Rule | None:
        with self._lock:
            for rule in self.rules:
                if rule.remaining > 0 and rule.method in ("*", method) and rule.contains in path:
                    rule.remaining -= 1
                    return rule
        return None

    def pending(self) -> int:
        with self._lock:
            return sum(r.remaining for r in self.rules)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# ---------------------------------------------------------------------------------------------
# A clip that holds its Ray worker until the test kills it


def array_digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array, dtype=np.float32).tobytes()).hexdigest()[:16]


@dataclasses.dataclass
class HoldOptions:
    target: str = ""       # array_digest of the chosen clip's Emotion array
    control: str = ""      # a folder shared with the test
    holds: int = 1         # the first `holds` attempts wait (for the test's SIGKILL); later ones pass


class HoldingEmotion(features.Emotion):
    """The Emotion label extractor; on the chosen clip each attempt records its PID in
    ``control/attempt-N`` and the first ``holds`` attempts wait until killed (or released)."""

    Options = HoldOptions

    def label_features(self, array):
        o = self.options
        if o.target and array_digest(array) == o.target:
            n = 0
            while True:
                try:
                    fd = os.open(os.path.join(o.control, f"attempt-{n}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                    break
                except FileExistsError:
                    n += 1
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            if n < o.holds:
                deadline = time.time() + 300
                while time.time() < deadline and not os.path.exists(os.path.join(o.control, "release")):
                    time.sleep(0.05)
        return super().label_features(array)


def attempts(control: str | Path) -> list[int]:
    """PIDs of the attempts so far, in order."""
    out = []
    for n in range(1000):
        p = Path(control, f"attempt-{n}")
        if not p.exists():
            break
        for _ in range(100):
            text = p.read_text()
            if text:
                break
            time.sleep(0.01)
        out.append(int(text))
    return out


# ---------------------------------------------------------------------------------------------
# Processes: only ever descendants of this test process


def own_descendants(root: int | None = None) -> dict[int, str]:
    """pid -> command line of every live descendant of this process (or of ``root``, one of them)."""
    import ray  # noqa: F401  (puts Ray's vendored psutil on sys.path)
    import psutil

    out = {}
    try:
        children = psutil.Process(root or os.getpid()).children(recursive=True)
    except psutil.NoSuchProcess:
        return out
    for p in children:
        try:
            out[p.pid] = " ".join(p.cmdline()) or p.name()
        except psutil.Error:
            pass
    return out


def kill_own(pid: int) -> None:
    """SIGKILL ``pid`` — refused unless it is a descendant of this test process."""
    if pid not in own_descendants():
        raise AssertionError(f"pid {pid} is not a process this test started; not killing it")
    os.kill(pid, signal.SIGKILL)


def process_family(root: int) -> dict[int, tuple[float, str]]:
    """pid -> (start time, command) of ``root``'s descendants, to recognise them once re-parented."""
    import ray  # noqa: F401
    import psutil

    out = {}
    for pid, cmd in own_descendants(root).items():
        try:
            out[pid] = (psutil.Process(pid).create_time(), cmd)
        except psutil.Error:
            pass
    return out


def still_alive(family: dict[int, tuple[float, str]]) -> dict[int, str]:
    """Members of a recorded family still running (same pid and start time: not a reused pid)."""
    import ray  # noqa: F401
    import psutil

    alive = {}
    for pid, (started, cmd) in family.items():
        try:
            p = psutil.Process(pid)
            if p.create_time() == started and p.status() != psutil.STATUS_ZOMBIE:
                alive[pid] = cmd
        except psutil.Error:
            pass
    return alive


def own_processes_matching(prefix: str) -> list[int]:
    return sorted(pid for pid, cmd in own_descendants().items() if cmd.startswith(prefix))


def wait_for(predicate, timeout: float, interval: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


# ---------------------------------------------------------------------------------------------
# Code-carrying pickles


class Payload:
    """Unpickling this creates ``path`` (a visible side effect standing in for arbitrary code)."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def secrets_in(blob: bytes | str, secrets: list[str]) -> list[str]:
    data = blob.encode() if isinstance(blob, str) else blob
    return [s for s in secrets if s and s.encode() in data]


# ---------------------------------------------------------------------------------------------
# Capturing everything a run says (logging, stdout/stderr including Ray's forwarded worker output)


class _Tee(io.TextIOBase):
    def __init__(self, *streams):
        self.streams = streams

    def write(self, s):
        for st in self.streams:
            st.write(s)
        return len(s)

    def flush(self):
        for st in self.streams:
            st.flush()


@contextlib.contextmanager
def capture_everything():
    """Yields a StringIO receiving every log record (pipeline/s3fs/botocore.credentials at DEBUG)
    and everything written to sys.stdout/sys.stderr by any thread, while still passing it on."""
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.DEBUG)
    root = logging.getLogger()
    levels = {name: logging.getLogger(name).level for name in ("", "pipeline", "s3fs", "botocore.credentials")}
    root.addHandler(handler)
    root.setLevel(min(root.level or logging.WARNING, logging.INFO))
    for name in ("pipeline", "s3fs", "botocore.credentials"):
        logging.getLogger(name).setLevel(logging.DEBUG)
    old_out, old_err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Tee(old_out, buf), _Tee(old_err, buf)
    try:
        yield buf
    finally:
        sys.stdout, sys.stderr = old_out, old_err
        root.removeHandler(handler)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


@contextlib.contextmanager
def _s3_variable(key: str, value: str):
    """This process's ``key`` set to ``value`` (fresh s3fs clients pick it up); restored after."""
    import s3fs

    old = os.environ.get(key)
    os.environ[key] = value
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield value
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old
        s3fs.S3FileSystem.clear_instance_cache()


def s3_secret(value: str):
    """This process's S3 secret set to ``value``; restored after."""
    return _s3_variable("AWS_SECRET_ACCESS_KEY", value)


def s3_endpoint(endpoint: str):
    """This process's S3 endpoint set to ``endpoint`` (e.g. the flaky proxy); Ray workers keep theirs."""
    return _s3_variable("AWS_ENDPOINT_URL", endpoint)


# ---------------------------------------------------------------------------------------------
# Feature sets whose Emotion extractor holds one clip


def holding_feature_set(path: Path, target: str, control: Path, holds: int) -> str:
    """The demo feature set whose Emotion extractor holds the ``target`` clip's worker."""
    data = config.read_yaml(features.FEATURE_SET_DIR / "demo.yaml")
    data["extractors"]["emotion"] = {"type": "emotion", "target": target, "control": str(control), "holds": holds}
    path.write_text(json.dumps(data))
    return str(path)


@contextlib.contextmanager
def holding_emotion():
    """Route the ``emotion`` extractor type to HoldingEmotion; Ray ships the class by value."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    previous = features.REGISTRY["emotion"]
    features.REGISTRY["emotion"] = HoldingEmotion
    try:
        yield
    finally:
        features.REGISTRY["emotion"] = previous
