"""nanosuno/evaluate.py: the losses on held-out tokens and the distances on audio."""
import torch

from conftest import write_token_corpus
from nanosuno import demo
from nanosuno.data import read_meta
from nanosuno.evaluate import audio_statistics, frechet_distance, log_mel, split_losses
from nanosuno.model import GPT, GPTConfig, codebook_losses
from nanosuno.pattern import delay_interleave


def test_split_losses_score_every_frame_of_the_split_once(tmp_path):
    """A file shorter than the context is one window: the loss of one forward over all of it."""
    write_token_corpus(tmp_path, file_frames=[300], val_file_frames=[40], n_codebooks=2)
    meta = read_meta(tmp_path)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, n_codebooks=2, codebook_size=1024, n_layer=1, n_head=2, n_embd=32)).eval()
    losses = split_losses(model, str(tmp_path), meta, 2)
    codes = torch.from_numpy(__import__("numpy").fromfile(tmp_path / "val.bin", dtype="uint16").astype("int64"))
    window = delay_interleave(codes.reshape(40, 2).T, 1024)[None, :, :40]
    with torch.no_grad():
        logits, _ = model(window[:, :, :-1])
    assert losses == torch.tensor(codebook_losses(logits, window[:, :, 1:], 1024).tolist()).double().tolist()


def test_frechet_distance_of_known_gaussians():
    a = (torch.zeros(3, dtype=torch.float64), torch.diag(torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64)))
    b = (torch.tensor([1.0, 0, 0], dtype=torch.float64), torch.diag(torch.tensor([4.0, 4.0, 1.0], dtype=torch.float64)))
    # |mu|^2 + sum (sqrt(s_a) - sqrt(s_b))^2 for diagonal covariances
    assert abs(frechet_distance(a, b) - (1 + 1 + 0 + 4)) < 1e-9
    assert abs(frechet_distance(a, a)) < 1e-9


def test_the_audio_distance_sees_time_not_only_spectra():
    """The same music with its 0.05 s pieces shuffled has the same log-mel frames (nearly) but not
    the same stretches of them: the distance is far from 0 for it, and small for the music played
    a little softer."""
    music = torch.as_tensor(demo.synth_piece(0, 20.0, 24000), dtype=torch.float32)
    pieces = music[:len(music) // 1200 * 1200].reshape(-1, 1200)
    shuffled = pieces[torch.randperm(len(pieces), generator=torch.Generator().manual_seed(0))].flatten()
    noisy = 0.9 * music
    reference = audio_statistics([music])
    same, other = frechet_distance(reference, audio_statistics([noisy])), frechet_distance(reference, audio_statistics([shuffled]))
    frames = lambda w: log_mel(w).reshape(40, 2, -1).mean(1).T.double()   # one frame at a time
    frame_only = lambda a, b: frechet_distance((frames(a).mean(0), torch.cov(frames(a).T)),
                                               (frames(b).mean(0), torch.cov(frames(b).T)))
    assert other > 20 * max(same, 1e-3)
    assert other > 3 * frame_only(music, shuffled)   # one frame alone would hardly tell them apart
