"""Decode throughput against the HBM roofline, for an accelerator host.

    python benchmarks/sampling_gpu.py                  # the issue's case: 1.5B preset, bf16, B=256, 1k + 3k tokens
    python benchmarks/sampling_gpu.py --smoke          # tiny sizes, runs anywhere (CPU included) in seconds

Method. Decode is memory-bound: every step reads all weights once plus the KV cache of every row. The roofline
time of a step is (weight bytes + KV bytes that must be read) / copy bandwidth, where the copy bandwidth is measured
here with a large on-device copy (bytes read + bytes written over the median time) and the KV bytes are those of the
filled slots only (the prompt bucket plus the tokens decoded so far). Decode time is the timed `generate` call minus
a separately timed prefill of the same batch; decode tokens/s = B x (N - 1) / decode time. The roofline fraction is
the summed per-step roofline times over the measured decode time. The sampler grows its cache in `--decode-blocks`
blocks, so it attends over somewhat more slots than are filled; the printed line gives both counts.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from bcr_jax import models, sampling


def copy_bandwidth(num_bytes: int = 2 << 30, repeats: int = 10) -> float:
    """Bytes moved per second (read + write) by a large on-device copy."""
    x = jnp.ones((num_bytes // 4,), jnp.float32)
    copy = jax.jit(lambda a: a + 1.0)
    copy(x).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        copy(x).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * x.nbytes / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="deepseek-r1-distill-qwen-1.5b")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=3072)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--decode-blocks", type=int, default=4, help="generate's decode_blocks (default 4)")
    parser.add_argument("--smoke", action="store_true", help="bench-qwen3, B=8, 32 + 32 tokens")
    args = parser.parse_args()
    if args.smoke:
        args.preset, args.batch, args.prompt_len, args.new_tokens = "bench-qwen3", 8, 32, 32

    cfg = models.get_preset(args.preset, dtype=args.dtype)
    params = models.init_params(cfg, jax.random.key(0))
    prompts = np.random.RandomState(0).randint(0, cfg.vocab_size, (args.batch, args.prompt_len)).tolist()
    run = lambda n: sampling.generate(cfg, params, prompts, max_new_tokens=n, eos_ids=(), pad_id=0,
                                      decode_blocks=args.decode_blocks)

    run(args.new_tokens), run(1)  # compile both shapes
    total = min(_timed(lambda: run(args.new_tokens)) for _ in range(2))
    prefill = min(_timed(lambda: run(1)) for _ in range(3))
    decode = total - prefill
    steps = args.new_tokens - 1

    itemsize = jnp.dtype(cfg.jnp_dtype).itemsize
    weight_bytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(params))
    kv_bytes_per_slot = 2 * cfg.num_layers * args.batch * cfg.num_kv_heads * cfg.head_dim * itemsize
    prompt_slots = sampling.bucket(args.prompt_len, minimum=16)
    # Decode step i (1-based) feeds token i into slot prompt_slots + i - 1: it must read that many + 1 filled slots,
    # and attends over the prompt block plus every decode block allocated so far.
    filled_slots = sum(prompt_slots + i for i in range(1, steps + 1))
    block_ends = np.cumsum(sampling.decode_blocks_for(args.new_tokens, args.decode_blocks))
    attended_slots = sum(prompt_slots + int(block_ends[np.searchsorted(block_ends, i)]) for i in range(1, steps + 1))
    bandwidth = copy_bandwidth(256 << 20 if args.smoke else 2 << 30)
    roofline_seconds = (steps * weight_bytes + filled_slots * kv_bytes_per_slot) / bandwidth

    device = jax.devices()[0]
    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {device.device_kind} "
          f"({device.platform}), jax {jax.__version__}")
    print(f"{args.preset} {args.dtype}, B={args.batch}, prompt {args.prompt_len} + {args.new_tokens} new tokens")
    print(f"copy bandwidth {bandwidth / 1e9:,.0f} GB/s; per step: weights {weight_bytes / 1e9:.2f} GB + KV "
          f"{filled_slots / steps * kv_bytes_per_slot / 1e9:.2f} GB on average (filled slots; "
          f"{attended_slots / steps * kv_bytes_per_slot / 1e9:.2f} GB attended with {args.decode_blocks} decode blocks)")
    print(f"prefill {prefill:.2f} s, decode {decode:.2f} s = {args.batch * steps / decode:,.0f} decode tokens/s, "
          f"{roofline_seconds / decode:.1%} of the HBM roofline")


def _timed(fn) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn().token_array)
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
