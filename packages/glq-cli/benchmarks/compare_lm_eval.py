"""Compare ``glq eval``'s zero-shot scores with an actual lm-evaluation-harness run (issue 7).

Not part of the package and not imported by tests. Runs in the workspace environment (it
imports ``glq.cli.tasks`` to compare request strings); lm-eval runs in its own interpreter,
given by ``--lm-eval-python`` (a virtual environment with ``pip install lm-eval``: lm-eval is
deliberately not a workspace dependency).

What it does, in ``--workdir``:

1. converts the shipped task data (``glq/cli/data``) to the field names of lm-eval's hub
   datasets (``baber/piqa``, ``allenai/winogrande``, ``allenai/ai2_arc``): no hub access;
2. writes one task YAML per task that ``include``s lm-eval's *installed* task YAML (so
   ``doc_to_text`` / ``doc_to_target`` / ``doc_to_choice`` / metrics are lm-eval's own, byte for
   byte) and only swaps the dataset for ``dataset_path: json`` on the converted files;
3. runs ``lm_eval --model hf ... --limit N --log_samples`` and ``glq eval ... --limit N --json
   --log-samples`` on the same first N items of each task;
4. compares acc / acc_norm, the (context, continuation) strings of every request, the per-choice
   log-likelihoods (max abs difference) and the argmax choices (raw and length-normalised).

Example (from the workspace root; the lm-eval interpreter path is wherever you made that venv)::

    OMP_NUM_THREADS=1 python3 -m uv run --all-packages python packages/glq-cli/benchmarks/compare_lm_eval.py \\
        --lm-eval-python LMEVAL_VENV/bin/python --model smollm2-135m --limit 200 --workdir cmp

Prints a markdown table and writes ``comparison.json`` in the workdir. Exit status 1 when an
argmax, acc or request string disagrees, or a log-likelihood differs by more than ``--tol``.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from glq.cli.tasks import DATA_DIR, load_task

TASKS = ("piqa", "arc_easy", "winogrande", "arc_challenge")
# task -> (lm-eval's YAML relative to lm_eval/tasks, the split lm-eval scores for it)
LM_EVAL_YAML = {
    "piqa": ("piqa/piqa.yaml", "validation"),
    "winogrande": ("winogrande/default.yaml", "validation"),
    "arc_easy": ("arc/arc_easy.yaml", "test"),
    "arc_challenge": ("arc/arc_challenge.yaml", "test"),
}
PREFIX = "glqcmp_"  # our task names, so lm-eval's own (hub-backed) tasks are not shadowed


# ----------------------------------------------------------------------------- data conversion


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def convert_piqa() -> list[dict]:
    """valid.jsonl + valid-labels.lst -> baber/piqa rows (goal, sol1, sol2, label int)."""
    docs = _jsonl(DATA_DIR / "piqa" / "valid.jsonl")
    labels = (DATA_DIR / "piqa" / "valid-labels.lst").read_text().split()
    return [{"goal": d["goal"], "sol1": d["sol1"], "sol2": d["sol2"], "label": int(lab)}
            for d, lab in zip(docs, labels, strict=True)]


def convert_winogrande() -> list[dict]:
    """dev.jsonl is already allenai/winogrande's schema (answer the string "1"/"2")."""
    return [{"sentence": d["sentence"], "option1": d["option1"], "option2": d["option2"], "answer": str(d["answer"])}
            for d in _jsonl(DATA_DIR / "winogrande" / "dev.jsonl")]


