"""Beyond the paper: the shadow-conditioned student (issue 10) at T/16 steps against the teacher, its temperature
frontier, MCD and SDTT, on a known-likelihood source.

All through the public API: a teacher is trained (`mcd_hf.training.teacher`) or given, distilled with MCD (reverse KL,
data coupling, DESIGN.md section 4), SDTT and `--method shadow` at the same budget (the shadow student also at a
larger budget, and deeper at the same one), then every
system is sampled by `evaluate_sampling` on the same seeds (the shadow sampler: paired noise). The teacher's T/16
temperature frontier is searched at each student's entropy (bisection on the temperature, same seeds), so that
"beyond the frontier at equal entropy" is a paired difference with its 95% interval.

    python benchmarks/shadow_student.py --output_dir outputs/shadow_student            # the full run
    python benchmarks/shadow_student.py --quick --output_dir /tmp/shadow_quick           # a smoke run (minutes)

Reruns reuse the trained models found in `--output_dir`. Writes `results.json` and `shadow_student.md` there and,
with `--docs FILE`, replaces the section between the markers below in FILE (creating it if needed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time

import torch

BEGIN_MARKER = "<!-- shadow-student:begin -->"
END_MARKER = "<!-- shadow-student:end -->"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default=os.path.join("outputs", "shadow_student"))
    parser.add_argument("--quick", action="store_true", help="tiny models and sample counts (CI smoke run)")
    parser.add_argument("--teacher", default=None, help="an MCDPipeline folder (default: train one in output_dir)")
    parser.add_argument("--mcd", default=None, help="an MCD student folder (default: distil one in output_dir)")
    parser.add_argument("--no_sdtt", dest="sdtt", action="store_false", help="skip the SDTT student")
    parser.add_argument("--source", default="markov")
    parser.add_argument("--seq_len", type=int, default=64)
    parser.add_argument("--teacher_steps", type=int, default=64, help="T")
    parser.add_argument("--num_rounds", type=int, default=4, help="students sample in T / 2^num_rounds steps")
    parser.add_argument("--steps_per_round", type=int, default=400, help="the equal budget (MCD's)")
    parser.add_argument("--budget_multiplier", type=int, default=3, help="the larger shadow budget, x steps_per_round")
    parser.add_argument("--shadow_lr_multiplier", type=float, default=10.0)
    parser.add_argument("--deep_extra_layers", type=int, default=2,
                        help="also distil an equal-budget shadow student with this many extra blocks (0: skip)")
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--train_batch_size", type=int, default=32)
    parser.add_argument("--num_samples", type=int, default=2000, help="samples per evaluated system")
    parser.add_argument("--batch_size", type=int, default=250, help="sampling batch size")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared CPU, oversubscribed threads run many times slower)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--docs", default=None, help="a markdown file whose shadow-student section is replaced")
    parser.add_argument("--report_only", action="store_true",
                        help="rewrite the report from output_dir/results.json (no training, no sampling)")
    return parser


def quick_overrides(args: argparse.Namespace) -> None:
    args.seq_len, args.teacher_steps, args.num_rounds = 32, 16, 2
    args.steps_per_round, args.budget_multiplier = 3, 2
    args.num_samples, args.batch_size = 64, 64
    args.deep_extra_layers = min(args.deep_extra_layers, 1)


def _trained(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, "model_index.json"))


def train_teacher(args: argparse.Namespace, folder: str) -> list[str]:
    from mcd_hf.training.teacher import train_teacher as run

    size = ["--hidden_size", "32", "--num_hidden_layers", "2", "--num_attention_heads", "2", "--cond_dim", "16",
            "--max_train_steps", "30", "--source_num_sequences", "512"] if args.quick else [
            "--hidden_size", "128", "--num_hidden_layers", "4", "--num_attention_heads", "4", "--cond_dim", "128",
            "--max_train_steps", "2000", "--source_num_sequences", "100000"]
    argv = ["--source", args.source, "--seq_len", str(args.seq_len), *size, "--no-time_conditioning",
            "--dropout", "0.0", "--train_batch_size", "32", "--learning_rate", "1e-3", "--lr_warmup_steps", "100",
            "--max_validation_batches", "16", "--seed", str(args.seed), "--output_dir", folder,
            "--disable_progress_bar", "--cpu"]
    if not _trained(folder):
        run(argv)
    return argv


def distill(args: argparse.Namespace, teacher: str, folder: str, method: str, steps_per_round: int,
            extra_layers: int = 0) -> list[str]:
    from mcd_hf.training.distillation import distill as run

    argv = ["--teacher", teacher, "--source", args.source, "--seq_len", str(args.seq_len),
            "--source_num_sequences", "512" if args.quick else "100000", "--method", method,
            "--num_rounds", str(args.num_rounds), "--steps_per_round", str(steps_per_round),
            "--teacher_steps", str(args.teacher_steps), "--train_batch_size", str(args.train_batch_size),
            "--learning_rate", str(args.learning_rate), "--validation_num_samples", "8" if args.quick else "128",
            "--max_validation_batches", "4", "--seed", str(args.seed), "--output_dir", folder,
            "--disable_progress_bar", "--cpu"]
    if method == "mcd":
        argv += ["--divergence", "kl-bwd", "--coupling", "data"]
    elif method == "sdtt":
        argv += ["--divergence", "kl-bwd"]
    else:
        argv += ["--shadow_divergence", "kl-fwd", "--shadow_lr_multiplier", str(args.shadow_lr_multiplier)]
        if extra_layers:
            argv += ["--shadow_extra_layers", str(extra_layers)]
    if not _trained(folder):
        run(argv)
    return argv


class Evaluator:
    """`evaluate_sampling` on fixed seeds, with a cache (same setting, same report)."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.cache: dict = {}

    def __call__(self, name: str, pipe, steps: int, temperature: float = 1.0):
        from mcd_hf.evaluation.quality import evaluate_sampling

        key = (name, steps, round(temperature, 6))
        if key not in self.cache:
            start = time.perf_counter()
            self.cache[key] = evaluate_sampling(
                pipe, num_inference_steps=steps, num_samples=self.args.num_samples, seq_len=self.args.seq_len,
                source=self.args.source, temperature=temperature, batch_size=self.args.batch_size,
                seed=self.args.seed + 10_000, sampler="shadow", label=name,
            )
            report = self.cache[key]
            print(f"  {name}@{steps} T={temperature:.4f}: NLL-H {report.excess_nll.mean:.4f} "
                  f"+- {report.excess_nll.half_width:.4f}, unigram H {report.unigram_entropy.mean:.4f} "
                  f"({time.perf_counter() - start:.0f}s)", flush=True)
        return self.cache[key]


