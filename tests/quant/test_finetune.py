"""Block fine-tuning: it lowers the held-out block error, the folder it writes loads through glq.hf
to the very model the run evaluated, and an interrupted run resumes to the same folder."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from glq.hf.config import GLQFormat
from glq.quant import quantize
from glq.quant.pipeline import quantize_with_model

TINY = {"nsamples": 8, "seqlen": 32, "dataset": "c4", "progress": False}


@pytest.fixture(scope="module")
def tuned(tiny_llama_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft") / "glq"
    summary, model = quantize_with_model(str(tiny_llama_path), out, bpw=2, finetune_epochs=2, **TINY)
    return out, summary, model


def test_tuning_lowers_the_held_out_block_error(tuned):
    _, summary, _ = tuned
    stats = {json.dumps(v["finetune"], sort_keys=True) for v in summary["layers"].values()}
    assert len(stats) == 2  # one record per block, shared by its layers
    stats = [json.loads(s) for s in stats]
    assert all(s["steps"] == 2 * 7 for s in stats)  # 8 sequences, 1 held out, 2 epochs
    # A block whose held-out error does not improve keeps its untuned values (on this tiny random
    # model with 224 training tokens, block 0 overfits); the other must improve.
    assert all(s["loss_after"] <= s["loss_before"] for s in stats)
    assert any(s["loss_after"] < s["loss_before"] for s in stats)


def test_tuned_folder_loads_to_the_evaluated_model(tuned, tiny_llama_path, folder_tensors):
    from transformers import AutoModelForCausalLM

    import glq.hf  # noqa: F401

    out, summary, model = tuned
    fmt = GLQFormat.from_dict(json.loads((out / "config.json").read_text())["quantization_config"])
    tuned_blocks = {n.split(".")[2] for n, s in fmt.layers.items() if s.signs_dtype == "float16"}
    assert "1" in tuned_blocks  # block 0 may keep int8 signs (see above); block 1 improved
    tensors = folder_tensors(out)
    s_in = tensors["model.layers.1.mlp.down_proj.signs_in"]
    assert s_in.dtype == torch.float16 and len(s_in.unique()) > 2  # gains, not bare signs
    norm = "model.layers.1.input_layernorm.weight"
    with safe_open(str(next(tiny_llama_path.glob("*.safetensors"))), "pt") as st:
        assert not torch.equal(tensors[norm], st.get_tensor(norm).to(tensors[norm].dtype))  # norms tuned too
    # the overhead counts 16-bit signs for the tuned layers
    assert summary["bpw_with_overhead"] > 2.0 + 8 * 6 / 160
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = loaded(ids).logits
        b = model.float()(ids).logits
    assert float((a - b).norm() / b.norm()) < 1e-4


def test_resume_with_tuning_gives_the_same_folder(tiny_llama_path, tmp_path, crash_on_second_block, tuned,
                                                  folder_tensors):
    out = tmp_path / "glq"
    with pytest.raises(KeyboardInterrupt):
        quantize(str(tiny_llama_path), out, bpw=2, finetune_epochs=2, **TINY)
    crash_on_second_block()  # restore
    with pytest.raises(ValueError, match="other arguments"):
        quantize(str(tiny_llama_path), out, bpw=2, finetune_epochs=1, **TINY)
    quantize(str(tiny_llama_path), out, bpw=2, finetune_epochs=2, **TINY)
    resumed, fresh = folder_tensors(out), folder_tensors(tuned[0])
    assert resumed.keys() == fresh.keys()
    for k in fresh:
        assert torch.equal(resumed[k], fresh[k]), k


def test_negative_epochs_are_refused(tiny_llama_path, tmp_path):
    with pytest.raises(ValueError, match="finetune_epochs=-1"):
        quantize(str(tiny_llama_path), tmp_path / "x", bpw=2, finetune_epochs=-1, **TINY)