def convert_arc(sets: str) -> list[dict]:
    """The derived ARC CSV -> allenai/ai2_arc rows (question, choices {text, label}, answerKey).

    The CSV pads every text with spaces and leaves column D empty for three-option questions
    (data/README.md): strip, and drop empty options, to recover the original fields.
    """
    rows = []
    with (DATA_DIR / "arc" / "ARC-All-answers_columns.csv").open(encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            if row["category"] != "Test" or row["sets"] != sets:
                continue
            keys = [k for k in "ABCD" if row[k].strip()]
            rows.append({"id": row["questionID"], "question": row["question"].strip(),
                         "choices": {"text": [row[k].strip() for k in keys], "label": keys},
                         "answerKey": row["AnswerKey"]})
    return rows


CONVERTERS = {"piqa": convert_piqa, "winogrande": convert_winogrande,
              "arc_easy": lambda: convert_arc("easy"), "arc_challenge": lambda: convert_arc("chal")}


def write_tasks(workdir: Path, tasks: list[str], lm_eval_tasks_dir: Path) -> Path:
    """Converted data and task YAMLs under ``workdir``; returns the folder for ``--include_path``."""
    data_dir, yaml_dir = workdir / "data", workdir / "tasks"
    data_dir.mkdir(parents=True, exist_ok=True)
    yaml_dir.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        rows = CONVERTERS[task]()
        data = data_dir / f"{task}.jsonl"
        data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        base, split = LM_EVAL_YAML[task]
        other_splits = {"training_split", "validation_split", "test_split"} - {f"{split}_split"}
        lines = [
            f"include: {json.dumps(str(lm_eval_tasks_dir / base))}",
            f"task: {PREFIX}{task}",
            "tag: []",
            "dataset_path: json",
            "dataset_name: null",
            "dataset_kwargs:",
            "  data_files:",
            f"    {split}: {json.dumps(str(data.resolve()))}",
            f"{split}_split: {split}",
            *(f"{s}: null" for s in sorted(other_splits)),
        ]
        (yaml_dir / f"{PREFIX}{task}.yaml").write_text("\n".join(lines) + "\n")
    return yaml_dir


# ----------------------------------------------------------------------------- runs


def _env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def run_lm_eval(args, folder: str, include: Path, out: Path) -> float:
    cmd = [args.lm_eval_python, "-m", "lm_eval", "--model", "hf",
           "--model_args", f"pretrained={folder},dtype=float32", "--device", "cpu",
           "--tasks", ",".join(PREFIX + t for t in args.tasks), "--include_path", str(include),
           "--limit", str(args.limit), "--batch_size", str(args.batch_size),
           "--log_samples", "--output_path", str(out)]
    print("+", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    with (args.workdir / "lm_eval.log").open("w") as log:
        subprocess.run(cmd, check=True, env=_env(args.threads), stdout=log, stderr=subprocess.STDOUT)
    return time.perf_counter() - t0


def run_glq(args, out: Path) -> float:
    glq = Path(sys.executable).parent / "glq"
    cmd = [str(glq), "eval", args.model, "--tasks", ",".join(args.tasks), "--limit", str(args.limit),
           "--device", "cpu", "--dtype", "float32", "--batch-size", str(args.batch_size),
           "--json", str(out), "--log-samples"]
    print("+", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    with (args.workdir / "glq.log").open("w") as log:
        subprocess.run(cmd, check=True, env=_env(args.threads), stdout=log, stderr=subprocess.STDOUT)
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- comparison


def _lm_eval_outputs(out: Path, task: str) -> tuple[dict, list[dict]]:
    """(aggregated metrics, samples sorted by doc_id) of ``task`` from an lm-eval output folder."""
    results = sorted(out.rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
    if not results:
        raise FileNotFoundError(f"no lm-eval results_*.json under {out}")
    metrics = json.loads(results[-1].read_text())["results"][PREFIX + task]
    samples_files = sorted(out.rglob(f"samples_{PREFIX}{task}_*.jsonl"), key=lambda p: p.stat().st_mtime)
    samples = sorted(_jsonl(samples_files[-1]), key=lambda s: s["doc_id"])
    return metrics, samples


def _argmax(values) -> int:  # numpy.argmax: first of equal maxima
    return max(range(len(values)), key=lambda j: (values[j], -j))


def compare_task(task: str, glq_res: dict, lm_metrics: dict, lm_samples: list[dict]) -> dict:
    items = load_task(task, len(lm_samples))
    ours = glq_res["samples"]
    n = min(len(ours), len(lm_samples))
    max_diff, argmax_agree, norm_agree, strings_differ, metric_differ = 0.0, 0, 0, [], []
    lm_acc, lm_acc_norm = 0.0, 0.0
    for k in range(n):
        s, o, item = lm_samples[k], ours[k], items[k]
        if s["doc_id"] != k or o["doc_id"] != k:
            raise ValueError(f"{task}: doc ids out of step at {k}")
        lm_lls = [float(r[0]) for r in s["filtered_resps"]]
        args = s["arguments"]  # {"gen_args_0": {"arg_0": context, "arg_1": continuation}, ...} (or a list)
        args = [args[f"gen_args_{j}"] for j in range(len(args))] if isinstance(args, dict) else args
        lm_requests = [(a["arg_0"], a["arg_1"]) if isinstance(a, dict) else tuple(a[:2]) for a in args]
        if lm_requests != list(item.requests):
            strings_differ.append(k)
        our_lls = o["loglikelihoods"]
        max_diff = max(max_diff, *(abs(a - b) for a, b in zip(lm_lls, our_lls, strict=True)))
        argmax_agree += _argmax(lm_lls) == _argmax(our_lls)
        lens = [len(c) for c in item.choices]
        our_norm = _argmax([v / m for v, m in zip(our_lls, lens, strict=True)])
        norm_agree += _argmax([v / m for v, m in zip(lm_lls, lens, strict=True)]) == our_norm
        # lm-eval's own per-item metrics against ours (from our scores, our gold, our choice lengths)
        if s["acc"] != float(_argmax(our_lls) == item.gold) or \
                ("acc_norm" in s and s["acc_norm"] != float(our_norm == item.gold)):
            metric_differ.append(k)
        lm_acc += s["acc"]
        lm_acc_norm += s.get("acc_norm", 0.0)
    row = {"task": task, "n": n, "glq_acc": glq_res["acc"], "lm_eval_acc": lm_metrics["acc,none"],
           "glq_acc_norm": glq_res.get("acc_norm"), "lm_eval_acc_norm": lm_metrics.get("acc_norm,none"),
           "max_abs_ll_diff": max_diff, "argmax_agree": argmax_agree, "argmax_norm_agree": norm_agree,
           "request_strings_differ": strings_differ, "item_metrics_differ": metric_differ}
    if abs(lm_acc / n - row["lm_eval_acc"]) > 1e-9:
        raise ValueError(f"{task}: lm-eval's per-sample acc does not average to its reported acc")
    return row


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def table(rows: list[dict]) -> str:
    lines = ["| task | n | acc glq | acc lm-eval | acc_norm glq | acc_norm lm-eval | max abs ll diff "
             "| argmax agree | norm argmax agree | request strings equal | per-item acc/acc_norm equal |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['n']} | {_fmt(r['glq_acc'])} | {_fmt(r['lm_eval_acc'])} | "
                     f"{_fmt(r['glq_acc_norm'])} | {_fmt(r['lm_eval_acc_norm'])} | {r['max_abs_ll_diff']:.2e} | "
                     f"{r['argmax_agree']}/{r['n']} | {r['argmax_norm_agree']}/{r['n']} | "
                     f"{r['n'] - len(r['request_strings_differ'])}/{r['n']} | "
                     f"{r['n'] - len(r['item_metrics_differ'])}/{r['n']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lm-eval-python", required=True, help="interpreter with lm-eval installed")
    p.add_argument("--model", default="smollm2-135m", help="anything `glq eval` takes (unquantized)")
    p.add_argument("--tasks", default=",".join(TASKS), type=lambda s: [t for t in s.split(",") if t])
    p.add_argument("--limit", type=int, default=200, help="first N items of each task")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="OMP threads of each run")
    p.add_argument("--workdir", type=Path, default=Path("lm_eval_compare"))
    p.add_argument("--reuse", action="store_true", help="compare existing outputs in --workdir, run nothing")
    p.add_argument("--parallel", action="store_true", help="run lm-eval and glq eval at the same time")
    p.add_argument("--tol", type=float, default=1e-3, help="largest acceptable log-likelihood difference")
    args = p.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    args.workdir = args.workdir.resolve()
    unknown = set(args.tasks) - set(TASKS)
    if unknown:
        p.error(f"unknown tasks {sorted(unknown)}")

    from glq.quant.models import resolve_model

    folder = resolve_model(args.model)
    info = subprocess.run([args.lm_eval_python, "-c", "import importlib.metadata as m, pathlib, lm_eval; "
                           "print(pathlib.Path(lm_eval.__file__).parent / 'tasks'); "
                           "print(*(f'{p} {m.version(p)}' for p in ('lm-eval', 'torch', 'transformers', "
                           "'datasets')), sep=', ')"], check=True, capture_output=True, text=True).stdout.split("\n")
    lm_tasks_dir, lm_versions = Path(info[0]), info[1]
    include = write_tasks(args.workdir, args.tasks, lm_tasks_dir)
    lm_out, glq_out = args.workdir / "lm_eval_out", args.workdir / "glq.json"
    seconds = {}
    if not args.reuse:
        if args.parallel:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(2) as pool:
                a = pool.submit(run_lm_eval, args, folder, include, lm_out)
                b = pool.submit(run_glq, args, glq_out)
                seconds = {"lm_eval": a.result(), "glq": b.result()}
        else:
            seconds = {"lm_eval": run_lm_eval(args, folder, include, lm_out), "glq": run_glq(args, glq_out)}
    glq = json.loads(glq_out.read_text())
    rows = []
    for task in args.tasks:
        metrics, samples = _lm_eval_outputs(lm_out, task)
        rows.append(compare_task(task, glq["results"][task], metrics, samples))
    text = table(rows)
    print(text)
    import torch
    import transformers

    glq["versions"] |= {"torch": torch.__version__, "transformers": transformers.__version__}
    glq_versions = ", ".join(f"{k} {v}" for k, v in glq["versions"].items())
    previous = args.workdir / "comparison.json"
    if args.reuse and previous.is_file():  # keep the timings of the run being re-compared
        seconds = json.loads(previous.read_text()).get("seconds", {})
    print(f"\nlm-eval side: {lm_versions}\nglq side: {glq_versions}\nseconds: {seconds}")
    summary = {"date": datetime.date.today().isoformat(), "model": args.model, "limit": args.limit,
               "rows": rows, "lm_eval_versions": lm_versions, "glq_versions": glq["versions"], "seconds": seconds}
    (args.workdir / "comparison.json").write_text(json.dumps(summary, indent=2) + "\n")
    bad = [r["task"] for r in rows if r["argmax_agree"] != r["n"] or r["argmax_norm_agree"] != r["n"]
           or r["request_strings_differ"] or r["item_metrics_differ"] or r["max_abs_ll_diff"] > args.tol
           or abs(r["glq_acc"] - r["lm_eval_acc"]) > 1e-9
           or (r["lm_eval_acc_norm"] is not None and abs(r["glq_acc_norm"] - r["lm_eval_acc_norm"]) > 1e-9)]
    if bad:
        print(f"MISMATCH in {', '.join(bad)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
