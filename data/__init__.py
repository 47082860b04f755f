"""Data for training: tokenizers, sources (the embedded stdlib corpus), packing, loaders.

    from data import build_dataset
    ds = build_dataset(cfg.data)                    # checks every field first
    loader = ds.train_loader(seed=cfg.seed, process_index=jax.process_index(),
                             process_count=jax.process_count())
    batch = next(loader)    # tokens, targets, loss_mask, segment_ids, positions: [B, T]
    logits, aux = model(batch["tokens"], positions=batch["positions"],
                        segment_ids=batch["segment_ids"])
    # loss = sum(loss_mask * xent(logits, targets)) / sum(loss_mask)
    state = loader.get_state()                      # store with the checkpoint
"""
from data.dataset import Dataset, build_dataset, check_data_config
from data.loader import TrainLoader, eval_batches
from data.packing import BATCH_KEYS, pack_rows, stream_offsets
from data.sources import Documents, from_arrays, load_source, split_documents, stdlib_files
from data.tokenizer import ByteTokenizer, HFTokenizer, make_tokenizer

__all__ = [
    "BATCH_KEYS", "ByteTokenizer", "Dataset", "Documents", "HFTokenizer", "TrainLoader",
    "build_dataset", "check_data_config", "eval_batches", "from_arrays", "load_source",
    "make_tokenizer", "pack_rows", "split_documents", "stdlib_files", "stream_offsets",
]
