"""Sliding-window attention (Mistral), checked against transformers' MistralForCausalLM and hand counts.

The oracle for the mask is transformers itself: MistralForCausalLM builds its own sliding-window mask (and,
given `position_ids` that restart and no attention mask or cache, its own packed-document mask), so nothing of
our masking code is shared with it. Compared in fp32: the summed loss to 1e-5 relative and every gradient to
1e-4 in norm on a packed batch whose documents are longer than the window (observed: loss about 1e-7, gradients
about 1e-6); the same model without the window is off by far more, so the comparison sees a window error. The
export is loaded back with `AutoModelForCausalLM` and its logits compared at positions past the window and
across packed documents, within 1e-4. The rolling KV cache is compared with a full recompute under the window
mask, for every chunking tried, within 1e-4.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from data.loader import IGNORE_INDEX
from pretrain.config import ConfigError, ModelConfig, compose_pretrain_config
from pretrain.evaluation.export import hf_name, hf_state_dict, mistral_config, write_hf_model
from pretrain.evaluation.generate import SamplingConfig, generate
from pretrain.model.flops import attended_pairs, causal_pairs, count_parameters, flops_per_token
from pretrain.model.kv_cache import KVCache, kv_cache_bytes
from pretrain.model.transformer import Transformer, attention_mask, dense_mask, flex_attention, keep_pair

transformers = pytest.importorskip("transformers")

WINDOW = 10
CFG = ModelConfig(
    name="w", vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=64,
    init_std=0.2, sliding_window=WINDOW, loss_chunk_size=0,
)  # fmt: skip
# Row 0: three documents (13, 30 and 21 tokens), two of them longer than the window; row 1: one document of 50
# and 14 tokens of padding (its own "document" with positions from 0, as the loader writes it).
LENGTHS = ([13, 30, 21], [50, 14])


def model_with_weights(cfg: ModelConfig = CFG) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():  # norm weights of ones would hide a norm mapped to the wrong place
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    return model


def packed_batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    rows = []
    for lengths in LENGTHS:
        document_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
        rows.append((document_ids, torch.cat([torch.arange(n) for n in lengths])))
    document_ids = torch.stack([d for d, _ in rows])
    document_ids[1, 50:] = -1
    position_ids = torch.stack([p for _, p in rows])
    # Ids from 3 on: transformers' embedding zeroes the gradient of its pad id (0 in the exported config).
    input_ids = torch.randint(3, CFG.vocab_size, (2, 64), generator=generator)
    labels = torch.roll(input_ids, -1, dims=1)
    last_of_document = torch.ones_like(document_ids, dtype=torch.bool)
    last_of_document[:, :-1] = document_ids[:, 1:] != document_ids[:, :-1]
    labels[last_of_document | (document_ids < 0)] = IGNORE_INDEX
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "document_ids": document_ids,
        "labels": labels,
    }


def hf_mistral(state: dict[str, torch.Tensor], attention: str, cfg: ModelConfig = CFG):
    config = mistral_config(cfg, bos_id=1, eos_id=2, pad_id=0, dtype="float32")
    model = transformers.MistralForCausalLM(
        transformers.MistralConfig(**config, attn_implementation=attention)
    )
    model.load_state_dict(hf_state_dict(state, cfg))
    return model


def hf_loss_sum(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    # No attention mask and no cache: transformers finds the documents from the restarting positions itself.
    logits = model(batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), reduction="sum")


def test_the_mask_keeps_w_keys_the_query_included_within_its_document():
    document_ids = packed_batch()["document_ids"]
    mask = attention_mask(CFG, 64, document_ids)
    assert mask.shape == (2, 1, 64, 64)
    for row in range(2):
        for q in range(64):
            for k in range(64):
                want = 0 <= q - k < WINDOW and bool(document_ids[row, q] == document_ids[row, k])
                assert bool(mask[row, 0, q, k]) is want, (row, q, k)
    assert int(mask[0, 0, 40].sum()) == WINDOW  # well inside a long document: exactly W keys
    # One document per row still needs a mask once the sequence is longer than the window, not before.
    one_document = torch.zeros(2, 64, dtype=torch.long)
    assert attention_mask(CFG, 64, one_document) is not None
    assert attention_mask(CFG, WINDOW, one_document[:, :WINDOW]) is None
    assert attention_mask(replace(CFG, sliding_window=None), 64, one_document) is None


def test_windowed_loss_and_gradients_equal_transformers_mistral():
    ours = model_with_weights()
    batch = packed_batch()
    loss = ours(
        batch["input_ids"],
        position_ids=batch["position_ids"],
        document_ids=batch["document_ids"],
        labels=batch["labels"],
        reduction="sum",
    )
    loss.backward()
    grads = {hf_name(name): param.grad for name, param in ours.named_parameters()}
    for attention in ("eager", "sdpa"):
        model = hf_mistral(ours.state_dict(), attention)
        theirs = hf_loss_sum(model, batch)
        theirs.backward()
        assert abs(loss.item() - theirs.item()) / abs(theirs.item()) < 1e-5, attention
        for name, param in model.named_parameters():
            assert float((grads[name] - param.grad).norm() / param.grad.norm()) < 1e-4, (attention, name)

    full = Transformer(replace(CFG, sliding_window=None))
    full.load_state_dict(ours.state_dict())
    with torch.no_grad():  # the same weights without the window: the comparison above would see it
        unwindowed = full(
            batch["input_ids"], batch["position_ids"], batch["document_ids"], batch["labels"], None, "sum"
        )
    assert abs(unwindowed.item() - loss.item()) / loss.item() > 1e-3


@pytest.mark.skipif(flex_attention is None, reason="FlexAttention needs torch >= 2.5")
def test_flex_block_mask_and_sdpa_mask_come_from_one_predicate():
    from torch.nn.attention.flex_attention import create_mask

    document_ids = packed_batch()["document_ids"]
    predicate = keep_pair(document_ids, WINDOW)
    assert torch.equal(
        create_mask(predicate, 2, None, 64, 64, device="cpu"), dense_mask(predicate, 2, 64, "cpu")
    )
    # FlexAttention runs forward only on CPU: the same logits as SDPA with the dense mask.
    sdpa, flex = model_with_weights(), model_with_weights(replace(CFG, attention="flex"))
    batch = packed_batch()
    with torch.no_grad():
        want = sdpa(batch["input_ids"], batch["position_ids"], batch["document_ids"])
        got = flex(batch["input_ids"], batch["position_ids"], batch["document_ids"])
        unpacked = flex(batch["input_ids"])  # no documents: the window alone, one mask for every row
        unpacked_want = sdpa(batch["input_ids"])
    assert (got - want).abs().max().item() < 1e-4
    assert (unpacked - unpacked_want).abs().max().item() < 1e-4


@pytest.mark.parametrize("cuts", [[5], [12], [3, 9, 20], list(range(1, 40))], ids=str)
def test_rolling_cache_gives_the_full_windowed_logits(cuts):
    model = model_with_weights().eval()
    tokens = torch.randint(0, CFG.vocab_size, (2, 40), generator=torch.Generator().manual_seed(5))
    cache = KVCache(CFG, batch=2, capacity=40)
    with torch.no_grad():
        want = model(tokens)
        pieces, start = [], 0
        for end in [*cuts, 40]:
            pieces.append(model(tokens[:, start:end], cache=cache))
            start = end
    assert cache.keys.shape[3] == WINDOW  # a ring of W slots, not 40 positions
    assert (torch.cat(pieces, dim=1) - want).abs().max().item() < 1e-4


def test_a_full_size_cache_with_the_window_as_a_mask_gives_the_ring_logits():
    """`ring=False` (every position kept, the window applied by the mask: what the ring is benchmarked against)
    decodes past W to the same logits as the ring."""
    model = model_with_weights().eval()
    tokens = torch.randint(0, CFG.vocab_size, (1, 40), generator=torch.Generator().manual_seed(6))
    outputs = []
    for ring in (True, False):
        cache = KVCache(CFG, batch=1, capacity=40, ring=ring)
        with torch.no_grad():
            outputs.append(torch.cat([model(tokens[:, :3], cache=cache)]
                                     + [model(tokens[:, t : t + 1], cache=cache) for t in range(3, 40)], dim=1))  # fmt: skip
        assert cache.keys.shape[3] == (WINDOW if ring else 40)
    assert (outputs[0] - outputs[1]).abs().max().item() < 1e-5


def test_generation_past_the_window_keeps_memory_flat_and_the_tokens():
    model = model_with_weights().eval()
    sampling = SamplingConfig(max_new_tokens=50, temperature=0.0)
    prompt = [1, 17, 99, 4, 23]
    assert generate(model, prompt, sampling) == generate(model, prompt, sampling, use_cache=False)
    assert (
        kv_cache_bytes(CFG, 64)
        == kv_cache_bytes(CFG, WINDOW)
        < kv_cache_bytes(replace(CFG, sliding_window=None), 64)
    )


@pytest.fixture(scope="module")
def tokenizer_dir(debug_artifacts) -> str:
    return compose_pretrain_config(["+experiment=debug", f"paths.artifacts={debug_artifacts}"]).tokenizer.dir


@pytest.mark.slow
def test_export_is_a_mistral_that_transformers_reads_as_we_train(tokenizer_dir, tmp_path):
    ours = model_with_weights(replace(CFG, vocab_size=512)).eval()
    out = write_hf_model(tmp_path / "hf", ours.state_dict(), ours.cfg, tokenizer_dir)
    config = json.loads((Path(out) / "config.json").read_text())
    assert (config["model_type"], config["sliding_window"]) == ("mistral", WINDOW)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert type(theirs).__name__ == "MistralForCausalLM"
    batch = packed_batch()
    with torch.no_grad():
        # Whole rows of 64 tokens (positions far past the window), then the packed documents.
        assert (theirs(batch["input_ids"]).logits - ours(batch["input_ids"])).abs().max().item() <= 1e-4
        packed = theirs(batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        want = ours(batch["input_ids"], batch["position_ids"], batch["document_ids"])
    assert (packed - want).abs().max().item() <= 1e-4


def brute_force_pairs(lengths: list[int], window: int | None) -> int:
    return sum(1 for n in lengths for q in range(n) for k in range(q + 1) if window is None or q - k < window)


def test_attention_flops_count_the_pairs_inside_the_window():
    # The FLOP count takes a document of L <= W tokens as L^2 / 2 pairs (q = k as half a pair, the convention
    # of 6N + attention), so the pairs counted one by one exceed it by min(L, W) / 2 a document.
    document_ids = packed_batch()["document_ids"]
    lengths = [n for row in LENGTHS for n in row]  # padding counts as a document: the kernels compute it
    for window in (None, 1, WINDOW, 64):
        exact = sum(brute_force_pairs([n], window) - min(n, window or n) / 2 for n in lengths)
        assert attended_pairs(document_ids, window) == exact, window
        assert sum(causal_pairs(n, window) for n in lengths) == exact, window
    # No window and a window as long as the sequence cost the same; a window of 16 on 4096 tokens, its band.
    unwindowed = replace(CFG, sliding_window=None)
    assert flops_per_token(unwindowed, 64) == flops_per_token(replace(CFG, sliding_window=64), 64)
    per_pair = 12 * CFG.n_layers * CFG.n_heads * CFG.head_dim
    full, band = (flops_per_token(replace(CFG, sliding_window=w), 4096, "causal") for w in (None, 16))
    assert full - band == pytest.approx(per_pair * (4096 / 2 - (16 * 16 / 2 + (4096 - 16) * 16) / 4096))
    dense = full - per_pair * 4096 / 2  # 6N: the part without attention
    assert flops_per_token(replace(CFG, sliding_window=16), 4096) - dense == pytest.approx(2 * (band - dense))


def test_mistral_7b_has_the_published_shape_and_transformers_counts_the_same_parameters():
    cfg = compose_pretrain_config(["+experiment=mistral_7b"])
    model = cfg.model
    assert (model.sliding_window, model.kv_heads, model.ffn_dim) == (4096, 8, 14336)
    ours = count_parameters(model)
    config = transformers.MistralConfig(
        **mistral_config(model, bos_id=1, eos_id=2, pad_id=0, dtype="bfloat16")
    )
    with torch.device("meta"):
        theirs = sum(p.numel() for p in transformers.MistralForCausalLM(config).parameters())
    assert ours == theirs == 7_241_732_096  # 7.24B, the released model's


@pytest.mark.parametrize("bad", [0, -4])
def test_a_window_below_one_token_is_refused_with_its_key(bad):
    with pytest.raises(ConfigError, match=r"model\.sliding_window"):
        compose_pretrain_config(["+experiment=debug", f"model.sliding_window={bad}"])
