"""Memory per rank of a DeepSpeed ZeRO-3 run of `pretrain.model.transformer.Transformer`, before launching it.

Two parts, both in bytes:

* Model state, from the exact parameter list of the model built on the meta device: the parameter shard in the
  training precision (bf16: 2 bytes), the gradient shard in `deepspeed.gradient_dtype` (fp32 by default: 4
  bytes, where the micro-batches accumulate), the fp32 master weights and the two fp32 Adam moments (2 + 4 + 4
  + 8 bytes per parameter, each parameter padded to a multiple of the world size and split over it), plus what
  DeepSpeed keeps whole on every rank: parameters under `stage3_param_persistence_threshold`, the gathered
  parameters (live set bounded by `stage3_max_live_parameters` plus the prefetch bucket, and the flat buffer of
  a coalesced all-gather), the reduce bucket (in the gradient dtype, which is also the reduce-scatter's), and
  the fp32 gradient of one optimizer sub-group (`sub_group_size`) in the step. With `offload_optimizer` the
  shards of gradients, master weights and moments live in host memory (plus an fp32 gradient copy for the CPU
  Adam); with `offload_param` the parameter shard does too.
* Activations, from the tensors autograd saves in this model's layers (pre-norm RMSNorm in fp32, RoPE, GQA with
  a flash-style kernel that keeps no T x T matrix, SwiGLU), with and without per-layer recomputation, and the
  chunked fp32 loss, per rank of a DeepSpeed-Ulysses group (seq_len / SP tokens each) and with or without
  TiledMLP. The activation formulas are checked against a measured peak in tests/pretrain/planning/test_plan.py,
  the whole estimate against the real trainer in benchmarks/plan_vs_measured.py.

The result is what `torch.cuda.max_memory_allocated` would show; `pretrain.planning.plan` adds the CUDA context and
allocator headroom before comparing with a GPU's capacity. `device="cpu"` models the CPU ranks of the tests
instead (untouched `torch.empty` pages are not resident; the step uses torch's foreach AdamW).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from pretrain.config import DeepSpeedConfig, OptimConfig
from pretrain.model.transformer import ModelConfig, Transformer

BF16, FP32 = 2, 4
GIB = 2**30
DEFAULT_SUB_GROUP_SIZE = 1_000_000_000  # DeepSpeed's default `zero_optimization.sub_group_size`


@dataclass(frozen=True)
class ParamInventory:
    """The parameters as DeepSpeed sees them: every tensor's size, grouped like the optimizer's groups."""

    numels: tuple[int, ...]
    # Sizes per AdamW parameter group (decay, no decay), in the order DeepSpeed forms its sub-groups.
    groups: tuple[tuple[int, ...], ...]
    # Elements of the largest module's own parameters: ZeRO-3 gathers a module's parameters together when it
    # runs, whatever stage3_max_live_parameters says (an MoE layer's experts: 3 x E x D x F). 0 = the largest
    # tensor.
    largest_module: int = 0

    @classmethod
    def of(cls, model: ModelConfig, optim: OptimConfig) -> ParamInventory:
        from pretrain.model.parameter_groups import parameter_groups  # imports no DeepSpeed at module level

        with torch.device("meta"):
            module = Transformer(model)
        groups = parameter_groups(module, optim.weight_decay, optim.decay_norms_and_embeddings)
        return cls(
            numels=tuple(p.numel() for p in module.parameters()),
            groups=tuple(tuple(p.numel() for p in g["params"]) for g in groups if g["params"]),
            largest_module=max(sum(p.numel() for p in m.parameters(recurse=False)) for m in module.modules()),
        )

    @property
    def total(self) -> int:
        return sum(self.numels)

    @property
    def largest(self) -> int:
        return max(self.numels)

    def shard(self, world: int) -> int:
        """Elements one rank holds: each tensor padded to a multiple of `world`, then split."""
        return sum(math.ceil(n / world) for n in self.numels)

    def persistent(self, threshold: int) -> int:
        """Elements of the tensors small enough that ZeRO-3 keeps them whole on every rank."""
        return sum(n for n in self.numels if n <= threshold)

    def sub_groups(self, world: int, sub_group_size: int) -> list[int]:
        """One rank's optimizer sub-groups (elements): shards accumulated per group until `sub_group_size`."""
        sizes = []
        for group in self.groups:
            current = 0
            for n in group:
                current += math.ceil(n / world)
                if current >= sub_group_size:
                    sizes.append(current)
                    current = 0
            if current:
                sizes.append(current)
        return sizes


