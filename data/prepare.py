"""Tokenise a text source once into `.bin` token memmaps (format: data/sources.py).

    python -m data.prepare --source=stdlib --out=prepared/stdlib
    python -m data.prepare --source="books/**/*.txt" --tokenizer=tok/tokenizer.json \\
        --out=prepared/books --val_fraction=0.01

writes OUT/train.bin and OUT/val.bin (each with .idx offsets and .json metadata),
split exactly as training on the text source would split it, then prints the config
overrides that train on them:

    --config.data.source=OUT/train.bin --config.data.val_source=OUT/val.bin

`--val_fraction=0` writes OUT/train.bin only.
"""
from __future__ import annotations

import argparse
import os

from data.sources import load_source, split_documents, write_bin
from data.tokenizer import make_tokenizer


def prepare(source: str, out: str, *, tokenizer: str = "byte",
            val_fraction: float = 0.05) -> dict[str, str]:
    """Tokenise `source` into `out`/{train,val}.bin; returns {split: path}."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"{val_fraction=} must lie in [0, 1)")
    tok = make_tokenizer(tokenizer, field="tokenizer")
    docs = load_source(source, tok, field="source")
    splits = {"train": docs}
    if val_fraction > 0:
        splits["train"], splits["val"] = split_documents(docs, val_fraction,
                                                         field="val_fraction")
    os.makedirs(out, exist_ok=True)
    paths = {}
    for name, part in splits.items():
        paths[name] = os.path.join(out, f"{name}.bin")
        write_bin(part, paths[name], tokenizer_name=tok.name, vocab_size=tok.vocab_size)
    return paths


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--source", required=True, help="stdlib, a text file, directory or glob")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--tokenizer", default="byte", help="byte or a tokenizer.json path")
    p.add_argument("--val_fraction", type=float, default=0.05,
                   help="share of documents held out for validation (0: none)")
    args = p.parse_args(argv)
    paths = prepare(args.source, args.out, tokenizer=args.tokenizer,
                    val_fraction=args.val_fraction)
    for name, path in paths.items():
        print(f"{name}: {path} ({os.path.getsize(path)} bytes)")
    flags = f"--config.data.source={paths['train']}"
    if "val" in paths:
        flags += f" --config.data.val_source={paths['val']}"
    if args.tokenizer != "byte":
        flags += f" --config.data.tokenizer={args.tokenizer}"
    print("train with:", flags)


if __name__ == "__main__":
    main()
