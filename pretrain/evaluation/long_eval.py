"""Does a model use its context? Loss by position, a copy probe and passkey retrieval.

Each measurement is a pure function: a model, a tokenizer and token data in, a plain dict out. No measurement
reads or writes files (only `held_out_documents` opens shards, once, before measuring), every random choice
comes from a seed, and nothing depends on the rank, so the trainer can call the same functions on every rank
of a ZeRO-3 model (each forward pass gathers the same parameters on every rank) and let rank 0 write the
result. `pretrain.evaluation.long_report` runs them all with one settings object
(`python -m pretrain.evaluate runs/<name> long_context=true` on one process, the trainer on its ranks).

* Loss by position: mean next-token loss per position bucket over held-out documents read from their first
  token, one document per sequence, so the prediction at position t has exactly t + 1 tokens of the same
  document before it. A model that uses long context keeps lowering its loss in the late buckets.
* Copy probe: [BOS] + X + X for a random X of d ordinary tokens. X is unpredictable the first time and exactly
  predictable the second time by looking back d tokens, so a second-copy loss far below the first shows that
  the model reads context at distance d.
* Passkey retrieval: a random key hidden in repetitive filler at a chosen depth, then a question; the greedy
  continuation (KV cache) must be the key. Prompts are assembled from token ids, so length and depth are exact.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from data.log import get_logger
from data.manifest import load_split
from data.packing import DocumentStore, ShardDocumentStore
from pretrain.config import require
from pretrain.evaluation.generate import SamplingConfig, continuation, generate
from pretrain.model.transformer import Transformer

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from data.config import DataConfig
    from data.tokenizer import TokenizerInfo

log = get_logger(__name__)

FIRST_BUCKET = 16  # default bucket edges: 0, 16, 32, 64, ... (powers of two), then the length
ANSWER_SLACK = 2  # generated tokens beyond the key's digits: a leading space and one token to see the key end
DEPTH_DEFINITION = (
    "the share of the filler tokens placed before the needle: the needle starts at token "
    "len([BOS] + intro) + round(depth * filler tokens); 0 = right after the intro, 1 = right before the question"
)


# -- shared helpers ---------------------------------------------------------------------------------------


def check_length(model: Transformer, tokens: int, key: str) -> None:
    """Fail, naming `key`, when a forward pass of `tokens` positions does not fit model.max_seq_len."""
    window = model.cfg.max_seq_len
    require(
        tokens <= window,
        key,
        f"needs {tokens} positions but the model's max_seq_len is {window}; evaluate within the window, or "
        "train a stage with a larger model.max_seq_len (as the long-context stage does)",
    )


def _device(model: Transformer) -> torch.device:
    return next(model.parameters()).device


def _autocast(device: torch.device) -> Any:
    """bf16 autocast on CUDA as in training; the model's own dtype elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


