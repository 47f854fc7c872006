"""``quantize``: a Hugging Face causal LM in, a GLQ model folder out.

Block by block, as GPTQ does: the calibration activations entering block i come from
blocks 0..i-1 *already quantized*, so each block compensates the error of those before
it. Each finished block is saved at once under ``output_dir/.glq-partial``; a run
started again with the same arguments reloads those blocks and continues.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from glq.hf.config import FORMAT_VERSION, GLQFormat, LayerSpec
from glq.quant import DEFAULT_FINETUNE_EPOCHS, DEFAULT_FINETUNE_MODEL_EPOCHS, allocate, arch, checkpoint, rht
from glq.quant.layer import QuantizedLayer, quantize_linear

PARTIAL = ".glq-partial"
ALLOCATION_FILE = "bpw_allocation.json"
REPORT_FILE = "glq_report.json"


class _StopForward(Exception):
    """Raised by a capture hook once it has what it needs, to cut a forward short."""


@dataclass(frozen=True)
class _Plan:
    """Validated arguments; ``fingerprint`` decides whether a partial run may resume."""

    model: str
    bpw: float
    min_bpw: int
    max_bpw: int
    nsamples: int
    seqlen: int
    tune_iters: int
    dataset: str
    seed: int
    damp: float
    bpw_map_digest: str
    finetune_epochs: int = 0
    finetune_model_epochs: int = 0
    model_epochs_auto: bool = False  # finetune_model_epochs was not given: off where it does not fit
    # How input signs are drawn; in the fingerprint so that a partial run written by an older
    # glq.quant (signs per layer) is not resumed into a folder that mixes the two.
    input_signs: str = "per-group"

    @property
    def fractional(self) -> bool:
        return float(self.bpw) != int(self.bpw)

    def fingerprint(self) -> dict:
        # Whole-model tuning runs after the last block and leaves the block files alone, so a run
        # may resume with other finetune_model_epochs (say, 0 after it ran out of memory there).
        return {k: getattr(self, k) for k in self.__dataclass_fields__
                if k not in ("finetune_model_epochs", "model_epochs_auto")}


def _validate(model, bpw, min_bpw, max_bpw, nsamples, seqlen, tune_iters, dataset, seed, damp, bpw_map,
              device, finetune_epochs: int = 0, finetune_model_epochs: int | None = 0,
              streaming: bool = False) -> _Plan:
    try:
        target = float(bpw)
    except (TypeError, ValueError):
        raise ValueError(f"bpw={bpw!r} is not a number; use an integer 2-8 or a fraction such as 2.5") from None
    if not 2 <= target <= 8 or math.isnan(target):
        raise ValueError(f"bpw={bpw} is out of range: GLQ codes have 2 to 8 bits per weight")
    lo = int(min_bpw) if min_bpw is not None else max(2, math.floor(target))
    hi = int(max_bpw) if max_bpw is not None else min(8, math.ceil(target) + (0 if target == int(target) else 1))
    if lo > hi:
        raise ValueError(f"min_bpw={lo} is above max_bpw={hi}")
    if not (lo >= 2 and hi <= 8):
        raise ValueError(f"min_bpw/max_bpw must lie in 2..8, got {lo}..{hi}")
    if target != int(target) and not lo <= target <= hi:
        raise ValueError(f"bpw={target} is outside [min_bpw={lo}, max_bpw={hi}]")
    if nsamples < 1 or seqlen < 2:
        raise ValueError(f"need nsamples >= 1 and seqlen >= 2, got nsamples={nsamples}, seqlen={seqlen}")
    if tune_iters < 0:
        raise ValueError(f"tune_iters={tune_iters} must be >= 0")
    if finetune_epochs < 0:
        raise ValueError(f"finetune_epochs={finetune_epochs} must be >= 0 (0 turns block fine-tuning off)")
    auto = finetune_model_epochs is None
    if auto:  # the default: whole-model tuning wherever the model is in memory (not streaming)
        finetune_model_epochs = 0 if streaming else DEFAULT_FINETUNE_MODEL_EPOCHS
    if finetune_model_epochs < 0:
        raise ValueError(f"finetune_model_epochs={finetune_model_epochs} must be >= 0 (0 turns it off)")
    if finetune_model_epochs and streaming:
        raise ValueError(f"finetune_model_epochs={finetune_model_epochs} needs every block in memory at once; "
                         "it cannot run with streaming=True (use finetune_epochs, which tunes block by block)")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was asked for but no CUDA GPU is available")
    if bpw_map is None:
        digest = ""
    else:
        raw = json.dumps(bpw_map, sort_keys=True) if isinstance(bpw_map, dict) else Path(bpw_map).read_text()
        digest = hashlib.sha256(raw.encode()).hexdigest()[:16]
    return _Plan(model=str(model), bpw=target, min_bpw=lo, max_bpw=hi, nsamples=int(nsamples), seqlen=int(seqlen),
                 tune_iters=int(tune_iters), dataset=str(dataset), seed=int(seed), damp=float(damp),
                 bpw_map_digest=digest, finetune_epochs=int(finetune_epochs),
                 finetune_model_epochs=int(finetune_model_epochs), model_epochs_auto=auto)


def _prepare_output(output_dir: Path, plan: _Plan, resume: bool) -> dict | None:
    """Check the output folder; return the saved state of a resumable run, if any."""
    state_file = output_dir / PARTIAL / "state.json"
    if state_file.is_file():
        state = json.loads(state_file.read_text())
        if {k: state["plan"].get(k) for k in plan.fingerprint()} != plan.fingerprint():
            diff = {k: (state["plan"].get(k), v) for k, v in plan.fingerprint().items() if state["plan"].get(k) != v}
            raise ValueError(f"{output_dir} holds an unfinished GLQ run with other arguments {diff}: "
                             "rerun with the same arguments to resume, or choose another output folder")
        return state if resume else None
    if output_dir.exists() and any(output_dir.iterdir()):
        cfg = output_dir / "config.json"
        if cfg.is_file() and "quantization_config" in json.loads(cfg.read_text()):
            raise ValueError(f"{output_dir} already holds a finished GLQ model; choose another output folder")
        raise ValueError(f"{output_dir} exists, is not empty and is not a resumable GLQ run")
    return None


def _save_atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


class _Calibration:
    """Activations entering the current block, and the keyword arguments blocks need."""

    def __init__(self, model: nn.Module, blocks: nn.ModuleList, windows: torch.Tensor, device: torch.device,
                 reference: bool = False, keep_inputs: bool = False):
        self.kwargs: dict = {}
        inputs: list[torch.Tensor] = []

        def catch(_module, args, kwargs):
            inputs.append((args[0] if args else kwargs["hidden_states"]).detach())
            if not self.kwargs:
                self.kwargs = {k: v for k, v in kwargs.items()
                               if k not in ("hidden_states", "past_key_values", "past_key_value")}
            raise _StopForward

        handle = blocks[0].register_forward_pre_hook(catch, with_kwargs=True)
        try:
            with torch.no_grad():
                for w in windows:
                    with contextlib.suppress(_StopForward):
                        model(w[None].to(device), use_cache=False)
        finally:
            handle.remove()
        self.x = torch.cat(inputs)  # (nsamples, seqlen, hidden)
        # The unquantized model's activations, kept only for fine-tuning's targets.
        self.x_ref = self.x.clone() if reference else None
        # The first block's inputs, kept for whole-model fine-tuning (the stream above is overwritten).
        self.x0 = self.x.clone() if keep_inputs else None

    def run(self, block: nn.Module) -> None:
        """Replace the stored activations by ``block``'s outputs on them."""
        with torch.no_grad():
            for i in range(self.x.shape[0]):
                out = block(self.x[i : i + 1], **self.kwargs)
                self.x[i : i + 1] = out[0] if isinstance(out, tuple) else out

    def run_reference(self, block: nn.Module) -> None:
        """Advance the unquantized stream through ``block`` (call before quantizing it)."""
        with torch.no_grad():
            for i in range(self.x_ref.shape[0]):
                out = block(self.x_ref[i : i + 1], **self.kwargs)
                self.x_ref[i : i + 1] = out[0] if isinstance(out, tuple) else out

    def hessians(self, block: nn.Module, groups: list[list[str]]) -> dict[str, torch.Tensor]:
        """E[x xᵀ] of each group's input over every calibration token, summed in float64."""
        linears = arch.block_linears(block)
        acc: dict[str, torch.Tensor] = {}
        count: dict[str, int] = {}

        def hook(name):
            def fn(_module, args):
                x = args[0].reshape(-1, args[0].shape[-1]).to(torch.float32)
                # One sample's product in float32 (2048 rows), the running sum in float64.
                prod = (x.T @ x).to(torch.float64)
                acc[name] = acc[name] + prod if name in acc else prod
                count[name] = count.get(name, 0) + x.shape[0]
                if len(groups) == 1:
                    raise _StopForward  # the rest of the block's forward is not needed
            return fn

        handles = [linears[g[0]].register_forward_pre_hook(hook(g[0])) for g in groups]
        try:
            with torch.no_grad():
                for i in range(self.x.shape[0]):
                    with contextlib.suppress(_StopForward):
                        block(self.x[i : i + 1], **self.kwargs)
        finally:
            for h in handles:
                h.remove()
        return {g[0]: acc[g[0]] / count[g[0]] for g in groups}


