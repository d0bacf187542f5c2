"""Typed configs of the data pipeline, registered with Hydra's ConfigStore as schemas.

Every yaml file in `conf/tokenizer/` and `conf/data/` starts from these schemas, so a misspelt key or a wrong
type fails at composition, and `validate()` rejects wrong values with a message that names the key, before any
file is read or any process is started.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

SOURCE_KINDS = ("text", "jsonl", "parquet", "hub", "python_stdlib", "python_docs")
TOKENIZER_KINDS = ("bpe", "wordpiece", "unigram")
PACKING_MODES = ("best_fit", "concat")
TEXT_UNITS = ("document", "line", "paragraph")


class ConfigError(ValueError):
    """A config value is wrong; the message names the key and what to do."""


def require(ok: bool, key: str, message: str) -> None:
    """Raise a ConfigError naming `key` unless `ok`: the one way every config reports a wrong value."""
    if not ok:
        raise ConfigError(f"{key}: {message}")


def whole_number(value: int | float, key: str) -> int:
    """A configured count (of tokens, bytes, elements) as an int. People write these in scientific notation
    (`2e12`, `4e6`), which arrives as a float; anything that is not a whole number fails naming the key."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{key}: must be a whole number, got {value!r}")
    if isinstance(value, float) and not value.is_integer():
        raise ConfigError(f"{key}: must be a whole number, got {value!r}")
    return int(value)


@dataclass
class PathsConfig:
    """Where artifacts (tokenizers, shards, corpora) and runs live; relative paths are relative to the cwd."""

    artifacts: str = "artifacts"
    runs: str = "runs"


@dataclass
class SourceConfig:
    """One source of documents. `kind` picks the reader; `paths` are files, directories or globs."""

    kind: str = "jsonl"
    paths: list[str] = field(default_factory=list)
    # Hub datasets (kind=hub): `datasets.load_dataset(hub_name, hub_config, split=split, streaming=...)`.
    hub_name: str | None = None
    hub_config: str | None = None
    split: str = "train"
    # The field that holds the text (jsonl, parquet, hub).
    text_field: str = "text"
    # For kind=text: one document per file, per line, or per blank-line separated paragraph.
    text_unit: str = "document"
    # Mixture weight, as a share of training tokens (normalised over sources).
    weight: float = 1.0
    # Filled from the key in `data.sources` when empty.
    name: str = ""

    def validate(self, key: str) -> None:
        require(self.kind in SOURCE_KINDS, f"{key}.kind", f"must be one of {SOURCE_KINDS}, got {self.kind!r}")
        if self.kind in ("text", "jsonl", "parquet"):
            require(bool(self.paths), f"{key}.paths", f"a {self.kind} source needs at least one path or glob")
        if self.kind == "hub":
            require(bool(self.hub_name), f"{key}.hub_name", "a hub source needs a dataset name")
        require(self.text_unit in TEXT_UNITS, f"{key}.text_unit", f"must be one of {TEXT_UNITS}")
        require(self.weight > 0, f"{key}.weight", f"must be positive, got {self.weight}")
        require(bool(self.text_field), f"{key}.text_field", "must name the field that holds the text")


