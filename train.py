"""
Train the transformer on the token files that prepare.py wrote.

    python train.py config/small.py                        # one process
    python train.py config/tiny.py --max_iters=200         # a few minutes on a laptop CPU
    torchrun --standalone --nproc_per_node=8 train.py config/small.py   # DDP on one node
    python train.py --init_from=out/ckpt.pt --data_dir=mine --out_dir=out-mine   # fine-tune

Writes out_dir/ckpt.pt (the best model: lowest val loss), out_dir/last.pt (the latest evaluation's,
which --init_from=resume continues), out_dir/log.jsonl and out_dir/loss.png.
A scratch run refuses an out_dir that holds a checkpoint unless --overwrite=True, and even then
replaces the old files only once its settings, data and model are checked. One run at a time per
out_dir (a lock).
"""
import dataclasses
import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass

from nanosuno.common import require_dependencies

require_dependencies()  # one line, not a traceback, when torch and torchaudio do not load together

import numpy as np
import torch
from torch.distributed import destroy_process_group, init_process_group
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from nanosuno.audio import save_wav
from nanosuno.baselines import best_baseline, bits_per_second, prev_frame_probs
from nanosuno.checkpoint import (CKPT_NAME, LAST_NAME, check_codec, check_codec_setting, checkpoint_path,
                                 load_checkpoint, load_weights, make_checkpoint, read_checkpoint, save_checkpoint,
                                 weights_finite, with_resume_state)
from nanosuno.codec import codec_for, untrained_warning
from nanosuno.common import UserError, lock_folder, refuse_folders, remove_stale_temporaries, run_cli, writing
from nanosuno.config import MODEL_SETTINGS, decide_bigram, load_config, model_config
from nanosuno.data import Batches, codec_info, read_codec_weights, read_meta, style_names
from nanosuno.evaluate import estimate_losses
from nanosuno.generate import generate
from nanosuno.hardware import autocast, device_type, peak_flops, pick_device, pick_dtype
from nanosuno.model import GPT, GPTConfig, TRAINING_ONLY
from nanosuno.optim import train_step
from nanosuno.pages import write_progress_page
from nanosuno.plots import save_loss_plot, save_spectrogram

PROGRESS_SECONDS = 4.0   # length of the progress samples written at evaluations (sample_every)
REFERENCE_SECONDS = 8.0  # length of the val excerpt every checkpoint carries (reference_excerpt)
LOG_NAME, PLOT_NAME = "log.jsonl", "loss.png"   # in out_dir, beside the checkpoints


@dataclass
class Processes:
    """What this process is and runs on: under torchrun, one of `world` processes (rank; local_rank: its
    device's index on this node); otherwise the only one."""
    ddp: bool
    rank: int
    local_rank: int
    world: int
    device: str
    device_type: str      # cuda, mps or cpu
    dtype: torch.dtype
    accum_steps: int      # micro-batches per iteration in this process (gradient_accumulation_steps // world)

    @property
    def master(self):     # rank 0 evaluates, logs and writes for all
        return self.rank == 0


@dataclass
class Data:
    """What training reads from data_dir."""
    meta: dict                   # meta.json
    codec: dict                  # the codec's info (codec_info) at n_codebooks
    style_names: list            # the styles: style id i is style_names[i]
    codec_weights: dict | None   # the fitted spectral codec's weights; None for the other codecs
    train: Batches
    val: Batches                 # (false when the val split is empty: no validation)
    baseline: list | None        # per codebook, the best simple baseline's val loss (the yardstick)
    reference: torch.Tensor      # (K, frames): the val excerpt every checkpoint carries


@dataclass
class TrainState:
    """Where training stands: what a checkpoint records beside the weights."""
    iter_num: int = 0
    best_val_loss: float = float("inf")
    finetuned_from: dict | None = None   # {path, iter_num} of the checkpoint fine-tuned
    seconds_before: float = 0.0          # trained by the runs this one resumes
    t_start: float = 0.0                 # when this run's training began (train_loop sets it)

    def train_seconds(self):
        return self.seconds_before + time.time() - self.t_start


