# bench/gpu_check.py in its CPU mode, as CI runs it: every stage of the GPU machine's check, with
# tiny shapes, so the script cannot rot between GPU runs.
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_quick_cpu(tmp_path):
    r = subprocess.run([sys.executable, "bench/gpu_check.py", "--quick", "--device", "cpu",
                        "--out", str(tmp_path)],
                       cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                       timeout=1200)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    stages = {s["stage"]: s for s in summary["stages"]}
    assert list(stages) == ["env", "agree", "shapes", "latency", "trainstep", "trainrun", "evalsample", "ddp"]
    assert all(s["status"] == "PASS" and s["figures"] for s in stages.values()), r.stdout
    for s in stages.values():  # each stage printed its line with its figures as it ended
        assert any(line.startswith(f"PASS {s['stage']}") for line in r.stdout.splitlines())
    assert stages["trainrun"]["figures"]["bitwise"] is True
    assert stages["trainrun"]["figures"]["checkpoint_base"] == {"init_seed": 0}
    assert stages["ddp"]["figures"]["max_rel_diff_vs_1_process"] < 1e-5
    assert r.stdout.rstrip().splitlines()[-1].startswith("PASS: 8/8 stages passed")


def test_a_failing_stage_does_not_hide_the_others(tmp_path, monkeypatch, capsys):
    """A raising stage is reported FAIL with its error; the next one still runs; exit code 1."""
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    monkeypatch.setattr(gpu_check, "stage_env", lambda ctx: 1 / 0)
    code = gpu_check.main(["--quick", "--device", "cpu", "--stages", "env,shapes", "--out", str(tmp_path)])
    lines = capsys.readouterr().out.splitlines()
    assert code == 1
    assert any(line.startswith("FAIL env") and "ZeroDivisionError" in line for line in lines), lines
    assert any(line.startswith("PASS shapes") for line in lines), lines
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [s["status"] for s in saved["stages"]] == ["FAIL", "PASS"] and "1 / 0" in saved["stages"][0]["traceback"]
