"""How fast can one greedy decode step be on this machine? Our step against its own parts, and against transformers.

    python benchmarks/decode_floor.py [--batch 32] [--prompt-len 32] [--new-tokens 128] [--repeats 5]

The sampler benchmark (`benchmarks/sampling.py`) times whole `generate` calls. This one splits a decode step of the
bench-qwen3 config (random fp32 weights) into what it cannot avoid, each part jitted as a `fori_loop` over N - 1
steps on the same shapes as our decode. Every timed call is compiled and warmed up first; then --repeats passes
run each of them once, in turn, the order rotating from pass to pass, so drift of the machine hits all alike:

* gemms: the step's matmuls and nothing else — q/k/v/o, gate/up/down for every layer and the lm_head on a
  [B, d] activation, chained through a residual add so XLA can neither skip nor batch steps. No attention, norms,
  RoPE, cache writes or sampling. This is the floor of any XLA:CPU decode step of this model at this batch.
* attention: `layers.attend` for every layer over a cache of P + N slots, one query per row.
* ours: `generate`'s decode loop per step: (time of N new tokens - time of 1 new token) / (N - 1).
* transformers: `generate` per step, the same way (greedy, EOS off, same weights and prompts).

It prints ms per step (median over passes, and the spread: fastest-slowest pass) and the tokens/s each would give,
and what a target multiple of transformers would need. XLA:CPU runs with the project's threading
(`bcr_jax.cpu_threading`) unless XLA_FLAGS names the flag.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import torch

from bcr_jax import cpu_threading
from bcr_jax.models import get_preset, init_params, layers, save_hf
from bcr_jax.sampling import bucket, generate


def interleaved_seconds(calls: dict, passes: int) -> dict[str, list[float]]:
    """Warms up every call, then `passes` rounds of one timed call each, the order rotating; seconds per pass."""
    for fn in calls.values():
        fn()  # compile / warm up
    names = list(calls)
    times = {name: [] for name in names}
    for p in range(passes):
        for name in names[p % len(names):] + names[:p % len(names)]:
            start = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - start)
    return times


def gemm_loop(cfg, params, steps: int):
    """The decode step's matmuls only, on the real weights (as 2-D matrices, passed as arguments like ours)."""
    d = cfg.hidden_size
    weights = [{
        "q": p["attn"]["q_proj"]["kernel"].reshape(d, -1), "k": p["attn"]["k_proj"]["kernel"].reshape(d, -1),
        "v": p["attn"]["v_proj"]["kernel"].reshape(d, -1), "o": p["attn"]["o_proj"]["kernel"].reshape(-1, d),
        "gate": p["mlp"]["gate_proj"]["kernel"], "up": p["mlp"]["up_proj"]["kernel"],
        "down": p["mlp"]["down_proj"]["kernel"],
    } for p in (jax.tree.map(lambda a, i=i: a[i], params["layers"]) for i in range(cfg.num_layers))]
    weights = {"layers": weights, "embedding": params["embed"]["embedding"]}

    def step(weights, x_bd):
        for w in weights["layers"]:
            q, k, v = x_bd @ w["q"], x_bd @ w["k"], x_bd @ w["v"]
            # stand-in for attention: keeps k and v live at the cost of two [B] reductions
            x_bd = x_bd + q @ w["o"] + 1e-3 * (k.sum(-1, keepdims=True) + v.sum(-1, keepdims=True))
            x_bd = x_bd + ((x_bd @ w["gate"]) * (x_bd @ w["up"])) @ w["down"]
        logits = jnp.einsum("bd,vd->bv", x_bd, weights["embedding"])
        return x_bd * 0.5 + logits[:, :d] * 1e-3

    run = jax.jit(lambda weights, x: jax.lax.fori_loop(0, steps, lambda _, x: step(weights, x), x))
    return lambda x: run(weights, x)


