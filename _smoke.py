import time, jax, jax.numpy as jnp, numpy as np
from arch import build_model
from configs.llama3 import get_config
from serving.engine import Engine
t0=time.time()
cfg = get_config("tiny").model
cfg.update(num_layers=2, d_model=64, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128, max_seq_len=48)
model = build_model(cfg)
from flax import nnx
@nnx.jit
def logits_at(model, buf, idx):
    l,_ = model(buf); return l[0, idx]
def ref(prompt, n):
    buf = np.zeros((1,48),np.int32); buf[0,:len(prompt)] = prompt; L=len(prompt)
    out=[]
    for i in range(n):
        t=int(jnp.argmax(logits_at(model, jnp.asarray(buf), L-1))); out.append(t); buf[0,L]=t; L+=1
    return out
rng=np.random.default_rng(0)
prompts=[list(rng.integers(0,256,size=int(rng.integers(2,12)))) for _ in range(6)]
refs=[ref(p,6) for p in prompts]
print("ref done", time.time()-t0)
for kind, kw in [("dense",{}),("paged",dict(page_size=4)),("paged",dict(page_size=4,radix=True)),("paged",dict(page_size=4,num_pages=8,radix=True))]:
    eng=Engine(model,max_slots=3,max_len=32,cache_kind=kind,min_bucket=8,**kw)
    outs=eng.generate(prompts,max_new_tokens=6)
    print(kind, kw, outs==refs, eng.stats, time.time()-t0)
