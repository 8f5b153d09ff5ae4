"""
A policy server, standard library only: it loads a checkpoint once and answers each POST /act
(the 4 frames before now as JPEG, their target boxes, task, instruction, the 22 current angles)
with the next 16 steps of 22 joint angles. The robot side (a client and the 10 Hz action queue) is
policy_client.py, which needs no torch.

    python serve.py --ckpt runs/tiny [--host 127.0.0.1 --port 8000] [--device cuda --dtype bf16]
    curl -s localhost:8000/info                                  # config, joint names, fps, id
    python sample.py --server http://127.0.0.1:8000 --rollout 8  # a rollout through the server

Wire format (README: fields, errors, curl and Python examples): JSON with the frames as base64 JPEG.
Any language speaks it, a camera's JPEG travels as it is, and base64 + JSON of a few tens of kB cost
well under a millisecond next to the JPEG decode that any framing would need. One model thread runs
the requests waiting as one batch; each brings its own noise seed, and a sample's output does not
depend on its batch, so batching changes no answer.
"""

import argparse
import base64
import binascii
import io
import json
import queue
import random
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import torch
from PIL import Image

import eval as ev
import inference
import kinematics
from inference import VisionCache
from model import VLAModel
from model_io import collate_inputs, decode_angles, encode_angles

FPS = 10.0  # the model's control rate: one predicted step per 0.1 s
REQUIRED = ("frames", "boxes", "task", "instruction", "state")
OPTIONAL = ("seed", "steps")
MAX_STEPS = 64  # sampler steps a request may ask for (released: 1)
MAX_TEXT = 2000  # characters of task / instruction: the prompt's length sets the backbone's cost
MAX_SEED = 2 ** 63 - 1

# --------------------------------------------------------------------------------------------------
# Requests: parsing and validation (every problem is an HTTP status and a message naming the field)


class RequestError(Exception):
    """A request the server will not answer: HTTP status (4xx: the client's, 5xx: ours), message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def decode_jpeg(text, name: str, max_pixels: int) -> Image.Image:
    """A base64 JPEG -> decoded PIL image, or RequestError(422) naming the frame."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(422, f"{name} is not base64: {e}") from None
    if raw[:3] != b"\xff\xd8\xff":
        raise RequestError(422, f"{name} is not a JPEG (its bytes start with {raw[:8]!r}; send JPEG files)")
    try:
        im = Image.open(io.BytesIO(raw), formats=["JPEG"])
        if im.width * im.height > max_pixels:
            raise RequestError(422, f"{name} is {im.width}x{im.height}: more than the limit of {max_pixels} pixels")
        im.load()
    except RequestError:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBomb...
        raise RequestError(422, f"{name} is not a decodable JPEG: {type(e).__name__}: {e}") from None
    return im


