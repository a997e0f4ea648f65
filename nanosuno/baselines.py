"""
The yardstick every training run is shown against: how well simple token statistics, fitted on
the train split, predict the val split. A transformer that does not beat these has learned nothing
that counting could not.

Per codebook k, the val cross-entropy (nats per token) of
  unigram         P(code)                                      how often each code occurs
  prev_frame      P(code at frame t | code at frame t-1)        the same codebook one frame back
  lower_codebook  P(code of codebook k | code of codebook k-1)  the same frame, one codebook down
                                                                (the delay pattern shows the model
                                                                exactly this; none for codebook 0)
Each bigram is interpolated with the unigram, lam * P_bigram + (1 - lam) * P_unigram, so that
pairs never seen in train keep some probability. The mixing weight lam is fitted on the last
tenth of the train split (the bigram counted on the rest), never on val; the counts are then made
on all of train. The unigram is add-one smoothed. Pairs never span two files.
"""
import numpy as np

NAMES = ("unigram", "prev_frame", "lower_codebook")
HELD_OUT = 0.1            # share of each train file's frames that fits the mixing weights
LAMBDAS = np.concatenate([np.linspace(0.0, 0.95, 20), [0.98, 0.99, 0.995, 0.999, 0.9999]])


def _pieces(tokens, files, part=None):
    """Each file's frames [frames, K] as its own array. part='head' / 'tail': only the frames before /
    after the last HELD_OUT of the split (a file that straddles that point is cut in two)."""
    total = sum(f["frames"] for f in files)
    cut = total - int(round(total * HELD_OUT))      # split-relative frame where the tail starts
    seen = 0
    for f in files:
        lo, hi = 0, f["frames"]
        if part == "head":
            hi = min(hi, max(0, cut - seen))
        elif part == "tail":
            lo = min(hi, max(0, cut - seen))
        seen += f["frames"]
        if hi > lo:
            yield np.asarray(tokens[f["offset"] + lo:f["offset"] + hi])


def _pairs(pieces, k, kind):
    """(context codes, target codes) of codebook k over all pieces; kind 'unigram' has no context."""
    ctx, tgt = [], []
    for codes in pieces:
        if kind == "unigram":
            tgt.append(codes[:, k])
        elif kind == "prev_frame":
            ctx.append(codes[:-1, k])
            tgt.append(codes[1:, k])
        else:  # lower_codebook
            ctx.append(codes[:, k - 1])
            tgt.append(codes[:, k])
    cat = lambda a: np.concatenate(a).astype(np.int64) if a else np.zeros(0, np.int64)
    return (cat(ctx) if kind != "unigram" else None), cat(tgt)


def _unigram(targets, V):
    return (np.bincount(targets, minlength=V) + 1.0) / (len(targets) + V)


