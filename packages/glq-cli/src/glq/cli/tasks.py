"""The shipped zero-shot tasks, as lm-evaluation-harness formulates them.

Every item becomes a few (context, continuation) requests, one per answer choice; the
model's log-likelihood of each continuation given its context picks the answer.
Templates follow lm-evaluation-harness's task definitions (``lm_eval/tasks/piqa/piqa.yaml``,
``arc/arc_easy.yaml``, ``winogrande/preprocess_winogrande.py``):

- PIQA: context ``"Question: {goal}\\nAnswer:"``, continuations ``" {sol1}"``, ``" {sol2}"``.
- ARC: context ``"Question: {question}\\nAnswer:"``, continuations ``" {choice text}"``.
- WinoGrande ("partial evaluation", Trinh & Le 2018): one context per option, the sentence
  up to the blank with the option filled in; the shared continuation is ``" "`` plus the
  rest of the sentence after the blank, stripped.

``choices`` holds the strings lm-eval measures for ``acc_norm`` (its ``doc_to_choice``):
the answer texts for PIQA and ARC. WinoGrande reports ``acc`` only, as lm-eval does (its
continuations are identical, so a length normalisation could not change the answer).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"

#: Task name -> whether lm-evaluation-harness reports acc_norm for it.
TASKS: dict[str, bool] = {"piqa": True, "winogrande": False, "arc_easy": True, "arc_challenge": True}


@dataclass(frozen=True)
class Item:
    """One multiple-choice question: a request per choice and the index of the right one."""

    requests: tuple[tuple[str, str], ...]  # (context, continuation), one per choice
    choices: tuple[str, ...]  # strings whose character length normalises acc_norm
    gold: int

    def __post_init__(self):
        if len(self.requests) != len(self.choices) or not 0 <= self.gold < len(self.choices):
            raise ValueError(f"gold={self.gold} with {len(self.requests)} requests and {len(self.choices)} choices")


def _jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def piqa() -> list[Item]:
    """PIQA validation (1838 items)."""
    docs = _jsonl(DATA_DIR / "piqa" / "valid.jsonl")
    labels = (DATA_DIR / "piqa" / "valid-labels.lst").read_text().split()
    if len(docs) != len(labels):
        raise ValueError(f"PIQA: {len(docs)} questions but {len(labels)} labels")
    items = []
    for doc, label in zip(docs, labels, strict=True):
        context = f"Question: {doc['goal']}\nAnswer:"
        sols = (doc["sol1"], doc["sol2"])
        items.append(Item(tuple((context, f" {s}") for s in sols), sols, int(label)))
    return items


def winogrande() -> list[Item]:
    """WinoGrande 1.1 dev = lm-eval's ``winogrande`` validation split (1267 items)."""
    items = []
    for doc in _jsonl(DATA_DIR / "winogrande" / "dev.jsonl"):
        sentence = doc["sentence"]
        blank = sentence.index("_")
        target = sentence[blank + 1 :].strip()
        contexts = tuple(sentence[:blank] + doc[key] for key in ("option1", "option2"))
        items.append(Item(tuple((c, f" {target}") for c in contexts), contexts, int(doc["answer"]) - 1))
    return items


def arc(subset: str) -> list[Item]:
    """ARC ``"easy"`` or ``"challenge"``, Test split, from the shipped derived CSV (see data/README.md)."""
    sets = {"easy": "easy", "challenge": "chal"}
    if subset not in sets:
        raise ValueError(f"ARC subset must be 'easy' or 'challenge', not {subset!r}")
    items = []
    with (DATA_DIR / "arc" / "ARC-All-answers_columns.csv").open(encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            if row["category"] != "Test" or row["sets"] != sets[subset]:
                continue
            # The derived copy pads text with spaces and leaves an empty column for
            # three-option questions: strip and drop them to recover the original choices.
            keys = [k for k in "ABCD" if row[k].strip()]
            texts = tuple(row[k].strip() for k in keys)
            context = f"Question: {row['question'].strip()}\nAnswer:"
            items.append(Item(tuple((context, f" {t}") for t in texts), texts, keys.index(row["AnswerKey"])))
    return items


def load_task(name: str, limit: int | None = None) -> list[Item]:
    """The items of task ``name`` (one of ``TASKS``), the first ``limit`` of them if given."""
    loaders = {"piqa": piqa, "winogrande": winogrande,
               "arc_easy": lambda: arc("easy"), "arc_challenge": lambda: arc("challenge")}
    if name not in loaders:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    items = loaders[name]()
    return items if limit is None else items[:limit]
