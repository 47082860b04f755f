"""bench/multi_gpu.py on 2 emulated CPU devices with --quick sizes (f32, reference kernels).

The script's own numbers are timings; what can be checked here is its logic: the ring
output it compares equals full attention, its "compute alone" function computes the
last device's rows of causal attention (numpy softmax written from the formula), the
throughput and ratio columns follow from the measured times as documented, expert
parallelism puts all-to-all in the compiled step and FSDP all-gathers, OOM is reported.
"""
import jax
import numpy as np
import pytest

from bench import multi_gpu
from pallas_kernels.ring_attention import LAYOUTS, layout_positions, to_layout
from pallas_kernels.ring_attention.block import BlockConfig

N = 2
QUICK = ["--quick", "--devices", str(N), "--reps", "1", "--warmup", "0"]


def causal_attention_np(q, k, v, q_pos, kv_pos):
    """softmax(q k^T / sqrt(D), masked to kv_pos <= q_pos) v, per head, in float64 numpy."""
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    s = np.where(kv_pos[:, None, None, :] <= q_pos[:, None, :, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, v)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_compute_alone_is_the_last_devices_rows_of_causal_attention(layout):
    n, t, h, d = 4, 64, 2, 8
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, t, h, d)).astype(np.float32) for _ in range(3))
    pos = layout_positions(t, n, layout, batch=1)
    ql, kl, vl = (to_layout(x, n, layout) for x in (q, k, v))  # [1, T, H, D] in the layout
    tl = t // n
    fn = multi_gpu.ring_without_rotation(n, pos[:, -tl:], pos, BlockConfig("reference", causal=True))
    got = np.asarray(jax.jit(fn)(ql[:, -tl:], kl, vl))
    want = causal_attention_np(ql[:, -tl:].astype(np.float64), k, v, pos[:, -tl:], np.arange(t)[None])
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_ring_section_checks_against_full_attention_and_writes_tables(tmp_path):
    out = tmp_path / "ring.md"
    res = multi_gpu.main(QUICK + ["--skip-ep", "--skip-fsdp", "--out", str(out)])
    ring = res["ring"]
    assert {c["layout"] for c in ring["checks"]} == set(LAYOUTS)
    for c in ring["checks"]:
        assert c["max_abs_err"] < 1e-4 and c["ok"], c
        assert c["max_abs_ref"] > 0.1   # a real output, not zeros against zeros
    assert len(ring["rows"]) == 2 * len(LAYOUTS)  # fwd and fwd+bwd per layout
    for r in ring["rows"]:
        s, ln = r["seq"], r["per_device"]
        assert ln * N == s
        mult = 3.5 if r["pass_"] == "fwd+bwd" else 1.0
        flops = 4 * 1 * 2 * 16 * s**2 / 2 * mult           # 4·B·H·D·S², half causal; H=2 D=16
        np.testing.assert_allclose(r["ring_tflops"], flops / N / r["ring_s"] / 1e12, rtol=1e-9)
        np.testing.assert_allclose(r["ratio"], N * r["flash_s"] / r["ring_s"], rtol=1e-9)
        np.testing.assert_allclose(r["exposed_s"], r["ring_s"] - r["alone_s"], rtol=1e-9)
        assert (r["rotate_s"] is not None) == (r["pass_"] == "fwd")
    text = out.read_text()
    assert text == res["markdown"]
    assert f"{N} x cpu" in text and jax.__version__ in text
    assert "## Ring attention on 2 device(s)" in text and "| 256 | 128 | striped | fwd |" in text
    assert text.count("| yes |") == len(LAYOUTS)


def _check_row(r, k):
    assert r["devices"] == k and r["batch"] == 2 * k  # fixed per-device batch
    assert r["step_s"] > 0
    assert r["tokens_per_s"] == pytest.approx(r["batch"] * r["seq"] / r["step_s"])
    assert r["tokens_per_s_per_device"] == pytest.approx(r["tokens_per_s"] / k)


def test_expert_parallel_step_moves_tokens_with_all_to_all():
    args = multi_gpu.parse_args(QUICK)
    res = multi_gpu.ep_section(args, jax.devices()[:N], device_counts=[N])
    (r,) = res["rows"]
    _check_row(r, N)
    assert r["rules"] == "dp+ep" and r["mesh"] == f"expert={N}"
    assert r["collectives"]["all-to-all"] >= 2   # dispatch and combine, at least
    assert f"| {N} | expert={N} | dp+ep |" in res["tables"][0].markdown()


def test_fsdp_step_gathers_weights():
    args = multi_gpu.parse_args(QUICK)
    res = multi_gpu.fsdp_section(args, jax.devices()[:N], device_counts=[N])
    (r,) = res["rows"]
    _check_row(r, N)
    assert r["collectives"]["all-gather"] >= 1


@pytest.mark.slow
def test_main_train_sections_scale_from_one_device(tmp_path):
    res = multi_gpu.main(QUICK + ["--skip-ring", "--out", str(tmp_path / "train.md")])
    ep, fsdp = res["ep"]["rows"], res["fsdp"]["rows"]
    for rows in (ep, fsdp):
        assert [r["devices"] for r in rows] == [1, N]
        for r in rows:
            _check_row(r, r["devices"])
        assert sum(rows[0]["collectives"].values()) == 0   # one device: no collectives
    assert ep[1]["collectives"]["all-to-all"] >= 2
    assert "## Expert parallelism" in res["markdown"] and "## FSDP scaling" in res["markdown"]


def test_guarded_reports_oom_and_reraises_other_errors():
    def oom():
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 8.00GiB")

    def broken():
        raise TypeError("not an OOM")

    assert multi_gpu.guarded(oom) is None
    with pytest.raises(TypeError, match="not an OOM"):
        multi_gpu.guarded(broken)
    assert multi_gpu._ms(None) == "OOM" and multi_gpu._ms(0.0125) == "12.50"


def test_bad_flags_raise_naming_the_flag():
    args = multi_gpu.parse_args(["--quick", "--seqs", "255"])
    with pytest.raises(ValueError, match=r"--seqs \[255\] must be positive multiples of the 2 devices"):
        multi_gpu.check_args(args, 2)
    with pytest.raises(ValueError, match=r"--devices=99"):
        multi_gpu.check_args(multi_gpu.parse_args(["--quick"]), 99)
    with pytest.raises(ValueError, match=r"--reps=0 must be >= 1"):
        multi_gpu.check_args(multi_gpu.parse_args(["--quick", "--reps", "0"]), 2)
    assert multi_gpu.parse_args(["--seqs", "32k,100"]).seqs == [32768, 100]
