"""bench/gpu_check.py, the one-call GPU check, runs end to end on CPU (``--smoke``: tiny shapes,
Triton's interpreter), so a lent GPU's few minutes are not spent finding a crash; and its
end-to-end section takes goals from ``bench/e2e_check.py`` or says it is not available."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_smoke_run_writes_every_section_and_each_goal(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--no-e2e", "--out", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=900, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "cpu-check.json").read_text())
    assert result["errors"] == []
    assert result["correctness"] and all(c["ok"] for c in result["correctness"])
    ops = {c["case"].split()[0] for c in result["correctness"]}
    assert ops == {"refine", "ent_self", "head_mean_attention", "symmetric_kl", "kl_cluster"}
    # 2 dtypes × 2 batches × 1 K × 2 N, each timed on both providers.
    assert len(result["refine"]) == 8
    assert all(r["new_ms"] > 0 and r["reference_ms"] > 0 for r in result["refine"])
    assert len(result["iteration"]) == 4 and all(r["bmm_ms"] > 0 for r in result["iteration"])
    assert result["graph"] == {"skipped": "needs CUDA"}
    # The six ops goals, each printed with its number; a smoke run measures none of them.
    assert [g["goal"] for g in result["goals"]] == [1, 2, 3, 4, 5, 6]
    assert all(g["met"] is None for g in result["goals"])
    for number in range(1, 7):
        assert f"goal {number}: " in proc.stdout
    assert "not measured" in proc.stdout


def test_end_to_end_section_without_e2e_check(tmp_path, capsys):
    gpu_check = _module()
    check = gpu_check.Check(smoke=True)
    gpu_check.end_to_end(check, tmp_path, True, 10.0, path=tmp_path / "missing.py")
    assert "e2e: not available" in capsys.readouterr().out
    assert check.e2e == [{"skipped": "bench/e2e_check.py not available"}]


def test_end_to_end_goals_are_numbered_after_the_ops_goals(tmp_path, capsys):
    fake = tmp_path / "e2e_check.py"
    fake.write_text(
        "def run(out_dir, report, smoke=None, budget_s=240.0):\n"
        "    report('authors b1', 40.0, None, 'ms')\n"
        "    report('iseg-compiled b1 <= 12 ms', 9.5, True, 'ms')\n"
        "    report('iseg-compiled b8 <= 6 ms/image', 7.0, False, 'ms/image')\n"
        "    return {}\n"
    )
    gpu_check = _module()
    check = gpu_check.Check(smoke=False)
    gpu_check.end_to_end(check, tmp_path, False, 10.0, path=fake)
    gpu_check.goals(check, gpu_check.GPU_SHAPES, "no-such-gpu")
    out = capsys.readouterr().out
    assert [(g["goal"], g["met"]) for g in check.goals[6:]] == [(7, True), (8, False)]
    assert "goal 7: iseg-compiled b1 <= 12 ms: 9.5 ms: met" in out
    assert "goal 8: iseg-compiled b8 <= 6 ms/image: 7 ms/image: not met" in out
    # No refine numbers in this check: the ops goals are not measured, not failed.
    assert all(g["met"] is None for g in check.goals[:6])
