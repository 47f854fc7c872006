"""Entry points of the ``glq`` command.

Each subcommand lives in its own function; heavy imports (torch, transformers)
happen inside them so ``glq --help`` answers instantly.
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib import metadata

MEMBERS = ["glq-lattice", "glq-kernels", "glq-quant", "glq-hf", "glq-kvcache", "glq-cli"]


class UsageError(Exception):
    """A caller's mistake: printed as one line, exit status 2, no traceback."""


def _versions() -> str:
    lines = []
    for name in MEMBERS:
        try:
            lines.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            lines.append(f"{name} (not installed)")
    return "\n".join(lines)


def _cmd_eval(args: argparse.Namespace) -> int:
    import os
    import time

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from glq.quant.evaluate import perplexity, wikitext2_ids
    from glq.quant.models import resolve_model

    path = resolve_model(args.model)
    if not os.path.isdir(path) and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise UsageError(f"model {args.model!r} is not a local folder and HF_HUB_OFFLINE=1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device} was asked for but no CUDA GPU is available")
    start = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(args.device).eval()
    result = perplexity(model, wikitext2_ids(tok), seqlen=args.seqlen, limit=args.limit, progress=True)
    report = {
        "model": str(args.model),
        "wikitext2_ppl": round(result.ppl, 4),
        "windows": result.windows,
        "seqlen": result.seqlen,
        "tokens": result.tokens,
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(f"WikiText-2 perplexity of {args.model}: {result.ppl:.3f} "
          f"({result.windows} windows of {result.seqlen} tokens)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


class _VersionAction(argparse.Action):
    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(_versions())  # one line per package; argparse's version action would re-wrap it
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glq", description="GLQ: E8 lattice weight quantization for LLMs.")
    parser.add_argument("--version", action=_VersionAction, help="print every installed glq package's version")
    sub = parser.add_subparsers(dest="command", required=True)

    ev = sub.add_parser("eval", help="evaluate a model (WikiText-2 perplexity)",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ev.add_argument("model", help="a GLQ folder, an unquantized model folder or hub id, or 'smollm2-135m'")
    ev.add_argument("--seqlen", type=int, default=2048, help="tokens per evaluation window")
    ev.add_argument("--limit", type=int, default=None, help="evaluate only the first N windows")
    ev.add_argument("--device", default="cpu", help="torch device to run on")
    ev.add_argument("--json", default=None, help="also write the results to this JSON file")
    ev.set_defaults(func=_cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UsageError as err:
        print(f"glq {args.command}: error: {err}", file=sys.stderr)
        return 2


def quantize_alias() -> int:
    """``glq-quantize ...`` is ``glq quantize ...``."""
    return main(["quantize", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
