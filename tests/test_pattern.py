import pytest
import torch

from nanosuno.pattern import delay_deinterleave, delay_interleave

SPECIAL = 1024


@pytest.mark.parametrize("K", range(1, 9))
@pytest.mark.parametrize("T", [1, 3, 7, 50])
def test_round_trip(K, T):
    codes = torch.randint(0, 1024, (2, K, T))
    delayed = delay_interleave(codes, SPECIAL)
    assert delayed.shape == (2, K, T + K - 1)
    assert torch.equal(delay_deinterleave(delayed), codes)


@pytest.mark.parametrize("K, T", [(4, 2), (8, 1), (8, 5)])  # fewer frames than codebooks
def test_layout_places_frame_t_of_stream_k_at_step_t_plus_k(K, T):
    codes = torch.randint(0, 1024, (K, T))
    delayed = delay_interleave(codes, SPECIAL)
    for k in range(K):
        for step in range(T + K - 1):
            expected = codes[k, step - k] if 0 <= step - k < T else SPECIAL
            assert delayed[k, step] == expected


def test_single_codebook_is_identity():
    codes = torch.randint(0, 1024, (3, 1, 20))
    assert torch.equal(delay_interleave(codes, SPECIAL), codes)
    assert torch.equal(delay_deinterleave(codes), codes)


def test_too_short_delayed_sequence_is_an_error():
    with pytest.raises(ValueError, match="at least 7 steps"):
        delay_deinterleave(torch.zeros(8, 5, dtype=torch.long))
