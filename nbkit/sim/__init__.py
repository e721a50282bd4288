"""nbkit's simulator: the same cluster, routing and scheduler at GPU scale, on a laptop.

    from nbkit.sim import Simulator, load_cluster_config
    from nbkit.traces import read_trace
    result = Simulator(load_cluster_config("cluster.json"), policy="LOAD").run(read_trace("trace.jsonl"))
    print(result.format_summary()); result.write_csv("out.csv")

or ``python -m nbkit.sim --cluster-config cluster.json --dataset trace.jsonl --output out.csv``.
Modules: config (seed JSON), models (shapes), hardware (profiles), perf (step time), request (a
request inside an engine), engine (one replica's scheduler), runs (its decode-only runs planned
ahead), simulator (the cluster; its records, CSV and summary are :mod:`nbkit.records`'), results
(what a run returns, inter-token gaps counted per step), fidelity (calibration traces, real vs simulated
figures), calibrate (fitting a profile), replica (a live simulated replica's engines and metrics),
server (its HTTP app and command line), __main__ (the CLI).
"""

from nbkit.sim.config import ClusterConfig, InstanceSetup, SimConfigError, load_cluster_config, resolve_instances
from nbkit.sim.hardware import HardwareProfile, get_hardware, load_profile, save_profile
from nbkit.sim.models import ModelSpec, get_model_spec
from nbkit.sim.simulator import SimResult, Simulator, simulate
from nbkit.sim.calibrate import CalibrationResult, calibrate

__all__ = ["ClusterConfig", "InstanceSetup", "SimConfigError", "load_cluster_config", "resolve_instances",
           "HardwareProfile", "get_hardware", "load_profile", "save_profile", "ModelSpec", "get_model_spec",
           "Simulator", "SimResult", "simulate", "calibrate", "CalibrationResult"]
