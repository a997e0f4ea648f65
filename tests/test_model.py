import math
import os

import pytest
import torch

from conftest import ROOT
from nanosuno.config import load_config, model_config
from nanosuno.model import GPT, GPTConfig, codebook_losses
from nanosuno.optim import MuonAdamW, orthogonalize


def tiny(K=8, block_size=64, dropout=0.0, n_styles=0, codebook0_weight=2.0):
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=block_size, n_codebooks=K, codebook_size=64, n_layer=2, n_head=4,
                         n_embd=32, dropout=dropout, n_styles=n_styles, codebook0_weight=codebook0_weight)).eval()


def test_small_config_parameter_count():
    """config/small.py's model: the count follows from its shape, term by term."""
    cfg = model_config(load_config([os.path.join(ROOT, "config", "small.py")]), codebook_size=1024)
    assert (cfg.n_layer, cfg.n_head, cfg.kv_heads, cfg.n_embd, cfg.bigram, cfg.rotary) == (6, 8, 2, 256, True, True)
    model = GPT(cfg)
    d, kv = cfg.n_embd, cfg.n_embd * cfg.kv_heads // cfg.n_head   # k and v are kv wide each (grouped-query)
    per_layer = d * (d + 2 * kv) + d * d + 8 * d * d + 2 * d      # qkv + proj + 4x MLP, two LayerNorm weights
    heads = cfg.n_codebooks * cfg.codebook_size * d
    non_embedding = cfg.n_layer * per_layer + d + heads  # + final LayerNorm
    embeddings = cfg.n_codebooks * (cfg.codebook_size + 1) * d   # rotary positions: no position table
    bigram = cfg.n_codebooks * (cfg.codebook_size + 1) * cfg.codebook_size   # a row per input code, special included
    total = sum(p.numel() for p in model.parameters())
    print(f"config/small.py: {total:,} parameters, {model.get_num_params():,} non-embedding")
    assert model.get_num_params() == non_embedding == 6_229_248
    assert total == non_embedding + embeddings + bigram == 16_725_248


@pytest.mark.parametrize("K", [1, 8])
def test_shapes_and_loss(K):
    model = tiny(K)
    codes = torch.randint(0, 65, (2, K, 40))
    logits, loss = model(codes, codes)
    assert logits.shape == (2, K, 40, 64)
    assert loss.shape == () and math.isfinite(loss.item())
    assert model(codes)[1] is None


def test_loss_ignores_special_targets_and_averages_codebooks():
    model = tiny(K=2, codebook0_weight=1.0)   # every codebook weighs the same (the default weighs codebook 0 twice)
    codes = torch.randint(0, 64, (1, 2, 10))
    targets = codes.clone()
    targets[:, 1, :5] = 64                            # special: must not count
    logits, loss = model(codes, targets)
    logp = torch.log_softmax(logits, -1)
    nll0 = -logp[0, 0].gather(-1, targets[0, 0, :, None]).mean()
    nll1 = -logp[0, 1, 5:].gather(-1, targets[0, 1, 5:, None]).mean()
    per_codebook = codebook_losses(logits, targets, 64)
    assert torch.allclose(per_codebook, torch.stack([nll0, nll1]), atol=1e-5)
    assert torch.allclose(loss, (nll0 + nll1) / 2, atol=1e-5)


def test_codebook0_weight_weighs_the_training_loss():
    """The training loss weighs codebook 0 by codebook0_weight and each other codebook by 1; the
    logits do not depend on it, and a codebook with no real target is left out of both sums."""
    codes = torch.randint(0, 64, (1, 3, 10))
    plain = tiny(K=3)
    weighted = GPT(GPTConfig(**{**vars(plain.config), "codebook0_weight": 4.0})).eval()
    weighted.load_state_dict(plain.state_dict())
    logits, loss = weighted(codes, codes)
    assert torch.equal(logits, plain(codes)[0])
    per_codebook = codebook_losses(logits, codes, 64)
    assert torch.allclose(loss, (4 * per_codebook[0] + per_codebook[1:].sum()) / 6, atol=1e-6)
    assert not torch.allclose(loss, per_codebook.mean(), atol=1e-3)
    targets = codes.clone()
    targets[:, 0] = 64                                # codebook 0 has nothing to predict here
    _, loss = weighted(codes, targets)
    assert torch.allclose(loss, codebook_losses(logits, targets, 64)[1:].mean(), atol=1e-6)
    one = GPT(GPTConfig(**{**vars(tiny(K=1).config), "codebook0_weight": 4.0})).eval()
    logits, loss = one(codes[:, :1], codes[:, :1])    # alone, codebook 0's weight cancels out
    assert torch.allclose(loss, codebook_losses(logits, codes[:, :1], 64)[0], atol=1e-6)


