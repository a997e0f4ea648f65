"""
MusicGen's "delay" pattern: codebook stream k is shifted right by k steps, so that at step t the
model predicts frame t of codebook 0, frame t-1 of codebook 1, ... With the shift, the coarse
codebook of a frame is always known before its finer residuals are predicted, and one
transformer step emits one token per codebook: 75 steps per second of audio whatever K is.

    codes (K, T)        delayed (K, T + K - 1), S = special token
    a0 a1 a2 a3         a0 a1 a2 a3 S  S
    b0 b1 b2 b3    ->   S  b0 b1 b2 b3 S
    c0 c1 c2 c3         S  S  c0 c1 c2 c3

K = 1 is the identity. Works on any leading batch dimensions.
"""
import torch


def delay_interleave(codes: torch.Tensor, special: int) -> torch.Tensor:
    """(..., K, T) codes -> (..., K, T + K - 1) delayed layout, empty slots = special."""
    K, T = codes.shape[-2:]
    delayed = codes.new_full((*codes.shape[:-2], K, T + K - 1), special)
    for k in range(K):
        delayed[..., k, k:k + T] = codes[..., k, :]
    return delayed


def delay_deinterleave(delayed: torch.Tensor) -> torch.Tensor:
    """(..., K, S) delayed layout -> (..., K, S - K + 1) codes: frame t of stream k sits at step t + k."""
    K, S = delayed.shape[-2:]
    T = S - K + 1
    if T < 0:
        raise ValueError(f"a delayed sequence of {K} codebooks needs at least {K - 1} steps, got {S}")
    return torch.stack([delayed[..., k, k:k + T] for k in range(K)], dim=-2)
