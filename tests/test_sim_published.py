"""benchmarks/sim_published.py: every published figure is simulated and compared, with the
ShareGPT-like lengths it claims."""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import sim_published as sp  # noqa: E402

# the numbers (sglang benchmark_vllm_060 README; vLLM dashboard latency test)
PUBLISHED = {1691.97, 100.48, 14.14, 2137.16, 120.39, 17.09, 2915.60, 179.15, 23.58, 3752.38, 207.12, 29.15,
             21.27, 4132.37, 19.04, 3700.64, 833.42, 2077.53}


def test_every_published_figure_is_simulated_with_its_relative_error(tmp_path):
    assert sp.main(["--out", str(tmp_path / "r")]) == 0
    import json
    out = json.loads((tmp_path / "r.json").read_text())
    rows = out["rows"]
    assert {r["published"] for r in rows} == PUBLISHED and len(rows) == 18
    for r in rows:
        assert r["simulated"] > 0 and math.isfinite(r["simulated"])
        assert abs(r["error"] - (r["simulated"] - r["published"]) / r["published"]) < 1e-3
        assert r["within_goal"] == (abs(r["error"]) <= 0.20)
    errs = sorted(abs(r["error"]) for r in rows)
    assert out["median_abs_error"] == (errs[8] + errs[9]) / 2
    assert out["goal_pass"] == (errs[-1] <= 0.20 and out["median_abs_error"] <= 0.10)
    text = (tmp_path / "r.txt").read_text()
    assert "figures within 20 %" in text and "published medians imply" in text


def test_sharegpt_like_lengths_have_the_published_means_after_the_filter():
    trace = sp.sharegpt_like(20000, 4.0, seed=1)
    ins = [t.input_toks for t in trace]
    outs = [t.output_toks for t in trace]
    assert abs(sum(ins) / len(ins) - 224) < 224 * 0.03
    assert abs(sum(outs) / len(outs) - 196) < 196 * 0.03
    assert min(ins) >= 4 and min(outs) >= 4 and max(ins) <= 1024 and max(i + o for i, o in zip(ins, outs)) <= 2048
    span = (trace[-1].arrival_time_ns - trace[0].arrival_time_ns) / 1e9
    assert abs(len(trace) / span - 4.0) < 0.2