def _load(model: str, trust_remote_code: bool, device: torch.device, streaming: bool):
    """(path, tokenizer, model, checkpoint or None); a streaming model's blocks stay on meta."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from glq.quant import checkpoint
    from glq.quant.models import resolve_model

    path = resolve_model(model)
    if not Path(path).exists() and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ValueError(f"model {model!r} is not a local folder and HF_HUB_OFFLINE=1 forbids the hub")
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        # Float32 on the CPU (bf16 CPU matmuls are slow and lossy); the checkpoint's dtype on a GPU.
        dtype = torch.float32 if device.type == "cpu" else getattr(config, "dtype", None) or torch.float32
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        if streaming:
            prefix = _block_prefix(config)
            lm, ckpt = checkpoint.load_skeleton(path, prefix, dtype, device, trust_remote_code)
            return path, tok, lm, ckpt
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise ValueError(f"cannot load model {model!r}: {err}".splitlines()[0]) from err
    return path, tok, lm.eval(), None


def _block_prefix(config) -> str:
    path = arch.KNOWN_BLOCK_PATHS.get(getattr(config, "model_type", ""))
    if path is None:
        raise ValueError(f"streaming needs a known architecture; model_type={config.model_type!r} is not in "
                         "glq.quant.arch.KNOWN_BLOCK_PATHS (run without streaming)")
    return path


def _move_all_but_blocks(model: nn.Module, layout: arch.BlockLayout, device: torch.device) -> nn.ModuleList:
    """Put embeddings, rotary tables and head on ``device``; blocks stay where they are."""
    parent_path, _, attr = layout.path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    blocks = getattr(parent, attr)
    setattr(parent, attr, nn.ModuleList())
    model.to(device)
    setattr(parent, attr, blocks)
    return blocks


def _iter(items, desc: str, progress: bool):
    if not progress:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="block")


def _quantize_block(block: nn.Module, prefix: str, calib: _Calibration, rates: dict[str, int], plan: _Plan,
                    groups: list[list[str]]) -> dict[str, QuantizedLayer]:
    linears = arch.block_linears(block)
    done: dict[str, QuantizedLayer] = {}
    for group in groups:
        # True-sequential: a group's Hessian comes from inputs computed with the groups before it
        # already quantized (o_proj sees quantized q/k/v), as GPTQ's option of that name. One
        # block forward per group instead of one per block; on SmolLM2 at 2 bpw (CPU protocol)
        # it took the 4-window perplexity from 90.12 to 89.15.
        h = calib.hessians(block, [group])[group[0]]
        for rel in group:
            full = f"{prefix}.{rel}"
            lin = linears[rel]
            q = quantize_linear(full, lin.weight.data, h.to(lin.weight.device), rates[full],
                                seed=rht.layer_seed(plan.seed, full), tune_iters=plan.tune_iters, damp=plan.damp,
                                in_seed=_group_in_seed(plan, prefix, group))
            if lin.bias is not None:
                q.spec = LayerSpec(**{**q.spec.__dict__, "bias": True})
            lin.weight.data.copy_(q.weight.to(lin.weight.dtype))
            done[full] = q
    return done


def _group_in_seed(plan: _Plan, prefix: str, group: list[str]) -> int:
    """One input-sign seed per group of layers that read the same input (its first layer's own
    seed): the group's Hessian is one, its transform is one, and glq.hf then rotates the shared
    input once for the whole group (glq.hf.linear.SharedInput). Output signs stay per layer."""
    return rht.layer_seed(plan.seed, f"{prefix}.{group[0]}")


def _profile(calib: _Calibration, fetch, release, layout, plan: _Plan, groups_of, progress: bool):
    """Pass 1: proxy loss of every layer at every candidate rate (unquantized activations)."""
    losses: dict[str, dict[int, float]] = {}
    for i in _iter(range(layout.count), "profiling", progress):
        block = fetch(i)
        groups = groups_of(i, block)
        hessians = calib.hessians(block, groups)
        linears = arch.block_linears(block)
        for group in groups:
            for rel in group:
                full = f"{layout.path}.{i}.{rel}"
                w = linears[rel].weight.data
                losses[full] = {
                    r: quantize_linear(full, w, hessians[group[0]], r, seed=rht.layer_seed(plan.seed, full),
                                       damp=plan.damp, in_seed=_group_in_seed(plan, f"{layout.path}.{i}", group)
                                       ).proxy_loss
                    for r in range(plan.min_bpw, plan.max_bpw + 1)
                }
        calib.run(block)
        release(i)
    return losses


def quantize(model: str, output_dir: str | os.PathLike, bpw: float = 2, nsamples: int = 128, seqlen: int = 2048,
             device: str = "cpu", min_bpw: int | None = None, max_bpw: int | None = None,
             bpw_map: str | os.PathLike | dict | None = None, tune_iters: int = 0, streaming: bool = False,
             trust_remote_code: bool = False, dataset: str = "wikipedia", seed: int = 0, resume: bool = True,
             damp: float = 0.01, progress: bool = True, finetune_epochs: int = DEFAULT_FINETUNE_EPOCHS,
             finetune_model_epochs: int | None = None) -> dict:
    """Quantize a causal LM into a GLQ folder; returns the run's summary (also in glq_report.json).

    Args:
        model: hub id, local folder, or ``"smollm2-135m"`` (the offline test model).
        output_dir: folder to write; an unfinished run there with the same arguments resumes.
        bpw: integer 2-8 (every layer at that rate) or a fraction (per-layer allocation
            between ``min_bpw`` and ``max_bpw``, by default the neighbouring integers and one above).
        bpw_map: a ``bpw_allocation.json`` (path or dict) fixing each layer's rate; skips profiling.
        tune_iters: coordinate-descent refinement passes after LDLQ (each never increases the layer's
            proxy loss); with the default tunings it made SmolLM2 at 4 bpw worse (BENCHMARKS.md).
        finetune_epochs: passes of block fine-tuning over the calibration set after each block is
            quantized (``glq.quant.finetune``: sign gains, row scales, norms; codes fixed); 0 = off,
            default ``DEFAULT_FINETUNE_EPOCHS`` (2).
        finetune_model_epochs: passes of whole-model fine-tuning after the last block (the same
            parameters, every block at once, against the unquantized model's next-token
            distribution); needs the model in memory (not with ``streaming``); 0 = off. By default
            (None) ``DEFAULT_FINETUNE_MODEL_EPOCHS`` (4), turned off with a warning where its float32
            copies of the quantized weights (4 bytes per weight) would not fit the device, and off
            with ``streaming``; a number given explicitly is refused up front where it cannot fit.
        dataset: calibration text: a shipped name ("wikipedia", "c4"), a text file, or a hub dataset.
        streaming: build the model on the meta device and read each block's weights from the
            safetensors shards only when its turn comes, so host memory holds one block plus
            the embeddings (and the calibration activations) whatever the model size.
    """
    summary, _ = quantize_with_model(
        model, output_dir, bpw=bpw, nsamples=nsamples, seqlen=seqlen, device=device, min_bpw=min_bpw,
        max_bpw=max_bpw, bpw_map=bpw_map, tune_iters=tune_iters, streaming=streaming,
        trust_remote_code=trust_remote_code, dataset=dataset, seed=seed, resume=resume, damp=damp, progress=progress,
        finetune_epochs=finetune_epochs, finetune_model_epochs=finetune_model_epochs)
    return summary


def quantize_with_model(model: str, output_dir, bpw: float = 2, nsamples: int = 128, seqlen: int = 2048,
                        device: str = "cpu", min_bpw=None, max_bpw=None, bpw_map=None, tune_iters: int = 0,
                        streaming: bool = False, trust_remote_code: bool = False, dataset: str = "wikipedia",
                        seed: int = 0, resume: bool = True, damp: float = 0.01, progress: bool = True,
                        finetune_epochs: int = DEFAULT_FINETUNE_EPOCHS, finetune_model_epochs: int | None = None):
    """``quantize``, also returning the model with every quantized weight replaced by its
    dequantized value (blocks on the CPU; None with ``streaming``), for evaluation."""
    start = time.perf_counter()
    plan = _validate(model, bpw, min_bpw, max_bpw, nsamples, seqlen, tune_iters, dataset, seed, damp, bpw_map, device,
                     finetune_epochs, finetune_model_epochs, streaming)
    out = Path(output_dir)
    state = _prepare_output(out, plan, resume)
    dev = torch.device(device)
    path, tok, lm, ckpt = _load(plan.model, trust_remote_code, dev, streaming)
    from glq.quant.calibration import calibration_windows

    windows = calibration_windows(tok, plan.dataset, plan.nsamples, plan.seqlen, plan.seed)
    layout = arch.find_blocks(lm)
    blocks = lm.get_submodule(layout.path) if streaming else _move_all_but_blocks(lm, layout, dev)
    dtype = next(p.dtype for p in lm.parameters() if p.is_floating_point())

    def fetch(i: int) -> nn.Module:
        if ckpt is not None:
            return checkpoint.materialize_block(blocks[i], f"{layout.path}.{i}", ckpt, dtype, dev)
        return blocks[i].to(dev)

    def release(i: int) -> None:
        # Streaming drops the block's tensors entirely; otherwise park it on the CPU.
        blocks[i] = blocks[i].to("meta" if ckpt is not None else "cpu")
    layer_sizes = {f"{layout.path}.{i}.{n}": m.weight.numel()
                   for i, b in enumerate(blocks) for n, m in arch.block_linears(b).items()}  # meta-safe
    if plan.finetune_model_epochs and (problem := _model_tuning_memory_problem(sum(layer_sizes.values()), dev)):
        if not plan.model_epochs_auto:
            raise ValueError(f"finetune_model_epochs={plan.finetune_model_epochs}: {problem}; use finetune_epochs "
                             "(block by block) instead, or finetune_model_epochs=0")
        still = " (block fine-tuning still runs)" if plan.finetune_epochs else ""
        warnings.warn(f"whole-model tuning is off for this run: {problem}{still}", stacklevel=2)
        plan = replace(plan, finetune_model_epochs=0)
    (out / PARTIAL).mkdir(parents=True, exist_ok=True)

    group_cache: dict[int, list[list[str]]] = {}

    def groups_of(i: int, block: nn.Module) -> list[list[str]]:
        if i not in group_cache:
            group_cache[i] = arch.group_by_input(block, lambda: block(calib.x[:1], **calib.kwargs))
        return group_cache[i]

    # Rates: uniform, a given map, or the two-pass allocation (whose result is saved).
    losses = None
    if bpw_map is not None:
        rates = allocate.read_allocation(bpw_map, list(layer_sizes))
    elif not plan.fractional:
        rates = dict.fromkeys(layer_sizes, int(plan.bpw))
    elif (out / PARTIAL / ALLOCATION_FILE).is_file():
        rates = allocate.read_allocation(out / PARTIAL / ALLOCATION_FILE, list(layer_sizes))
    else:
        calib = _Calibration(lm, blocks, windows, dev)
        losses = _profile(calib, fetch, release, layout, plan, groups_of, progress)
        rates = allocate.greedy_allocation(losses, layer_sizes, plan.bpw, plan.min_bpw, plan.max_bpw)
        allocate.write_allocation(out / PARTIAL / ALLOCATION_FILE, rates, layer_sizes, plan.bpw, losses)

    calib = _Calibration(lm, blocks, windows, dev, reference=plan.finetune_epochs > 0 or plan.finetune_model_epochs > 0,
                         keep_inputs=plan.finetune_model_epochs > 0)
    finished = state["blocks"] if state else 0
    # The tuned block files count only if they were tuned with this run's epochs.
    tuned_with = int((state or {}).get("model_tuned") or 0)
    model_tuned = tuned_with > 0 and tuned_with == plan.finetune_model_epochs
    state = {"plan": plan.fingerprint(), "blocks": finished, "model_tuned": tuned_with if model_tuned else 0}
    _save_atomic(out / PARTIAL / "state.json", lambda p: p.write_text(json.dumps(state)))
    results: dict[str, QuantizedLayer | dict] = {}
    for i in _iter(range(layout.count), "quantizing", progress):
        block = fetch(i)
        prefix = f"{layout.path}.{i}"
        part = _block_file(out, i, model_tuned)
        if calib.x_ref is not None:
            calib.run_reference(block)  # the unquantized block: fine-tuning's target
        if i < finished:
            results.update(_restore_block(block, prefix, part))
        else:
            done = _quantize_block(block, prefix, calib, rates, plan, groups_of(i, block))
            extra = {}
            if plan.finetune_epochs:
                from glq.quant import finetune

                extra["finetune"] = finetune.tune_block(block, prefix, done, calib.x, calib.x_ref, calib.kwargs,
                                                        finetune.TuneConfig(epochs=plan.finetune_epochs))
            _save_block(part, block, prefix, done, extra)
            results.update({n: {"spec": q.spec, **q.report(), **extra} for n, q in done.items()})
            state["blocks"] = i + 1
            _save_atomic(out / PARTIAL / "state.json", lambda p: p.write_text(json.dumps(state)))
        calib.run(block)
        release(i)
    if plan.finetune_model_epochs and not model_tuned:
        results.update(_tune_model(lm, layout, calib, plan, out, dev, progress))
        state["model_tuned"] = plan.finetune_model_epochs
        model_tuned = True
        _save_atomic(out / PARTIAL / "state.json", lambda p: p.write_text(json.dumps(state)))
    summary = _write_folder(out, lm, tok, layout, results, plan, layer_sizes, time.perf_counter() - start, device,
                            path, streaming, model_tuned)
    if losses is not None or (out / PARTIAL / ALLOCATION_FILE).is_file():
        shutil.copy(out / PARTIAL / ALLOCATION_FILE, out / ALLOCATION_FILE)
    else:
        allocate.write_allocation(out / ALLOCATION_FILE, rates, layer_sizes, plan.bpw)
    shutil.rmtree(out / PARTIAL)
    return summary, (None if streaming else lm)


_DEQUANTIZED = ".glq_dequantized"  # partial-file key suffix of a layer's dequantized weight


def _block_file(out: Path, i: int, model_tuned: bool = False) -> Path:
    """Block ``i``'s partial file; whole-model tuning writes a second set, so an interruption while
    writing it leaves the first set whole (the run then tunes again from it)."""
    return out / PARTIAL / f"block_{i:05d}{'.tuned' if model_tuned else ''}.safetensors"


def _read_layers(path: Path, prefix: str) -> tuple[dict[str, QuantizedLayer], dict]:
    """The quantized layers a block file holds (codes, scales, signs, dequantized weights), and
    its per-layer metadata."""
    from safetensors import safe_open

    layers = {}
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["glq"])
        for name, info in meta.items():
            spec = LayerSpec.from_dict(info["spec"])
            stages = len([k for k in f.keys() if k.startswith(name + ".codes_")])  # noqa: SIM118
            layers[name] = QuantizedLayer(
                spec=spec, codes=tuple(f.get_tensor(f"{name}.codes_{s}") for s in range(stages)),
                row_scale=f.get_tensor(name + ".row_scale"), signs_in=f.get_tensor(name + ".signs_in"),
                signs_out=f.get_tensor(name + ".signs_out"), weight=f.get_tensor(name + _DEQUANTIZED),
                proxy_loss=info["proxy_loss"], relative_loss=info["relative_loss"], sqnr_db=info["sqnr_db"],
                seconds=info["seconds"])
    assert all(n.startswith(prefix + ".") for n in layers), (prefix, list(layers))
    return layers, meta


def _model_tuning_line(results: dict) -> dict:
    """The whole-model tuning's held-out KL before -> after, as one summary line (CLI prints it)."""
    rep = next((r["finetune_model"] for r in results.values() if isinstance(r, dict) and "finetune_model" in r),
               None)
    if rep is None:
        return {}
    return {f"model_tuning_held_out_{rep['loss']}": f"{rep['loss_before']:.4g} -> {rep['loss_after']:.4g}"}


