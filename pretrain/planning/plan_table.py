"""The planner's report as text for a terminal (`python -m pretrain.plan`; `plan.format=json` prints the data)."""

from __future__ import annotations

from typing import Any

from pretrain.planning.memory_model import GIB


def _duration(seconds: float) -> str:
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"


def _sequence_parallel(plan: dict[str, Any], sc: dict[str, Any]) -> list[str]:
    """The DeepSpeed-Ulysses lines: the configured degree's traffic, and the GPUs each degree needs."""
    sp, lines = plan["sequence_parallel"], []
    if sp["degree"] > 1:
        where = "across nodes" if sp["spans_nodes"] else "within a node"
        lines.append(
            f"  sequence parallel {sp['degree']} (DeepSpeed-Ulysses; data-parallel size "
            f"{plan['cluster']['data_parallel_size']}): {sp['all_to_all_bytes_per_step_per_gpu'] / GIB:.1f} GiB "
            f"of all-to-all per GPU per step, {_duration(sp['all_to_all_seconds_per_step'])} at an assumed "
            f"{sp['assumed_bytes_per_second'] / 1e9:.0f} GB/s ({where})"
        )
    if sc["sequence_parallel_degree"] != 1:
        lines.append(
            f"  one sequence's activations ({sc['activations_gib_at_micro_batch_1']:.1f} GiB at micro-batch 1) "
            "outgrow a GPU at any count without sequence parallelism"
        )
    lines += [
        f"  by DeepSpeed-Ulysses degree ({sc['strategy']}); all-to-all sent per GPU per optimizer step, its time",
        f"  at an assumed {sp['assumption']}:",
        f"    {'SP':>4}{'GPUs':>8}  one node{'activations':>13}{'need':>9}{'all-to-all':>12}{'time':>11}",
    ]
    for d in sc["sequence_parallel"]:
        gpus, fits = d["min_gpus"], "yes" if d["fits_one_node"] else "no"
        row = f"    {d['degree']:>4}{gpus or '> 4096':>8}  {fits:<8}{d['activations_gib']:>11.1f}Gi"
        if gpus:
            row += f"{d['gpu_need_gib']:>7.1f}Gi{d['all_to_all_bytes_per_step_per_gpu'] / GIB:>10.1f}Gi"
            row += f"{_duration(d['all_to_all_seconds_per_step']):>11}"
        lines.append(row)
    return lines


def render_table(plan: dict[str, Any]) -> str:
    """The plan as text for a terminal."""
    m, c, cl = plan["model"], plan["compute"], plan["cluster"]
    lines = [
        f"model {m['name']}: {m['parameters']:,} parameters ({m['non_embedding_parameters']:,} non-embedding"
        + (
            f"; {m['active_parameters']:,} active per token"
            if m["active_parameters"] != m["parameters"]
            else ""
        )
        + "), "
        f"seq_len {m['seq_len']}"
        + (f", sliding window {m['sliding_window']}" if m.get("sliding_window") else ""),
        f"FLOPs per token {m['flops_per_token']:.4g} (6N + attention"
        + (" in the window" if m.get("sliding_window") else "")
        + "); "
        f"{c['total_tokens']:.4g} tokens -> {c['total_flops']:.4g} FLOPs (6PC: {c['six_pc_flops']:.4g})",
        f"cluster {cl['nodes']} node(s) x {cl['gpus_per_node']} {cl['gpu']} = {cl['world_size']} GPU(s), "
        f"{cl['peak_tflops']:.0f} TFLOP/s peak bf16, {cl['gpu_memory_gib']:.1f} GiB each, MFU {cl['mfu']:.0%}",
        f"time {_duration(c['seconds'])} ({c['gpu_hours']:,.0f} GPU-hours), {c['tokens_per_second']:,.0f} tokens/s, "
        f"{c['optimizer_steps']:,} steps, {c['final_step_seconds']:.3g} s per step at the final batch "
        f"(micro-batch {cl['micro_batch_size']}, grad accumulation {cl['grad_accumulation_final']})",
        "",
        f"memory per GPU under ZeRO-{plan['zero_stage']} (allocated: torch's peak; need: + allocator headroom and "
        "CUDA context;",
        f"host/node: offloaded state + {plan['host_per_rank_gib']:.0f} GiB per rank for the processes themselves):",
        f"  {'strategy':<48}{'allocated':>10}{'need':>9}  {'host/node':>10}  fits  peak in",
    ]
    for v in plan["memory"]:
        mark = "*" if v["configured"] else " "
        fits = "yes" if v["fits_gpu"] and v["fits_cpu"] else ("no" if not v["fits_gpu"] else "host")
        lines.append(
            f"{mark} {v['strategy']:<48}{v['gpu_allocated_gib']:>8.1f}Gi{v['gpu_need_gib']:>7.1f}Gi"
            f"  {v['cpu_per_node_gib']:>8.0f}Gi  {fits:<4}  {v['peak_phase']}"
        )
    chosen = plan["memory"][0]
    lines += ["", f"breakdown of * ({chosen['strategy']}), GiB per GPU:"]
    for name, value in chosen["resident_bytes"].items():
        lines.append(f"  {name:<40}{value / GIB:>9.2f}")
    for phase, terms in chosen["phase_bytes"].items():
        parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in terms.items())
        lines.append(f"  + in {phase}: {sum(terms.values()) / GIB:.2f} ({parts})")
    for name, value in chosen["cpu_bytes_per_rank"].items():
        lines.append(f"  host, per rank: {name:<24}{value / GIB:>9.2f}")
    sc = plan["scaling"]
    lines += [
        "",
        f"GPUs ({cl['gpu']}) needed at seq_len {sc['seq_len']}, micro-batch {cl['micro_batch_size']}:",
    ]
    for label, gpus in sc["min_gpus"].items():
        lines.append(f"  {label:<48}{'more than 4096' if gpus is None else gpus:>8}")
    if sc["sequence_parallel_degree"] != 1 or plan["sequence_parallel"]["degree"] > 1:
        lines += _sequence_parallel(plan, sc)
    lines.append("")
    lines += [f"WARNING: {w}" for w in plan["warnings"]]
    if plan["suggestions"]:
        lines.append("to make it fit, any of:")
        lines += [f"  - {s}" for s in plan["suggestions"]]
    if plan["fits"]:
        lines.append(f"fits: {chosen['gpu_need_gib']:.1f} of {cl['gpu_memory_gib']:.1f} GiB per GPU")
    return "\n".join(lines) + "\n"
