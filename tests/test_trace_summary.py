"""bench/trace_summary.py on a hand-written perfetto trace: only GPU-stream kernels count."""
import gzip
import json

from bench.trace_summary import kind_of, load_kernels, summarise


def write_trace(path):
    events = [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
        {"ph": "M", "name": "process_name", "pid": 7, "args": {"name": "/device:GPU:0"}},
        {"ph": "X", "pid": 7, "name": "sm90_xmma_gemm_bf16", "dur": 300.0},
        {"ph": "X", "pid": 7, "name": "sm90_xmma_gemm_bf16", "dur": 100.0},
        {"ph": "X", "pid": 7, "name": "flash_attention_fwd", "dur": 150.0},
        {"ph": "X", "pid": 7, "name": "loop_add_fusion", "dur": 50.0},
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
