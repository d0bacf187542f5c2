"""The planner: exact counts and FLOPs, ZeRO-3 shards, activations (checked against a measured CPU peak),
offload, the 7B recipe's fit on one H100 / one H200, and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data.config import ConfigError
from pretrain.config import ModelConfig
from pretrain.planning.memory_model import (
    ParamInventory,
    Strategy,
    activation_memory,
    all_to_all_bytes,
    zero3_memory,
)
from pretrain.planning.plan import GIB, build_plan, compose_plan_config, gpu_need_gib
from tests.helpers import ROOT

SMALL = ModelConfig(name="t", vocab_size=512, dim=256, n_layers=3, n_heads=8, n_kv_heads=4, ffn_dim=704)


@pytest.fixture(scope="module")
def cfg_7b():
    return compose_plan_config(["+experiment=7b"])


@pytest.fixture(scope="module")
def inventory_7b(cfg_7b):
    return ParamInventory.of(cfg_7b.model, cfg_7b.optim)


def plan_for(gpu: str, gpus: int = 1, *extra: str) -> dict:
    return build_plan(
        compose_plan_config(["+experiment=7b", f"cluster.gpu={gpu}", f"cluster.gpus_per_node={gpus}", *extra])
    )


def variant(plan: dict, label: str) -> dict:
    return next(v for v in plan["memory"] if v["strategy"] == label)


# -- counts, FLOPs, time ------------------------------------------------------------------------------------


def test_plan_config_keeps_the_composed_trainer_config(cfg_7b):
    assert (cfg_7b.model.dim, cfg_7b.model.n_layers, cfg_7b.train.micro_batch_size) == (4096, 32, 1)
    assert (cfg_7b.cluster.nodes, cfg_7b.cluster.gpus_per_node, cfg_7b.cluster.gpu) == (1, 8, "h100")
    assert compose_plan_config(["+experiment=7b", "cluster.nodes=3"]).cluster.world_size == 24


def test_unknown_gpu_names_the_key():
    with pytest.raises(ConfigError, match=r"cluster\.gpu"):
        compose_plan_config(["cluster.gpu=b300"])
    custom = compose_plan_config(
        ["cluster.gpu=b300", "cluster.gpu_memory_gib=180", "cluster.peak_tflops=2250"]
    )
    assert (custom.cluster.memory_gib, custom.cluster.peak) == (180, 2250)


def test_7b_counts_flops_and_time():
    plan = plan_for("h100", 8)
    model, compute = plan["model"], plan["compute"]
    p, v, h, layers, t = 6_738_415_616, 32000, 4096, 32, 4096
    assert model["parameters"] == p
    assert model["flops_per_token"] == 6 * (p - v * h) + 12 * layers * h * t
    tokens = 2_000_000_000_000
    assert compute["total_flops"] == pytest.approx(model["flops_per_token"] * tokens)
    assert compute["six_pc_flops"] == pytest.approx(6 * p * tokens)
    # 6N misses attention's 12*L*H*T but counts no embedding lookup: within 15% of 6PC at T=4096.
    assert 1.0 < compute["total_flops"] / compute["six_pc_flops"] < 1.15
    assert compute["seconds"] == pytest.approx(compute["total_flops"] / (8 * 989e12 * 0.4))
    assert plan_for("h100", 8, "cluster.mfu=0.2")["compute"]["seconds"] == pytest.approx(
        2 * compute["seconds"]
    )


# -- ZeRO-3 state ---------------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(world=st.integers(min_value=1, max_value=4096))
def test_zero3_shards_scale_as_one_over_world_size(inventory_7b, cfg_7b, world):
    est = zero3_memory(inventory_7b, cfg_7b.model, cfg_7b.deepspeed, world, 1, 4096, Strategy())
    total, tensors = inventory_7b.total, len(inventory_7b.numels)
    for name, width in [
        ("bf16 parameter shard", 2),
        ("fp32 gradient shard", 4),  # micro-batches accumulate in fp32
        ("fp32 master weights", 4),
        ("Adam moments (fp32)", 8),
    ]:
        elements = est.resident[name] // width
        # each tensor is padded to a multiple of the world size, then split
        assert total <= elements * world < total + tensors * world, name
    state = sum(est.resident[k] for k in ("bf16 parameter shard", "fp32 gradient shard"))
    state += est.resident["fp32 master weights"] + est.resident["Adam moments (fp32)"]
    assert state == pytest.approx(18 * total / world, rel=tensors * world / total + 1e-9)


def test_bf16_gradients_cost_two_bytes_less_per_parameter(inventory_7b, cfg_7b):
    low = replace(cfg_7b.deepspeed, gradient_dtype="bf16")
    fp32 = zero3_memory(inventory_7b, cfg_7b.model, cfg_7b.deepspeed, 8, 1, 4096, Strategy())
    bf16 = zero3_memory(inventory_7b, cfg_7b.model, low, 8, 1, 4096, Strategy())
    assert fp32.resident["fp32 gradient shard"] == 2 * bf16.resident["bf16 gradient shard"]
    assert fp32.resident["reduce bucket"] == 2 * bf16.resident["reduce bucket"]


def test_persistent_parameters_stay_whole():
    inv = ParamInventory(numels=(10, 100, 1000, 10_000), groups=((1000, 10_000), (10, 100)))
    assert inv.persistent(100) == 110
    assert inv.shard(4) == 3 + 25 + 250 + 2500
    assert inv.sub_groups(1, 5000) == [11_000, 110]
    assert inv.sub_groups(1, 10**9) == [11_000, 110]


def test_offload_moves_state_to_host(inventory_7b, cfg_7b):
    def estimate(strategy):
        return zero3_memory(inventory_7b, cfg_7b.model, cfg_7b.deepspeed, 8, 1, 4096, strategy)

    plain = estimate(Strategy())
    optimizer = estimate(Strategy(offload_optimizer=True))
    params = estimate(Strategy(offload_optimizer=True, offload_param=True))
    shard = inventory_7b.shard(8)
    assert plain.cpu_total == 0
    for moved in ("fp32 master weights", "Adam moments (fp32)", "fp32 gradient shard"):
        assert moved in plain.resident and moved not in optimizer.resident and moved in optimizer.cpu
    assert optimizer.cpu["fp32 master weights"] + optimizer.cpu["Adam moments (fp32)"] == 12 * shard
    assert "optimizer step" not in optimizer.phases  # the step runs on the CPU
    assert "bf16 parameter shard" in optimizer.resident and "bf16 parameter shard" in params.cpu
    assert plain.gpu_peak > optimizer.gpu_peak > params.gpu_peak
    assert params.cpu_total > optimizer.cpu_total >= 12 * shard


# -- activations ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [0, 128])
def test_checkpointing_reduces_activations(chunk):
    model = replace(SMALL, n_layers=8, loss_chunk_size=chunk)
    full, every_2, every_1 = (activation_memory(model, 4, 512, n, dense_mask=False) for n in (0, 2, 1))
    assert full.saved > every_2.saved > every_1.saved
    assert full.peak > every_2.peak > every_1.peak
    assert every_1.checkpointed_layers == 8 and every_2.checkpointed_layers == 4
    # recomputation keeps each layer's input instead of its activations; the rest (final norm, loss) is unchanged
    assert every_1.saved - 8 * every_1.layer_checkpointed == full.saved - 8 * full.layer_full
    # ... and holds one layer's activations at a time during backward
    assert every_1.peak - every_1.saved >= every_1.layer_full


def test_chunked_loss_keeps_no_logits():
    model = replace(SMALL, vocab_size=32000)
    whole = activation_memory(replace(model, loss_chunk_size=0), 2, 1024, 1, dense_mask=False)
    chunked = activation_memory(replace(model, loss_chunk_size=256), 2, 1024, 1, dense_mask=False)
    assert whole.saved - chunked.saved == 4 * 2 * 1024 * 32000
    assert chunked.peak < whole.peak


MEASURE = textwrap.dedent(
    """
    import json, sys, torch
    from torch.utils.checkpoint import checkpoint
    from pretrain.config import ModelConfig
    from pretrain.model.transformer import Transformer
    def rss(key):
        return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))
    torch.set_num_threads(1)
    cfg = ModelConfig(**json.loads(sys.argv[1]))
    model = Transformer(cfg).to(torch.bfloat16)
    if sys.argv[2] == "1":
        model.set_activation_checkpointing(lambda block, *a: checkpoint(block, *a, use_reentrant=False))
    ids = torch.randint(0, cfg.vocab_size, (4, 256))
    docs = torch.zeros_like(ids)
    docs[:, 100:] = 1
    model(ids, document_ids=docs, labels=ids).backward()  # warm-up; gradients stay allocated
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak RSS
    base = rss("VmRSS:")
    model(ids, document_ids=docs, labels=ids).backward()
    print(rss("VmHWM:") - base)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc/self/clear_refs")
