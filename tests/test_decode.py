"""decode.py: the one-step path equals the model's forward, in every precision, on the CPU and on CUDA."""
import copy
import math

import pytest
import torch

from conftest import write_token_corpus
from nanosuno.decode import CUDAGraphStep, Decoder
from nanosuno.evaluate import decode_cross_entropy, stacked_windows
from nanosuno.generate import generate
from nanosuno.model import GPT, GPTConfig


def tiny(K=8, block_size=64, n_styles=0, codebook_size=64, n_head=4, bigram=False, n_kv_head=0, rotary=False):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=block_size, n_codebooks=K, codebook_size=codebook_size, n_layer=2,
                          n_head=n_head, n_embd=32, n_styles=n_styles, bigram=bigram, n_kv_head=n_kv_head,
                          rotary=rotary)).eval()
    if bigram:   # a table that is not all zeros
        torch.nn.init.normal_(model.bigram.weight)
    return model


@pytest.mark.parametrize("K,n_styles,bigram,n_kv_head,rotary", [
    (1, 0, False, 0, False), (8, 0, False, 0, False), (8, 3, False, 0, False), (8, 0, True, 0, False),
    (8, 0, False, 2, False), (8, 3, False, 1, False), (8, 0, True, 2, True), (1, 3, False, 0, True)])
def test_cached_decoding_matches_full_forward(K, n_styles, bigram, n_kv_head, rotary):
    model = tiny(K, n_styles=n_styles, bigram=bigram, n_kv_head=n_kv_head, rotary=rotary)
    decoder = Decoder(model)
    codes = torch.randint(0, 65, (2, K, 48))
    styles = torch.tensor([0, 3]) if n_styles else None     # a style and "no style"
    full, _ = model(codes, style_ids=styles)
    cache = decoder.new_cache(2)
    assert cache.kv[0].shape[2] == (n_kv_head or 4)     # grouped-query attention: a smaller cache
    steps = [decoder.prefill(codes[:, :, :16], cache, styles)]
    for t in range(16, 47):
        steps.append(decoder.step(codes[:, :, t], cache, styles))
    assert cache.length == 47
    incremental = torch.stack(steps, dim=2)            # logits for steps 15..46
    torch.testing.assert_close(incremental, full[:, :, 15:47], atol=1e-5, rtol=1e-5)
    # a chunk after cached steps (the masked path) agrees too
    cache = decoder.new_cache(2)
    model(codes[:, :, :10], cache=cache, style_ids=styles)
    chunk, _ = model(codes[:, :, 10:30], cache=cache, style_ids=styles)
    torch.testing.assert_close(chunk, full[:, :, 10:30], atol=1e-5, rtol=1e-5)


def test_rotation_matrices_turn_as_rotate_does():
    from nanosuno.decode import rotation_matrices
    from nanosuno.model import rotary_angles, rotate
    angles, x = rotary_angles(40, 16), torch.randn(3, 5, 16)
    for t in (0, 1, 39):
        torch.testing.assert_close(x @ rotation_matrices(angles)[t], rotate(x, angles[t]), atol=1e-6, rtol=1e-6)


def test_context_longer_than_block_size_is_refused():
    model = tiny(block_size=16)
    decoder = Decoder(model)
    with pytest.raises(ValueError, match="sequence of 17 steps exceeds block_size 16"):
        model(torch.zeros(1, 8, 17, dtype=torch.long))
    cache = decoder.new_cache(1)
    decoder.prefill(torch.zeros(1, 8, 16, dtype=torch.long), cache)   # a full context: no room for a step
    with pytest.raises(ValueError, match="sequence of 17 steps exceeds block_size 16"):
        decoder.step(torch.zeros(1, 8, dtype=torch.long), cache)
    assert cache.length == 16


def test_unknown_decode_dtype_is_refused():
    with pytest.raises(ValueError, match="decode dtype must be one of float32, bfloat16, int8, got 'int4'"):
        Decoder(tiny(), "int4")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_each_decode_dtype_stays_close_to_the_float32_forward(dtype):
    """The Decoder's precisions: float32 is the exact path, bfloat16 and int8 weights approximate
    it closely (bench.py decode_quality measures what that costs in cross-entropy)."""
    model = tiny(K=8)
    codes = torch.randint(0, 65, (1, 8, 24))
    full, _ = model(codes)
    decoder = Decoder(model, dtype)
    cache = decoder.new_cache(1)
    steps = [decoder.prefill(codes[:, :, :8], cache)]
    steps += [decoder.step(codes[:, :, t], cache) for t in range(8, 23)]
    approx = torch.stack(steps, dim=2)
    assert approx.dtype == (torch.float32 if dtype == "float32" else torch.bfloat16)
    err = (approx.float() - full[:, :, 7:23]).abs().max().item()
    if dtype == "float32":
        assert err < 1e-5
    else:   # 2-3 significant digits: not the exact path, but off by under a tenth of the logits' spread
        assert 1e-4 < err < 0.1 * full.std().item(), err


