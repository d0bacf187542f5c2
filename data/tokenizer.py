"""Train a byte-level BPE, WordPiece or Unigram tokenizer with HF `tokenizers` and write it as a directory.

    python -m data.tokenizer tokenizer=bpe|wordpiece|unigram data=embedded

The corpus is streamed: each source contributes about its mixture weight's share of `tokenizer.byte_budget`,
interleaved so that no source is read further than its share, so memory stays bounded on any corpus size.
The directory holds tokenizer.json, tokenizer_config.json and special_tokens_map.json (so that
`transformers.AutoTokenizer.from_pretrained(dir)` loads it), meta.json (config, sources, bytes seen,
fingerprint, versions) and rejects.jsonl. It is built in a temporary directory next to the target and renamed
into place. The fingerprint (sha256 of tokenizer.json) is what shards and checkpoints record and check.

Special tokens take the lowest ids in the order bos, eos, pad, unk, then the extras. Encoding adds no special
tokens (no post-processor template): the data pipeline appends EOS to every document itself.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import tokenizers
from omegaconf import DictConfig
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from data.atomic_io import atomic_write_bytes, atomic_write_json, replace_dir
from data.cli import one_line_errors, typed_data_config
from data.config import ConfigError, DataPipelineConfig, TokenizerConfig
from data.log import get_logger, progress_enabled
from data.rejects import RejectLog
from data.sources import iter_documents

log = get_logger("data.tokenizer")  # not __name__: it is "__main__" under `python -m`

META_FORMAT = 1
TRAIN_HINT = "run `python -m data.tokenizer tokenizer=<bpe|wordpiece|unigram> data=<data>` to train it"
# Texts handed to the Rust trainer per call: fewer Python/Rust crossings, bounded memory.
_BATCH_BYTES = 1 << 20
_BATCH_DOCS = 1024


class TokenizerError(RuntimeError):
    """A tokenizer directory is missing, incomplete or does not match its meta.json."""


@dataclass(frozen=True)
class TokenizerInfo:
    """What later stages need to know about a trained tokenizer."""

    dir: Path
    kind: str
    vocab_size: int
    fingerprint: str
    bos_id: int
    eos_id: int
    pad_id: int
    unk_id: int | None


def special_tokens(cfg: TokenizerConfig) -> list[str]:
    """Special tokens in id order (bos, eos, pad, unk, extras), without duplicates."""
    ordered = [cfg.bos_token, cfg.eos_token, cfg.pad_token, cfg.unk_token, *cfg.extra_special_tokens]
    return list(dict.fromkeys(ordered))


def _build(cfg: TokenizerConfig) -> tuple[Tokenizer, trainers.Trainer]:
    """An untrained tokenizer pipeline and its trainer for `cfg.kind`."""
    specials = special_tokens(cfg)
    show = progress_enabled()
    if cfg.kind == "bpe":
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        if cfg.vocab_size < len(alphabet) + len(specials):
            raise ConfigError(
                f"tokenizer.vocab_size: byte-level BPE needs at least {len(alphabet)} byte tokens + "
                f"{len(specials)} special tokens, got {cfg.vocab_size}"
            )
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=cfg.vocab_size,
            min_frequency=cfg.min_frequency,
            special_tokens=specials,
            initial_alphabet=alphabet,
            show_progress=show,
        )
    elif cfg.kind == "wordpiece":
        tokenizer = Tokenizer(models.WordPiece(unk_token=cfg.unk_token))
        tokenizer.normalizer = normalizers.BertNormalizer(lowercase=cfg.lowercase)
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.decoder = decoders.WordPiece(prefix="##")
        trainer = trainers.WordPieceTrainer(
            vocab_size=cfg.vocab_size,
            min_frequency=cfg.min_frequency,
            special_tokens=specials,
            # Every kept character also gets a "##" continuation form, so the alphabet takes up to 2x its size.
            limit_alphabet=max(1, min(1000, (cfg.vocab_size - len(specials)) // 4)),
            continuing_subword_prefix="##",
            show_progress=show,
        )
    elif cfg.kind == "unigram":
        tokenizer = Tokenizer(models.Unigram())
        tokenizer.normalizer = normalizers.NFKC()
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
        tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
        trainer = trainers.UnigramTrainer(
            vocab_size=cfg.vocab_size,
            special_tokens=specials,
            unk_token=cfg.unk_token,
            show_progress=show,
        )
    else:
        raise ConfigError(f"tokenizer.kind: unknown kind {cfg.kind!r}")
    return tokenizer, trainer


class _BudgetedMixture:
    """Texts from every source, interleaved by weight, until each source has had its share of the budget.

    The next text always comes from the source furthest behind its share (bytes seen / share), so sources stay
    in proportion throughout and a source is never read past its share. A source that runs out just ends.
    """

    def __init__(self, cfg: DataPipelineConfig, rejects: RejectLog) -> None:
        sources = list(cfg.data.sources.values())
        total_weight = sum(s.weight for s in sources)
        budget = cfg.tokenizer.byte_budget
        self.budget = budget
        self.shares = {s.name: max(1, int(budget * s.weight / total_weight)) for s in sources}
        self.bytes_seen = {s.name: 0 for s in sources}
        self.docs_seen = {s.name: 0 for s in sources}
        self.exhausted: set[str] = set()
        self._streams = {
            s.name: iter_documents(
                s, max_doc_chars=cfg.data.max_doc_chars, streaming=cfg.data.streaming, rejects=rejects
            )
            for s in sources
        }

    def _next_source(self) -> str | None:
        active = [n for n in self._streams if n not in self.exhausted and self.bytes_seen[n] < self.shares[n]]
        if not active:
            return None
        return min(active, key=lambda n: self.bytes_seen[n] / self.shares[n])

    def texts(self) -> Iterator[tuple[str, int]]:
        """(text, its UTF-8 byte count); the last text of a source is cut to end its share exactly."""
        while (name := self._next_source()) is not None:
            document = next(self._streams[name], None)
            if document is None:
                self.exhausted.add(name)
                continue
            text = document.text
            size = len(text) if text.isascii() else len(text.encode("utf-8"))
            room = self.shares[name] - self.bytes_seen[name]
            if size > room:
                text = text.encode("utf-8")[:room].decode("utf-8", errors="ignore")
                size = len(text.encode("utf-8"))
                self.bytes_seen[name] = self.shares[name]  # a cut text ends the share even if it lost a char
            else:
                self.bytes_seen[name] += size
            self.docs_seen[name] += 1
            yield text, size

    def batches(self) -> Iterator[list[str]]:
        """Lists of texts for `train_from_iterator`, with a byte progress bar on rank 0."""
        from tqdm import tqdm

        batch: list[str] = []
        batch_bytes = 0
        with tqdm(
            total=self.budget,
            unit="B",
            unit_scale=True,
            desc="tokenizer corpus",
            disable=not progress_enabled(),
        ) as bar:
            for text, size in self.texts():
                batch.append(text)
                batch_bytes += size
                bar.update(size)
                if batch_bytes >= _BATCH_BYTES or len(batch) >= _BATCH_DOCS:
                    yield batch
                    batch, batch_bytes = [], 0
            if batch:
                yield batch


def train_tokenizer(cfg: DataPipelineConfig) -> TokenizerInfo:
    """Train on a budgeted, weighted stream of the data sources and commit the directory atomically."""
    tcfg = cfg.tokenizer
    target = Path(tcfg.dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    tokenizer, trainer = _build(tcfg)
    log.info(
        "training %s tokenizer (vocab %d) on up to %d bytes of %s -> %s",
        tcfg.kind,
        tcfg.vocab_size,
        tcfg.byte_budget,
        cfg.data.name,
        target,
    )
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the tokenizer is meant to be shared
    try:
        start = time.perf_counter()
        rejects = RejectLog(tmp / "rejects.jsonl")
        with rejects:
            mixture = _BudgetedMixture(cfg, rejects)
            tokenizer.train_from_iterator(mixture.batches(), trainer=trainer)
        seconds = time.perf_counter() - start
        if sum(mixture.bytes_seen.values()) == 0:
            raise TokenizerError(
                f"data {cfg.data.name!r} gave no valid text to train on (rejects: {rejects.summary()}); "
                "check data.sources"
            )
        _check_special_ids(tokenizer, tcfg)
        tokenizer_json = tokenizer.to_str(pretty=True).encode("utf-8")
        fingerprint = hashlib.sha256(tokenizer_json).hexdigest()
        atomic_write_bytes(tmp / "tokenizer.json", [tokenizer_json])
        atomic_write_json(tmp / "tokenizer_config.json", _transformers_config(tcfg))
        atomic_write_json(tmp / "special_tokens_map.json", _special_tokens_map(tcfg))
        meta = _meta(cfg, tokenizer, fingerprint, mixture, rejects, seconds)
        atomic_write_json(tmp / "meta.json", meta)
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info(
        "trained %s tokenizer: vocab %d, %s bytes in %.1f s, %d rejects, fingerprint %s",
        tcfg.kind,
        meta["vocab_size"],
        meta["bytes_seen"],
        seconds,
        rejects.total,
        fingerprint[:12],
    )
    return load_tokenizer(target)[1]


def _check_special_ids(tokenizer: Tokenizer, cfg: TokenizerConfig) -> None:
    for expected, token in enumerate(special_tokens(cfg)):
        got = tokenizer.token_to_id(token)
        if got != expected:
            raise TokenizerError(
                f"special token {token!r} got id {got}, expected {expected} (tokenizers bug?)"
            )


def _transformers_config(cfg: TokenizerConfig) -> dict[str, Any]:
    """tokenizer_config.json for `transformers.AutoTokenizer` (a PreTrainedTokenizerFast over tokenizer.json)."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **_special_tokens_map(cfg),
        "model_max_length": cfg.model_max_length,
        "clean_up_tokenization_spaces": False,
        "padding_side": "right",
    }


