"""
The audio codec: Meta's Encodec (24 kHz model) turns audio into discrete codes and back.

At 6 kbps one second of audio is 75 frames (one frame per 320 samples) of 8 codes: codebook 0
holds the coarse sound, each next codebook quantises what the ones before it left over (residual
vector quantisation), each with 1024 entries. Two codecs share that architecture:

  encodec_24khz  the pretrained model. Weights: encodec_24khz-d7cc33bc.th, from codec_dir, else
                 torch hub's cache ($TORCH_HOME/hub/checkpoints), else downloaded into that cache.
  untrained      deterministic weights (fixed seed, nothing downloaded) so that tests and offline
                 smoke runs work anywhere. Its tokens are diverse on music, its audio quality is
                 meaningless.
A third codec has the same token shape: `spectral` (nanosuno/spectral.py), fitted by prepare.py on
the corpus it prepares; its fitted weights travel with the tokens (data_dir/codec.pt) and in every
checkpoint. The name "auto" picks the pretrained codec when its weights can be had, else the
spectral codec fitted on the corpus (what `make demo` uses).

Long audio is encoded (and decoded) in windows of WINDOW_SECONDS, each preceded by CONTEXT_SECONDS
of the audio before it, whose codes are thrown away: the 24 kHz Encodec is causal (convolutions
padded on the left, an LSTM), so the context warms up its state and a window's codes match
those of one pass over the whole file except at rare near-ties. Memory stays bounded whatever
the length, and on a GPU several windows go through the model as one batch.
"""
import functools
import hashlib
import math
import os
import sys
import warnings

import torch
import torch.nn.functional as F

from nanosuno.common import UserError
from nanosuno.spectral import spectral_from_weights

CODEC_NAMES = ("encodec_24khz", "spectral", "untrained", "auto")
WEIGHTS_FILE = "encodec_24khz-d7cc33bc.th"
WEIGHTS_URL = "https://dl.fbaipublicfiles.com/encodec/v0/" + WEIGHTS_FILE
WEIGHTS_SHA256 = "d7cc33bc"  # start of the file's sha256, as in its name
BANDWIDTH = 6.0         # kbps: 8 codebooks at 75 frames/s
WINDOW_SECONDS = 10     # new audio per window: bounds memory (about 0.3 GB of activations on CPU;
                        # longer windows were no faster there: their buffers go back to the OS each time)
CONTEXT_SECONDS = 1     # audio before a window that warms up the causal model (10% extra compute;
                        # Encodec was trained on 1 s excerpts, so its state reaches back about that far)
UNTRAINED_SEED = 1337
CODES_VERSION = 3       # bump when the codes of given audio change (windows, padding, the untrained
                        # weights, 1x1 convolutions): prepare's token cache is keyed by it


# The shape of every codec's tokens here (Encodec 24 kHz at 6 kbps): what meta.json and checkpoints
# must say of theirs (check_codec_info), with n_codebooks the number modelled, 1..8.
CODEC_SHAPE = {"sample_rate": 24000, "frame_rate": 75, "bandwidth": 6.0, "codebook_size": 1024}
MAX_CODEBOOKS = 8
KNOWN_CODECS = tuple(name for name in CODEC_NAMES if name != "auto")   # ("auto" picks one of them)


def check_codec_info(info):
    """What is wrong with a codec description read from disk (meta.json, a checkpoint): its name must
    be a codec this nanosuno has, its numbers those of that codec. None when it is right."""
    if info.get("name") not in KNOWN_CODECS:
        return f"codec {info.get('name')!r} is not one of this nanosuno's ({', '.join(KNOWN_CODECS)})"
    wrong = [f"{key} {info.get(key)!r} (the codec's is {value!r})" for key, value in CODEC_SHAPE.items()
             if info.get(key) != value or isinstance(info.get(key), bool)]
    n = info.get("n_codebooks")
    if type(n) is not int or not 1 <= n <= MAX_CODEBOOKS:
        wrong.append(f"n_codebooks {n!r} (1..{MAX_CODEBOOKS})")
    return f"codec {info['name']}: " + ", ".join(wrong) if wrong else None


