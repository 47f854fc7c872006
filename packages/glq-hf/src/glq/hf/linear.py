"""``GLQLinear``: a linear layer that computes straight from its stored GLQ codes.

    y = x · Wᵀ (+ bias),   W = diag(signs_out) · H_out · diag(row_scale) · W̃ · H_in · diag(signs_in)

computed in the Hadamard domain, never forming W:

    x' = H_in(signs_in ⊙ x);   y' = row_scale ⊙ (x' · W̃ᵀ);   y = signs_out ⊙ H_out(y')

by ``glq.kernels.glq_linear`` (CUDA C or Triton on a GPU, decode-then-matmul reference on the
CPU). ``dequantize()`` gives W for checks and export.

Sibling layers that read one input (q/k/v, gate/up) share its input transform (:class:`SharedInput`)
and run as one fused linear (:func:`fuse_siblings`; ``GLQ_HF_FUSE=0`` keeps them apart).

On a GPU running the CUDA C kernels the codes are held in glq.kernels' tiled layout, which those kernels
read 12-14% faster on large layers (:func:`set_code_layout`; ``GLQ_HF_TILE=0`` keeps them row-major).
``state_dict()`` and so ``save_pretrained`` always give the folder's row-major codes.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from glq.hf import _kernels
from glq.hf.config import LayerSpec, stage_bits

log = logging.getLogger("glq.hf")

#: Read by :func:`link_shared_inputs`: sibling layers' matmuls are fused (:func:`fuse_siblings`) unless it is "0".
#: Fused decode is 19% (2 bpw) / 15% (4 bpw) faster through CUDA graphs on an 8B-shaped model (BENCHMARKS.md).
FUSE_ENV = "GLQ_HF_FUSE"
#: Read by :func:`set_code_layout` (which loading runs): "0" keeps every layer's codes row-major.
TILE_ENV = "GLQ_HF_TILE"


def fusion_enabled() -> bool:
    """Whether :func:`link_shared_inputs` fuses sibling layers (yes unless ``GLQ_HF_FUSE=0``)."""
    return os.environ.get(FUSE_ENV, "") != "0"


class GLQLinear(nn.Module):
    """Drop-in for ``nn.Linear`` holding codes, scales and signs at their stored dtypes.

    Buffers (the folder's ``{name}.*`` tensors, same names):
        ``codes_{s}``: (out, in/8) int16 for a 16-bit stage, uint8 for an 8-bit one;
        ``row_scale``: (out,) float32; ``signs_in`` (in,) / ``signs_out`` (out,): int8 ±1 (float16 if fine-tuned);
        ``bias``: (out,) in the model's dtype, when the layer has one.

    Args:
        spec: the layer's entry in the folder's ``quantization_config``.
        bias_dtype: dtype of the bias buffer (the model's dtype when loading).
        device: where to create the empty buffers ("meta" while transformers builds the model).
        tables: the shared ``PackedTables`` of ``spec.bpw``; attach later with :meth:`attach`.
    """

    def __init__(self, spec: LayerSpec, *, bias_dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, tables=None):
        super().__init__()
        self.spec = spec
        self.in_features, self.out_features = spec.in_features, spec.out_features
        self.bits = stage_bits(spec.bpw)
        out, groups = spec.out_features, spec.in_features // 8
        for s, b in enumerate(self.bits):
            dtype = torch.int16 if b == 16 else torch.uint8
            self.register_buffer(f"codes_{s}", torch.empty(out, groups, dtype=dtype, device=device))  # (out, in/8)
        self.register_buffer("row_scale", torch.empty(out, dtype=torch.float32, device=device))  # (out,)
        signs = getattr(torch, spec.signs_dtype)  # int8 ±1, or float16 with fine-tuned gains
        self.register_buffer("signs_in", torch.empty(spec.in_features, dtype=signs, device=device))  # (in,)
        self.register_buffer("signs_out", torch.empty(out, dtype=signs, device=device))  # (out,)
        if spec.bias:
            self.register_buffer("bias", torch.empty(out, dtype=bias_dtype, device=device))  # (out,)
        else:
            self.bias = None
        self.tables = None
        self.shared_input: SharedInput | None = None  # set by link_shared_inputs
        self.codes_tiled = False  # codes in glq.kernels' tiled layout (set_code_layout); the folder's are row-major
        if tables is not None:
            self.attach(tables)

    @property
    def codes(self) -> list[torch.Tensor]:
        return [getattr(self, f"codes_{s}") for s in range(len(self.bits))]

    def attach(self, tables) -> GLQLinear:
        """Point the layer at its rate's shared ``PackedTables`` and derive its float32 signs.

        The float signs (non-persistent, 4 bytes a feature) spare the kernels an int8 cast per
        call: two extra launches per layer and token in eager decoding.
        """
        if tuple(tables.bits) != self.bits:
            raise ValueError(f"tables have stages {tuple(tables.bits)} but bpw={self.spec.bpw} needs {self.bits}")
        self.tables = tables
        self.register_buffer("_signs_in_f", self.signs_in.to(torch.float32), persistent=False)
        self.register_buffer("_signs_out_f", self.signs_out.to(torch.float32), persistent=False)
        return self

    @torch.no_grad()
    def set_code_layout(self, tiled: bool) -> bool:
        """Hold the codes in glq.kernels' tiled layout (True: what the CUDA C kernels read fastest) or
        row-major (False: the folder's layout, which every backend reads). A layer whose shape has no
        tiled layout (out_features % 16 or in_features % 128 not 0) stays row-major. Outputs are the same
        bit for bit either way; ``state_dict()`` always gives row-major codes. Returns whether the codes are
        now tiled."""
        tiled = bool(tiled) and _kernels.can_tile(self.out_features, self.in_features)
        if tiled != self.codes_tiled:
            for s, c in enumerate(_kernels.tile_codes(self.codes, tiled)):
                self._buffers[f"codes_{s}"] = c
            self.codes_tiled = tiled
        return tiled

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.codes_tiled:  # the folder's layout, whatever the layer holds in memory
            for s, c in enumerate(_kernels.tile_codes(self.codes, False)):
                destination[prefix + f"codes_{s}"] = c

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # State dicts hold row-major codes: copied into tiled buffers they would be read tiled. Loading
        # leaves the layer row-major (set_code_layout(model) tiles it again).
        self.set_code_layout(False)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _apply(self, fn, recurse=True):
        # Stored data keeps its dtype when the model is cast (model.half(), .to(torch.bfloat16)), as
        # from_pretrained keeps it when loading: float32 row scales rounded to bfloat16 would move every
        # output by up to 0.4%, and fine-tuned float16 gains likewise. Only the bias follows the model.
        # Moves between devices still apply; the originals stay intact because a cast makes new tensors.
        keep = {n: b for n, b in self._buffers.items()
                if b is not None and b.is_floating_point() and n not in ("bias", _JOINED + "bias")}
        super()._apply(fn, recurse)
        for name, old in keep.items():
            new = self._buffers.get(name)
            if new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        return self

    def _require_tables(self):
        if self.tables is None:
            raise RuntimeError("GLQLinear has no codebook tables attached; call attach(tables) "
                               "(from_pretrained does this after loading)")
        return self.tables

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tables = self._require_tables()
        if self.shared_input is None or torch.compiler.is_compiling():
            y = _kernels.linear(x, self.codes, tables, self.row_scale, self._signs_in_f, self._signs_out_f,
                                self.spec.in_blocks, self.spec.out_blocks, self.codes_tiled)
        else:
            xt = self.shared_input.rotated(x, self._signs_in_f, self.spec.in_blocks)
            y = _kernels.linear_rotated(xt, self.codes, tables, self.row_scale, self._signs_out_f,
                                        self.spec.out_blocks, self.codes_tiled)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    @torch.no_grad()
    def dequantize(self) -> torch.Tensor:
        """The dense weight W (out, in) in float32: ``F.linear(x, layer.dequantize())`` matches
        ``layer(x)`` (minus the bias) up to float rounding."""
        tables = self._require_tables()
        w = _kernels.dequantize_rotated(self.codes, tables, self.row_scale, self.codes_tiled)  # (out, in) diag(rs)·W̃
        s_in = self.signs_in.to(torch.float32)
        s_out = self.signs_out.to(torch.float32)
        # H is symmetric: transforming each row gives W̃·H_in; each column, H_out·(...).
        w = _kernels.hadamard(w, self.spec.in_blocks) * s_in  # (out, in)
        return _kernels.hadamard(w.t().contiguous(), self.spec.out_blocks, out_signs=s_out).t().contiguous()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bpw={self.spec.bpw}, "
                f"bias={self.bias is not None}")


class SharedInput:
    """The input transform of sibling layers that read the same tensor with the same input signs
    (q/k/v and gate/up of a model quantized by glq.quant, which draws one set of input signs per
    group of layers sharing an input): the first layer to see an input computes
    H_in(signs_in ⊙ x), and its siblings reuse it while the input is the very same tensor, not
    modified since (its version counter). One Hadamard launch instead of three for q/k/v and one
    instead of two for gate/up; the results are bit-identical to unshared layers. Skipped under
    torch.compile, which traces each layer on its own."""

    def __init__(self, members: int):
        self.members = members
        self.clear()

    def rotated(self, x: torch.Tensor, signs_in: torch.Tensor, in_blocks) -> torch.Tensor:
        version = _version(x)
        if x is self._x and version == self._version:
            xt, self._uses = self._xt, self._uses + 1
        else:
            xt = _kernels.hadamard(x, in_blocks, signs_in)
            self._x, self._version, self._xt, self._uses = x, version, xt, 1
        if self._uses >= self.members:
            # Every sibling has had it: let go, so a long prefill's activations are not kept
            # alive until the next forward (2 GB for 2048 tokens of an 8B model otherwise).
            self.clear()
        return xt

    def clear(self) -> None:
        self._x: torch.Tensor | None = None
        self._xt: torch.Tensor | None = None
        self._version, self._uses = -1, 0


def _version(x: torch.Tensor) -> int:
    # Inference-mode tensors keep no version counter: there identity alone decides (transformers'
    # attention and MLP pass one untouched tensor to their projections).
    return -2 if x.is_inference() else x._version


def link_shared_inputs(model: nn.Module) -> int:
    """Give sibling GLQLinear layers (children of one module) with equal input signs and blocks
    one :class:`SharedInput`; returns the number of layers linked. Layers from folders whose
    signs differ per layer (earlier glq.quant, fine-tuned gains that differ) are left alone.

    The linked groups whose rates agree are then fused (:func:`fuse_siblings`; the number fused is
    logged) unless ``GLQ_HF_FUSE=0`` is in the environment. Groups fused earlier are unfused first,
    so the model always ends up as the variable says."""
    unfuse_siblings(model)
    linked = 0
    for parent in model.modules():
        groups: list[list[GLQLinear]] = []
        for child in parent.children():
            if not isinstance(child, GLQLinear) or child.signs_in.device.type == "meta":
                continue
            child.shared_input = None
            for g in groups:
                head = g[0]
                if (head.spec.in_blocks == child.spec.in_blocks and head.signs_in.dtype == child.signs_in.dtype
                        and head.signs_in.device == child.signs_in.device
                        and torch.equal(head.signs_in, child.signs_in)):
                    g.append(child)
                    break
            else:
                groups.append([child])
        for g in groups:
            if len(g) > 1:
                shared = SharedInput(len(g))
                for layer in g:
                    layer.shared_input = shared
                linked += len(g)
    if fusion_enabled():
        log.info("glq.hf: fused %d groups of sibling layers (%s=0 keeps them apart)", fuse_siblings(model), FUSE_ENV)
    return linked


# ---------------------------------------------------------------------------------------------
# Fused siblings (the default; GLQ_HF_FUSE=0 turns it off): q/k/v as one GLQ linear, gate/up as another.
#
# Concatenating the layers' rows gives one layer whose output is the members' outputs side by
# side: the input transform and signs are the group's common ones, W̃ and row_scale stack by rows,
# and the output transform is block-diagonal over the members' joined output blocks, so each
# member's segment is transformed exactly as it would be alone. One input transform, one matmul
# and one output transform per group: 12 launches per Llama block instead of 21.

_JOINED = "_fused_"  # prefix of the head's buffers holding the group's joined rows


class FusedSiblings:
    """A group of fused sibling layers. Its first layer (the head) holds the joined rows of every
    tensor that differs per row (codes, row_scale, signs_out and their float copy, bias) as
    ``_fused_{name}`` buffers, once; each member sees its rows as ``narrow`` views made at call
    time, so ``model.to()``/``.cuda()``/``.half()``, which replace the head's buffers, leave
    nothing stale behind.

    The first member called with an input computes the whole group's output and keeps it; the
    others take their columns while the input is the very same tensor, unmodified (its version
    counter; identity alone for inference tensors), and it is let go once every member had its
    part, as :class:`SharedInput` does.
    """

    def __init__(self, members: list[GLQLinear]):
        head = members[0]
        self.members, self.head = members, head
        self.names = _joined_names(head)
        self.rows, off = [], 0
        for layer in members:
            self.rows.append((off, layer.out_features))
            off += layer.out_features
        self.out_blocks = tuple(b for layer in members for b in layer.spec.out_blocks)
        self.clear()

    def joined(self, name: str) -> torch.Tensor:
        return self.head._buffers[_JOINED + name]

    def output(self, layer: FusedGLQLinear, x: torch.Tensor) -> torch.Tensor:
        i = layer._fused_index
        version = _version(x)
        if not (x is self._x and version == self._version):
            if self._x is not None and i not in self._taken:
                # Siblings are still to take their part of another input: this member was called
                # with a different tensor (or one modified in place); compute its own rows only.
                return layer.own_output(x)
            self._x, self._version, self._y, self._taken = x, version, self._linear(x), set()
        self._taken.add(i)
        y = self._y.narrow(-1, *self.rows[i])
        if len(self._taken) == len(self.members):
            self.clear()  # every member had its part: don't keep a prefill's activations alive
        return y

    def _linear(self, x: torch.Tensor) -> torch.Tensor:
        head = self.head
        codes = [self.joined(f"codes_{s}") for s in range(len(head.bits))]
        # Tiled codes join as they are: every member's rows are whole 16-row tiles, and tiles are the
        # layout's outermost dimension, so the joined rows are the joined matrix's tiled codes.
        y = _kernels.linear(x, codes, head._require_tables(), self.joined("row_scale"), head._signs_in_f,
                            self.joined("_signs_out_f"), head.spec.in_blocks, self.out_blocks, head.codes_tiled)
        if "bias" in self.names:
            y = y + self.joined("bias").to(y.dtype)
        return y

    def clear(self) -> None:
        self._x: torch.Tensor | None = None
        self._y: torch.Tensor | None = None
        self._version, self._taken = -1, set()


class FusedGLQLinear(GLQLinear):
    """A :class:`GLQLinear` fused with its siblings (:func:`fuse_siblings`; the class of a layer
    is swapped while it is fused, so unfused layers run exactly the plain class's code).

    Its ``codes_{s}``, ``row_scale``, ``signs_out``, ``_signs_out_f`` and ``bias`` read as views of
    its rows in the head's joined buffers, so ``dequantize()`` and checks work unchanged; it
    keeps its own ``signs_in`` (equal in the group). ``state_dict()`` gives each layer's tensors
    under their own names as separate copies (what ``save_pretrained`` writes: a saved folder
    is the unfused one).
    """

    fused: FusedSiblings
    _fused_index: int

    def __getattr__(self, name: str):
        # Only reached for names that are not real attributes (nn.Module keeps buffers in _buffers).
        group = self.__dict__.get("fused")
        if group is not None and name in group.names:
            return group.joined(name).narrow(0, *group.rows[self.__dict__["_fused_index"]])
        return super().__getattr__(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # traced layer by layer: no state kept between calls
            return self.own_output(x)
        return self.fused.output(self, x)

    def own_output(self, x: torch.Tensor) -> torch.Tensor:
        """This layer alone, from its rows (the plain layer's unshared computation)."""
        y = _kernels.linear(x, self.codes, self._require_tables(), self.row_scale, self._signs_in_f,
                            self._signs_out_f, self.spec.in_blocks, self.spec.out_blocks, self.codes_tiled)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def attach(self, tables) -> GLQLinear:
        raise RuntimeError("attach() on a fused GLQ layer: call glq.hf.linear.unfuse_siblings(model) first")

    def set_code_layout(self, tiled: bool) -> bool:
        raise RuntimeError("set_code_layout() on a fused GLQ layer: use glq.hf.linear.set_code_layout(model, ...)")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # The layer's own tensors under their own names, each a separate copy: safetensors refuses
        # tensors sharing storage, and a saved folder must not depend on whether it was fused.
        for name in _stored_names(self):
            t = getattr(self, name)
            if self.codes_tiled and name.startswith("codes_"):  # row-major, as GLQLinear's
                destination[prefix + name] = _kernels.tile_codes([t], False)[0]
            elif name in self.fused.names:
                destination[prefix + name] = t.clone()
            else:  # signs_in, the layer's own buffer: as nn.Module gives it
                destination[prefix + name] = t if keep_vars else t.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Loading one member's rows could leave the group with unequal input signs, which the
        # fused product would not notice: refuse rather than guess.
        if any(k.startswith(prefix) for k in state_dict):
            error_msgs.append(f"{prefix[:-1]} is fused with its siblings; call glq.hf.linear.unfuse_siblings(model) "
                              f"before load_state_dict (or load the model with {FUSE_ENV}=0)")
        elif strict:
            missing_keys.extend(prefix + name for name in _stored_names(self))

    def extra_repr(self) -> str:
        off, n = self.fused.rows[self._fused_index]
        return super().extra_repr() + f", fused rows {off}:{off + n} of {sum(r[1] for r in self.fused.rows)}"


def _stored_names(layer: GLQLinear) -> list[str]:
    """The layer's persistent tensors in their registration order (the folder's names)."""
    codes = [f"codes_{s}" for s in range(len(layer.bits))]
    return [*codes, "row_scale", "signs_in", "signs_out", *(["bias"] if layer.spec.bias else [])]


def _joined_names(layer: GLQLinear) -> tuple[str, ...]:
    """The tensors with one row per output feature, which a fused group joins."""
    codes = [f"codes_{s}" for s in range(len(layer.bits))]
    return (*codes, "row_scale", "signs_out", "_signs_out_f", *(("bias",) if layer.bias is not None else ()))


def _fusible(group: list[GLQLinear]) -> bool:
    """Whether one linear can stand for the group (whose members share input signs and blocks):
    one rate and the same tables object (one kernel call decodes every row), all or none with a
    bias, and every joined tensor of one dtype and on the signs' device (torch.cat would cast or fail)."""
    head = group[0]
    if any(isinstance(layer, FusedGLQLinear) or layer.tables is None for layer in group):
        return False
    if sum(len(layer.spec.out_blocks) for layer in group) > 16:  # the Hadamard kernels take at most 16 blocks
        return False
    if any(layer.bits != head.bits or layer.tables is not head.tables or (layer.bias is None) != (head.bias is None)
           or layer.codes_tiled != head.codes_tiled for layer in group):
        return False
    device = head.signs_in.device
    return all(getattr(layer, n).dtype == getattr(head, n).dtype and getattr(layer, n).device == device
               for layer in group for n in (*_joined_names(head), "signs_in", "_signs_in_f"))


@torch.no_grad()
def fuse_siblings(model: nn.Module) -> int:
    """Fuse every group of layers sharing a :class:`SharedInput` (see :func:`link_shared_inputs`)
    whose members have one rate (hence one tables object), one signs dtype, one device and all or
    none a bias; returns the number of groups fused. Other groups keep their shared input only.

    The joined tensors replace the members' own (the memory held does not change, apart from the
    moment of joining one group); see :class:`FusedSiblings` and :class:`FusedGLQLinear`.
    """
    fused = 0
    for parent in model.modules():
        groups: dict[int, list[GLQLinear]] = {}
        for child in parent.children():
            if isinstance(child, GLQLinear) and child.shared_input is not None:
                groups.setdefault(id(child.shared_input), []).append(child)
        for g in groups.values():
            if len(g) < 2 or not _fusible(g):
                continue
            group = FusedSiblings(g)
            joined = {name: torch.cat([layer._buffers[name] for layer in g]) for name in group.names}
            for i, layer in enumerate(g):
                for name in group.names:
                    del layer._buffers[name]
                    layer._non_persistent_buffers_set.discard(name)
                layer.__class__ = FusedGLQLinear
                layer.fused, layer._fused_index = group, i
            for name, t in joined.items():
                # Non-persistent: state_dict() writes the members' own tensors instead.
                g[0].register_buffer(_JOINED + name, t, persistent=False)
            fused += 1
    return fused


@torch.no_grad()
def unfuse_siblings(model: nn.Module) -> int:
    """Undo :func:`fuse_siblings`: every member gets its own tensors back (copies of its rows; the
    joined ones are freed). Returns the number of groups unfused; a no-op on unfused models."""
    groups = {id(m.fused): m.fused for m in model.modules() if isinstance(m, FusedGLQLinear)}
    for group in groups.values():
        parts = [{name: getattr(layer, name).clone() for name in group.names} for layer in group.members]
        for name in group.names:
            delattr(group.head, _JOINED + name)
        for layer, own in zip(group.members, parts, strict=True):
            layer.__class__ = GLQLinear
            del layer.fused, layer._fused_index
            for name, t in own.items():
                layer.register_buffer(name, t, persistent=not name.startswith("_"))
            # back to the plain layer's buffer order, so its state_dict() lists keys as before
            order = [*_stored_names(layer), "_signs_in_f", "_signs_out_f"]
            items = sorted(layer._buffers.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order))
            layer._buffers.clear()
            layer._buffers.update(items)
        group.clear()
    return len(groups)


@torch.no_grad()
def set_code_layout(model: nn.Module, tiled: bool | None = None) -> int:
    """Put every GLQLinear's codes in glq.kernels' tiled layout (True), row-major (False), or, by default
    (None, what loading does), tiled where the layer's device runs the CUDA C kernels unless ``GLQ_HF_TILE=0``.
    Fused groups are unfused and fused again around the change. Returns the number of layers holding tiled
    codes; see :meth:`GLQLinear.set_code_layout`."""
    fused = any(isinstance(m, FusedGLQLinear) for m in model.modules())
    if fused:
        unfuse_siblings(model)
    allowed = os.environ.get(TILE_ENV, "") != "0"
    tiled_layers = 0
    for m in model.modules():
        if isinstance(m, GLQLinear) and m.codes_0.device.type != "meta":
            want = tiled if tiled is not None else allowed and _kernels.wants_tiled_codes(m.codes_0.device)
            tiled_layers += m.set_code_layout(want)
    if fused:
        link_shared_inputs(model)
    return tiled_layers