@dataclass
class PackingConfig:
    """How documents become training sequences of `seq_len + 1` tokens."""

    seq_len: int = 256
    mode: str = "best_fit"
    # Documents of at least this many tokens go to the long pool (0 disables long-text mixing).
    long_threshold: int | float = 0
    # Share of sequences drawn from the long pool.
    long_share: float = 0.0
    # Long-context up-sampling within each source: a training document shorter than `short_doc_threshold` tokens
    # is kept with probability `short_doc_keep` (decided per document from data.seed and its identity), longer
    # ones always, and each source keeps its weight over its kept documents. 0 disables; validation never drops.
    short_doc_threshold: int | float = 0
    short_doc_keep: float = 1.0
    # Best-fit packs this many documents at a time, which bounds memory and keeps the order shuffled.
    window_docs: int = 20_000

    def validate(self, key: str) -> None:
        require(self.seq_len >= 8, f"{key}.seq_len", f"must be at least 8, got {self.seq_len}")
        require(
            self.mode in PACKING_MODES, f"{key}.mode", f"must be one of {PACKING_MODES}, got {self.mode!r}"
        )
        self.long_threshold = whole_number(self.long_threshold, f"{key}.long_threshold")
        require(self.long_threshold >= 0, f"{key}.long_threshold", "must be >= 0 (0 disables the long pool)")
        require(
            0.0 <= self.long_share < 1.0, f"{key}.long_share", f"must be in [0, 1), got {self.long_share}"
        )
        require(
            self.long_share == 0.0 or self.long_threshold > 0,
            f"{key}.long_share",
            "a long share needs data.packing.long_threshold > 0",
        )
        require(self.window_docs >= 1, f"{key}.window_docs", "must be at least 1")
        self.short_doc_threshold = whole_number(self.short_doc_threshold, f"{key}.short_doc_threshold")
        require(
            self.short_doc_threshold >= 0,
            f"{key}.short_doc_threshold",
            "must be >= 0 (0 keeps every document)",
        )
        require(
            0.0 < self.short_doc_keep <= 1.0,
            f"{key}.short_doc_keep",
            f"must be in (0, 1], got {self.short_doc_keep}",
        )
        require(
            self.short_doc_keep == 1.0 or self.short_doc_threshold > 0,
            f"{key}.short_doc_keep",
            f"a keep probability below 1 needs {key}.short_doc_threshold > 0",
        )


@dataclass
class DataConfig:
    """A named corpus: its sources, how it is validated and sharded, and how it is packed and mixed."""

    name: str = MISSING
    sources: dict[str, SourceConfig] = field(default_factory=dict)
    # Read sources as streams, so a corpus larger than memory works.
    streaming: bool = True
    # Documents longer than this many characters are rejected (and listed in the rejects file).
    max_doc_chars: int | float = 2_000_000
    # Encode every document as [BOS] + text + [EOS] (false: text + [EOS]). Labels never cross a document
    # boundary, so without BOS nothing would learn how a document starts; generation and the exported
    # tokenizer start from BOS too. Part of the shards' identity: changing it re-prepares them.
    add_bos: bool = True
    # Share of documents held out for validation, chosen by a hash of the document index.
    val_fraction: float = 0.01
    # Documents per shard: shard boundaries depend only on document order, so an interrupted run resumes.
    docs_per_shard: int = 20_000
    # Tokenizer worker processes for prepare (0 = every core).
    num_workers: int = 0
    # Where shards go.
    shards_dir: str = "${paths.artifacts}/shards/${data.name}/${tokenizer.name}"
    packing: PackingConfig = field(default_factory=PackingConfig)
    # Most epochs any source may be repeated to meet its weight; beyond it, `repetition_policy` decides.
    max_repetition: float = 4.0
    repetition_policy: str = "error"
    seed: int = 1234

    def validate(self, key: str = "data") -> None:
        require(self.name not in ("", MISSING), f"{key}.name", "every data config needs a name")
        require(bool(self.sources), f"{key}.sources", "needs at least one source")
        for name, source in self.sources.items():
            if not source.name:
                source.name = name
            source.validate(f"{key}.sources.{name}")
        self.max_doc_chars = whole_number(self.max_doc_chars, f"{key}.max_doc_chars")
        require(self.max_doc_chars > 0, f"{key}.max_doc_chars", "must be positive")
        require(0.0 <= self.val_fraction < 0.5, f"{key}.val_fraction", "must be in [0, 0.5)")
        require(self.docs_per_shard >= 1, f"{key}.docs_per_shard", "must be at least 1")
        require(self.num_workers >= 0, f"{key}.num_workers", "must be >= 0 (0 = every core)")
        require(self.max_repetition >= 1.0, f"{key}.max_repetition", "must be at least 1 epoch")
        require(
            self.repetition_policy in ("error", "warn"),
            f"{key}.repetition_policy",
            "must be 'error' or 'warn'",
        )
        self.packing.validate(f"{key}.packing")

    def workers(self) -> int:
        return self.num_workers or len(os.sched_getaffinity(0))