class Codec:
    """An Encodec model with the settings nanosuno uses (24 kHz mono, 6 kbps)."""

    def __init__(self, name, model, device="cpu"):
        self.name = name
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.sample_rate = model.sample_rate                      # 24000
        self.hop_length = math.prod(model.encoder.ratios)         # 320 samples per frame
        self.frame_rate = model.frame_rate                        # 75
        self.bandwidth = BANDWIDTH
        self.n_codebooks = model.quantizer.get_num_quantizers_for_bandwidth(self.frame_rate, BANDWIDTH)
        self.codebook_size = model.quantizer.bins                 # 1024
        self.window = WINDOW_SECONDS * self.frame_rate            # in frames
        self.context = CONTEXT_SECONDS * self.frame_rate
        self.batch_size = 8 if self.device.type == "cuda" else 1  # windows per model call
        self.cache_key = f"{name}-{BANDWIDTH}kbps-v{CODES_VERSION}"  # a token cache under another key is stale

    def info(self, n_codebooks=None):
        """What meta.json and checkpoints record of the codec (n_codebooks: how many are modelled)."""
        return {"name": self.name, "sample_rate": self.sample_rate, "frame_rate": self.frame_rate,
                "bandwidth": self.bandwidth, "n_codebooks": n_codebooks or self.n_codebooks,
                "codebook_size": self.codebook_size}

    def weights(self):
        """The model's weights on the CPU, what codec_from_weights rebuilds this codec from (in
        another process: prepare.py's torchrun ranks)."""
        return {k: v.cpu() for k, v in self.model.state_dict().items()}

    def encode(self, waveform):
        """1-D float waveform at 24 kHz -> codes, int64 (n_codebooks, ceil(samples / 320))."""
        return self.encode_blocks([waveform])

    @torch.inference_mode()
    def encode_blocks(self, blocks):
        """Like encode, for a waveform given as consecutive 1-D blocks (any lengths), so that a long
        file never needs to be in memory at once."""
        hop, context = self.hop_length, self.context * self.hop_length
        batch_samples = self.batch_size * self.window * hop   # new audio in one batch of windows
        pending = torch.zeros(0)   # audio not yet encoded, after `context` samples already encoded
        first, codes = True, []
        for block in blocks:
            block = torch.as_tensor(block, dtype=torch.float32)
            if block.dim() != 1:
                raise ValueError(f"encode expects a 1-D mono waveform, got shape {tuple(block.shape)}")
            pending = torch.cat([pending, block])
            while pending.numel() >= context + batch_samples:
                codes.append(self._encode_windows(pending[:context + batch_samples], first))
                pending, first = pending[batch_samples:], False
        if pending.numel() > (0 if first else context):
            codes.append(self._encode_windows(pending, first))
        if not codes:
            return torch.zeros(self.n_codebooks, 0, dtype=torch.long)
        return torch.cat(codes, dim=1)

    def _encode_windows(self, audio, first):
        """Codes of the new audio in `audio`: everything when it starts the waveform (`first`), else
        what follows its leading `context` samples."""
        context, window = self.context * self.hop_length, self.window * self.hop_length
        starts = range(0, max(audio.numel() - context, 1), window)
        n_full = sum(start + context + window <= audio.numel() for start in starts)
        pieces = []
        if n_full:  # full windows: one batch
            pieces += list(self._encode_batch(audio.unfold(0, context + window, window)[:n_full]))
        if n_full < len(starts):  # the last, shorter window
            pieces += list(self._encode_batch(audio[starts[n_full]:][None]))
        skip = self.context
        return torch.cat([c if first and i == 0 else c[:, skip:] for i, c in enumerate(pieces)], dim=1)

    def _encode_batch(self, windows):
        """(B, samples) -> (B, K, ceil(samples / 320)) codes on the CPU."""
        frames = -(-windows.shape[-1] // self.hop_length)
        # Pad to whole seconds: each new input length costs memory for good (the CPU backend keeps
        # per-shape kernels: about 40 MB each), so lengths come from a small set. The model is
        # causal: the padding changes no frame but the last, partial one.
        windows = F.pad(windows, (0, -windows.shape[-1] % self.sample_rate))
        emb = self.model.encoder(windows[:, None].to(self.device))
        codes = self.model.quantizer.encode(emb, self.frame_rate, self.bandwidth)  # (K, B, frames)
        return codes.transpose(0, 1)[:, :, :frames].cpu()

    @torch.inference_mode()
    def decode(self, codes):
        """Codes (K, frames) or (B, K, frames), K <= 8 (the first K codebooks of the residual stack)
        -> float32 waveform (frames * 320,) or (B, frames * 320)."""
        codes = torch.as_tensor(codes, dtype=torch.long)
        single = codes.dim() == 2
        codes = codes[None] if single else codes
        if codes.dim() != 3 or not 1 <= codes.shape[1] <= self.n_codebooks:
            raise ValueError(f"decode expects (K, frames) or (B, K, frames) with 1 <= K <= "
                             f"{self.n_codebooks}, got shape {tuple(codes.shape)}")
        if codes.numel() and not 0 <= int(codes.min()) <= int(codes.max()) < self.codebook_size:
            raise ValueError(f"codes must lie in [0, {self.codebook_size}), got {int(codes.min())}..{int(codes.max())}")
        frames = codes.shape[2]
        items = []
        for b in range(0, codes.shape[0], self.batch_size):
            pieces = []
            for start in range(0, max(frames - self.context, 1), self.window):
                chunk = codes[b:b + self.batch_size, :, start:start + self.context + self.window]
                audio = self._decode_batch(chunk)
                pieces.append(audio if start == 0 else audio[:, self.context * self.hop_length:])
            items.append(torch.cat(pieces, dim=1))
        waveform = torch.cat(items)[:, :frames * self.hop_length]
        return waveform[0] if single else waveform

    def _decode_batch(self, codes):
        """(B, K, frames) -> (B, frames * 320) float32 on the CPU."""
        frames = codes.shape[-1]
        if frames == 0:
            return torch.zeros(codes.shape[0], 0)
        codes = F.pad(codes, (0, -frames % self.frame_rate))  # whole seconds, as in _encode_batch
        emb = self.model.quantizer.decode(codes.transpose(0, 1).to(self.device))
        return self.model.decoder(emb)[:, 0, :frames * self.hop_length].float().cpu()


class WeightsUnavailable(UserError):
    """The pretrained weights cannot be had; `reason` says why in a few words."""

    def __init__(self, message, reason):
        super().__init__(message)
        self.reason = reason


def load_codec(name, codec_dir=None, device="cpu", fit=None):
    """The codec called `name` (one of CODEC_NAMES) on `device`. The spectral codec is not loaded but
    fitted: `fit()` fits it on the corpus being prepared (prepare.py's; no one else makes one)."""
    if name in ("spectral", "auto") and fit is None:
        raise UserError(f"codec {name} may fit the spectral codec on a corpus: only prepare.py does that")
    if name == "auto":
        try:
            return Codec("encodec_24khz", _pretrained_model(codec_dir), device)
        except WeightsUnavailable as e:  # one line instead of the error, then carry on
            print(f"*** pretrained Encodec unavailable ({e.reason}): using the spectral codec fitted on your "
                  f"corpus ***", file=sys.stderr)
            return fit()
    if name == "spectral":
        return fit()
    if name == "encodec_24khz":
        model = _pretrained_model(codec_dir)
    elif name == "untrained":
        print(f"warning: {untrained_warning(name)}", file=sys.stderr)
        model = _untrained_model()
    else:
        raise UserError(f"unknown codec '{name}'; valid codecs: {', '.join(CODEC_NAMES)}")
    return Codec(name, model, device)


def untrained_warning(name):
    """The warning that goes with the audio of codec `name`: the untrained codec's means nothing ("" for
    the others). load_codec prints it; sample.py and train.py show it with their samples."""
    if name != "untrained":
        return ""
    return "codec 'untrained' has made-up weights, audio quality MEANINGLESS: fine for tests and smoke runs, not for listening"


def codec_from_weights(name, state, device="cpu"):
    """The codec `name` with the weights `state` (a loaded codec's Codec.weights()): how prepare's
    other processes get the codec the first one loaded, without reading, downloading or fitting it again."""
    if name == "spectral":
        return spectral_from_weights(state, device)
    model = _encodec_architecture()
    model.load_state_dict(state)
    return Codec(name, model, device)


def codec_for(info, weights=None, codec_dir=None, device="cpu"):
    """The codec that decodes the tokens `info` describes (meta.json's or a checkpoint's codec): the
    spectral codec from its fitted `weights` (data_dir/codec.pt's, or the checkpoint's codec_weights,
    both checked when read), the others by name. What train's progress samples and sample.py use."""
    if info["name"] != "spectral":
        return load_codec(info["name"], codec_dir, device)
    if weights is None:
        raise UserError("the spectral codec's fitted weights are missing: run prepare.py again")
    return codec_from_weights("spectral", weights, device)


LOOP_FADE_SECONDS = 0.05   # the crossfade at a loop's seam (decode_loop)


def decode_loop(codec, loop):
    """The audio of a loop of codes (K, frames) as it is to sound repeated, with no click where it
    starts again. Decoded as the middle of three copies in one piece, its start follows its own end
    as in playback; and the audio that followed its end there (the next copy's start, where the
    decoder's phase runs on from the end) is crossfaded into its first LOOP_FADE_SECONDS, so the
    last sample leads into the first as it did in the decoded stream."""
    n = loop.shape[1] * codec.hop_length
    audio = codec.decode(torch.cat([loop, loop, loop], dim=1))
    body, after = audio[n:2 * n].clone(), audio[2 * n:]
    fade = min(round(LOOP_FADE_SECONDS * codec.sample_rate), n // 4)
    ramp = 0.5 - 0.5 * torch.cos(torch.linspace(0, math.pi, fade))   # 0 -> 1, a raised cosine
    body[:fade] = after[:fade] * (1 - ramp) + body[:fade] * ramp
    return body


def _hub_dir():
    return os.path.join(torch.hub.get_dir(), "checkpoints")


def _weights_candidates(codec_dir):
    folders = ([codec_dir] if codec_dir else []) + [_hub_dir()]
    return [os.path.join(folder, WEIGHTS_FILE) for folder in folders]


def pretrained_available(codec_dir=None):
    """True iff the pretrained weights file is in codec_dir or torch hub's cache (no network)."""
    return any(os.path.isfile(path) for path in _weights_candidates(codec_dir))


def _encodec_architecture():
    """Encodec 24 kHz with fresh weights; leaves the global random state as it was."""
    from encodec import EncodecModel
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)   # encodec uses the old weight_norm
        torch.manual_seed(UNTRAINED_SEED)
        model = EncodecModel.encodec_model_24khz(pretrained=False)
    model.set_target_bandwidth(BANDWIDTH)
    # oneDNN computes 1x1 convolutions as a matrix product whose summation order depends on the
    # number of threads, so a file encoded with 1 thread differed at near-ties from one encoded with
    # 2 (~2% of the untrained codec's codes on music). torch's matmul, oneDNN's other convolutions
    # and its LSTM give the same result for any thread count (measured for 1..4 threads): with the
    # encoder's 1x1 convolutions as matmuls, codes (and the untrained weights, fitted on encoder
    # output) do not depend on how many processes share the cores, at the same speed.
    for conv in model.encoder.modules():
        if isinstance(conv, torch.nn.Conv1d) and conv.kernel_size == (1,) and conv.groups == 1:
            assert conv.stride == conv.dilation == (1,) and conv.padding == (0,)
            conv._conv_forward = _pointwise_conv
    return model


def _pointwise_conv(x, weight, bias):
    """A 1x1 Conv1d (B, C_in, T) -> (B, C_out, T) as one matrix product."""
    return F.linear(x.transpose(1, 2), weight[:, :, 0], bias).transpose(1, 2)


def _pretrained_model(codec_dir):
    path = next((p for p in _weights_candidates(codec_dir) if os.path.isfile(p)), None)
    if path is None:
        if codec_dir:  # the user named a folder: look only there (and in the cache), never download
            _missing_weights(f"not in codec_dir {codec_dir} nor in {_hub_dir()}")
        try:
            os.makedirs(_hub_dir(), exist_ok=True)
            torch.hub.download_url_to_file(WEIGHTS_URL, os.path.join(_hub_dir(), WEIGHTS_FILE))
        except Exception as e:  # no network, proxy, disk full...: one clear line, not a traceback
            _missing_weights(f"not in {_hub_dir()}, and downloading it failed: {e}")
        path = os.path.join(_hub_dir(), WEIGHTS_FILE)
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    if not sha.hexdigest().startswith(WEIGHTS_SHA256):
        damaged = f"{path} is damaged (sha256 {sha.hexdigest()[:8]}..., expected {WEIGHTS_SHA256}...)"
        raise WeightsUnavailable(f"{damaged}: delete it and fetch it again from {WEIGHTS_URL}", damaged)
    model = _encodec_architecture()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model


def _missing_weights(reason):
    raise WeightsUnavailable(f"the pretrained codec needs its weights file {WEIGHTS_FILE} (93 MB), which is "
                             f"{reason}. Download {WEIGHTS_URL} into {_hub_dir()} (torch hub's cache, set by "
                             f"$TORCH_HOME) or into a folder you name with --codec_dir=FOLDER; or run offline "
                             f"with --codec=spectral (fitted on your corpus: lo-fi, no download)", f"{WEIGHTS_FILE} {reason}")


def _untrained_model():
    model = _encodec_architecture()
    model.load_state_dict(_untrained_state())
    return model


@functools.lru_cache(maxsize=1)
def _untrained_state():
    """Weights of the untrained codec, made once per process (a few seconds).

    A plain random Encodec has empty codebooks (encodec fills them by k-means on its first training
    batch), so every frame would map to code 0. Here each of the 8 codebooks used at 6 kbps is fitted,
    residual by residual, by a few k-means steps on the encoder's output for a fixed 40 s signal of
    tones and noise at many pitches and loudnesses: then music lands on hundreds of codes. Everything
    is seeded, so the weights are the same in every run (and on every machine, up to floating-point
    rounding differences between CPU types)."""
    model = _encodec_architecture()
    with torch.no_grad():
        # in 10 s pieces, one after the other: a 40 s pass would need 1 GB more memory
        residual = torch.cat([model.encoder(piece[None, None])[0].T  # (frames, dim)
                              for piece in _init_signal().split(10 * model.sample_rate)])
        for layer in model.quantizer.vq.layers[:model.quantizer.get_num_quantizers_for_bandwidth(
                model.frame_rate, BANDWIDTH)]:
            codebook = _kmeans(residual, layer.codebook_size)
            layer._codebook.embed.copy_(codebook)
            layer._codebook.embed_avg.copy_(codebook)
            layer._codebook.inited.fill_(1)
            residual = residual - codebook[_nearest(residual, codebook)]
    return {k: v.clone() for k, v in model.state_dict().items()}


def _init_signal(seconds=40, sample_rate=24000, segment_seconds=0.5):
    """A fixed signal: 0.5 s segments, each a harmonic tone (40 Hz .. 5 kHz) plus noise, at a
    loudness between -60 and 0 dB."""
    gen = torch.Generator().manual_seed(UNTRAINED_SEED)
    n_segments, seg = int(seconds / segment_seconds), int(segment_seconds * sample_rate)
    f0 = 40 * 2 ** (7 * torch.rand(n_segments, 1, generator=gen))
    gain = 10 ** (-3 * torch.rand(n_segments, 1, generator=gen))
    noise_level = torch.rand(n_segments, 1, generator=gen)
    t = torch.arange(seg) / sample_rate
    tone = sum(torch.sin(2 * math.pi * f0 * h * t) / h for h in range(1, 6))
    noise = torch.randn(n_segments, seg, generator=gen) * noise_level
    return (0.3 * gain * (tone + noise)).flatten()


def _nearest(x, codebook):
    # the distance encodec's quantizer uses: |x|^2 - 2 x.c + |c|^2, |x|^2 is constant per row
    return (codebook.pow(2).sum(1) - 2 * x @ codebook.T).argmin(1)


def _kmeans(x, k, iters=4):
    """k-means from k evenly spaced rows of x; empty clusters keep their centre."""
    centres = x[torch.linspace(0, len(x) - 1, k).long()]
    for _ in range(iters):
        assign = _nearest(x, centres)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k)[:, None]
        centres = torch.where(counts > 0, sums / counts.clamp(min=1), centres)
    return centres