def frontier_at_entropy(evaluate: Evaluator, teacher, steps: int, entropy: float, iterations: int = 7):
    """The teacher's report at `steps` at the temperature whose unigram entropy is closest to `entropy`.

    Entropy increases with temperature; bisection on [0.3, 1.3] (clipped when the target lies outside).
    """
    low, high = 0.3, 1.3
    best = None
    for _ in range(iterations):
        middle = 0.5 * (low + high)
        report = evaluate("teacher", teacher, steps, middle)
        if best is None or abs(report.unigram_entropy.mean - entropy) < abs(best.unigram_entropy.mean - entropy):
            best = report
        if report.unigram_entropy.mean < entropy:
            low = middle
        else:
            high = middle
    return best


def row(report) -> dict:
    pairs = report.reveal_pairs
    return {
        "system": report.label, "steps": report.num_inference_steps, "temperature": report.temperature,
        "excess_nll": report.excess_nll.mean, "excess_nll_ci": report.excess_nll.half_width,
        "unigram_entropy": report.unigram_entropy.mean, "unigram_entropy_ci": report.unigram_entropy.half_width,
        "bigram_entropy": report.bigram_entropy, "impossible_pair_percent": report.impossible_pair_percent,
        "same_step_impossible_percent": pairs.same_step_impossible_percent,
        "different_step_impossible_percent": pairs.different_step_impossible_percent,
        "same_step_nll": pairs.same_step_nll, "different_step_nll": pairs.different_step_nll,
        "same_step_fraction": pairs.same_step_fraction, "model_calls_per_batch": report.model_calls_per_batch,
        "seconds_per_sample": report.seconds_per_sample,
    }


