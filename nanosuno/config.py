"""
One config system for prepare.py, train.py and sample.py (nanoGPT's habit, made strict):

    python train.py config/small.py --batch_size=4 --compile=False

Defaults live in the `Config` dataclass below (the model's settings, with their defaults and valid
values, are GPTConfig's: model.py). A bare argument is a config file: plain Python
assignments (`n_layer = 6`). `--key=value` overrides come after it and win. Every key is
checked against the dataclass: unknown keys are rejected with the list of valid ones, values
must match the field's type (ints are accepted for floats; `None` only where a field allows it)
and lie in the field's valid range (RULES below, and the cross-setting checks of check_together),
with the range in the message. All three commands share the same keys, so one config file serves
the whole pipeline; each command reads the ones it needs.

Config files are Python and are executed (nanoGPT's convention): only run config files you trust.
"""
import ast
import dataclasses
import difflib
import math
import os
import re
import sys
import types
import typing
from dataclasses import dataclass

from nanosuno.baselines import prev_frame_gain
from nanosuno.codec import CODEC_NAMES
from nanosuno.common import UserError, not_a_file
from nanosuno.decode import DECODE_DTYPES
from nanosuno.generate import SAMPLING_RULES
from nanosuno.hardware import DTYPES
from nanosuno.model import GPTConfig

MAX_CONFIG_BYTES = 1 << 20  # a config file holds a few settings: more is another file given by mistake


# The model's settings: GPTConfig's fields (model.py), with its defaults, but for the two that the data
# decides (its codebook size and its number of styles). Stored in the checkpoint; sample.py never needs them.
MODEL_SETTINGS = tuple(f.name for f in dataclasses.fields(GPTConfig) if f.name not in ("codebook_size", "n_styles"))
_ModelSettings = dataclasses.make_dataclass("_ModelSettings", [
    (f.name, f.type, dataclasses.field(default=f.default)) for f in dataclasses.fields(GPTConfig) if f.name in MODEL_SETTINGS])


def model_config(cfg, codebook_size, n_styles=0):
    """The GPTConfig of a run's Config: its model settings, and what the data decides."""
    return GPTConfig(**{k: getattr(cfg, k) for k in MODEL_SETTINGS}, codebook_size=codebook_size, n_styles=n_styles)


def decide_bigram(cfg, train_tokens, train_files, codebook_size):
    """cfg for a new model, its bigram setting decided by bigram_min_gain on the train split, and the
    previous-frame gain it was decided by (baselines.prev_frame_gain; None when not measured)."""
    if not (cfg.bigram and cfg.bigram_min_gain):
        return cfg, None
    gain = prev_frame_gain(train_tokens, train_files, codebook_size, cfg.n_codebooks)
    return dataclasses.replace(cfg, bigram=gain >= cfg.bigram_min_gain), gain


