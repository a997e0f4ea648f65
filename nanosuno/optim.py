"""
The optimizer, and one training step with it (train_step: train.py's loop and bench.py's timings).

Muon for the transformer's hidden weight matrices, AdamW for everything else (the
code embeddings and the output heads), in one torch.optim.Optimizer so that training, checkpoints
and resume handle a single object.

Muon (Keller Jordan, 2024; the optimizer of the modded-nanogpt speedruns) takes SGD's momentum
and replaces each matrix's update by the nearest semi-orthogonal matrix (all singular values 1),
computed by a few Newton-Schulz iterations. Every direction of the matrix then moves at the same
rate, instead of the few dominant ones that plain gradients favour. Embeddings and heads are not
hidden matrices (a row per code, not a linear map between features) and stay with AdamW.
"""
from contextlib import nullcontext

import torch

# coefficients of the quintic Newton-Schulz iteration, tuned to reach singular values near 1 fast
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(G, steps=5):
    """Approximately U V^T for G = U S V^T (singular values pushed into ~[0.7, 1.2], which works as
    well as exact): X <- a X + (b A + c A^2) X with A = X X^T, on the short side of the matrix."""
    a, b, c = NS_COEFFICIENTS
    X = G.float()
    X = X / (X.norm() + 1e-7)          # singular values <= 1: inside the iteration's basin
    tall = X.shape[0] > X.shape[1]
    if tall:
        X = X.T
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return (X.T if tall else X).to(G.dtype)


class MuonAdamW(torch.optim.Optimizer):
    """Param groups with "muon": True get Muon (lr, momentum, nesterov), the others AdamW (lr, betas,
    eps, weight_decay). Every group's "lr" is what the schedule sets; a Muon update is scaled by
    sqrt(max(1, rows / cols)) so that tall and wide matrices move alike per entry."""

    def __init__(self, groups, momentum=0.95, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0):
        defaults = dict(muon=False, momentum=momentum, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(groups, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if wd:
                    p.mul_(1 - lr * wd)
                if group["muon"]:
                    if not state:
                        state["momentum_buffer"] = torch.zeros_like(p)
                    buf, m = state["momentum_buffer"], group["momentum"]
                    buf.lerp_(p.grad, 1 - m)
                    update = orthogonalize(p.grad.lerp(buf, m))        # Nesterov: look ahead along the momentum
                    p.add_(update, alpha=-lr * max(1, p.shape[0] / p.shape[1]) ** 0.5)
                else:
                    if not state:
                        state["step"] = torch.zeros((), dtype=torch.float32)
                        state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
                    (b1, b2), step = group["betas"], state["step"].add_(1).item()
                    state["exp_avg"].lerp_(p.grad, 1 - b1)
                    state["exp_avg_sq"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                    denom = (state["exp_avg_sq"] / (1 - b2 ** step)).sqrt_().add_(group["eps"])
                    p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - b1 ** step))


def train_step(model, optimizer, scaler, get_batch, accum_steps, grad_clip, ddp, ctx):
    """One optimizer step: forward and backward on accum_steps batches (inputs, targets, style ids)
    from get_batch() (gradients add up), clip, step. Returns the last batch's loss as a tensor
    (reading it syncs with a GPU)."""
    for micro_step in range(accum_steps):
        x, y, style_ids = get_batch()
        # with DDP, only the last micro step synchronises gradients
        sync = nullcontext() if (not ddp or micro_step == accum_steps - 1) else model.no_sync()
        with sync, ctx:
            _, loss = model(x, y, style_ids=style_ids)
        scaler.scale(loss / accum_steps).backward()
    if grad_clip:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()
