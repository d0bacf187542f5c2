"""Throughput and memory of `data.prepare`, side by side with a run_clm-style baseline and the bare tokenizer.

    python benchmarks/data_pipeline.py --out data_pipeline.json       # N = 4 MiB, 3 runs each: ~2.5 min

On one generated JSONL corpus (the embedded corpus, its documents cut and perturbed), with the same tokenizer
and the same number of cores, it times:

  prepare    `data.prepare.prepare(cfg)`: read + validate + tokenize + append EOS + write validated shards
  run_clm    HF `datasets.load_dataset("json")`, `.map(tokenize, batched=True, num_proc=cores)` with the same
             tokenizer as `transformers.PreTrainedTokenizerFast(tokenizer_file=...)`, then `.map(group_texts)`
  bare       `Tokenizer.encode_batch` / `encode_batch_fast` over the texts already in memory (the limit)

Every contender runs in a fresh subprocess; tokens/s divides the same count (the corpus's tokens without EOS)
by each one's wall time. The runs are interleaved and the fastest of each is reported; tokens per CPU-second
(the process and its workers) is printed too, as it is far less sensitive to other load on a shared machine.
Peak RSS of prepare is measured on corpora of N and 10N bytes: of the main process, of its largest worker, and
of the whole process tree (summed, sampled every 20 ms with psutil; shared pages count once per process).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MB = 1 << 20


# ----------------------------------------------------------------------------------------------- the corpus


def embedded_texts() -> list[str]:
    """Documents of the embedded corpus (the standard library's `.py` files and the pydoc topics)."""
    from data.cli import compose_data_config
    from data.sources import iter_documents

    cfg = compose_data_config([])
    return [
        doc.text
        for source in cfg.data.sources.values()
        for doc in iter_documents(source, max_doc_chars=cfg.data.max_doc_chars)
    ]


def write_corpus(path: Path, size_bytes: int, base: list[str], seed: int = 0) -> int:
    """JSONL of about `size_bytes`: random windows of lines from `base` documents, with some identifiers
    renamed so the text is not an exact repeat (which would flatter a tokenizer's word cache). Returns docs."""
    rng = random.Random(seed)
    word = re.compile(r"[A-Za-z_]{4,}")
    path.parent.mkdir(parents=True, exist_ok=True)
    written = docs = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < size_bytes:
            lines = rng.choice(base).splitlines(keepends=True)
            start = rng.randrange(len(lines))
            text = "".join(lines[start : start + rng.randint(20, 400)])
            names = sorted(set(word.findall(text)))
            for name in rng.sample(names, min(3, len(names))):
                text = re.sub(rf"\b{name}\b", f"{name}_{rng.randrange(10_000)}", text)
            if not text.strip():
                continue
            line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
            f.write(line)
            written += len(line.encode("utf-8"))
            docs += 1
    return docs


# ----------------------------------------------------------------------------------------------- contenders


def _prepare_config(corpus: Path, tokenizer_dir: Path, artifacts: Path, workers: int):
    from data.cli import compose_data_config

    return compose_data_config(
        [
            "data=local_jsonl",
            f"data.sources.web.paths=[{corpus}]",
            f"paths.artifacts={artifacts}",
            f"tokenizer.dir={tokenizer_dir}",
            f"data.num_workers={workers}",
            "log_level=WARNING",
        ]
    )


def run_prepare(corpus: Path, tokenizer_dir: Path, work: Path, workers: int) -> dict[str, Any]:
    from data.prepare import prepare

    cfg = _prepare_config(corpus, tokenizer_dir, work / "artifacts", workers)
    start = time.perf_counter()
    manifest = prepare(cfg)["web"]
    seconds = time.perf_counter() - start
    splits = manifest["splits"].values()
    return {
        "seconds": seconds,
        "docs": sum(s["docs"] for s in splits),
        "tokens_with_eos": sum(s["tokens"] for s in splits),
    }


def run_baseline(corpus: Path, tokenizer_dir: Path, work: Path, workers: int, block_size: int = 1024) -> dict:
    """What `transformers/examples/pytorch/language-modeling/run_clm.py` does, minus the model."""
    from itertools import chain

    import datasets
    from transformers import PreTrainedTokenizerFast

    datasets.disable_progress_bars()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_dir / "tokenizer.json"), eos_token="</s>"
    )
    start = time.perf_counter()
    raw = datasets.load_dataset("json", data_files=str(corpus), split="train", cache_dir=str(work / "hf"))
    loaded = time.perf_counter()

    def tokenize_function(examples):
        return tokenizer(examples["text"])

    tokenized = raw.map(tokenize_function, batched=True, num_proc=workers, remove_columns=["text"])
    tokenized_at = time.perf_counter()

    def group_texts(examples):
        concatenated = {k: list(chain(*examples[k])) for k in examples}
        total = len(concatenated["input_ids"]) // block_size * block_size
        result = {
            k: [t[i : i + block_size] for i in range(0, total, block_size)] for k, t in concatenated.items()
        }
        result["labels"] = result["input_ids"].copy()
        return result

    grouped = tokenized.map(group_texts, batched=True, num_proc=workers)
    end = time.perf_counter()
    return {
        "seconds": end - start,
        "load_seconds": loaded - start,
        "tokenize_seconds": tokenized_at - loaded,
        "group_seconds": end - tokenized_at,
        "docs": len(raw),
        "blocks": len(grouped),
    }