@pytest.mark.parametrize("checkpointing", [True, False])
def test_activation_model_matches_measured_cpu_peak(checkpointing):
    """The per-layer formulas against the peak RSS of one forward and backward of a bf16 model on CPU.

    glibc is told to return freed memory at once (MALLOC_MMAP_THRESHOLD_), so RSS follows live tensors.
    """
    model = replace(SMALL, max_seq_len=256)
    fields = {
        k: getattr(model, k) for k in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim")
    }
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, json.dumps({**fields, "max_seq_len": 256}), str(int(checkpointing))],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    measured = int(out.stdout.split()[-1])
    predicted = activation_memory(model, 4, 256, 1 if checkpointing else 0, dense_mask=True).peak
    assert 0.85 < measured / predicted < 1.15, (measured, predicted)


# -- the 7B recipe: one H200 without offload, one H100 with optimizer offload ------------------------------


def test_7b_on_one_h100_needs_optimizer_offload():
    plan = plan_for("h100")
    assert not plan["fits"]
    assert any("does not fit" in w for w in plan["warnings"])
    assert any("offload_optimizer=cpu" in s for s in plan["suggestions"])
    offload = variant(plan, "optimizer offload, checkpointing")
    assert offload["fits_gpu"] and offload["gpu_need_gib"] < 79.6
    # 7B x 16 bytes of state is about 100 GiB: more than an H100 holds
    assert variant(plan, "no offload, checkpointing")["gpu_allocated_gib"] > 6.7e9 * 16 / GIB
    # the host holds fp32 master, moments and gradients: at least 12 bytes per parameter
    assert offload["cpu_per_node_gib"] > 6.7e9 * 12 / GIB


