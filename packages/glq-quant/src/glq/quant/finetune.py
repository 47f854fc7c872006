"""Block fine-tuning: after a block's linears are quantized, tune its continuous parameters so the
quantized block reproduces the *unquantized* model's block output.

The codes stay fixed. What moves, per quantized linear, are three gain vectors that the format
already has a place for (see ``glq.hf.config``)::

    W = diag(s_out · g_out) · H_out · diag(row_scale · g_r) · W̃ · H_in · diag(s_in · g_in)

(the signs become float16 "signs with gains", ``signs_dtype="float16"``), plus the block's own
unquantized parameters (RMSNorm weights, biases). This is QuIP#'s idea of tuning the sign vectors
as real numbers, applied block by block so memory stays at one block whatever the model size.

The target is the unquantized block applied to the unquantized model's activations, while the
input is the quantized model's activations: a block may also pull back error made before it. A
held-out share of the calibration sequences decides when to stop; a block whose held-out loss
does not improve keeps its untuned values.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from glq.quant import arch, rht
from glq.quant.layer import QuantizedLayer


@dataclass(frozen=True)
class TuneConfig:
    epochs: int = 2
    lr: float = 1e-3
    holdout: float = 0.125  # share of calibration sequences used only to judge the tuning


class _TunedLinear(nn.Module):
    """A quantized linear whose three gain vectors (and bias) are trainable; codes fixed."""

    def __init__(self, q: QuantizedLayer, bias: torch.Tensor | None, device: torch.device):
        super().__init__()
        from glq.lattice import codec

        spec = q.spec
        self.spec = spec
        out_f, in_f = spec.out_features, spec.in_features
        code = codec(spec.bpw)
        qn = code.decode(tuple(c.reshape(-1).to(device) for c in q.codes)).reshape(out_f, in_f)
        # W̃ · H_in is fixed: one input-side transform now instead of one per step.
        self.register_buffer("qh", rht.fwht_rows(qn.to(device, torch.float32), spec.in_blocks))
        self.register_buffer("row_scale", q.row_scale.to(device, torch.float32))
        self.register_buffer("s_in", q.signs_in.to(device, torch.float32))
        self.register_buffer("s_out", q.signs_out.to(device, torch.float32))
        self.g_in = nn.Parameter(torch.ones(in_f, device=device))
        self.g_out = nn.Parameter(torch.ones(out_f, device=device))
        self.g_r = nn.Parameter(torch.ones(out_f, device=device))
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(device, torch.float32).clone())

    def signs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The signs with gains as stored (float16) and used: tuning sees the stored rounding."""
        s_in, s_out = self.s_in * self.g_in, self.s_out * self.g_out
        # Straight-through float16 rounding: forward uses the stored values, gradients pass.
        return (s_in + (s_in.half().float() - s_in).detach(), s_out + (s_out.half().float() - s_out).detach())

    def weight(self) -> torch.Tensor:
        s_in, s_out = self.signs()
        w = self.qh * (self.row_scale * self.g_r)[:, None] * s_in  # diag(r) W̃ H_in diag(s_in)
        return rht.fwht_rows(w.T, self.spec.out_blocks).T * s_out[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def result(self, q: QuantizedLayer) -> QuantizedLayer:
        s_in, s_out = self.signs()
        row_scale = (self.row_scale * self.g_r).float()
        return replace(q, spec=replace(q.spec, signs_dtype="float16"), row_scale=row_scale.cpu(),
                       signs_in=s_in.half().cpu(), signs_out=s_out.half().cpu(), weight=self.weight().cpu())


def _tie_input_gains(mods: list[_TunedLinear]) -> None:
    """Layers of a block with equal input signs (glq.quant draws one set per group of layers that
    read the same input) share one input gain vector, so their tuned signs stay equal and glq.hf
    keeps transforming their common input once (glq.hf.linear.SharedInput)."""
    heads: list[_TunedLinear] = []
    for m in mods:
        for h in heads:
            if h.spec.in_blocks == m.spec.in_blocks and torch.equal(h.s_in, m.s_in):
                m.g_in = h.g_in  # the same Parameter: named_parameters() and Adam see it once
                break
        else:
            heads.append(m)


def _block_loss(block: nn.Module, x: torch.Tensor, target: torch.Tensor, kwargs: dict, idx) -> torch.Tensor:
    """Mean over tokens of ‖block(x) − target‖² / ‖target‖², each token relative to itself.

    Per token because the next block sees each token through an RMSNorm: the few tokens with
    massive activations (often the first) would otherwise outweigh all the others. On SmolLM2 at
    2 bpw (CPU protocol, 2 epochs) it beat one relative error per sequence: ppl 79.6 vs 80.4."""
    total = x.new_zeros((), dtype=torch.float32)
    for i in idx:
        out = block(x[i : i + 1].float(), **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        t = target[i : i + 1].float()
        total = total + ((out.float() - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp_min(1e-30)).mean()
    return total / max(len(idx), 1)


def tune_block(block: nn.Module, prefix: str, done: dict[str, QuantizedLayer], x: torch.Tensor,
               target: torch.Tensor, kwargs: dict, cfg: TuneConfig) -> dict:
    """Tune ``block`` (its quantized linears already hold their dequantized weights) in place and
    update ``done`` with the tuned layers. ``x``: the block's inputs in the quantized model,
    ``target``: the unquantized block's outputs on the unquantized model's inputs, both
    (nsamples, seqlen, hidden). Returns {"loss_before", "loss_after", "steps"} on held-out data."""
    n = x.shape[0]
    n_val = min(max(1, round(n * cfg.holdout)), n - 1) if n > 1 else 0
    train, val = list(range(n - n_val)), list(range(n - n_val, n)) or list(range(n))
    device = x.device
    dtype = next(p.dtype for p in block.parameters() if p.is_floating_point())
    kwargs = {k: _float32(v) for k, v in kwargs.items()}  # the block runs in float32 while tuning

    linears = arch.block_linears(block)
    tuned: dict[str, _TunedLinear] = {}
    originals: dict[str, nn.Module] = {}
    rel_of = {f"{prefix}.{rel}": rel for rel in linears}
    for full, q in done.items():
        rel = rel_of[full]
        lin = linears[rel]
        tuned[full] = _TunedLinear(q, lin.bias, device)
        originals[rel] = lin
        _set_submodule(block, rel, tuned[full])
    _tie_input_gains(list(tuned.values()))
    block.float()
    # Only vectors train (gains, norm weights, biases); any dense weight left in the block stays.
    params = {k: p for k, p in block.named_parameters() if p.dim() == 1}
    for p in block.parameters():
        p.requires_grad_(p.dim() == 1)

    history, steps = _train_keep_best(params, lambda idx: _block_loss(block, x, target, kwargs, idx),
                                      train, val, cfg, seed=0)
    improved = min(history) < history[0]
    for full, mod in tuned.items():
        rel = rel_of[full]
        done[full] = _swap_back(block, rel, originals[rel], mod, done[full], improved)
    block.to(dtype)
    for p in block.parameters():
        p.requires_grad_(False)
    return {"loss_before": history[0], "loss_after": min(history), "steps": steps}


def _train_keep_best(params: dict[str, torch.Tensor], loss_of, train: list[int], val: list[int], cfg: TuneConfig,
                     seed: int, on_step=None) -> tuple[list[float], int]:
    """Adam over ``params``, one step per training sequence in a seeded order; after each epoch the
    held-out loss ``loss_of(val)`` is taken, and ``params`` end holding the best epoch's values, or
    their starting ones if no epoch beat them. Returns (held-out loss before and after each epoch,
    steps)."""
    def snapshot() -> dict[str, torch.Tensor]:
        return {k: p.detach().clone() for k, p in params.items()}

    saved = snapshot()
    opt = torch.optim.Adam(list(params.values()), lr=cfg.lr)
    with torch.no_grad():
        history = [float(loss_of(val))]
    best_state, steps = None, 0
    gen = torch.Generator().manual_seed(seed)
    for _ in range(cfg.epochs):
        for i in torch.randperm(len(train), generator=gen).tolist():
            opt.zero_grad(set_to_none=True)
            loss_of([train[i]]).backward()
            opt.step()
            steps += 1
            if on_step is not None:
                on_step()
        with torch.no_grad():
            now = float(loss_of(val))
        if now < min(history):
            best_state = snapshot()
        history.append(now)
    with torch.no_grad():
        for k, v in (best_state if best_state is not None else saved).items():
            params[k].copy_(v)
    return history, steps


def _swap_back(block: nn.Module, rel: str, lin: nn.Module, mod: _TunedLinear, q: QuantizedLayer,
               improved: bool) -> QuantizedLayer:
    """Put the original linear back at ``rel``, holding the tuned weight (and bias) if tuning
    improved; returns the layer as it now stands (tuned gains as float16 signs, or unchanged)."""
    if improved:
        q = mod.result(q)
        lin.weight.data.copy_(q.weight.to(lin.weight.device, lin.weight.dtype))
        if lin.bias is not None:
            lin.bias.data.copy_(mod.bias.detach().to(lin.bias.dtype))
    _set_submodule(block, rel, lin)
    return q


def _float32(v):
    """``v`` with its floating-point tensors (also inside tuples, e.g. rotary cos/sin) in float32."""
    if isinstance(v, tuple):
        return tuple(_float32(t) for t in v)
    return v.float() if torch.is_tensor(v) and v.is_floating_point() else v


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def _final_head(lm: nn.Module, blocks_path: str):
    """(final norm, output head) applied after the last block, if the model exposes them the
    Llama way (``<blocks' parent>.norm`` and ``get_output_embeddings()``), else None."""
    parent_path = blocks_path.rpartition(".")[0]
    parent = lm.get_submodule(parent_path) if parent_path else lm
    norm, head = getattr(parent, "norm", None), lm.get_output_embeddings()
    if not isinstance(norm, nn.Module) or not isinstance(head, nn.Module):
        return None
    return norm, head


def model_tuning_bytes(n_quantized_weights: int) -> int:
    """Device memory :func:`tune_model` needs for its dense float32 copies of the quantized
    weights (activations, the head and the calibration stream come on top)."""
    return 4 * n_quantized_weights


def tune_model(lm: nn.Module, blocks_path: str, layers: dict[str, QuantizedLayer], x0: torch.Tensor,
               teacher: torch.Tensor, kwargs: dict, cfg: TuneConfig, device: torch.device,
               progress: bool = False) -> dict:
    """Tune every block's continuous parameters at once (the same ones as :func:`tune_block`) so
    the quantized model's output distribution matches the unquantized model's.

    ``x0``: the calibration inputs of the first block, ``teacher``: the unquantized model's output
    of the last block on them, both (nsamples, seqlen, hidden). The loss is the KL divergence of the
    student's next-token distribution from the teacher's, per token (final norm and head frozen, as
    they are not quantized); a model without a Llama-style final norm gets the per-token relative
    error of the last block's output instead. ``layers`` (by full name) are updated in place with
    the tuned values; the blocks end on their original device and dtype holding the tuned weights.
    Needs every block on ``device`` at once, in float32, with a dense copy of each quantized weight:
    meant for models that fit there (it is not available with streaming)."""
    blocks = lm.get_submodule(blocks_path)
    n = x0.shape[0]
    n_val = min(max(1, round(n * cfg.holdout)), n - 1) if n > 1 else 0
    train, val = list(range(n - n_val)), list(range(n - n_val, n)) or list(range(n))
    kwargs = {k: _float32(v) for k, v in kwargs.items()}
    home = [(next(b.parameters()).device, next(b.parameters()).dtype) for b in blocks]
    head = _final_head(lm, blocks_path)
    if head is not None:  # frozen float32 copies on the device; the model's own stay untouched
        import copy

        head = tuple(copy.deepcopy(m).to(device, torch.float32).requires_grad_(False) for m in head)

    swapped: list[tuple[nn.Module, str, nn.Module, str, _TunedLinear]] = []  # (block, rel, linear, full, tuned)
    for i, block in enumerate(blocks):
        prefix = f"{blocks_path}.{i}"
        mods = []
        for rel, lin in arch.block_linears(block).items():
            full = f"{prefix}.{rel}"
            if full in layers:  # swapped out before the move: the dense weights stay where they are
                mod = _TunedLinear(layers[full], lin.bias, device)
                swapped.append((block, rel, lin, full, mod))
                _set_submodule(block, rel, mod)
                mods.append(mod)
        _tie_input_gains(mods)
        blocks[i] = block.to(device).float()
    params = {f"{i}.{k}": p for i, b in enumerate(blocks) for k, p in b.named_parameters() if p.dim() == 1}
    for b in blocks:
        for p in b.parameters():
            p.requires_grad_(p.dim() == 1)

    def loss_of(idx) -> torch.Tensor:
        total = x0.new_zeros((), dtype=torch.float32, device=device)
        for i in idx:
            h = x0[i : i + 1].to(device, torch.float32)
            for b in blocks:
                # Checkpointed: the backward pass keeps one block's activations at a time (plus
                # every block's input), at the cost of a second forward per block.
                h = checkpoint(b, h, use_reentrant=False, **kwargs) if torch.is_grad_enabled() else b(h, **kwargs)
                h = h[0] if isinstance(h, tuple) else h
            t = teacher[i : i + 1].to(device, torch.float32)
            if head is None:
                total = total + ((h - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp_min(1e-30)).mean()
                continue
            norm, out = head
            with torch.no_grad():
                log_p = F.log_softmax(out(norm(t)), dim=-1)
            log_q = F.log_softmax(out(norm(h)), dim=-1)
            total = total + (log_p.exp() * (log_p - log_q)).sum(-1).mean()
        return total / max(len(idx), 1)

    bar = None
    if progress:  # minutes on a large model: show steps and an ETA like the block loop does
        from tqdm import tqdm

        bar = tqdm(total=cfg.epochs * len(train), desc="tuning the whole model", unit="seq")
    try:
        history, steps = _train_keep_best(params, loss_of, train, val, cfg, seed=1,
                                          on_step=None if bar is None else bar.update)
    finally:
        if bar is not None:
            bar.close()
    improved = min(history) < history[0]
    for block, rel, lin, full, mod in swapped:  # Module.to works in place: the same block objects
        layers[full] = _swap_back(block, rel, lin, mod, layers[full], improved)
    for i, (dev, dtype) in enumerate(home):
        for p in blocks[i].parameters():
            p.requires_grad_(False)
        blocks[i] = blocks[i].to(dev, dtype)
    return {"loss_before": history[0], "loss_after": min(history), "steps": steps, "held_out_history": history,
            "loss": "kl" if head is not None else "hidden", "epochs": cfg.epochs}