def _special_tokens_map(cfg: TokenizerConfig) -> dict[str, Any]:
    named = {cfg.bos_token, cfg.eos_token, cfg.pad_token, cfg.unk_token}
    return {
        "bos_token": cfg.bos_token,
        "eos_token": cfg.eos_token,
        "pad_token": cfg.pad_token,
        "unk_token": cfg.unk_token,
        "additional_special_tokens": [t for t in special_tokens(cfg) if t not in named],
    }


def _meta(
    cfg: DataPipelineConfig,
    tokenizer: Tokenizer,
    fingerprint: str,
    mixture: _BudgetedMixture,
    rejects: RejectLog,
    seconds: float,
) -> dict[str, Any]:
    import datasets

    return {
        "format": META_FORMAT,
        "kind": cfg.tokenizer.kind,
        "vocab_size": tokenizer.get_vocab_size(with_added_tokens=True),
        "fingerprint": fingerprint,
        "special_tokens": {t: tokenizer.token_to_id(t) for t in special_tokens(cfg.tokenizer)},
        "config": dataclasses.asdict(cfg.tokenizer),
        "data": {
            "name": cfg.data.name,
            "sources": {name: dataclasses.asdict(s) for name, s in cfg.data.sources.items()},
        },
        "byte_budget": cfg.tokenizer.byte_budget,
        "bytes_seen": dict(mixture.bytes_seen),
        "docs_seen": dict(mixture.docs_seen),
        "sources_exhausted": sorted(mixture.exhausted),
        "rejects": rejects.summary(),
        "train_seconds": round(seconds, 3),
        "created_unix": int(time.time()),
        "versions": {
            "python": sys.version.split()[0],
            "tokenizers": tokenizers.__version__,
            "datasets": datasets.__version__,
        },
    }