@pytest.mark.parametrize("K", [1, 8])
def test_causality(K):
    """Changing a future step leaves every earlier logit unchanged (and changes later ones)."""
    model = tiny(K)
    codes = torch.randint(0, 65, (1, K, 30))
    before, _ = model(codes)
    changed = codes.clone()
    changed[:, :, 20] = (changed[:, :, 20] + 1) % 64
    after, _ = model(changed)
    assert torch.equal(before[:, :, :20], after[:, :, :20])
    assert not torch.allclose(before[:, :, 20:], after[:, :, 20:])


def test_rotary_scores_depend_on_distance_not_position():
    """Rotary positions: a query at position a against a key at position b scores the same as at a + s
    against b + s, and differently at another distance; turning keeps each vector's length."""
    from nanosuno.model import rotary_angles, rotate
    angles = rotary_angles(64, 16)
    q, k = torch.randn(16), torch.randn(16)
    score = lambda a, b: torch.dot(rotate(q, angles[a]), rotate(k, angles[b])).item()
    assert score(10, 3) == pytest.approx(score(50, 43), abs=1e-5)
    assert score(10, 3) != pytest.approx(score(10, 9), abs=1e-3)
    assert rotate(q, angles[37]).norm().item() == pytest.approx(q.norm().item(), rel=1e-6)
    torch.testing.assert_close(rotate(q, angles[0]), q)        # position 0 is not turned


def test_a_rotary_model_has_no_position_table_and_its_checkpoint_none_either():
    config = GPTConfig(block_size=64, n_codebooks=2, codebook_size=64, n_layer=2, n_head=4, n_embd=32, rotary=True)
    model = GPT(config)
    assert not hasattr(model, "wpe") and not any(name.startswith("wpe") for name in model.state_dict())
    assert "rotary" not in model.state_dict()              # the angles follow from the shape: not saved
    learned = GPT(GPTConfig(**{**config.__dict__, "rotary": False}))
    assert learned.get_num_params() == model.get_num_params()   # the position table was never counted


def test_style_embedding():
    """Every step's input gets its style's vector: each style gives other logits at every step, no
    styles given means "no style" (id n_styles); the table is one row per style plus one, counted as
    an embedding, trained by AdamW. Without styles the model has no table at all."""
    model = tiny(K=2, n_styles=3)
    codes = torch.randint(0, 65, (1, 2, 12))
    logits = [model(codes, style_ids=torch.tensor([s]))[0] for s in range(4)]
    for a in range(4):
        for b in range(a):
            assert (logits[a] - logits[b]).abs().amax(-1).min() > 1e-3   # differ at every step and codebook
    assert torch.equal(model(codes)[0], logits[3])
    assert model.style_emb.weight.shape == (4, 32)
    plain = tiny(K=2)
    assert model.get_num_params() == plain.get_num_params()
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in plain.parameters()) + 4 * 32
    adamw = model.configure_optimizers(1e-3, 0.02, 0.0, (0.9, 0.95)).param_groups[1]
    assert any(p is model.style_emb.weight for p in adamw["params"])
    assert not hasattr(plain, "style_emb") and "style" not in "".join(plain.state_dict())


def test_tiny_model_overfits_a_fixed_sequence():
    """A model that has not memorised random codes scores ln(64) = 4.16 nats; below 0.3 it puts on
    average > 74% probability on the right code of a random sequence, which only memorising does."""
    model = tiny(K=4, block_size=32).train()
    codes = torch.randint(0, 64, (1, 4, 33))
    x, y = codes[:, :, :-1], codes[:, :, 1:]
    optimizer = model.configure_optimizers(1e-2, 0.02, 0.0, (0.9, 0.95))
    first = None
    for _ in range(150):
        _, loss = model(x, y)
        first = first or loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert first > 4.0
    assert loss.item() < 0.3


