"""Quality vs sampling steps on a known-likelihood source: teacher, MCD student, SDTT student (issue 8).

End to end through the public API (DESIGN.md sections 4-5):

1. train an MDLM teacher on the default sparse Markov source (K = 32, L = 64; a 4-layer, d = 128 DiT without time
   conditioning) with `mcd_hf.training.teacher.main`;
2. distil it with each method of `SYSTEMS` (MCD, SDTT) at the same budget with `mcd_hf.training.distillation.main`:
   T = 64 teacher steps, 4 rounds -> a student for T/16 = 4 steps; the student after 2 rounds (T/4 steps) is kept too;
3. sample every system at T, T/2, ..., T/32 steps with the shadow sampler on the same per-sequence noise (sequence i:
   seed + i, so every cell is paired with every other), and the teacher at temperatures 0.5..0.9 at T and at the
   student's step count (its temperature frontier), with `mcd_hf.evaluation.evaluate_sampling`;
4. write the JSON, PNG plots (quality vs steps; the (entropy, quality) plane with the frontiers) and a Markdown report.

A later system (e.g. issue 10's shadow-conditioned student) is one more `System` entry in `SYSTEMS`.

    python benchmarks/steps_vs_quality.py --output_dir runs/steps_vs_quality --docs docs/benchmarks.md
    python benchmarks/steps_vs_quality.py --quick --output_dir /tmp/svq       # CI-sized smoke run (< 2 min)

Trained models are reused from `--output_dir` when their recorded arguments match (`--overwrite` retrains), and so
are the evaluated cells (under `cells/`). Work runs in `--workers` processes of one thread each (2 cores: the two
distillations run side by side, then the evaluation cells are split between the workers).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context

import torch

SOURCE_NAME = "markov"
DOCS_BEGIN = "<!-- steps_vs_quality:begin -->"
DOCS_END = "<!-- steps_vs_quality:end -->"
PIPELINE_FILES = ("model_index.json", "model", "scheduler", "tokenizer", "README.md")
DONE_MARKER = "benchmark_args.json"


@dataclass
class System:
    """One column of the benchmark.

    Args:
        name: folder name under `--output_dir` and label in the tables.
        description: one line for the report.
        distill_flags: flags for `mcd_hf.training.distillation.main` (the budget flags are added by the benchmark);
            None for the teacher itself.
    """

    name: str
    description: str
    distill_flags: list[str] | None = None


SYSTEMS = [
    System("teacher", "MDLM teacher (ancestral law, shadow sampler)"),
    System("mcd", "MCD: data coupling, reverse KL (DESIGN.md section 4)",
           ["--method", "mcd", "--coupling", "data", "--divergence", "kl-bwd"]),
    System("sdtt", "SDTT: two sampled teacher half-steps, reverse KL",
           ["--method", "sdtt", "--divergence", "kl-bwd"]),
]


@dataclass
class Budget:
    """Sizes and budgets (full run and `--quick`)."""

    seq_len: int = 64
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    teacher_steps_trained: int = 4000
    teacher_batch_size: int = 32
    teacher_learning_rate: float = 2e-3
    teacher_lr_schedule: str = "cosine"
    teacher_warmup_steps: int = 200
    teacher_sequences: int = 100_000
    sampling_steps: int = 64  # T
    num_rounds: int = 4
    steps_per_round: int = 400
    distill_batch_size: int = 32
    distill_learning_rate: float = 1e-4
    distill_sequences: int = 50_000
    intermediate_rounds: int = 2
    num_samples: int = 800
    eval_batch_size: int = 200
    # the teacher's temperature frontier at the student's step count, and (fewer points: 16x the cost) at T
    temperatures: list[float] = field(default_factory=lambda: [0.5, 0.6, 0.7, 0.8, 0.9])
    temperatures_at_T: list[float] = field(default_factory=lambda: [0.6, 0.8])

    @property
    def student_steps(self) -> int:
        return self.sampling_steps // 2**self.num_rounds

    @property
    def step_grid(self) -> list[int]:
        """T, T/2, ..., down to T/32 (or 1)."""
        return [self.sampling_steps // 2**k for k in range(6) if self.sampling_steps // 2**k >= 1]


QUICK = Budget(seq_len=32, hidden_size=32, num_layers=2, num_heads=2, teacher_steps_trained=100,
               teacher_sequences=2000, sampling_steps=16, num_rounds=2, steps_per_round=8, distill_sequences=1000,
               teacher_warmup_steps=10, intermediate_rounds=1, num_samples=48, eval_batch_size=48, temperatures=[0.7],
               temperatures_at_T=[0.7])


# ---------------------------------------------------------------------------------------------------------------------
# Worker processes: one thread each


def _init_worker() -> None:
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)  # denormals slow CPU kernels 2x (shared/research/distillation-prototype.md)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import diffusers.utils.logging
    import transformers.utils.logging

    # loading/saving progress bars would drown the log of a long run
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def _run_teacher_training(argv: list[str]) -> float:
    from mcd_hf.training.teacher import main as train_teacher

    start = time.perf_counter()
    train_teacher(argv)
    return time.perf_counter() - start


def _copy_pipeline(source_dir: str, target_dir: str) -> None:
    if os.path.exists(target_dir):
        shutil.rmtree(target_dir)
    os.makedirs(target_dir)
    for name in PIPELINE_FILES:
        path = os.path.join(source_dir, name)
        if os.path.isdir(path):
            shutil.copytree(path, os.path.join(target_dir, name))
        elif os.path.isfile(path):
            shutil.copy2(path, target_dir)


def _run_distillation(argv: list[str], output_dir: str, budget_steps: int, intermediate_steps: int | None,
                      intermediate_dir: str | None) -> float:
    """Distils in two legs when an intermediate student is wanted: stop after its rounds, keep that export, then
    resume to the end from the checkpoint (the trainer resumes exactly, so it is one uninterrupted run)."""
    from mcd_hf.training.distillation import main as distill

    start = time.perf_counter()
    if intermediate_steps:
        distill(argv + ["--max_train_steps", str(intermediate_steps), "--checkpointing_steps", str(intermediate_steps)])
        _copy_pipeline(output_dir, intermediate_dir)
        distill(argv + ["--max_train_steps", str(budget_steps), "--checkpointing_steps", str(intermediate_steps),
                        "--resume_from_checkpoint", "latest"])
    else:
        distill(argv + ["--max_train_steps", str(budget_steps)])
    return time.perf_counter() - start


def _evaluate_cells(cells: list[dict]) -> list[dict]:
    """Evaluates a group of cells (loading each pipeline once); returns [{"key", "report"}]."""
    from mcd_hf import MCDPipeline
    from mcd_hf.evaluation import evaluate_sampling, get_source

    source = get_source(SOURCE_NAME)
    pipelines, results = {}, []
    for cell in cells:
        if cell["folder"] not in pipelines:
            pipelines[cell["folder"]] = MCDPipeline.from_pretrained(cell["folder"])
        report = evaluate_sampling(
            pipelines[cell["folder"]], num_inference_steps=cell["steps"], num_samples=cell["num_samples"],
            seq_len=cell["seq_len"], source=source, temperature=cell["temperature"], batch_size=cell["batch_size"],
            seed=cell["seed"], sampler="shadow", label=cell["system"],
        )
        torch.save({"cell": cell, "report": report}, cell["cache_path"])
        results.append({"key": cell["key"], "report": report})
    return results


# ---------------------------------------------------------------------------------------------------------------------
# Training (reused when the recorded arguments match)


def _is_done(folder: str, record: dict) -> bool:
    marker = os.path.join(folder, DONE_MARKER)
    if not os.path.isfile(marker):
        return False
    with open(marker, encoding="utf-8") as handle:
        stored = json.load(handle)
    return all(stored.get(key) == value for key, value in record.items())  # the stored record adds "seconds"


def _mark_done(folder: str, record: dict) -> None:
    with open(os.path.join(folder, DONE_MARKER), "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=2)


def teacher_argv(budget: Budget, folder: str, seed: int) -> list[str]:
    return [
        "--source", SOURCE_NAME, "--seq_len", str(budget.seq_len), "--source_num_sequences",
        str(budget.teacher_sequences), "--hidden_size", str(budget.hidden_size), "--num_hidden_layers",
        str(budget.num_layers), "--num_attention_heads", str(budget.num_heads), "--cond_dim", "128",
        "--no-time_conditioning", "--dropout", "0.0", "--train_batch_size", str(budget.teacher_batch_size),
        "--max_train_steps", str(budget.teacher_steps_trained), "--learning_rate", str(budget.teacher_learning_rate),
        "--lr_scheduler_type", budget.teacher_lr_schedule, "--lr_warmup_steps", str(budget.teacher_warmup_steps),
        "--max_validation_batches", "16",
        "--seed", str(seed), "--output_dir", folder, "--disable_progress_bar", "--logging_steps", "50",
    ]


def distill_argv(budget: Budget, system: System, teacher_dir: str, folder: str, seed: int) -> list[str]:
    return [
        "--teacher", teacher_dir, "--source", SOURCE_NAME, "--seq_len", str(budget.seq_len),
        "--source_num_sequences", str(budget.distill_sequences), *system.distill_flags,
        "--num_rounds", str(budget.num_rounds), "--steps_per_round", str(budget.steps_per_round),
        "--teacher_steps", str(budget.sampling_steps), "--train_batch_size", str(budget.distill_batch_size),
        "--learning_rate", str(budget.distill_learning_rate), "--max_validation_batches", "4",
        "--validation_num_samples", "64", "--seed", str(seed), "--output_dir", folder, "--disable_progress_bar",
        "--logging_steps", "50",
    ]


def train_all(args, budget: Budget, systems: list[System], pool) -> dict:
    """Trains what is missing; returns {"folders": {system label: folder}, "seconds": {...}}."""
    root = args.output_dir
    teacher_dir = os.path.join(root, "teacher")
    folders, seconds = {"teacher": teacher_dir}, {}
    record = {"argv": teacher_argv(budget, teacher_dir, args.seed)}
    if args.overwrite or not _is_done(teacher_dir, record):
        if os.path.exists(teacher_dir):
            shutil.rmtree(teacher_dir)
        print(f"[train] teacher: {budget.teacher_steps_trained} steps", flush=True)
        seconds["teacher"] = pool.submit(_run_teacher_training, record["argv"]).result()
        _mark_done(teacher_dir, {**record, "seconds": seconds["teacher"]})
        record["seconds"] = seconds["teacher"]
    jobs = {}
    total_steps = budget.num_rounds * budget.steps_per_round
    for system in systems:
        if system.distill_flags is None:
            continue
        folder = os.path.join(root, system.name)
        intermediate = f"{system.name}@{budget.intermediate_rounds}rounds"
        intermediate_dir = os.path.join(root, intermediate.replace("@", "_"))
        folders[system.name] = folder
        if budget.intermediate_rounds:
            folders[intermediate] = intermediate_dir
        record = {"argv": distill_argv(budget, system, teacher_dir, folder, args.seed),
                  "teacher": _read_json(os.path.join(teacher_dir, DONE_MARKER))}
        if not args.overwrite and _is_done(folder, record):
            continue
        if os.path.exists(folder):
            shutil.rmtree(folder)
        print(f"[train] {system.name}: {budget.num_rounds} rounds x {budget.steps_per_round} steps", flush=True)
        intermediate_steps = budget.intermediate_rounds * budget.steps_per_round if budget.intermediate_rounds else None
        jobs[system.name] = (pool.submit(_run_distillation, record["argv"], folder, total_steps, intermediate_steps,
                                         intermediate_dir), folder, record)
    for name, (future, folder, record) in jobs.items():
        seconds[name] = future.result()
        _mark_done(folder, {**record, "seconds": seconds[name]})
    return {"folders": folders, "seconds": seconds}


def _read_json(path: str):
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation plan


def plan_cells(args, budget: Budget, folders: dict) -> list[dict]:
    cells = []

    def add(system: str, steps: int, temperature: float) -> None:
        key = f"{system}|{steps}|{temperature:g}"
        name = f"{system.replace('@', '_')}_{steps}_{temperature:g}_{budget.num_samples}_{args.seed}.pt"
        # the model's training record (its time stamp): a retrained model invalidates its cached cells
        trained_by = folders[system.split("@")[0]]
        stamp = os.path.getmtime(os.path.join(trained_by, DONE_MARKER))
        cells.append({"key": key, "system": system, "folder": folders[system], "model_stamp": stamp, "steps": steps,
                      "temperature": temperature, "num_samples": budget.num_samples, "seq_len": budget.seq_len,
                      "batch_size": budget.eval_batch_size, "seed": args.seed,
                      "cache_path": os.path.join(args.output_dir, "cells", name)})

    for system in folders:
        if "@" in system:  # a student after fewer rounds: at its own step count
            rounds = int(system.split("@")[1].replace("rounds", ""))
            add(system, budget.sampling_steps // 2**rounds, 1.0)
            continue
        for steps in budget.step_grid:
            add(system, steps, 1.0)
    for temperature in budget.temperatures:
        add("teacher", budget.student_steps, temperature)
    for temperature in budget.temperatures_at_T:
        add("teacher", budget.sampling_steps, temperature)
    return cells


def evaluate_all(args, cells: list[dict], pool) -> dict:
    """Evaluates missing cells in `--workers` balanced groups; returns {key: SamplingReport}."""
    os.makedirs(os.path.join(args.output_dir, "cells"), exist_ok=True)
    reports, missing = {}, []
    for cell in cells:
        if not args.overwrite and os.path.isfile(cell["cache_path"]):
            cached = torch.load(cell["cache_path"], weights_only=False)
            if {k: v for k, v in cached["cell"].items() if k != "folder"} == {
                    k: v for k, v in cell.items() if k != "folder"}:
                reports[cell["key"]] = cached["report"]
                continue
        missing.append(cell)
    # balance by cost (model calls ~ steps), largest first, into one group per worker
    groups = [[] for _ in range(args.workers)]
    loads = [0] * args.workers
    for cell in sorted(missing, key=lambda c: -c["steps"]):
        index = loads.index(min(loads))
        groups[index].append(cell)
        loads[index] += min(cell["steps"], cell["seq_len"])
    print(f"[evaluate] {len(missing)} cells to sample ({len(cells) - len(missing)} cached)", flush=True)
    futures = [pool.submit(_evaluate_cells, group) for group in groups if group]
    for future in futures:
        for item in future.result():
            reports[item["key"]] = item["report"]
    return reports


# ---------------------------------------------------------------------------------------------------------------------
# Analysis


def data_reference(budget: Budget, seed: int) -> dict:
    """The source's own samples scored like the samplers' (the "data" point of the plane)."""
    from mcd_hf.evaluation import bigram_entropy, get_source, mean_and_interval, unigram_entropy

    source = get_source(SOURCE_NAME)
    samples = source.sample(budget.num_samples, budget.seq_len, torch.Generator().manual_seed(seed + 10**6))
    excess = source.nll_per_token(samples, floor=1e-6) - source.sequence_entropy_per_token(budget.seq_len)
    entropy = mean_and_interval(unigram_entropy(samples, reduction="none"))
    return {
        "excess_nll": mean_and_interval(excess)._asdict(),
        "unigram_entropy": entropy._asdict(),
        "bigram_entropy": bigram_entropy(samples),
        "exact_bigram_entropy": source.bigram_entropy(budget.seq_len),
        "entropy_rate": source.entropy_rate(),
        "sequence_entropy_per_token": source.sequence_entropy_per_token(budget.seq_len),
    }


def frontier_gap(student, frontier_reports: list, entropy: str = "unigram_entropy"):
    """Paired `student - frontier` in NLL - H at the student's entropy (None outside the frontier's range).

    The frontier is the teacher at several temperatures, same steps, same seeds. Between the two frontier points
    whose entropies bracket the student's, the frontier's per-sample NLL is interpolated linearly with the weight
    that matches the mean entropies; the difference to the student is then paired sample by sample.
    """
    from mcd_hf.evaluation import paired_difference

    def mean_entropy(report):
        return report.unigram_entropy.mean if entropy == "unigram_entropy" else report.bigram_entropy

    points = sorted(frontier_reports, key=mean_entropy)
    target = mean_entropy(student)
    for low, high in zip(points, points[1:]):
        if mean_entropy(low) <= target <= mean_entropy(high):
            weight = (target - mean_entropy(low)) / max(mean_entropy(high) - mean_entropy(low), 1e-12)
            interpolated = (1 - weight) * low.per_sample["excess_nll"] + weight * high.per_sample["excess_nll"]
            return paired_difference(student.per_sample["excess_nll"], interpolated)
    return None


def analyse(budget: Budget, reports: dict, systems: list[str], data: dict) -> dict:
    from mcd_hf.evaluation import paired_comparison

    T, S = budget.sampling_steps, budget.student_steps
    teacher_at_T = reports[f"teacher|{T}|1"]
    checks = {}
    for name in systems:
        if name == "teacher" or f"{name}|{S}|1" not in reports:
            continue
        student = reports[f"{name}|{S}|1"]
        gap_to_teacher = paired_comparison(student, teacher_at_T)
        entropy_ratio = student.unigram_entropy.mean / teacher_at_T.unigram_entropy.mean - 1
        frontier = [reports[f"teacher|{S}|{t:g}"] for t in [*budget.temperatures, 1.0]]
        frontier_T = [reports[f"teacher|{T}|{t:g}"] for t in [*budget.temperatures_at_T, 1.0]]
        checks[name] = {
            "steps": S,
            "vs_teacher_at_T": gap_to_teacher._asdict(),
            "within_noise_of_teacher_at_T": gap_to_teacher.lower <= 0 <= gap_to_teacher.upper
            or gap_to_teacher.upper < 0,
            "entropy_change_vs_teacher_at_T": entropy_ratio,
            "entropy_within_2_percent": abs(entropy_ratio) <= 0.02,
            "vs_frontier_at_student_steps": _as_dict(frontier_gap(student, frontier)),
            "vs_frontier_at_student_steps_bigram": _as_dict(frontier_gap(student, frontier, "bigram_entropy")),
            "vs_frontier_at_T": _as_dict(frontier_gap(student, frontier_T)),
            "vs_teacher_same_steps": paired_comparison(student, reports[f"teacher|{S}|1"])._asdict(),
        }
        for other in systems:
            if other not in ("teacher", name) and f"{other}|{S}|1" in reports:
                checks[name][f"vs_{other}_same_steps"] = paired_comparison(student, reports[f"{other}|{S}|1"])._asdict()
    return checks


def _as_dict(interval):
    return None if interval is None else interval._asdict()


# ---------------------------------------------------------------------------------------------------------------------
# Outputs: JSON, plots, Markdown


def _fmt(interval, digits: int = 3) -> str:
    if interval is None:
        return "-"
    mean, half = (interval["mean"], interval["half_width"]) if isinstance(interval, dict) else interval
    return f"{mean:.{digits}f} ± {half:.{digits}f}"


def compute_seconds(args, budget: Budget, systems: list[System], reports: dict) -> dict:
    """Training time recorded with each model and sampling time of each cell, whether computed now or reused."""
    def recorded(name):
        return (_read_json(os.path.join(args.output_dir, name, DONE_MARKER)) or {}).get("seconds", math.nan)

    teacher = recorded("teacher")
    distillation = {s.name: recorded(s.name) for s in systems if s.distill_flags is not None}
    sampling = sum(r.seconds_per_sample * r.num_samples for r in reports.values())
    wall = teacher + max(distillation.values(), default=0.0) + sampling / args.workers
    return {"teacher": teacher, "distillation": distillation, "sampling": sampling, "wall_estimate": wall}


def make_plots(budget: Budget, reports: dict, systems: list[str], data: dict, output_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    figure, axis = plt.subplots(figsize=(6.4, 4.4))
    for name in systems:
        points = [(s, reports[f"{name}|{s}|1"]) for s in budget.step_grid if f"{name}|{s}|1" in reports]
        axis.errorbar([s for s, _ in points], [r.excess_nll.mean for _, r in points],
                      yerr=[r.excess_nll.half_width for _, r in points], marker="o", capsize=3, label=name)
    intermediate = [n for n in reports if "@" in n.split("|")[0] and n.endswith("|1")]
    for key in intermediate:
        report = reports[key]
        axis.errorbar([report.num_inference_steps], [report.excess_nll.mean], yerr=[report.excess_nll.half_width],
                      marker="s", linestyle="none", capsize=3, label=key.split("|")[0])
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.set_xlabel("sampling steps")
    axis.set_ylabel("NLL - H (nats/token), 95% CI")
    axis.set_title(f"Markov source K=32, L={budget.seq_len}: quality vs steps")
    axis.legend()
    figure.tight_layout()
    paths.append(os.path.join(output_dir, "benchmark_quality_vs_steps.png"))
    figure.savefig(paths[-1], dpi=120)
    plt.close(figure)

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    T, S = budget.sampling_steps, budget.student_steps
    for axis, entropy in zip(axes, ("unigram", "bigram")):
        def x_of(report):
            return report.unigram_entropy.mean if entropy == "unigram" else report.bigram_entropy

        for steps, style, temperatures in ((T, "-", budget.temperatures_at_T), (S, "--", budget.temperatures)):
            frontier = sorted((reports[f"teacher|{steps}|{t:g}"] for t in [*temperatures, 1.0]), key=x_of)
            temperature_range = f"{min(temperatures):g}-1"
            axis.plot([x_of(r) for r in frontier], [r.excess_nll.mean for r in frontier], style, marker=".",
                      color="black" if steps == T else "gray",
                      label=f"teacher@{steps}, temperature {temperature_range}")
        for name in systems:
            if name == "teacher":
                continue
            for steps, marker in ((S, "o"),):
                report = reports.get(f"{name}|{steps}|1")
                if report is not None:
                    axis.errorbar([x_of(report)], [report.excess_nll.mean], yerr=[report.excess_nll.half_width],
                                  marker=marker, capsize=3, linestyle="none", label=f"{name}@{steps}")
        for key in intermediate:
            report = reports[key]
            axis.plot([x_of(report)], [report.excess_nll.mean], marker="s", linestyle="none",
                      label=f"{key.split('|')[0]} (@{report.num_inference_steps})")
        data_x = data["unigram_entropy"]["mean"] if entropy == "unigram" else data["bigram_entropy"]
        axis.plot([data_x], [data["excess_nll"]["mean"]], marker="*", markersize=12, color="gold",
                  markeredgecolor="black", linestyle="none", label="data")
        axis.set_xlabel(f"{entropy} entropy (nats)")
        axis.set_ylabel("NLL - H (nats/token)")
        axis.set_title(f"(entropy, quality) plane, {entropy}")
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    paths.append(os.path.join(output_dir, "benchmark_entropy_quality_plane.png"))
    figure.savefig(paths[-1], dpi=120)
    plt.close(figure)
    return paths


def markdown_report(args, budget: Budget, reports: dict, systems: list[str], checks: dict, data: dict,
                    timing: dict, command: str, figure_names: list[str]) -> str:
    T, S = budget.sampling_steps, budget.student_steps
    compute = timing["compute_seconds"]
    distill_minutes = ", ".join(f"{name} {seconds / 60:.1f}" for name, seconds in compute["distillation"].items())
    lines = [
        f"Command: `{command}` ({'quick smoke run' if args.quick else 'full run'}; {args.workers} worker processes of "
        f"1 thread). Compute, including models and cells reused from earlier invocations: teacher training "
        f"{compute['teacher'] / 60:.1f} min, distillation {distill_minutes} min (side by side), sampling "
        f"{compute['sampling'] / 60:.1f} min summed over cells (split between the workers); about "
        f"{compute['wall_estimate'] / 60:.0f} min of wall time from scratch on this machine while it was shared. "
        f"This invocation: {timing['total_seconds'] / 60:.1f} min.",
        "",
        f"Source: the default sparse Markov chain (`get_source(\"{SOURCE_NAME}\")`, K = 32, entropy rate "
        f"{data['entropy_rate']:.4f} nats/token; per-token entropy of length-{budget.seq_len} sequences "
        f"H = {data['sequence_entropy_per_token']:.4f}; exact pooled bigram entropy "
        f"{data['exact_bigram_entropy']:.3f}). "
        f"Teacher: {budget.num_layers} layers, d = {budget.hidden_size}, no time conditioning, "
        f"{budget.teacher_steps_trained} steps x batch {budget.teacher_batch_size} "
        f"(lr {budget.teacher_learning_rate:g}, "
        f"{budget.teacher_lr_schedule}, {budget.teacher_warmup_steps} warm-up steps). "
        f"Students: {budget.num_rounds} rounds x {budget.steps_per_round} steps x batch {budget.distill_batch_size} "
        f"(lr {budget.distill_learning_rate:g}), T = {T} -> {S} steps; `@{budget.intermediate_rounds}rounds` is the "
        f"same run after {budget.intermediate_rounds} rounds ({T // 2 ** budget.intermediate_rounds} steps).",
        "",
        f"Every cell: {budget.num_samples} samples, shadow sampler, sequence i seeded `seed + i` (seed {args.seed}), "
        "so all cells share their noise (paired). `±` is a 95% interval. NLL - H: exact NLL per token under the "
        "source (impossible transitions floored at 1e-6) minus H. Forward passes: `calls/batch` is what the pipeline "
        f"made per batch of {budget.eval_batch_size}; `reveal steps/seq` is what one sequence sampled alone needs "
        "(steps that reveal nothing are skipped). Seconds per sample are from worker processes running side by side "
        "on a shared 2-core machine: compare them within a row group only.",
        "",
        f"Data (source samples): NLL - H = {_fmt(data['excess_nll'])}, unigram entropy "
        f"{_fmt(data['unigram_entropy'])}, bigram entropy {data['bigram_entropy']:.3f}.",
        "",
        "### NLL - H by steps and system",
        "",
    ]
    columns = list(systems) + sorted({k.split("|")[0] for k in reports if "@" in k.split("|")[0]})
    lines.append("| steps | " + " | ".join(columns) + " |")
    lines.append("|---|" + "---|" * len(columns))
    for steps in budget.step_grid:
        row = [_fmt(reports[f"{c}|{steps}|1"].excess_nll) if f"{c}|{steps}|1" in reports else "" for c in columns]
        lines.append(f"| {steps} | " + " | ".join(row) + " |")
    lines += ["", "### All cells", "",
              "| system | steps | temp | NLL - H | impossible % | unigram entropy | bigram entropy | calls/batch "
              "| reveal steps/seq | s/sample |", "|" + "---|" * 10]
    for key, report in reports.items():
        lines.append(
            f"| {report.label} | {report.num_inference_steps} | {report.temperature:g} | {_fmt(report.excess_nll)} "
            f"| {report.impossible_pair_percent:.2f} | {_fmt(report.unigram_entropy)} | {report.bigram_entropy:.3f} "
            f"| {report.model_calls_per_batch:.1f} | {report.reveal_steps_per_sequence:.1f} "
            f"| {report.seconds_per_sample:.2e} |")
    lines += ["", f"### Targets at {S} steps (issue 8)", "",
              "Paired differences of NLL - H (student minus reference, 95% interval; negative = student better). "
              f"Frontier: the teacher at temperatures {', '.join(f'{t:g}' for t in [*budget.temperatures, 1.0])} "
              f"({', '.join(f'{t:g}' for t in [*budget.temperatures_at_T, 1.0])} at {T} steps), interpolated to the "
              "student's entropy (unigram; bigram in the second column), paired sample by sample.", "",
              f"| student | vs teacher@{T} | entropy vs teacher@{T} | vs teacher@{S} frontier | "
              f"(bigram) | vs teacher@{T} frontier | vs teacher@{S} | vs other students@{S} |",
              "|" + "---|" * 8]
    for name, check in checks.items():
        others = "; ".join(f"{k[3:-11]}: {_fmt(v)}" for k, v in check.items()
                           if k.startswith("vs_") and k.endswith("_same_steps") and k != "vs_teacher_same_steps")
        lines.append(
            f"| {name}@{S} | {_fmt(check['vs_teacher_at_T'])} | {100 * check['entropy_change_vs_teacher_at_T']:+.1f}% "
            f"| {_fmt(check['vs_frontier_at_student_steps'])} | {_fmt(check['vs_frontier_at_student_steps_bigram'])} "
            f"| {_fmt(check['vs_frontier_at_T'])} | {_fmt(check['vs_teacher_same_steps'])} | {others or '-'} |")
    lines += ["", "`-` in a frontier column: the student's entropy is outside the range the temperatures cover.", "",
              "### Where the errors are: adjacent pairs revealed in the same step vs in different steps", "",
              "| system | steps | same-step pairs | impossible % same / different | NLL same / different |",
              "|---|---|---|---|---|"]
    for key, report in reports.items():
        if report.temperature != 1.0:
            continue
        pairs = report.reveal_pairs
        lines.append(
            f"| {report.label} | {report.num_inference_steps} | {100 * pairs.same_step_fraction:.1f}% "
            f"| {pairs.same_step_impossible_percent:.2f} / {pairs.different_step_impossible_percent:.2f} "
            f"| {pairs.same_step_nll:.3f} / {pairs.different_step_nll:.3f} |")
    lines += ["", "The NLL of a pair is the source's conditional NLL of its second token (an exact sampler gives about "
              f"the entropy rate, {data['entropy_rate']:.3f}, in both groups).", ""]
    for name in figure_names:
        lines.append(f"![{name}](figures/{name})")
    return "\n".join(lines)


def update_docs(path: str, section: str) -> None:
    """Replace the generated section between the markers of `path` (appended when the markers are missing)."""
    text = open(path, encoding="utf-8").read() if os.path.isfile(path) else "# Benchmarks\n"
    block = f"{DOCS_BEGIN}\n{section}\n{DOCS_END}"
    if DOCS_BEGIN in text and DOCS_END in text:
        text = text[: text.index(DOCS_BEGIN)] + block + text[text.index(DOCS_END) + len(DOCS_END):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)


# ---------------------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", required=True, help="models, cells, JSON, PNGs and benchmarks.md go here")
    parser.add_argument("--quick", action="store_true", help="tiny CI-sized run (< 2 min)")
    parser.add_argument("--overwrite", action="store_true", help="retrain and re-evaluate everything")
    parser.add_argument("--systems", default=",".join(s.name for s in SYSTEMS),
                        help=f"comma-separated among {[s.name for s in SYSTEMS]} (the teacher is always included)")
    parser.add_argument("--num_samples", type=int, default=None, help="samples per cell (default: the budget's)")
    parser.add_argument("--teacher_train_steps", type=int, default=None)
    parser.add_argument("--steps_per_round", type=int, default=None)
    parser.add_argument("--workers", type=int, default=2, help="processes of one thread each")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--docs", default=None, help="also write the report into this Markdown file (between "
                        "markers) and the figures/JSON into its figures/ folder")
    args = parser.parse_args(argv)
    known = {s.name for s in SYSTEMS}
    chosen = [name for name in args.systems.split(",") if name]
    if not set(chosen) <= known:
        parser.error(f"--systems must be among {sorted(known)}, got {chosen}")
    args.systems = ["teacher"] + [name for name in chosen if name != "teacher"]
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    command = "python benchmarks/steps_vs_quality.py " + " ".join(sys.argv[1:] if argv is None else argv)
    budget = Budget(**vars(QUICK)) if args.quick else Budget()
    if args.num_samples is not None:
        budget.num_samples = args.num_samples
    if args.teacher_train_steps is not None:
        budget.teacher_steps_trained = args.teacher_train_steps
    if args.steps_per_round is not None:
        budget.steps_per_round = args.steps_per_round
    os.makedirs(args.output_dir, exist_ok=True)
    systems = [s for s in SYSTEMS if s.name in args.systems]
    _init_worker()
    start = time.perf_counter()
    context = get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=context, initializer=_init_worker) as pool:
        trained = train_all(args, budget, systems, pool)
        trained_at = time.perf_counter()
        reports = evaluate_all(args, plan_cells(args, budget, trained["folders"]), pool)
    evaluated_at = time.perf_counter()
    systems_done = [s.name for s in systems]
    ordered = {cell["key"]: reports[cell["key"]] for cell in plan_cells(args, budget, trained["folders"])}
    data = data_reference(budget, args.seed)
    checks = analyse(budget, ordered, systems_done, data)
    timing = {"training_seconds": trained_at - start, "evaluation_seconds": evaluated_at - trained_at,
              "total_seconds": time.perf_counter() - start,
              "compute_seconds": compute_seconds(args, budget, systems, ordered)}

    figures = make_plots(budget, ordered, systems_done, data, args.output_dir)
    result = {
        "command": command,
        "budget": {**vars(budget), "student_steps": budget.student_steps, "step_grid": budget.step_grid},
        "systems": {s.name: {"description": s.description, "distill_flags": s.distill_flags} for s in systems},
        "data": data,
        "timing": timing,
        "checks": checks,
        "cells": [report.to_dict() for report in ordered.values()],
        "teacher_training": _read_json(os.path.join(args.output_dir, "teacher", DONE_MARKER)),
    }
    json_path = os.path.join(args.output_dir, "benchmark_steps_vs_quality.json")
    with open(json_path, "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=2)
    section = markdown_report(args, budget, ordered, systems_done, checks, data, timing, command,
                              [os.path.basename(path) for path in figures])
    update_docs(os.path.join(args.output_dir, "benchmarks.md"), section)
    if args.docs is not None:
        figures_dir = os.path.join(os.path.dirname(os.path.abspath(args.docs)), "figures")
        os.makedirs(figures_dir, exist_ok=True)
        for path in [*figures, json_path]:
            shutil.copy2(path, figures_dir)
        update_docs(args.docs, section)
    print(section)
    print(f"wrote {json_path}, {', '.join(figures)} and {os.path.join(args.output_dir, 'benchmarks.md')}")
    return result


if __name__ == "__main__":
    main()
