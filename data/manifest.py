"""The per-source manifest: which shards make up each split of a source, made with which tokenizer and config.

`<shards_dir>/<source>/manifest.json` is written last, atomically, once every shard it lists is committed, so
a source without one counts as not prepared, and a source with one is read without touching the corpus. It is
also what decides whether a source must be prepared again (`why_stale`): its format, tokenizer fingerprint and
source config must match the run's, and every listed shard must exist. Readers (`load_split`) trust it only as
far as each listed shard, opened and checked, matches its entry.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from data.atomic_io import atomic_write_json
from data.config import DataPipelineConfig, SourceConfig
from data.shards import (
    PREPARE_HINT,
    SPLITS,
    Shard,
    ShardError,
    check_fingerprint,
    open_shard,
    shard_name,
    token_dtype,
)

if TYPE_CHECKING:
    from data.shard_writer import ShardStats
    from data.tokenizer import TokenizerInfo

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 2  # 2: special tokens spelled in a document are encoded as text


def manifest_path(shards_dir: str | Path, source: str) -> Path:
    """`<shards_dir>/<source>/manifest.json`, next to the shards it lists."""
    return Path(shards_dir) / source / MANIFEST_NAME


# ----------------------------------------------------------------------------------------------- building


def source_config_key(cfg: DataPipelineConfig, source: SourceConfig) -> dict[str, Any]:
    """What decides a source's shards besides the tokenizer (the mixture weight does not)."""
    described = dataclasses.asdict(source)
    described.pop("weight", None)
    return {
        "source": described,
        "docs_per_shard": cfg.data.docs_per_shard,
        "val_fraction": cfg.data.val_fraction,
        "max_doc_chars": cfg.data.max_doc_chars,
        "add_bos": cfg.data.add_bos,
    }


def shard_entry(shard: Shard | ShardStats) -> dict[str, Any]:
    """A shard's line in the manifest: enough for `load_split` to tell that the file on disk is the one listed."""
    return {
        "file": shard.path.name,
        "docs": shard.n_docs,
        "tokens": shard.n_tokens,
        "checksum": shard.checksum,
    }


def split_summary(out_dir: Path, split: str, entries: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """A split's part of the manifest, from the manifest entries of its shards by index."""
    ordered = [entries[i] for i in sorted(entries)]
    if [e["file"] for e in ordered] != [shard_name(split, i) for i in range(len(ordered))]:
        raise RuntimeError(f"{out_dir}: shards of split {split} are not contiguous: {ordered}")
    return {
        "docs": sum(e["docs"] for e in ordered),
        "tokens": sum(e["tokens"] for e in ordered),
        "shards": ordered,
    }


def source_manifest(
    cfg: DataPipelineConfig,
    source: SourceConfig,
    info: TokenizerInfo,
    splits: dict[str, dict[str, Any]],
    rejects: dict[str, Any],
) -> dict[str, Any]:
    """The manifest of one source, from its split summaries and rejects summary."""
    return {
        "format": MANIFEST_FORMAT,
        "source": source.name,
        "data": cfg.data.name,
        "tokenizer_fingerprint": info.fingerprint,
        "tokenizer_dir": str(info.dir),
        "vocab_size": info.vocab_size,
        "eos_id": info.eos_id,
        "dtype": token_dtype(info.vocab_size).name,
        "splits": splits,
        "rejects": rejects,
        "config": source_config_key(cfg, source),
    }


def write_manifest(shards_dir: str | Path, source: str, manifest: dict[str, Any]) -> None:
    """Commit a source's manifest atomically: until it is whole on disk, the source counts as not prepared."""
    atomic_write_json(manifest_path(shards_dir, source), manifest)


# ----------------------------------------------------------------------------------------------- reading


def read_manifest(shards_dir: str | Path, source: str) -> dict[str, Any]:
    """The manifest of one source; a clear error when it is missing or unreadable."""
    path = manifest_path(shards_dir, source)
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ShardError(f"{path}: no manifest for source {source!r}; {PREPARE_HINT}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(f"{path}: unreadable manifest ({e}); {PREPARE_HINT}") from None
    if not isinstance(manifest, dict) or "splits" not in manifest or "tokenizer_fingerprint" not in manifest:
        raise ShardError(f"{path}: manifest lacks 'splits' or 'tokenizer_fingerprint'; {PREPARE_HINT}")
    return manifest


def why_stale(cfg: DataPipelineConfig, source: SourceConfig, fingerprint: str) -> str | None:
    """Why a source must be prepared (again), or None when its manifest is complete and matches the config.

    Cheap on purpose (no shard is opened): it runs before every training run.
    """
    try:
        manifest = read_manifest(cfg.data.shards_dir, source.name)
    except ShardError as error:
        return str(error).split(";")[0]
    where = manifest_path(cfg.data.shards_dir, source.name)
    if manifest.get("format") != MANIFEST_FORMAT:
        return f"{where} has manifest format {manifest.get('format')}, this code writes {MANIFEST_FORMAT}"
    if manifest["tokenizer_fingerprint"] != fingerprint:
        return f"{where} was made with another tokenizer ({manifest['tokenizer_fingerprint'][:12]})"
    if manifest.get("config") != source_config_key(cfg, source):
        return f"{where} was made with another source config ({manifest.get('config')})"
    for split in manifest["splits"].values():
        for entry in split["shards"]:
            if not (where.parent / entry["file"]).is_file():
                return f"{where.parent / entry['file']} is missing"
    return None


def load_split(
    shards_dir: str | Path,
    source: str,
    split: str,
    *,
    expected_fingerprint: str | None,
    verify_checksum: bool = True,
) -> list[Shard]:
    """Open every shard of one split of one source, in order, as listed by its manifest."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    manifest = read_manifest(shards_dir, source)
    mpath = manifest_path(shards_dir, source)
    check_fingerprint(mpath, manifest["tokenizer_fingerprint"], expected_fingerprint)
    entries = manifest["splits"].get(split, {"shards": []})["shards"]
    shards = []
    for entry in entries:
        shard = open_shard(
            mpath.parent / entry["file"],
            expected_fingerprint=expected_fingerprint,
            verify_checksum=verify_checksum,
        )
        if (shard.n_docs, shard.n_tokens, shard.checksum) != (
            entry["docs"],
            entry["tokens"],
            entry["checksum"],
        ):
            raise ShardError(
                f"{shard.path}: does not match its manifest entry in {mpath} (docs/tokens/checksum "
                f"{shard.n_docs}/{shard.n_tokens}/{shard.checksum} vs {entry['docs']}/{entry['tokens']}/"
                f"{entry['checksum']}); {PREPARE_HINT}"
            )
        shards.append(shard)
    return shards
