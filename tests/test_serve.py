"""serve.py on 127.0.0.1 with a tiny model: a round trip gives exactly the in-process actions; bad
requests get a 4xx JSON error naming the problem and the server keeps serving; concurrent clients
are batched and each still gets its own answer; sample.py's rollout through the server equals
the local one; the CLI serves a saved checkpoint; the robot-side ActionQueue executes, at every
control tick, the step planned for that tick (fake latency and clock)."""

import base64
import http.client
import io
import json
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlsplit

import numpy as np
import pytest
import torch
from PIL import Image
from test_eval import random_walk, write_clip

import kinematics
import policy_client
import sample
import serve
from model_io import collate_inputs, decode_angles, encode_angles

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server(model):
    with serve.PolicyServer(model, port=0, max_batch=8, max_body_bytes=300_000, timeout_s=1.0,
                            model_id="tiny-test") as srv:
        yield srv


def jpeg(rng, size=(64, 48)):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def observation(seed):
    """One request's inputs: 4 random JPEG frames, boxes (one unknown), task, instruction, state."""
    rng = np.random.default_rng(seed)
    boxes = np.float64([[4, 4, 40, 40], [5, 4, 41, 40], [6, 5, 42, 41], [7, 5, 43, 42]]) + seed
    boxes[1] = np.nan
    return dict(frames=[jpeg(rng) for _ in range(4)], boxes=boxes, task="waving",
                instruction="Wave" + " again" * (seed % 4) + ".", state=rng.uniform(-3, 3, 22))


def in_process(model, obs, seed, steps=None):
    noise = torch.randn((16, 44), generator=torch.Generator().manual_seed(seed))
    frames = [Image.open(io.BytesIO(f)) for f in obs["frames"]]
    return model.predict(frames, obs["boxes"], obs["task"], obs["instruction"], obs["state"], noise=noise,
                         steps=steps)


def batch_error(model, angles, obs, seed):
    """How far served angles are from the sample computed alone, in the head's output space:
    the angle difference times the length of the head's (sin, cos) pair. The model keeps a sample's
    output independent of its batch to ~1e-6 there (padding and batch size change the order
    of float32 additions); atan2 divides that by the pair's length, which an untrained tiny model
    can leave small, so angles alone would need a tolerance per joint."""
    item = model.prepare([Image.open(io.BytesIO(f)) for f in obs["frames"]], obs["boxes"], obs["task"],
                         obs["instruction"])
    noise = torch.randn((1, 16, 44), generator=torch.Generator().manual_seed(seed))
    state = torch.from_numpy(encode_angles(np.asarray(obs["state"], np.float64))).float()[None]
    with torch.inference_mode():
        out = model(inputs=collate_inputs([item]), robot_state=state, compute_loss=False, noise=noise)["actions"]
    out = out[0].double().numpy()
    diff = np.abs((np.asarray(angles, np.float64) - decode_angles(out) + np.pi) % (2 * np.pi) - np.pi)
    return (diff * np.hypot(out[:, 0::2], out[:, 1::2])).max()


# --------------------------------------------------------------------------------------------------


def test_round_trip_equals_in_process_actions(model, server):
    client = policy_client.PolicyClient(server.url)
    assert client.health()["status"] == "ok"
    info = client.info()
    assert info["joint_names"] == list(kinematics.JOINT_NAMES) and info["fps"] == 10.0
    assert info["model_id"] == "tiny-test" and info["action_horizon"] == 16 and info["num_frames"] == 4
    assert info["config"]["image_size"] == 64
    obs = observation(0)
    out = client.act(**obs, seed=7)
    # batch 1, the same inputs (the server decodes the same JPEG bytes), the same
    # noise: the same arithmetic
    assert out["angles"].dtype == np.float32 and out["angles"].shape == (16, 22)
    assert np.array_equal(out["angles"], in_process(model, obs, 7))
    assert out["joint_names"] == list(kinematics.JOINT_NAMES) and out["seed"] == 7 and out["steps"] == 1
    t = out["timing"]
    assert t["batch_size"] == 1 and 0 < t["infer_ms"] < t["server_ms"] < out["round_trip_ms"]
    assert not np.array_equal(client.act(**obs, seed=8)["angles"], out["angles"])  # the seed matters
    # no seed: the server draws one and returns it, so the answer can be reproduced
    free = client.act(**obs)
    assert np.array_equal(free["angles"], in_process(model, obs, free["seed"]))
    # sampler steps, and frames given as arrays
    # (the client encodes JPEG: the server sees the decoded JPEG)
    two = client.act(**obs, seed=7, steps=2)
    assert two["steps"] == 2 and np.array_equal(two["angles"], in_process(model, obs, 7, steps=2))
    arrays = [np.asarray(Image.open(io.BytesIO(f))) for f in obs["frames"]]
    sent = dict(obs, frames=[policy_client.jpeg_bytes(a) for a in arrays])
    assert np.array_equal(client.act(**dict(obs, frames=arrays), seed=7)["angles"], in_process(model, sent, 7))
    client.close()