def run_bare(corpus: Path, tokenizer_dir: Path, work: Path, workers: int, batch_docs: int = 1024) -> dict:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    with open(corpus, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    result: dict[str, Any] = {"docs": len(texts)}
    for name in ("encode_batch", "encode_batch_fast"):
        encode = getattr(tokenizer, name)
        start, cpu = time.perf_counter(), _cpu_seconds()
        tokens = 0
        for i in range(0, len(texts), batch_docs):
            tokens += sum(len(e.ids) for e in encode(texts[i : i + batch_docs], add_special_tokens=False))
        result[f"{name}_seconds"] = time.perf_counter() - start
        result[f"{name}_cpu_seconds"] = _cpu_seconds() - cpu
        result["tokens"] = tokens
    result["seconds"] = min(result["encode_batch_seconds"], result["encode_batch_fast_seconds"])
    return result


CONTENDERS = {"prepare": run_prepare, "run_clm": run_baseline, "bare": run_bare}


def _cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its waited-for children (worker processes)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _own_peak_rss_mb() -> float:
    """Peak RSS of this process. VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec, so a child started
    by a large parent would report the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(args: argparse.Namespace) -> None:
    """Run one contender and print its result (with its own and its children's peak RSS) as JSON."""
    if args.contender == "bare":
        os.environ["RAYON_NUM_THREADS"] = str(args.workers)
    cpu = _cpu_seconds()
    result = CONTENDERS[args.contender](
        Path(args.corpus), Path(args.tokenizer_dir), Path(args.work), args.workers
    )
    result.setdefault("cpu_seconds", _cpu_seconds() - cpu)
    result["maxrss_main_mb"] = _own_peak_rss_mb()
    result["maxrss_largest_child_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print("RESULT " + json.dumps(result), flush=True)


def _tree_rss_sampler(pid: int, peak: list[float], stop: threading.Event) -> None:
    try:
        import psutil
    except ImportError:
        return
    try:
        root = psutil.Process(pid)
    except psutil.Error:
        return
    while not stop.wait(0.02):
        try:
            procs = [root, *root.children(recursive=True)]
            total = 0
            for p in procs:
                with contextlib.suppress(psutil.Error):  # a worker may exit between listing and reading
                    total += p.memory_info().rss
        except psutil.Error:
            return
        peak[0] = max(peak[0], total / MB)


def measure(contender: str, corpus: Path, tokenizer_dir: Path, work: Path, workers: int) -> dict[str, Any]:
    """Run one contender in a fresh subprocess (fresh output dirs), with the tree's peak RSS sampled."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cmd = [sys.executable, __file__, "--child", contender, "--corpus", str(corpus)]
    cmd += ["--tokenizer-dir", str(tokenizer_dir), "--work", str(work), "--workers", str(workers)]
    env = {
        **os.environ,
        "HF_DATASETS_CACHE": str(work / "hf"),
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(ROOT),
    }
    env.pop("RAYON_NUM_THREADS", None)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak, stop = [0.0], threading.Event()
    sampler = threading.Thread(target=_tree_rss_sampler, args=(proc.pid, peak, stop), daemon=True)
    sampler.start()
    out, err = proc.communicate()
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{contender} failed ({proc.returncode}):\n{err[-4000:]}")
    line = next(x for x in out.splitlines() if x.startswith("RESULT "))
    result = json.loads(line[len("RESULT ") :])
    result["peak_tree_rss_mb"] = peak[0]
    shutil.rmtree(work, ignore_errors=True)
    return result


# ----------------------------------------------------------------------------------------------- the report


def train_benchmark_tokenizer(work: Path, vocab_size: int, byte_budget: int) -> Path:
    from data.cli import compose_data_config
    from data.tokenizer import train_tokenizer

    cfg = compose_data_config(
        [
            f"paths.artifacts={work}",
            f"tokenizer.vocab_size={vocab_size}",
            f"tokenizer.byte_budget={byte_budget}",
            "log_level=WARNING",
        ]
    )
    return train_tokenizer(cfg).dir


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument(
        "--mb", type=float, default=4.0, help="size N of the small corpus in MiB (the large is 10N)"
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="cores for every contender")
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs of each contender; the fastest is reported"
    )
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--tokenizer-bytes", type=int, default=4_000_000, help="tokenizer training budget")
    parser.add_argument("--work-dir", type=Path, help="scratch directory (default: a temporary one)")
    parser.add_argument("--child", choices=sorted(CONTENDERS), dest="contender", help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer-dir", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.contender:
        _child(args)
        return

    scratch = args.work_dir or Path(tempfile.mkdtemp(prefix="data-pipeline-bench-"))
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        report = run_benchmark(args, scratch)
    finally:
        if args.work_dir is None:
            shutil.rmtree(scratch, ignore_errors=True)
    print_report(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.out}")


def run_benchmark(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    print(
        f"training a {args.vocab_size}-token BPE on {args.tokenizer_bytes} bytes of the embedded corpus ..."
    )
    tokenizer_dir = train_benchmark_tokenizer(scratch / "tok", args.vocab_size, args.tokenizer_bytes)
    base = embedded_texts()
    sizes = {"small": int(args.mb * MB), "large": int(10 * args.mb * MB)}
    corpora = {}
    for name, size in sizes.items():
        corpora[name] = scratch / f"corpus-{name}.jsonl"
        docs = write_corpus(corpora[name], size, base, seed=len(name))
        print(f"corpus {name}: {corpora[name].stat().st_size / MB:.1f} MiB, {docs} documents")

    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {"prepare": [], "run_clm": [], "bare": []}
    for repeat in range(args.repeats):
        for contender in runs:  # interleaved, so a noisy neighbour hurts every contender alike
            print(f"run {repeat + 1}/{args.repeats}: {contender} on the large corpus ...", flush=True)
            runs[contender].append(
                measure(contender, corpora["large"], tokenizer_dir, scratch / "w", args.workers)
            )
    small = [measure("prepare", corpora["small"], tokenizer_dir, scratch / "w", args.workers)]

    tokens = runs["bare"][0]["tokens"]
    best = {name: min(r, key=lambda x: x["seconds"]) for name, r in runs.items()}
    rate = {name: tokens / b["seconds"] for name, b in best.items()}
    bare_batch = tokens / min(r["encode_batch_seconds"] for r in runs["bare"])
    bare_fast = tokens / min(r["encode_batch_fast_seconds"] for r in runs["bare"])
    per_cpu = {
        "prepare": tokens / min(r["cpu_seconds"] for r in runs["prepare"]),
        "run_clm_baseline": tokens / min(r["cpu_seconds"] for r in runs["run_clm"]),
        "bare_encode_batch": tokens / min(r["encode_batch_cpu_seconds"] for r in runs["bare"]),
        "bare_encode_batch_fast": tokens / min(r["encode_batch_fast_cpu_seconds"] for r in runs["bare"]),
    }
    large, small_run = best["prepare"], small[0]
    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "workers": args.workers,
        "cpu_count": os.cpu_count(),
        "vocab_size": args.vocab_size,
        "load_average_before_after": [load_before[0], os.getloadavg()[0]],
        "corpus": {name: {"bytes": corpora[name].stat().st_size} for name in corpora},
        "tokens_large_corpus": tokens,
        "tokens_per_second": {
            "prepare": rate["prepare"],
            "run_clm_baseline": rate["run_clm"],
            "bare_encode_batch": bare_batch,
            "bare_encode_batch_fast": bare_fast,
        },
        "tokens_per_cpu_second": per_cpu,
        "prepare_vs_baseline": rate["prepare"] / rate["run_clm"],
        "prepare_vs_bare_encode_batch": rate["prepare"] / bare_batch,
        "prepare_vs_bare_best": rate["prepare"] / max(bare_batch, bare_fast),
        "rss_mb": {
            "small": {
                k: small_run[k] for k in ("maxrss_main_mb", "maxrss_largest_child_mb", "peak_tree_rss_mb")
            },
            "large": {k: large[k] for k in ("maxrss_main_mb", "maxrss_largest_child_mb", "peak_tree_rss_mb")},
        },
        "baseline_breakdown_seconds": {
            k: best["run_clm"][k] for k in ("load_seconds", "tokenize_seconds", "group_seconds")
        },
        "runs": runs,
        "small_runs": small,
    }


def print_report(r: dict[str, Any]) -> None:
    t = r["tokens_per_second"]
    print(
        f"\n{r['tokens_large_corpus']:,} tokens, {r['corpus']['large']['bytes'] / MB:.0f} MiB JSONL, {r['workers']} cores"
    )
    c = r["tokens_per_cpu_second"]
    print(f"{'pipeline':<34}{'tokens/s':>12}{'prepare is':>12}{'tokens/CPU-s':>14}")
    rows = [
        ("data.prepare (shards on disk)", "prepare"),
        ("run_clm: datasets.map + group", "run_clm_baseline"),
        ("bare Tokenizer.encode_batch", "bare_encode_batch"),
        ("bare Tokenizer.encode_batch_fast", "bare_encode_batch_fast"),
    ]
    for label, key in rows:
        print(f"{label:<34}{t[key]:>12,.0f}{t['prepare'] / t[key]:>10.2f}x {c[key]:>13,.0f}")
    b = r["baseline_breakdown_seconds"]
    print(
        f"  (run_clm: load {b['load_seconds']:.1f} s, tokenize {b['tokenize_seconds']:.1f} s, group {b['group_seconds']:.1f} s)"
    )
    print(f"\nprepare / run_clm baseline:        {r['prepare_vs_baseline']:.2f}x   (goal >= 2x)")
    print(f"prepare / bare encode_batch:       {r['prepare_vs_bare_encode_batch']:.0%}   (goal >= 80%)")
    print(f"prepare / best bare (either call): {r['prepare_vs_bare_best']:.0%}")
    load = r["load_average_before_after"]
    print(
        f"(best of {len(r['runs']['prepare'])} interleaved runs each; load average {load[0]:.1f} -> {load[1]:.1f})"
    )
    print(f"\n{'peak RSS of prepare (MiB)':<30}{'main':>8}{'worker':>8}{'tree':>8}")
    for name in ("small", "large"):
        m = r["rss_mb"][name]
        size = r["corpus"][name]["bytes"] / MB
        label = f"{name} corpus ({size:.0f} MiB)"
        print(
            f"{label:<30}{m['maxrss_main_mb']:>8.0f}{m['maxrss_largest_child_mb']:>8.0f}{m['peak_tree_rss_mb']:>8.0f}"
        )


if __name__ == "__main__":
    main()