def _model_tuning_memory_problem(n_weights: int, dev: torch.device) -> str | None:
    """Why whole-model tuning cannot run here, or None: its dense float32 copies of the quantized
    weights alone would take more than 90% of the GPU (or, on the CPU, half of the host's memory,
    which also holds the model). Checked before hours of quantization; a run that fails later
    anyway resumes without it (see _Plan.fingerprint)."""
    from glq.quant.finetune import model_tuning_bytes

    need = model_tuning_bytes(n_weights)
    if dev.type == "cuda":
        total, share, where = torch.cuda.get_device_properties(dev).total_memory, 0.9, f"{dev}"
    else:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):  # no sysconf (Windows): cannot tell, let it run
            return None
        share, where = 0.5, "the host"
    if need <= share * total:
        return None
    return (f"it needs {need / 2**30:.1f} GiB on {where} for float32 copies of the {n_weights:,} quantized weights "
            f"alone, more than {share:.0%} of its {total / 2**30:.1f} GiB")


def _tune_model(lm, layout, calib, plan: _Plan, out: Path, dev, progress: bool = False) -> dict[str, dict]:
    """Whole-model fine-tuning after the last block; writes the ``.tuned`` block files."""
    from glq.quant import finetune

    layers, metas = {}, {}
    for i in range(layout.count):
        got, meta = _read_layers(_block_file(out, i), f"{layout.path}.{i}")
        layers.update(got)
        metas.update(meta)
    report = finetune.tune_model(lm, layout.path, layers, calib.x0, calib.x_ref, calib.kwargs,
                                 finetune.TuneConfig(epochs=plan.finetune_model_epochs), dev, progress=progress)
    blocks = lm.get_submodule(layout.path)
    results = {}
    for i in range(layout.count):
        prefix = f"{layout.path}.{i}"
        done = {n: q for n, q in layers.items() if n.startswith(prefix + ".")}
        block_ft = next(iter(metas[n] for n in done), {}).get("finetune")
        extra = {"finetune_model": report, **({"finetune": block_ft} if block_ft else {})}
        _save_block(_block_file(out, i, True), blocks[i], prefix, done, extra)
        results.update({n: {"spec": q.spec, **q.report(), **extra} for n, q in done.items()})
    return results


