"""
Checkpoints: two files in out_dir, each written atomically and read with weights_only=True (plain
tensors, numbers, strings, lists and dicts: no pickled code can run on load):

    ckpt.pt   the best model so far (lowest val loss): what sample.py and fine-tuning use
    last.pt   the latest evaluation's, with the optimizer and random states: what --init_from=resume
              continues (a run that diverges never replaces ckpt.pt with worse weights)

Each holds:

    model            state_dict of GPT
    optimizer        state_dict of AdamW
    model_args       GPTConfig fields (the model's shape lives here, so sample.py never repeats it)
    codec            Codec.info(): {name, sample_rate, frame_rate, bandwidth, n_codebooks, codebook_size}
    codec_weights    the spectral codec's fitted weights (SpectralCodec.weights()), so that sample.py
                     decodes without the data_dir it was fitted in; absent for the other codecs
    config           the Config the run was started with (for reference)
    styles           the style names the model learned (style id i = styles[i]); [] or absent: none
    iter_num, val_loss   the iteration of these weights and their val loss (train loss without a val split)
    best_val_loss        the lowest val loss of the run so far
    rng              one dict per training process (rank r's at r): {torch: ByteTensor, cuda: ByteTensor or
                     None, batches: ByteTensor (the batch sampler's generator)}
    finetuned_from   {path, iter_num} of the checkpoint a fine-tuning run started from, or None
    reference_codes  (K, frames) int64: the start of a val file (8 s), so that sample.py can let you
                     hear what the codec makes of your own music beside the samples

make_checkpoint makes this layout (with_resume_state adds last.pt's optimizer and rng): train.py and
the tests build checkpoints with it, none by hand. The structure is checked on load (check_structure):
a valid torch file of another structure, or weights that are NaN or inf, end in one line, not in a
KeyError deep inside train.py or sample.py.
"""
import dataclasses
import os

import torch

from nanosuno.codec import check_codec_info
from nanosuno.common import KeepWriteError, UserError, atomic_write
from nanosuno.model import GPT, GPTConfig
from nanosuno.spectral import spectral_from_weights

CKPT_NAME = "ckpt.pt"   # the best model
LAST_NAME = "last.pt"   # the latest, for resuming


def checkpoint_path(out_dir, last=False):
    return os.path.join(out_dir, LAST_NAME if last else CKPT_NAME)


def make_checkpoint(model, codec, iter_num, val_loss, best_val_loss, config=None, styles=(), train_seconds=0.0,
                    baselines=None, finetuned_from=None, reference_codes=None, codec_weights=None):
    """A checkpoint of the layout above (what sampling and fine-tuning need) of a GPT at iter_num:
    its weights and shape, codec (Codec.info()) and the rest as named there. config: the run's Config
    (None: none recorded); codec_weights only for the fitted spectral codec."""
    ckpt = {"model": model.state_dict(), "model_args": dataclasses.asdict(model.config), "codec": codec,
            "config": dataclasses.asdict(config) if config is not None else {}, "styles": list(styles),
            "iter_num": iter_num, "val_loss": val_loss, "best_val_loss": best_val_loss, "train_seconds": train_seconds,
            "baselines": baselines, "finetuned_from": finetuned_from, "reference_codes": reference_codes}
    if codec_weights is not None:   # the fitted codec: sample.py decodes with it, no data_dir needed
        ckpt["codec_weights"] = codec_weights
    return ckpt


def with_resume_state(ckpt, optimizer_state, rng):
    """The checkpoint with what resuming needs on top (last.pt's): the optimizer's state dict and
    every process's random states (rng, as the module doc says)."""
    return {**ckpt, "optimizer": optimizer_state, "rng": rng}


def save_checkpoint(out_dir, ckpt, last=False):
    """Write out_dir's best (ckpt.pt) or, with last, latest (last.pt) checkpoint. Weights that are NaN
    or inf are never written: they would replace a good model with one that cannot be used."""
    if not weights_finite(ckpt["model"]):
        raise ValueError("refusing to save a checkpoint whose weights hold NaN or inf")
    os.makedirs(out_dir, exist_ok=True)

    def write(tmp):
        with open(tmp, "wb") as f:
            kept = KeepWriteError(f)
            try:
                torch.save(ckpt, kept)
            except RuntimeError:
                if kept.error:  # torch's "unexpected pos" hides why a write failed (a full disk...)
                    raise kept.error
                raise
    atomic_write(checkpoint_path(out_dir, last), write)


def weights_finite(state):
    """True when every floating-point tensor of a state dict is finite."""
    return all(torch.isfinite(v).all() for v in state.values() if torch.is_floating_point(v))


def load_checkpoint(out_dir, device="cpu", resume=False):
    """out_dir's best checkpoint, or with resume its latest (with the optimizer and random states),
    its structure checked."""
    path = checkpoint_path(out_dir, last=resume)
    if not os.path.exists(path):
        raise UserError(f"no checkpoint at {path}: train first (python train.py config/tiny.py --out_dir={out_dir})")
    return read_checkpoint(path, device, resume)


