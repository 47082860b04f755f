"""A tiny attention/Mamba-2 hybrid with MoE trains through train.py's train_and_evaluate."""
from trainer_helpers import family_config

from train import train_and_evaluate
from trainer.metrics import read_metrics


def test_tiny_hybrid_trains_with_packed_documents(corpus, tmp_path):
    """Jamba-like: an attention block and a Mamba-2 + MoE block, packed batches (segment
    ids reset the SSM), six steps; the loss falls."""
    cfg = family_config("hybrid", corpus, steps=6)
    cfg.model.update(d_model=32, num_layers=2, layer_pattern=("nope", "mamba"), num_heads=2,
                     num_kv_heads=1, head_dim=16, mlp_dim=64, max_seq_len=64)
    cfg.model.moe.update(num_experts=4, expert_mlp_dim=32)      # MoE in layer 1 (every=2)
    cfg.model.ssm.update(d_state=8, head_dim=16, chunk_size=16)
    cfg.optim.lr = 1e-2
    result = train_and_evaluate(cfg, str(tmp_path), progress=False)
    losses = {r["step"]: r["loss"] for r in read_metrics(str(tmp_path / "metrics.jsonl"))
              if r["split"] == "train"}
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and result["step"] == 6
    assert losses[6] < losses[1] - 0.3, losses