def _save_block(path: Path, block: nn.Module, prefix: str, done: dict[str, QuantizedLayer],
                extra: dict | None = None) -> None:
    """Everything the final folder needs from this block, plus what an exact resume needs."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    meta = {}
    for name, q in done.items():
        tensors.update(q.tensors(name))
        # Exact resume: the very weights this run used downstream, no re-decoding.
        tensors[name + _DEQUANTIZED] = q.weight.to(torch.float32).contiguous().cpu()
        meta[name] = {"spec": q.spec.to_dict(), **q.report(), **(extra or {})}
    for key, value in block.state_dict().items():  # norms, biases: stored as they are
        full = f"{prefix}.{key}"
        if not (key.endswith(".weight") and full[: -len(".weight")] in done):
            tensors[full] = value.detach().contiguous().cpu()
    _save_atomic(path, lambda p: save_file(tensors, str(p), metadata={"glq": json.dumps(meta)}))


def _restore_block(block: nn.Module, prefix: str, path: Path) -> dict[str, dict]:
    from safetensors import safe_open

    linears = arch.block_linears(block)
    restored = {}
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["glq"])
        for name, info in meta.items():
            rel = name[len(prefix) + 1 :]
            linears[rel].weight.data.copy_(f.get_tensor(name + _DEQUANTIZED).to(linears[rel].weight.dtype))
            restored[name] = {**info, "spec": LayerSpec.from_dict(info["spec"]), "_file": str(path)}
        # Norms and biases too: fine-tuning changes them, and the next block's inputs depend on them.
        stored = set(f.keys())
        with torch.no_grad():
            for key, value in block.state_dict().items():
                full = f"{prefix}.{key}"
                if full in stored and not (key.endswith(".weight") and full[: -len(".weight")] in meta):
                    value.copy_(f.get_tensor(full).to(value.dtype))
    return restored


def _version(metadata, name: str) -> str:
    # A source checkout on PYTHONPATH (no installed metadata) still writes a folder.
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "source"


def _checkpoint_dtype(path: str) -> torch.dtype:
    """The dtype the source checkpoint stores (config.json's dtype / torch_dtype), float32 if unsaid."""
    from glq.quant.checkpoint import local_folder

    try:
        cfg = json.loads((local_folder(path) / "config.json").read_text())
    except (OSError, ValueError):
        return torch.float32
    name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    value = getattr(torch, str(name).removeprefix("torch."), None)
    return value if isinstance(value, torch.dtype) and value.is_floating_point else torch.float32


def _write_folder(out: Path, lm, tok, layout, results, plan: _Plan, layer_sizes, seconds: float, device: str,
                  source: str, streaming: bool, model_tuned: bool = False) -> dict:
    from safetensors import safe_open

    from glq.lattice import codec
    from glq.quant import writer

    tensors: dict[str, torch.Tensor] = {}
    tied = bool(getattr(lm.config, "tie_word_embeddings", False))
    for key, value in lm.state_dict().items():
        if key.startswith(layout.path + ".") or (tied and key == "lm_head.weight"):
            continue
        tensors[key] = value.detach().contiguous().cpu()
    # Everything inside the blocks from the saved block files: one source of truth for
    # fresh, resumed and streaming runs.
    for i in range(layout.count):
        with safe_open(str(_block_file(out, i, model_tuned)), "pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                if not key.endswith(_DEQUANTIZED):
                    tensors[key] = f.get_tensor(key)
    # Unquantized tensors (embeddings, norms, head, biases) go back at the checkpoint's own dtype:
    # the CPU path computes in float32, which would double a bf16 model's embeddings on disk.
    store = _checkpoint_dtype(source)
    side = (".codes_", ".row_scale", ".signs_in", ".signs_out")
    for key, value in tensors.items():
        if value.is_floating_point() and not any(tag in key for tag in side):
            tensors[key] = value.to(store)
    lm.config.dtype = store
    rates_used = sorted({r["spec"].bpw if isinstance(r, dict) else r.spec.bpw for r in results.values()})
    tensors.update(writer.table_tensors({b: codec(b) for b in rates_used}))
    specs = {n: (r["spec"] if isinstance(r, dict) else r.spec) for n, r in results.items()}
    for name, spec in specs.items():
        if f"{name}.bias" in tensors and not spec.bias:
            specs[name] = LayerSpec(**{**spec.__dict__, "bias": True})
    from glq.hf.guard import guard_tensors

    # Empty tensors that make a load without `import glq.hf` fail loudly instead of
    # returning a model with random weights (see glq.hf.guard).
    tensors.update(guard_tensors(specs))
    code_bits = sum(layer_sizes[n] * specs[n].bpw for n in specs)
    sign_bits = {"int8": 8, "float16": 16}
    overhead_bits = sum(32 * s.out_features + sign_bits[s.signs_dtype] * (s.in_features + s.out_features)
                        for s in specs.values())
    total_weights = sum(layer_sizes.values())
    from importlib import metadata

    versions = {p: _version(metadata, p) for p in ("glq-lattice", "glq-quant", "torch", "transformers")}
    fmt = GLQFormat(layers=specs, format_version=FORMAT_VERSION, codebook=writer.codebook_id(rates_used),
                    bpw_target=plan.bpw,
                    extra={"calibration": {"dataset": plan.dataset, "nsamples": plan.nsamples,
                                           "seqlen": plan.seqlen, "seed": plan.seed},
                           "source_model": plan.model, "versions": versions})
    summary = {
        "model": plan.model,
        "bpw_target": plan.bpw,
        "bpw_codes": code_bits / total_weights,
        "bpw_with_overhead": (code_bits + overhead_bits) / total_weights,
        "quantized_weights": total_weights,
        "quantized_bytes": (code_bits + overhead_bits) // 8,
        "bf16_bytes": 2 * total_weights,
        "mean_relative_proxy_loss": sum(r["relative_loss"] if isinstance(r, dict) else r.relative_loss
                                        for r in results.values()) / len(results),
        "finetune_epochs": plan.finetune_epochs,
        "finetune_model_epochs": plan.finetune_model_epochs,  # as run: 0 where the default turned it off
        **_model_tuning_line(results),
        "seconds": round(seconds, 1),
        "device": device,
        "streaming": streaming,
        "versions": versions,
        "layers": {n: {k: v for k, v in (r if isinstance(r, dict) else {"spec": r.spec, **r.report()}).items()
                       if k not in ("spec", "_file")} for n, r in results.items()},
    }
    writer.write_folder(out, lm.config, tok, tensors, fmt)
    (out / REPORT_FILE).write_text(json.dumps(summary, indent=1))
    return summary