@dataclass(frozen=True)
class ActivationMemory:
    """Activation bytes of one micro-batch on one rank."""

    layer_full: int  # what one layer saves for backward without recomputation
    layer_checkpointed: int  # what it keeps with recomputation: its input
    saved: int  # everything kept from the end of forward into backward
    forward_extra: int  # the largest transient on top of `saved` at the end of forward (the loss)
    backward_extra: int  # the largest transient on top of `saved` during backward
    checkpointed_layers: int

    @property
    def peak(self) -> int:
        return self.saved + self.backward_extra


def tiled_mlp_shards(micro_batch: int, local_tokens: int, dim: int, wanted: int = 0) -> int:
    """Slices TiledMLP cuts one rank's tokens into (`deepspeed.tiled_mlp_shards`, the trainer's rule too): `wanted`,
    or ceil(tokens / dim) so that a slice is about `dim` tokens and its [slice, ffn] intermediates stay the size
    of a weight matrix whatever the sequence; raised to a divisor of the sequence length, because TiledMLP marks
    the weights' gradients ready after its slice number `shards` and torch.chunk returns fewer, unequal pieces
    when the length does not divide."""
    shards = min(local_tokens, wanted or max(1, math.ceil(micro_batch * local_tokens / dim)))
    while local_tokens % shards:
        shards += 1
    return shards


def sequence_parallel_degrees(model: ModelConfig, seq_len: int, largest: int = 64) -> list[int]:
    """The DeepSpeed-Ulysses degrees 1, 2, 4, ... `largest` that `deepspeed.sequence_parallel_size` accepts:
    dividing model.n_heads and seq_len, and dividing model.kv_heads or a multiple of it."""
    heads, kv = model.n_heads, model.kv_heads
    sizes = (1 << i for i in range(largest.bit_length()))
    return [sp for sp in sizes if heads % sp == 0 and seq_len % sp == 0 and (kv % sp == 0 or sp % kv == 0)]


def all_to_all_bytes(
    model: ModelConfig, micro_batch: int, seq_len: int, sequence_parallel: int, precision: str = "bf16"
) -> int:
    """Bytes one rank sends in one layer's two Ulysses all-to-alls (q, k, v in, the attention output back).

    Each rank holds seq_len / SP tokens of q and of the output (all heads) and of k, v with max(kv_heads, SP)
    heads (kv heads are replicated first when SP exceeds them, so every rank receives one); it keeps 1 / SP of
    each and sends the rest, in the training dtype. 0 without sequence parallelism."""
    sp, act = sequence_parallel, BF16 if precision == "bf16" else FP32
    if sp <= 1:
        return 0
    tokens = micro_batch * seq_len // sp
    heads = 2 * model.n_heads + 2 * max(model.kv_heads, sp)  # q + output, k + v
    return (sp - 1) * act * tokens * heads * model.head_dim // sp


