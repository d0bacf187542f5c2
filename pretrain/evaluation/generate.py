"""Sample text from a trained checkpoint: `python -m pretrain.generate runs/<name> 'prompt="def f("'`.

Options are Hydra overrides (conf/generate.yaml): prompt (or prompts=[...] for several), max_new_tokens,
temperature (0 = greedy), top_k (0 = off), top_p (1 = off), seed, device, dtype. A prompt with characters
that Hydra's override grammar reserves, such as parentheses or commas, is quoted: 'prompt="def f(a, b"'. The
prompt is run through the model once (prefill) and every new token then costs one position thanks to the KV
cache.

Prompts are encoded as training documents start: BOS, then the prompt's ids, with positions from 0; an empty
prompt is BOS alone, from which the model learnt how documents begin (`data.add_bos`, on by default). Generation
stops at EOS, after max_new_tokens, or when the model's context (model.max_seq_len) is full.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from omegaconf import MISSING

from data.log import get_logger
from data.tokenizer import load_tokenizer
from pretrain.checkpoint import load_trained
from pretrain.config import DTYPES, dtype_name, require
from pretrain.evaluation.cli import hydra_command
from pretrain.model.kv_cache import KVCache
from pretrain.model.transformer import Transformer

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from data.tokenizer import TokenizerInfo

log = get_logger(__name__)


@dataclass
class SamplingConfig:
    """How the next token is chosen; the defaults sample from the model's distribution unchanged."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def validate(self) -> None:
        require(self.max_new_tokens >= 0, "max_new_tokens", f"must be >= 0, got {self.max_new_tokens}")
        require(self.temperature >= 0, "temperature", f"must be >= 0 (0 = greedy), got {self.temperature}")
        require(self.top_k >= 0, "top_k", f"must be >= 0 (0 = off), got {self.top_k}")
        require(0 < self.top_p <= 1, "top_p", f"must be in (0, 1] (1 = off), got {self.top_p}")


# -- sampling ---------------------------------------------------------------------------------------------


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Logits with everything below the k-th largest of each row set to -inf (k = 0 keeps all)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of most likely tokens whose probability sums to at least p.

    A token is dropped when the tokens ranked above it already reach p; the most likely token always stays.
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def filter_logits(
    logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0
) -> torch.Tensor:
    """Temperature, then top-k, then top-p (the order Hugging Face uses), in fp32; temperature must be > 0."""
    logits = logits.float() / temperature
    return top_p_filter(top_k_filter(logits, top_k), top_p)


