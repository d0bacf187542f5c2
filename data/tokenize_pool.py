"""Batch tokenizing for `data.prepare`: texts in, documents of token ids out ([BOS] + ids + [EOS], or ids + [EOS]
with `data.add_bos=false`), on a pool of single-threaded workers.

A process pool was measured against Rust threads (`encode_batch_fast` over all cores in one process) on 2 cores:
the same speed within noise there, but the pool also spreads the id-list-to-numpy conversion over the cores,
which a single process cannot.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os

import numpy as np
from tokenizers import Tokenizer

from data.shards import token_dtype
from data.tokenizer import TokenizerInfo

# Texts per tokenizer job: large enough to amortise inter-process transfer, small enough to keep all workers
# busy and memory flat (256 KiB - 4 MiB measured alike on 2 cores).
BATCH_CHARS = 1 << 20
BATCH_DOCS = 2048
JOBS_IN_FLIGHT_PER_WORKER = 2


def encode_documents(
    tokenizer: Tokenizer, texts: list[str], eos_id: int, dtype: np.dtype, bos_id: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of `texts` back to back, each as [BOS] + ids + [EOS] (no BOS when `bos_id` is None), and the
    length of each (BOS and EOS included).

    A special token's spelling inside a document ("</s>" in a tutorial, "<pad>" in HTML) is text like any
    other: left to the tokenizer's default it would become the special id itself, an end of document in the
    middle of one."""
    tokenizer.encode_special_tokens = True
    encode = getattr(tokenizer, "encode_batch_fast", None) or tokenizer.encode_batch
    ids = [encoding.ids for encoding in encode(texts, add_special_tokens=False)]
    head = 0 if bos_id is None else 1
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids)) + head + 1
    tokens = np.empty(int(lengths.sum()), dtype=dtype)
    end = 0
    for doc_ids in ids:
        start, end = end, end + head + len(doc_ids) + 1
        if head:
            tokens[start] = bos_id
        tokens[start + head : end - 1] = doc_ids
        tokens[end - 1] = eos_id
    return tokens, lengths


_worker: tuple[Tokenizer, int, np.dtype, int | None] | None = None


def _init_worker(tokenizer_json: str, eos_id: int, dtype: str, bos_id: int | None) -> None:
    # One thread per process: the pool is the parallelism, and Rust threads would oversubscribe the cores.
    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    global _worker
    _worker = (Tokenizer.from_str(tokenizer_json), eos_id, np.dtype(dtype), bos_id)


def _encode_in_worker(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    assert _worker is not None, "tokenizer worker was not initialised"
    tokenizer, eos_id, dtype, bos_id = _worker
    return encode_documents(tokenizer, texts, eos_id, dtype, bos_id)


def _start_method() -> str:
    """Fork where the platform has it: "spawn" re-imports the caller's main module in every worker, which
    under `python -m pretrain` means importing torch (a second and 200+ MB) per core. With fork the pool starts
    all workers at once on first use, before its own threads exist; each worker builds its own tokenizer and
    runs it single-threaded (HF tokenizers also turns its Rust thread pool off in forked children)."""
    return "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"


class Encoder:
    """Tokenizes batches of texts asynchronously: a process pool of `workers`, or inline when workers == 1.

    `add_bos` (`data.add_bos`) starts every document with the tokenizer's BOS token.
    """

    def __init__(self, tokenizer: Tokenizer, info: TokenizerInfo, workers: int, *, add_bos: bool) -> None:
        self.tokenizer = tokenizer
        self.eos_id = info.eos_id
        self.bos_id = info.bos_id if add_bos else None
        self.dtype = token_dtype(info.vocab_size)
        self.workers = workers
        self._pool: cf.ProcessPoolExecutor | None = None
        if workers > 1:
            self._pool = cf.ProcessPoolExecutor(
                workers,
                mp_context=multiprocessing.get_context(_start_method()),
                initializer=_init_worker,
                initargs=(tokenizer.to_str(), info.eos_id, self.dtype.str, self.bos_id),
            )

    def submit(self, texts: list[str]) -> cf.Future:
        """A future of `encode_documents(texts)`; results are taken in submission order by the caller."""
        if self._pool is not None and texts:
            return self._pool.submit(_encode_in_worker, texts)
        future: cf.Future = cf.Future()
        future.set_result(encode_documents(self.tokenizer, texts, self.eos_id, self.dtype, self.bos_id))
        return future

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
