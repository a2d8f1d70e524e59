"""The specification, as tests: run `python -m pytest -q test_all.py`.

CPU tests exercise the reference path; the kernel tests run where CUDA and mamba-ssm are present
and skip with the reason elsewhere.
"""
import dataclasses
import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import tyro

import bench
import composite
import eval as evaluation
import train as train_module
from composite import CompositeConfig, CompositeMamba
from hybrid import Attention, ModelConfig, MambaLM, Seq2Seq, build_model
from mempool import MemoryRead, Pool
from mqar import (IGNORE, KEY_HI, KEY_LO, SEP, TEST, TRAIN, VAL_HI, VAL_LO, MQARConfig, batch_seed,
                  make_batch)
from polar import PolarizedMamba, running_mean
from ssm import (Mamba1, Mamba2, Residual, causal_conv, kernels, mamba_block, selective_scan_reference,
                 ssd_reference)
from train import TrainConfig, configure_optimizer, train

torch.set_num_threads(2)
SMALL = ModelConfig(d_model=32, d_state=8, encoder_layers=2, decoder_layers=3, hybrid="0,2", head_dim=16,
                    dropout=0.0)
# Two writing layers and a pool smaller than the sequence, so that entries get evicted.
POLAR = dataclasses.replace(SMALL, decoder="polar", mem_pool_size=3, mem_summary_dim=16, mem_update_freq=2)
ROOT = Path(__file__).parent


# ---- reference scans against the recurrence, step by step, in float64

def recurrence(x, dt, A, B, C):
    """h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t, y_t = C_t . h_t, one step at a time.
    x, dt (b, L, c); A (c, N) or (c, 1); B, C (b, L, N) -> y (b, L, c)."""
    h = torch.zeros(x.shape[0], x.shape[2], B.shape[-1], dtype=x.dtype)
    ys = []
    for t in range(x.shape[1]):
        h = torch.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * x[:, t])[..., None] * B[:, t, None, :]
        ys.append((h * C[:, t, None, :]).sum(-1))
    return torch.stack(ys, dim=1)


# One chunk (chunk 0 starts from zero and hands on nothing), exactly two, and several with padding.
@pytest.mark.parametrize("L, chunk", [(1, 64), (37, 64), (130, 64), (16, 8), (37, 8)])
def test_ssd_reference_matches_recurrence(L, chunk):
    g = torch.Generator().manual_seed(L)
    b, H, P, N = 2, 3, 4, 5
    x = torch.randn(b, L, H, P, generator=g, dtype=torch.float64)
    dt = torch.rand(b, L, H, generator=g, dtype=torch.float64)
    A = -torch.rand(H, generator=g, dtype=torch.float64) * 8
    B, C = (torch.randn(b, L, N, generator=g, dtype=torch.float64) for _ in range(2))
    y = ssd_reference(x, dt, A, B, C, chunk)
    # Mamba2 is Mamba1 with one A per head, shared by that head's P channels.
    expected = recurrence(x.flatten(2), dt.repeat_interleave(P, dim=2), A.repeat_interleave(P)[:, None], B, C)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y.flatten(2), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("L", [1, 37, 130])
