"""Shipped text: WikiText-2 raw test (evaluation) and calibration text (see README.md here).

Text is read through `datasets` (its "text" builder reads local files offline); a
user with network access may name a hub dataset instead of a shipped file.
"""

from __future__ import annotations

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent

#: Calibration sources shipped with the package. The evaluation text is deliberately
#: not in this table: calibrating on it would flatter every perplexity we report.
CALIBRATION_FILES = {
    "wikipedia": DATA_DIR / "wikipedia.utf8",
    "c4": DATA_DIR / "c4.utf8",
}
WIKITEXT2_TEST = DATA_DIR / "wiki.test.raw"


def _read_lines(path: Path) -> list[str]:
    from datasets import load_dataset  # lazy: datasets costs seconds to import

    ds = load_dataset("text", data_files=str(path), split="train")
    return list(ds["text"])


def wikitext2_test_text() -> str:
    """The standard WikiText-2 raw test string: ``"\\n\\n".join(rows)``.

    Rows are the Hugging Face ``wikitext-2-raw-v1`` test rows: each line with its
    newline, blank lines as "". This is the string GPTQ-style perplexity uses.
    """
    rows = [line + "\n" if line.strip() else "" for line in _read_lines(WIKITEXT2_TEST)]
    return "\n\n".join(rows)


def calibration_text(source: str | Path = "wikipedia") -> str:
    """Calibration text: a shipped name, a local text file, or a hub dataset name.

    Text is read one row per line and the non-empty rows are joined with "\\n\\n".
    A hub name (``"owner/dataset"`` or ``"owner/dataset:config"``) is read through
    `datasets.load_dataset`, which needs network access; its ``train`` split's
    ``text`` column is used.
    """
    if isinstance(source, str) and source in CALIBRATION_FILES:
        lines = _read_lines(CALIBRATION_FILES[source])
    elif Path(source).is_file():
        if Path(source).resolve() == WIKITEXT2_TEST:
            raise ValueError("calibration must not use the WikiText-2 test text (it is the evaluation text)")
        lines = _read_lines(Path(source))
    elif isinstance(source, str) and "/" in source and not Path(source).exists():
        from datasets import load_dataset

        name, _, config = source.partition(":")
        ds = load_dataset(name, config or None, split="train")
        if "text" not in ds.column_names:
            raise ValueError(f"dataset {source!r} has no 'text' column (columns: {ds.column_names})")
        lines = list(ds["text"])
    else:
        raise ValueError(
            f"calibration source {str(source)!r} is neither a shipped name "
            f"({', '.join(sorted(CALIBRATION_FILES))}), an existing file, nor a hub dataset 'owner/name'"
        )
    return "\n\n".join(line for line in lines if line.strip())