@dataclass
class TokenizerConfig:
    """A tokenizer to train with HF `tokenizers`, and where it is written."""

    name: str = MISSING
    kind: str = "bpe"
    vocab_size: int = 8192
    min_frequency: int = 2
    bos_token: str = "<s>"
    eos_token: str = "</s>"
    pad_token: str = "<pad>"
    unk_token: str = "<unk>"
    # Extra special tokens (WordPiece adds [CLS] [SEP] [MASK] here).
    extra_special_tokens: list[str] = field(default_factory=list)
    # WordPiece: lowercase and strip accents like BERT uncased.
    lowercase: bool = False
    # Bytes of text streamed into training, sampled across sources by their weights.
    byte_budget: int | float = 200_000_000
    model_max_length: int = 4096
    dir: str = "${paths.artifacts}/tokenizers/${tokenizer.name}"

    def validate(self, key: str = "tokenizer") -> None:
        require(self.name not in ("", MISSING), f"{key}.name", "every tokenizer config needs a name")
        require(
            self.kind in TOKENIZER_KINDS,
            f"{key}.kind",
            f"must be one of {TOKENIZER_KINDS}, got {self.kind!r}",
        )
        require(self.vocab_size >= 64, f"{key}.vocab_size", f"must be at least 64, got {self.vocab_size}")
        require(self.min_frequency >= 1, f"{key}.min_frequency", "must be at least 1")
        self.byte_budget = whole_number(self.byte_budget, f"{key}.byte_budget")
        require(self.byte_budget > 0, f"{key}.byte_budget", "must be positive")
        specials = [self.bos_token, self.eos_token, self.pad_token, self.unk_token]
        require(all(specials), f"{key}", "bos_token, eos_token, pad_token and unk_token must be set")


@dataclass
class PrepareConfig:
    """How `python -m data.prepare` splits its work: task `task_index` of `num_tasks` builds every shard k with
    k % num_tasks == task_index, and a final `merge` checks them all and writes the manifests (slurm/prepare.sh
    runs the tasks as a job array). The default, one task and no merge, is the whole prepare in one process."""

    task_index: int = 0
    num_tasks: int = 1
    merge: bool = False

    def validate(self, key: str = "prepare") -> None:
        require(self.num_tasks >= 1, f"{key}.num_tasks", f"must be at least 1, got {self.num_tasks}")
        require(
            0 <= self.task_index < self.num_tasks,
            f"{key}.task_index",
            f"must be in [0, {key}.num_tasks={self.num_tasks}), got {self.task_index}",
        )
        require(
            not self.merge or self.task_index == 0,
            f"{key}.task_index",
            f"the merge ({key}.merge=true) runs once after every task; leave {key}.task_index unset",
        )

    @property
    def is_slice(self) -> bool:
        """A task of several that builds only its own shards and no manifest."""
        return self.num_tasks > 1 and not self.merge


@dataclass
class DataPipelineConfig:
    """The primary config of `python -m data.tokenizer` and `python -m data.prepare`."""

    paths: PathsConfig = field(default_factory=PathsConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    log_level: str = "INFO"

    def validate(self) -> None:
        self.tokenizer.validate("tokenizer")
        self.data.validate("data")
        self.prepare.validate("prepare")


def register_data_configs() -> None:
    """Store the primary schema: the group yaml files in `conf/` merge onto its typed nodes, so a misspelt key
    or a wrong type fails at composition."""
    ConfigStore.instance().store(name="_data_pipeline_schema", node=DataPipelineConfig)
