"""Generate text from a trained model with the serving engine (KV cache, batched).

    python sample.py --workdir=runs/tiny --prompt="def "
    python sample.py --workdir=runs/tiny --prompt="import " --num_samples=4 --temperature=0.8 --top_p=0.95
    python sample.py --hf=path/to/hf_checkpoint --prompt="Hello" --tokenizer=path/to/tokenizer.json

`--workdir` is a train.py workdir: the model config comes from its `config.json`, the
weights from the newest good checkpoint (trainer/checkpoint.py `restore_model`), the
tokenizer from the config's `data.tokenizer`. `--hf` loads a Hugging Face
safetensors directory instead (arch/hf.py), with the tokenizer.json found beside it
or named by `--tokenizer` (default: bytes).

The engine (serving/engine.py) decodes all samples as one batch; sample i uses seed
`--seed + i`, so each sample is reproducible on its own.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import ml_collections as mlc

from serving.cache import KINDS


def load_workdir(workdir: str):
    """(model, config, tokenizer) of the newest good checkpoint of a train.py workdir."""
    from data.tokenizer import make_tokenizer
    from trainer.checkpoint import restore_model

    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise ValueError(f"{workdir=} holds no config.json; is it a train.py workdir?")
    with open(path) as f:
        cfg = mlc.ConfigDict(json.load(f))
    model, step = restore_model(cfg, workdir)
    print(f"restored step {step} from {workdir}", file=sys.stderr)
    return model, cfg.model, make_tokenizer(cfg.data.tokenizer)


def load_hf(path: str, tokenizer: str | None):
    from arch import hf
    from data.tokenizer import make_tokenizer

    model, cfg = hf.load(path)
    if tokenizer is None:
        tokenizer = path if os.path.exists(os.path.join(path, "tokenizer.json")) else "byte"
    return model, cfg, make_tokenizer(tokenizer)


def generate_text(model, tokenizer, prompt: str, *, num_samples: int = 1, max_new_tokens: int = 128,
                  cache_kind: str = "dense", seed: int = 0, **sampling) -> list[str]:
    """`num_samples` continuations of `prompt` (text in, text out), batched by the engine."""
    from serving.engine import Engine

    ids = [int(t) for t in tokenizer.encode(prompt)]
    limit = model.cfg.max_seq_len
    if len(ids) + max_new_tokens > limit:
        raise ValueError(f"prompt ({len(ids)} tokens) + {max_new_tokens=} exceeds "
                         f"model.max_seq_len={limit}")
    engine = Engine(model, max_slots=num_samples, max_len=len(ids) + max_new_tokens,
                    cache_kind=cache_kind)
    rids = [engine.submit(ids, max_new_tokens=max_new_tokens, seed=seed + i, **sampling)
            for i in range(num_samples)]
    engine.run()
    return [tokenizer.decode(ids + engine.result(r)) for r in rids]


def main(argv=None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="a train.py workdir (config.json + checkpoints/)")
    src.add_argument("--hf", help="a Hugging Face checkpoint directory")
    p.add_argument("--tokenizer", default=None, help="with --hf: tokenizer.json path (default: beside the weights, else bytes)")
    p.add_argument("--prompt", default="def ")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top_k", type=int, default=0, help="0: off")
    p.add_argument("--top_p", type=float, default=1.0, help="1: off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default="dense", choices=KINDS, help="KV cache layout")
    args = p.parse_args(argv)
    if args.num_samples < 1:
        p.error(f"--num_samples={args.num_samples} must be >= 1")

    if args.workdir:
        model, _, tokenizer = load_workdir(args.workdir)
    else:
        model, _, tokenizer = load_hf(args.hf, args.tokenizer)
    texts = generate_text(model, tokenizer, args.prompt, num_samples=args.num_samples,
                          max_new_tokens=args.max_new_tokens, cache_kind=args.cache, seed=args.seed,
                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    for i, text in enumerate(texts):
        if len(texts) > 1:
            print(f"--- sample {i} ---")
        print(text)
    return texts


if __name__ == "__main__":
    main()
