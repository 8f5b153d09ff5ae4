"""
The robot side of a policy server (serve.py): a client for one call, and the asynchronous
10 Hz action queue that asks for the next chunk before the current one runs out. Standard
library + numpy + Pillow only, so a robot process imports it without torch or the model.

    from policy_client import ActionQueue, PolicyClient
    client = PolicyClient("http://127.0.0.1:8000")
    out = client.act(frames, boxes, "jumping jacks", "Do jumping jacks.", state)  # out["angles"]
    ActionQueue(client, threshold=8).run(observe, command, ticks=600)             # 60 s at 10 Hz
"""

import base64
import http.client
import io
import json
import threading
import time
import warnings
from urllib.parse import urlsplit

import numpy as np
from PIL import Image

FPS = 10.0  # the model's control rate: one predicted step per 0.1 s


class PolicyError(RuntimeError):
    """The server answered with an error (status: its HTTP status) or was unreachable (None)."""

    def __init__(self, status, message):
        super().__init__(f"{status}: {message}" if status else message)
        self.status = status


def jpeg_bytes(frame, quality=95) -> bytes:
    """JPEG bytes as they are, or a PIL image / uint8 (H, W, 3) array encoded as JPEG."""
    if isinstance(frame, (bytes, bytearray)):
        return bytes(frame)
    im = frame if isinstance(frame, Image.Image) else Image.fromarray(np.asarray(frame, np.uint8))
    buf = io.BytesIO()
    im.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def encode_request(frames, boxes, task, instruction, state, seed=None, steps=None, quality=95) -> bytes:
    """The POST /act body. frames: JPEG bytes (sent as they are), PIL images or uint8 arrays
    (encoded as JPEG); boxes (F, 4) with NaN = unknown; state: the 22 current angles in radians."""
    rows = [[None if not np.isfinite(v) else float(v) for v in row] for row in np.asarray(boxes, np.float64)]
    req = {"frames": [base64.b64encode(jpeg_bytes(f, quality)).decode("ascii") for f in frames], "boxes": rows,
           "task": task, "instruction": instruction, "state": np.asarray(state, np.float64).tolist()}
    if seed is not None:
        req["seed"] = int(seed)
    if steps is not None:
        req["steps"] = int(steps)
    return json.dumps(req).encode()


class PolicyClient:
    """A policy server's client over one kept-alive HTTP connection (thread-safe: calls take turns)."""

    def __init__(self, url, timeout_s=30.0, quality=95):
        u = urlsplit(url)
        if u.scheme != "http" or not u.hostname:
            raise ValueError(f"url must look like http://HOST:PORT, got {url!r}")
        self.url, self.host, self.port, self.timeout_s, self.quality = url, u.hostname, u.port or 80, timeout_s, quality
        self._conn, self._lock = None, threading.Lock()

    def request(self, method, path, body=None) -> dict:
        with self._lock:
            for attempt in range(2):
                reused = self._conn is not None
                conn = self._conn or http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
                self._conn = None
                try:
                    conn.request(method, path, body=body,
                                 headers={"Content-Type": "application/json"} if body is not None else {})
                    resp = conn.getresponse()
                    raw = resp.read()
                except (OSError, http.client.HTTPException) as e:  # refused, reset, timed out, unreachable
                    conn.close()
                    if reused and attempt == 0 and isinstance(e, (ConnectionError, http.client.HTTPException)):
                        continue  # the server closed our idle connection: retry once, fresh
                    raise PolicyError(None, f"{self.url}{path}: {type(e).__name__}: {e}") from e
                if resp.will_close:
                    conn.close()
                else:
                    self._conn = conn
                try:
                    obj = json.loads(raw)
                except ValueError:
                    raise PolicyError(resp.status, f"not a JSON reply: {raw[:200]!r}") from None
                if resp.status != 200:
                    raise PolicyError(resp.status, obj.get("error", obj) if isinstance(obj, dict) else obj)
                return obj

    def health(self) -> dict:
        return self.request("GET", "/health")

    def info(self) -> dict:
        return self.request("GET", "/info")

    def act(self, frames, boxes, task, instruction, state, seed=None, steps=None) -> dict:
        """-> the server's reply with "angles" as a float32 (H, 22) array (radians; row 0: the
        observation's time) and "round_trip_ms" added."""
        body = encode_request(frames, boxes, task, instruction, state, seed, steps, self.quality)
        t0 = time.perf_counter()
        out = self.request("POST", "/act", body)
        out["round_trip_ms"] = 1000 * (time.perf_counter() - t0)
        out["angles"] = np.asarray(out["angles"], np.float32)
        return out

    def close(self):
        with self._lock:
            if self._conn is not None:
                self._conn.close()
            self._conn = None


