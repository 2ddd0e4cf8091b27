"""The GRPO trainer: update-step invariances, the non-finite guard, learning, exact resume after SIGKILL, the paper
configs through main, export, and user errors."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import fake_gcs
import pytest
from config_files import ROOT, load_config

from bcr_jax import checkpoint, models, rl, sharding, train

# ------------------------------------------------------------------------------------------------ the update step

CFG = models.get_preset("tiny-qwen2")  # q/k/v biases and an untied lm_head: every param kind gets a gradient
ROWS, SEQ = 8, 24


def _batch(seed, micro_batches, *, loss_config, nan=False):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, CFG.vocab_size, (ROWS, SEQ)).astype(np.int32)
    lengths = rng.integers(SEQ // 2, SEQ + 1, ROWS)
    input_mask = np.arange(SEQ)[None, :] < lengths[:, None]
    response_mask = input_mask & (np.arange(SEQ)[None, :] >= 6)
    weights = np.asarray(rl.loss_weights(loss_config, jnp.asarray(response_mask)))
    advantages = np.where(response_mask, rng.normal(0, 1, (ROWS, 1)), 0).astype(np.float32)
    if nan:
        advantages[0, 7] = np.nan
    old_logprobs = np.where(response_mask, rng.normal(-np.log(CFG.vocab_size), 0.2, (ROWS, SEQ)), 0)
    arrays = (tokens, input_mask, weights.astype(np.float32), advantages, old_logprobs.astype(np.float32),
              np.zeros((ROWS, SEQ), np.float32))
    return train.UpdateBatch(*(a.reshape(micro_batches, ROWS // micro_batches, SEQ) for a in arrays))


def _one_update(mesh, micro_batches, *, aggregation="seq-mean-token-mean", nan=False, optimizer=None):
    loss_config = rl.LossConfig(aggregation=aggregation, budget=SEQ)
    # Plain SGD with lr 1 by default: the param change is then the gradient itself (Adam's first step, g / |g|,
    # would turn f32 rounding in near-zero gradients into lr-sized differences).
    optimizer = optimizer or optax.sgd(1.0)
    params = sharding.shard_params(models.init_params(CFG, jax.random.key(0), std=0.2), mesh)
    shardings = train.state_shardings(optimizer, models.param_shapes(CFG), mesh)
    state = train.init_state(optimizer, params, 0, mesh)
    before = jax.device_get(state)
    step = train.jit_update_step(train.make_update_step(CFG, optimizer, loss_config), shardings, mesh,
                                 ROWS // micro_batches)
    state, metrics = step(state, _batch(0, micro_batches, loss_config=loss_config, nan=nan))
    return before, jax.device_get(state), jax.device_get(metrics)


def _max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _relative_update_diff(before, a, b):
    """max |(a - before) - (b - before)| / max |a - before| over all params: the two gradients compared (SGD, lr 1)."""
    delta = lambda x: jax.tree.map(lambda new, old: np.asarray(new, np.float64) - old, x, before)
    return _max_diff(delta(a), delta(b)) / _max_diff(delta(a), jax.tree.map(np.zeros_like, before))


@pytest.mark.parametrize("aggregation", sorted(rl.AGGREGATIONS))
def test_micro_batched_update_equals_full_batch(aggregation):
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    before, full, full_metrics = _one_update(mesh, 1, aggregation=aggregation)
    _, micro, micro_metrics = _one_update(mesh, 4, aggregation=aggregation)
    assert _max_diff(before.params, full.params) > 1e-3  # the update moved the params
    np.testing.assert_allclose(micro_metrics["optim/loss"], full_metrics["optim/loss"], rtol=1e-5)
    np.testing.assert_allclose(micro_metrics["optim/grad_norm"], full_metrics["optim/grad_norm"], rtol=1e-5)
    assert _relative_update_diff(before.params, full.params, micro.params) < 1e-5


def test_sharded_update_on_8_devices_equals_single_device():
    assert jax.device_count() == 8
    adamw = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.1))
    single_mesh, mesh = sharding.make_mesh(devices=jax.devices()[:1]), sharding.make_mesh(data=1, fsdp=4, tensor=2)
    before, single, single_metrics = _one_update(single_mesh, 2)
    _, sharded, sharded_metrics = _one_update(mesh, 2)
    np.testing.assert_allclose(sharded_metrics["optim/loss"], single_metrics["optim/loss"], rtol=1e-5)
    assert _relative_update_diff(before.params, single.params, sharded.params) < 1e-5
    # With AdamW (moments sharded like the params) as well.
    _, single, _ = _one_update(single_mesh, 2, optimizer=adamw)
    _, sharded, _ = _one_update(mesh, 2, optimizer=adamw)
    assert _max_diff(single.params, sharded.params) < 2e-3  # Adam's first step is lr * sign(g) where g ~ rounding
    # The state really is sharded: a kernel split over fsdp x tensor.
    spec = sharding.param_partition_specs(models.param_shapes(CFG), mesh)["layers"]["mlp"]["up_proj"]["kernel"]
    assert spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")


def test_non_finite_loss_skips_the_update_and_counts_it():
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    adamw = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.1))
    before, after, metrics = _one_update(mesh, 2, nan=True, optimizer=adamw)
    assert metrics["optim/finite"] == 0
    assert int(after.skipped_updates) == 1 and int(after.step) == 1
    assert _max_diff(before.params, after.params) == 0
    assert _max_diff(before.opt_state, after.opt_state) == 0


# ------------------------------------------------------------------------------------------------ dynamic sampling

def test_dynamic_sampling_picks_informative_groups_in_order_then_fillers():
    tied = [np.array([True, False, True, True]), np.array([False, True, False, True])]
    picks, kept = train.dynamic_sampling_picks(tied, 4)
    assert picks == [(0, 1), (1, 0), (1, 2), (0, 0)] and kept == 3  # 3 informative, then the first tied group
    picks, kept = train.dynamic_sampling_picks(tied + [np.array([False, False, True, False])], 4)
    assert picks == [(0, 1), (1, 0), (1, 2), (2, 0)] and kept == 4  # cut to P, as verl's batch[:traj_bsz]


def test_zero_advantage_groups_with_bcr_groups_of_three_problems():
    # G = 2 samples of 3 prompts with N = 3 problems each. Prompt 0: both samples get 2 of 3 right, different ones;
    # prompt 1: identical verdicts; prompt 2: different accuracy.
    correct = np.array([[1, 1, 0], [0, 1, 1], [1, 0, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0]], np.float32)
    sequence = correct.mean(axis=1)
    assert train.zero_advantage_groups(sequence, 2).tolist() == [True, True, False]  # sequence credit
    # Segment credit: prompt 0's problems carry per-problem advantages, so it is not tied.
    assert train.zero_advantage_groups(sequence, 2, correct).tolist() == [False, True, False]
    advantages = rl.compute_advantages(rl.RewardConfig(credit="segment"), 2, jnp.asarray(correct > 0),
                                       jnp.asarray(correct > 0), jnp.ones((6, 3), bool), jnp.ones((6, 3), bool),
                                       jnp.asarray(np.tile([1, 2, 3], (6, 1)), jnp.int32))
    assert np.any(np.asarray(advantages.token_advantages)[:2] != 0)  # what dropping prompt 0 would lose


def _sampled(width, rows, seed, segment=True):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, width - 3, rows)
    response_mask = (np.arange(width) >= 3) & (np.arange(width) < 3 + lengths[:, None])
    roll = train.Rollout(tokens=rng.integers(1, 50, (rows, width)).astype(np.int32),
                         input_mask=np.arange(width) < 3 + lengths[:, None], response_mask=response_mask,
                         sampler_logprobs=rng.normal(size=(rows, width)).astype(np.float32),
                         response_lengths=lengths.astype(np.int32), truncated=rng.random(rows) < 0.5,
                         responses=["x"] * rows, answers=[["1"]] * rows, golds=[["1"]] * rows,
                         segment_ids=rng.integers(0, 2, (rows, width)).astype(np.int32) if segment else None,
                         answered=rng.random((rows, 1)) < 0.5, text_counts=None, own_rows=slice(0, rows))
    return train.Sampled(roll, rng.random((rows, 1)) < 0.5, rng.normal(size=(rows, width)).astype(np.float32),
                         np.zeros((rows, width), np.float32), {"grading/equal": float(seed + 1)})


def test_take_groups_copies_the_picked_rows_and_pads_narrower_rounds():
    G = 2
    rounds = [_sampled(8, 6, 0), _sampled(12, 6, 1)]
    out = train.take_groups(rounds, [(1, 2), (0, 0), (0, 2)], G, pad_id=0)
    assert out.rollout.tokens.shape == (6, 12) and out.grading_counters == {"grading/equal": 3.0}
    for i, (r, g) in enumerate([(1, 2), (0, 0), (0, 2)]):
        src, dst = slice(g * G, (g + 1) * G), slice(i * G, (i + 1) * G)
        w = rounds[r].rollout.tokens.shape[1]
        np.testing.assert_array_equal(out.rollout.tokens[dst, :w], rounds[r].rollout.tokens[src])
        np.testing.assert_array_equal(out.old_logprobs[dst, :w], rounds[r].old_logprobs[src])
        np.testing.assert_array_equal(out.rollout.segment_ids[dst, :w], rounds[r].rollout.segment_ids[src])
        np.testing.assert_array_equal(out.correct[dst], rounds[r].correct[src])
        np.testing.assert_array_equal(out.rollout.truncated[dst], rounds[r].rollout.truncated[src])
        assert not out.rollout.input_mask[dst, w:].any() and not out.rollout.response_mask[dst, w:].any()
        assert np.all(out.rollout.tokens[dst, w:] == 0) and np.all(out.old_logprobs[dst, w:] == 0)
    assert train.take_groups(rounds[:1], [(0, 0), (0, 1), (0, 2)], G, 0) is rounds[0]  # no dynamic sampling


# ------------------------------------------------------------------------------------------------ whole runs

def _tiny(workdir, **overrides):
    config = load_config("tiny")
    config.workdir = str(workdir)
    for key, value in overrides.items():
        section, _, field = key.rpartition(".")
        (config[section] if section else config)[field] = value
    return config


def _mean(rows, key, steps):
    return float(np.mean([r[key] for r in rows if r["step"] in steps]))


def test_tiny_config_learns(tmp_path):
    """Mean reward rises clearly over the tiny run (confirmed once: with the advantage sign flipped it falls to 0)."""
    config = _tiny(tmp_path, total_steps=60, checkpoint_every=60)
    train.run_train(config)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 61))
    first, last = _mean(rows, "reward/mean", range(1, 11)), _mean(rows, "reward/mean", range(51, 61))
    assert last > 2 * first + 0.05, (first, last)
    assert (tmp_path / "tensorboard").is_dir() and any((tmp_path / "tensorboard").iterdir())
    for key in ("accuracy/position_1", "tokens/per_problem", "rollout/truncation_rate", "policy/entropy",
                "policy/clip_fraction", "optim/grad_norm", "optim/learning_rate", "rollout/logprob_gap",
                "optim/skipped_updates", "throughput/rollout_tokens_per_s", "throughput/update_tokens_per_s",
                "time/rollout_s", "time/grading_wait_s", "time/logprobs_s", "time/update_s"):
        assert key in rows[-1], key
    # The sampler and the trainer score the same tokens under the same params (f32, temperature 1).
    assert max(r["rollout/logprob_gap"] for r in rows) < 1e-4


def _checkpoint_meta(workdir, step):
    return json.loads((workdir / "checkpoints" / str(step) / "meta" / "metadata").read_text())


def test_dynamic_sampling_on_tiny_learns_and_no_tied_group_reaches_the_update(tmp_path):
    """DAPO's dynamic sampling on the tiny run: no loss token comes from a tied group, the steps train on 16 groups
    with a learning signal for as long as 21 rounds find them, and the policy's accuracy over everything it sampled
    (every round: unbiased) rises as in test_tiny_config_learns.

    The tiny policy's entropy collapses within 60 steps (with or without the filter: the plain run ends with ~90% of
    its groups tied), each prompt then always right or always wrong; after ~43 steps the rounds run out and tied
    fillers, outside the loss, complete the step (verl raises there)."""
    config = _tiny(tmp_path, total_steps=60, checkpoint_every=60, **{"rollout.dynamic_sampling": True,
                                                                     "rollout.max_resample_rounds": 20})
    train.run_train(config)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 61))
    assert all(r["policy/tied_loss_token_fraction"] == 0 for r in rows)
    full = [r for r in rows if r["rollout/kept_groups"] == 16]
    assert all(r["rollout/tied_group_fraction"] == 0 for r in full)
    assert [r["step"] for r in full[:35]] == list(range(1, 36))  # (in the recorded run: the first 43 steps)
    for r in rows:
        if r["rollout/kept_groups"] < 16:  # the rounds ran out: the rest of the step is tied fillers
            assert r["rollout/resample_rounds"] == 20
            assert r["rollout/tied_group_fraction"] == 1 - r["rollout/kept_groups"] / 16
    rounds = [r["rollout/resample_rounds"] for r in rows]
    assert min(rounds[:10]) >= 1  # the filter did work (a random policy ties ~2 of 3 groups at 0 reward)
    assert [r["rollout/prompts_consumed"] for r in rows] == [16 * (1 + k) for k in rounds]
    # The data iterator's checkpointed position counts every group any round consumed (512 problems = 512 groups).
    data_state = _checkpoint_meta(tmp_path, 60)["data"]
    assert data_state["epoch"] * 512 + data_state["position"] == sum(r["rollout/prompts_consumed"] for r in rows)
    first, last = _mean(rows, "accuracy/sampled", range(1, 11)), _mean(rows, "accuracy/sampled", range(51, 61))
    assert last > 2 * first + 0.05, (first, last)


def test_every_trainer_option_runs(tmp_path):
    """KL to a reference, segment credit, masking, μ > 1, mini/micro batches, bf16 compute and rollout, remat, the
    DAPO knobs (dual clip, overlong shaping, dynamic sampling)."""
    config = _tiny(tmp_path, total_steps=2, **{
        "loss.kl_weight": 0.05, "loss.mask_truncated": True, "loss.drop_tied_groups": True,
        "loss.aggregation": "seq-mean-token-sum-norm", "reward.credit": "segment", "reward.estimator": "dr_grpo",
        "reward.length_penalty": 0.1, "train.epochs_per_rollout": 2, "train.mini_batch_size": 64,
        "train.micro_batch_size": 16, "train.compute_dtype": "bfloat16", "train.remat": "full",
        "rollout.dtype": "bfloat16", "optim.schedule": "cosine", "optim.warmup_steps": 2,
        "loss.clip_ratio_c": 3.0, "reward.overlong_buffer": 1, "rollout.dynamic_sampling": True})
    train.run_train(config)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(np.isfinite(v) for row in rows for v in row.values())
    assert "policy/kl" in rows[0] and rows[0]["optim/skipped_updates"] == 0
    assert "policy/dual_clip_fraction" in rows[0] and rows[0]["reward/overlong_penalty"] < 0
    # 4 updates per step (2 epochs x 2 mini-batches): warm-up 0, lr/2, then cosine decay from the peak.
    peak = config.optim.learning_rate
    assert rows[0]["optim/learning_rate"] < peak and rows[1]["optim/learning_rate"] < peak


def _run_main(*args, gcs=None, **kwargs):
    """`python -m bcr_jax.main ARGS`; with `gcs` (a fake_gcs root) the process serves gs:// from it."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "-m", "bcr_jax.main"]
    if gcs is not None:
        env[fake_gcs.ROOT_ENV], command = str(gcs), fake_gcs.command()
    return subprocess.Popen([*command, *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _final_params(workdir):
    _, params, _, step = checkpoint.load_run(workdir)
    return step, jax.device_get(params)


@pytest.mark.parametrize("storage, dynamic_sampling", [("local", False), ("local", True), ("gs", False)],
                         ids=["local", "local-dynamic_sampling", "gs"])
def test_sigkilled_run_resumes_bit_identical(storage, dynamic_sampling, tmp_path):
    """Killed after its second checkpoint and resumed, in a local directory or a (fake) gs:// bucket, with or without
    dynamic sampling: the same params, bit for bit, and the same metrics as a straight local run."""
    common = ["--config", "configs/tiny.py", "--config.total_steps=6", "--config.checkpoint_every=2",
              "--config.rollout.prompts_per_step=4", f"--config.rollout.dynamic_sampling={dynamic_sampling}"]
    gcs = tmp_path / "gcs" if storage == "gs" else None
    with fake_gcs.serve(gcs) if gcs else contextlib.nullcontext():
        killed_dir = "gs://bucket/killed" if gcs else str(tmp_path / "killed")
        stored = fake_gcs.local_path(killed_dir) if gcs else pathlib.Path(killed_dir)
        # Orbax finishes a step by a rename on a local disk and by a commit file on GCS.
        finished = stored / "checkpoints" / "4" / ("commit_success.txt" if gcs else "")
        straight = _run_main(*common, f"--config.workdir={tmp_path / 'straight'}")
        victim = _run_main(*common, f"--config.workdir={killed_dir}", gcs=gcs)
        try:
            deadline = time.monotonic() + 240
            while not finished.exists():
                assert victim.poll() is None, victim.communicate()
                assert time.monotonic() < deadline, "no second checkpoint within 240 s"
                time.sleep(0.05)
            victim.send_signal(signal.SIGKILL)
            victim.wait(30)
            assert victim.returncode == -signal.SIGKILL
            resumed = _run_main(*common, f"--config.workdir={killed_dir}", gcs=gcs)
            out, err = resumed.communicate(timeout=300)
            assert resumed.returncode == 0, err[-2000:]
            assert "resumed from" in out
            out, err = straight.communicate(timeout=300)
            assert straight.returncode == 0, err[-2000:]
        finally:
            for process in (straight, victim):
                if process.poll() is None:
                    process.kill()
        step_a, params_a = _final_params(tmp_path / "straight")
        step_b, params_b = _final_params(killed_dir)
    assert step_a == step_b == 6
    for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
        np.testing.assert_array_equal(a, b)  # bit-identical
    metrics_a = (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
    metrics_b = (stored / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["reward/mean"] for r in metrics_a] == [json.loads(r)["reward/mean"] for r in metrics_b]
    assert [json.loads(r)["step"] for r in metrics_b] == list(range(1, 7))
    assert _checkpoint_meta(tmp_path / "straight", 6) == _checkpoint_meta(stored, 6)  # the data position too
    if dynamic_sampling:  # the resumed steps resampled too, and drew the same groups
        rounds = [json.loads(r)["rollout/resample_rounds"] for r in metrics_a]
        assert sum(rounds) > 0 and rounds == [json.loads(r)["rollout/resample_rounds"] for r in metrics_b]


# ------------------------------------------------------------------------------------------------ paper configs

PAPER_CONFIGS = ("justrl_1p5b_grpo", "justrl_1p5b_bcr", "justrl_1p5b_length_penalty", "justrl_1p5b_bcr_dapo",
                 "qwen3_4b_grpo", "qwen3_4b_bcr", "qwen3_4b_length_penalty")


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory, r1_tokenizer_dir, qwen3_tokenizer_dir):
    """Tiny random Qwen2 (R1-Distill tokenizer) and Qwen3 (Qwen3-Thinking tokenizer) HF directories."""
    import shutil

    dirs = {}
    for family, tokenizer_dir in (("qwen2", r1_tokenizer_dir), ("qwen3", qwen3_tokenizer_dir)):
        cfg = models.get_preset(f"tiny-{family}").replace(vocab_size=272)  # the tiny tokenizers have 264 ids
        out = tmp_path_factory.mktemp(f"tiny_{family}")
        models.save_hf(cfg, models.init_params(cfg, jax.random.key(1)), out)
        for file in tokenizer_dir.iterdir():
            shutil.copy2(file, out / file.name)
        dirs[family] = out
    return dirs


@pytest.fixture(scope="module")
def deepmath_file(tmp_path_factory):
    rows = [{"question": f"What is {a} + {b}?", "final_answer": str(a + b), "difficulty": float(a % 5)}
            for a in range(6) for b in range(3)]
    path = tmp_path_factory.mktemp("deepmath") / "deepmath.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_config_runs_one_step_through_main(name, tiny_checkpoints, deepmath_file, tmp_path):
    config = load_config(name)
    assert config.data.source == "deepmath-103k" and config.loss.clip_high == 0.28
    assert config.rollout.budget == (5120 if name.startswith("justrl") else 8000)
    family = "qwen2" if name.startswith("justrl") else "qwen3"
    # The DAPO config's overlong buffer (1,024 tokens) must fit the test's 24-token budget; 2 resampling rounds.
    dapo = ["--config.reward.overlong_buffer=6", "--config.rollout.max_resample_rounds=2"] if name.endswith("dapo") else []
    process = _run_main(
        "--config", f"configs/{name}.py", f"--config.model.hf_path={tiny_checkpoints[family]}",
        f"--config.data.path={deepmath_file}", f"--config.workdir={tmp_path}", "--config.total_steps=1",
        "--config.rollout.budget=24", "--config.rollout.prompts_per_step=2", "--config.rollout.samples_per_prompt=2",
        "--config.train.mini_batch_size=2", "--config.train.micro_batch_size=1", "--config.grading.num_workers=1",
        *dapo)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    assert "step 1/1" in out
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    n = config.data.problems_per_prompt
    assert [k for k in row if k.startswith("accuracy/position_")] == [f"accuracy/position_{k}" for k in
                                                                       range(1, n + 1)]
    assert (tmp_path / "checkpoints" / "1").is_dir()
    if name.endswith("dapo"):  # BCR (N=3) with every DAPO knob on
        assert n == 3 and config.rollout.dynamic_sampling and config.loss.clip_ratio_c == 3.0
        assert config.reward.overlong_buffer == 1024 and config.loss.aggregation == "token-mean"
        assert row["rollout/prompts_consumed"] == 2 * (1 + row["rollout/resample_rounds"])
        assert {"rollout/kept_groups", "reward/overlong_penalty", "policy/dual_clip_fraction"} <= set(row)


def test_export_writes_an_hf_directory_that_transformers_loads(tiny_checkpoints, deepmath_file, tmp_path):
    import torch
    import transformers

    config = load_config("justrl_1p5b_bcr")
    config.model.hf_path = str(tiny_checkpoints["qwen2"])
    config.data.path = str(deepmath_file)
    config.workdir = str(tmp_path)
    config.total_steps = 1
    config.rollout.budget, config.rollout.prompts_per_step, config.rollout.samples_per_prompt = 16, 2, 2
    config.train.mini_batch_size = config.train.micro_batch_size = 4
    config.train.compute_dtype, config.train.remat, config.rollout.dtype = "float32", "none", ""
    config.optim.learning_rate, config.optim.warmup_steps = 1e-2, 0
    config.grading.num_workers = 1
    state = train.run_train(config)
    config.mode = "export"
    out = train.run_export(config)
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokens = np.array([[5, 17, 42, 99, 260, 3]])
    with torch.no_grad():
        theirs = model(torch.as_tensor(tokens)).logits.numpy()
    ours = np.asarray(models.forward_logits(models.read_hf_config(out), jax.device_get(state.params), tokens))
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    original = models.forward_logits(*models.load_hf(tiny_checkpoints["qwen2"]), tokens)
    assert np.abs(np.asarray(original) - ours).max() > 1e-4  # the exported weights are the trained ones
    assert (out / "tokenizer.json").is_file()


# ------------------------------------------------------------------------------------------------ user errors

@pytest.mark.parametrize("override, message", [
    ("--config.no_such_key=1", "unknown config key 'no_such_key'"),
    ("--config.total_steps=many", "--config.total_steps=many"),
    ("--config.data.source=synthetic:nope", "config.data.source"),
    ("--config.loss.aggregation=tok-mean", "config.loss.aggregation"),
    ("--config.train.micro_batch_size=3", "config.train.micro_batch_size"),
    ("--config.loss.clip_ratio_c=0.5", "config.loss.clip_ratio_c"),
    ("--config.reward.overlong_buffer=3", "config.reward.overlong_buffer"),
    ("--config.rollout.max_resample_rounds=-1", "config.rollout.max_resample_rounds"),
    ("--config.model.hf_path=/no/such/checkpoint", "config.model.hf_path: /no/such/checkpoint"),
])
def test_user_errors_are_one_line_naming_the_key(override, message, tmp_path):
    process = _run_main("--config", "configs/tiny.py", f"--config.workdir={tmp_path / 'run'}", override)
    out, err = process.communicate(timeout=120)
    assert process.returncode != 0
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], err[-2000:]
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()  # nothing written


def test_missing_data_file_is_named(tmp_path):
    process = _run_main("--config", "configs/justrl_1p5b_bcr.py", f"--config.workdir={tmp_path / 'run'}",
                        "--config.model.preset=tiny-qwen2", "--config.data.path=/no/such/deepmath.parquet")
    _, err = process.communicate(timeout=120)
    assert process.returncode != 0 and "config.data.path: /no/such/deepmath.parquet does not exist" in err
    assert "Traceback" not in err