@pytest.mark.parametrize("rotary", [False, True])
def test_decode_dtypes_keep_a_trained_models_cross_entropy(tmp_path, rotary):
    """bench.py decode_quality in small: a tiny model trained for a few seconds on learnable codes
    scores nearly the same teacher-forced cross-entropy through Decoder.step in every precision
    (~0.001 nats apart; the real check, 0.005 nats on a trained small model, is the benchmark's)."""
    meta = write_token_corpus(tmp_path, file_frames=[400, 400])
    windows = stacked_windows(str(tmp_path), meta, 8, 40, split="train")
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=40, n_codebooks=8, codebook_size=1024, n_layer=2, n_head=4, n_embd=64,
                          rotary=rotary, codebook0_weight=1.0))   # the loss is then the plain mean over codebooks, as measured
    optimizer = model.configure_optimizers(1e-2, 0.02, 0.0, (0.9, 0.95))
    for _ in range(10):   # a few seconds: far from memorised (~1.3 nats), far from random (6.9)
        batch = windows[torch.randint(len(windows), (8,))]
        _, loss = model(batch[:, :, :-1], batch[:, :, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    reference = decode_cross_entropy(Decoder(model), windows)[0]
    full_forward = model(windows[:, :, :-1], windows[:, :, 1:])[1].item()
    assert abs(reference - full_forward) < 1e-4          # the measurement is the model's loss
    assert reference < 0.5 * math.log(1024)              # and the model has learned something
    for dtype in ("bfloat16", "int8"):
        ce = decode_cross_entropy(Decoder(copy.deepcopy(model), dtype), windows)[0]
        assert ce != reference and abs(ce - reference) < 0.01, (dtype, ce, reference)


@pytest.mark.parametrize("n_kv_head,rotary,dtype", [(0, False, None), (2, False, None), (2, True, None),
                                                     (2, True, "int8")])
def test_step_at_a_device_position_matches_step(n_kv_head, rotary, dtype):
    """step_logits with the position as a tensor (what a CUDA graph replays: the whole cache, masked
    beyond the position) computes what step computes over the filled steps, styles too; int8 too,
    whose bfloat16 keys and values go into a float32 cache on a CPU."""
    decoder = Decoder(tiny(K=8, n_styles=2, n_kv_head=n_kv_head, rotary=rotary), dtype)
    codes, styles = torch.randint(0, 65, (2, 8, 30)), torch.tensor([1, 0])
    caches = [decoder.new_cache(2), decoder.new_cache(2)]
    for cache in caches:
        decoder.prefill(codes[:, :, :10], cache, styles)
    for t in range(10, 30):
        expected = decoder.step(codes[:, :, t], caches[0], styles)
        got = decoder.step_logits(codes[:, :, t], caches[1].kv, torch.tensor([t]), styles)
        caches[1].advance(1)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(caches[1].kv[0][:, :, :, :30], caches[0].kv[0][:, :, :, :30], atol=1e-6, rtol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_cuda_graph_step_is_exact():
    """On CUDA, generate() decodes through a captured graph: each replay equals the same step run
    eagerly bit for bit, and greedy codes equal the CPU path's, across window slides, with a prompt
    and with guidance (float64: no argmax flips from rounding)."""
    model = tiny(K=4, block_size=16, n_styles=2, codebook_size=1024, n_head=2).double()
    gpu = Decoder(tiny(K=4, block_size=16, n_styles=2, codebook_size=1024, n_head=2).double().cuda())
    cache, eager_cache = gpu.new_cache(2), gpu.new_cache(2)
    step = CUDAGraphStep(gpu, cache)
    codes = torch.randint(0, 1024, (2, 4, 16), device="cuda")
    for t in range(16):
        logits = step(codes[:, :, t], cache).clone()
        eager = gpu.step_logits(codes[:, :, t], eager_cache.kv, torch.tensor([t], device="cuda"))
        assert torch.equal(logits, eager)
    assert cache.length == 16
    prompt = torch.randint(0, 1024, (4, 5))
    for p, guidance in ((None, {}), (prompt, {}), (prompt, dict(style_ids=[1, 0], cfg_coef=3.0))):
        expected = generate(model, 40, p, temperature=0, **guidance)
        assert torch.equal(generate(gpu, 40, p, temperature=0, **guidance).cpu(), expected)