def read_checkpoint(path, device="cpu", resume=False):
    """The checkpoint file at path, its structure checked (resume: with the optimizer and random states)."""
    if not os.path.exists(path):
        raise UserError(f"no checkpoint file {path}: give a checkpoint that train.py wrote, or train first")
    if os.path.isdir(path):
        raise UserError(f"checkpoint {path} is a folder, not a file: give the ckpt.pt inside it, or remove it")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # truncated or foreign file: say which and what to do
        with open(path, "rb") as f:   # torch.save writes a zip archive: one starts with "PK\3\4"
            kind = "truncated or damaged" if f.read(4) == b"PK\3\4" else "not a file torch.save wrote"
        raise UserError(f"cannot load checkpoint {path}: it is {kind} ({type(e).__name__}: {e}); give a "
                        f"checkpoint that train.py wrote, or train again")
    problem = check_structure(ckpt, resume)
    if problem:
        raise UserError(f"{path} is not a nanosuno checkpoint ({problem}); train again or use another checkpoint")
    return ckpt


def check_structure(ckpt, resume=False):
    """What is missing or of the wrong type in a loaded checkpoint (see the module doc), or None.
    The model's shape must be one GPTConfig accepts (GPTConfig.check)."""
    def has(container, key, kind):
        return isinstance(container, dict) and isinstance(container.get(key), kind) and not isinstance(container.get(key), bool)
    if not isinstance(ckpt, dict):
        return f"a {type(ckpt).__name__}, not a dict"
    for key, kind in (("model", dict), ("model_args", dict), ("codec", dict), ("iter_num", int), ("best_val_loss", float)):
        if not has(ckpt, key, kind):
            return f"no {key} of type {kind.__name__}"
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in ckpt["model"].items()):
        return "model holds something else than named tensors"
    if not weights_finite(ckpt["model"]):
        return "its weights hold NaN or inf: the run that wrote it diverged"
    if "val_loss" in ckpt and not isinstance(ckpt["val_loss"], float):
        return "val_loss is not a number"
    args = ckpt["model_args"]
    fields = {f.name for f in dataclasses.fields(GPTConfig)}
    if not set(args) <= fields or not has(args, "codebook_size", int) or args["codebook_size"] < 1:
        return f"model_args {sorted(args)} are not GPTConfig's {sorted(fields)} with a codebook_size"
    try:
        GPTConfig(**args).check()
    except ValueError as e:
        return f"model_args: {e}"
    styles, n_styles = ckpt.get("styles"), args.get("n_styles", 0)
    if not (isinstance(styles, list) and all(isinstance(s, str) and s for s in styles) and len(styles) == n_styles):
        return f"styles {styles!r} are not the names of its {n_styles!r} styles"
    for key, kind in (("name", str), ("sample_rate", int), ("frame_rate", int), ("bandwidth", (int, float)),
                      ("n_codebooks", int), ("codebook_size", int)):
        if not has(ckpt["codec"], key, kind):
            return f"codec has no {key}"
    problem = check_codec_info(ckpt["codec"])
    if problem:
        return problem
    if (ckpt["codec"]["codebook_size"], ckpt["codec"]["n_codebooks"]) != (args["codebook_size"], args.get("n_codebooks")):
        return (f"its model has {args.get('n_codebooks')!r} codebooks of {args['codebook_size']} codes, its codec "
                f"{ckpt['codec']['n_codebooks']} of {ckpt['codec']['codebook_size']}")
    if (ckpt["codec"]["name"] == "spectral") != ("codec_weights" in ckpt):
        return "the spectral codec comes with its codec_weights, no other codec does"
    if "codec_weights" in ckpt:
        try:
            spectral_from_weights(ckpt["codec_weights"])
        except ValueError as e:
            return f"codec_weights: {e}"
    reference = ckpt.get("reference_codes")   # (absent before checkpoints carried it)
    if reference is not None and not (isinstance(reference, torch.Tensor) and reference.dtype == torch.int64
                                      and reference.dim() == 2 and reference.shape[0] == args.get("n_codebooks")
                                      and (reference.numel() == 0 or 0 <= int(reference.min()) <= int(reference.max())
                                           < args["codebook_size"])):
        return "reference_codes are not codes (n_codebooks, frames) of its codebooks"
    if resume:
        states = ckpt.get("rng")   # one dict of states per process
        if not has(ckpt, "optimizer", dict) or not has(ckpt, "rng", list) or not all(isinstance(s, dict) for s in states):
            return "no optimizer or rng (random states): it cannot be resumed"
        if not all(has(s, key, torch.Tensor) for s in states for key in ("torch", "batches")):
            return "rng has no torch and batches states"
    return None


def load_weights(model, ckpt):
    """Put a checkpoint's weights into a model built from its model_args."""
    # torch.compile saves parameters as '_orig_mod.x'; accept those checkpoints too
    state = {k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # missing, unexpected or misshapen tensors
        first = str(e).strip().splitlines()[-1].strip()
        raise UserError(f"the checkpoint's weights do not fit the model its model_args describe ({first}); "
                        f"train again or use another checkpoint")


def model_from_checkpoint(ckpt, device="cpu"):
    """Rebuild the model from a checkpoint's shape and weights."""
    model = GPT(GPTConfig(**ckpt["model_args"]))
    load_weights(model, ckpt)
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