def attention_loop(cfg, batch: int, slots: int, steps: int):
    key = jax.random.key(1)
    caches = [(jax.random.normal(key, (batch, cfg.num_kv_heads, cfg.head_dim, slots)),
               jax.random.normal(key, (batch, cfg.num_kv_heads, slots, cfg.head_dim))) for _ in range(cfg.num_layers)]
    mask = jnp.ones((batch, 1, slots), bool)

    def step(caches, q_btnh):
        for k, v in caches:
            q_btnh = q_btnh + 0.1 * layers.attend(q_btnh, (k,), (v,), mask)
        return q_btnh

    run = jax.jit(lambda caches, q: jax.lax.fori_loop(0, steps, lambda _, q: step(caches, q), q))
    return lambda q: run(caches, q)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timing passes (default 5)")
    parser.add_argument("--target", type=float, default=3.0, help="multiple of transformers to compare against")
    args = parser.parse_args()
    threading_added = cpu_threading.configure()  # before JAX's backend starts
    warnings.filterwarnings("ignore", message=".*generation flags are not valid.*")
    cfg = get_preset("bench-qwen3")
    params = init_params(cfg, jax.random.key(0), std=0.1)
    b, p, n = args.batch, args.prompt_len, args.new_tokens
    steps = n - 1
    prompts = np.random.default_rng(0).integers(1, cfg.vocab_size, (b, p))

    x = jax.random.normal(jax.random.key(2), (b, cfg.hidden_size))
    gemm_run = gemm_loop(cfg, params, steps)
    q = jax.random.normal(jax.random.key(3), (b, 1, cfg.num_heads, cfg.head_dim))
    slots = bucket(p, minimum=16) + n
    attention_run = attention_loop(cfg, b, slots, steps)

    def ours(tokens: int):
        return lambda: generate(cfg, params, prompts.tolist(), max_new_tokens=tokens, eos_ids=()).token_array

    with tempfile.TemporaryDirectory() as scratch:
        save_hf(cfg, params, scratch)
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(scratch, dtype=torch.float32).eval()
    input_ids = torch.tensor(prompts)

    def hf(tokens: int):
        def run():
            with torch.no_grad():
                return model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=tokens,
                                      min_new_tokens=tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
        return run

    t = interleaved_seconds({
        "gemms": lambda: gemm_run(x).block_until_ready(), "attention": lambda: attention_run(q).block_until_ready(),
        "ours_n": ours(n), "ours_1": ours(1), "hf_n": hf(n), "hf_1": hf(1)}, args.repeats)
    per_step = {  # seconds per decode step, pass by pass (a decode step = a whole call of N tokens less one of 1)
        "gemms": [s / steps for s in t["gemms"]], "attention": [s / steps for s in t["attention"]],
        "ours": [(a - c) / steps for a, c in zip(t["ours_n"], t["ours_1"])],
        "hf": [(a - c) / steps for a, c in zip(t["hf_n"], t["hf_1"])]}
    per_step["gemms + attention"] = [a + c for a, c in zip(per_step["gemms"], per_step["attention"])]
    gemms, attention = statistics.median(per_step["gemms"]), statistics.median(per_step["attention"])
    hf_step = statistics.median(per_step["hf"])

    print(f"{cpu_threading.describe(threading_added)}")
    print(f"bench-qwen3 fp32, B={b}, prompt {p} + {n} new tokens; ms per decode step (median of {args.repeats} "
          f"interleaved passes, spread min-max), and the decode tokens/s the median gives")
    rows = [("gemms only (floor)", "gemms"), (f"attention only, {slots} slots", "attention"),
            ("gemms + attention", "gemms + attention"), ("ours: generate's decode step", "ours"),
            ("transformers: generate's decode step", "hf")]
    for name, key in rows:
        seconds = statistics.median(per_step[key])
        spread = f"{min(per_step[key]) * 1e3:.2f}-{max(per_step[key]) * 1e3:.2f} ms"
        print(f"  {name:40s} {seconds * 1e3:7.2f} ms ({spread:>17s})  {b / seconds:9,.0f} tok/s  "
              f"{hf_step / seconds:5.2f}x transformers")
    print(f"  {args.target:g}x transformers needs a step of {hf_step / args.target * 1e3:.2f} ms; the gemms alone take "
          f"{gemms * 1e3:.2f} ms, leaving {(hf_step / args.target - gemms) * 1e3:.2f} ms for attention, norms, RoPE, "
          f"cache writes and sampling (attention alone: {attention * 1e3:.2f} ms).")


if __name__ == "__main__":
    main()
