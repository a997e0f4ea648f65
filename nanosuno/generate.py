"""
Generation: run the model one step at a time through the delay pattern (pattern.py) and return
plain, un-delayed codes ready for the codec.

Steps and frames. With K codebooks, step s of the delayed layout holds frame s - k of stream k,
so F frames take F + K - 1 steps:
  warm-up  stream k has no frame yet for its first k steps: it holds the special token there
           (forced, never sampled), exactly as at the start of every training window;
  drain    after stream 0's last frame, K - 1 more steps finish the other streams. Stream 0 keeps
           being sampled there (those codes are thrown away) so that the model keeps seeing
           mid-piece inputs like the ones it was trained on.
A prompt's frames are forced, not sampled, at the steps where they fall in the delayed layout. The
model only ever looks back one context, so a longer prompt is cut to its last frames: as many as a
slide of the window keeps (prompt_frames_used).

From scratch there is nothing to condition frame 0 on: the model is fed one "start" step of
all-special tokens, its guess for stream 0 becomes frame 0, and the start step is then forgotten
(cache rewound), so that frame 0 sits at position 0 like the first frame of every training window.

Longer than the context: the KV cache holds block_size steps. When it is full, the window slides:
the most recent `block_size - stride` steps are kept, their warm-up triangle is re-applied (as if
the kept frames were a fresh prompt, i.e. a training window starting there) and they are
prefilled again from position 0. Cost: one prefill per `stride` generated steps.

Styles and classifier-free guidance (a model trained with style labels, see model.py): each piece
can be asked for in a style. With a guidance coefficient, every piece runs as two streams in one
batch, conditional (its style) and unconditional ("no style"), through the same cache, prompt and
window slides; each step samples once from uncond + coef * (cond - uncond) and feeds the same codes
to both streams. coef = 1 gives exactly the conditional logits; larger values push further away
from what the style does not change (MusicGen's default is 3).
"""
import math

import torch
import torch.nn.functional as F

from nanosuno.decode import Decoder
from nanosuno.evaluate import frame_cross_entropy
from nanosuno.pattern import delay_deinterleave, delay_interleave


# The valid values of the sampling arguments: (the rule in words, test). check_sampling applies them to
# generate()'s arguments, and the config system (config.RULES) to the settings of the same names.
SAMPLING_RULES = {
    "temperature": (">= 0 (0 = greedy)", lambda v: v >= 0),
    "top_p": ("in [0, 1] (0 = off)", lambda v: 0 <= v <= 1),
    "num_samples": (">= 1", lambda v: v >= 1),
    "context_stride": ("in (0, 1]", lambda v: 0 < v <= 1),
    "cfg_coef": (">= 0 (1 = plain conditional sampling)", lambda v: v >= 0),
}


def check_sampling(codebook_size, temperature, top_k, top_p, num_samples=1, context_stride=0.25, cfg_coef=None):
    """Raise ValueError, naming the argument and its valid values in one line, for sampling arguments
    that cannot sample (SAMPLING_RULES, and top_k within the codebook; cfg_coef None: no guidance).
    generate() checks its arguments with this; sample.py calls it before it loads the codec or
    writes anything."""
    rules = dict(SAMPLING_RULES, top_k=(f"between 1 and the codebook size {codebook_size}",
                                        lambda v: 1 <= v <= codebook_size))
    values = dict(temperature=temperature, top_k=top_k, top_p=top_p, num_samples=num_samples,
                  context_stride=context_stride, cfg_coef=cfg_coef)
    for name, value in values.items():
        if value is None and name == "cfg_coef":
            continue
        rule, test = rules[name]
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and test(value)):
            raise ValueError(f"{name} must be {rule}, got {value!r}")


@torch.no_grad()
def sample_next(logits, temperature=1.0, top_k=None, top_p=0.0, generator=None):
    """Pick one code per head: logits (B, K, V) -> codes (B, K).
    temperature 0 = greedy; top_k keeps the k most likely codes; top_p (0 = off) keeps the smallest
    set whose probability reaches p. The special token has no logit, so it is never sampled."""
    if temperature == 0:
        return logits.argmax(-1)
    V, scores, codes = logits.shape[-1], logits, None
    if (top_k and top_k < V) or top_p:
        # work on the top_k candidates only: noise over k values instead of all V, for every head
        # of every piece in one call (this runs once per generated step, so it matters)
        scores, codes = torch.topk(logits, min(top_k or V, V), dim=-1, sorted=bool(top_p))
    if top_p and top_p < 1.0:
        # scores are sorted: drop a code once the codes before it reach top_p (the first stays)
        probs = F.softmax(scores.float() / temperature, dim=-1)
        scores = scores.masked_fill(probs.cumsum(-1) - probs >= top_p, float("-inf"))
    # Gumbel-max: argmax(scores / T - log E) with E ~ Exp(1) = -log(U) draws from softmax(scores / T)
    # exactly, needs no softmax, and is faster than torch.multinomial on small batches. Written
    # argmax(scores - T log E), the same argmax in one op fewer (and in float32: the noise is)
    log_e = torch.rand(scores.shape, device=scores.device, generator=generator).log_().neg_().log_()
    pick = torch.add(scores, log_e, alpha=-temperature).max(-1, keepdim=True).indices  # max(): faster than argmax() on CPU
    return (pick if codes is None else codes.gather(-1, pick)).squeeze(-1)


