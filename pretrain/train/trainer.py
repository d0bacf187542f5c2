"""The training loop: schedules in tokens, gradient accumulation, validation, logging, checkpoints, resume."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from data.loader import IGNORE_INDEX, GlobalBatchLoader, split_micro_batches
from data.log import get_logger, progress_enabled
from data.mixture import MixtureDataset
from data.tokenizer import TokenizerInfo, load_tokenizer
from pretrain.batching import schedule_layouts
from pretrain.checkpoint import DEEPSPEED_FILE, SUMMARY_FILE, CheckpointManager, RunDir, config_yaml, tag_for
from pretrain.config import ConfigError, PretrainConfig
from pretrain.evaluation.generate import SamplingConfig, continuation, encode_prompt, generate
from pretrain.evaluation.long_eval import held_out_documents
from pretrain.evaluation.long_report import (
    LongContextSettings,
    format_summary,
    headline_metrics,
    long_context_report,
    write_plots,
)
from pretrain.model.flops import ModelFlops, attended_pairs, count_active_parameters
from pretrain.planning.hardware import peak_tflops
from pretrain.schedule import Cadence, LRSchedule
from pretrain.train import collectives
from pretrain.train import engine as eng
from pretrain.train.dist_env import DistEnv
from pretrain.train.faults import FaultDrills, StopRequest
from pretrain.train.metrics import SpikeDetector, Throughput, memory_gib
from pretrain.train.sequence_parallel import data_parallel
from pretrain.train.stages import choose_data_start, parent_to_start_from, start_from_parent, tokenizer_record
from pretrain.train.tracking import RunTracker, console_line, wandb_run_id

log = get_logger(__name__)


@dataclass
class TrainerState:
    """Everything besides the engine that a resumed run needs to continue exactly."""

    step: int = 0
    tokens: int = 0
    loader: dict[str, Any] = field(default_factory=dict)
    wandb_run_id: str = ""
    skipped_steps: int = 0
    batch_tokens: int = 0
    # Real target tokens (labels that are not IGNORE_INDEX), beside `tokens`, which counts slots with padding.
    target_tokens: int = 0
    # The tokenizer this run trains with ({"fingerprint", "vocab_size"}); a stage checks its parent's record.
    tokenizer: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Trainer:
    """Build everything for one rank, then `fit()` (which resumes, then trains); call `close()` in a `finally`.

    One step, top to bottom, is `train_step`; the loop around it is `fit`. Each periodic job (the step log,
    validation, checkpoints) has a `Cadence` and decides for itself whether a step is its turn.
    """

    def __init__(self, cfg: PretrainConfig, env: DistEnv):
        self.cfg = cfg
        self.env = env
        self.run_dir = Path(cfg.run_dir)
        self.seq_len = cfg.data.packing.seq_len
        # 1. The tokenizer and the schedules, all in tokens; every batch size the run grows through is checked
        #    now rather than at its first step.
        self.tokenizer, self.tok_info = load_tokenizer(cfg.tokenizer.dir)
        _check_vocab(cfg, self.tok_info)
        self.lr = LRSchedule(
            cfg.optim.lr, cfg.optim.warmup_tokens, cfg.train.total_tokens, cfg.optim.min_lr_ratio
        )
        self.batch = cfg.batch_schedule()
        # Batches count data-parallel ranks: a sequence-parallel group shares its sequences (sequence_parallel).
        self.dp_rank, self.dp_size = data_parallel(
            env.rank, env.world_size, cfg.deepspeed.sequence_parallel_size
        )
        self.layouts = schedule_layouts(
            self.batch.sizes(), self.seq_len, cfg.train.micro_batch_size, self.dp_size
        )
        # 2. A stage's parent run, checked before anything costly (the data, then the engine).
        self.parent = parent_to_start_from(cfg, self.tok_info)
        # 3. The data: the training mixture and this rank's loader over it, and each validation source.
        planned = -(-cfg.train.total_tokens // self.seq_len)
        self.train_data = MixtureDataset.from_tokenizer(
            cfg.data, self.tok_info, split="train", planned_samples=planned
        )
        self.data_start = None
        if self.parent is not None:
            self.data_start = choose_data_start(cfg, self.parent, self.train_data.fingerprint())
            if self.data_start.position:
                self.train_data.plan_samples(self.data_start.position + planned)
        val_data = MixtureDataset.from_tokenizer(cfg.data, self.tok_info, split="val")
        self.val_sources = {name: val_data.for_source(name) for name in cfg.data.sources}
        self.loader = GlobalBatchLoader(
            self.train_data, rank=self.dp_rank, world_size=self.dp_size, prefetch=cfg.train.prefetch_batches
        )
        # 4. The engine: the model (the same init on every rank; ZeRO-3 keeps each rank's slice), AdamW, DeepSpeed.
        torch.manual_seed(cfg.train.seed)
        self.engine = eng.TrainingEngine(cfg, env, self.layouts[self.batch(0)])
        # 5. Checkpoints, with the trainer's collectives.
        self.checkpoints = CheckpointManager(
            self.run_dir,
            cfg.train.keep_checkpoints,
            env.rank,
            collectives.barrier,
            self._all_ranks_ok,
            all_gather=collectives.all_gather_object,
            config_text=config_yaml(cfg),
            world_size=env.world_size,
            seed=cfg.train.seed,
        )
        # 6. What a step is measured by, and when each periodic job runs.
        self.throughput = Throughput(
            ModelFlops.of(cfg.model, self.seq_len), env.world_size, peak_tflops(cfg.logging.peak_tflops)
        )
        self.spikes = SpikeDetector(cfg.logging.spike_window, cfg.logging.spike_sigma)
        self.log_cadence = Cadence(cfg.logging.log_every_steps, at_stop=True)
        self.eval_cadence = Cadence(cfg.train.eval_every_steps, at_stop=False)
        self.save_cadence = Cadence(cfg.train.checkpoint_every_steps, at_stop=True)
        # 7. Faults: stop signals (preemption) and the drills the fault tests inject.
        self.stop = StopRequest()
        self.drills = FaultDrills(env.rank, env.world_size)
        # Filled by `fit`: where the run stands, and its wandb run (rank 0).
        self.state = TrainerState()
        self.tracker: RunTracker | None = None
        self.bad_in_a_row = 0
        self.preempted = False

    def _all_ranks_ok(self, ok: bool) -> bool:
        return collectives.all_reduce_sum([0.0 if ok else 1.0], self.engine.device)[0] == 0.0

    # -- one optimizer step -----------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        """One optimizer step over a global batch; every rank returns the same metrics."""
        # 1. The batch layout and the learning rate, both functions of the tokens consumed.
        batch_tokens = self.batch(self.state.tokens)
        layout = self.layouts[batch_tokens]
        self.engine.set_batch(layout)
        lr = self.lr(self.state.tokens + batch_tokens)
        self.engine.set_lr(lr)
        # 2. This rank's rows (with sequence parallelism, its slice of them); the target tokens of the whole global
        #    batch, counted across ranks (the loss is normalised by them), with the attended (query, key) pairs in
        #    the same collective (for the MFU; every rank of a sequence-parallel group holds a share).
        rank_batch = self.loader.next_batch(layout.sequences)
        sp = self.engine.sequence_parallel
        local_pairs = attended_pairs(rank_batch["document_ids"], self.cfg.model.sliding_window) / sp.size
        rank_batch = sp.slice_batch(rank_batch)
        local_targets = float((rank_batch["labels"] != IGNORE_INDEX).sum())
        targets, pairs = collectives.all_reduce_sum([local_targets, local_pairs], self.engine.device)
        global_targets = int(targets)
        # 3. Forward and backward per micro-batch; ZeRO-3 reduces the gradients after the last one.
        poison = self.drills.poison_loss(self.state.step + 1)
        micro_batches = split_micro_batches(rank_batch, self.cfg.train.micro_batch_size)
        assert len(micro_batches) == layout.accumulation, (len(micro_batches), layout.accumulation)
        loss_sums = [
            self.engine.backward(
                mb, last=i == len(micro_batches) - 1, global_targets=global_targets, poison=poison
            )
            for i, mb in enumerate(micro_batches)
        ]
        # 4. One optimizer step: clip to deepspeed.gradient_clipping, then AdamW; skipped (weights and optimizer
        #    state unchanged) when the gradient is not finite. Both happen inside DeepSpeed's step.
        update = self.engine.optimizer_step()
        # 5. The loss and the stop votes in one collective, so every rank stops after the same step.
        loss_sum, stop_votes = collectives.all_reduce_sum(
            [torch.stack(loss_sums).double().sum().item(), float(self.stop.requested)], self.engine.device
        )
        self.preempted = self.preempted or stop_votes > 0
        self.state.step += 1
        self.state.tokens += batch_tokens
        self.state.target_tokens += global_targets
        self.state.batch_tokens = batch_tokens
        self.throughput.add(batch_tokens, pairs)
        self._count_bad_steps(update.skipped)
        return {
            "train/loss": loss_sum / max(1, global_targets),
            "train/target_tokens": float(global_targets),
            "train/lr": lr,
            "train/grad_norm": update.grad_norm,
            "train/batch_tokens": float(batch_tokens),
            "train/grad_accum": float(layout.accumulation),
            "train/tokens": float(self.state.tokens),
            "train/target_tokens_total": float(self.state.target_tokens),
            "train/samples": float(self.loader.position),
            "train/skipped_steps": float(self.state.skipped_steps),
            **self.engine.router_stats.take(self.engine.device),  # MoE: router losses and expert load
        }

    def _count_bad_steps(self, skipped: bool) -> None:
        """A skipped step is logged; `train.max_bad_steps` of them in a row abort the run (it is diverging)."""
        if not skipped:
            self.bad_in_a_row = 0
            return
        self.state.skipped_steps += 1
        self.bad_in_a_row += 1
        log.warning(
            "step %d skipped: non-finite loss or gradient (%d in a row, %d in total)",
            self.state.step,
            self.bad_in_a_row,
            self.state.skipped_steps,
        )
        if self.bad_in_a_row >= self.cfg.train.max_bad_steps:
            raise RuntimeError(
                f"{self.bad_in_a_row} consecutive steps with a non-finite loss or gradient (step"
                f" {self.state.step}, train.max_bad_steps={self.cfg.train.max_bad_steps}); the run is"
                " diverging: lower optim.lr, check the data, or resume from an earlier checkpoint"
            )

    # -- validation -----------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Held-out loss and perplexity per source and overall (token-weighted), on the same sequences each time.

        Each source is scored on the first `train.eval_batches` global batches of its own validation split, so a
        small source is measured too instead of being crowded out by a large one.
        """
        metrics: dict[str, float] = {}
        grand_total = grand_count = 0.0
        sp = self.engine.sequence_parallel
        for name, dataset in self.val_sources.items():
            # The sequences of a world of plain data-parallel ranks, whatever the SP: each SP group reads SP ranks'
            # share and feeds it in forwards of the same rows as without SP, each sliced like a training batch.
            rows = min(self.cfg.train.micro_batch_size, len(dataset) // self.env.world_size)
            if rows == 0:
                continue
            batch_seqs = rows * sp.size * self.dp_size
            loader = GlobalBatchLoader(dataset, rank=self.dp_rank, world_size=self.dp_size)
            total = count = 0.0
            for _ in range(min(self.cfg.train.eval_batches, len(dataset) // batch_seqs)):
                for rows_batch in split_micro_batches(loader.next_batch(batch_seqs), rows):
                    loss_sum, n = self.engine.eval_loss(sp.slice_batch(rows_batch))
                    total += loss_sum
                    count += n
            total, count = collectives.all_reduce_sum([total, count], self.engine.device)
            metrics.update(_loss_metrics(f"val/{name}", total, count))
            grand_total += total
            grand_count += count
        metrics.update(_loss_metrics("val", grand_total, grand_count))
        return metrics

    # -- the loop ---------------------------------------------------------------------------------------
    def fit(self) -> dict[str, float]:
        """Resume (or start), train until the run's tokens are done or a stop, then the end-of-run jobs."""
        train = self.cfg.train
        self.resume()
        log.info(
            "training %s: %d tokens, batch %s tokens, seq_len %d, %d ranks; run dir %s",
            train.run_name,
            train.total_tokens,
            "->".join(str(s) for s in self.batch.sizes()),
            self.seq_len,
            self.env.world_size,
            self.run_dir,
        )
        if self.state.tokens >= train.total_tokens:
            log.info("run %s already reached %d tokens; nothing to do", train.run_name, self.state.tokens)
            return {}
        bar = _progress(train.total_tokens, self.state.tokens)
        steps_here, start = 0, time.perf_counter()
        stop: str | None = None
        while stop is None:
            metrics = self.train_step()
            steps_here += 1
            step = self.state.step
            stop = self._stop_reason(steps_here)
            if stop is not None:
                (log.warning if self.preempted else log.info)("%s", stop)
            if bar is not None:
                bar.update(int(metrics["train/batch_tokens"]))
                bar.set_postfix(loss=f"{metrics['train/loss']:.3f}")
            if self.spikes.update(metrics["train/loss"]):
                log.warning("loss spike at step %d: %.4f", step, metrics["train/loss"])
            if self.log_cadence.due(step, stopping=stop is not None):
                metrics.update(self.throughput.report())
                metrics.update(memory_gib())
                self._log(metrics, step)
            if self.eval_cadence.due(step, stopping=stop is not None):
                self._log(self.evaluate(), step)
            if self.save_cadence.due(step, stopping=stop is not None):
                self.save()
            self.drills.after_step(step)
        if bar is not None:
            bar.close()
        log.info("trained %d steps in this process in %.1fs", steps_here, time.perf_counter() - start)
        return {**metrics, **self.end_of_run(stop, steps_here)}

    def _stop_reason(self, steps_here: int) -> str | None:
        """Why the loop ends after this step, or None to go on."""
        if self.state.tokens >= self.cfg.train.total_tokens:
            return f"reached {self.cfg.train.total_tokens} tokens"
        if self.preempted:
            name = self.stop.name or "stop signal"
            return f"{name} received: checkpointing at step {self.state.step} and exiting"
        if self.cfg.train.stop_after_steps and steps_here >= self.cfg.train.stop_after_steps:
            return f"stopping after {steps_here} steps in this process (train.stop_after_steps)"
        return None

    def end_of_run(self, stop: str, steps_here: int) -> dict[str, float]:
        """When the run has trained all its tokens: a final validation (unless its cadence just ran one) and, if
        configured, the long-context suite."""
        if self.state.tokens < self.cfg.train.total_tokens:
            return {}
        final: dict[str, float] = {}
        if not self.eval_cadence.due(self.state.step, stopping=True):
            final = self.evaluate()
            self._log(final, self.state.step)
        if steps_here and self.cfg.train.eval_long_context:
            self._log(self.evaluate_long_context(), self.state.step)
        return final

    def resume(self) -> None:
        """Continue the newest committed checkpoint of this run; or, for a stage's first start, begin from its
        parent; else start fresh. Then the run's files and its wandb run (the same id across restarts)."""
        resumed = self.checkpoints.load_latest(self.engine)
        if resumed is not None:
            if "target_tokens" not in resumed:
                log.warning(
                    "the checkpoint predates target-token counting: train/target_tokens_total counts from 0"
                )
            self.state = TrainerState(**resumed)
            self.loader.load_state_dict(self.state.loader)
        elif self.parent is not None and self.data_start is not None:
            start_from_parent(
                self.cfg, self.parent, self.engine, self.checkpoints, self.env.is_main, self.data_start
            )
            if self.data_start.mode == "continue":
                self.loader.load_state_dict(self.data_start.parent_loader)  # checks the order's fingerprint
        self.state.tokenizer = tokenizer_record(self.tok_info)
        self._write_run_files()
        run_id = (self.state.wandb_run_id or wandb_run_id(self.run_dir)) if self.env.is_main else ""
        self.state.wandb_run_id = collectives.broadcast_object(run_id)
        if self.env.is_main:
            logging = self.cfg.logging
            self.tracker = RunTracker(
                self.cfg,
                self.run_dir,
                self.state.wandb_run_id,
                mode=logging.wandb_mode,
                project=logging.wandb_project,
                entity=logging.wandb_entity,
            )
            self.tracker.truncate_after(self.state.step)

    def _write_run_files(self) -> None:
        """The run's config, its parameter counts per rank and DeepSpeed's config, in the run directory."""
        local, total = self.engine.local_parameter_count()
        per_rank = [0.0] * self.env.world_size
        per_rank[self.env.rank] = float(local)
        per_rank = [int(x) for x in collectives.all_reduce_sum(per_rank, self.engine.device)]
        log.info(
            "model %s: %.2fM parameters, %.2fM on this rank (ZeRO-%d over %d ranks)",
            self.cfg.model.name,
            total / 1e6,
            local / 1e6,
            self.cfg.deepspeed.zero_stage,
            self.env.world_size,
        )
        if not self.env.is_main:
            return
        run = RunDir(self.run_dir)
        run.write_config(self.cfg)
        summary = {
            "parameters": total,
            "active_parameters": count_active_parameters(self.cfg.model),
            "parameters_per_rank": per_rank,
            "world_size": self.env.world_size,
            "weight_decay_parameters": self.engine.decay_parameter_names,
        }
        run.write_json(SUMMARY_FILE, summary)
        run.write_json(DEEPSPEED_FILE, self.engine.ds_config)

    def evaluate_long_context(self) -> dict[str, float]:
        """The long-context suite (`pretrain.evaluation.long_report`) on the trained model, at its window: every rank runs
        the same forwards (ZeRO-3 gathers the weights), rank 0 writes the report and its PNGs to
        runs/<name>/eval/<step tag>/ and returns its headline numbers for wandb."""
        documents = held_out_documents(self.cfg.data, self.tok_info)
        report = long_context_report(
            self.engine.model,
            self.tokenizer,
            self.tok_info,
            documents,
            LongContextSettings(),
            add_bos=self.cfg.data.add_bos,
            micro_batch_size=self.cfg.train.micro_batch_size,
        )
        if not self.env.is_main:
            return {}
        directory = self.run_dir / "eval" / tag_for(self.state.step)
        report.update(step=self.state.step, run_dir=str(self.run_dir), train_seq_len=self.seq_len)
        RunDir(directory).write_json("long_context.json", report)
        write_plots(report, directory)
        log.info("%s\n(report and plots in %s)", format_summary(report), directory)
        return headline_metrics(report)

    def save(self) -> None:
        self.state.loader = self.loader.state_dict()
        self.checkpoints.save(self.engine, self.state.step, self.state.to_dict())

    def _log(self, metrics: dict[str, float], step: int) -> None:
        if self.tracker is not None:
            self.tracker.log(metrics, step)
            log.info("%s", console_line(metrics, step))

    def sample(self, prompt: str, max_new_tokens: int) -> str:
        """A short top-k sample from the trained model; every rank runs it (ZeRO-3 gathers the weights)."""
        ids = encode_prompt(self.tokenizer, self.tok_info, prompt, self.cfg.data.add_bos)
        sampling = SamplingConfig(
            max_new_tokens=max_new_tokens, temperature=0.8, top_k=20, seed=self.cfg.train.seed
        )
        new = generate(self.engine.model, ids, sampling, eos_id=self.tok_info.eos_id)
        self.engine.model.train()
        return continuation(self.tokenizer, ids, new)

    def close(self) -> None:
        self.loader.close()
        if self.tracker is not None:
            self.tracker.finish()


def _loss_metrics(prefix: str, total: float, count: float) -> dict[str, float]:
    loss = total / max(count, 1.0)
    return {f"{prefix}/loss": loss, f"{prefix}/perplexity": math.exp(min(loss, 50.0))}


def _check_vocab(cfg: PretrainConfig, info: TokenizerInfo) -> None:
    if info.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's {info.vocab_size} tokens"
            f" ({info.dir}); set model.vocab_size>={info.vocab_size}"
        )


def _progress(total: int, done: int):
    if not progress_enabled():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=done, unit="tok", unit_scale=True, desc="train", dynamic_ncols=True)
