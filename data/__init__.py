"""Data pipeline: sources, tokenizer training, validated shards, packing, mixing and the resumable loader."""
