"""``bench/e2e_check.py``, the end-to-end part of the one-call GPU check: its CPU smoke run
(the tiny model) measures every case, reports each number once and writes the JSON it
returns; no goal is judged without a GPU."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def e2e_check():
    spec = importlib.util.spec_from_file_location("e2e_check", BENCH / "e2e_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_smoke_run_measures_every_case_and_writes_what_it_reports(e2e_check, tmp_path, monkeypatch):
    monkeypatch.setenv("ISEG_OPS_BACKEND", "torch")
    reported = []
    results = e2e_check.run(tmp_path, lambda *args: reported.append(args), smoke=True)
    assert json.loads((tmp_path / "cpu-e2e-check.json").read_text()) == results
    assert results["errors"] == {}
    pipelines = ("authors", "iseg", "iseg-compiled")
    expected = {f"e2e {p} batch {b}" for p in pipelines for b in (1, 2)}
    expected |= {
        f"vae eager {layout} {how} batch 2"
        for layout in ("nchw", "channels_last")
        for how in ("slices of 4", "whole batch")
    }
    expected |= {
        "vae compiled channels_last whole batch batch 1",
        "vae compiled channels_last whole batch batch 2",
    }
    expected |= {
        "vae compiled nchw whole batch batch 2",
        "vae compiled channels_last slices of 4 batch 2",
    }
    assert set(results["cases"]) == expected
    for name, case in results["cases"].items():
        assert case["ms_per_image"] > 0 and math.isclose(
            case["ms_per_call"], case["ms_per_image"] * case["batch"]
        ), name
    assert set(results["cases"]["e2e iseg batch 1"]["stages_ms_per_image"]) == {
        "text",
        "vae",
        "unet",
        "ops",
        "post",
    }
    # The eager backend changes nothing: the compiled pipeline gives iseg's outputs exactly.
    assert results["agreement"] == {"heatmap_max_abs_diff": 0.0, "label_agreement": 1.0}
    assert len(results["goals"]) == 3 and all(g["met"] is None for g in results["goals"].values())
    by_name = {name: (value, met, unit) for name, value, met, unit in reported}
    for name, case in results["cases"].items():
        assert by_name[name] == (case["ms_per_image"], None, "ms/image")
    for name, goal in results["goals"].items():
        assert by_name[name] == (goal["value"], None, goal["unit"])
    speedup = results["goals"]["goal: iseg-compiled batch 1 ≥ 3× authors"]["value"]
    cases = results["cases"]
    assert (
        speedup
        == cases["e2e authors batch 1"]["ms_per_image"]
        / cases["e2e iseg-compiled batch 1"]["ms_per_image"]
    )


def test_a_compiled_case_that_would_overrun_the_budget_is_skipped_and_reported(e2e_check, tmp_path):
    reported = []
    guess = e2e_check.FIRST_COMPILE_GUESS_S
    check = e2e_check._Check(
        tmp_path, lambda *args: reported.append(args), smoke=False, budget_s=1.1 * guess
    )
    # Before any compile is timed, the guess decides: 1.1 × guess left < 1.2 × guess.
    assert not check.within_budget("e2e iseg-compiled batch 1")
    assert reported == [
        ("e2e iseg-compiled batch 1 (skipped: compile budget)", None, None, "ms/image")
    ]
    assert "skipped" in check.results["errors"]["e2e iseg-compiled batch 1"]
    check.last_compile_s = 0.5 * guess  # a compile timed at half the guess fits
    assert check.within_budget("e2e iseg-compiled batch 8")
    assert len(reported) == 1