@dataclass
class Config(_ModelSettings):
    # (the model's settings come first: MODEL_SETTINGS, from GPTConfig, above)
    # --- data -------------------------------------------------------------------------------
    input_dir: str = "data/wavs"        # audio to prepare (wav, flac, ogg, mp3), searched recursively
    data_dir: str = "data/tokens"       # where prepare writes train.bin, val.bin, meta.json
    out_dir: str = "out"                # checkpoints, logs, plots, samples
    val_fraction: float = 0.1           # share of files (not frames) held out for validation
    # "folders": a file's style is the name of its first-level folder under input_dir (files directly
    # in input_dir have none); "none": no styles, the model is unconditional
    styles: str = "folders"
    # --- codec ------------------------------------------------------------------------------
    # prepare.py: None = "encodec_24khz" (pretrained; an error when its weights cannot be had);
    # "spectral" = a codec fitted on the corpus's train split, no download, lo-fi; "untrained" =
    # Encodec's architecture, no download, audio quality meaningless (tests, smoke runs); "auto" =
    # the pretrained codec when its weights are on disk or can be downloaded, else "spectral",
    # announced in one line. train/sample: None or "auto" = the codec the data/checkpoint was made
    # with; a name that differs from it is refused.
    codec: typing.Optional[str] = None
    codec_dir: typing.Optional[str] = None  # folder holding encodec_24khz-d7cc33bc.th (default: torch hub cache)
    # --- training ---------------------------------------------------------------------------
    init_from: str = "scratch"          # "scratch", "resume" (from out_dir/ckpt.pt) or a checkpoint to fine-tune
    overwrite: bool = False             # a new run (scratch or fine-tune) may replace the checkpoint and log already in out_dir
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_iters: int = 5000
    # a wall-clock budget instead ("what do I get in 30 minutes?"): training ends, evaluated and saved,
    # once this many minutes are spent, the learning rate decaying to min_lr as they are; max_iters and
    # lr_decay_iters are then not used. None = train for max_iters
    max_minutes: typing.Optional[float] = None
    learning_rate: float = 2e-3         # AdamW's, for the code embeddings and the heads
    muon_lr: float = 0.02               # Muon's, for the blocks' weight matrices (see nanosuno/optim.py)
    bigram_lr: float = 0.0              # AdamW's for the bigram table; 0 = kept at its counts (measured better)
    # a new model gets the bigram table (bigram = True) only when the previous frame predicts the train
    # split at least this many nats per token better than the unigram does (decide_bigram); 0 = always.
    # Where one frame tells little about the next, the table slows what the transformer learns
    bigram_min_gain: float = 0.0
    min_lr: float = 2e-4                # where the cosine decay ends (Muon's lr ends at the same fraction)
    warmup_iters: int = 100
    lr_decay_iters: int = 5000          # cosine decay reaches min_lr here (usually = max_iters)
    weight_decay: float = 0.0           # decoupled, on every weight matrix; 0 = off (as bench.py learn measured it)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0              # 0 disables
    eval_interval: int = 250
    eval_iters: int = 20
    log_interval: int = 10
    sample_every: int = 1               # write a short progress sample every this many evaluations (0 = off)
    always_save_checkpoint: bool = False  # ckpt.pt follows every evaluation even if val did not improve (last.pt always does)
    cfg_dropout: float = 0.2            # with styles: share of training windows shown as "no style"
    # --- system -----------------------------------------------------------------------------
    device: str = "auto"                # auto = cuda, then mps, then cpu
    dtype: str = "auto"                 # training: auto = bfloat16 where supported (else float16 on cuda), float32, ...
    compile: typing.Optional[bool] = None  # None = on for CUDA, off elsewhere
    seed: int = 1337
    # --- sampling ---------------------------------------------------------------------------
    seconds: float = 10.0               # length of each generated piece
    num_samples: int = 1
    prompt: typing.Optional[str] = None  # a WAV to continue
    keep_prompt: bool = True            # include the prompt's audio in the output
    temperature: float = 1.0            # 0 = greedy
    top_k: int = 250                    # 1..codebook_size
    top_p: float = 0.0                  # nucleus sampling; 0 = off
    # longer than the context (block_size steps): when the KV cache is full, drop this fraction of
    # it from the start and re-read the rest; smaller = more context kept, more re-reading
    context_stride: float = 0.25
    sample_dir: typing.Optional[str] = None  # WAVs, spectrograms and index.html (default: out_dir/samples)
    # precision of generation: float32, bfloat16, or int8 (bfloat16 with int8 weight matrices); auto =
    # int8 on a CPU, bfloat16 on a GPU: the fastest within 0.005 nats of float32 (bench.py decode_quality)
    decode_dtype: str = "auto"
    # a seamless loop of this many seconds per sample instead of a piece of `seconds` (rounded to whole
    # codec frames; with bpm, to whole beats): index.html plays it repeated
    loop_seconds: typing.Optional[float] = None
    bpm: typing.Optional[float] = None    # with loop_seconds: the loop is a whole number of beats at this tempo
    style: typing.Optional[str] = None  # a style the checkpoint knows, or "a,b" (num_samples each); None = any
    # with a style: classifier-free guidance, logits = uncond + cfg_coef * (cond - uncond); 1 = none
    cfg_coef: float = 3.0


def _auto_or(choices):
    """'auto, a, b or c': a setting that is auto or one of choices, in words."""
    *first, last = ("auto", *choices)
    return ", ".join(first) + " or " + last


