"""Re-run the calibrate-then-predict check of benchmarks/sim_fidelity.py on saved real data, without
starting vLLM: calibrate on DIR/calib.csv (+ DIR/calib.jsonl), predict DIR/valid.jsonl and compare
with DIR/valid.csv (nothing is fitted to valid.csv).

    .venv/bin/python benchmarks/sim_fidelity_offline.py [DIR]        # default /tmp/fidelity-data
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from nbkit.records import read_csv  # noqa: E402
from nbkit.sim import Simulator, calibrate  # noqa: E402
from nbkit.sim.config import single_instance_config  # noqa: E402
from nbkit.sim.fidelity import compare  # noqa: E402
from nbkit.traces import read_trace  # noqa: E402

from sim_fidelity import fmt, fmt_stream, stream_figures  # noqa: E402


def main(argv=None) -> int:
    d = Path((argv or sys.argv[1:] or ["/tmp/fidelity-data"])[0])
    config = single_instance_config("tiny", "cpu", n=1)
    real_calib, real_valid = read_csv(d / "calib.csv"), read_csv(d / "valid.csv")
    t = time.perf_counter()
    fit = calibrate(real_calib, config, trace=str(d / "calib.jsonl"), policy="round_robin")
    print(fit.report(), f"\n  ({time.perf_counter() - t:.1f} s)", flush=True)
    valid = read_trace(d / "valid.jsonl")
    shipped = Simulator(config, policy="round_robin").run(valid)
    fitted = Simulator(config, policy="round_robin", hardware={"cpu": fit.profile}).run(valid)
    before, after = compare(real_valid, shipped.records), compare(real_valid, fitted.records)
    print(f"  {'':<14}{'real':>10}{'sim':>10}{'error':>10}")
    print("shipped cpu profile:", *fmt(before), *fmt_stream(stream_figures(real_valid, shipped.records)), sep="\n")
    print("calibrated profile:", *fmt(after), *fmt_stream(stream_figures(real_valid, fitted.records)), sep="\n")
    worst = max(abs(v) for v in after["rel_err"].values())
    print(f"goal: each within 10 % after calibration: {'PASS' if worst <= 0.10 else 'FAIL'} "
          f"(worst {worst * 100:.1f} %)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