def get_lr(it, cfg, budget_used=None):
    """Linear warmup over warmup_iters, then cosine decay to min_lr: at lr_decay_iters, or with a time
    budget (max_minutes) as the budget is used up (budget_used: the fraction of it spent so far), so
    that a run for N minutes ends at min_lr whatever this machine's speed."""
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if budget_used is not None:
        ratio = min(budget_used, 1.0)
    elif it > cfg.lr_decay_iters:
        return cfg.min_lr
    else:
        ratio = (it - cfg.warmup_iters) / max(1, cfg.lr_decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


def eval_line(iter_num, record, meta):
    """One line per evaluation: the losses, and how they compare with the simple baselines and
    the codec's raw bit rate, e.g.
    iter 250: train 4.4102, val 4.3391 (best simple baseline 4.9546: -0.6155; 3,756 bit/s, codec 6,000)"""
    line = f"iter {iter_num}: train {record['train_loss']:.4f}"
    if "val_loss" in record:
        line += f", val {record['val_loss']:.4f}"
    if "baseline_loss" in record:
        K = len(record["val_codebook_losses"])
        raw = K * meta["frame_rate"] * math.log2(meta["codebook_size"])
        line += (f" (best simple baseline {record['baseline_loss']:.4f}: "
                 f"{record['val_loss'] - record['baseline_loss']:+.4f}; "
                 f"{record['val_bits_per_second']:,.0f} bit/s, codec {raw:,.0f})")
    per_codebook = record.get("val_codebook_losses", record["train_codebook_losses"])
    return line + f"; per codebook {' '.join(f'{v:.2f}' for v in per_codebook)}"


def write_progress_sample(cfg, model, codec, iter_num, val_loss):
    """PROGRESS_SECONDS of music from the model as it is now (fixed seed, so successive samples
    differ only by what the model learned) -> out_dir/progress/iter_NNNNNN.wav + spectrogram, and
    progress/index.html lists every one in the folder, newest first: listen to the model improve."""
    folder = os.path.join(cfg.out_dir, "progress")
    with writing(folder):
        os.makedirs(folder, exist_ok=True)
    model.eval()
    codes = generate(model, round(PROGRESS_SECONDS * codec.frame_rate), seed=cfg.seed)[0]
    model.train()
    waveform, name = codec.decode(codes), f"iter_{iter_num:06d}"
    save_wav(os.path.join(folder, f"{name}.wav"), waveform, codec.sample_rate)
    save_spectrogram(os.path.join(folder, f"{name}.png"), waveform, codec.sample_rate,
                     f"iteration {iter_num}" + (f", val loss {val_loss:.3f}" if val_loss is not None else ""))
    write_progress_page(folder, cfg.out_dir, PROGRESS_SECONDS, cfg.seed, untrained_warning(codec.name))


def setup_processes(cfg):
    """torchrun sets RANK/WORLD_SIZE: then one process per device, joined into a process group;
    otherwise one process. Returns what this process is and runs on."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    if ddp:
        rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
        use_cuda = device_type(pick_device(cfg.device)) == "cuda"
        init_process_group(backend="nccl" if use_cuda else "gloo")
        device = f"cuda:{local_rank}" if use_cuda else "cpu"
        if use_cuda:
            torch.cuda.set_device(device)
        if cfg.gradient_accumulation_steps % world:
            raise UserError(f"gradient_accumulation_steps ({cfg.gradient_accumulation_steps}) must be a "
                            f"multiple of the number of processes ({world})")
    else:
        rank, local_rank, world, device = 0, 0, 1, pick_device(cfg.device)
    torch.manual_seed(cfg.seed + rank)
    if device_type(device) == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Processes(ddp=ddp, rank=rank, local_rank=local_rank, world=world, device=device, device_type=device_type(device),
                     dtype=pick_dtype(cfg.dtype, device), accum_steps=cfg.gradient_accumulation_steps // world)


def load_data(cfg, proc):
    """meta.json, the codec it records (and its fitted weights, for a codec fitted on the corpus), its
    styles, and batch samplers over the train and val splits."""
    meta = read_meta(cfg.data_dir)
    if cfg.n_codebooks > meta["n_codebooks"]:
        raise UserError(f"n_codebooks={cfg.n_codebooks} but {cfg.data_dir} holds {meta['n_codebooks']}: "
                        f"use --n_codebooks={meta['n_codebooks']} or fewer")
    check_codec_setting(cfg.codec, meta["codec"], f"the data in {cfg.data_dir} holds")
    train = Batches(cfg.data_dir, meta, "train", cfg.n_codebooks, cfg.block_size, seed=cfg.seed + proc.rank)
    val = Batches(cfg.data_dir, meta, "val", cfg.n_codebooks, cfg.block_size)
    if not train:
        raise UserError(f"{cfg.data_dir} has no training frames: add audio and run prepare.py again")
    if proc.master and not val:
        print(f"note: {cfg.data_dir} has an empty val split: skipping validation (only train loss is evaluated)")
    # the yardstick: per codebook, the best simple baseline's val loss (prepare.py computed them)
    baseline = best_baseline(meta["baselines"], cfg.n_codebooks) if meta.get("baselines") else None
    reference = reference_excerpt(val or train, cfg.n_codebooks, round(REFERENCE_SECONDS * meta["frame_rate"]))
    return Data(meta=meta, codec=codec_info(meta, cfg.n_codebooks), style_names=style_names(meta),
                codec_weights=read_codec_weights(cfg.data_dir, meta), train=train, val=val, baseline=baseline,
                reference=reference)


def reference_excerpt(batches, n_codebooks, frames):
    """The codes (K, frames) of the start of the split's first file: a piece of the user's own music
    that checkpoints carry, so that sample.py shows beside the samples what the codec makes of real
    music (the samples cannot sound better than that), with no data_dir needed."""
    f = batches.files[0]
    n = min(frames, f["frames"])
    return torch.from_numpy(np.asarray(batches.tokens[f["offset"]:f["offset"] + n, :n_codebooks], dtype=np.int64)).T.contiguous()


def same_weights(a, b):
    """True when two codec weights (dicts of tensors, or None) are equal."""
    if a is None or b is None:
        return a is b
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


def load_start(cfg, proc):
    """The checkpoint this run starts from (None from scratch: init_from is 'scratch', 'resume' or the
    path of a checkpoint to fine-tune), and cfg with that checkpoint's model shape. A shape setting
    set on the command line to another value (even the default) is refused; one left unset, or set
    by the config file (which describes new runs: config/small.py's shape changes between versions),
    takes the checkpoint's value, said in one line."""
    if cfg.init_from == "scratch":
        return cfg, None
    if cfg.init_from == "resume":
        path = checkpoint_path(cfg.out_dir, last=True)
        ckpt = load_checkpoint(cfg.out_dir, proc.device, resume=True)
    else:
        path = cfg.init_from
        if not os.path.exists(path):
            raise UserError(f"init_from={path}: no such checkpoint file (init_from is 'scratch', 'resume' or "
                            f"the path of a checkpoint to fine-tune)")
        ckpt = read_checkpoint(path, proc.device)
    # the checkpoint's shape; a setting it does not record is older than that setting: its default
    args = {**dataclasses.asdict(GPTConfig()), **ckpt["model_args"]}
    shape = {k: v for k, v in args.items() if k in MODEL_SETTINGS and k not in TRAINING_ONLY}
    differ = [k for k, v in shape.items() if getattr(cfg, k) != v]
    refused = [f"{k} {shape[k]} -> {getattr(cfg, k)}" for k in differ if k in getattr(cfg, "on_command_line", ())]
    if refused:
        raise UserError(f"cannot start from {path} with another model shape ({', '.join(refused)}): leave "
                        f"these settings out to use the checkpoint's shape, or start from another checkpoint")
    kept = [f"{k} {shape[k]} (not {getattr(cfg, k)})" for k in differ if k in getattr(cfg, "given", ())]
    if kept and proc.master:
        print(f"{path} has its own model shape: {', '.join(kept)}, as it was trained")
    return dataclasses.replace(cfg, **shape), ckpt


def existing_checkpoint(out_dir):
    """The checkpoint in out_dir that a new run would replace and resume continues (ckpt.pt, else
    last.pt), named in messages."""
    return next((p for p in (checkpoint_path(out_dir), checkpoint_path(out_dir, last=True)) if os.path.exists(p)),
                checkpoint_path(out_dir, last=True))


def refuse_overwrite(cfg):
    """A run that does not resume out_dir's checkpoint replaces it only when asked to (overwrite)."""
    path = existing_checkpoint(cfg.out_dir)
    if cfg.init_from != "resume" and os.path.exists(path) and not cfg.overwrite:
        new = "start from scratch" if cfg.init_from == "scratch" else f"fine-tune {cfg.init_from} into it"
        raise UserError(f"{path} exists: continue that run with --init_from=resume, or {new} "
                        f"with --overwrite=True (replaces its checkpoint, log and progress samples)")


def check_start_fits_data(cfg, data, ckpt):
    """The checkpoint a run resumes or fine-tunes must know the data's codec (the same fit of it) and styles."""
    resume = cfg.init_from == "resume"
    source = existing_checkpoint(cfg.out_dir) if resume else cfg.init_from
    check_codec(data.codec, ckpt["codec"], f"the checkpoint {source}")
    if not same_weights(data.codec_weights, ckpt.get("codec_weights")):   # another fit: codes mean other sounds
        raise UserError(f"codec mismatch: the checkpoint {source} was trained with another fit of the spectral "
                        f"codec than the one in {cfg.data_dir}: its codes mean other sounds; train from scratch")
    # style id i is row i of the checkpoint's style table: another corpus's styles would get
    # another style's row (or none), so resuming and fine-tuning both need the same style names
    learned = ckpt["styles"]   # (check_structure: a list of names)
    if learned != data.style_names:
        fix = (f"prepare {cfg.data_dir} with --styles=none" if not learned else
               f"prepare {cfg.data_dir} from audio sorted into the folders {', '.join(learned)}")
        raise UserError(f"cannot {'resume' if resume else 'fine-tune'} {source}: it learned the styles "
                        f"{learned} but {cfg.data_dir} has {data.style_names}; {fix}, or train from scratch")


def resumed_state(cfg, ckpt):
    """Where the run that resume continues stands; refused when it has already trained max_iters
    iterations, or max_minutes with a time budget."""
    state = TrainState(ckpt["iter_num"], ckpt["best_val_loss"], ckpt.get("finetuned_from"),
                       ckpt.get("train_seconds", 0.0))
    if state.iter_num >= cfg.max_iters and not cfg.max_minutes:
        raise UserError(f"{existing_checkpoint(cfg.out_dir)} has already trained {state.iter_num} iterations, "
                        f"max_iters is {cfg.max_iters}: raise --max_iters to train on")
    if cfg.max_minutes and state.seconds_before >= cfg.max_minutes * 60:
        raise UserError(f"{cfg.out_dir} has already trained {state.seconds_before / 60:.1f} min, max_minutes is "
                        f"{cfg.max_minutes:g}: raise --max_minutes to train on")
    return state


def choose_bigram(cfg, proc, data):
    """A new model's bigram table, only where the previous frame tells enough (bigram_min_gain), said in one line."""
    cfg, gain = decide_bigram(cfg, data.train.tokens, data.train.files, data.meta["codebook_size"])
    if gain is not None and proc.master:
        print(f"bigram table {'on' if cfg.bigram else 'off'}: the previous frame predicts the train split "
              f"{gain:.2f} nats/token better than the unigram ({'>=' if cfg.bigram else '<'} bigram_min_gain "
              f"{cfg.bigram_min_gain:g})")
    return cfg


def build_model(cfg, proc, data, ckpt):
    """The model on its device, new or with the weights of the checkpoint it starts from, and its optimizer."""
    # the model's shape: its settings, and the codebook size and number of styles of the data
    model = GPT(model_config(cfg, data.meta["codebook_size"], len(data.style_names)))
    if ckpt:
        load_weights(model, ckpt)
    elif cfg.bigram:
        init_bigram(model, data)
    model.to(proc.device)
    optimizer = model.configure_optimizers(cfg.learning_rate, cfg.muon_lr, cfg.weight_decay, (cfg.beta1, cfg.beta2),
                                           cfg.bigram_lr)
    return model, optimizer


def init_bigram(model, data):
    """A new model's bigram table from the train split's previous-frame bigrams, mixed with the unigram
    as the baseline that prepare.py scored (its mixing weights; 0.5 without a val split to score on)."""
    K, V = model.config.n_codebooks, data.meta["codebook_size"]
    lambdas = data.meta["baselines"]["lambda"]["prev_frame"] if data.meta.get("baselines") else [0.5] * K
    tables = [prev_frame_probs(data.train.tokens, data.train.files, V, k, lambdas[k]) for k in range(K)]
    model.init_bigram(np.stack([probs for probs, _ in tables]), np.stack([unigram for _, unigram in tables]))


def restore_training(cfg, proc, data, ckpt, optimizer, state):
    """Resume: the optimizer's state and every process's random states as the checkpoint holds them,
    so that a resumed run goes on exactly as an uninterrupted one."""
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
        restore_random_states(ckpt["rng"], cfg, proc, data, state.iter_num)
    except (ValueError, RuntimeError, KeyError, TypeError) as e:
        raise UserError(f"cannot resume {existing_checkpoint(cfg.out_dir)}: its optimizer or random states do not fit "
                        f"this model ({type(e).__name__}: {e}); train again or point out_dir elsewhere")


def fine_tuning_state(cfg, proc, ckpt):
    """Fine-tuning a checkpoint: a fresh optimizer and schedule from iteration 0, recording where the
    weights came from."""
    if proc.master:
        print(f"fine-tuning {cfg.init_from} (iteration {ckpt['iter_num']}) on {cfg.data_dir}: its weights "
              f"and shape, a fresh optimizer and learning-rate schedule")
    return TrainState(finetuned_from={"path": os.path.abspath(cfg.init_from), "iter_num": ckpt["iter_num"]})


def budget_used(seconds, budget, proc):
    """The fraction of the time budget spent after `seconds` of training; under DDP rank 0's, so that
    every process ends at the same iteration (their clocks could disagree about the last one)."""
    used = torch.tensor([seconds / budget], dtype=torch.float64)
    if proc.ddp:
        used = used.to(proc.device)
        torch.distributed.broadcast(used, src=0)
    return used.item()


def random_states(proc, data):
    """Every process's random states (torch, cuda, the batch sampler), rank r's at r. With DDP, every
    process must call this at the same point: the states are gathered from all of them."""
    mine = {"torch": torch.get_rng_state(), "batches": data.train.generator.get_state(),
            "cuda": torch.cuda.get_rng_state() if proc.device_type == "cuda" else None}
    if not proc.ddp:
        return [mine]
    states = [None] * proc.world
    torch.distributed.all_gather_object(states, mine)
    return states


def restore_random_states(states, cfg, proc, data, iter_num):
    """Give each process the random states its rank had in the checkpoint; with another number of
    processes than wrote it, fresh distinct seeds instead (the run goes on, not exactly as it would have)."""
    if len(states) == proc.world:
        mine = states[proc.rank]
        torch.set_rng_state(mine["torch"].cpu())  # .cpu(): loaded with map_location=device
        data.train.generator.set_state(mine["batches"].cpu())
        if proc.device_type == "cuda" and mine["cuda"] is not None:
            torch.cuda.set_rng_state(mine["cuda"].cpu())
        return
    if proc.master:
        print(f"note: the checkpoint was written by {len(states)} process(es), this run has {proc.world}: random "
              f"batches and dropout go on from fresh seeds, not exactly as the interrupted run would have")
    seed = cfg.seed + proc.rank + 1000 * iter_num
    torch.manual_seed(seed)
    data.train.generator.manual_seed(seed)


def cut_torn_line(log_path):
    """A crash in the middle of writing log.jsonl leaves its last line cut off: a resumed run cuts
    that off too before it appends, or its first record would be glued onto it."""
    if not os.path.exists(log_path):
        return
    with writing(log_path), open(log_path, "rb+") as f:
        log = f.read()
        if log and not log.endswith(b"\n"):
            f.truncate(log.rfind(b"\n") + 1)
            print(f"note: the last line of {log_path} was cut off (a crash while it was written): removed it")


def compile_model(cfg, proc, raw_model):
    """The model as training runs it: compiled (the compile setting; by default on CUDA) and, under
    DDP, wrapped. Returns it and whether it is compiled."""
    use_compile = cfg.compile if cfg.compile is not None else proc.device_type == "cuda"
    model = torch.compile(raw_model) if use_compile else raw_model
    if proc.ddp:
        model = DDP(model, device_ids=[proc.local_rank] if proc.device_type == "cuda" else None)
    return model, use_compile


def steps_per_iter(cfg):
    """Model steps (frames) an iteration trains on, all processes together."""
    return cfg.batch_size * cfg.gradient_accumulation_steps * cfg.block_size


def start_outputs(cfg):
    """Rank 0, once settings, data and model are checked: a new run replaces an old run's checkpoints,
    log, plot and progress samples now; a resumed one appends to them."""
    log_path, progress = os.path.join(cfg.out_dir, LOG_NAME), os.path.join(cfg.out_dir, "progress")
    if cfg.init_from != "resume":
        for old in (log_path, os.path.join(cfg.out_dir, PLOT_NAME), checkpoint_path(cfg.out_dir),
                    checkpoint_path(cfg.out_dir, last=True)):
            if os.path.exists(old):
                os.remove(old)
        shutil.rmtree(progress, ignore_errors=True)
    else:
        cut_torn_line(log_path)
        if os.path.isdir(progress):
            remove_stale_temporaries(progress)   # out_dir's lock covers its progress folder too


def print_banner(cfg, proc, data, raw_model, use_compile):
    """Two lines on what trains: the model and where it runs, the data and its styles."""
    meta = data.meta
    print(f"model: {raw_model.get_num_params() / 1e6:.2f}M non-embedding parameters, "
          f"{cfg.n_layer} layers, {cfg.n_embd} embd, {cfg.n_codebooks} codebooks of {meta['codebook_size']}; "
          f"device {proc.device}, {str(proc.dtype).removeprefix('torch.')}, compile {use_compile}, "
          f"{proc.world} process(es)")
    print(f"data: {meta['splits']['train']['frames']:,} train frames, {meta['splits']['val']['frames']:,} val "
          f"frames ({meta['codec']}); {steps_per_iter(cfg):,} steps x {cfg.n_codebooks} codebooks per iteration; "
          + (f"styles {', '.join(data.style_names)} (labels dropped at random: cfg_dropout {cfg.cfg_dropout})"
             if data.style_names else "no styles"))


def append_log(log_path, record):
    with writing(log_path), open(log_path, "a") as f:
        f.write(json.dumps(record) + "\n")


def evaluate(cfg, proc, data, raw_model, ctx, iter_num, lr):
    """Rank 0: the losses on eval_iters batches of each split as this evaluation's log record, with
    the best simple baselines and the val bit rate beside them."""
    splits = {"train": data.train, "val": data.val} if data.val else {"train": data.train}
    losses = estimate_losses(raw_model, splits, cfg.eval_iters, cfg.batch_size, cfg.seed + 1, proc.device, ctx)
    record = {"iter": iter_num, "lr": lr, "train_loss": losses["train"][0], "train_codebook_losses": losses["train"][1]}
    if "val" in losses:
        record.update(val_loss=losses["val"][0], val_codebook_losses=losses["val"][1])
    if data.baseline and "val" in losses:
        record.update(baseline_loss=sum(data.baseline) / len(data.baseline), baseline_codebook_losses=data.baseline,
                      val_bits_per_second=bits_per_second(losses["val"][1], data.meta["frame_rate"]))
    return record


def report(cfg, data, record, bar):
    """An evaluation into log.jsonl, the loss plot and one line on the console."""
    log_path = os.path.join(cfg.out_dir, LOG_NAME)
    append_log(log_path, record)
    save_loss_plot(log_path, os.path.join(cfg.out_dir, PLOT_NAME))
    bar.write(eval_line(record["iter"], record, data.meta))


def save_checkpoints(cfg, data, raw_model, optimizer, state, val, rng):
    """After an evaluation (not the one a run starts with): last.pt always, ckpt.pt when val improved
    (or always_save_checkpoint, or without a val split). Weights that turned NaN or inf end the run."""
    improved = val < state.best_val_loss
    state.best_val_loss = min(state.best_val_loss, val)
    if not weights_finite(raw_model.state_dict()):  # nothing to save, nothing to train on
        raise UserError(
            f"training diverged at iteration {state.iter_num}: the weights hold NaN or inf, so nothing was "
            f"saved ({checkpoint_path(cfg.out_dir)} keeps the best model so far, val {state.best_val_loss:.4f}); "
            f"lower --learning_rate and --muon_lr, or raise --warmup_iters")
    ckpt = make_checkpoint(raw_model, data.codec, state.iter_num, val, state.best_val_loss, cfg, data.style_names,
                           state.train_seconds(), data.meta.get("baselines"), state.finetuned_from, data.reference,
                           data.codec_weights)
    # last.pt at every evaluation: what resume continues from
    save_checkpoint(cfg.out_dir, with_resume_state(ckpt, optimizer.state_dict(), rng), last=True)
    if improved or cfg.always_save_checkpoint or not data.val:
        save_checkpoint(cfg.out_dir, ckpt)


class ProgressSamples:
    """Rank 0's progress samples (write_progress_sample), at every sample_every-th evaluation and at
    the end. The codec is loaded for the first; if it cannot be (the pretrained weights missing),
    training goes on without progress samples, with one note (not one at every evaluation, nor a new
    try at loading it each time)."""

    def __init__(self, cfg, data, device):
        self.cfg, self.data, self.device = cfg, data, device
        self.codec = None   # loaded at the first progress sample; False: unavailable

    def due(self, iter_num, last):
        return self.cfg.sample_every and ((iter_num // self.cfg.eval_interval) % self.cfg.sample_every == 0 or last)

    def write(self, model, iter_num, val_loss, bar):
        if self.codec is None:
            try:
                self.codec = codec_for(self.data.codec, self.data.codec_weights, self.cfg.codec_dir, self.device)
            except UserError as e:
                bar.write(f"note: no progress samples ({e})")
                self.codec = False
        if self.codec:
            write_progress_sample(self.cfg, model, self.codec, iter_num, val_loss)


class Speedometer:
    """Rank 0's progress every log_interval iterations, on the bar and in log.jsonl: loss, learning
    rate, time per iteration, tokens per second and MFU (model FLOPs utilisation, smoothed)."""

    def __init__(self, cfg, proc, raw_model):
        self.cfg, self.raw_model, self.t0, self.running_mfu = cfg, raw_model, time.time(), -1.0
        self.peak = peak_flops(proc.device, proc.dtype if proc.dtype != torch.float16 else torch.float32)

    def log(self, iter_num, loss, lr, bar):
        cfg, steps = self.cfg, steps_per_iter(self.cfg)
        loss_value = loss.item()  # .item() syncs with the GPU: only when logging
        dt = (time.time() - self.t0) / cfg.log_interval
        self.t0 = time.time()
        mfu = self.raw_model.estimate_mfu(steps / dt, self.peak) if self.peak else float("nan")
        self.running_mfu = mfu if self.running_mfu < 0 else 0.9 * self.running_mfu + 0.1 * mfu
        tokens_per_s = steps * cfg.n_codebooks / dt
        bar.set_postfix_str(f"loss {loss_value:.4f} lr {lr:.2e} {dt * 1000:.0f}ms/it "
                            f"{tokens_per_s:,.0f} tok/s mfu {self.running_mfu * 100:.1f}%")
        append_log(os.path.join(cfg.out_dir, LOG_NAME), {"iter": iter_num, "loss": loss_value, "lr": lr,
                                                         "ms_per_iter": dt * 1000, "tokens_per_s": tokens_per_s,
                                                         "mfu": mfu})


def print_summary(cfg, state, start_iter, budget):
    """What this run trained, how fast, and where its outputs are."""
    seconds = time.time() - state.t_start
    steps = (state.iter_num - start_iter) * steps_per_iter(cfg)
    if budget:
        print(f"time budget: {cfg.max_minutes:g} min, {(state.seconds_before + seconds) / 60:.1f} min trained "
              f"({seconds / 60:.1f} in this run), the schedule at min_lr {cfg.min_lr:g}")
    print(f"trained {state.iter_num - start_iter} iterations ({steps:,} steps, {steps * cfg.n_codebooks:,} tokens) "
          f"in {seconds:.0f}s ({steps * cfg.n_codebooks / max(seconds, 1e-9):,.0f} tok/s); "
          f"best model {checkpoint_path(cfg.out_dir)} (val {state.best_val_loss:.4f}), latest "
          f"{checkpoint_path(cfg.out_dir, last=True)}, log {os.path.join(cfg.out_dir, LOG_NAME)}, "
          f"plot {os.path.join(cfg.out_dir, PLOT_NAME)}")


def train_loop(cfg, proc, data, raw_model, optimizer, state):
    """Train until max_iters, or until max_minutes of training (state.seconds_before of them spent by
    the run this one resumes): evaluate, plot and checkpoint (rank 0) every eval_interval iterations
    and at the end, log every log_interval."""
    model, use_compile = compile_model(cfg, proc, raw_model)
    # fp16 needs loss scaling to keep small gradients from flushing to zero; bf16 and fp32 do not
    scaler = torch.amp.GradScaler(proc.device_type, enabled=proc.dtype == torch.float16)
    ctx = autocast(proc.device, proc.dtype)
    if proc.master:
        start_outputs(cfg)
        print_banner(cfg, proc, data, raw_model, use_compile)
    progress = ProgressSamples(cfg, data, proc.device)
    budget = cfg.max_minutes * 60 if cfg.max_minutes else None
    start_iter, state.t_start = state.iter_num, time.time()
    bar = tqdm(total=None if budget else cfg.max_iters, initial=state.iter_num, disable=not proc.master,
               dynamic_ncols=True, unit="it")
    speed = Speedometer(cfg, proc, raw_model) if proc.master else None
    while True:
        used = budget_used(state.train_seconds(), budget, proc) if budget else None
        lr = get_lr(state.iter_num, cfg, used)
        for group in optimizer.param_groups:   # AdamW's at learning_rate, Muon's at muon_lr: both follow the schedule
            group["lr"] = group["initial_lr"] * lr / cfg.learning_rate

        # every eval_interval iterations and at the end: evaluate, log, checkpoint, progress sample
        last = used >= 1.0 if budget else state.iter_num >= cfg.max_iters
        if state.iter_num % cfg.eval_interval == 0 or last:
            # the random states for the checkpoint: every process takes part in gathering them
            rng = random_states(proc, data) if state.iter_num > start_iter else None
            if proc.master:
                record = evaluate(cfg, proc, data, raw_model, ctx, state.iter_num, lr)
                report(cfg, data, record, bar)
                if progress.due(state.iter_num, last):
                    progress.write(raw_model, state.iter_num, record.get("val_loss"), bar)
                if state.iter_num > start_iter:   # (the evaluation a run starts with saves nothing: it is no best)
                    val = record.get("val_loss", record["train_loss"])
                    save_checkpoints(cfg, data, raw_model, optimizer, state, val, rng)
        if last:
            break

        # style labels dropped with probability cfg_dropout: the model also learns "no style" (guidance needs it)
        get_batch = lambda: data.train.sample(cfg.batch_size, proc.device, cfg.cfg_dropout)
        loss = train_step(model, optimizer, scaler, get_batch, proc.accum_steps, cfg.grad_clip, proc.ddp, ctx)
        state.iter_num += 1
        bar.update(1)
        if state.iter_num % cfg.log_interval == 0 and proc.master:
            speed.log(state.iter_num, loss, lr, bar)
    bar.close()
    if proc.master:
        print_summary(cfg, state, start_iter, budget)


def main(argv):
    cfg = load_config(argv)
    proc = setup_processes(cfg)
    # one run at a time writes into out_dir (rank 0 writes for all processes)
    with lock_folder(cfg.out_dir, "out_dir") if proc.master else nullcontext():
        if proc.master:
            refuse_folders(*(os.path.join(cfg.out_dir, name) for name in (CKPT_NAME, LAST_NAME, LOG_NAME, PLOT_NAME)))
        cfg, ckpt = load_start(cfg, proc)
        data = load_data(cfg, proc)
        refuse_overwrite(cfg)
        if ckpt:
            check_start_fits_data(cfg, data, ckpt)
        else:   # a new model: its shape may depend on the data
            cfg = choose_bigram(cfg, proc, data)
        state = resumed_state(cfg, ckpt) if cfg.init_from == "resume" else None
        model, optimizer = build_model(cfg, proc, data, ckpt)
        if cfg.init_from == "resume":
            restore_training(cfg, proc, data, ckpt, optimizer, state)
        else:
            state = fine_tuning_state(cfg, proc, ckpt) if ckpt else TrainState()
        del ckpt  # free its tensors: the model and the optimizer hold copies
        train_loop(cfg, proc, data, model, optimizer, state)
    if proc.ddp:
        destroy_process_group()


if __name__ == "__main__":
    run_cli(main)
