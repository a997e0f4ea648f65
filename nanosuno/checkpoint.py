"""
Checkpoints: one file, out_dir/ckpt.pt, written atomically and read with weights_only=True
(plain tensors, numbers, strings, lists and dicts: no pickled code can run on load).

    model            state_dict of GPT
    optimizer        state_dict of AdamW
    model_args       GPTConfig fields (the model's shape lives here, so sample.py never repeats it)
    codec            Codec.info(): {name, sample_rate, frame_rate, bandwidth, n_codebooks, codebook_size}
    config           the Config the run was started with (for reference)
    iter_num, best_val_loss
    rng              {torch: ByteTensor, cuda: [ByteTensor], batches: ByteTensor (the batch sampler's generator)}
"""
import os

import torch

from nanosuno.common import UserError, atomic_write
from nanosuno.model import GPT, GPTConfig

CKPT_NAME = "ckpt.pt"


def checkpoint_path(out_dir):
    return os.path.join(out_dir, CKPT_NAME)


def save_checkpoint(out_dir, ckpt):
    os.makedirs(out_dir, exist_ok=True)
    atomic_write(checkpoint_path(out_dir), lambda tmp: torch.save(ckpt, tmp))


def load_checkpoint(out_dir, device="cpu"):
    path = checkpoint_path(out_dir)
    if not os.path.exists(path):
        raise UserError(f"no checkpoint at {path}: train first (python train.py config/tiny.py --out_dir={out_dir})")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # truncated or foreign file: say which and what to do
        raise UserError(f"cannot load checkpoint {path} ({type(e).__name__}: {e}); train again or point out_dir elsewhere")


def model_from_checkpoint(ckpt, device="cpu"):
    """Rebuild the model from a checkpoint's shape and weights."""
    model = GPT(GPTConfig(**ckpt["model_args"]))
    state = ckpt["model"]
    # torch.compile saves parameters as '_orig_mod.x'; accept those checkpoints too
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
    model.load_state_dict(state)
    return model.to(device)


def check_codec_setting(setting, made_with, what):
    """The codec setting of train/sample, when it names a codec, must name the one that the data or
    checkpoint was made with (`what` says which, e.g. "out/ckpt.pt was trained on")."""
    if setting not in (None, "auto") and setting != made_with:
        raise UserError(f"codec mismatch: {what} {made_with} tokens but codec={setting} was given; "
                        f"leave codec unset to use {made_with}")


def check_codec(expected, found, what):
    """Refuse to mix codecs: tokens of one codec mean nothing to a model of another."""
    keys = ("name", "bandwidth", "codebook_size")
    if any(expected.get(k) != found.get(k) for k in keys):
        desc = lambda c: f"{c.get('name')} at {c.get('bandwidth')} kbps, {c.get('codebook_size')} codes"
        raise UserError(f"codec mismatch: {what} uses {desc(found)} but this run uses {desc(expected)}; "
                        "prepare and train with the same codec")