def _read_meta(directory: Path) -> dict[str, Any]:
    path = directory / "meta.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TokenizerError(
            f"{path} is missing, so {directory} is not a complete tokenizer; {TRAIN_HINT}"
        ) from None
    except (OSError, ValueError) as error:
        raise TokenizerError(f"{path} is unreadable ({error}); {TRAIN_HINT}") from error
    if not isinstance(meta, dict) or meta.get("format") != META_FORMAT:
        raise TokenizerError(f"{path} is not a format-{META_FORMAT} tokenizer meta file; {TRAIN_HINT}")
    return meta


def load_tokenizer(directory: str | Path) -> tuple[Tokenizer, TokenizerInfo]:
    """The trained tokenizer in `directory` and its info; checks tokenizer.json against meta.json's fingerprint."""
    directory = Path(directory)
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise TokenizerError(f"no trained tokenizer at {directory} ({path.name} missing); {TRAIN_HINT}")
    meta = _read_meta(directory)
    raw = path.read_bytes()
    fingerprint = hashlib.sha256(raw).hexdigest()
    if fingerprint != meta.get("fingerprint"):
        raise TokenizerError(
            f"{path} does not match the fingerprint in {directory / 'meta.json'} (changed after training?); "
            f"{TRAIN_HINT}"
        )
    try:
        tokenizer = Tokenizer.from_str(raw.decode("utf-8"))
        cfg = meta["config"]
        ids = {key: tokenizer.token_to_id(cfg[f"{key}_token"]) for key in ("bos", "eos", "pad", "unk")}
        if any(ids[key] is None for key in ("bos", "eos", "pad")):
            raise ValueError(f"special token ids {ids}: bos, eos and pad must be in the vocabulary")
    except Exception as error:
        raise TokenizerError(f"cannot load the tokenizer in {directory}: {error}; {TRAIN_HINT}") from error
    info = TokenizerInfo(
        dir=directory,
        kind=meta["kind"],
        vocab_size=tokenizer.get_vocab_size(with_added_tokens=True),
        fingerprint=fingerprint,
        bos_id=ids["bos"],
        eos_id=ids["eos"],
        pad_id=ids["pad"],
        unk_id=ids["unk"],
    )
    return tokenizer, info