def test_selective_scan_reference_matches_recurrence(L):
    g = torch.Generator().manual_seed(L)
    b, E, N = 2, 6, 5
    u = torch.randn(b, L, E, generator=g, dtype=torch.float64)
    dt = torch.rand(b, L, E, generator=g, dtype=torch.float64)
    A = -torch.rand(E, N, generator=g, dtype=torch.float64) * 8
    B, C = (torch.randn(b, L, N, generator=g, dtype=torch.float64) for _ in range(2))
    torch.testing.assert_close(selective_scan_reference(u, dt, A, B, C), recurrence(u, dt, A, B, C),
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("L", [1, 3, 8, 37])
def test_causal_conv_is_the_left_padded_depthwise_conv1d(L):
    """ssm.causal_conv's shifted multiply-adds against PyTorch's depthwise Conv1d (the form the
    kernels' causal-conv1d implements), forward and gradients, with L shorter and longer than K."""
    g = torch.Generator().manual_seed(L)
    conv = torch.nn.Conv1d(6, 6, 4, groups=6, padding=3).double()
    x = torch.randn(2, L, 6, generator=g, dtype=torch.float64, requires_grad=True)
    y = causal_conv(x, conv)
    expected = torch.nn.functional.silu(conv(x.transpose(1, 2))[..., :L].transpose(1, 2))
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(y.square().sum(), [x, conv.weight, conv.bias])
    expected_grads = torch.autograd.grad(expected.square().sum(), [x, conv.weight, conv.bias])
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# ---- causality: a change at position t may only move outputs at t and later

def assert_causal(fn, tokens, t):
    """fn maps tokens (B, L) to outputs (B, L, ...); change tokens after t, outputs up to t must stay."""
    changed = tokens.clone()
    changed[:, t + 1:] = torch.randint(KEY_LO, KEY_HI, changed[:, t + 1:].shape)
    before, after = fn(tokens), fn(changed)
    torch.testing.assert_close(before[:, :t + 1], after[:, :t + 1], rtol=0, atol=1e-5)
    assert not torch.allclose(before[:, t + 1:], after[:, t + 1:], atol=1e-4), "the change did not reach later outputs"


@pytest.mark.parametrize("ssm", ["mamba2", "mamba1"])
def test_decoder_mamba_block_is_causal(ssm):
    torch.manual_seed(0)
    block = mamba_block(ssm, 32, 8, "reference", dropout=0.0)
    embed = torch.nn.Embedding(KEY_HI, 32)
    assert_causal(lambda tok: block(embed(tok)), torch.randint(KEY_LO, KEY_HI, (2, 20)), t=9)


def test_polarized_block_is_causal():
    torch.manual_seed(0)
    block = Residual(32, PolarizedMamba("mamba2", 32, 8, "reference"), dropout=0.0)
    embed = torch.nn.Embedding(KEY_HI, 32)
    assert_causal(lambda tok: block(embed(tok)), torch.randint(KEY_LO, KEY_HI, (2, 20)), t=9)


@pytest.mark.parametrize("ssm, cfg", [("mamba2", SMALL), ("mamba1", SMALL), ("mamba2", POLAR)],
                         ids=["hybrid-mamba2", "hybrid-mamba1", "polar"])
def test_hybrid_decoder_is_causal(ssm, cfg):
    torch.manual_seed(0)
    model = Seq2Seq(dataclasses.replace(cfg, ssm=ssm)).eval()
    src = torch.randint(KEY_LO, KEY_HI, (2, 14))
    assert_causal(lambda tgt: model(src, tgt), torch.randint(KEY_LO, KEY_HI, (2, 12)), t=5)


@pytest.mark.parametrize("cfg", [SMALL, POLAR], ids=["mamba", "polar"])
def test_decoder_only_model_is_causal(cfg):
    torch.manual_seed(0)
    model = MambaLM(cfg).eval()
    assert_causal(model, torch.randint(KEY_LO, KEY_HI, (2, 30)), t=17)


def test_the_head_on_the_labelled_positions_scores_as_on_all():
    """Training and evaluation run the head only where labels are (`last=K`): the same logits there,
    so the same loss, as the full (B, L, V) pass; the decoder-only batch labels its last M positions."""
    torch.manual_seed(0)
    cfg = MQARConfig(num_pairs=6, num_queries=4, mode="decoder_only")
    (tokens,), labels = make_batch(cfg, 3, TRAIN, 0, 0)
    model = MambaLM(SMALL).eval()
    assert labels.shape == (3, 4) and tokens.shape == (3, 3 * 6 + 2 + 4)
    torch.testing.assert_close(model(tokens, last=4), model(tokens)[:, -4:])  # to rounding: BLAS blocks by shape
    src, tgt = make_batch(dataclasses.replace(cfg, mode="seq2seq"), 3, TRAIN, 0, 0).inputs
    seq2seq = Seq2Seq(SMALL).eval()
    torch.testing.assert_close(seq2seq(src, tgt, last=2), seq2seq(src, tgt)[:, -2:])


def test_encoder_is_bidirectional():
    torch.manual_seed(0)
    model = Seq2Seq(SMALL).eval()
    src = torch.randint(KEY_LO, KEY_HI, (2, 14))
    later = src.clone()
    later[:, -1] = (later[:, -1] + 1 - KEY_LO) % (KEY_HI - KEY_LO) + KEY_LO
    x, y = model.encoder(model.embed(src)), model.encoder(model.embed(later))
    assert not torch.allclose(x[:, 0], y[:, 0]), "the first encoder output did not hear the last token"


# ---- Polar-Mem-Mamba: the pool's replacement rule, its gradients, the switches

def test_running_mean_is_the_scaled_a1_recurrence():
    u = torch.randn(2, 9, 3, dtype=torch.float64)
    h, expected = torch.zeros(2, 3, dtype=torch.float64), []
    for t in range(9):
        h = h + u[:, t]  # A = 1: nothing decays
        expected.append(h / (t + 1))
    torch.testing.assert_close(running_mean(u), torch.stack(expected, 1))


def test_pool_keeps_the_highest_priorities_written_at_or_before_each_position():
    # Entries from two writing layers at positions 0..3: priorities chosen so eviction depends on t.
    priority = torch.tensor([[5., 1., 3., 0., 2., 4., -1., 6.]])
    pos = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    pool = Pool(torch.randn(1, 8, 4), priority, pos)
    pool = pool._replace(bias=pool.read_bias(4, pool_size=3))  # what MemoryWrite stores for the reads
    kept = pool.bias.isfinite()[0]  # (L, C)
    expected = torch.tensor([[1, 0, 0, 0, 1, 0, 0, 0],   # t=0: all two visible
                             [1, 0, 0, 0, 1, 1, 0, 0],   # t=1: 5, 4, 2 beat 1
                             [1, 0, 1, 0, 0, 1, 0, 0],   # t=2: 3 evicts 2
                             [1, 0, 0, 0, 0, 1, 0, 1]],  # t=3: 6 evicts 3
                            dtype=torch.bool)
    assert torch.equal(kept, expected)
    # An evicted entry's content no longer reaches the read; a kept one's does.
    torch.manual_seed(0)
    read = MemoryRead(d_model=8, summary_dim=4, pool_size=3)
    x = torch.randn(1, 4, 8)
    base = read(x, pool)
    evicted = pool._replace(summaries=pool.summaries.clone().index_fill_(1, torch.tensor([2]), 9.0))
    torch.testing.assert_close(read(x, evicted)[:, 3], base[:, 3])  # evicted at t=3
    assert not torch.allclose(read(x, evicted)[:, 2], base[:, 2])  # but read at t=2


def test_pool_write_and_read_gates_get_gradients():
    """Top-k selection has no gradient; the priority reaches the loss through the read's logits."""
    torch.manual_seed(0)
    model = Seq2Seq(POLAR)
    batch = make_batch(MQARConfig(num_pairs=4), 2, TRAIN, 0, 0, 0, "cpu")
    loss = torch.nn.functional.cross_entropy(model(*batch.inputs).flatten(0, 1), batch.labels.flatten(),
                                             ignore_index=IGNORE)
    loss.backward()
    for name, p in model.named_parameters():
        if any(part in name for part in ["score_proj", "summarize", "out_gate", "zero_proj", "one_proj", "gate"]):
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_polar_switches_remove_one_mechanism_each():
    def names(cfg):
        return {n for n, _ in Seq2Seq(cfg).named_parameters()}
    full = names(POLAR)
    assert any("score_proj" in n for n in full) and any("one_proj" in n for n in full)
    assert any("cross.mixer.gate" in n for n in full)
    assert not any("one_proj" in n for n in names(dataclasses.replace(POLAR, polar=False)))
    assert not any("score_proj" in n or "read" in n for n in names(dataclasses.replace(POLAR, mem_pool_size=0)))
    assert not any("cross.mixer.gate" in n for n in names(dataclasses.replace(POLAR, gsa=False)))
    all_off = Seq2Seq(dataclasses.replace(POLAR, polar=False, mem_pool_size=0, gsa=False)).state_dict()
    hybrid = Seq2Seq(SMALL).state_dict()
    assert {k: v.shape for k, v in all_off.items()} == {k: v.shape for k, v in hybrid.items()}


def test_polar_flags_parse_from_the_command_line():
    cfg = tyro.cli(TrainConfig, args=["--decoder", "polar", "--no-polar", "--mem-pool-size", "0", "--no-gsa"])
    assert (cfg.model.decoder, cfg.model.use_polar, cfg.model.pool_size, cfg.model.use_gsa) == ("polar", False, 0, False)
    with pytest.raises(ValueError, match="--mem-pool-size must be >= 0"):
        dataclasses.replace(POLAR, mem_pool_size=-1).validate()


def test_seed_api_builds_on_a_device_in_a_dtype():
    model = build_model(POLAR, device="cpu", dtype=torch.float64)
    src, tgt = make_batch(MQARConfig(num_pairs=4), 2, TRAIN, 0, 0, 0, "cpu").inputs
    logits = model(src, tgt)
    assert logits.dtype == torch.float64 and logits.shape == (2, tgt.shape[1], POLAR.vocab_size)


# ---- the task

@pytest.mark.parametrize("mode", ["seq2seq", "decoder_only"])
def test_mqar_labels_are_the_values_of_their_keys(mode):
    cfg = MQARConfig(num_pairs=20, num_queries=7, mode=mode)
    batch = make_batch(cfg, 16, TRAIN, seed=3, step=5)
    src = batch.inputs[0][:, :3 * 20 + 2]  # the context comes first in both layouts
    queries = batch.inputs[-1][:, -7:]
    keys, seps, values = src[:, 1:-1:3], src[:, 2:-1:3], src[:, 3:-1:3]  # (B, N) each
    assert (seps == SEP).all()
    assert ((KEY_LO <= keys) & (keys < KEY_HI)).all() and ((VAL_LO <= values) & (values < VAL_HI)).all()
    for b in range(16):
        assert len(set(keys[b].tolist())) == 20, "keys must be distinct within an example"
        assert len(set(queries[b].tolist())) == 7, "queries must be distinct keys"
        pairs = dict(zip(keys[b].tolist(), values[b].tolist()))
        asked = batch.labels[b] != IGNORE
        assert asked.sum() == 7
        assert batch.labels[b][asked].tolist() == [pairs[q] for q in queries[b].tolist()]


def test_mqar_batches_are_reproducible_and_splits_disjoint():
    cfg = MQARConfig(num_pairs=16)
    a, b = make_batch(cfg, 4, TRAIN, 0, 7, rank=1), make_batch(cfg, 4, TRAIN, 0, 7, rank=1)
    assert torch.equal(a.inputs[0], b.inputs[0]) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.inputs[0], make_batch(cfg, 4, TRAIN, 0, 7, rank=0).inputs[0])
    assert not torch.equal(a.inputs[0], make_batch(cfg, 4, TEST, 0, 7, rank=1).inputs[0])
    train_seeds = {batch_seed(TRAIN, s, t, r) for s in range(4) for t in range(300) for r in range(4)}
    test_seeds = {batch_seed(TEST, s, t, r) for s in range(4) for t in range(300) for r in range(4)}
    assert not train_seeds & test_seeds


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_pairs=0), "--num-pairs must be in [1, 4086]"),
    (dict(num_pairs=5000), "--num-pairs must be in [1, 4086]"),
    (dict(num_pairs=8, num_queries=9), "--num-queries must be in [1, --num-pairs=8]"),
    (dict(min_pairs=0), "--min-pairs must be >= 1"),
])
def test_bad_task_flags_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        MQARConfig(**kwargs).validate()