def activation_memory(
    model: ModelConfig,
    micro_batch: int,
    seq_len: int,
    checkpoint_every: int,
    dense_mask: bool,
    precision: str = "bf16",
    sequence_parallel: int = 1,
    tiled_mlp: bool = False,
    tiled_mlp_slices: int = 0,
) -> ActivationMemory:
    """Saved activations and backward peak; `checkpoint_every` 0 = no recomputation, n = every n-th layer.

    Per layer (bf16 unless noted, fp32 throughout when training in fp32; b*t*h elements = one hidden state):
      two RMSNorms: fp32 input + normalized bf16 + scaled output        8 + 8 bytes per element of b*t*h
      attention: q, k, v after RoPE (k, v scaled by kv_heads/heads), the kernel's output, o_proj's input
      SwiGLU: gate, silu(gate), up, their product                       4 x 2 bytes per element of b*t*ffn
    Recomputation keeps each checkpointed layer's input (2 bytes per b*t*h) and, in backward, one layer's full
    activations at a time. The loss upcasts `loss_chunk_size` rows of logits to fp32 at a time (recomputed in
    backward), or keeps fp32 log-probabilities of the whole micro-batch when it is not chunked.
    A sliding window changes no term: the attention kernels keep O(T) per layer (outputs and log-sum-exp, never
    the scores) whatever the window, and the boolean mask of the SDPA path is [B, 1, T, T] with or without one;
    the window shows in the FLOPs (`pretrain.model.flops.causal_pairs`) instead.

    `sequence_parallel` (DeepSpeed-Ulysses, SP ranks per sequence): a rank holds t/SP tokens, so every per-token
    term above uses t/SP. The attention kernel's q, output and log-sum-exp hold t x heads/SP after the
    all-to-all, the same elements as t/SP x heads; k and v hold t x max(kv_heads/SP, 1) heads (one replicated
    head when SP > kv_heads). The dense SDPA mask stays b*t*t: each rank builds it for the whole sequence. In
    backward the all-to-all's receive buffers for dq, dk, dv (the size of q, k, v) come on top of the
    recomputed layer (forward's come when less is saved, at no peak).
    `tiled_mlp` (DeepSpeed's TiledMLP): the SwiGLU runs under no_grad over `tiled_mlp_shards` slices and saves
    only its input (the norm output, already counted), so a layer saves no b*t*ffn term; its backward holds
    one slice's four intermediates and their two gradients (6 x 2 bytes per slice*ffn) plus the input's
    gradient (b*t*h), built slice by slice.
    """
    act = BF16 if precision == "bf16" else FP32  # bytes of an activation stored in the training dtype
    sp = max(1, sequence_parallel)
    b, t, h, v = micro_batch, seq_len // sp, model.dim, model.vocab_size  # t: this rank's tokens
    bth, btf = b * t * h, b * t * model.ffn_dim
    kv_ratio = max(model.kv_heads, sp) / model.n_heads  # k, v per q head as the kernel holds them
    norms = 2 * (FP32 + act + act) * bth
    attention = (3 * act + 2 * act * kv_ratio) * bth + FP32 * b * model.n_heads * t  # + log-sum-exp
    swiglu = 0 if tiled_mlp else 4 * act * btf
    layer_full = int(norms + attention + swiglu)
    layers = model.n_layers
    moe_layers = sum(model.moe.is_moe_layer(i) for i in range(layers))
    if moe_layers:
        # An MoE layer's SwiGLU runs top_k experts of width expert_ffn_dim per token, on routed copies of the
        # tokens (gathered input, expert output, weighted output), after fp32 router logits and probabilities.
        # TiledMLP wraps the dense SwiGLU only: expert layers keep their intermediates.
        k = model.moe.top_k
        moe_full = int(
            norms
            + attention
            + 4 * act * b * t * k * model.expert_ffn_dim
            + 3 * act * k * bth
            + 2 * FP32 * b * t * model.moe.num_experts
        )
        # Saved layers are counted at their mean size; backward's one recomputed layer at the larger kind.
        mean_full = (moe_layers * moe_full + (layers - moe_layers) * layer_full) // layers
        backward_full, layer_full = max(moe_full, layer_full), mean_full
        btf = b * t * max(model.ffn_dim, k * model.expert_ffn_dim)
    else:
        backward_full = layer_full
    layer_checkpointed = act * bth

    checkpointed = 0 if checkpoint_every <= 0 else math.ceil(layers / checkpoint_every)
    rope_tables = 2 * FP32 * b * t * model.head_dim
    # The boolean [B, 1, T, T] document mask of the SDPA path, over the whole sequence even with SP.
    mask = b * seq_len * seq_len if dense_mask else 0
    final_norm = (FP32 + act + act) * bth
    rows = b * t
    chunk = model.loss_chunk_size
    if chunk == 0 or chunk >= rows:
        # One piece: fp32 log-probabilities kept; fp32 logits in forward, two fp32 gradients in backward.
        loss_saved, loss_forward, loss_backward = FP32 * rows * v, FP32 * rows * v, 2 * FP32 * rows * v
    else:
        # Chunks recomputed in backward: logits, log-probabilities and their gradients, a chunk at a time.
        loss_saved, loss_forward, loss_backward = 0, 2 * FP32 * chunk * v, 4 * FP32 * chunk * v
    saved = (
        checkpointed * layer_checkpointed
        + (layers - checkpointed) * layer_full
        + final_norm
        + rope_tables
        + mask
        + loss_saved
    )
    # Backward of a recomputed layer holds its activations; without recomputation the SwiGLU gradients
    # (two b*t*ffn tensors) are the largest transient, or with TiledMLP one slice's and the input gradient.
    tiled_swiglu = tiled_mlp and not moe_layers  # TiledMLP wraps the dense SwiGLU only
    if tiled_swiglu:
        rows_per_slice = math.ceil(rows / tiled_mlp_shards(b, t, h, tiled_mlp_slices))
        mlp_backward = 6 * act * rows_per_slice * model.ffn_dim + act * bth
    else:
        mlp_backward = 2 * act * btf
    # The all-to-all's receive buffers for dq, dk, dv (this rank's t/SP tokens, all heads) in attention's backward.
    all_to_all = act * b * t * model.head_dim * (model.n_heads + 2 * max(model.kv_heads, sp)) if sp > 1 else 0
    if checkpointed:
        tiled = mlp_backward if tiled_swiglu else 0  # the SwiGLU's own, not in backward_full
        layer_backward = backward_full + max(all_to_all, tiled)
    else:
        layer_backward = max(mlp_backward, all_to_all)
    return ActivationMemory(
        layer_full=layer_full,
        layer_checkpointed=layer_checkpointed,
        saved=int(saved),
        forward_extra=int(loss_forward),
        backward_extra=int(max(layer_backward, loss_backward)),
        checkpointed_layers=checkpointed,
    )