def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def parse_request(body: bytes, num_frames=4, num_angles=22, max_pixels=4096 * 4096) -> dict:
    """A POST /act body -> {images (PIL), boxes (F, 4) float64 with NaN = unknown, task,
    instruction, state (22,) float64, seed or None, steps or None}. Malformed JSON, missing or
    unknown fields, a field of the wrong type: RequestError(400); well-formed but unusable values
    (shapes, not a JPEG, NaN state, ranges): RequestError(422)."""
    try:
        req = json.loads(body)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise RequestError(400, f"the body is not JSON: {e}") from None
    if not isinstance(req, dict):
        raise RequestError(400, f"the body must be a JSON object with fields {', '.join(REQUIRED)}, got "
                                f"{type(req).__name__}")
    missing = [k for k in REQUIRED if k not in req]
    unknown = sorted(set(req) - set(REQUIRED) - set(OPTIONAL))
    if missing or unknown:
        raise RequestError(400, "; ".join(([f"missing field(s) {', '.join(missing)}"] if missing else [])
                                          + ([f"unknown field(s) {', '.join(unknown)}"] if unknown else []))
                           + f" (fields: {', '.join(REQUIRED)}; optional: {', '.join(OPTIONAL)})")
    frames = req["frames"]
    if not isinstance(frames, list) or not all(isinstance(f, str) for f in frames):
        raise RequestError(400, "frames must be a list of base64 JPEG strings")
    if len(frames) != num_frames:
        raise RequestError(422, f"frames: need the {num_frames} frames before now (oldest first), got {len(frames)}")
    boxes = req["boxes"]
    if not isinstance(boxes, list) or len(boxes) != num_frames:
        raise RequestError(422, f"boxes must be {num_frames} rows [x1, y1, x2, y2] (null = unknown), got "
                                f"{len(boxes) if isinstance(boxes, list) else type(boxes).__name__}")
    rows = []
    for i, row in enumerate(boxes):
        row = [None] * 4 if row is None else row
        if not isinstance(row, list) or len(row) != 4 or not all(v is None or _number(v) for v in row):
            raise RequestError(422, f"boxes[{i}] must be [x1, y1, x2, y2] numbers (or null), got {row!r}"[:200])
        rows.append([np.nan if v is None else v for v in row])
    for name in ("task", "instruction"):
        if not isinstance(req[name], str):
            raise RequestError(400, f"{name} must be a string, got {type(req[name]).__name__}")
        if len(req[name]) > MAX_TEXT:
            raise RequestError(422, f"{name} has {len(req[name])} characters: more than {MAX_TEXT}")
    state = req["state"]
    if not isinstance(state, list) or not all(_number(v) for v in state):
        raise RequestError(400, f"state must be a list of {num_angles} numbers (radians)")
    state = np.asarray(state, np.float64)
    if state.shape != (num_angles,):
        raise RequestError(422, f"state must hold {num_angles} angles (radians, kinematics.JOINT_NAMES order), got "
                                f"{len(state)}")
    if not np.all(np.isfinite(state)):
        raise RequestError(422, f"state has non-finite values at {np.flatnonzero(~np.isfinite(state)).tolist()}")
    out = {"boxes": np.asarray(rows, np.float64), "task": req["task"], "instruction": req["instruction"],
           "state": state, "seed": req.get("seed"), "steps": req.get("steps")}
    for name, lo, hi in (("seed", 0, MAX_SEED), ("steps", 1, MAX_STEPS)):
        v = out[name]
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi):
            raise RequestError(422, f"{name} must be an integer in [{lo}, {hi}], got {v!r}")
    # last, as the costly part
    out["images"] = [decode_jpeg(f, f"frames[{i}]", max_pixels) for i, f in enumerate(frames)]
    return out


# --------------------------------------------------------------------------------------------------
# The server: HTTP threads parse and prepare; one model thread runs batches


@dataclass
class _Job:
    item: dict  # model.prepare's output
    state: torch.Tensor  # (44,) sin/cos of the current angles
    noise: torch.Tensor  # (H, 44) the sampler's start, from the request's seed
    steps: int
    done: threading.Event = field(default_factory=threading.Event)
    queued_at: float = 0.0
    angles: np.ndarray = None
    error: RequestError = None
    cancelled: bool = False
    timing: dict = field(default_factory=dict)


