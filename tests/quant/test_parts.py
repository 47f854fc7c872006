"""Pipeline pieces that stand alone: RHT, block LDLQ, allocation, architecture discovery."""

from __future__ import annotations

import pytest
import torch

from glq.quant import allocate, arch, ldlq, rht


def _round_to_grid(step: float):
    def q(x):
        return torch.round(x / step) * step
    return q


def _hessian(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * n, n, generator=g, dtype=torch.float64)
    x[:, : n // 4] *= 5  # uneven input energies, like real activations
    x = x @ (torch.eye(n, dtype=torch.float64) + 0.3 * torch.randn(n, n, generator=g, dtype=torch.float64))
    return x.T @ x / x.shape[0]


@pytest.mark.parametrize(("out_f", "in_f"), [(24, 96), (40, 160), (8, 960)], ids=lambda v: str(v))
def test_rht_is_orthogonal_and_invertible(out_f, in_f):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(out_f, in_f, generator=g)
    s_in, s_out = rht.random_signs(in_f, 3), rht.random_signs(out_f, 4)
    ib, ob = rht.blocks_for(in_f), tuple(1 << b for b in range(out_f.bit_length() - 1, -1, -1) if out_f >> b & 1)
    wt = rht.transform_weight(w, s_in, s_out, ib, ob)
    assert torch.allclose(wt.norm(), w.norm(), rtol=1e-5)
    back = rht.untransform_weight(wt, s_in, s_out, ib, ob)
    torch.testing.assert_close(back, w, atol=1e-5, rtol=1e-5)
    # The proxy loss of any perturbation is the same in both bases.
    h = _hessian(in_f)
    d = torch.randn(out_f, in_f, generator=g)
    dt = rht.transform_weight(d, s_in, s_out, ib, ob)
    ht = rht.transform_hessian(h, s_in, ib)
    loss = ldlq.proxy_loss(d, torch.zeros_like(d), h)
    loss_t = ldlq.proxy_loss(dt, torch.zeros_like(dt), ht)
    assert loss_t == pytest.approx(loss, rel=1e-5)


def test_layer_seeds_differ_and_repeat():
    a, b = rht.layer_seed(0, "model.layers.0.mlp.up_proj"), rht.layer_seed(0, "model.layers.1.mlp.up_proj")
    assert a != b and a == rht.layer_seed(0, "model.layers.0.mlp.up_proj")
    assert a != rht.layer_seed(1, "model.layers.0.mlp.up_proj")
    assert not torch.equal(rht.random_signs(64, a), rht.random_signs(64, b))


def test_ldlq_beats_plain_rounding_and_refine_never_hurts():
    n = 128
    h = ldlq.damp_hessian(_hessian(n))
    w = torch.randn(32, n, generator=torch.Generator().manual_seed(2))
    q_fn = _round_to_grid(0.5)
    plain = ldlq.proxy_loss(w, q_fn(w), h)
    q = ldlq.ldlq(w, h, q_fn)
    fed = ldlq.proxy_loss(w, q, h)
    assert fed < 0.8 * plain, (fed, plain)
    # every output is a grid point: feedback moves targets, never the codebook
    assert torch.equal(q, q_fn(q))
    refined = ldlq.refine(w, q, h.float(), q_fn, iters=2)
    assert ldlq.proxy_loss(w, refined, h) <= fed + 1e-9
    assert torch.equal(refined, q_fn(refined))


def test_damping_rescues_a_singular_hessian():
    # Indefinite (an eigenvalue of -1, as float32 accumulation can produce) with dead channels.
    h = torch.zeros(16, 16, dtype=torch.float64)
    h[:8, :8] = torch.eye(8, dtype=torch.float64) + 2 * (torch.ones(8, 8, dtype=torch.float64) - torch.eye(8)) / 7
    h[0, 1] = h[1, 0] = 2.0
    with pytest.warns(UserWarning, match="layer.x: Hessian not positive definite; damping raised"):
        hd = ldlq.damp_hessian(h, damp=0.01, name="layer.x")
    torch.linalg.cholesky(hd)


def test_greedy_allocation_hits_the_target_one_step_at_a_time():
    sizes = {"a": 100, "b": 100, "c": 200}
    losses = {
        "a": {2: 10.0, 3: 2.0, 4: 1.5},  # big first gain, small second
        "b": {2: 5.0, 3: 4.0, 4: 3.9},
        "c": {2: 40.0, 3: 12.0, 4: 4.0},
    }
    rates = allocate.greedy_allocation(losses, sizes, target=2.75, min_bpw=2, max_bpw=4)
    assert allocate.mean_bpw(rates, sizes) == pytest.approx(2.75)
    # c's first step (0.14 per bit) goes first, then a's (0.08); c's second step
    # (0.04) would beat b's (0.01) but no longer fits.
    assert rates == {"a": 3, "b": 2, "c": 3}
    # One step at a time: at 2.5 only c's first step fits, not c straight to 4.
    assert allocate.greedy_allocation(losses, sizes, 2.5, 2, 4) == {"a": 2, "b": 2, "c": 3}
    with pytest.raises(ValueError, match="outside"):
        allocate.greedy_allocation(losses, sizes, target=4.5, min_bpw=2, max_bpw=4)


def test_bpw_map_must_match_the_model(tmp_path):
    path = tmp_path / "bpw_allocation.json"
    allocate.write_allocation(path, {"x": 2, "y": 3}, {"x": 10, "y": 10}, 2.5)
    assert allocate.read_allocation(path, ["x", "y"]) == {"x": 2, "y": 3}
    with pytest.raises(ValueError, match="1 layers missing"):
        allocate.read_allocation(path, ["x", "y", "z"])
    with pytest.raises(ValueError, match="bpw=9"):
        allocate.read_allocation({"x": 9, "y": 2}, ["x", "y"])


def test_linears_are_grouped_by_shared_input(tiny_llama_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_path, dtype=torch.float32)
    layout = arch.find_blocks(model)
    assert (layout.path, layout.count) == ("model.layers", 2)
    block = model.get_submodule(layout.path)[0]
    captured = {}

    def catch(_m, args, kwargs):
        captured.update(kwargs)
        captured["x"] = args[0]

    h = block.register_forward_pre_hook(catch, with_kwargs=True)
    model(torch.randint(0, 512, (1, 12)), use_cache=False)
    h.remove()
    x = captured.pop("x")
    kwargs = {k: v for k, v in captured.items() if k != "past_key_values"}
    groups = arch.group_by_input(block, lambda: block(x, **kwargs))
    assert sorted(map(sorted, groups)) == sorted([
        ["self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"],
    ])