def markdown(results: dict) -> str:
    setup = results["setup"]
    lines = [
        BEGIN_MARKER,
        "## Beyond the paper: the shadow-conditioned student",
        "",
        "The shadow student (issue 10, `--method shadow`, `mcd_hf.training.shadow_distillation`) reads the shadow "
        "sampler's per-position noise (fine-grid steps until each reveal, and the value noise `r_i`) through a "
        "zero-initialised embedding, and is distilled progressively to reproduce two deterministic steps of its "
        "target in one (soft forward-KL loss on the target's distribution where it revealed each token). It "
        "samples with the shadow sampler: a deterministic map from noise to text.",
        "",
        f"Setup: source `{setup['source']}` (entropy rate {setup['entropy_rate']:.4f} nats/token), L = "
        f"{setup['seq_len']}, T = {setup['teacher_steps']}, students at T/{2 ** setup['num_rounds']} = "
        f"{setup['student_steps']} steps; {setup['num_samples']} samples per row on the same seeds (shadow "
        f"sampler, paired); +- is a 95% interval. Distillation: {setup['num_rounds']} rounds, batch "
        f"{setup['train_batch_size']}, lr {setup['learning_rate']} (shadow embedding x{setup['shadow_lr_multiplier']}); "
        f"equal budget = {setup['steps_per_round']} steps per round (MCD's), larger budget = "
        f"{setup['steps_per_round'] * setup['budget_multiplier']}. Each shadow student step costs one forward of "
        "the same network as the teacher's (plus the O(L) feature embedding); the `+N blocks` student appends N "
        "identity-initialised blocks, so each of its calls costs (layers + N) / layers teacher calls.",
        "",
        "| system | steps | temperature | NLL - H | unigram entropy | bigram entropy | impossible pairs % | "
        "same-step / other pairs impossible % | same-step / other pair NLL | model calls |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for item in results["rows"]:
        lines.append(
            f"| {item['system']} | {item['steps']} | {item['temperature']:.3f} | {item['excess_nll']:.3f} +- "
            f"{item['excess_nll_ci']:.3f} | {item['unigram_entropy']:.3f} | {item['bigram_entropy']:.3f} | "
            f"{item['impossible_pair_percent']:.2f} | {item['same_step_impossible_percent']:.1f} / "
            f"{item['different_step_impossible_percent']:.1f} | {item['same_step_nll']:.3f} / "
            f"{item['different_step_nll']:.3f} | {item['model_calls_per_batch']:.1f} |"
        )
    lines += [
        "",
        f"Against the teacher's T/{2 ** setup['num_rounds']} temperature frontier at each student's entropy "
        "(teacher temperature found by bisection on unigram entropy; paired differences, student minus "
        "teacher; negative NLL - H is better):",
        "",
        "| student | matched teacher temperature | unigram entropy difference | NLL - H difference vs frontier | "
        "NLL - H difference vs teacher@T |",
        "|---|---|---|---|---|",
    ]
    for item in results["comparisons"]:
        lines.append(
            f"| {item['student']} | {item['frontier_temperature']:.3f} | {item['entropy_difference']:+.3f} +- "
            f"{item['entropy_difference_ci']:.3f} | {item['frontier_difference']:+.3f} +- "
            f"{item['frontier_difference_ci']:.3f} | {item['teacher_difference']:+.3f} +- "
            f"{item['teacher_difference_ci']:.3f} |"
        )
    lines += ["", "Reading:", "", *[f"- {part}" for part in results["reading"]], "",
              "What limits it: the student reads the noise through one zero-initialised linear layer on Fourier "
              "features added at the input of masked positions. To coordinate two tokens revealed in the same step it "
              "must compute inside the network a neighbour's draw, the inverse CDF of that neighbour's distribution at "
              "its `r`: a sharp function that the blocks learn slowly, so the gain grows with training steps and with "
              "depth (the `+N blocks` row, at a higher cost per call). Its training states `z_t` are masked data, not "
              "its own trajectories, and each round compounds the previous round's errors. A gain only on this small "
              "synthetic source says nothing yet about text at scale.", "", "Produced by:", "", "```", results["command"], "```", "",
              "Training commands (`mcd-hf`'s modules, as run by the script):", "", "```"]
    lines += [f"{name}: {' '.join(shlex.quote(a) for a in argv)}" for name, argv in results["training"].items()]
    lines += ["```", END_MARKER, ""]
    return "\n".join(lines)


def _row(results: dict, system: str, steps: int, temperature: float) -> dict:
    for item in results["rows"]:
        if item["system"] == system and item["steps"] == steps and abs(item["temperature"] - temperature) < 1e-9:
            return item
    raise KeyError((system, steps, temperature))


def reading(results: dict) -> list[str]:
    """The verdict per student: margin beyond the frontier, entropy kept, where the gain is, distance to teacher@T."""
    setup = results["setup"]
    steps = setup["student_steps"]
    teacher = _row(results, "teacher", steps, 1.0)
    parts = []
    for item in results["comparisons"]:
        difference, interval = item["frontier_difference"], item["frontier_difference_ci"]
        if difference + interval < 0:
            verdict = "beyond the teacher's frontier, outside noise"
        elif difference - interval > 0:
            verdict = "behind the teacher's frontier"
        else:
            verdict = "on the teacher's frontier (within noise)"
        student = _row(results, item["student"], steps, 1.0)
        frontier = _row(results, "teacher", steps, item["frontier_temperature"])
        parts.append(
            f"{item['student']}: {difference:+.3f} +- {interval:.3f} nats vs the frontier at equal entropy "
            f"({verdict}); unigram entropy {100 * (student['unigram_entropy'] / teacher['unigram_entropy'] - 1):+.1f}% "
            f"vs the teacher at the same steps; pair NLL same-step {student['same_step_nll']:.2f} vs "
            f"{frontier['same_step_nll']:.2f}, other pairs {student['different_step_nll']:.2f} vs "
            f"{frontier['different_step_nll']:.2f} on the frontier; {item['teacher_difference']:+.3f} +- "
            f"{item['teacher_difference_ci']:.3f} vs teacher@T"
        )
    shadow = [item for item in results["comparisons"] if item["student"].startswith("shadow")]
    if shadow:
        best = min(shadow, key=lambda item: item["teacher_difference"])
        twice = _row(results, "teacher", 2 * steps, 1.0)
        reached = best["teacher_difference"] - best["teacher_difference_ci"] <= 0
        parts.append(
            f"the ambition, teacher@T quality at equal entropy, is {'reached' if reached else 'not reached'}: the "
            f"best shadow student ({best['student']}) is {best['teacher_difference']:+.3f} +- "
            f"{best['teacher_difference_ci']:.3f} nats from teacher@T; for scale, the teacher is at "
            f"{twice['excess_nll']:.3f} with {2 * steps} steps and "
            f"{_row(results, 'teacher', setup['teacher_steps'], 1.0)['excess_nll']:.3f} with T"
        )
    if setup.get("teacher_val_nelbo") is not None:
        parts.append(f"the teacher's validation NELBO is {setup['teacher_val_nelbo']:.3f} nats/token (entropy rate "
                     f"{setup['entropy_rate']:.3f})")
    return [part + "." for part in parts]


def _teacher_val_nelbo(teacher_dir: str) -> float | None:
    path = os.path.join(teacher_dir, "train_log.jsonl")
    if not os.path.isfile(path):
        return None
    values = [json.loads(line).get("val_nelbo") for line in open(path, encoding="utf-8") if "val_nelbo" in line]
    return values[-1] if values else None


def write_docs(path: str, section: str) -> None:
    text = ""
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    if BEGIN_MARKER in text and END_MARKER in text:
        before, rest = text.split(BEGIN_MARKER, 1)
        after = rest.split(END_MARKER, 1)[1].lstrip("\n")
        text = before + section + after
    else:
        text = (text.rstrip("\n") + "\n\n" if text else "") + section
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.quick:
        quick_overrides(args)
    if args.report_only:
        with open(os.path.join(args.output_dir, "results.json"), encoding="utf-8") as handle:
            results = json.load(handle)
        results["setup"].setdefault("teacher_val_nelbo", _teacher_val_nelbo(os.path.join(args.output_dir, "teacher")))
        return write_report(args, results)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    from mcd_hf.evaluation.quality import paired_comparison
    from mcd_hf.evaluation.sources import get_source
    from mcd_hf.pipeline_mcd import MCDPipeline

    os.makedirs(args.output_dir, exist_ok=True)
    student_steps = args.teacher_steps // 2**args.num_rounds
    training = {}
    teacher_dir = args.teacher or os.path.join(args.output_dir, "teacher")
    if args.teacher is None:
        training["teacher"] = train_teacher(args, teacher_dir)
    folders = {"mcd": args.mcd or os.path.join(args.output_dir, "mcd")}
    if args.mcd is None:
        training["mcd"] = distill(args, teacher_dir, folders["mcd"], "mcd", args.steps_per_round)
    if args.sdtt:
        folders["sdtt"] = os.path.join(args.output_dir, "sdtt")
        training["sdtt"] = distill(args, teacher_dir, folders["sdtt"], "sdtt", args.steps_per_round)
    budgets = {"shadow (equal budget)": args.steps_per_round,
               f"shadow ({args.budget_multiplier}x budget)": args.steps_per_round * args.budget_multiplier}
    for name, steps_per_round in budgets.items():
        folders[name] = os.path.join(args.output_dir, f"shadow_{steps_per_round}")
        training[name] = distill(args, teacher_dir, folders[name], "shadow", steps_per_round)
    if args.deep_extra_layers:
        name = f"shadow (equal budget, +{args.deep_extra_layers} blocks)"
        folders[name] = os.path.join(args.output_dir, f"shadow_{args.steps_per_round}_deep{args.deep_extra_layers}")
        training[name] = distill(args, teacher_dir, folders[name], "shadow", args.steps_per_round,
                                 extra_layers=args.deep_extra_layers)

    evaluate = Evaluator(args)
    teacher = MCDPipeline.from_pretrained(teacher_dir)
    reference = evaluate("teacher", teacher, args.teacher_steps)
    rows = [reference]
    # Twice the students' steps: the cost reference of a student with extra blocks (up to 2x a teacher call).
    rows.append(evaluate("teacher", teacher, 2 * student_steps))
    for temperature in (1.0, 0.9, 0.8, 0.7, 0.6):
        rows.append(evaluate("teacher", teacher, student_steps, temperature))
    comparisons = []
    for name, folder in folders.items():
        student = evaluate(name, MCDPipeline.from_pretrained(folder), student_steps)
        rows.append(student)
        frontier = frontier_at_entropy(evaluate, teacher, student_steps, student.unigram_entropy.mean)
        versus_frontier = paired_comparison(student, frontier, "excess_nll")
        entropy_gap = paired_comparison(student, frontier, "unigram_entropy")
        versus_teacher = paired_comparison(student, reference, "excess_nll")
        comparisons.append({
            "student": name, "frontier_temperature": frontier.temperature,
            "entropy_difference": entropy_gap.mean, "entropy_difference_ci": entropy_gap.half_width,
            "frontier_difference": versus_frontier.mean, "frontier_difference_ci": versus_frontier.half_width,
            "teacher_difference": versus_teacher.mean, "teacher_difference_ci": versus_teacher.half_width,
        })
        rows.append(frontier)
    source = get_source(args.source)
    results = {
        "setup": {"source": args.source, "entropy_rate": float(source.entropy_rate()), "seq_len": args.seq_len,
                  "teacher_steps": args.teacher_steps, "num_rounds": args.num_rounds, "student_steps": student_steps,
                  "num_samples": args.num_samples, "steps_per_round": args.steps_per_round,
                  "budget_multiplier": args.budget_multiplier, "learning_rate": args.learning_rate,
                  "shadow_lr_multiplier": args.shadow_lr_multiplier, "train_batch_size": args.train_batch_size,
                  "deep_extra_layers": args.deep_extra_layers, "teacher_val_nelbo": _teacher_val_nelbo(teacher_dir),
                  "quick": args.quick},
        "rows": [row(report) for report in rows],
        "comparisons": comparisons,
        "training": training,
        "command": "python benchmarks/shadow_student.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
    }
    return write_report(args, results)


def write_report(args: argparse.Namespace, results: dict) -> dict:
    results["reading"] = reading(results)
    with open(os.path.join(args.output_dir, "results.json"), "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2)
    section = markdown(results)
    with open(os.path.join(args.output_dir, "shadow_student.md"), "w", encoding="utf-8") as handle:
        handle.write(section)
    if args.docs:
        write_docs(args.docs, section)
    print(section)
    return results


if __name__ == "__main__":
    main()