# The valid values of every setting that has limits (the model's from GPTConfig.RULES): (the rule in
# words, test). Floats must also be finite. check_value applies these to every value given;
# check_together checks settings that limit each other. A value outside its range ends in one line:
# "setting 'x' must be <rule>, got <value>".
RULES = {
    "input_dir": ("a folder name", lambda v: v != ""),
    "data_dir": ("a folder name", lambda v: v != ""),
    "out_dir": ("a folder name", lambda v: v != ""),
    "sample_dir": ("None or a folder name", lambda v: v != ""),
    "prompt": ("None or a file name", lambda v: v != ""),
    "val_fraction": ("in [0, 1)", lambda v: 0 <= v < 1),
    "styles": ("'folders' (a file's first folder under input_dir) or 'none'", lambda v: v in ("folders", "none")),
    "codec": ("None or one of " + ", ".join(CODEC_NAMES), lambda v: v is None or v in CODEC_NAMES),
    **{key: rule for key, rule in GPTConfig.RULES.items() if key in MODEL_SETTINGS},
    "init_from": ("'scratch', 'resume' or the path of a checkpoint to fine-tune", lambda v: v != ""),
    "batch_size": ("in 1..65536", lambda v: 1 <= v <= 65536),
    "gradient_accumulation_steps": ("in 1..65536", lambda v: 1 <= v <= 65536),
    "max_iters": ("in 1..10**9", lambda v: 1 <= v <= 10 ** 9),
    "max_minutes": ("None or in (0, 10**6]", lambda v: 0 < v <= 10 ** 6),
    "learning_rate": ("> 0", lambda v: v > 0),
    "muon_lr": ("> 0", lambda v: v > 0),
    "bigram_lr": (">= 0", lambda v: v >= 0),
    "bigram_min_gain": (">= 0 (0 = the table whenever bigram is True)", lambda v: v >= 0),
    "min_lr": (">= 0", lambda v: v >= 0),
    "warmup_iters": (">= 0", lambda v: v >= 0),
    "lr_decay_iters": (">= 0", lambda v: v >= 0),
    "weight_decay": (">= 0", lambda v: v >= 0),
    "beta1": ("in [0, 1)", lambda v: 0 <= v < 1),
    "beta2": ("in [0, 1)", lambda v: 0 <= v < 1),
    "grad_clip": (">= 0 (0 = off)", lambda v: v >= 0),
    "eval_interval": (">= 1", lambda v: v >= 1),
    "eval_iters": ("in 1..10**6", lambda v: 1 <= v <= 10 ** 6),
    "log_interval": (">= 1", lambda v: v >= 1),
    "sample_every": (">= 0 (0 = off)", lambda v: v >= 0),
    "cfg_dropout": ("in [0, 1]", lambda v: 0 <= v <= 1),
    "device": ("auto, cpu, mps, cuda or cuda:N", lambda v: re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v)),
    "dtype": (_auto_or(DTYPES), lambda v: v == "auto" or v in DTYPES),
    "seed": ("in 0..2**32-1", lambda v: 0 <= v < 2 ** 32),
    "seconds": ("> 0", lambda v: v > 0),          # (sample.py's memory check limits seconds x num_samples)
    **SAMPLING_RULES,   # temperature, top_p, num_samples, context_stride, cfg_coef: generate.py's
    "top_k": (">= 1", lambda v: v >= 1),
    "decode_dtype": (_auto_or(DECODE_DTYPES), lambda v: v == "auto" or v in DECODE_DTYPES),
    "style": ("None or style names separated by commas", lambda v: all(name.strip() for name in v.split(","))),
    "loop_seconds": ("None or > 0", lambda v: v > 0),
    "bpm": ("None or in (0, 1000]", lambda v: 0 < v <= 1000),
}


def valid_keys():
    return [f.name for f in dataclasses.fields(Config)]


def _allowed_types(key):
    hint = typing.get_type_hints(Config)[key]
    args = typing.get_args(hint)
    return args if args else (hint,)


