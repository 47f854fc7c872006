"""Entry points of the ``glq`` command: ``quantize``, ``eval``, ``generate``, ``info``.

Each subcommand lives in its own function; heavy imports (torch, transformers)
happen inside them so ``glq --help`` answers instantly. A caller's mistake is a
``UsageError``: one line on stderr, exit status 2, never a traceback. Checks that need
no model run before any model is loaded, so bad input fails in seconds.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys
import time
from importlib import metadata
from pathlib import Path

MEMBERS = ["glq-lattice", "glq-kernels", "glq-quant", "glq-hf", "glq-kvcache", "glq-cli"]
MIN_BPW, MAX_BPW = 2.0, 8.0
EVAL_TASKS = ("wikitext2", "piqa", "winogrande", "arc_easy", "arc_challenge")


class UsageError(Exception):
    """A caller's mistake: printed as one line, exit status 2, no traceback."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``glq quantize: error: ... (see glq quantize --help)``."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" for every option that has a real default; flags and options whose
    default is "not given" say what that means in their own help text."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=32)

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _versions() -> str:
    lines = []
    for name in MEMBERS:
        try:
            lines.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            lines.append(f"{name} (not installed)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- shared checks


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name} was asked for but no CUDA GPU is available (use --device cpu)")
    try:
        torch.device(name)
    except RuntimeError as err:
        raise UsageError(f"--device {name!r} is not a torch device ({err})") from None
    return name


def _dtype(name: str, device: str):
    import torch

    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _looks_local(text: str) -> bool:
    # Hub ids are "name" or "owner/name"; anything else with a separator is a path.
    return text.startswith((".", "/", "~")) or text.count("/") > 1 or (os.sep != "/" and os.sep in text)


def _resolve_model(arg: str, trust_remote_code: bool = False) -> str:
    """A local folder with a config.json, or a hub id whose config can be fetched; else UsageError."""
    from glq.quant.models import resolve_model

    try:
        path = resolve_model(arg)
    except FileNotFoundError as err:
        raise UsageError(f"model {arg!r}: {err}") from None
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise UsageError(f"model folder {path} has no config.json (not a Hugging Face model folder)")
        return path
    if _looks_local(arg) or os.path.exists(path):
        raise UsageError(f"model folder {arg!r} does not exist")
    import huggingface_hub.constants
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        where = " (offline: HF_HUB_OFFLINE is set)" if huggingface_hub.constants.HF_HUB_OFFLINE else ""
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"model {arg!r} is neither a local folder nor a model found on the Hugging Face "
                         f"Hub{where}: {reason}") from None
    return path


def _glq_config(path: str) -> dict | None:
    """The quantization_config of a local GLQ folder, else None."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return None
    qc = json.loads(config.read_text()).get("quantization_config")
    return qc if isinstance(qc, dict) and qc.get("quant_method") == "glq" else None


def _tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot load the tokenizer of {path}: {str(err).strip().splitlines()[0]}") from None


def _load(path: str, device: str, dtype: str, trust_remote_code: bool = False):
    """The model of a GLQ or unquantized folder / hub id, in eval mode on ``device``."""
    from transformers import AutoModelForCausalLM

    if _glq_config(path) is not None:
        from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

        import glq.hf  # noqa: F401  (registers quant_method "glq" with transformers)

        if "glq" not in AUTO_QUANTIZER_MAPPING:
            raise UsageError(f"{path} is a GLQ folder but the installed glq-hf does not register "
                             "quant_method 'glq' with transformers yet")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=_dtype(dtype, device),
                                                     trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot load {path}: {str(err).strip().splitlines()[0]}") from None
    return model.to(device).eval()


# ----------------------------------------------------------------------------- glq quantize


def _parse_bpw(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of bits per weight, not {text!r}") from None
    if not math.isfinite(value) or not MIN_BPW <= value <= MAX_BPW:
        raise argparse.ArgumentTypeError(f"{text} is outside the supported range {MIN_BPW:g} to {MAX_BPW:g}")
    return value


def _int_at_least(minimum: int, wording: str):
    """An argparse type for integers >= ``minimum``; ``wording`` names the rule in the error."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, not {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {wording}, not {value}")
        return value
    return parse