def raw_request(url, method, path, body=None, headers=None):
    """-> (status, JSON reply) over a fresh connection, the body sent exactly as given."""
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def body_of(obs, **change):
    req = json.loads(policy_client.encode_request(**obs))
    req.update(change)
    return json.dumps({k: v for k, v in req.items() if v is not ...}).encode()


def test_bad_requests_get_a_4xx_json_error_naming_the_problem(model, server):
    obs = observation(1)
    b64 = json.loads(policy_client.encode_request(**obs))["frames"]
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    cases = [
        (b"{not json", 400, "not JSON"),
        (b"[1, 2]", 400, "JSON object"),
        (body_of(obs, state=...), 400, "missing field(s) state"),
        (body_of(obs, foo=1, bar=2), 400, "unknown field(s) bar, foo"),
        (body_of(obs, frames=b64[:3]), 422, "need the 4 frames"),
        (body_of(obs, frames="abc"), 400, "frames must be a list"),
        (body_of(obs, boxes=[[1, 2, 3, 4]] * 3), 422, "boxes must be 4 rows"),
        (body_of(obs, boxes=[[1, 2, 3, 4], [1, 2, 3], None, None]), 422, "boxes[1]"),
        (body_of(obs, frames=[b64[0], "%%%", b64[2], b64[3]]), 422, "frames[1] is not base64"),
        (body_of(obs, frames=b64[:2] + [base64.b64encode(png.getvalue()).decode(), b64[3]]), 422,
         "frames[2] is not a JPEG"),
        (body_of(obs, frames=b64[:3] + [base64.b64encode(obs["frames"][3][:120]).decode()]), 422,
         "frames[3] is not a decodable JPEG"),
        (body_of(obs, state=[0.0] * 21), 422, "22 angles"),
        (body_of(obs, state="zeros"), 400, "state must be a list"),
        (body_of(obs, state=[float("nan")] + [0.0] * 21), 422, "non-finite values at [0]"),  # JSON's NaN literal
        (body_of(obs, task=3), 400, "task must be a string"),
        (body_of(obs, instruction="x" * 3000), 422, "instruction has 3000 characters"),
        (body_of(obs, seed=-1), 422, "seed must be an integer"),
        (body_of(obs, steps=0), 422, "steps must be an integer"),
        (body_of(obs, steps=True), 422, "steps must be an integer"),
    ]
    for body, status, words in cases:
        got, reply = raw_request(server.url, "POST", "/act", body, {"Content-Type": "application/json"})
        assert (got, reply["status"]) == (status, status), (words, reply)
        assert words in reply["error"], (words, reply)
    for method, path, status in [("GET", "/nope", 404), ("POST", "/nope", 404), ("PUT", "/act", 405)]:
        got, reply = raw_request(server.url, method, path, b"{}")
        assert got == status and (path in reply["error"] or method in reply["error"]), reply
    # an oversized body: the client learns why, not from a reset connection
    # (the server reads the body, within its timeout, and drops it)
    with pytest.raises(policy_client.PolicyError,
                       match=r"413: the body has 80\d{5} bytes: more than the limit of 300000"):
        policy_client.PolicyClient(server.url).act(**dict(obs, instruction="x" * 8_000_000))
    # the client's error carries the status and the message
    with pytest.raises(policy_client.PolicyError, match="422: state has non-finite") as e:
        policy_client.PolicyClient(server.url).act(**dict(obs, state=np.full(22, np.inf)))
    assert e.value.status == 422
    # the server keeps serving
    again = policy_client.PolicyClient(server.url).act(**obs, seed=1)["angles"]
    assert np.array_equal(again, in_process(model, obs, 1))


def raw_socket(url):
    u = urlsplit(url)
    return socket.create_connection((u.hostname, u.port), timeout=30)


def read_reply(sock):
    data_ = b""
    while b"\r\n\r\n" not in data_ or len(data_.split(b"\r\n\r\n", 1)[1]) < int(
            data_.split(b"Content-Length: ")[1].split(b"\r\n")[0]):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data_ += chunk
    head, body = data_.split(b"\r\n\r\n", 1)
    return int(head.split()[1]), json.loads(body)