@torch.no_grad()
def token_losses(model: Transformer, tokens: torch.Tensor, chunk_rows: int = 2048) -> torch.Tensor:
    """Per-token next-token loss [B, T] (fp32, on CPU) of `tokens` [B, T + 1]: entry t is the loss of
    token t + 1 given tokens 0..t, each row one sequence from position 0 with plain causal attention.

    Logits are upcast to fp32 `chunk_rows` at a time, so a long sequence never holds [T, V] in fp32 at once.
    """
    device = _device(model)
    tokens = torch.as_tensor(tokens, dtype=torch.long, device=device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    with _autocast(device):
        logits = model(inputs)
    flat, labels = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    pieces = [
        F.cross_entropy(flat[i : i + chunk_rows].float(), labels[i : i + chunk_rows], reduction="none")
        for i in range(0, flat.shape[0], chunk_rows)
    ]
    return torch.cat(pieces).view_as(targets).cpu()


def _batched_losses(model: Transformer, sequences: np.ndarray, micro_batch_size: int) -> torch.Tensor:
    """`token_losses` of every row of `sequences`, `micro_batch_size` rows per forward pass."""
    step = max(1, micro_batch_size)
    rows = [
        token_losses(model, torch.from_numpy(sequences[i : i + step])) for i in range(0, len(sequences), step)
    ]
    return torch.cat(rows) if rows else torch.zeros(0, max(0, sequences.shape[1] - 1))


# -- loss by position -------------------------------------------------------------------------------------


def held_out_documents(data: DataConfig, info: TokenizerInfo, split: str = "val") -> dict[str, DocumentStore]:
    """Every source's documents of a split, straight from its shards (no packing: documents stay whole)."""
    return {
        name: ShardDocumentStore(
            load_split(data.shards_dir, name, split, expected_fingerprint=info.fingerprint)
        )
        for name in data.sources
    }


def document_prefixes(
    documents: Mapping[str, DocumentStore], length: int, count: int, seed: int = 0
) -> tuple[np.ndarray, list[tuple[str, int]]]:
    """The first `length + 1` tokens of up to `count` documents that have that many, and which ones they are.

    Every source's documents are eligible (in source order); when more qualify than `count`, a seeded choice
    picks them, kept in that order. A row starts at its document's first token (its BOS when the run's
    documents have one), so positions are positions within the document, as in training.
    """
    eligible = [
        (name, int(i))
        for name, store in documents.items()
        for i in np.flatnonzero(np.asarray(store.doc_lengths()) >= length + 1)
    ]
    if len(eligible) > count:
        chosen = np.sort(np.random.default_rng([seed, length]).choice(len(eligible), count, replace=False))
        eligible = [eligible[i] for i in chosen]
    rows = [np.asarray(documents[name].read(i, 0, length + 1), dtype=np.int64) for name, i in eligible]
    sequences = np.stack(rows) if rows else np.zeros((0, length + 1), dtype=np.int64)
    return sequences, eligible


def default_buckets(length: int, first: int = FIRST_BUCKET) -> list[int]:
    """Bucket edges 0, first, 2 * first, 4 * first, ... below `length`, then `length`."""
    edges, edge = [0], first
    while edge < length:
        edges.append(edge)
        edge *= 2
    return [*edges, length]


def bucket_means(losses: torch.Tensor, edges: Sequence[int]) -> list[dict[str, Any]]:
    """Mean of the per-token `losses` [N, T] over the positions [edges[i], edges[i + 1]) of every row."""
    buckets = []
    for start, end in itertools.pairwise(edges):
        part = losses[:, start:end]
        loss = float(part.double().mean()) if part.numel() else None
        buckets.append({"start": int(start), "end": int(end), "loss": loss, "tokens": int(part.numel())})
    return buckets


def position_loss(
    model: Transformer,
    sequences: np.ndarray,
    edges: Sequence[int] | None = None,
    micro_batch_size: int = 4,
) -> dict[str, Any]:
    """Mean next-token loss per position bucket over `sequences` [N, length + 1] (one document each).

    Position t is the prediction made after tokens 0..t (of token t + 1); bucket [a, b) averages positions
    a..b-1 of every row, each row weighing the same. `per_position` is the mean over rows at every position.
    """
    length = sequences.shape[1] - 1
    check_length(model, length, "length")
    edges = list(edges) if edges is not None else default_buckets(length)
    require(
        edges[0] == 0 and edges[-1] == length and all(a < b for a, b in itertools.pairwise(edges)),
        "position_buckets",
        f"must rise strictly from 0 to the length {length}, got {edges}",
    )
    losses = _batched_losses(model, sequences, micro_batch_size)
    per_position = losses.double().mean(dim=0).tolist() if len(losses) else []
    return {
        "length": length,
        "sequences": len(sequences),
        "buckets": bucket_means(losses, edges),
        "per_position": per_position,
    }


# -- copy probe ------------------------------------------------------------------------------------------


def ordinary_token_ids(tokenizer: Tokenizer, vocab_size: int) -> np.ndarray:
    """Ids below `vocab_size` that are not special tokens (BOS, EOS, padding, unknown, extras)."""
    special = {i for i, token in tokenizer.get_added_tokens_decoder().items() if token.special}
    return np.array([i for i in range(vocab_size) if i not in special], dtype=np.int64)


def copy_sequences(pool: np.ndarray, distance: int, trials: int, seed: int, bos_id: int | None) -> np.ndarray:
    """`trials` rows of [BOS] + X + X (no BOS when `bos_id` is None), X = `distance` tokens drawn from `pool`
    (without repeats when the pool is large enough, so the only way to predict X is the first copy)."""
    rng = np.random.default_rng([seed, distance])
    head = [] if bos_id is None else [bos_id]
    rows = []
    for _ in range(trials):
        x = rng.choice(pool, size=distance, replace=distance > len(pool))
        rows.append(np.concatenate([np.array(head, dtype=np.int64), x, x]))
    return np.stack(rows).astype(np.int64) if rows else np.zeros((0, len(head) + 2 * distance), np.int64)


def copy_probe(
    model: Transformer,
    pool: np.ndarray,
    distances: Sequence[int],
    trials: int,
    *,
    seed: int = 0,
    bos_id: int | None = None,
    micro_batch_size: int = 4,
) -> dict[str, Any]:
    """First- and second-copy loss of [BOS] + X + X for each distance d = len(X).

    Both means leave out the first token of their copy: nothing marks where the repeat starts, so the second
    copy's first token is as unpredictable as any first-copy token. Each covers trials x (d - 1) tokens.
    `chance_loss` is ln(pool size), the loss of a uniform guess over the pool.
    """
    require(trials >= 1, "copy_trials", f"must be at least 1 to measure anything, got {trials}")
    head = 0 if bos_id is None else 1
    results = []
    for d in distances:
        require(d >= 2, "copy_distances", f"must be at least 2, got {d}")
        check_length(model, head + 2 * d - 1, "copy_distances")
        losses = _batched_losses(model, copy_sequences(pool, d, trials, seed, bos_id), micro_batch_size)
        # target index j is the loss of token j + 1; the copies' tokens sit at head + [0, d) and head + [d, 2d)
        first, second = losses[:, head : head + d - 1], losses[:, head + d : head + 2 * d - 1]
        results.append(
            {
                "distance": int(d),
                "first_copy_loss": float(first.double().mean()),
                "second_copy_loss": float(second.double().mean()),
                "tokens": int(second.numel()),
            }
        )
    return {"trials": trials, "chance_loss": math.log(len(pool)), "distances": results}


# -- passkey retrieval ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PasskeyTemplate:
    """The texts of a passkey prompt; `{key}` in the needle is replaced by the key. Every piece but the intro
    starts with a space, so its ids joined to the previous piece's decode to the intended text."""

    intro: str = (
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
        "I will quiz you about the important information there."
    )
    filler: str = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
    needle: str = " The pass key is {key}. Remember it. {key} is the pass key."
    question: str = " What is the pass key? The pass key is"


@dataclass(frozen=True)
class PasskeyPrompt:
    """A prompt's ids and where its parts are, in tokens."""

    ids: list[int]
    key: str
    needle_start: int  # the needle is ids[needle_start : needle_start + needle_length]
    needle_length: int
    filler_start: int  # first filler token (the end of BOS + intro)
    filler_tokens: int  # filler tokens in all, before and after the needle


def passkey_keys(trials: int, digits: int, seed: int = 0) -> list[str]:
    """`trials` random keys of exactly `digits` digits (no leading zero), the same for every (length, depth)."""
    rng = np.random.default_rng([seed, digits])
    return [str(int(k)) for k in rng.integers(10 ** (digits - 1), 10**digits, size=trials)]


def _encode(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids if text else []


def _parts(
    tokenizer: Tokenizer, template: PasskeyTemplate, key: str, bos_id: int | None
) -> tuple[list[int], list[int], list[int]]:
    """The ids of [BOS] + intro, of the needle holding `key`, and of the question."""
    prefix = ([] if bos_id is None else [bos_id]) + _encode(tokenizer, template.intro)
    return prefix, _encode(tokenizer, template.needle.format(key=key)), _encode(tokenizer, template.question)


def build_passkey_prompt(
    tokenizer: Tokenizer,
    template: PasskeyTemplate,
    length: int,
    depth: float,
    key: str,
    bos_id: int | None = None,
) -> PasskeyPrompt:
    """[BOS] + intro + filler[:a] + needle + filler[a:F] + question, exactly `length` tokens.

    The filler is the template's filler tokens repeated and cut to the F tokens left once the other parts are
    in. Depth is the share of the filler that comes before the needle: a = round(depth * F) filler tokens
    precede it, so depth 0 puts the needle right after the intro and depth 1 right before the question, and the
    needle starts at token len([BOS] + intro) + a.
    """
    require(0.0 <= depth <= 1.0, "passkey_depths", f"must be in [0, 1], got {depth}")
    prefix, needle, question = _parts(tokenizer, template, key, bos_id)
    filler_tokens = length - len(prefix) - len(needle) - len(question)
    require(
        filler_tokens >= 0,
        "passkey_lengths",
        f"{length} tokens cannot hold the passkey prompt: BOS, intro, needle and question alone take "
        f"{length - filler_tokens} tokens with this tokenizer (shorten the template or ask for longer prompts)",
    )
    unit = _encode(tokenizer, template.filler)
    require(bool(unit) or filler_tokens == 0, "passkey_filler", "is empty but filler is needed")
    stream = (unit * (filler_tokens // max(1, len(unit)) + 1))[:filler_tokens]
    at = math.floor(depth * filler_tokens + 0.5)
    ids = prefix + stream[:at] + needle + stream[at:] + question
    return PasskeyPrompt(ids, key, len(prefix) + at, len(needle), len(prefix), filler_tokens)


def answer_digits(text: str) -> str | None:
    """The run of digits a continuation starts with (after optional whitespace), or None."""
    match = re.match(r"\s*(\d+)", text)
    return match.group(1) if match else None


def passkey_correct(text: str, key: str) -> bool:
    """Exact match: the continuation's leading digits are the key, no digit more or less."""
    return answer_digits(text) == key


def passkey_grid(
    model: Transformer,
    tokenizer: Tokenizer,
    template: PasskeyTemplate,
    lengths: Sequence[int],
    depths: Sequence[float],
    keys: Sequence[str],
    *,
    bos_id: int | None = None,
    eos_id: int | None = None,
) -> dict[str, Any]:
    """Exact-match accuracy of greedy decoding (KV cache) for every (length, depth) cell over `keys`."""
    cells = []
    for length in lengths:
        for depth in depths:
            correct, answers, starts = 0, [], []
            for key in keys:
                prompt = build_passkey_prompt(tokenizer, template, length, depth, key, bos_id)
                budget = len(key) + ANSWER_SLACK
                check_length(model, length + budget, "passkey_lengths")
                with _autocast(_device(model)):
                    new = generate(
                        model, prompt.ids, SamplingConfig(max_new_tokens=budget, temperature=0), eos_id
                    )
                text = continuation(tokenizer, prompt.ids, new)
                correct += passkey_correct(text, key)
                answers.append(text)
                starts.append(prompt.needle_start)
            cells.append(
                {
                    "length": int(length),
                    "depth": float(depth),
                    "correct": correct,
                    "trials": len(keys),
                    "accuracy": correct / len(keys) if keys else None,
                    "needle_starts": starts,
                    "answers": answers,
                }
            )
    total = sum(c["trials"] for c in cells)
    return {
        "lengths": [int(x) for x in lengths],
        "depths": [float(x) for x in depths],
        "keys": list(keys),
        "accuracy": sum(c["correct"] for c in cells) / total if total else None,
        "cells": cells,
    }


def minimum_passkey_length(
    tokenizer: Tokenizer, template: PasskeyTemplate, keys: Sequence[str], bos_id: int | None
) -> int:
    """The fewest tokens a prompt with any of `keys` can have: BOS, intro, needle and question, no filler."""
    return max(
        (sum(len(part) for part in _parts(tokenizer, template, key, bos_id)) for key in keys), default=0
    )


def default_passkey_lengths(top: int, minimum: int) -> list[int]:
    """A quarter, half, three quarters and all of `top`, keeping those that fit the prompt's fixed part."""
    return sorted({n for n in (top // 4, top // 2, 3 * top // 4, top) if n >= minimum})


def default_copy_distances(length: int) -> list[int]:
    """16, 32, 64, ... up to half of `length`, and half of `length` itself (every X + X then fits)."""
    half, distances, d = length // 2, [], FIRST_BUCKET
    while d <= half:
        distances.append(d)
        d *= 2
    return distances if half in distances or half < 2 else [*distances, half]