def guide(logits, cfg_coef):
    """Classifier-free guidance: logits (2B, K, V), the conditional streams then the unconditional
    ones -> (B, K, V) = uncond + coef * (cond - uncond), written as cond + (coef - 1) * (cond - uncond)
    so that coef = 1 gives the conditional logits bit for bit."""
    cond, uncond = logits.to(torch.promote_types(logits.dtype, torch.float32)).chunk(2)
    return cond + (cfg_coef - 1) * (cond - uncond)


def context_keep_steps(block_size, context_stride, n_codebooks):
    """Steps kept when the window slides: block_size minus the stride (a fraction of block_size).
    At least K - 1 are kept, so that the re-applied warm-up triangle lies inside the re-read steps
    (steps decoded after a slide then need no masking), and at least one step is gained per slide."""
    stride = max(1, round(context_stride * block_size))
    return min(block_size - 1, max(n_codebooks - 1, block_size - stride, 1))


def prompt_frames_used(model, prompt_frames, context_stride=0.25):
    """How many of a prompt's frames generate() continues: all, or the last ones that a slide of the
    window would keep (the model only ever looks back one context, and needs room to generate in)."""
    config = model.config
    return min(prompt_frames, context_keep_steps(config.block_size, context_stride, config.n_codebooks))


def check_request(model_config, new_frames, prompt, style_ids, cfg_coef):
    """Refuse what generate() cannot make of this model: its arguments besides the sampling settings."""
    K, n_styles = model_config.n_codebooks, model_config.n_styles
    if new_frames < 1:
        raise ValueError(f"new_frames must be at least 1, got {new_frames}")
    if prompt is not None and (prompt.dim() != 2 or prompt.shape[0] != K):
        raise ValueError(f"prompt must be codes (K={K}, frames), got {tuple(prompt.shape)}")
    if style_ids is not None and not (style_ids and all(0 <= s < n_styles for s in style_ids)):
        raise ValueError(f"style_ids must be in 0..{n_styles - 1} (the model's styles), got {style_ids}")
    if cfg_coef is not None and style_ids is None:
        raise ValueError("cfg_coef guides towards a style: give style_ids too")


def stream_style_ids(style_ids, num_samples, guided, n_styles, device):
    """The style id of each of the model's streams (None: no styles): the pieces, num_samples per
    style, then (guided) each piece again as "no style" (id n_styles)."""
    if style_ids is None:
        return None
    ids = torch.tensor(style_ids, device=device).repeat_interleave(num_samples)
    return torch.cat([ids, torch.full_like(ids, n_styles)]) if guided else ids