def _why_retrain(cfg: DataPipelineConfig) -> str | None:
    """Why the existing directory cannot be reused, or None when it matches the config."""
    directory = Path(cfg.tokenizer.dir)
    try:
        load_tokenizer(directory)
        meta = _read_meta(directory)
    except TokenizerError as error:
        return str(error).split(";")[0]
    trained = meta["config"]
    wanted = dataclasses.asdict(cfg.tokenizer)
    for key in (
        "kind",
        "vocab_size",
        "bos_token",
        "eos_token",
        "pad_token",
        "unk_token",
        "extra_special_tokens",
    ):
        if trained.get(key) != wanted[key]:
            return f"{key} is {wanted[key]!r} in the config but {trained.get(key)!r} in {directory}/meta.json"
    if cfg.tokenizer.kind == "wordpiece" and trained.get("lowercase") != cfg.tokenizer.lowercase:
        return f"lowercase is {cfg.tokenizer.lowercase} in the config but {trained.get('lowercase')} in meta.json"
    if meta["data"]["name"] != cfg.data.name:
        return f"it was trained on data {meta['data']['name']!r}, the config asks for {cfg.data.name!r}"
    return None


def ensure_tokenizer(cfg: DataPipelineConfig) -> TokenizerInfo:
    """Reuse the tokenizer directory when it matches the config (kind, vocab size, specials, data), else train."""
    reason = _why_retrain(cfg)
    if reason is None:
        info = load_tokenizer(cfg.tokenizer.dir)[1]
        log.info("reusing tokenizer %s (fingerprint %s)", info.dir, info.fingerprint[:12])
        return info
    log.info("training tokenizer %s: %s", cfg.tokenizer.dir, reason)
    return train_tokenizer(cfg)


@hydra.main(config_path="../conf", config_name="data_pipeline", version_base="1.3")
@one_line_errors(ConfigError, TokenizerError, FileNotFoundError)
def main(cfg: DictConfig) -> None:
    """Train the configured tokenizer (always; `ensure_tokenizer` is the reuse-if-present path)."""
    info = train_tokenizer(typed_data_config(cfg))
    log.info(
        "tokenizer written to %s (vocab %d, fingerprint %s)", info.dir, info.vocab_size, info.fingerprint
    )


if __name__ == "__main__":
    main()