_positive_int = _int_at_least(1, "a positive integer")
_nonnegative_int = _int_at_least(0, "0 or more")


def _check_rates(args: argparse.Namespace) -> None:
    from glq.hf.config import SUPPORTED_BPW

    lo, hi = args.min_bpw, args.max_bpw
    for flag, value in (("--min-bpw", lo), ("--max-bpw", hi)):
        if value is not None and value != int(value):
            raise UsageError(f"{flag} {value:g} must be a whole rate, one of {list(SUPPORTED_BPW)}")
    if lo is not None and hi is not None and lo > hi:
        raise UsageError(f"--min-bpw {lo:g} is above --max-bpw {hi:g}")
    if lo is not None and args.bpw < lo:
        raise UsageError(f"--bpw {args.bpw:g} is below --min-bpw {lo:g}")
    if hi is not None and args.bpw > hi:
        raise UsageError(f"--bpw {args.bpw:g} is above --max-bpw {hi:g}")


def _check_output(output: str) -> Path:
    """--output must be new, empty, or an unfinished GLQ run (glq.quant's ``.glq-partial`` state)."""
    from glq.quant.pipeline import PARTIAL

    out = Path(output).expanduser()
    if not out.exists():
        if not out.parent.exists():
            raise UsageError(f"--output {output}: its parent folder {out.parent} does not exist")
        return out
    if not out.is_dir():
        raise UsageError(f"--output {output} exists and is a file, not a folder")
    if not any(out.iterdir()) or (out / PARTIAL / "state.json").is_file():
        return out  # glq.quant resumes it (or, with --no-resume, starts it over)
    if _glq_config(str(out)) is not None:
        raise UsageError(f"--output {output} already holds a finished GLQ model: choose a new folder")
    raise UsageError(f"--output {output} exists, is not empty and is not a resumable GLQ run: "
                     "choose a new folder or remove it")