@torch.inference_mode()
def generate(model, new_frames, prompt=None, temperature=1.0, top_k=250, top_p=0.0, num_samples=1,
             seed=1337, context_stride=0.25, progress=None, style_ids=None, cfg_coef=None):
    """Sample `num_samples` pieces (per style) of `new_frames` new frames in one batch.

    model        a GPT (run as it is), or a decode.Decoder of one (in its decode precision).
    prompt       optional un-delayed codes (K, frames) to continue, of any length: its last
                 prompt_frames_used() frames come first in every piece (forced, not sampled).
    temperature  0 = greedy; top_k in 1..codebook_size; top_p in [0, 1], 0 = off.
    seed         same seed, same settings -> same codes (a private torch.Generator).
    context_stride  fraction of block_size dropped each time the window slides (see module doc).
    progress     optional tqdm-like object: .update(1) per model step; a tqdm bar is told the total.
    style_ids    None: unconditional. A list of the model's style ids: num_samples pieces in each,
                 style by style (the batch is len(style_ids) * num_samples pieces).
    cfg_coef     None: plain conditional sampling. A number (with style_ids): classifier-free guidance
                 with this coefficient, conditional and unconditional streams in one batch of twice
                 the pieces (see module doc).
    Returns un-delayed codes (pieces, K, prompt frames used + new_frames), never the special token.
    """
    decoder = model if isinstance(model, Decoder) else Decoder(model)
    config = decoder.config
    K, special, device = config.n_codebooks, config.codebook_size, decoder.device
    check_sampling(special, temperature, top_k, top_p, num_samples, context_stride, cfg_coef=cfg_coef)
    check_request(config, new_frames, prompt, style_ids, cfg_coef)
    B, guided = num_samples * (1 if style_ids is None else len(style_ids)), cfg_coef is not None
    stream_ids = stream_style_ids(style_ids, num_samples, guided, config.n_styles, device)
    both = (lambda codes: torch.cat([codes, codes])) if guided else (lambda codes: codes)
    streams = 2 * B if guided else B
    P = 0 if prompt is None else prompt_frames_used(model, prompt.shape[1], context_stride)
    keep = context_keep_steps(config.block_size, context_stride, K)
    steps = P + new_frames + K - 1
    generator = torch.Generator(device=device).manual_seed(seed)
    if hasattr(progress, "total"):  # a tqdm bar: show how many model steps are coming
        progress.total = steps - P
        progress.refresh()

    # the whole delayed sequence, preallocated. Prompt frames and the warm-up triangle are written
    # now and forced below: at step s stream k is forced while s - k < P (s < k is warm-up: special)
    delayed = torch.full((B, K, steps), special, dtype=torch.long, device=device)
    if P:
        delayed[:, :, :P + K - 1] = delay_interleave(prompt[:, -P:].to(device), special)
    forced_until = P + K - 1        # from this step on nothing is forced
    forced = torch.arange(forced_until, device=device) < (torch.arange(K, device=device) + P).view(K, 1)

    def window(start, end):
        """Steps start..end-1 as the model input of a fresh window: the warm-up triangle re-applied."""
        codes = delayed[:, :, start:end].clone()
        for k in range(1, K):
            codes[:, k, :k] = special
        return codes

    cache = decoder.new_cache(streams)
    decode_step = decoder.step_function(cache, stream_ids)
    if P:   # prefill the prompt steps (at most `keep`: they fit in the context with room to spare)
        logits = decoder.prefill(both(window(0, P)), cache, stream_ids)
    else:   # from scratch: an all-special start step predicts frame 0, then is dropped
        start = torch.full((streams, K, 1), special, dtype=torch.long, device=device)
        logits = decoder.prefill(start, cache, stream_ids)
        cache.reset()

    for s in range(P, steps):
        if guided:
            logits = guide(logits, cfg_coef)
        codes = sample_next(logits, temperature, top_k, top_p, generator)  # (B, K) for step s
        if s < forced_until:
            codes = torch.where(forced[:, s], delayed[:, :, s], codes)
        delayed[:, :, s] = codes
        if progress is not None:
            progress.update(1)
        if s == steps - 1:
            break
        if cache.length < cache.max_len:
            logits = decode_step(both(codes), cache)
        else:   # context full: slide the window, re-read the most recent `keep` steps
            cache.reset()
            logits = decoder.prefill(both(window(s + 1 - keep, s + 1)), cache, stream_ids)

    return delay_deinterleave(delayed)


def loop_bridge(loop_frames):
    """The frames of a loop made by choosing among continuations (generate_loop): a second (75
    frames), or a quarter of a shorter loop. Its seam is scored over as many frames."""
    return min(max(1, loop_frames // 4), 75)


def loop_fits(loop_frames, block_size, n_codebooks):
    """True when a model of this context can make a loop of loop_frames frames: the loop, then its
    start again (the bridge's length, where the seam is scored), in one delayed window."""
    return loop_frames + loop_bridge(loop_frames) + n_codebooks - 1 <= block_size


def generate_loop(model, loop_frames, prompt=None, temperature=1.0, top_k=250, top_p=0.0, seed=1337,
                  context_stride=0.25, style_id=None, cfg_coef=None, candidates=8, progress=None):
    """One loop of exactly loop_frames frames: codes (K, loop_frames) that repeat without a seam as
    the model hears it. An autoregressive model cannot see the beginning it must lead back to, so
    the loop is made in two parts: a body (all but the last second, or quarter, of the loop, after a
    lead-in of as many frames that is dropped), then
    `candidates` bridges that continue the body, sampled in one batch; the bridge kept is the one
    after which the model finds the loop's own beginning most likely (the lowest
    frame_cross_entropy of the loop's first second, with the loop's end put before it). Returns the
    codes and that seam cross-entropy."""
    bridge, decoder = loop_bridge(loop_frames), model if isinstance(model, Decoder) else Decoder(model)
    if not loop_fits(loop_frames, model.config.block_size, model.config.n_codebooks):
        raise ValueError(f"a loop of {loop_frames} frames needs a context of {loop_frames + bridge} steps and "
                         f"more, the model's is {model.config.block_size}")
    style_ids = None if style_id is None else [style_id]
    # the body comes after a lead-in of `bridge` frames, dropped: a loop starts inside the music, not
    # where the model learned that pieces begin (quietly: a dip at every repeat)
    body = generate(decoder, loop_frames, prompt, temperature, top_k, top_p, 1, seed, context_stride,
                    progress, style_ids, cfg_coef)[0, :, -(loop_frames - bridge):]
    ends = generate(decoder, bridge, body, temperature, top_k, top_p, candidates, seed + 1, context_stride,
                    progress, style_ids, cfg_coef)[:, :, -bridge:]
    loops = [torch.cat([body, end], dim=1) for end in ends]
    seams = [frame_cross_entropy(decoder.model, torch.cat([loop, loop[:, :bridge]], dim=1), loop_frames, style_id)
             for loop in loops]
    best = min(range(len(loops)), key=seams.__getitem__)
    return loops[best], seams[best]
