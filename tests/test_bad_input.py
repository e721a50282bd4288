"""Bad input fails at once, names the field or option, and launches nothing (no vLLM needed)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from nbkit import Cluster, SpecError
from nbkit.policies import get_policy


@pytest.mark.parametrize("field,kwargs", [
    ("port_start", {"port_start": 70000}), ("port_start", {"port_start": -1}), ("port_start", {"port_start": 0}),
    ("port_start", {"port_start": "8100"}), ("kv_events_port", {"kv_events_port": 65536}),
])
def test_a_port_out_of_range_is_a_spec_error_naming_it(field, kwargs):
    with pytest.raises(SpecError, match=rf"^{field}=.*1-65535") as err:
        Cluster.replicas(n=2, **kwargs)
    assert err.value.field == field


@pytest.mark.parametrize("flag,value,why", [
    ("--port", "0", "0 is not a TCP port"), ("--port", "70000", "70000 is not a TCP port"),
    ("--port-start", "-1", "-1 is not a TCP port"), ("--port", "http", "'http' is not a port number"),
])
def test_serve_refuses_a_bad_port_before_launching_anything(flag, value, why, tmp_path):
    r = subprocess.run([sys.executable, "-m", "nbkit", "serve", "no-such-model", "-n", "2", f"{flag}={value}"],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"argument {flag}: {why}" in r.stderr and "Traceback" not in r.stderr
    assert "starting" not in r.stdout


@pytest.mark.parametrize("spec,needle", [
    ("prefix_affinity:affinity_weight=abc", "affinity_weight='abc' must be a number"),
    ("prefix_affinity:affinity_weight=-5", "affinity_weight=-5 must be a finite number >= 0"),
    ("least_load:kv_weight=inf", "kv_weight=inf must be a finite number >= 0"),
    ("prefix_affinity:block_chars=64.5", "block_chars=64.5 must be a whole number"),
    ("kv_aware:prefill_weight=fast", "prefill_weight='fast' must be a number"),
])
def test_policy_option_values_are_checked_when_the_policy_is_made(spec, needle):
    with pytest.raises(ValueError, match="option " + needle.replace("(", r"\(")):
        get_policy(spec)


def test_good_policy_option_values_keep_their_kind():
    p = get_policy("prefix_affinity:affinity_weight=2,block_chars=32.0,kv_weight=0")
    assert (p.affinity_weight, p.block_chars, p.kv_weight) == (2.0, 32, 0.0)
    assert isinstance(p.block_chars, int) and isinstance(p.affinity_weight, float)


def test_serve_refuses_a_bad_policy_option_before_launching(tmp_path):
    r = subprocess.run([sys.executable, "-m", "nbkit", "serve", "no-such-model", "-n", "2", "--port", "8999",
                        "--policy", "prefix_affinity:affinity_weight=abc"],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 2 and "affinity_weight='abc'" in r.stderr and "Traceback" not in r.stderr, r.stderr
