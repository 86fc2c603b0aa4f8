"""The training recipe's pieces on a tiny model: deterministic data, tokenizer specials, losses and gradients.

Why: the shipped checkpoint is only as reproducible as these pieces; the full run takes ~45 min on a CPU,
so the parts that decide what it computes are checked here in seconds.
"""
from __future__ import annotations

import numpy as np
import torch

from model_shards.mtp import MTPBlock
from model_shards.presets import get_preset
from model_shards.model import HybridModel
from training import corpus, data
from training.balance import ExpertBalancer
from training.forward import losses
from training.init import init_weights
from training.tokenizer import SPECIAL_TOKENS, train_tokenizer


def test_file_list_is_sorted_and_every_20th_file_is_held_out(tmp_path):
    for name in ["b.py", "a.py", "site-packages/x.py", "pkg/c.py", "notes.txt"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x = 1\n")
    files = corpus.list_files(tmp_path)
    assert [str(p.relative_to(tmp_path)) for p in files] == ["a.py", "b.py", "pkg/c.py"]
    texts = [(f"f{i}", "") for i in range(45)]
    train, held = corpus.split(texts)
    assert [p for p, _ in held] == ["f0", "f20", "f40"] and len(train) == 42


def test_tokenizer_specials_and_round_trip():
    tok = train_tokenizer(["def f(x):\n    return x + 1\n"] * 50, vocab_size=300)
    assert [tok.token_to_id(s) for s in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    text = "def g(y):\n\treturn 'é' * y  # ☃\n"
    assert tok.decode(tok.encode(text).ids) == text


def test_windows_depend_only_on_seed_and_step():
    stream = np.arange(10_000, dtype=np.int32)
    a = data.sample_windows(stream, 4, 19, seed=1, step=7)
    assert np.array_equal(a, data.sample_windows(stream, 4, 19, seed=1, step=7))
    assert not np.array_equal(a, data.sample_windows(stream, 4, 19, seed=1, step=8))
    assert np.all(np.diff(a, axis=1) == 1)                       # contiguous windows


def test_losses_train_backbone_and_both_mtp_variants_separately():
    cfg = get_preset("tiny")
    torch.manual_seed(0)
    model = HybridModel(cfg)
    init_weights(model, cfg.num_hidden_layers, seed=0)
    alt = MTPBlock(cfg)
    alt.load_state_dict(model.mtp.state_dict())
    mtps = {"prenorm": model.mtp, "postnorm": alt}
    window = torch.randint(3, cfg.vocab_size, (2, 20 + 3))
    parts = losses(model, mtps, window, mtp_rows=torch.arange(0, 40, 3))
    assert set(parts) == {"main", "prenorm_d1", "prenorm_d2", "postnorm_d1", "postnorm_d2"}
    assert all(torch.isfinite(v) for v in parts.values())
    (parts["prenorm_d1"] + parts["prenorm_d2"]).backward()      # an MTP loss alone...
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("mtp."))
    assert all(p.grad is None for p in alt.parameters())         # ...trains only its own block
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.mtp.parameters())
    parts["main"].backward()
    assert model.backbone.embeddings.weight.grad.abs().sum() > 0


def test_balancer_moves_the_selection_bias_toward_even_load():
    cfg = get_preset("tiny")
    model = HybridModel(cfg).train()
    init_weights(model, cfg.num_hidden_layers, seed=1)
    balancer = ExpertBalancer([model], rate=0.01)
    router = balancer.routers[0]
    router.weight.data.zero_()
    router.weight.data[0] += 1.0                                   # expert 0 wins every token
    x = torch.randn(50, cfg.hidden_size).abs()
    router(x)
    mean_ratio, worst = balancer.step()
    assert worst > 1.0 and router.e_score_correction_bias[0] < 0
