"""Which attention kernel each call takes: the unmasked SDPA fast paths, FlexAttention's padded tail batches,
and the bound on compiled shapes that keeps compiled FlexAttention from silently running eagerly."""

from __future__ import annotations

import functools
import warnings
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from pretrain.model import transformer as model_module
from pretrain.model.rope import rope_tables
from tests.pretrain.model.test_model import TINY, build, packed_batch


class SdpaCalls:
    """Records how scaled_dot_product_attention is called, then runs the real kernel."""

    def __init__(self, monkeypatch):
        self.calls: list[dict] = []
        real = F.scaled_dot_product_attention

        def spy(q, k, v, attn_mask=None, is_causal=False, **kwargs):
            self.calls.append({"mask": attn_mask, "causal": is_causal, "keys": k.shape[2]})
            return real(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kwargs)

        monkeypatch.setattr(model_module.F, "scaled_dot_product_attention", spy)


@torch.no_grad()
def test_one_document_per_row_needs_no_mask_and_matches_the_document_mask(monkeypatch):
    """Rows of a single document take the causal fast path and give what the explicit mask gives."""
    model = build(n_kv_heads=2).eval()
    ids = torch.randint(0, TINY.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    one_doc = torch.tensor([[0] * 16, [5] * 16])
    causal = torch.ones(16, 16, dtype=torch.bool).tril()[None, None]
    expected = []  # the explicit boolean mask, computed by SDPA itself, layer by layer
    x = model.embed_tokens(ids)
    cos, sin = rope_tables(torch.arange(16).expand(2, 16), TINY.head_dim, TINY.rope_theta)
    for layer in model.layers:
        x = layer(x, cos, sin, causal.expand(2, 1, 16, 16))
    expected = model.lm_head(model.norm(x))
    spy = SdpaCalls(monkeypatch)
    out = model(ids, document_ids=one_doc)
    assert all(c["causal"] and c["mask"] is None for c in spy.calls) and len(spy.calls) == TINY.n_layers
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    spy.calls.clear()
    _, input_ids, document_ids, position_ids = packed_batch([5, 9, 4], total=20)
    model(input_ids, position_ids=position_ids, document_ids=document_ids)
    assert all(c["mask"] is not None and c["mask"].dtype == torch.bool for c in spy.calls)


@pytest.mark.skipif(model_module.flex_attention is None, reason="this torch has no FlexAttention")
@torch.no_grad()
def test_flex_pads_a_tail_batch_to_the_largest_batch_and_returns_its_rows():
    """A smaller batch after a larger one runs on the larger one's shape (padding rows) with unchanged rows."""
    flex, sdpa = build(attention="flex", n_kv_heads=2).eval(), build(attention="sdpa", n_kv_heads=2).eval()
    length = 24  # a length no other test uses, so the largest batch seen here is this test's own
    _, input_ids, document_ids, position_ids = packed_batch([7, 3, 10], total=length)
    full = [t.expand(4, length).clone() for t in (input_ids, document_ids, position_ids)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert model_module.attention_mask(flex.cfg, length, full[1]).shape[0] == 4
        tail_mask = model_module.attention_mask(flex.cfg, length, full[1][:3])
        assert tail_mask.shape[0] == 4  # padded up to the full batch: no new shape to compile
        tail = flex(full[0][:3], position_ids=full[2][:3], document_ids=full[1][:3])
    reference = sdpa(full[0][:3], position_ids=full[2][:3], document_ids=full[1][:3])
    assert tail.shape == reference.shape
    torch.testing.assert_close(tail, reference, atol=1e-5, rtol=1e-5)


def test_compiled_calls_refuse_a_shape_past_the_budget_before_dynamo_falls_back_to_eager():
    """Dynamo itself is the oracle: with its limit made an error, `shape_budget()` shapes compile without
    reaching it, one more reaches it; our wrapper refuses that one first, naming what to change."""
    from pretrain.model.flex_compile import ShapeBoundedCompile, shape_budget

    torch._dynamo.reset()
    eager_backend = functools.partial(torch.compile, backend="eager")

    def scaled(x):
        return x * 2

    bounded = ShapeBoundedCompile(scaled, compile_fn=eager_backend)
    raw = torch.compile(scaled, backend="eager", dynamic=False)
    budget = shape_budget()
    assert budget < torch._dynamo.config.recompile_limit
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        for n in range(1, budget + 1):
            assert torch.equal(bounded(torch.ones(n)), torch.full((n,), 2.0))
            assert torch.equal(bounded(torch.ones(n)), torch.full((n,), 2.0))  # a seen shape is free
        with pytest.raises(RuntimeError, match=r"model\.attention=sdpa"):
            bounded(torch.ones(budget + 1))
        with pytest.raises(Exception, match="recompile"):  # what the budget protects against
            for n in range(1, torch._dynamo.config.recompile_limit + 2):
                raw(torch.ones(n))
    torch._dynamo.reset()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled FlexAttention runs on CUDA only")
@torch.no_grad()
def test_compiled_flex_on_cuda_takes_tail_batches_without_new_shapes():
    """Evaluation's tail batches (4, then 3, 2, 1 rows) reuse one compiled shape and match the SDPA path."""
    _, input_ids, document_ids, position_ids = packed_batch([70, 30, 100], total=256)
    rows = [t.expand(4, 256).clone().cuda() for t in (input_ids, document_ids, position_ids)]
    flex = build(attention="auto", n_kv_heads=2, max_seq_len=256).cuda().eval()
    sdpa = build(attention="sdpa", n_kv_heads=2, max_seq_len=256).cuda().eval()
    seen = model_module._compiled.get("flex_attention")
    before = len(seen.shapes) if seen else 0  # earlier tests in this process may have compiled other shapes
    for batch in (4, 3, 2, 1):
        ids, docs, pos = (t[:batch] for t in rows)
        out = flex(ids, position_ids=pos, document_ids=docs)
        torch.testing.assert_close(out, sdpa(ids, position_ids=pos, document_ids=docs), atol=1e-4, rtol=1e-4)
    assert len(model_module._compiled["flex_attention"].shapes) - before <= 1  # not one per batch size


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA attention path needs a CUDA device")
def test_document_masked_loss_on_cuda_equals_transformers():
    """Our CUDA path (compiled FlexAttention) against transformers' SDPA with an explicit document mask, both
    fp32 on the GPU, on the packed batch of the CPU parity test: loss to 1e-4 relative, gradients to 1e-3."""
    from tests.pretrain.model.test_parity import (
        document_causal_mask,
        hf_llama,
        hf_loss_sum,
        synthetic_packed_batch,
    )

    cfg = replace(TINY, vocab_size=512, dim=64, n_kv_heads=2, ffn_dim=176, init_std=0.2, attention="auto")
    ours = build(**{k: getattr(cfg, k) for k in ("vocab_size", "dim", "n_kv_heads", "ffn_dim", "init_std")})
    batch = synthetic_packed_batch(cfg.vocab_size, pad_id=0)
    mask = document_causal_mask(batch["document_ids"], "sdpa").cuda()
    theirs = hf_llama(ours.cfg, ours.state_dict(), "sdpa").cuda()
    batch = {k: v.cuda() for k, v in batch.items()}
    ours = ours.cuda()
    loss = ours(
        **{k: batch[k] for k in ("input_ids", "position_ids", "document_ids", "labels")}, reduction="sum"
    )
    reference = hf_loss_sum(theirs, batch, mask)
    loss.backward()
    reference.backward()
    assert abs(loss.item() - reference.item()) / abs(reference.item()) < 1e-4
    got, want = ours.layers[0].attn.k_proj.weight.grad, theirs.model.layers[0].self_attn.k_proj.weight.grad
    assert float((got - want).norm() / want.norm()) < 1e-3