def _layer_names(path: str, trust_remote_code: bool) -> list[str]:
    """Names of the linears glq.quant quantizes, from the config alone (meta device, no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from glq.quant import arch

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    layout = arch.find_blocks(model)
    blocks = model.get_submodule(layout.path)
    return [f"{layout.path}.{i}.{name}" for i, block in enumerate(blocks) for name in arch.block_linears(block)]


def _load_bpw_map(spec: str, path: str, trust_remote_code: bool) -> dict[str, int]:
    """``--bpw-map``: a JSON file or inline JSON giving every quantized layer its rate.

    Takes glq.quant's ``bpw_allocation.json`` (``{"layers": {name: {"bpw": r, ...}}}``, as
    written next to every GLQ model), a plain ``{name: rate}`` object, or the ``layers`` of
    ``glq info --json``. Keys may be globs (``"*.mlp.down_proj"``); exact names win over globs,
    earlier globs over later ones. Every layer must get a rate and every key must match a layer.
    """
    import fnmatch

    from glq.hf.config import SUPPORTED_BPW

    text = Path(spec).read_text() if os.path.isfile(spec) else spec
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        if not spec.lstrip().startswith("{"):
            raise UsageError(f"--bpw-map {spec!r} is neither an existing JSON file nor inline JSON") from None
        raise UsageError(f"--bpw-map {spec!r} is not valid JSON") from None
    if isinstance(data, dict) and isinstance(data.get("layers"), dict | list):
        data = data["layers"]
    if isinstance(data, list):  # glq info --json: [{"name": ..., "bpw": ...}, ...]
        data = {d.get("name"): d for d in data if isinstance(d, dict)}
    if not isinstance(data, dict) or not data:
        raise UsageError("--bpw-map must be a non-empty JSON object {layer name: bpw}")
    given = {}
    for key, value in data.items():
        rate = value.get("bpw") if isinstance(value, dict) else value
        if isinstance(rate, bool) or not isinstance(rate, int | float) or rate not in SUPPORTED_BPW:
            raise UsageError(f"--bpw-map: {key} has rate {rate!r}; rates must be one of {list(SUPPORTED_BPW)}")
        given[str(key)] = int(rate)
    names = _layer_names(path, trust_remote_code)
    for key in given:
        if key not in names and not fnmatch.filter(names, key):
            raise UsageError(f"--bpw-map does not match the model: {key!r} names none of its {len(names)} "
                             f"quantized layers (e.g. {names[0] if names else '-'})")
    rates = {}
    for name in names:
        key = name if name in given else next((k for k in given if fnmatch.fnmatchcase(name, k)), None)
        if key is None:
            raise UsageError(f"--bpw-map does not match the model: it gives no rate to {name} "
                             f"(the map must cover all {len(names)} quantized layers; a glob such as '*' can)")
        rates[name] = given[key]
    return rates


def _check_calibration(source: str, path: str, nsamples: int, seqlen: int, is_file: bool) -> None:
    """A local calibration source must hold at least nsamples x seqlen tokens."""
    from glq.quant.data import CALIBRATION_FILES, calibration_text

    if not is_file and source not in CALIBRATION_FILES:
        return  # a hub dataset: read by glq.quant, which checks it
    import datasets

    datasets.disable_progress_bars()  # reading a local file is instant; keep stderr for errors
    try:
        text = calibration_text(source)
    except (ValueError, OSError) as err:
        raise UsageError(f"calibration {source!r}: {err}") from None
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    need = nsamples * seqlen
    # Tokenize a generous prefix first: the full 2 MB shipped file costs seconds. Counts are
    # taken as glq.quant.calibration takes them (the tokenizer's default special tokens).
    prefix = text[: need * 16]
    if len(prefix) < len(text) and len(tok(prefix).input_ids) >= need:
        return
    have = len(tok(text).input_ids)
    if have < need:
        what = f"calibration file {source}" if is_file else f"calibration dataset {source!r}"
        raise UsageError(f"{what} has {have:,} tokens, fewer than --nsamples {nsamples} x --seqlen {seqlen} "
                         f"= {need:,}: lower --nsamples or --seqlen, or give more text")


def _cmd_quantize(args: argparse.Namespace) -> int:
    _check_rates(args)
    if args.calibration_file is not None and not os.path.isfile(args.calibration_file):
        raise UsageError(f"--calibration-file {args.calibration_file} does not exist")
    device = _device(args.device)
    path = _resolve_model(args.model, args.trust_remote_code)
    out = _check_output(args.output)
    bpw_map = _load_bpw_map(args.bpw_map, path, args.trust_remote_code) if args.bpw_map else None
    source = args.calibration_file if args.calibration_file is not None else args.dataset
    _check_calibration(source, path, args.nsamples, args.seqlen, is_file=args.calibration_file is not None)
    try:
        from glq.quant import quantize
    except ImportError:
        raise UsageError("the installed glq-quant has no quantize() yet") from None

    bpw = int(args.bpw) if args.bpw == int(args.bpw) else args.bpw
    as_int = lambda v: None if v is None else int(v)  # noqa: E731
    start = time.perf_counter()
    try:
        summary = quantize(path, str(out), bpw=bpw, nsamples=args.nsamples, seqlen=args.seqlen, device=device,
                           min_bpw=as_int(args.min_bpw), max_bpw=as_int(args.max_bpw), bpw_map=bpw_map,
                           tune_iters=args.tune_iters, finetune_epochs=args.finetune_epochs,
                           finetune_model_epochs=args.finetune_model_epochs,
                           streaming=args.streaming,
                           trust_remote_code=args.trust_remote_code, dataset=source, seed=args.seed,
                           resume=args.resume)
    except ValueError as err:  # glq.quant's documented signal for a caller's mistake
        raise UsageError(str(err)) from None
    summary = dict(summary or {})
    summary.setdefault("seconds", round(time.perf_counter() - start, 1))
    summary["size_on_disk_bytes"] = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"\nGLQ model written to {out}")
    for key, value in summary.items():  # scalars only: per-layer details are in the folder's report
        if isinstance(value, dict | list):
            continue
        shown = f"{value:,.4f}".rstrip("0").rstrip(".") if isinstance(value, float) else value
        if isinstance(value, int) and not isinstance(value, bool) and "bytes" in key:
            shown = f"{value:,} ({value / 1e6:,.1f} MB)"
        print(f"  {key:<28} {shown}")
    print(f"Next: glq eval {out}")
    if args.json:
        _write_json(args.json, {"model": args.model, "output": str(out), **summary})
    return 0


# ----------------------------------------------------------------------------- glq eval


def _parse_tasks(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if names == ["all"]:
        return list(EVAL_TASKS)
    unknown = [t for t in names if t not in EVAL_TASKS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown task(s) {unknown or text!r}; choose from "
                                         f"{', '.join(EVAL_TASKS)} or 'all'")
    return names


def _write_json(target: str, payload: dict) -> None:
    text = json.dumps(payload, indent=2)
    if target == "-":
        print(text)
    else:
        Path(target).write_text(text + "\n")


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _cmd_eval(args: argparse.Namespace) -> int:
    if args.log_samples and not args.json:
        raise UsageError("--log-samples needs --json (the samples are written there)")
    device = _device(args.device)
    path = _resolve_model(args.model, args.trust_remote_code)
    start = time.perf_counter()
    tok = _tokenizer(path, args.trust_remote_code)
    model = _load(path, device, args.dtype, args.trust_remote_code)
    results: dict[str, dict] = {}
    rows = [("task", "metric", "value", "stderr", "n")]
    for task in args.tasks:
        t0 = time.perf_counter()
        if task == "wikitext2":
            from glq.quant.evaluate import perplexity, wikitext2_ids

            try:
                ppl = perplexity(model, wikitext2_ids(tok), seqlen=args.seqlen, limit=args.limit, progress=True)
            except ValueError as err:
                raise UsageError(str(err)) from None
            results[task] = {"ppl": ppl.ppl, "windows": ppl.windows, "seqlen": ppl.seqlen, "tokens": ppl.tokens}
            rows.append((task, "ppl", f"{ppl.ppl:.4f}", "", f"{ppl.windows} x {ppl.seqlen} tokens"))
        else:
            from glq.cli.tasks import TASKS, load_task
            from glq.cli.zeroshot import accuracy, score_items

            items = load_task(task, args.limit)
            lls = score_items(model, tok, items, batch_size=args.batch_size, progress=True, desc=task)
            res = accuracy(items, lls, with_norm=TASKS[task])
            results[task] = res
            if args.log_samples:  # per-item scores, as lm-eval's --log_samples (compare_lm_eval.py reads them)
                res["samples"] = [{"doc_id": i, "gold": it.gold, "loglikelihoods": ll}
                                  for i, (it, ll) in enumerate(zip(items, lls, strict=True))]
            for metric in ("acc", "acc_norm"):
                if metric in res:
                    rows.append((task, metric, f"{res[metric]:.4f}", f"{res[metric + '_stderr']:.4f}", str(res["n"])))
        results[task]["seconds"] = round(time.perf_counter() - t0, 1)
    report = {
        "model": str(args.model),
        "glq": _glq_config(path) is not None,
        "device": device,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "limit": args.limit,
        "results": results,
        "seconds": round(time.perf_counter() - start, 1),
        "versions": dict(line.rsplit(" ", 1) for line in _versions().splitlines() if "not installed" not in line),
    }
    print(f"\n{args.model} ({'GLQ' if report['glq'] else 'unquantized'}, {report['dtype']} on {device}"
          f"{f', first {args.limit} windows/items' if args.limit else ''}):")
    print(_table(rows))
    if "arc_easy" in results or "arc_challenge" in results:
        print("ARC uses a derived, lossy copy of the data: smoke-test figures, not paper-comparable.")
    if args.json:
        _write_json(args.json, report)
    return 0


# ----------------------------------------------------------------------------- glq generate


def _cmd_generate(args: argparse.Namespace) -> int:
    if args.kv_cache == "int8" and args.cuda_graph:
        raise UsageError("--cuda-graph replays a static KV cache and cannot be combined with --kv-cache int8")
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0 or args.repetition_penalty <= 0:
        raise UsageError("need --temperature >= 0, 0 < --top-p <= 1, --top-k >= 0 and --repetition-penalty > 0")
    if args.cuda_graph and (args.top_p != 1 or args.repetition_penalty != 1):
        raise UsageError("--cuda-graph decoding supports --temperature and --top-k, not --top-p or "
                         "--repetition-penalty")
    device = _device(args.device)
    if args.cuda_graph and not device.startswith("cuda"):
        raise UsageError(f"--cuda-graph needs a CUDA device (got --device {device})")
    path = _resolve_model(args.model, args.trust_remote_code)
    tok = _tokenizer(path, args.trust_remote_code)
    if args.chat and not getattr(tok, "chat_template", None):
        raise UsageError(f"--chat: the tokenizer of {args.model} has no chat template")
    import torch

    model = _load(path, device, args.dtype, args.trust_remote_code)
    if args.chat:
        text = tok.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False,
                                       add_generation_prompt=True)
        inputs = tok(text, return_tensors="pt", add_special_tokens=False)
    else:
        inputs = tok(args.prompt, return_tensors="pt")
    inputs = inputs.to(device)
    sample = args.temperature > 0
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    if args.cuda_graph:
        out = _generate_cuda_graph(model, tok, inputs.input_ids, args, sample)
        print(tok.decode(out[0, inputs.input_ids.shape[1] :], skip_special_tokens=True))
    else:
        from transformers import TextStreamer

        kwargs: dict = {"max_new_tokens": args.max_new_tokens, "repetition_penalty": args.repetition_penalty,
                        "do_sample": sample}
        if sample:
            kwargs |= {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k}
        else:
            kwargs |= {"temperature": None, "top_p": None, "top_k": None}
        if args.kv_cache == "int8":
            from glq.kvcache import GLQQuantizedCache

            # transformers 5.2x renamed generate's `past_key_values` to `cache`.
            name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
            kwargs[name] = GLQQuantizedCache(model.config, residual_length=args.kv_residual_length)
        if tok.pad_token_id is None:
            kwargs["pad_token_id"] = tok.eos_token_id
        streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        out = model.generate(**inputs, streamer=streamer, **kwargs)
    seconds = time.perf_counter() - start
    new = out.shape[1] - inputs.input_ids.shape[1]
    print(f"[{new} tokens in {seconds:.2f} s, {new / seconds:.1f} tokens/s, kv cache {args.kv_cache}"
          f"{', cuda graph' if args.cuda_graph else ''}]", file=sys.stderr)
    return 0


def _generate_cuda_graph(model, tok, input_ids, args: argparse.Namespace, sample: bool):
    """Batch-1 decoding through glq.hf's CUDAGraphWrapper on a static cache: each
    single-token step is one graph replay instead of dozens of kernel launches."""
    import torch
    from transformers import StaticCache

    from glq.hf.cuda_graph import CUDAGraphWrapper, decode

    cache = StaticCache(config=model.config, max_cache_len=input_ids.shape[1] + args.max_new_tokens)
    generator = torch.Generator(device=input_ids.device).manual_seed(args.seed)
    return decode(CUDAGraphWrapper(model), input_ids, cache, args.max_new_tokens, do_sample=sample,
                  temperature=args.temperature, top_k=args.top_k or None, generator=generator,
                  eos_token_id=tok.eos_token_id)


# ----------------------------------------------------------------------------- glq info


def _cmd_info(args: argparse.Namespace) -> int:
    from glq.cli.info import folder_info, format_info

    if not os.path.isdir(args.folder):
        raise UsageError(f"{args.folder} is not a folder")
    try:
        info = folder_info(args.folder)
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(str(err)) from None
    print(format_info(info, per_layer=not args.summary))
    if args.json:
        _write_json(args.json, info)
    return 0


# ----------------------------------------------------------------------------- parser


class _VersionAction(argparse.Action):
    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(_versions())  # one line per package; argparse's version action would re-wrap it
        parser.exit()


MODEL_HELP = ("a GLQ folder, an unquantized model folder or Hugging Face hub id, "
              "or 'smollm2-135m' (the offline test model)")


def _add_common(p: argparse.ArgumentParser, dtype: bool = True) -> None:
    p.add_argument("--device", default="auto",
                   help="torch device: auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    if dtype:
        p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                       help="activation and unquantized-weight dtype; auto = float32 on cpu, bfloat16 on cuda")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow model code from the hub (transformers; default: off)")


def build_parser() -> argparse.ArgumentParser:
    # constants; glq.quant's heavy modules stay unimported
    from glq.quant import DEFAULT_FINETUNE_EPOCHS, DEFAULT_FINETUNE_MODEL_EPOCHS
    parser = _Parser(prog="glq", description="GLQ: E8 lattice weight quantization for LLMs.",
                     epilog="Run 'glq COMMAND --help' for each command's options and defaults.")
    parser.add_argument("--version", action=_VersionAction, help="print every installed glq package's version")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    q = sub.add_parser("quantize", help="quantize a model into a GLQ folder", formatter_class=_Help,
                       description="Quantize a Hugging Face causal LM into a GLQ folder (loadable with "
                       "from_pretrained after 'import glq.hf'). Also installed as 'glq-quantize'.")
    q.add_argument("--model", required=True, help=MODEL_HELP.replace("a GLQ folder, an unquantized", "an unquantized"))
    q.add_argument("--output", required=True, help="folder to write the GLQ model to (a new or resumable one)")
    q.add_argument("--bpw", type=_parse_bpw, default=2.0,
                   help="target bits per weight, 2 to 8; a fractional target mixes per-layer rates")
    q.add_argument("--min-bpw", type=_parse_bpw, default=None,
                   help="lowest per-layer rate the allocator may use (default: glq.quant's choice)")
    q.add_argument("--max-bpw", type=_parse_bpw, default=None,
                   help="highest per-layer rate the allocator may use (default: glq.quant's choice)")
    q.add_argument("--bpw-map", default=None,
                   help="JSON file or inline JSON giving every quantized layer its rate, {name or glob: bpw}; "
                   "takes the bpw_allocation.json saved with every GLQ model (default: none, uniform --bpw or "
                   "the allocator for a fractional --bpw)")
    q.add_argument("--tune-iters", type=_nonnegative_int, default=0,
                   help="coordinate-descent refinement passes after LDLQ rounding (slow; on the test model at 4 bpw it "
                   "made perplexity worse with the default fine-tuning)")
    q.add_argument("--finetune-epochs", type=_nonnegative_int, default=DEFAULT_FINETUNE_EPOCHS,
                   help="block fine-tuning passes over the calibration set after each block is quantized "
                   "(sign gains, row scales and norms learn to match the unquantized block; codes fixed); "
                   f"0 = off (default: {DEFAULT_FINETUNE_EPOCHS})")
    q.add_argument("--finetune-model-epochs", type=_nonnegative_int, default=None,
                   help="whole-model fine-tuning passes after the last block: the same parameters, every block at "
                   "once, against the unquantized model's next-token distribution; needs the model in memory "
                   "plus 4 bytes per quantized weight on the device; 0 = off (default: "
                   f"{DEFAULT_FINETUNE_MODEL_EPOCHS}, turned off with a warning where it cannot fit and with "
                   "--streaming)")
    q.add_argument("--nsamples", type=_positive_int, default=128, help="calibration sequences")
    q.add_argument("--seqlen", type=_positive_int, default=2048, help="tokens per calibration sequence")
    cal = q.add_mutually_exclusive_group()
    cal.add_argument("--dataset", default="wikipedia",
                     help="calibration text: a shipped name (wikipedia, c4), a local text file, or a hub dataset "
                     "'owner/name[:config]' (its train split's text column)")
    cal.add_argument("--calibration-file", default=None,
                     help="calibration from a local UTF-8 text file, one document per line, instead of --dataset "
                   "(default: none)")
    q.add_argument("--seed", type=int, default=0, help="seed for calibration sampling and Hadamard signs")
    q.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue an interrupted run in --output (same arguments); --no-resume starts it over")
    q.add_argument("--streaming", action="store_true",
                   help="load and quantize one decoder layer at a time (models larger than memory)")
    q.add_argument("--json", default=None,
                   help="also write the final summary to this JSON file ('-' = stdout; default: none)")
    _add_common(q, dtype=False)
    q.set_defaults(func=_cmd_quantize)

    ev = sub.add_parser("eval", help="WikiText-2 perplexity and zero-shot accuracy", formatter_class=_Help,
                        description="Evaluate a model: WikiText-2 perplexity (standard protocol: the \"\\n\\n\".join "
                        "test string, non-overlapping windows of --seqlen) and zero-shot acc/acc_norm on the shipped "
                        "PIQA, WinoGrande and ARC data, scored as lm-evaluation-harness does.")
    ev.add_argument("model", help=MODEL_HELP)
    ev.add_argument("--tasks", type=_parse_tasks, default="all",
                    help=f"comma-separated subset of {', '.join(EVAL_TASKS)}, or 'all'")
    ev.add_argument("--limit", type=_positive_int, default=None,
                    help="quick run: only the first N perplexity windows and the first N items of each task "
                    "(default: everything)")
    ev.add_argument("--seqlen", type=_positive_int, default=2048, help="tokens per perplexity window")
    ev.add_argument("--batch-size", type=_positive_int, default=32, help="zero-shot requests per forward pass")
    ev.add_argument("--json", default=None,
                   help="also write the results to this JSON file ('-' = stdout; default: none)")
    ev.add_argument("--log-samples", action="store_true",
                    help="with --json: also record each zero-shot item's gold index and per-choice "
                    "log-likelihoods (default: off)")
    _add_common(ev)
    ev.set_defaults(func=_cmd_eval)

    ge = sub.add_parser("generate", help="generate text from a prompt", formatter_class=_Help,
                        description="Generate a continuation of PROMPT, streamed to stdout; speed goes to stderr.")
    ge.add_argument("model", help=MODEL_HELP)
    ge.add_argument("prompt", help="the prompt text")
    ge.add_argument("--max-new-tokens", type=_positive_int, default=128, help="tokens to generate at most")
    ge.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy decoding")
    ge.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    ge.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens; 0 = no limit")
    ge.add_argument("--repetition-penalty", type=float, default=1.0, help="penalty on repeated tokens; 1 = none")
    ge.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    ge.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    ge.add_argument("--kv-cache", choices=["none", "int8"], default="none",
                    help="int8 = GLQ's INT8 KV cache (glq-kvcache)")
    ge.add_argument("--kv-residual-length", type=_positive_int, default=128,
                    help="newest tokens the int8 cache keeps unquantized")
    ge.add_argument("--cuda-graph", action="store_true",
                    help="decode through glq.hf's CUDAGraphWrapper, one graph replay per token (needs a GPU)")
    _add_common(ge)
    ge.set_defaults(func=_cmd_generate)

    inf = sub.add_parser("info", help="describe a GLQ folder", formatter_class=_Help,
                         description="Per-layer rates, true size against bf16, format version and allocation "
                         "of a GLQ folder (reads config.json and safetensors headers only).")
    inf.add_argument("folder", help="a GLQ model folder")
    inf.add_argument("--summary", action="store_true", help="omit the per-layer table")
    inf.add_argument("--json", default=None,
                   help="also write everything to this JSON file ('-' = stdout; default: none)")
    inf.set_defaults(func=_cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UsageError as err:
        print(f"glq {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"glq {args.command}: interrupted", file=sys.stderr)
        return 130


def quantize_alias() -> int:
    """``glq-quantize ...`` is ``glq quantize ...``."""
    return main(["quantize", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