def check_value(key, value):
    """Return value converted to the field's type, or raise UserError when it is not of that type
    or outside the field's valid range."""
    if key not in valid_keys():
        close = difflib.get_close_matches(key, valid_keys(), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UserError(f"unknown setting '{key}'{hint}; valid settings: {', '.join(valid_keys())}")
    value = _convert(key, value)
    if isinstance(value, float) and not math.isfinite(value):
        rule = f" {RULES[key][0]}" if key in RULES else ""
        raise UserError(f"setting '{key}' must be a finite number{rule}, got {value}")
    if value is not None and key in RULES and not RULES[key][1](value):
        raise UserError(f"setting '{key}' must be {RULES[key][0]}, got {value!r}")
    return value


def _convert(key, value):
    """value as the field's type (an int where a float is meant becomes a float), or UserError."""
    allowed = _allowed_types(key)
    if value is None and type(None) in allowed:
        return None
    if isinstance(value, bool):  # bool is an int subclass: only accept it where bool is meant
        if bool in allowed:
            return value
    elif isinstance(value, int) and (int in allowed or float in allowed):
        return value if int in allowed else float(value)
    elif isinstance(value, float) and float in allowed:
        return value
    elif isinstance(value, str) and str in allowed:
        return value
    names = " or ".join("None" if t is type(None) else t.__name__ for t in allowed)
    raise UserError(f"setting '{key}' must be {names}, got {value!r} ({type(value).__name__})")


def check_together(settings):
    """Settings that limit each other (settings: a dict of all of them), in one line each; the model's
    are GPTConfig.check's."""
    s = settings
    try:
        GPTConfig(**{key: s[key] for key in MODEL_SETTINGS}).check()
    except ValueError as e:
        raise UserError(str(e))
    if s["min_lr"] > s["learning_rate"]:
        raise UserError(f"min_lr ({s['min_lr']}) must not exceed learning_rate ({s['learning_rate']})")


def _parse_literal(text):
    """'3' -> 3, 'True' -> True, 'None' -> None, '1e-3' -> 0.001, 'nan' -> nan (then refused as not
    finite, not as a string), anything else stays a string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        pass
    try:
        return float(text)
    except ValueError:
        return text


def _read_config_file(path):
    """The settings a config file assigns. Only a regular file is read (a named pipe would block,
    /dev/zero never ends), and at most MAX_CONFIG_BYTES of it."""
    try:
        kind = not_a_file(os.stat(path).st_mode)
        if kind:
            raise UserError(f"config file {path} is not a regular file ({kind}): name a .py file of settings")
        with open(path, "rb") as f:
            source = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise UserError(f"cannot read config file {path}: {e.strerror}")
    if len(source) > MAX_CONFIG_BYTES:
        raise UserError(f"config file {path} is larger than {MAX_CONFIG_BYTES >> 20} MB: a config file holds a "
                        f"few settings (n_layer = 6); is it the right file?")
    namespace = {}
    try:
        exec(compile(source, path, "exec"), namespace)  # config files are Python, run as such (as in nanoGPT)
    except Exception as e:
        raise UserError(f"config file {path} failed: {type(e).__name__}: {e}")
    return {k: v for k, v in namespace.items()
            if not k.startswith("_") and not isinstance(v, (types.ModuleType, types.FunctionType, type))}


def load_config(argv=(), **overrides):
    """Build a Config from a config file and --key=value arguments; keyword overrides come last
    (handy in tests). Prints nothing; scripts print the settings they use."""
    if "--help" in argv or "-h" in argv:
        print(settings_help())
        sys.exit(0)
    settings, seen_override, on_command_line = {}, False, set()
    for arg in argv:
        if arg.startswith("--"):
            seen_override = True
            key, sep, text = arg[2:].partition("=")
            if not sep:
                raise UserError(f"expected --key=value, got '{arg}'")
            value = _parse_literal(text)
            if key in valid_keys() and str in _allowed_types(key) and not isinstance(value, (str, type(None))):
                value = text  # --out_dir=2024 means the folder '2024': strings need no quotes
            settings[key] = check_value(key, value)
            on_command_line.add(key)
        else:
            if seen_override:
                raise UserError(f"config file '{arg}' must come before --key=value overrides")
            for key, value in _read_config_file(arg).items():
                try:
                    settings[key] = check_value(key, value)
                except UserError as e:
                    raise UserError(f"{arg}: {e}")
    for key, value in overrides.items():
        settings[key] = check_value(key, value)
    cfg = Config(**settings)
    check_together(dataclasses.asdict(cfg))
    # the settings set on purpose (not settings themselves): a default value given explicitly still
    # means "this value". A config file describes runs in general; the command line this one.
    cfg.given, cfg.on_command_line = frozenset(settings), frozenset(on_command_line | set(overrides))
    return cfg


def settings_help():
    """Every setting with its default, for --help."""
    lines = ["usage: python <prepare|train|sample>.py [config_file.py] [--key=value ...]", "",
             "A config file is Python and is executed, as in nanoGPT: only run config files you trust.", "",
             "settings (default):"]
    lines += [f"  --{f.name}={f.default!r}" for f in dataclasses.fields(Config)]
    return "\n".join(lines)