class PolicyServer:
    """Serves `model` (a VLAModel) over HTTP. POST /act -> {"angles": (H, 22) radians,
    "joint_names", "seed", "timing"}; GET /health; GET /info. start() serves in background threads
    (close() or `with` stops them); serve_forever() blocks. `model_lock` is held while a batch
    runs: holding it pauses the model thread."""

    def __init__(self, model, host="127.0.0.1", port=8000, max_batch=8, max_wait_ms=0.0, cache_frames=64,
                 max_queue=64, max_body_bytes=16 << 20, timeout_s=10.0, answer_timeout_s=120.0,
                 max_pixels=4096 * 4096, model_id="model", verbose=False):
        self.model = model.eval()
        cfg = model.config
        self.num_frames, self.horizon, self.action_dim = cfg.num_frames, cfg.action_horizon, cfg.action_dim
        self.max_batch, self.max_wait_s = max_batch, max_wait_ms / 1000
        self.max_body_bytes, self.timeout_s, self.answer_timeout_s = max_body_bytes, timeout_s, answer_timeout_s
        self.max_pixels, self.model_id, self.verbose = max_pixels, model_id, verbose
        self.pad_token_id = model.encoder().pad_token_id  # builds the processor now, not racing
        self.cache = VisionCache(max(cache_frames, max_batch * self.num_frames)) if cache_frames else None
        self.jobs = queue.Queue(maxsize=max_queue)
        self.model_lock = threading.Lock()
        self._seeds = random.SystemRandom()
        self.httpd = _HTTPServer((host, port), _Handler)
        self.httpd.policy = self
        self.url = f"http://{host}:{self.httpd.server_address[1]}"
        self._threads = []

    # --- lifecycle --------------------------------------------------------------------------------

    def start(self):
        self._threads = [threading.Thread(target=self._work, name="mimic-model", daemon=True),
                         threading.Thread(target=self.httpd.serve_forever, name="mimic-http", daemon=True)]
        for t in self._threads:
            t.start()
        return self

    def serve_forever(self):
        self.start()
        try:
            self._threads[1].join()
        finally:
            self.close()

    def close(self):
        if self._threads:
            self.httpd.shutdown()
            self.jobs.put(None)
            for t in self._threads:
                t.join()
            self._threads = []
        self.httpd.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    # --- requests ---------------------------------------------------------------------------------

    def info(self) -> dict:
        p = next(self.model.parameters())
        return {"model_id": self.model_id, "joint_names": list(kinematics.JOINT_NAMES), "fps": FPS,
                "num_frames": self.num_frames, "action_horizon": self.horizon,
                "image_size": self.model.config.image_size, "device": str(p.device), "dtype": str(p.dtype),
                "max_batch": self.max_batch, "max_wait_ms": self.max_wait_s * 1000,
                "max_body_bytes": self.max_body_bytes, "timeout_s": self.timeout_s,
                "request_fields": list(REQUIRED), "optional_fields": list(OPTIONAL),
                "config": asdict(self.model.config)}

    def act(self, body: bytes) -> dict:
        """One POST /act body -> the reply dict (raises RequestError). Runs in the request's HTTP
        thread: parsing and the model's input preparation happen here, in parallel across clients;
        the model runs in one thread."""
        t0 = time.perf_counter()
        req = parse_request(body, self.num_frames, self.action_dim // 2, self.max_pixels)
        t1 = time.perf_counter()
        try:
            item = self.model.prepare(req["images"], req["boxes"], req["task"], req["instruction"])
        except ValueError as e:
            raise RequestError(422, str(e)) from None
        seed = req["seed"] if req["seed"] is not None else self._seeds.randrange(MAX_SEED)
        noise = torch.randn((self.horizon, self.action_dim), generator=torch.Generator().manual_seed(seed))
        # sin/cos in float64, then float32, as predict
        state = torch.from_numpy(encode_angles(req["state"])).float()
        job = _Job(item, state, noise, req["steps"], queued_at=time.perf_counter())
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise RequestError(503, f"server busy: {self.jobs.maxsize} requests already waiting") from None
        if not job.done.wait(self.answer_timeout_s):
            job.cancelled = True
            raise RequestError(503, f"no answer from the model within {self.answer_timeout_s:.0f} s")
        if job.error is not None:
            raise job.error
        timing = {"parse_ms": 1000 * (t1 - t0), "prepare_ms": 1000 * (job.queued_at - t1), **job.timing,
                  "server_ms": 1000 * (time.perf_counter() - t0)}
        return {"angles": job.angles.tolist(), "joint_names": list(kinematics.JOINT_NAMES), "seed": seed,
                "steps": req["steps"] or self.model.config.diffusion_steps, "timing": timing}

    # --- the model thread -------------------------------------------------------------------------

    def _work(self):
        while True:
            job = self.jobs.get()
            if job is None:
                return
            with self.model_lock:
                jobs, stop = [job], False
                deadline = time.perf_counter() + self.max_wait_s
                while len(jobs) < self.max_batch:  # what waits, and what comes within the window
                    try:
                        wait = deadline - time.perf_counter()
                        nxt = self.jobs.get(timeout=wait) if wait > 0 else self.jobs.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is None:
                        stop = True
                        break
                    jobs.append(nxt)
                self._run([j for j in jobs if not j.cancelled])
            if stop:
                return

    def _run(self, jobs):
        groups = {}
        for j in jobs:  # one forward per sampler step count
            groups.setdefault(j.steps, []).append(j)
        for steps, group in groups.items():
            t0 = time.perf_counter()
            try:
                inputs = collate_inputs([j.item for j in group], self.pad_token_id)
                with torch.inference_mode(), self.model.autocast():
                    out = self.model(inputs=inputs, robot_state=torch.stack([j.state for j in group]),
                                     compute_loss=False, noise=torch.stack([j.noise for j in group]), steps=steps,
                                     cache=self.cache)["actions"]
                angles = decode_angles(out.float().cpu().numpy())
            except Exception as e:  # the server keeps serving; the batch's clients learn why
                traceback.print_exc()
                angles, err = None, RequestError(500, f"the model failed: {type(e).__name__}: {e}")
            t1 = time.perf_counter()
            for b, j in enumerate(group):
                j.timing = {"queue_ms": 1000 * (t0 - j.queued_at), "infer_ms": 1000 * (t1 - t0),
                            "batch_size": len(group)}
                j.angles, j.error = (None, err) if angles is None else (angles[b], None)
                j.done.set()


class _HTTPServer(ThreadingHTTPServer):
    request_queue_size = 128  # listen backlog: N clients connecting at once are not refused
    daemon_threads = True


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a client reuses its connection, no handshake
    disable_nagle_algorithm = True  # headers and body leave at once (Nagle + delayed ACK: ~40 ms)
    server_version = "mimic-serve/1"

    def setup(self):
        self.timeout = self.server.policy.timeout_s  # an idle or stalled connection is dropped
        super().setup()

    def log_message(self, fmt, *args):
        if self.server.policy.verbose:
            super().log_message(fmt, *args)

    def reply(self, status, obj, close=False):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def fail(self, e: RequestError, body_unread=False):
        # after a body we did not read (or read only in part) the connection carries no more
        self.reply(e.status, {"error": str(e), "status": e.status}, close=body_unread or e.status in (408, 411, 413))

    def handle_expect_100(self):  # an oversized body is refused before it is sent (curl waits)
        try:
            self.body_length(check_limit=True)
        except RequestError as e:
            self.fail(e, body_unread=True)
            return False
        return super().handle_expect_100()

    def body_length(self, check_limit=False) -> int:
        if self.headers.get("Transfer-Encoding"):
            raise RequestError(411, "send the body with a Content-Length (chunked transfer encoding is not read)")
        n = self.headers.get("Content-Length")
        if n is None:
            raise RequestError(411, "Content-Length is required")
        if not n.strip().isdigit():
            raise RequestError(400, f"Content-Length {n!r} is not a byte count")
        limit = self.server.policy.max_body_bytes
        if check_limit and int(n) > limit:
            raise RequestError(413, f"the body has {int(n)} bytes: more than the limit of {limit} (--max-body-mb)")
        return int(n)

    def read_body(self) -> bytes:
        """The body, read within --timeout in all (a trickle cannot hold a thread). An oversized
        body is read and dropped within that time too, so the client gets the 413, not a reset."""
        n = self.body_length()
        timeout, limit = self.server.policy.timeout_s, self.server.policy.max_body_bytes
        deadline = time.perf_counter() + timeout
        parts, got = [], 0
        while got < n:
            try:
                if time.perf_counter() > deadline:
                    raise TimeoutError
                part = self.rfile.read1(min(n - got, 1 << 20))
            except TimeoutError:
                if n > limit:
                    break
                raise RequestError(408, f"the body did not arrive within {timeout:g} s ({got} of {n} bytes)") from None
            if not part:
                raise RequestError(400, f"the connection closed after {got} of {n} body bytes")
            if n <= limit:
                parts.append(part)
            got += len(part)
        if n > limit:
            raise RequestError(413, f"the body has {n} bytes: more than the limit of {limit} (--max-body-mb)")
        return b"".join(parts)

    def do_GET(self):
        path = urlsplit(self.path).path
        if path == "/health":
            self.reply(200, {"status": "ok", "queued": self.server.policy.jobs.qsize()})
        elif path == "/info":
            self.reply(200, self.server.policy.info())
        else:
            self.fail(RequestError(404, f"no such path {path!r}: GET /health, GET /info, POST /act"))

    def do_POST(self):
        path, body = urlsplit(self.path).path, None
        try:
            if path != "/act":
                raise RequestError(404, f"no such path {path!r}: POST /act")
            body = self.read_body()
            reply = self.server.policy.act(body)
        except RequestError as e:
            return self.fail(e, body_unread=body is None)
        except Exception as e:  # a bug of ours: say so, keep serving
            traceback.print_exc()
            return self.fail(RequestError(500, f"{type(e).__name__}: {e}"))
        self.reply(200, reply)

    def other(self):
        self.fail(RequestError(405, f"method {self.command} not allowed: GET /health, GET /info, POST /act"),
                  body_unread=True)

    do_PUT = do_DELETE = do_PATCH = other


# --------------------------------------------------------------------------------------------------
# CLI


def optimize(model, args):
    """--dtype, --compile, --no-merge through inference.optimize (LoRA merged unless --no-merge)."""
    dtype = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    return inference.optimize(model, dtype=dtype, merge_lora=not args.no_merge, compile=args.compile)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default="runs/tiny", help="checkpoint folder, or a run folder (its latest.json)")
    ap.add_argument("--host", default="127.0.0.1",
                    help="0.0.0.0 serves the network (there is no authentication)")
    ap.add_argument("--port", type=int, default=8000, help="0: any free port (printed)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                    help="weights' dtype (auto: bf16 autocast on CUDA, fp32 on the CPU)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (slow first calls)")
    ap.add_argument("--no-merge", action="store_true",
                    help="keep LoRA unmerged (merged is faster, ~1e-6 apart)")
    ap.add_argument("--max-batch", type=int, default=8, help="requests run together at most")
    ap.add_argument("--max-wait-ms", type=float, default=0.0,
                    help="wait this long for more requests before running a batch (0: take what is waiting)")
    ap.add_argument("--cache-frames", type=int, default=64, help="vision outputs kept for reuse (0: no cache)")
    ap.add_argument("--max-queue", type=int, default=64, help="requests waiting at most (then 503)")
    ap.add_argument("--max-body-mb", type=float, default=16.0, help="request size limit (then 413)")
    ap.add_argument("--timeout", type=float, default=10.0,
                    help="seconds a client may take to send a request (408)")
    ap.add_argument("--model-id", default=None, help="reported by /info (default: the checkpoint path)")
    ap.add_argument("--verbose", action="store_true", help="log every request")
    args = ap.parse_args(argv)
    ckpt = ev.resolve_checkpoint(args.ckpt)
    model = optimize(VLAModel.from_pretrained(ckpt, device=args.device), args)
    server = PolicyServer(model, args.host, args.port, args.max_batch, args.max_wait_ms, args.cache_frames,
                          args.max_queue, int(args.max_body_mb * 2 ** 20), args.timeout,
                          model_id=args.model_id or str(Path(ckpt).resolve()), verbose=args.verbose)
    print(f"serving {ckpt} on {server.url} (POST /act, GET /health, GET /info)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)


if __name__ == "__main__":
    main()