@pytest.mark.parametrize("hybrid", ["0,4", "-1", "0,0", "a,b"])
def test_bad_hybrid_is_named_with_decoder_layers(hybrid):
    with pytest.raises(ValueError, match="--hybrid") as e:
        dataclasses.replace(SMALL, decoder_layers=4, hybrid=hybrid).validate()
    assert hybrid == "a,b" or "--decoder-layers" in str(e.value)


def test_hybrid_flag_parses_as_typed():
    assert dataclasses.replace(SMALL, decoder_layers=4, hybrid="0,2").hybrid_layers() == (0, 2)
    assert dataclasses.replace(SMALL, hybrid="").hybrid_layers() == ()


def test_cli_rejects_bad_flags_before_work(tmp_path):
    run = subprocess.run([sys.executable, "train.py", "--num-pairs", "0", "--out-dir", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode != 0 and "error: --num-pairs must be in [1, 4086]" in run.stderr and "got 0" in run.stderr
    assert "Traceback" not in run.stderr and not any(tmp_path.iterdir())


# ---- the model's parameterization

def test_mamba_init_survives_model_init():
    model = Seq2Seq(SMALL)
    mixer = model.decoder.layers[1].mamba.mixer
    assert isinstance(mixer, Mamba1)
    torch.testing.assert_close(mixer.A_log, torch.arange(1, 9).float().log().repeat(mixer.d_inner, 1))
    dt = torch.nn.functional.softplus(mixer.dt_proj.bias)
    assert (dt >= 1e-4).all() and (dt <= 0.1 + 1e-6).all() and dt.std() > 0, "dt_proj.bias was re-initialized"
    m2 = Seq2Seq(dataclasses.replace(SMALL, ssm="mamba2")).decoder.layers[1].mamba.mixer
    assert isinstance(m2, Mamba2)
    assert ((-m2.A_log.exp() <= -1) & (-m2.A_log.exp() >= -16)).all()
    assert torch.equal(m2.D, torch.ones_like(m2.D))


def test_residual_branch_outputs_start_scaled_down():
    """Every out_proj (Mamba's and attention's) starts at nn.Linear's init / sqrt(2 x layers)."""
    layers = SMALL.encoder_layers + SMALL.decoder_layers
    scaled = {n: p for n, p in Seq2Seq(SMALL).named_parameters() if n.endswith("out_proj.weight")}
    # Mamba (two per encoder layer: bidirectional), one encoder self-attention, two cross-attentions
    assert len(scaled) == 2 * SMALL.encoder_layers + SMALL.decoder_layers + 1 + 2
    for name, w in scaled.items():
        bound = w.shape[1] ** -0.5 / math.sqrt(2 * layers)  # nn.Linear draws U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        assert 0.9 * bound < w.abs().max() <= bound, name


@pytest.mark.parametrize("ssm, exempt_suffixes", [("mamba2", ["A_log", "D", "dt_bias", "norm.weight"]),
                                                    ("mamba1", ["A_log", "D", "norm.weight"])])
def test_ssm_parameters_get_no_weight_decay(ssm, exempt_suffixes):  # Mamba1's A_log is 2-D, yet exempt
    model = Seq2Seq(dataclasses.replace(SMALL, ssm=ssm))
    decayed, exempt = configure_optimizer(model, TrainConfig(), torch.device("cpu")).param_groups
    assert decayed["weight_decay"] == 0.01 and exempt["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    exempt_names = {names[id(p)] for p in exempt["params"]}
    decayed_names = {names[id(p)] for p in decayed["params"]}
    for suffix in exempt_suffixes:
        assert any(n.endswith(suffix) for n in exempt_names)
        assert not any(n.endswith(suffix) for n in decayed_names)
    assert "decoder.layers.0.mamba.mixer.in_proj.weight" in decayed_names


# ---- training end to end: a tiny model learns, checkpoints round-trip, resume continues

def tiny_run(tmp_path, **overrides) -> TrainConfig:
    defaults = dict(mqar=MQARConfig(num_pairs=2),
                    model=dataclasses.replace(SMALL, d_model=64, d_state=16, decoder_layers=2, hybrid="0"),
                    batch_size=32, lr=3e-3, warmup_steps=20, max_steps=400, eval_every=400, eval_batches=1,
                    log_every=100, compile=False, out_dir=tmp_path)
    return TrainConfig(**{**defaults, **overrides})


@pytest.mark.parametrize("decoder", ["hybrid", "polar"])
def test_tiny_model_learns_mqar(tmp_path, decoder):
    """Two pairs, both asked: copying either value of the context scores 50%, so 80% needs the key
    match. Both decoders pass 80% by step 250 of the 400 (88-92% at step 400 on CPU); --target-acc ends
    the run there."""
    model = dataclasses.replace(tiny_run(tmp_path).model, decoder=decoder)
    result = train(tiny_run(tmp_path, model=model, eval_every=50, target_acc=0.8))
    assert result["acc"] >= 0.8, result
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert log[-1]["acc"] == result["acc"]


def test_curriculum_sizes_and_steps(tmp_path, monkeypatch):
    assert MQARConfig(num_pairs=128).train_sizes() == (8, 16, 32, 64, 128)
    assert MQARConfig(num_pairs=100, min_pairs=16).train_sizes() == (16, 32, 64, 100)
    assert MQARConfig(num_pairs=4).train_sizes() == (4,)  # min-pairs is capped at num-pairs
    assert MQARConfig(num_pairs=32).with_pairs(8).queries == 8  # queries capped by the context
    # The rung moves up at a log line whose training accuracy reached the bar, and is saved.
    cfg = tiny_run(tmp_path, mqar=MQARConfig(num_pairs=8, min_pairs=2), max_steps=6, log_every=2, eval_every=6)
    monkeypatch.setattr(train_module, "CURRICULUM_ACC", 0.0)  # every log line passes: 2, 4, 8 pairs
    assert train(cfg)["train_pairs"] == 8 and torch.load(tmp_path / "ckpt.pt", weights_only=True)["level"] == 2
    monkeypatch.setattr(train_module, "CURRICULUM_ACC", 1.1)  # none does: stays at 2 pairs
    assert train(dataclasses.replace(cfg, out_dir=tmp_path / "flat"))["train_pairs"] == 2


def test_checkpoint_round_trip_and_resume(tmp_path):
    cfg = tiny_run(tmp_path, max_steps=4, eval_every=2)
    train(cfg)
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert saved["step"] == 4 and not any(k.startswith("_orig_mod.") for k in saved["model"])
    train_cfg, model, step = evaluation.load_checkpoint(tmp_path / "ckpt.pt", torch.device("cpu"))
    assert train_cfg == cfg and step == 4
    fresh = build_model(cfg.model, cfg.mqar.mode)
    fresh.load_state_dict(saved["model"])
    batch = make_batch(cfg.mqar, 3, TEST, 0, 0)
    torch.testing.assert_close(model(*batch.inputs), fresh.eval()(*batch.inputs), rtol=0, atol=0)

    # Resuming to step 6 must land where an uninterrupted 6-step run lands.
    train(dataclasses.replace(cfg, max_steps=6, resume=True))
    straight = tmp_path / "straight"
    train(dataclasses.replace(cfg, max_steps=6, out_dir=straight))
    resumed, direct = torch.load(tmp_path / "ckpt.pt", weights_only=True), torch.load(straight / "ckpt.pt", weights_only=True)
    assert resumed["step"] == direct["step"] == 6
    for name in direct["model"]:
        torch.testing.assert_close(resumed["model"][name], direct["model"][name], rtol=1e-5, atol=1e-6)


def test_sigterm_stops_at_the_next_log_line_checkpointed_and_resume_continues(tmp_path, monkeypatch):
    """The runner's deadline sends SIGTERM: the run must checkpoint where it stops (not fall back to
    its last evaluation), say so, and then resume to where an uninterrupted run lands."""
    cfg = tiny_run(tmp_path, max_steps=8, eval_every=8, log_every=2)
    real_step, steps = train_module.train_step, []

    def step_then_sigterm(*args):  # the signal arrives during step 3
        steps.append(len(steps) + 1)
        if len(steps) == 3:
            signal.raise_signal(signal.SIGTERM)
        return real_step(*args)

    monkeypatch.setattr(train_module, "train_step", step_then_sigterm)
    with pytest.raises(train_module.Stopped, match="step 4"):
        train(cfg)
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 4  # the log line after it
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler does not outlive the run
    monkeypatch.setattr(train_module, "train_step", real_step)
    train(dataclasses.replace(cfg, resume=True))
    train(dataclasses.replace(cfg, out_dir=tmp_path / "straight"))
    resumed = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    direct = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)
    assert resumed["step"] == direct["step"] == 8
    for name in direct["model"]:
        torch.testing.assert_close(resumed["model"][name], direct["model"][name], rtol=1e-5, atol=1e-6)


def test_eval_cli_reports_and_sweeps(tmp_path):
    train(tiny_run(tmp_path, max_steps=2, eval_every=2))
    out, png = tmp_path / "eval.json", tmp_path / "cliff.png"
    run = subprocess.run([sys.executable, "eval.py", "--ckpt", str(tmp_path / "ckpt.pt"), "--num-pairs", "2,4,8",
                          "--eval-batches", "1", "--out", str(out), "--plot", str(png)],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    rows = json.loads(out.read_text())
    assert [r["num_pairs"] for r in rows] == [2, 4, 8] and all(0 <= r["acc"] <= 1 for r in rows)
    assert "| num_pairs |" in run.stdout and png.stat().st_size > 0


@pytest.mark.parametrize("content, message", [
    (None, "no such checkpoint file"),
    (b"PK\x03\x04 truncated", "not a readable checkpoint"),
    ("state_dict", "not an align-mamba checkpoint"),
])
def test_eval_rejects_bad_checkpoints_in_one_line(tmp_path, content, message):
    path = tmp_path / "ckpt.pt"
    if content == "state_dict":
        torch.save(Seq2Seq(SMALL).state_dict(), path)
    elif content is not None:
        path.write_bytes(content)
    run = subprocess.run([sys.executable, "eval.py", "--ckpt", str(path)], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode != 0 and message in run.stderr
    assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1


def test_bench_reports_a_path_out_of_memory_and_times_the_rest_against_the_first(monkeypatch, capsys):
    """bench.py on a GPU, with the timing stubbed: its table logic is what runs here."""
    def fake_path(cfg, impl, compile, warmup, steps, profile):
        if impl == "reference":
            raise torch.OutOfMemoryError("stub")
        return {"ms": 10.0 if compile else 20.0, "tokens": 1000, "flops": 1e12, "peak_gib": 1.0}
    monkeypatch.setattr(bench, "bench_path", fake_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "stub GPU")
    monkeypatch.setattr(torch, "set_float32_matmul_precision", lambda precision: None)  # leave it as it is
    rows = bench.main(bench.BenchConfig(paths="reference-eager,kernel-eager,kernel-compiled"))
    assert [r["ms"] for r in rows] == [None, 20.0, 10.0]
    out = capsys.readouterr().out
    assert "| reference-eager | out of memory |" in out and "speed vs kernel-eager" in out
    assert "| kernel-compiled | 10.00 | 100,000 |" in out and "| 2.00x |" in out


def test_bench_times_the_composite_task_from_its_defaults_and_batches(monkeypatch, capsys):
    """bench.py --task composite starts from the paper's recipe, as train.py does, and times
    train.py's own composite batches."""
    cfg = tyro.cli(bench.BenchConfig, args=["--task", "composite", "--decoder-layers", "2"],
                   default=bench.BenchConfig(train=bench.default_for(["--task", "composite"])))
    assert (cfg.train.batch_size, cfg.train.model.ssm, cfg.train.model.d_model) == (2048, "mamba2", 32)
    small = dataclasses.replace(cfg.train, batch_size=4, composite=dataclasses.replace(cfg.train.composite, num_train=64))
    batch = bench.batches(small, torch.device("cpu"))(3)
    assert batch.inputs[0].shape == (4, composite.SEQ_LEN) and batch.labels.shape == (4, 1)
    monkeypatch.setattr(bench, "bench_path", lambda *args: {"ms": 5.0, "tokens": 1000, "flops": 1e12, "peak_gib": 1.0})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "stub GPU")
    monkeypatch.setattr(torch, "set_float32_matmul_precision", lambda precision: None)
    bench.main(dataclasses.replace(cfg, paths="reference-compiled"))
    assert "stub GPU, composite, 2 layers, gamma 1.0, batch 2048, d_model 32" in capsys.readouterr().out


def test_experiment_grid_skips_only_results_with_the_same_flags(tmp_path, monkeypatch):
    """experiments/runner.py: each model's learning rates, seed-major order, stale results not
    reused (a changed budget reruns a run), and the best lr's mean and std over seeds."""
    sys.path.insert(0, str(ROOT / "experiments"))
    import runner
    monkeypatch.setattr(runner, "ROOT", tmp_path)
    hybrid2 = ["--ssm", "mamba2"]  # seq2seq, the default mode
    grid = runner.mqar_grid({"h2": hybrid2, "p2": ["--mode", "decoder_only", *hybrid2], "m1": []}, (), seeds=2, steps=100)
    assert list(grid)[:6] == ["h2_lr0.00025_s0", "h2_lr0.0005_s0", "p2_lr0.0032_s0", "p2_lr0.01_s0",
                              "m1_lr0.001_s0", "m1_lr0.002_s0"]
    assert grid["m1_lr0.002_s1"] == ["--lr", "0.002", "--seed", "1", "--max-steps", "100", "--eval-every", "250"]
    assert list(runner.mqar_grid({"m1": []}, (3e-3,), 1, 100)) == ["m1_lr0.003_s0"]  # --lrs overrides
    assert list(runner.mqar_grid({"c": [], "m1": []}, (1e-3,), 2, 100, controls=("c",))) == [
        "m1_lr0.001_s0", "m1_lr0.001_s1", "c_lr0.001_s0", "c_lr0.001_s1"]  # a control after every seed of the rest

    def put(name, flags, acc, step=100):
        path = runner.result_path("x", name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"name": name, "flags": flags, "eval": [{"acc": acc, "step": step}]}))
    for name, acc, step in [("h2_lr0.00025_s0", 0.2, 100), ("h2_lr0.00025_s1", 0.4, 50), ("h2_lr0.0005_s0", 0.9, 100)]:
        put(name, grid[name], acc, step)
    put("h2_lr0.0005_s1", runner.mqar_grid({"h2": hybrid2}, (), 2, 50)["h2_lr0.0005_s1"], 0.0)  # another budget
    done = runner.load_results("x", grid)
    assert sorted(done) == ["h2_lr0.00025_s0", "h2_lr0.00025_s1", "h2_lr0.0005_s0"]
    put("m1_lr0.002_s0", grid["m1_lr0.002_s0"], 0.5)  # the best of one lr of two: the report says so
    summary = runner.run_mqar("x", {"h2": hybrid2, "m1": []}, runner.MQARArgs(seeds=2, steps=100, report_only=True))
    assert runner.cell(summary, "h2") == "90.0 ± 0.0 (lr 0.0005, 1 seeds, step 100)"
    assert runner.cell(summary, "m1") == "50.0 ± 0.0 (lr 0.002, 1 seeds, step 100; 1 of 2 lrs)"
    assert runner.cell(summary, "p2") == "not run"
    done.pop("h2_lr0.0005_s0")
    assert runner.best_lr(list(done.values())) == {"h2": {"lr": 2.5e-4, "seeds": 2, "mean": pytest.approx(0.3),
                                                          "std": pytest.approx(0.1 * math.sqrt(2)), "lrs_run": 1,
                                                          "steps": 75}}
    # Rates are compared on the seeds both have run: 2.5e-4 beat 5e-4 on seed 0, and 5e-4 has no seed 1
    # yet to set against 2.5e-4's bad one. The chosen rate's mean is over all its seeds.
    uneven = [{"name": n, "eval": [{"acc": a, "step": 100}]}
              for n, a in [("h2_lr0.00025_s0", 0.9), ("h2_lr0.00025_s1", 0.1), ("h2_lr0.0005_s0", 0.6)]]
    assert runner.best_lr(uneven)["h2"] == {"lr": 2.5e-4, "seeds": 2, "mean": pytest.approx(0.5),
                                            "std": pytest.approx(0.4 * math.sqrt(2)), "lrs_run": 2, "steps": 100}

    run_dir, flags = tmp_path / "runs" / "x" / "m1_lr0.001_s0", grid["m1_lr0.001_s0"]
    assert runner.prepare("x", "m1_lr0.001_s0", flags) == []  # fresh
    (run_dir / "ckpt.pt").write_text("a checkpoint")
    (run_dir / "log.jsonl").write_text("a log line\n")
    assert runner.prepare("x", "m1_lr0.001_s0", flags) == ["--resume"]  # same flags: continue
    assert runner.prepare("x", "m1_lr0.001_s0", grid["m1_lr0.002_s0"]) == []  # other flags: start over, in an empty dir
    assert sorted(p.name for p in run_dir.iterdir()) == ["flags.json"]

    # A checkpoint committed under results/x/partial/ (a fresh machine has no runs/) is resumed from a
    # copy, unless runs/ holds the run's own, which a call on this machine may have taken further.
    partial = tmp_path / "results" / "x" / "partial" / "m1_lr0.001_s0"
    partial.mkdir(parents=True)
    for file, text in [("flags.json", json.dumps(flags)), ("ckpt.pt", "epoch 5"), ("log.jsonl", "5\n")]:
        (partial / file).write_text(text)
    assert runner.prepare("x", "m1_lr0.001_s0", flags) == ["--resume"]
    assert (run_dir / "ckpt.pt").read_text() == "epoch 5" and (run_dir / "log.jsonl").read_text() == "5\n"
    (run_dir / "ckpt.pt").write_text("epoch 9")
    assert runner.prepare("x", "m1_lr0.001_s0", flags) == ["--resume"]
    assert (run_dir / "ckpt.pt").read_text() == "epoch 9"
    assert runner.prepare("x", "m1_lr0.001_s0", grid["m1_lr0.002_s0"]) == []  # not for other flags

    # Trained and scored in an earlier call whose result file is gone: written again, not trained on.
    run_dir, flags = tmp_path / "runs" / "x" / "m1_lr0.002_s0", grid["m1_lr0.002_s0"]
    runner.prepare("x", "m1_lr0.002_s0", flags)
    (run_dir / "log.jsonl").write_text(json.dumps({"step": 400, "acc": 0.995}) + "\n")
    (run_dir / "eval.json").write_text(json.dumps([{"acc": 0.99}]))
    put("m1_lr0.002_s0", ["--another", "budget"], 0.1)  # a stale result file in its place does not count
    monkeypatch.setattr(runner.subprocess, "Popen", None)  # starting any process would fail
    done = runner.run_grid("x", {"m1_lr0.002_s0": flags}, parallel=1, deadline_s=10, exec_flags=[])
    assert done["m1_lr0.002_s0"]["eval"] == [{"acc": 0.99}] and done["m1_lr0.002_s0"]["flags"] == flags


def test_runner_spreads_runs_over_the_gpus(tmp_path, monkeypatch):
    """`parallel` runs at once on each GPU, a new one on the least loaded, each run trained and scored
    on the same GPU (processes are stand-ins that write what train.py and eval.py would)."""
    sys.path.insert(0, str(ROOT / "experiments"))
    import runner
    monkeypatch.setattr(runner, "ROOT", tmp_path)
    monkeypatch.setattr(runner, "visible_gpus", lambda: ["3", "5"])
    monkeypatch.setattr(runner.time, "sleep", lambda s: None)
    alive, started = [], []  # processes not yet seen ended; (script, run dir, GPU) in starting order

    class Process:
        def __init__(self, cmd, cwd, env, stdout, stderr):
            self.returncode, self.polled = 0, False
            alive.append(self)
            assert len(alive) <= 2 * 2, "more than parallel=2 runs at once on each of 2 GPUs"
            if cmd[1] == "train.py":
                run_dir = Path(cmd[cmd.index("--out-dir") + 1])
                (run_dir / "log.jsonl").write_text(json.dumps({"step": 1}) + "\n")
            else:
                run_dir = Path(cmd[cmd.index("--out") + 1]).parent
                (run_dir / "eval.json").write_text(json.dumps([{"acc": 1.0}]))
            started.append((cmd[1], run_dir.name, env["CUDA_VISIBLE_DEVICES"]))

        def poll(self):  # a process ends the second time it is asked
            if self.polled and self in alive:
                alive.remove(self)
            self.polled = True
            return self.returncode if self not in alive else None

    monkeypatch.setattr(runner.subprocess, "Popen", Process)
    grid = {f"r{i}": ["--seed", str(i)] for i in range(6)}
    done = runner.run_grid("x", grid, parallel=2, deadline_s=60, exec_flags=[])
    assert sorted(done) == sorted(grid)
    gpu_of = {}
    for script, run, gpu in started:
        assert gpu_of.setdefault(run, gpu) == gpu  # eval.py on the GPU the run trained on
    assert sorted(gpu_of.values()) == ["3", "3", "3", "5", "5", "5"]


def test_runner_deadline_sends_one_sigterm_and_waits_for_the_checkpoint(tmp_path, monkeypatch):
    """At --deadline-s a running train.py gets SIGTERM once, then the runner waits while it trains on
    to its next log line: a second SIGTERM would meet the default handler train.py has restored by
    then and kill it (exit -15) on its way out."""
    sys.path.insert(0, str(ROOT / "experiments"))
    import runner
    monkeypatch.setattr(runner, "ROOT", tmp_path)
    monkeypatch.setattr(runner, "visible_gpus", lambda: [])
    clock = [0.0]  # the runner's time: each of its 2-second naps advances it

    def nap(seconds):
        clock[0] += seconds
    monkeypatch.setattr(runner, "time", type("Clock", (), {"monotonic": lambda: clock[0], "sleep": nap}))

    class Process:  # stand-in for train.py: it stops 3 polls after its SIGTERM, at exit status 1
        def __init__(self, *args, **kwargs):
            self.returncode, self.sigterms, self.polls_left = None, 0, None

        def terminate(self):
            self.sigterms += 1
            if self.sigterms == 1:
                self.polls_left = 3
            else:  # the default handler, restored
                self.returncode = -signal.SIGTERM

        def poll(self):
            if self.returncode is None and self.polls_left is not None:
                self.polls_left -= 1
                if self.polls_left == 0:
                    self.returncode = 1  # checkpointed at its next log line: Stopped
            return self.returncode

    processes = []
    monkeypatch.setattr(runner.subprocess, "Popen", lambda *a, **k: processes.append(Process()) or processes[-1])
    done = runner.run_grid("x", {"r0": ["--seed", "0"]}, parallel=1, deadline_s=5, exec_flags=[])
    assert done == {} and len(processes) == 1  # stopped, not finished: it resumes next call
    assert processes[0].returncode == 1 and processes[0].sigterms == 1


def test_experiment_reports_rebuild_tables_and_plots_from_partial_results(tmp_path, monkeypatch):
    """--report-only on a grid that is part done (seed 0 only; no 512-pair, control or no-gsa runs):
    each script writes its table, saying which cells are not run, and its PNG."""
    sys.path.insert(0, str(ROOT / "experiments"))
    import achilles
    import blind_start
    import capacity_cliff
    import d_state_scaling
    import polar_ablation
    import runner
    monkeypatch.setattr(runner, "ROOT", tmp_path)

    def seed_0_results(experiment, grid):
        scores = {"acc": 0.5, "composite": 0.25, "symmetric": 0.0, "step": 200 * achilles.STEPS_PER_EPOCH}
        return {name: {"name": name, "flags": flags, "eval": [scores]} for name, flags in grid.items()
                if name.endswith("_s0") and "N512" not in name and "none" not in name and "no-gsa" not in name}
    for module in (runner, achilles):  # achilles.py runs its own grid, not through run_mqar
        monkeypatch.setattr(module, "load_results", seed_0_results)
    args = runner.MQARArgs(report_only=True)
    for script, png in [(capacity_cliff, "cliff.png"), (d_state_scaling, "capacity.png"), (blind_start, "blind_start.png"),
                        (polar_ablation, "ablation.png")]:
        script.main(args)
        out = tmp_path / "results" / script.EXPERIMENT
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
        table = (out / "table.md").read_text()
        assert "50.0 ± 0.0" in table and "not run" in table, table
    d_state_table = (tmp_path / "results" / "d_state_scaling" / "table.md").read_text()
    assert "incomplete (6 of 7)" in d_state_table and "incomplete (8 of 9)" in d_state_table  # d_state 16, 128
    achilles.main(achilles.Args(report_only=True))
    assert (tmp_path / "results" / "achilles" / "phase.png").read_bytes()[:4] == b"\x89PNG"
    achilles_table = (tmp_path / "results" / "achilles" / "table.md").read_text()
    assert "| 7 layers, gamma 1.0 | 1 | [200] | 50.0 ± 0.0 | 25.0 ± 0.0 | 0.0 ± 0.0 |" in achilles_table
    assert "seed 0, 72 of 72 cells" in achilles_table and "seed 1" not in achilles_table
    assert "| 2 | composite | " + " | ".join(["25.0"] * 12) + " |" in achilles_table


def test_d_state_capacity_is_the_last_n_at_half_and_only_a_bound_at_the_grids_end():
    sys.path.insert(0, str(ROOT / "experiments"))
    import d_state_scaling as ds
    assert ds.pairs(16) == ds.pairs(32) == [8, 16, 32, 64, 128, 256, 512] and ds.pairs(128)[-1] == 2048

    def capacity(d, accs, lrs_run=2):
        return ds.capacity({f"d{d}_N{n}": {"mean": a, "lrs": 2, "lrs_run": lrs_run if n == ds.pairs(d)[-1] else 2}
                            for n, a in zip(ds.pairs(d), accs)}, d)
    assert capacity(16, [1, 1, 1, 0.97, 0.58, 0.29, 0.08]) == "128"
    assert capacity(64, [1] * 7 + [0.87]) == ">= 1024 (the grid's end)"
    assert capacity(32, [0.4] * 7) == "< 8"
    assert capacity(128, [1, 1, 1]) == "incomplete (3 of 9)"
    assert capacity(128, [1] * 7 + [0.67, 0.04], lrs_run=1) == "incomplete (8 of 9)"  # the last cell: 1 lr of 2


def test_d_state_scaling_reads_the_cliffs_runs_only_for_identical_flags():
    """d_state 64 cells come from the capacity cliff's pure Mamba-2: that is sound only while the two
    scripts would train exactly the same runs."""
    sys.path.insert(0, str(ROOT / "experiments"))
    import capacity_cliff
    import d_state_scaling
    for n in capacity_cliff.PAIRS:
        assert d_state_scaling.flags(64, n) == [*capacity_cliff.MODELS["mamba2"], "--num-pairs", str(n)]


# ---- the composite-function task (composite.py)

def test_composite_sets_follow_the_paper():
    tests = composite.test_sets(CompositeConfig(num_test=500), "cpu")
    sets = {"train": (*composite.train_set(CompositeConfig(num_train=3000), 0, "cpu"), False),
            "test": (tests["tokens"], tests["labels"], True),
            "held_out": (tests["held_out"], tests["composite"], True)}
    for name, (tokens, labels, congruent) in sets.items():
        is_anchor = (tokens >= 1) & (tokens <= 4)  # (n, 8)
        assert (is_anchor.sum(1) == 2).all(), name  # one anchor pair and nothing else from 1-4
        pos = is_anchor.int().argmax(1) - 1  # the key sits just before the first anchor
        rows = torch.arange(len(tokens))
        assert is_anchor[rows, pos + 2].all() and (pos >= 0).all() and (pos <= 5).all(), name
        key, a, b = tokens[rows, pos], tokens[rows, pos + 1], tokens[rows, pos + 2]
        assert ((tokens >= 20) | is_anchor).all(), name  # keys and noise from [20, 100)
        assert ((key % 8 == pos) == congruent).all(), name  # the residue rule splits train from test
        shift = {(i, j): composite.SHIFT[i] + composite.SHIFT[j] for i in range(1, 5) for j in range(1, 5)}
        shift[(3, 4)] = -6
        expected = torch.stack([(k + shift[(i, j)]) % 100 for k, i, j in zip(key, a.tolist(), b.tolist())])
        assert torch.equal(labels, expected), name
        pairs = set(zip(a.tolist(), b.tolist()))
        assert pairs == ({(4, 3)} if name == "held_out" else set(composite.TRAIN_PAIRS)), name
    assert ((tests["symmetric"] - tests["composite"]) % 100 == 4).all()  # key - 6 against key - 10
    assert torch.equal(composite.train_set(CompositeConfig(num_train=100), 3, "cpu")[0],
                       composite.train_set(CompositeConfig(num_train=100), 3, "cpu")[0])


def test_composite_batches_walk_epochs_without_repeats():
    data = composite.train_set(CompositeConfig(num_train=100), 0, "cpu")
    seen = torch.cat([composite.train_batch(data, 10, step, 0, rank, 2).inputs[0]
                      for step in range(5) for rank in range(2)])  # one epoch over 2 ranks
    assert len(torch.unique(seen, dim=0)) == len(torch.unique(data[0], dim=0)) == 100
    batch = composite.train_batch(data, 10, 0, 0)
    assert batch.inputs[0].shape == (10, 8) and batch.labels.shape == (10, 1)


def test_composite_model_is_causal_and_scores_the_last_position():
    cfg = CompositeConfig(pos_emb=True)
    model = CompositeMamba("mamba2", 32, 16, 2, cfg).eval()
    x = torch.randint(20, 100, (3, 8))
    y = x.clone()
    y[:, 5:] = torch.randint(20, 100, (3, 3))
    embed = lambda t: model.embed(t) + model.pos.weight[:8]  # noqa: E731
    torch.testing.assert_close(model.layers(embed(x))[:, :5], model.layers(embed(y))[:, :5], rtol=0, atol=0)
    assert model(x).shape == (3, 1, 100)


def test_gamma_init_and_frozen_ones_conv():
    model = CompositeMamba("mamba2", 32, 16, 2, CompositeConfig(gamma=0.5, ones_conv=True))
    w = model.layers[0].mixer.in_proj.weight  # (d1, 32)
    assert abs(w.std().item() * w.shape[0] ** 0.5 - 1) < 0.05
    assert (model.layers[1].mixer.conv1d.bias == 0).all()
    assert (model.layers[0].mixer.dt_bias != 0).all()  # Mamba's time-step init is kept
    conv = model.layers[0].mixer.conv1d.weight
    assert (conv == 1).all() and not conv.requires_grad
    small = CompositeMamba("mamba2", 32, 16, 2, CompositeConfig(gamma=1.0)).layers[0].mixer.in_proj.weight
    assert abs(small.std().item() * small.shape[0] - 1) < 0.05


def test_composite_defaults_and_flags(tmp_path):
    from train import parse_args
    cfg = parse_args(["--task", "composite"])
    assert (cfg.batch_size, cfg.lr, cfg.beta2, cfg.model.d_model, cfg.model.d_state, cfg.model.decoder_layers,
            cfg.model.dropout, cfg.composite.num_train) == (2048, 2.5e-4, 0.999, 32, 128, 7, 0.0, 300_000)
    assert cfg.max_steps == 200 * (300_000 // 2048)
    assert parse_args(["--task", "composite", "--batch-size", "512", "--gamma", "0.3"]).batch_size == 512
    assert parse_args([]) == TrainConfig()  # MQAR keeps its own defaults
    for flags, message in [(["--gamma", "0"], "--gamma must be > 0"), (["--num-train", "0"], "--num-train")]:
        run = subprocess.run([sys.executable, "train.py", "--task", "composite", *flags, "--out-dir", str(tmp_path)],
                             cwd=ROOT, capture_output=True, text=True)
        assert run.returncode != 0 and message in run.stderr and "Traceback" not in run.stderr


def test_composite_checkpoint_scores_the_same_in_eval(tmp_path):
    from train import parse_args
    cfg = parse_args(["--task", "composite", "--decoder-layers", "2", "--d-state", "16", "--num-train", "2000",
                      "--batch-size", "64", "--max-steps", "4", "--eval-every", "4", "--num-test", "300",
                      "--out-dir", str(tmp_path)])
    result = train(cfg)
    out = tmp_path / "eval.json"
    run = subprocess.run([sys.executable, "eval.py", "--ckpt", str(tmp_path / "ckpt.pt"), "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    row = json.loads(out.read_text())[0]
    assert "| composite | symmetric |" in run.stdout
    assert [row[k] for k in ("acc", "composite", "symmetric")] == [result[k] for k in ("acc", "composite", "symmetric")]
    run = subprocess.run([sys.executable, "eval.py", "--ckpt", str(tmp_path / "ckpt.pt"), "--num-pairs", "8"],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode != 0 and "MQAR checkpoints only" in run.stderr


# ---- the GPU paths: the same parameters must compute the same function (skipped on CPU)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_kernels = pytest.mark.skipif(not torch.cuda.is_available() or kernels() is None,
                                   reason="needs a CUDA GPU with mamba_ssm and causal_conv1d")


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@needs_cuda
def test_flash_attention_matches_sdpa():
    import hybrid
    if hybrid.flash_attn_func() is None:
        pytest.skip("flash_attn is not installed")
    attn = Attention(128, 64).cuda()  # two heads
    x, ctx = torch.randn(2, 9, 128, device="cuda"), torch.randn(2, 33, 128, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        flash = attn(x, ctx)
        attn.flash = None  # the SDPA path, same weights
        sdpa = attn(x, ctx)
    assert rel_err(flash, sdpa) < 1e-2


GPU_MODEL = ModelConfig(d_model=256, d_state=64, encoder_layers=2, decoder_layers=3, hybrid="0,2", dropout=0.0)


def gpu_batch():
    return make_batch(MQARConfig(num_pairs=128), 4, TRAIN, 0, 0, 0, "cuda").inputs  # S = 386, L = 17


# name: (module for an impl, its inputs); the inputs are random activations of a realistic size or MQAR tokens
KERNEL_CASES = {
    "mamba2": (lambda impl: Mamba2(256, 64, impl), lambda: (torch.randn(4, 300, 256, device="cuda"),)),
    "mamba1": (lambda impl: Mamba1(256, 64, impl), lambda: (torch.randn(4, 300, 256, device="cuda"),)),
    "bidirectional": (lambda impl: mamba_block("mamba2", 256, 64, impl, 0.0, bidirectional=True),
                      lambda: (torch.randn(4, 300, 256, device="cuda"),)),
    "seq2seq": (lambda impl: Seq2Seq(dataclasses.replace(GPU_MODEL, impl=impl)), gpu_batch),
    "seq2seq-mamba2": (lambda impl: Seq2Seq(dataclasses.replace(GPU_MODEL, ssm="mamba2", impl=impl)), gpu_batch),
    "polar": (lambda impl: Seq2Seq(dataclasses.replace(GPU_MODEL, decoder="polar", impl=impl)), gpu_batch),
    "polar-mamba2": (lambda impl: Seq2Seq(dataclasses.replace(GPU_MODEL, decoder="polar", ssm="mamba2", impl=impl)),
                     gpu_batch),
    "composite": (lambda impl: CompositeMamba("mamba2", 32, 128, 7, CompositeConfig(gamma=0.5), impl),
                  lambda: (torch.randint(20, 100, (64, 8), device="cuda"),)),
}
# Relative-error bounds (output, worst parameter gradient), a few times the worst errors measured
# on an H100 over these cases (fp32: 6.4e-5 and 1.8e-3; bf16: 9.7e-3 and 4.6e-2, the test prints them).
KERNEL_TOL = {"fp32": (1e-3, 1e-2), "bf16": (3e-2, 1e-1)}
# The composite model has one head, so each layer's A_log is a single number whose gradient sums
# terms of both signs over the whole batch: measured 1.8e-2 in fp32 on an H100 (the Triton
# kernels' dot products run in TF32). bf16 was not measured yet; it keeps the common bound.
KERNEL_TOL_CASE = {("composite", "fp32"): (1e-3, 5e-2)}


def path_errors(spec: torch.nn.Module, other: torch.nn.Module, x: tuple, autocast) -> dict:
    """Relative errors of `other` against `spec`, which hold the same parameters: the output, and
    each parameter's gradient for one random output gradient."""
    with autocast:
        outs = [m(*x).float() for m in (spec, other)]
    grad = torch.randn_like(outs[0])
    for out in outs:
        out.backward(grad)
    errors = {"out": rel_err(outs[1], outs[0])}
    return errors | {n: rel_err(q.grad, p.grad) for (n, p), q in zip(spec.named_parameters(), other.parameters())
                     if p.grad is not None and p.grad.norm() > 0}  # rows of the embedding no token used stay zero


@needs_kernels
@pytest.mark.parametrize("ssm", ["mamba2", "mamba1"])
def test_compiled_kernel_path_is_one_graph_and_matches_eager(ssm):
    """Under torch.compile the fused kernels go through a custom op: one graph (fullgraph=True
    fails on any break), and the same output and gradients as eager mamba-ssm."""
    build, inputs = KERNEL_CASES[ssm]
    torch.manual_seed(0)
    eager = build("kernel").cuda()
    compiled = build("kernel").cuda()
    compiled.load_state_dict(eager.state_dict())
    errors = path_errors(eager, torch.compile(compiled, fullgraph=True), inputs(),
                         torch.autocast("cuda", dtype=torch.bfloat16))
    print(f"compiled vs eager kernels, {ssm} bf16: {max(errors.values()):.1e}")
    assert max(errors.values()) < 1e-2, errors


@needs_kernels
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("case", KERNEL_CASES)
def test_kernel_matches_reference(case, precision):
    """The same parameters through both paths: the output and every parameter's gradient."""
    build, inputs = KERNEL_CASES[case]
    torch.manual_seed(0)
    kernel = build("kernel").cuda()
    reference = build("reference").cuda()
    reference.load_state_dict(kernel.state_dict())
    errors = path_errors(reference, kernel, inputs(),
                         torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"))
    worst = max((v, k) for k, v in errors.items() if k != "out")
    print(f"{case} {precision}: out {errors['out']:.1e}, worst grad {worst[0]:.1e} ({worst[1]})")
    out_tol, grad_tol = KERNEL_TOL_CASE.get((case, precision), KERNEL_TOL[precision])
    assert errors["out"] < out_tol, errors
    assert worst[0] < grad_tol, errors