@dataclass(frozen=True)
class Strategy:
    """The memory-relevant choices a plan compares."""

    offload_optimizer: bool = False
    offload_param: bool = False
    checkpointing: bool = True

    @property
    def label(self) -> str:
        offload = "params+optimizer offload" if self.offload_param else "optimizer offload"
        offload = offload if (self.offload_optimizer or self.offload_param) else "no offload"
        return f"{offload}, {'checkpointing' if self.checkpointing else 'no checkpointing'}"

    @classmethod
    def of(cls, ds: DeepSpeedConfig) -> Strategy:
        return cls(ds.offload_optimizer == "cpu", ds.offload_param == "cpu", ds.activation_checkpointing)


@dataclass
class MemoryEstimate:
    """Bytes per rank. Device memory: `resident` terms are held all the time; on top of them the largest of the
    `phases` (forward, backward, optimizer step) sets the peak. `cpu`: host memory the rank needs."""

    strategy: Strategy
    resident: dict[str, int] = field(default_factory=dict)
    phases: dict[str, dict[str, int]] = field(default_factory=dict)
    cpu: dict[str, int] = field(default_factory=dict)
    activations: ActivationMemory | None = None

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=lambda name: sum(self.phases[name].values()))

    @property
    def gpu_peak(self) -> int:
        return sum(self.resident.values()) + sum(self.phases[self.peak_phase].values())

    @property
    def cpu_total(self) -> int:
        return sum(self.cpu.values())


def _pinned(nbytes: int, device: str) -> int:
    """torch's pinned host allocator rounds every block up to a power of two (CUDA hosts only)."""
    if device != "cuda" or nbytes <= 0:
        return nbytes
    return 1 << (nbytes - 1).bit_length()