def _bigram(ctx, tgt, V):
    """Row-normalised counts P(tgt | ctx) as a dense (V, V) array; unseen contexts get zeros."""
    counts = np.bincount(ctx * V + tgt, minlength=V * V).reshape(V, V).astype(np.float64)
    totals = counts.sum(1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def _cross_entropy(probs):
    return float(-np.log(probs).mean()) if len(probs) else float("nan")


def _tail_probs(train_tokens, train_files, k, kind, V):
    """Per target in the last HELD_OUT of the train split, its probability under the bigram and
    under the unigram, both counted on the rest of the split: (bigram, unigram) arrays."""
    h_ctx, h_tgt = _pairs(_pieces(train_tokens, train_files, "head"), k, kind)
    t_ctx, t_tgt = _pairs(_pieces(train_tokens, train_files, "tail"), k, kind)
    return _bigram(h_ctx, h_tgt, V)[t_ctx, t_tgt], _unigram(h_tgt, V)[t_tgt]


def _mixing_weight(bigram, unigram):
    """The lam of LAMBDAS that predicts these targets best (0.5 when there are none)."""
    if not len(unigram):
        return 0.5
    return min(LAMBDAS, key=lambda lam: _cross_entropy(lam * bigram + (1 - lam) * unigram))


def prev_frame_gain(train_tokens, train_files, codebook_size, n_codebooks):
    """How much of the music one frame tells about the next: the nats per token by which the
    previous-frame bigram (mixed with the unigram as baseline_losses mixes it) predicts the last
    HELD_OUT of the train split better than the unigram, both counted on the rest of it, averaged
    over codebooks 0..n_codebooks-1 (0.0 when the split has no tail). Val is not looked at: a run
    decides its model's shape (bigram_min_gain) from this."""
    gains = []
    for k in range(n_codebooks):
        bigram, unigram = _tail_probs(train_tokens, train_files, k, "prev_frame", codebook_size)
        if len(unigram):
            lam = _mixing_weight(bigram, unigram)
            gains.append(_cross_entropy(unigram) - _cross_entropy(lam * bigram + (1 - lam) * unigram))
    return float(np.mean(gains)) if gains else 0.0


def baseline_losses(train_tokens, train_files, val_tokens, val_files, codebook_size):
    """{name: [val CE of codebook k for k in 0..K-1]} (None where a baseline does not apply), plus
    'lambda': the fitted mixing weights. tokens: [frames, K] arrays (memmaps are fine)."""
    V, K = codebook_size, train_tokens.shape[1]
    out = {name: [] for name in NAMES}
    out["lambda"] = {"prev_frame": [], "lower_codebook": []}
    for k in range(K):
        unigram = _unigram(_pairs(_pieces(train_tokens, train_files), k, "unigram")[1], V)
        _, val_targets = _pairs(_pieces(val_tokens, val_files), k, "unigram")
        out["unigram"].append(_cross_entropy(unigram[val_targets]))
        for kind in ("prev_frame", "lower_codebook"):
            if kind == "lower_codebook" and k == 0:
                out[kind].append(None)
                out["lambda"][kind].append(None)
                continue
            # the mixing weight, from the head's counts scored on the tail
            lam = _mixing_weight(*_tail_probs(train_tokens, train_files, k, kind, V))
            # then all of train's counts, scored on val
            ctx, tgt = _pairs(_pieces(train_tokens, train_files), k, kind)
            v_ctx, v_tgt = _pairs(_pieces(val_tokens, val_files), k, kind)
            probs = lam * _bigram(ctx, tgt, V)[v_ctx, v_tgt] + (1 - lam) * unigram[v_tgt]
            out[kind].append(_cross_entropy(probs))
            out["lambda"][kind].append(float(lam))
    return out


def prev_frame_probs(tokens, files, codebook_size, k, lam):
    """Codebook k's previous-frame bigram mixed with its unigram by lam, as baseline_losses scores
    it: (V, V) P(code at t | code at t-1) (an unseen context gets the unigram), and the unigram (V,)."""
    unigram = _unigram(_pairs(_pieces(tokens, files), k, "unigram")[1], codebook_size)
    ctx, tgt = _pairs(_pieces(tokens, files), k, "prev_frame")
    return lam * _bigram(ctx, tgt, codebook_size) + (1 - lam) * unigram, unigram


def sample_prev_frame_bigram(tokens, files, codebook_size, frames, pieces, lambdas, seed=0):
    """Codes (pieces, K, frames) drawn from each codebook's previous-frame bigram (mixed with its
    unigram by lambdas[k], as baseline_losses scores it), every codebook on its own: the music of
    the simple baseline, to hear and measure next to a model's."""
    rng = np.random.default_rng(seed)
    V, K = codebook_size, tokens.shape[1]
    out = np.zeros((pieces, K, frames), dtype=np.int64)
    for k in range(K):
        probs, unigram = prev_frame_probs(tokens, files, V, k, lambdas[k])
        cdf = (probs / probs.sum(1, keepdims=True)).cumsum(1)
        code = rng.choice(V, size=pieces, p=unigram)
        for t in range(frames):
            out[:, k, t] = code
            code = np.minimum((cdf[code] < rng.random((pieces, 1))).sum(1), V - 1)
    return out


def unigrams(codes, codebook_size):
    """Per codebook, how often each code occurs, add-one smoothed: codes [frames, K] -> (K, V)."""
    return np.stack([_unigram(np.asarray(codes[:, k], dtype=np.int64), codebook_size) for k in range(codes.shape[1])])


def unigram_kl(p, q):
    """Mean over codebooks of KL(p || q), in nats, between per-codebook unigrams (K, V)."""
    return float((p * np.log(p / q)).sum(1).mean())


def best_baseline(baselines, n_codebooks=None):
    """Per codebook, the lowest CE of the simple baselines (the one to beat)."""
    K = n_codebooks or len(baselines["unigram"])
    return [min(baselines[name][k] for name in NAMES if baselines[name][k] is not None) for k in range(K)]


def bits_per_second(cross_entropies, frame_rate):
    """Bits per second of audio at these per-codebook CEs (nats per token): the codec's raw rate is
    n_codebooks * frame_rate * log2(codebook_size), 6,000 bit/s for Encodec at 6 kbps."""
    return frame_rate * sum(cross_entropies) / np.log(2)
