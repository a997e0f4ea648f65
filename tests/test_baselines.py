"""The simple baselines (nanosuno/baselines.py) on token streams whose statistics are known exactly."""
import math

import numpy as np
import pytest

from nanosuno.baselines import baseline_losses, best_baseline, bits_per_second, prev_frame_gain


def as_split(*files):
    """Files given as [frames, K] arrays -> (tokens, files) as meta.json describes a split."""
    tokens = np.concatenate(files).astype(np.uint16)
    offsets = np.cumsum([0] + [len(f) for f in files])
    return tokens, [{"path": f"f{i}", "offset": int(o), "frames": len(f)} for i, (o, f) in enumerate(zip(offsets, files))]


def test_iid_uniform_codes_cost_log_v_under_every_baseline():
    """Independent uniform codes: no baseline can do better than ln V, and none should do worse."""
    V, rng = 16, np.random.default_rng(0)
    train = as_split(*(rng.integers(0, V, (20_000, 2)) for _ in range(3)))
    val = as_split(rng.integers(0, V, (20_000, 2)))
    b = baseline_losses(*train, *val, V)
    for name in ("unigram", "prev_frame"):
        assert b[name] == pytest.approx([math.log(V)] * 2, abs=0.01)
    assert b["lower_codebook"][0] is None and b["lower_codebook"][1] == pytest.approx(math.log(V), abs=0.01)
    assert b["lambda"]["prev_frame"][0] <= 0.1      # the bigram is noise here: mostly the unigram


def test_a_deterministic_cycle_is_free_for_the_bigrams():
    """Codebook 0 cycles through L codes, codebook 1 is a fixed function of codebook 0: the
    unigram costs ln L, the previous-frame bigram ~0, the lower-codebook bigram ~0 on codebook 1."""
    V, L = 64, 8
    cycle = np.arange(3000) % L * 5                 # codes 0, 5, 10, ... 35, 0, 5, ...
    stream = np.stack([cycle, (cycle * 3 + 1) % V], axis=1)
    train, val = as_split(stream, stream[7:]), as_split(stream[3:1003])
    b = baseline_losses(*train, *val, V)
    assert b["unigram"] == pytest.approx([math.log(L)] * 2, abs=0.02)   # add-one smoothing costs a little
    assert b["prev_frame"] == pytest.approx([0, 0], abs=0.01)
    assert b["lower_codebook"][1] == pytest.approx(0, abs=0.01)
    assert best_baseline(b) == pytest.approx([0, 0], abs=0.01)


def test_the_previous_frame_gain_is_what_the_bigram_saves_on_trains_last_tenth():
    """prev_frame_gain, from the train split alone: ~ln L for a cycle of L codes (the bigram knows
    every next code, the unigram only that it is one of L), ~0 for independent codes, averaged over
    the codebooks asked for."""
    V, L = 64, 8
    cycle = np.arange(3000) % L * 5
    rng = np.random.default_rng(0)
    tokens, files = as_split(np.stack([cycle, rng.integers(0, V, 3000)], axis=1))
    assert prev_frame_gain(tokens, files, V, 1) == pytest.approx(math.log(L), abs=0.05)
    both = prev_frame_gain(tokens, files, V, 2)            # codebook 1 adds ~nothing to the mean
    assert both == pytest.approx(math.log(L) / 2, abs=0.05) and both < prev_frame_gain(tokens, files, V, 1)
    assert prev_frame_gain(*as_split(cycle[:5, None]), V, 1) == 0.0   # no tail to score: nothing measured


def test_pairs_never_span_files():
    """Two files of constant codes a and b: a bigram that crossed the file boundary would have
    seen a -> b in train and give it probability; within files it never happens."""
    V = 8
    files = [np.full((10, 1), 1 + i % 2) for i in range(50)]   # 49 boundaries in 500 frames
    train, val = as_split(*files), as_split(*files[:10])
    b = baseline_losses(*train, *val, V)
    assert b["prev_frame"][0] == pytest.approx(0, abs=0.01)


def test_bits_per_second():
    # 8 codebooks at ln(1024) nats each, 75 frames/s: the codec's raw 6,000 bit/s
    assert bits_per_second([math.log(1024)] * 8, 75) == pytest.approx(6000)