def sample_next(
    logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One token id per row of `logits` [B, V]: argmax at temperature 0, else a draw from the filtered softmax."""
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    filtered = filter_logits(logits, sampling.temperature, sampling.top_k, sampling.top_p)
    probs = torch.softmax(filtered, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: Transformer,
    prompt_ids: Sequence[int],
    sampling: SamplingConfig,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> list[int]:
    """The tokens that follow `prompt_ids` (EOS included when the model emits it).

    With `use_cache` the prompt is prefilled once and each step feeds only the newest token; without it every
    step recomputes the whole sequence (the reference the cache is tested against). Stops at EOS, after
    `sampling.max_new_tokens`, or when the sequence reaches model.max_seq_len.
    """
    sampling.validate()
    if not prompt_ids:
        raise ValueError("prompt_ids is empty: start from at least one token (e.g. EOS)")
    max_len = model.cfg.max_seq_len
    if len(prompt_ids) >= max_len:
        raise ValueError(
            f"the prompt has {len(prompt_ids)} tokens; model.max_seq_len={max_len} leaves no room"
        )
    param = next(model.parameters())
    tokens = torch.tensor([list(prompt_ids)], dtype=torch.long, device=param.device)
    if generator is None:
        generator = torch.Generator(device=param.device).manual_seed(sampling.seed)
    budget = min(sampling.max_new_tokens, max_len - len(prompt_ids))
    # Sized to what is decoded, not the model's window (the last new token is never fed back); its dtype is
    # that of the keys, bf16 under autocast.
    capacity = max(1, len(prompt_ids) + budget - 1)
    cache = KVCache(model.cfg, batch=1, capacity=capacity, device=param.device) if use_cache else None
    model.eval()
    new: list[int] = []
    step_input = tokens
    for _ in range(budget):
        logits = model(step_input if use_cache else tokens, cache=cache)[:, -1]
        next_id = sample_next(logits, sampling, generator)
        new.append(int(next_id))
        if eos_id is not None and new[-1] == eos_id:
            break
        step_input = next_id.view(1, 1)
        tokens = torch.cat([tokens, step_input], dim=1)
    return new


def encode_prompt(tokenizer: Tokenizer, info: TokenizerInfo, prompt: str, add_bos: bool = True) -> list[int]:
    """Prompt ids as a training document starts: BOS + the prompt's ids when the run's documents had a BOS
    (`data.add_bos`), BOS alone for an empty prompt; without BOS an empty prompt starts from EOS."""
    tokenizer.encode_special_tokens = True  # as documents were encoded: "</s>" in a prompt is text
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    if add_bos:
        return [info.bos_id, *ids]
    return ids or [info.eos_id]


def continuation(tokenizer: Tokenizer, prompt_ids: list[int], new_ids: list[int]) -> str:
    """The text the new tokens add, decoded together with the prompt so merged bytes and spaces come out right."""
    before = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    after = tokenizer.decode(prompt_ids + new_ids, skip_special_tokens=True)
    if after.startswith(before):
        return after[len(before) :]
    return tokenizer.decode(new_ids, skip_special_tokens=True)


@dataclass
class GenerateConfig(SamplingConfig):
    """`python -m pretrain.generate`: the run, the prompts, the sampling, and where the model runs."""

    # A run directory (its newest usable committed checkpoint) or one checkpoint directory.
    run: str = MISSING
    prompt: str = ""
    # Several prompts, each continued on its own (after `prompt` when both are given).
    prompts: list[str] = field(default_factory=list)
    # cpu, cuda or cuda:N (default: cuda when available).
    device: str | None = None
    dtype: str = "fp32"
    log_level: str = "INFO"

    def validate(self) -> None:
        super().validate()
        self.dtype = dtype_name(self.dtype, "dtype")
        # Greedy decoding: the filters and the seed choose nothing, so asking for them is a slip.
        if self.temperature == 0:
            for key in ("top_k", "top_p", "seed"):
                require(
                    getattr(self, key) == getattr(SamplingConfig, key),
                    key,
                    f"has no effect with temperature=0 (greedy decoding); set temperature > 0 or drop {key}",
                )

    def all_prompts(self) -> list[str]:
        return ([self.prompt] if self.prompt else []) + list(self.prompts) or [""]


def _run(config: GenerateConfig) -> None:
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed prints on import; stdout is for the text
        model, cfg, _ = load_trained(config.run, device, DTYPES[config.dtype])
    tokenizer, info = load_tokenizer(cfg.tokenizer.dir)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    max_len = cfg.model.max_seq_len
    for prompt in config.all_prompts():
        prompt_ids = encode_prompt(tokenizer, info, prompt, cfg.data.add_bos)
        if len(prompt_ids) >= max_len:
            log.warning(
                "prompt has %d tokens; keeping the last %d (model.max_seq_len)", len(prompt_ids), max_len - 1
            )
            start = prompt_ids[:1] if cfg.data.add_bos else []  # a document starts with its BOS
            prompt_ids = start + prompt_ids[len(prompt_ids) - (max_len - 1 - len(start)) :]
        if len(prompt_ids) + config.max_new_tokens > max_len:
            log.warning("stopping at model.max_seq_len=%d tokens (prompt %d)", max_len, len(prompt_ids))
        new_ids = generate(model, prompt_ids, config, info.eos_id, generator)
        sys.stdout.write(prompt + continuation(tokenizer, prompt_ids, new_ids) + "\n")
        sys.stdout.flush()


main = hydra_command("generate", GenerateConfig, _run)
