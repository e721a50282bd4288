"""The seed trace JSONL format: round trip, sessions, and errors that name the line and field."""

import json

import pytest

from nbkit.traces import SubRequest, TraceError, TraceRequest, TraceSession, read_trace, write_trace


def test_round_trip_flat_and_sessions(tmp_path):
    items = [
        TraceRequest(4, 2, 0, (1, 2, 3, 4)),
        TraceSession("s1", 5, (SubRequest(10, 3, 1000), SubRequest(7, 2))),
        TraceRequest(16, 8, 1_000_000),
    ]
    p = tmp_path / "t.jsonl"
    write_trace(p, items)
    assert read_trace(p) == items
    lines = [json.loads(x) for x in p.read_text().splitlines()]
    assert lines[0] == {"input_toks": 4, "output_toks": 2, "arrival_time_ns": 0, "input_tok_ids": [1, 2, 3, 4]}
    assert lines[1]["sub_requests"][1] == {"input_toks": 7, "output_toks": 2, "tool_duration_ns": 0}


def test_sorted_by_arrival_and_blank_lines(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text('{"input_toks": 1, "output_toks": 1, "arrival_time_ns": 50}\n\n'
                 '{"input_toks": 2, "output_toks": 1, "arrival_time_ns": 10}\n')
    assert [r.input_toks for r in read_trace(p)] == [2, 1]


@pytest.mark.parametrize("line, needle", [
    ('{"input_toks": 0, "output_toks": 1, "arrival_time_ns": 0}', ":1.input_toks=0"),
    ('{"input_toks": 3, "output_toks": 1}', "missing field 'arrival_time_ns'"),
    ('{"input_toks": 3, "output_toks": 1, "arrival_time_ns": 0, "prompt": "x"}', "unknown field(s) prompt"),
    ('{"input_toks": 3, "output_toks": 1, "arrival_time_ns": 0, "input_tok_ids": [1]}', "has 1 ids but input_toks=3"),
    ('{"input_toks": 2.5, "output_toks": 1, "arrival_time_ns": 0}', "input_toks=2.5: expected an integer"),
    ('{"session_id": "a", "arrival_time_ns": 0, "sub_requests": [{"input_toks": 3}]}',
     ":1.sub_requests[0]: missing field 'output_toks'"),
    ('{"session_id": "a", "arrival_time_ns": 0, "sub_requests": []}', "sub_requests: expected a non-empty list"),
    ('[1, 2]', "expected a JSON object"),
    ('{"input_toks": 3,', "not valid JSON"),
])
def test_errors_name_line_and_field(tmp_path, line, needle):
    p = tmp_path / "bad.jsonl"
    p.write_text(line + "\n")
    with pytest.raises(TraceError) as e:
        read_trace(p)
    assert needle in str(e.value)
    assert "bad.jsonl:1" in str(e.value)


def test_poisson_trace_rate_lengths_and_seed():
    from nbkit.traces import poisson_trace
    t = poisson_trace(4000, rate=20.0, input_toks=(10, 20), output_toks=(1, 3), seed=5)
    gaps = [(b.arrival_time_ns - a.arrival_time_ns) / 1e9 for a, b in zip(t, t[1:])]
    assert t[0].arrival_time_ns == 0 and all(g >= 0 for g in gaps)
    assert abs(sum(gaps) / len(gaps) - 1 / 20.0) < 0.005
    assert {r.input_toks for r in t} == set(range(10, 21)) and {r.output_toks for r in t} == {1, 2, 3}
    assert poisson_trace(50, 3.0, seed=1) == poisson_trace(50, 3.0, seed=1) != poisson_trace(50, 3.0, seed=2)
    with pytest.raises(ValueError, match="input_toks"):
        poisson_trace(5, 1.0, input_toks=(0, 4))