class ActionQueue:
    """The robot side of asynchronous chunk execution. Call step(observe) once per control tick
    (10 Hz): it returns the angles to command now and never waits for the server. When <=
    `threshold` steps of the current chunk remain (counting this tick's), it calls observe() (->
    client.act's keyword arguments for this tick's observation) and asks for the next chunk in a
    background thread. A chunk computed from the observation of tick k0 holds the angles of ticks
    k0, k0 + 1, ...: on arrival at tick k it replaces the current one from its row k - k0 on (the
    steps that elapsed while it was computed are dropped), so every tick executes the step planned
    for that tick. Motion never stalls while the latency in ticks is <= threshold; otherwise the
    last action is held (`starved`). Before the first chunk step() returns None. `clock` times the
    requests (latency_ms)."""

    def __init__(self, client, threshold=8, clock=time.perf_counter):
        self.client, self.threshold, self.clock = client, threshold, clock
        self.tick = -1  # the current control tick
        self.chunk, self.chunk_tick = None, None  # the chunk executed, its observation's tick
        self.pending = None  # the observation tick of the request in flight
        self.last_action = None
        self.latency_ms, self.dropped, self.errors = [], [], []  # per request (dropped: on arrival)
        self.starved = self.stale = 0  # ticks holding the last action; chunks after their horizon
        self.idle = threading.Event()
        self.idle.set()
        self._result, self._lock = None, threading.Lock()

    def step(self, observe):
        self.tick += 1
        k = self.tick
        self._collect(k)
        remaining = 0 if self.chunk is None else self.chunk_tick + len(self.chunk) - k
        if self.pending is None and remaining <= self.threshold:
            self.pending = k
            self.idle.clear()
            threading.Thread(target=self._fetch, args=(k, observe(), self.clock()), daemon=True).start()
        if self.chunk is not None and k - self.chunk_tick < len(self.chunk):
            self.last_action = self.chunk[k - self.chunk_tick]
        elif self.last_action is not None:
            self.starved += 1
        return self.last_action

    def _fetch(self, k, obs, t0):
        try:
            chunk, err = np.asarray(self.client.act(**obs)["angles"]), None
        except Exception as e:  # reported in step(); the robot keeps executing what it has
            chunk, err = None, e
        with self._lock:
            self._result = (k, chunk, self.clock() - t0, err)
        self.idle.set()

    def _collect(self, k):
        with self._lock:
            res, self._result = self._result, None
        if res is None:
            return
        k0, chunk, latency_s, err = res
        self.pending = None
        if err is not None:
            self.errors.append(err)
            warnings.warn(f"ActionQueue: the request of tick {k0} failed: {err}", stacklevel=3)
            return
        self.latency_ms.append(1000 * latency_s)
        if k - k0 >= len(chunk):
            self.stale += 1
            return
        self.chunk, self.chunk_tick = chunk, k0
        self.dropped.append(k - k0)

    def run(self, observe, command, ticks, fps=FPS, sleep=time.sleep):
        """The control loop: `ticks` ticks at `fps`, command(angles) each tick once a chunk came."""
        t_next = self.clock()
        for _ in range(ticks):
            action = self.step(observe)
            if action is not None:
                command(action)
            t_next += 1.0 / fps
            sleep(max(0.0, t_next - self.clock()))