def test_7b_on_one_h200_fits_with_checkpointing_and_no_offload():
    plan = plan_for("h200")
    assert plan["fits"] and not plan["suggestions"]
    chosen = plan["memory"][0]
    assert chosen["configured"] and chosen["strategy"] == "no offload, checkpointing"
    assert chosen["gpu_need_gib"] < 140.4
    assert (
        variant(plan, "no offload, no checkpointing")["gpu_allocated_gib"] > chosen["gpu_allocated_gib"] + 15
    )


def test_7b_on_8_h100_fits_and_suggestions_find_more_gpus():
    assert plan_for("h100", 8)["fits"]
    tight = plan_for("a100-40gb", 1, "deepspeed.activation_checkpointing=false")
    assert not tight["fits"]
    assert any("cluster.nodes=" in s for s in tight["suggestions"])


def test_gpu_need_adds_headroom_and_context():
    """What torch allocates at its peak, plus 10% for the caching allocator's fragmentation, plus 1.5 GiB that
    torch does not count (CUDA context, NCCL buffers, workspaces): computed by hand."""
    assert gpu_need_gib(0) == pytest.approx(1.5, rel=1e-12)
    assert gpu_need_gib(100 * GIB) == pytest.approx(100 * 1.1 + 1.5, rel=1e-12)  # 111.5
    assert gpu_need_gib(GIB // 2) == pytest.approx(0.55 + 1.5, rel=1e-12)
    assert gpu_need_gib(3 * GIB) - gpu_need_gib(2 * GIB) == pytest.approx(1.1, rel=1e-12)


# -- the command ------------------------------------------------------------------------------------------------


def test_cli_prints_a_table_and_writes_json(tmp_path):
    out = tmp_path / "plan.json"
    result = subprocess.run(
        [sys.executable, "-m", "pretrain.plan", "+experiment=7b", f"plan.json_out={out}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "6,738,415,616 parameters" in result.stdout
    assert "memory per GPU" in result.stdout and "optimizer offload" in result.stdout
    saved = json.loads(out.read_text())
    assert saved["model"]["parameters"] == 6_738_415_616
    assert saved["cluster"]["world_size"] == 8


def test_a_module_larger_than_max_live_parameters_is_still_gathered_whole():
    """Mixtral 8x7B: one layer's experts (3 x 8 x 4096 x 14336 elements, 2.6 GiB in bf16) exceed
    stage3_max_live_parameters (1e9); ZeRO-3 gathers them anyway, and so does the plan."""
    cfg = compose_plan_config(["+experiment=mixtral_8x7b"])
    inventory = ParamInventory.of(cfg.model, cfg.optim)
    experts = 3 * 8 * 4096 * 14336
    assert inventory.largest_module == experts > cfg.deepspeed.stage3_max_live_parameters
    estimate = zero3_memory(inventory, cfg.model, cfg.deepspeed, 8, 1, 8192, Strategy())
    assert estimate.phases["forward"]["gathered parameters"] >= 2 * experts


# -- sequence parallelism (DeepSpeed-Ulysses) and TiledMLP -----------------------------------------------------


def test_sequence_parallel_splits_every_per_token_term():
    """Each of SP ranks holds t/SP tokens; the attention tensors after the all-to-all (t x heads/SP) hold as many
    elements; the dense mask stays b*t*t; backward adds the all-to-all's receive buffers for dq, dk, dv."""
    model = replace(SMALL, n_layers=4, loss_chunk_size=64)
    b, t, hd = 2, 1024, SMALL.head_dim
    one, two = (activation_memory(model, b, t, 1, dense_mask=False, sequence_parallel=sp) for sp in (1, 2))
    assert 2 * two.layer_full == one.layer_full and 2 * two.layer_checkpointed == one.layer_checkpointed
    assert 2 * two.saved == one.saved  # inputs, final norm, RoPE tables (the chunked loss keeps nothing)
    receive = 2 * b * (t // 2) * hd * (8 + 2 * 4)  # bf16 dq + dk + dv on this rank's t/2 tokens
    assert two.backward_extra == one.layer_full // 2 + receive
    assert one.backward_extra == one.layer_full
    masked = activation_memory(model, b, t, 1, dense_mask=True, sequence_parallel=2)
    assert masked.saved - two.saved == b * t * t  # each rank builds the whole sequence's mask


def test_sequence_parallel_beyond_kv_heads_replicates_them():
    """SP=4 over 2 kv heads: each rank receives one replicated kv head for the whole sequence, as 4 kv heads
    would give it, so k and v cost more than 2/4 of a kv head per rank."""
    narrow, wide = replace(SMALL, n_kv_heads=2), replace(SMALL, n_kv_heads=4)
    at = {
        m.kv_heads: activation_memory(m, 1, 512, 0, dense_mask=False, sequence_parallel=4)
        for m in (narrow, wide)
    }
    assert at[2].layer_full == at[4].layer_full
    assert 4 * at[2].layer_full > activation_memory(narrow, 1, 512, 0, dense_mask=False).layer_full


def test_tiled_mlp_saves_no_swiglu_intermediates():
    model = replace(SMALL, n_layers=4, loss_chunk_size=64)
    b, t, h, f = 2, 1024, SMALL.dim, SMALL.ffn_dim
    plain, tiled = (activation_memory(model, b, t, 0, dense_mask=False, tiled_mlp=x) for x in (False, True))
    swiglu = 4 * 2 * b * t * f  # gate, silu(gate), up, product in bf16
    assert plain.layer_full - tiled.layer_full == swiglu
    assert plain.saved - tiled.saved == 4 * swiglu
    # backward: one slice of ceil(b*t / dim) slices, its four intermediates and two gradients, plus dx
    rows = -(-b * t // -(-b * t // h))
    assert tiled.backward_extra == 6 * 2 * rows * f + 2 * b * t * h < plain.backward_extra
    # with recomputation a layer keeps only its input either way; backward recomputes a smaller layer
    ckpt = [activation_memory(model, b, t, 1, dense_mask=False, tiled_mlp=x) for x in (False, True)]
    assert ckpt[0].saved == ckpt[1].saved and ckpt[1].peak < ckpt[0].peak


def test_all_to_all_bytes_by_hand():
    # SP=2, 8 heads, 4 kv heads, head_dim 32, 2 x 1024 tokens: each rank holds 1024 tokens, sends half
    assert all_to_all_bytes(SMALL, 2, 1024, 2) == 1024 * 32 * (8 + 8 + 4 + 4) * 2 // 2
    # SP=8 > 4 kv heads: k and v go out as 8 replicated heads; fp32 doubles it; SP=1 sends nothing
    assert all_to_all_bytes(SMALL, 2, 1024, 8) == 7 * 256 * 32 * (8 + 8 + 8 + 8) * 2 // 8
    assert all_to_all_bytes(SMALL, 2, 1024, 8, "fp32") == 2 * all_to_all_bytes(SMALL, 2, 1024, 8)
    assert all_to_all_bytes(SMALL, 2, 1024, 1) == 0


LONG = ["+experiment=7b_long", "data.packing.seq_len=262144", "model.max_seq_len=262144"]


@pytest.mark.parametrize(
    ("extra", "passes", "bandwidth"),
    [
        ([], 3 * 32, 300e9),  # forward, backward and the recomputed forward of 32 layers, over NVLink
        (["deepspeed.activation_checkpointing=false"], 2 * 32, 300e9),
        (["cluster.gpus_per_node=4", "cluster.nodes=2"], 3 * 32, 50e9),  # 8 ranks over 2 nodes: the NIC
    ],
)
def test_all_to_all_per_step_by_hand(extra, passes, bandwidth):
    plan = build_plan(compose_plan_config([*LONG, "deepspeed.sequence_parallel_size=8", *extra]))
    # 7B: 32 heads of 128 (q, k, v, output), 262144 / 8 tokens per rank in bf16, 7/8 of it sent; 16 sequences
    # per step on one data-parallel rank = 16 micro-batches
    per_layer = 7 * 2 * (262144 // 8) * 128 * (4 * 32) // 8
    sp = plan["sequence_parallel"]
    assert plan["cluster"]["data_parallel_size"] == 1 and plan["cluster"]["grad_accumulation_final"] == 16
    assert sp["all_to_all_bytes_per_step_per_gpu"] == per_layer * passes * 16
    assert sp["all_to_all_seconds_per_step"] == pytest.approx(per_layer * passes * 16 / bandwidth)
    assert not any("batch" in w or "sequence_parallel" in w for w in plan["warnings"])


def test_sequence_parallel_state_stays_sharded_over_the_whole_world(inventory_7b, cfg_7b):
    sp = replace(cfg_7b.deepspeed, sequence_parallel_size=8)
    plain = zero3_memory(inventory_7b, cfg_7b.model, cfg_7b.deepspeed, 8, 1, 4096, Strategy())
    split = zero3_memory(inventory_7b, cfg_7b.model, sp, 8, 1, 4096, Strategy())
    assert split.resident == plain.resident
    assert split.activations.layer_checkpointed * 8 == plain.activations.layer_checkpointed


def test_batch_layout_counts_data_parallel_ranks():
    """16 sequences of 262144 per step: on 32 GPUs as 32 data-parallel ranks they do not divide, as 4 groups of
    SP=8 they do; an SP that does not divide the world is named."""
    base = [*LONG, "cluster.nodes=4"]
    assert any("batch on 32 GPUs" in w for w in build_plan(compose_plan_config(base))["warnings"])
    plan = build_plan(compose_plan_config([*base, "deepspeed.sequence_parallel_size=8"]))
    assert not any("batch" in w for w in plan["warnings"]) and plan["cluster"]["grad_accumulation_final"] == 4
    odd = build_plan(
        compose_plan_config([*LONG, "cluster.gpus_per_node=4", "deepspeed.sequence_parallel_size=8"])
    )
    assert any("deepspeed.sequence_parallel_size=8 does not divide" in w for w in odd["warnings"])


def test_scaling_picks_sequence_parallelism_only_when_a_sequence_outgrows_a_gpu():
    short = plan_for("h100", 8)["scaling"]
    assert short["sequence_parallel_degree"] == 1 and short["sequence_parallel_fits_one_node"]
    long = build_plan(compose_plan_config([*LONG, "cluster.gpu=h100"]))
    sc = long["scaling"]
    assert (
        sc["sequence_parallel_degree"] > 1
        and sc["sequence_parallel_gpus"] % sc["sequence_parallel_degree"] == 0
    )
    by_degree = {d["degree"]: d for d in sc["sequence_parallel"]}
    assert set(by_degree) == {1, 2, 4, 8, 16, 32}  # 64 does not divide the 32 heads
    assert by_degree[1]["min_gpus"] is None and by_degree[8]["fits_one_node"]
    # activations per GPU halve with each doubling of the degree (plus the all-to-all buffers)
    assert by_degree[4]["activations_gib"] == pytest.approx(by_degree[8]["activations_gib"] * 2, rel=0.02)
    assert any("deepspeed.sequence_parallel_size=" in s for s in long["suggestions"])