def zero3_memory(
    inventory: ParamInventory,
    model: ModelConfig,
    ds: DeepSpeedConfig,
    world: int,
    micro_batch: int,
    seq_len: int,
    strategy: Strategy,
    device: str = "cuda",
    precision: str = "bf16",
) -> MemoryEstimate:
    """Peak bytes per rank for one ZeRO stage-3 configuration (stages 0-2 with the same per-byte model), training
    in `precision` ("bf16" or "fp32", as resolved from `deepspeed.precision`).

    `world` is every rank: ZeRO-3 shards the state over data x sequence parallel ranks alike. `micro_batch`
    counts sequences per data-parallel rank; with `deepspeed.sequence_parallel_size` each rank of a sequence
    parallel group holds seq_len / SP tokens of them (`activation_memory`)."""
    stage, total = ds.zero_stage, inventory.total
    pbytes = BF16 if precision == "bf16" else FP32
    gbytes = BF16 if precision == "bf16" and ds.gradient_dtype == "bf16" else FP32
    pname, gname = f"{precision} parameter shard", f"{'bf16' if gbytes == BF16 else 'fp32'} gradient shard"
    shard = inventory.shard(world)
    param_shard = shard if stage == 3 else total
    grad_shard = shard if stage >= 2 else total
    optim_shard = shard if stage >= 1 else total
    sub_group_size = int(ds.extra.get("zero_optimization", {}).get("sub_group_size", DEFAULT_SUB_GROUP_SIZE))
    sub_groups = inventory.sub_groups(world if stage >= 1 else 1, sub_group_size)
    largest_sub_group = max(sub_groups)
    est = MemoryEstimate(strategy)
    resident, cpu = est.resident, est.cpu

    if strategy.offload_param and stage == 3:
        cpu[pname] = _pinned(pbytes * param_shard, device)
    else:
        resident[pname] = pbytes * param_shard
    if strategy.offload_optimizer:
        cpu[gname] = _pinned(gbytes * grad_shard, device)
        cpu["fp32 gradient copy"] = sum(_pinned(FP32 * n, device) for n in sub_groups)
        cpu["fp32 master weights"] = FP32 * optim_shard
        cpu["Adam moments (fp32)"] = 2 * FP32 * optim_shard
    else:
        resident[gname] = gbytes * grad_shard
        resident["fp32 master weights"] = FP32 * optim_shard
        resident["Adam moments (fp32)"] = 2 * FP32 * optim_shard
    persistent = 0
    if stage == 3:
        persistent = inventory.persistent(ds.stage3_param_persistence_threshold)
        resident["persistent parameters (whole)"] = pbytes * persistent
    # The reduce bucket is allocated with torch.empty: whole on a GPU, only its written part resident on CPU.
    bucket_used = min(ds.reduce_bucket_size, total)
    resident["reduce bucket"] = gbytes * (ds.reduce_bucket_size if device == "cuda" else bucket_used)
    acts = activation_memory(
        model,
        micro_batch,
        seq_len,
        ds.checkpoint_every_n_layers if strategy.checkpointing else 0,
        dense_mask=device != "cuda" or model.attention == "sdpa",
        precision=precision,
        sequence_parallel=ds.sequence_parallel_size,
        tiled_mlp=ds.tiled_mlp,
        tiled_mlp_slices=ds.tiled_mlp_shards,
    )
    est.activations = acts
    gathered = flat = 0
    if stage == 3:
        # Gathered parameters stay until their next use is further away than max_reuse_distance (so a model
        # smaller than that stays whole from the second step on); max_live_parameters bounds the set, checked
        # before each prefetch, so a prefetch bucket can come on top; a module larger than the bound is still
        # gathered whole. A coalesced all-gather lands in one flat
        # bf16 buffer that is copied out per parameter, so both exist for a moment.
        live = max(ds.stage3_max_live_parameters, inventory.largest_module, inventory.largest)
        gathered = pbytes * min(total - persistent, live + ds.stage3_prefetch_bucket_size)
        flat = pbytes * min(total - persistent, ds.stage3_prefetch_bucket_size + inventory.largest)
    est.phases["forward"] = {
        "gathered parameters": gathered,
        "all-gather buffer": flat,
        "activations": acts.saved + acts.forward_extra,
    }
    # In backward the gathered set only shrinks; a tensor's full bf16 gradient waits to be copied into the bucket.
    est.phases["backward"] = {
        "gathered parameters": gathered,
        "activations": acts.peak,
        "gradient before the bucket": pbytes * inventory.largest,
    }
    if not strategy.offload_optimizer:
        # Per sub-group: gradients flattened, then cast to fp32; torch's foreach AdamW (CPU ranks) makes one
        # more fp32 temporary, DeepSpeed's FusedAdam (GPU) none.
        optimizer_temp = FP32 * largest_sub_group if device != "cuda" else 0
        est.phases["optimizer step"] = {
            "fp32 gradients of a sub-group": FP32 * largest_sub_group,
            "flatten / optimizer temporaries": max(gbytes * largest_sub_group, optimizer_temp),
        }
    return est