def test_slow_clients_and_missing_lengths_get_an_error_and_others_are_served(model, server):
    obs = observation(2)
    slow = raw_socket(server.url)
    slow.sendall(b"POST /act HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"{" * 10)  # then stalls
    # meanwhile another client is answered (the slow one holds only its own thread)
    other = policy_client.PolicyClient(server.url).act(**obs, seed=2)["angles"]
    assert np.array_equal(other, in_process(model, obs, 2))
    status, reply = read_reply(slow)  # after the server's 1 s timeout
    assert status == 408 and "10 of 1000 bytes" in reply["error"]
    slow.close()
    nolen = raw_socket(server.url)
    nolen.sendall(b"POST /act HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    status, reply = read_reply(nolen)
    assert status == 411 and "Content-Length" in reply["error"]
    nolen.close()
    # curl's Expect: 100-continue: an oversized body is refused before it is sent
    big = raw_socket(server.url)
    big.sendall(b"POST /act HTTP/1.1\r\nHost: x\r\nContent-Length: 999999\r\nExpect: 100-continue\r\n\r\n")
    status, reply = read_reply(big)
    assert status == 413
    big.close()
    assert policy_client.PolicyClient(server.url).health()["status"] == "ok"


def test_concurrent_clients_are_batched_and_each_gets_its_own_answer(model, server):
    n = 6
    # different instructions: prompts of different lengths
    observations = [observation(10 + i) for i in range(n)]
    replies = [None] * n

    def ask(i):
        replies[i] = policy_client.PolicyClient(server.url).act(**observations[i], seed=100 + i)

    # hold the model thread while the requests queue up: they must then run as one batch
    with server.model_lock:
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while server.jobs.qsize() < n - 1 and time.monotonic() < deadline:  # the thread holds the first one
            time.sleep(0.01)
        assert server.jobs.qsize() == n - 1
    for t in threads:
        t.join(timeout=120)
    assert all(r is not None for r in replies)
    assert [r["timing"]["batch_size"] for r in replies] == [n] * n
    # each answer is its sample's own: batch-independent within 1e-5
    # (the model's own test's tolerance; ~1e-6 seen)
    for i, r in enumerate(replies):
        assert batch_error(model, r["angles"], observations[i], 100 + i) < 1e-5

    # many clients, several requests each, no pausing: all answered, in bounded time
    clients, per = 8, 3
    answers = {}

    def loop(c):
        client = policy_client.PolicyClient(server.url)
        for k in range(per):
            obs = observations[(c + k) % n]
            answers[c, k] = (client.act(**obs, seed=c * 10 + k)["angles"], obs, c * 10 + k)

    threads = [threading.Thread(target=loop, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads) and len(answers) == clients * per
    for angles, obs, seed in answers.values():
        assert batch_error(model, angles, obs, seed) < 1e-5


def test_sample_rollout_through_the_server_equals_the_local_one(model, server, tmp_path):
    rng = np.random.default_rng(3)
    write_clip(tmp_path / "clips", "c0", random_walk(rng, 26, scale=0.05), "waving")
    clip = next((tmp_path / "clips").rglob("c0.safetensors"))
    common = ["--clip", str(clip), "--rollout", "5", "--device", "cpu", "--seed", "4"]
    local = sample.run(model, sample.get_args(common + ["--out", str(tmp_path / "local")]))
    remote = sample.run(None, sample.get_args(common + ["--out", str(tmp_path / "remote"), "--server",
                                                        server.url]))
    assert np.array_equal(local["angles_rad"], remote["angles_rad"])
    assert np.array_equal(np.load(tmp_path / "local" / "rollout.npy"), np.load(tmp_path / "remote" / "rollout.npy"))
    roll = json.loads((tmp_path / "remote" / "rollout.json").read_text())
    assert roll["server"] == server.url and len(roll["server_ms"]) == len(roll["calls_at_frame"]) == 5


def test_cli_serves_a_saved_checkpoint(model, tmp_path):
    ckpt = model.save_pretrained(tmp_path / "ckpt")
    proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--ckpt", str(ckpt), "--port", "0",
                             "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=ROOT)
    try:
        assert select.select([proc.stdout], [], [], 120)[0], "serve.py printed nothing within 120 s"
        line = proc.stdout.readline()
        assert "serving" in line, line + proc.stdout.read()
        url = line.split(" on ")[1].split()[0]
        client = policy_client.PolicyClient(url)
        assert client.info()["model_id"] == str(Path(ckpt).resolve())
        obs = observation(5)
        assert batch_error(model, client.act(**obs, seed=3)["angles"], obs, 3) < 1e-5  # another process's threads
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        proc.stdout.close()


def test_inference_flags_go_through_inference_optimize(monkeypatch):
    seen = []
    monkeypatch.setattr(serve.inference, "optimize", lambda model, **kw: seen.append(kw) or model)
    m = object()
    assert serve.optimize(m, SimpleNamespace(dtype="bf16", compile=True, no_merge=False)) is m
    assert serve.optimize(m, SimpleNamespace(dtype="auto", compile=False, no_merge=True)) is m
    assert seen == [{"dtype": torch.bfloat16, "merge_lora": True, "compile": True},
                    {"dtype": None, "merge_lora": False, "compile": False}]


# --------------------------------------------------------------------------------------------------
# ActionQueue: the robot side, with a fake policy whose latency is counted in control ticks


class FakePolicy:
    """act(tick) answers the chunk of the observation at `tick`: row i holds tick + i
    in every joint, so an executed action says which planned step it is. It answers once
    the test opens that tick's gate."""

    def __init__(self, horizon=16, fail_at=()):
        self.horizon, self.fail_at, self.gates, self.lock = horizon, set(fail_at), {}, threading.Lock()

    def gate(self, tick):
        with self.lock:
            return self.gates.setdefault(tick, threading.Event())

    def act(self, tick):
        assert self.gate(tick).wait(30)
        if tick in self.fail_at:
            raise policy_client.PolicyError(None, "connection refused")
        return {"angles": np.repeat(np.arange(tick, tick + self.horizon, dtype=np.float64)[:, None], 22, 1)}


def drive(latency, threshold, ticks=60, fail_at=()):
    """Run the queue for `ticks` control ticks; a request made at tick k is answered just
    before tick k + latency."""
    policy, now = FakePolicy(fail_at=fail_at), [0.0]
    q = policy_client.ActionQueue(policy, threshold=threshold, clock=lambda: now[0])
    actions = []
    for k in range(ticks):
        now[0] = k / 10
        if q.pending is not None and k - q.pending >= latency:
            policy.gate(q.pending).set()
            assert q.idle.wait(30)
        a = q.step(lambda: {"tick": k})
        actions.append(None if a is None else int(a[0]))
    return q, actions


def test_action_queue_executes_the_step_planned_for_each_tick():
    q, actions = drive(latency=3, threshold=4)
    # nothing before the first chunk arrives; from then on tick k executes the step planned for tick
    # k: no step repeated, none skipped, although each chunk arrives 3 ticks after its observation
    assert actions[:3] == [None] * 3 and actions[3:] == list(range(3, 60))
    assert q.starved == 0 and q.stale == 0 and not q.errors
    assert q.dropped == [3] * len(q.dropped) and len(q.dropped) == 5  # requests at ticks 0, 12, 24, 36, 48
    assert q.latency_ms == pytest.approx([300.0] * 5)


def test_action_queue_holds_only_what_latency_forces():
    # latency 6 > threshold 4: the chunk runs out 2 ticks before the next arrives; those ticks hold
    # the last step, and the arriving chunk starts at the step planned for its arrival tick
    q, actions = drive(latency=6, threshold=4, ticks=40)
    expected = [None] * 6 + list(range(6, 16)) + [15, 15] + list(range(18, 28)) + [27, 27] + list(range(30, 40))
    assert actions == expected
    assert q.starved == 4 and q.dropped == [6, 6, 6]
    # a chunk that arrives after its own horizon is of no use: counted and
    # dropped, a new request goes out
    q, actions = drive(latency=17, threshold=4, ticks=20)
    assert q.stale == 1 and actions == [None] * 20 and q.pending == 17


def test_action_queue_survives_a_failed_request():
    with pytest.warns(UserWarning, match="tick 12 failed: connection refused"):
        q, actions = drive(latency=2, threshold=4, ticks=30, fail_at={12})
    # the request of tick 12 fails at tick 14 and is re-sent at once; its answer
    # comes at 16: still in time
    assert len(q.errors) == 1 and actions[2:] == list(range(2, 30)) and q.starved == 0


def test_action_queue_run_paces_the_loop():
    now, slept, commanded = [0.0], [], []

    class Instant:
        def act(self, tick):
            return {"angles": np.repeat(np.arange(tick, tick + 16, dtype=np.float64)[:, None], 22, 1)}

    q = policy_client.ActionQueue(Instant(), threshold=4, clock=lambda: now[0])

    def sleep(s):  # the answer is in before the next tick: fetched within the tick
        assert q.idle.wait(30)
        slept.append(s)
        now[0] += s

    q.run(lambda: {"tick": q.tick}, lambda a: commanded.append(int(a[0])), ticks=20, sleep=sleep)
    assert slept == pytest.approx([0.1] * 20) and commanded == list(range(1, 20)) and q.starved == 0


def test_the_client_needs_no_torch_nor_the_model():
    """A robot process imports policy_client with only numpy and Pillow:
    torch and the model stay out."""
    code = ("import importlib.abc, sys\n"
            "class Block(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in {'torch', 'model', 'qwen3vl', 'data', 'serve', 'safetensors'}:\n"
            "            raise ImportError('policy_client imported ' + name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "import policy_client\n"
            "print(policy_client.PolicyClient('http://127.0.0.1:1').url)\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "127.0.0.1" in run.stdout, run.stderr[-2000:]