def test_optimizer_groups():
    """Muon for exactly the blocks' weight matrices, AdamW for the rest (embeddings, heads, LayerNorm
    weights), nothing twice."""
    model = tiny()
    muon, adamw = model.configure_optimizers(1e-3, 0.02, 0.1, (0.9, 0.95)).param_groups
    matrices = {id(p) for p in model.h.parameters() if p.dim() == 2}
    assert muon["muon"] and {id(p) for p in muon["params"]} == matrices
    assert not adamw["muon"] and {id(p) for p in adamw["params"]} == {id(p) for p in model.parameters()} - matrices
    assert (muon["lr"], adamw["lr"]) == (0.02, 1e-3) and muon["weight_decay"] == adamw["weight_decay"] == 0.1
    assert len(muon["params"]) + len(adamw["params"]) == len(list(model.parameters()))


def test_the_bigram_table_trains_at_bigram_lr_or_not_at_all():
    """The bigram table: a lookup (no FLOPs counted), in its own AdamW group at bigram_lr; at 0 (the
    default) in no group and without a gradient, while the rest still trains."""
    def model():
        torch.manual_seed(0)
        return GPT(GPTConfig(block_size=32, n_codebooks=4, codebook_size=64, n_layer=1, n_head=2, n_embd=32,
                             bigram=True)).train()
    assert model().get_num_params() == sum(p.numel() for n, p in model().named_parameters()
                                           if n.split(".")[0] not in ("wte", "wpe", "bigram"))
    codes = torch.randint(0, 64, (2, 4, 33))
    for bigram_lr, table_lr in ((1e-3, 1e-3), (5e-3, 5e-3), (0.0, None)):
        m = model()
        optimizer = m.configure_optimizers(1e-3, 0.02, 0.0, (0.9, 0.95), bigram_lr)
        groups = [g["lr"] for g in optimizer.param_groups if any(p is m.bigram.weight for p in g["params"])]
        assert groups == ([table_lr] if table_lr else [])
        table, head = m.bigram.weight.clone(), m.lm_heads.weight.clone()
        m(codes[:, :, :-1], codes[:, :, 1:])[1].backward()
        optimizer.step()
        assert torch.equal(m.bigram.weight, table) == (table_lr is None)
        assert m.bigram.weight.requires_grad == (table_lr is not None)
        assert not torch.equal(m.lm_heads.weight, head)


def test_orthogonalize_makes_singular_values_near_one():
    """Muon's Newton-Schulz step: singular values spread over two decades (as a gradient's are) all end
    up near 1 (the quintic iteration trades exactness for speed: ~[0.7, 1.2]), singular vectors kept."""
    torch.manual_seed(0)
    for rows, cols in ((64, 32), (32, 96)):
        n = min(rows, cols)
        U, _ = torch.linalg.qr(torch.randn(rows, n))
        V, _ = torch.linalg.qr(torch.randn(cols, n))
        S = torch.logspace(-2, 0, n) * 37.0                     # any overall scale
        O = orthogonalize(U @ torch.diag(S) @ V.T)
        singular = U.T @ O @ V                                  # diagonal if the singular vectors are kept
        assert torch.allclose(singular, torch.diag(singular.diag()), atol=1e-3)
        assert singular.diag().min() > 0.6 and singular.diag().max() < 1.25, singular.diag()


def test_adamw_groups_match_torch_adamw():
    """The AdamW half of MuonAdamW is AdamW: same updates as torch.optim.AdamW on the same gradients."""
    torch.manual_seed(0)
    ours, reference = torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(5, 3))
    reference.data.copy_(ours.data)
    mine = MuonAdamW([{"params": [ours], "lr": 1e-2}], betas=(0.9, 0.95), weight_decay=0.1)
    theirs = torch.optim.AdamW([reference], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    for _ in range(5):
        grad = torch.randn(5, 3)
        ours.grad, reference.grad = grad.clone(), grad.clone()
        mine.step()
        theirs.step()
    torch.testing.assert_close(ours, reference)


def test_mfu_uses_nanogpt_flop_formula():
    model = tiny()
    flops = 6 * model.get_num_params() + 12 * 2 * 32 * 64
    assert model.flops_per_step() == flops
    assert model.estimate_mfu(steps_per_second=1000, peak_flops=flops * 2000) == pytest.approx(0.5)
