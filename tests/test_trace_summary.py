"""bench/trace_summary.py on a hand-written perfetto trace: only GPU-stream kernels count."""
import gzip
import json

from bench.trace_summary import idle_gaps, kind_of, load_kernels, summarise


def write_trace(path):
    events = [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
        {"ph": "M", "name": "process_name", "pid": 7, "args": {"name": "/device:GPU:0"}},
        {"ph": "X", "pid": 7, "name": "sm90_xmma_gemm_bf16", "ts": 0.0, "dur": 300.0},
        {"ph": "X", "pid": 7, "name": "sm90_xmma_gemm_bf16", "ts": 310.0, "dur": 100.0},
        {"ph": "X", "pid": 7, "name": "flash_attention_fwd", "ts": 1000.0, "dur": 150.0},
        {"ph": "X", "pid": 7, "name": "loop_add_fusion", "ts": 1100.0, "dur": 50.0},
        {"ph": "X", "pid": 1, "name": "PjitFunction(train_step)", "dur": 9999.0},  # host: ignored
    ]
    path.mkdir(parents=True)
    with gzip.open(path / "perfetto_trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)


def test_gpu_kernels_are_summed_by_name_and_kind(tmp_path):
    write_trace(tmp_path / "plugins" / "profile" / "run1")
    totals = load_kernels(str(tmp_path))
    assert totals == {"sm90_xmma_gemm_bf16": 400.0, "flash_attention_fwd": 150.0, "loop_add_fusion": 50.0}
    assert [kind_of(n) for n in totals] == ["matmul", "attention", "fusion/elementwise"]
    text = summarise(str(tmp_path), steps=2)
    assert "GPU kernel time per step: 0.3 ms" in text  # 600 us over 2 steps
    assert "| matmul | 0.2 | 67% |" in text


def test_idle_gaps_split_launch_gaps_from_host_waits():
    # Busy [0, 300) and [310, 410) (a 10 us launch gap), then [1000, 1150) on two streams
    # overlapping (a 590 us wait on the host); the union counts overlap once.
    events = [{"ts": 0.0, "dur": 300.0}, {"ts": 310.0, "dur": 100.0},
              {"ts": 1000.0, "dur": 150.0}, {"ts": 1100.0, "dur": 20.0}]
    gaps = idle_gaps(events, long_us=100.0)
    assert gaps == dict(span=1150.0, busy=550.0, short=10.0, long=590.0, long_count=1)
    assert gaps["busy"] + gaps["short"] + gaps["long"] == gaps["span"]


def test_summary_reports_the_timeline(tmp_path):
    write_trace(tmp_path / "run")
    text = summarise(str(tmp_path))
    assert "busy 0.6 ms of a 1.1 ms span" in text
    assert "0.6 ms in 1 gaps >= 100 us" in text
