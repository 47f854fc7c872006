"""The glq command: help, versions, wiring of quantize/eval/generate/info, and bad input.

Bad input must give one line on stderr and exit status 2, never a traceback. Most cases
run ``main([...])`` in-process (a new Python costs seconds for ``import torch``); two run
the installed command in a subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from glq.cli.main import build_parser, main


def run(argv, capsys):
    """(exit status, stdout, stderr) of ``glq argv`` run in-process."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's own errors and --help
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *needles):
    """Exit status 2 and one error line, the last one on stderr (progress bars of work done
    before the check failed may precede it), with no traceback."""
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err and sum("error:" in line for line in lines) == 1, err
    assert lines[-1].startswith("glq") and "error:" in lines[-1], err
    for needle in needles:
        assert needle in lines[-1], lines[-1]


def _glq_command() -> list[str]:
    script = Path(sys.executable).with_name("glq")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "glq.cli.main"]


# ----------------------------------------------------------------------------- help and versions


def test_help_is_instant_and_documents_every_option():
    # Building and printing every help must not import torch or transformers.
    code = ("import sys; from glq.cli.main import build_parser; p = build_parser(); "
            "[a.choices[c].format_help() for a in p._subparsers._group_actions for c in a.choices]; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    sub = build_parser()._subparsers._group_actions[0].choices
    assert set(sub) == {"quantize", "eval", "generate", "info"}
    for name, parser in sub.items():
        for action in parser._actions:
            if action.dest == "help" or not action.option_strings:
                continue
            assert action.help, f"{name} {action.option_strings} has no help"
            text = parser.format_help()
            assert action.option_strings[-1] in text
    quantize_help = " ".join(sub["quantize"].format_help().split())
    for flag in ("--model", "--output", "--bpw", "--min-bpw", "--max-bpw", "--bpw-map", "--tune-iters",
                 "--finetune-epochs", "--nsamples", "--seqlen", "--device", "--trust-remote-code", "--streaming",
                 "--dataset", "--calibration-file", "--seed", "--resume"):
        assert flag in quantize_help
    assert "(default: 128)" in quantize_help and "(default: 2048)" in quantize_help


def test_version_and_help_through_the_installed_command():
    out = subprocess.run([*_glq_command(), "--version"], capture_output=True, text=True, check=True).stdout
    assert [line.split()[0] for line in out.splitlines()] == [
        "glq-lattice", "glq-kernels", "glq-quant", "glq-hf", "glq-kvcache", "glq-cli"]
    assert "glq-cli 0.1.0" in out
    res = subprocess.run([*_glq_command(), "--help"], capture_output=True, text=True, check=True)
    assert "quantize" in res.stdout and "generate" in res.stdout


def test_bad_model_in_a_real_process_is_one_line(tmp_path):
    res = subprocess.run([*_glq_command(), "quantize", "--model", str(tmp_path / "no-such-model"),
                          "--output", str(tmp_path / "out"), "--device", "cpu"], capture_output=True, text=True)
    assert_one_line_error(res.returncode, res.stderr, "does not exist")


def test_glq_quantize_alias_is_installed():
    alias = Path(sys.executable).with_name("glq-quantize")
    if not alias.is_file():
        pytest.skip("console scripts are not installed next to this interpreter")
    res = subprocess.run([str(alias), "--bpw", "9"], capture_output=True, text=True)
    assert_one_line_error(res.returncode, res.stderr, "glq quantize")


# ----------------------------------------------------------------------------- bad input to quantize


@pytest.fixture
def q(tiny_model_dir, tmp_path):
    """glq quantize arguments that pass every check, on the tiny model."""
    return ["quantize", "--model", tiny_model_dir, "--output", tmp_path / "out", "--device", "cpu",
            "--nsamples", "2", "--seqlen", "16"]


@pytest.mark.parametrize(("value", "needle"), [
    pytest.param("9", "outside the supported range 2 to 8", id="above-8"),
    pytest.param("1.5", "outside the supported range", id="below-2"),
    pytest.param("nan", "outside the supported range", id="nan"),
    pytest.param("four", "expected a number", id="not-a-number"),
])
def test_bpw_out_of_range(q, capsys, value, needle):
    assert_one_line_error(*run([*q, "--bpw", value], capsys)[::2], "--bpw", needle)


def test_rate_bounds(q, capsys):
    assert_one_line_error(*run([*q, "--min-bpw", "6", "--max-bpw", "3"], capsys)[::2],
                          "--min-bpw 6 is above --max-bpw 3")
    assert_one_line_error(*run([*q, "--min-bpw", "2.5"], capsys)[::2], "whole rate")
    assert_one_line_error(*run([*q, "--bpw", "2.5", "--min-bpw", "3"], capsys)[::2], "--bpw 2.5 is below --min-bpw 3")


def test_missing_model_folder_and_offline_hub_id(q, capsys, monkeypatch, tmp_path):
    q[2] = tmp_path / "nowhere"
    assert_one_line_error(*run(q, capsys)[::2], "does not exist")
    (tmp_path / "empty").mkdir()
    q[2] = tmp_path / "empty"
    assert_one_line_error(*run(q, capsys)[::2], "has no config.json")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    q[2] = "glq-no-such-owner/no-such-model"
    assert_one_line_error(*run(q, capsys)[::2], "neither a local folder nor a model found", "offline")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-GPU message")
def test_device_cuda_without_gpu(q, capsys):
    q[q.index("--device") + 1] = "cuda"
    assert_one_line_error(*run(q, capsys)[::2], "--device cuda", "no CUDA GPU")


def test_bpw_map_must_match_the_model(q, capsys, tmp_path):
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"model.layers.7.mlp.down_proj": 4, "*": 2}))  # the tiny model has 2 blocks
    assert_one_line_error(*run([*q, "--bpw-map", path], capsys)[::2], "does not match the model",
                          "model.layers.7.mlp.down_proj")
    path.write_text(json.dumps({"layers": {"*.mlp.down_proj": {"bpw": 4}}}))
    assert_one_line_error(*run([*q, "--bpw-map", path], capsys)[::2], "does not match the model",
                          "gives no rate to model.layers.0.self_attn.q_proj")
    assert_one_line_error(*run([*q, "--bpw-map", '{"*.mlp.down_proj": 9}'], capsys)[::2], "rates must be one of")
    assert_one_line_error(*run([*q, "--bpw-map", '{"model.layers.0": 4'], capsys)[::2], "not valid JSON")
    assert_one_line_error(*run([*q, "--bpw-map", tmp_path / "absent.json"], capsys)[::2], "neither an existing")


def test_output_must_be_new_or_resumable(q, capsys, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert_one_line_error(*run(q, capsys)[::2], "not a resumable GLQ run")
    assert_one_line_error(*run([*q, "--no-resume"], capsys)[::2], "not a resumable GLQ run")
    (out / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "glq"}}))
    assert_one_line_error(*run(q, capsys)[::2], "already holds a finished GLQ model")
    (tmp_path / "file").write_text("x")
    q[q.index("--output") + 1] = tmp_path / "file"
    assert_one_line_error(*run(q, capsys)[::2], "is a file")
    # An unfinished run (glq.quant's partial state) passes the check and reaches quantize().
    import glq.quant
    from glq.quant.pipeline import PARTIAL

    partial = tmp_path / "partial"
    (partial / PARTIAL).mkdir(parents=True)
    (partial / PARTIAL / "state.json").write_text("{}")
    (partial / "tokenizer.json").write_text("{}")
    monkeypatch.setattr(glq.quant, "quantize", lambda *a, **k: {"seconds": 0.1}, raising=False)
    q[q.index("--output") + 1] = partial
    assert run(q, capsys)[0] == 0


def test_calibration_file_too_short_says_how_many_tokens(q, capsys, tmp_path, tiny_tokenizer):
    short = tmp_path / "short.txt"
    short.write_text("A short calibration text.\n\nIt has two documents.\n")
    from glq.quant.data import calibration_text

    have = len(tiny_tokenizer(calibration_text(short), add_special_tokens=False).input_ids)
    code, _, err = run([*q, "--calibration-file", short, "--nsamples", "4", "--seqlen", "64"], capsys)
    assert_one_line_error(code, err, f"has {have} tokens", "--nsamples 4 x --seqlen 64 = 256")
    assert_one_line_error(*run([*q, "--calibration-file", tmp_path / "absent.txt"], capsys)[::2], "does not exist")
    code, _, err = run([*q, "--dataset", "c4", "--calibration-file", short], capsys)
    assert_one_line_error(code, err, "not allowed with argument")


# ----------------------------------------------------------------------------- wiring


def test_quantize_passes_every_option_and_prints_the_summary(q, capsys, monkeypatch, tmp_path):
    import glq.quant

    seen = {}

    def fake_quantize(model, output_dir, **kwargs):
        seen.update(model=model, output_dir=output_dir, **kwargs)
        return {"bpw": 2.5625, "size_bytes": 123456, "seconds": 1.5, "proxy_error": 0.0123}

    monkeypatch.setattr(glq.quant, "quantize", fake_quantize, raising=False)
    bpw_map = tmp_path / "map.json"
    bpw_map.write_text(json.dumps({"*.mlp.down_proj": 4, "model.layers.0.self_attn.q_proj": 3, "*": 2}))
    expanded = {f"model.layers.{i}.{m}": 2 for i in range(2) for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    expanded |= {"model.layers.0.self_attn.q_proj": 3, "model.layers.0.mlp.down_proj": 4,
                 "model.layers.1.mlp.down_proj": 4}
    summary = tmp_path / "summary.json"
    code, out, err = run([*q, "--bpw", "2.5", "--min-bpw", "2", "--max-bpw", "4", "--bpw-map", bpw_map,
                          "--tune-iters", "3", "--finetune-epochs", "2", "--seed", "7", "--streaming", "--no-resume",
                          "--json", summary], capsys)
    assert code == 0, err
    assert seen == {"model": str(q[2]), "output_dir": str(q[4]), "bpw": 2.5, "nsamples": 2, "seqlen": 16,
                    "device": "cpu", "min_bpw": 2, "max_bpw": 4,
                    "bpw_map": expanded, "tune_iters": 3, "finetune_epochs": 2, "finetune_model_epochs": None,
                    "streaming": True, "trust_remote_code": False, "dataset": "wikipedia", "seed": 7, "resume": False}
    assert "proxy_error" in out and "123,456" in out
    assert json.loads(summary.read_text())["bpw"] == 2.5625

    def refusing_quantize(model, output_dir, **kwargs):
        raise ValueError("bpw_map layer model.layers.0.mlp.up_proj: bad")

    monkeypatch.setattr(glq.quant, "quantize", refusing_quantize)
    assert_one_line_error(*run(q, capsys)[::2], "bpw_map layer")


def test_eval_prints_a_table_and_writes_json(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "eval.json"
    code, stdout, err = run(["eval", tiny_model_dir, "--tasks", "wikitext2,piqa,winogrande,arc_challenge",
                             "--limit", "2", "--seqlen", "64", "--device", "cpu", "--json", out], capsys)
    assert code == 0, err
    report = json.loads(out.read_text())
    res = report["results"]
    assert res["wikitext2"]["windows"] == 2 and res["wikitext2"]["seqlen"] == 64 and res["wikitext2"]["ppl"] > 1
    assert res["piqa"]["n"] == 2 and "acc_norm" in res["piqa"] and "acc_norm" not in res["winogrande"]
    assert report["glq"] is False and report["dtype"] == "float32"
    assert "| wikitext2" in stdout and "| arc_challenge | acc_norm" in stdout
    assert "samples" not in res["piqa"]  # only with --log-samples


def test_eval_log_samples_match_the_scorer(tiny_model_dir, tiny_model, tiny_tokenizer, tmp_path, capsys):
    from glq.cli.tasks import load_task
    from glq.cli.zeroshot import accuracy, score_items

    out = tmp_path / "eval.json"
    code, _, err = run(["eval", tiny_model_dir, "--tasks", "piqa,winogrande", "--limit", "3", "--device", "cpu",
                        "--json", out, "--log-samples"], capsys)
    assert code == 0, err
    res = json.loads(out.read_text())["results"]
    for task in ("piqa", "winogrande"):
        items = load_task(task, 3)
        samples = res[task]["samples"]
        assert [s["doc_id"] for s in samples] == [0, 1, 2] and [s["gold"] for s in samples] == [i.gold for i in items]
        lls = [s["loglikelihoods"] for s in samples]
        expected = score_items(tiny_model, tiny_tokenizer, items)
        assert [v for ll in lls for v in ll] == pytest.approx([v for ll in expected for v in ll], abs=1e-3)
        assert accuracy(items, lls, with_norm=task == "piqa")["acc"] == res[task]["acc"]
    assert_one_line_error(*run(["eval", tiny_model_dir, "--log-samples"], capsys)[::2], "needs --json")


def test_eval_and_generate_bad_input(tiny_model_dir, tmp_path, capsys):
    assert_one_line_error(*run(["eval", tiny_model_dir, "--tasks", "mmlu"], capsys)[::2], "unknown task")
    assert_one_line_error(*run(["eval", tmp_path / "nothing"], capsys)[::2], "does not exist")
    assert_one_line_error(*run(["generate", tiny_model_dir, "hi", "--device", "cpu", "--cuda-graph"], capsys)[::2],
                          "needs a CUDA device")
    assert_one_line_error(*run(["generate", tiny_model_dir, "hi", "--kv-cache", "int8", "--cuda-graph"], capsys)[::2],
                          "cannot be combined")
    assert_one_line_error(*run(["generate", tiny_model_dir, "hi", "--device", "cpu", "--chat"], capsys)[::2],
                          "no chat template")


@pytest.mark.parametrize("kv_cache", ["none", "int8"])
def test_generate_runs(tiny_model_dir, capsys, kv_cache):
    if kv_cache == "int8" and not hasattr(pytest.importorskip("glq.kvcache"), "GLQQuantizedCache"):
        pytest.skip("glq.kvcache.GLQQuantizedCache is not written yet")
    code, _, err = run(["generate", tiny_model_dir, "Question: why?", "--max-new-tokens", "5", "--device", "cpu",
                          "--kv-cache", kv_cache, "--temperature", "0.7", "--top-k", "20"], capsys)
    assert code == 0, err
    assert "5 tokens in" in err and f"kv cache {kv_cache}" in err


def test_cuda_graph_decoding_wiring_matches_greedy_generate(tiny_model, tiny_tokenizer):
    """``glq generate --cuda-graph``'s decoding function, on the CPU (where CUDAGraphWrapper runs
    every step eagerly), gives the tokens transformers' greedy ``generate`` gives."""
    import argparse

    import torch

    from glq.cli.main import _generate_cuda_graph

    ids = tiny_tokenizer("Question: why is the sky blue?", return_tensors="pt").input_ids
    args = argparse.Namespace(max_new_tokens=6, temperature=1.0, top_k=0, seed=0)
    ours = _generate_cuda_graph(tiny_model, tiny_tokenizer, ids, args, sample=False)
    with torch.no_grad():
        ref = tiny_model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=tiny_tokenizer.eos_token_id,
                                  pad_token_id=tiny_tokenizer.eos_token_id)
    n = min(ours.shape[1], ref.shape[1])
    assert ours.shape[1] > ids.shape[1] and torch.equal(ours[:, :n], ref[:, :n])


@pytest.mark.cuda
def test_generate_with_cuda_graph_on_gpu(tiny_model_dir, capsys):
    code, out, err = run(["generate", tiny_model_dir, "Question: why?", "--max-new-tokens", "5", "--device", "cuda",
                          "--cuda-graph", "--temperature", "0.7", "--top-k", "20"], capsys)
    assert code == 0, err
    assert "cuda graph" in err and out.strip()


# ----------------------------------------------------------------------------- glq info


def _write_glq_folder(folder: Path, rates: dict[str, int]) -> dict[str, tuple[int, int]]:
    """A GLQ folder in the documented format, with all-zero codes: enough for ``glq info``."""
    import torch
    from safetensors.torch import save_file

    from glq.hf import config as fmt_module
    from glq.hf.config import GLQFormat, LayerSpec, power_of_two_blocks, stage_bits, tensor_names

    shapes = {"q_proj": (96, 96), "k_proj": (32, 96), "v_proj": (32, 96), "o_proj": (96, 96),
              "gate_proj": (160, 96), "up_proj": (160, 96), "down_proj": (96, 160)}
    tensors, layers = {}, {}
    for i in range(2):
        for short, (out_f, in_f) in shapes.items():
            name = f"model.layers.{i}.{'self_attn' if short[0] in 'qkvo' else 'mlp'}.{short}"
            bpw = rates.get(short, 2)
            layers[name] = LayerSpec(bpw=bpw, in_features=in_f, out_features=out_f,
                                     in_blocks=power_of_two_blocks(in_f), out_blocks=power_of_two_blocks(out_f), seed=i)
            codes = [torch.zeros(out_f, in_f // 8, dtype=torch.int16 if bits == 16 else torch.uint8)
                     for bits in stage_bits(bpw)]  # (out, in/8) per stage
            extra = [torch.ones(out_f), torch.ones(in_f, dtype=torch.int8), torch.ones(out_f, dtype=torch.int8)]
            keys = tensor_names(name, layers[name])
            tensors.update(zip(keys, [*codes, *extra], strict=True))
        tensors[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(96, dtype=torch.bfloat16)
    tensors["model.embed_tokens.weight"] = torch.zeros(512, 96, dtype=torch.bfloat16)
    tensors[fmt_module.table_key(2, 0, "scale")] = torch.ones(4)
    save_file(tensors, str(folder / "model.safetensors"))
    fmt = GLQFormat(layers=layers, codebook="e8-test", bpw_target=2.5, extra={"calibration": "wikipedia"})
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "quantization_config": fmt.to_dict()}
    (folder / "config.json").write_text(json.dumps(config))
    return {name: (spec.out_features, spec.in_features) for name, spec in layers.items()}


def test_info_reports_rates_sizes_and_allocation(tmp_path, capsys):
    shapes = _write_glq_folder(tmp_path, {"down_proj": 4, "v_proj": 3})
    out = tmp_path / "info.json"
    code, stdout, err = run(["info", tmp_path, "--json", out], capsys)
    assert code == 0, err
    info = json.loads(out.read_text())
    assert info["format_version"] == 1 and info["codebook"] == "e8-test" and info["bpw_target"] == 2.5
    assert info["allocation"] == {"2": {"layers": 10, "weights": 2 * (96 * 96 * 2 + 32 * 96 + 160 * 96 * 2)},
                                  "3": {"layers": 2, "weights": 2 * 32 * 96},
                                  "4": {"layers": 2, "weights": 2 * 96 * 160}}
    layer = next(x for x in info["layers"] if x["name"] == "model.layers.0.mlp.down_proj")
    # 4 bpw = two 16-bit stages: 2 x (96 x 20) int16 codes, 96 fp32 scales, 160 + 96 int8 signs.
    assert layer["bytes"] == 2 * 96 * 20 * 2 + 96 * 4 + 160 + 96
    assert layer["bits_per_weight"] == pytest.approx(8 * layer["bytes"] / (96 * 160))
    v = next(x for x in info["layers"] if x["name"] == "model.layers.1.self_attn.v_proj")
    assert v["bytes"] == 32 * 12 * 2 + 32 * 12 + 32 * 4 + 96 + 32  # 3 bpw = a 16-bit and an 8-bit stage
    weights = sum(o * i for o, i in shapes.values())
    assert info["quantized_weights"] == weights
    assert info["bf16_bytes"] == 2 * (weights + 2 * 96 + 512 * 96)
    assert info["size_bytes"] == info["quantized_bytes"] + info["codebook_table_bytes"] + info["other_bytes"]
    assert info["size_bytes"] < os.path.getsize(tmp_path / "model.safetensors")  # headers are not tensors
    assert "model.layers.1.mlp.gate_proj" in stdout and "smaller" in stdout
    code, stdout, _ = run(["info", tmp_path, "--summary"], capsys)
    assert code == 0 and "gate_proj" not in stdout and "allocation" in stdout


def test_info_bad_input(tmp_path, tiny_model_dir, capsys):
    assert_one_line_error(*run(["info", tmp_path / "none"], capsys)[::2], "is not a folder")
    assert_one_line_error(*run(["info", tmp_path], capsys)[::2], "no config.json")
    assert_one_line_error(*run(["info", tiny_model_dir], capsys)[::2], "not a GLQ folder")
    glq = tmp_path / "glq"
    glq.mkdir()
    _write_glq_folder(glq, {})
    config = json.loads((glq / "config.json").read_text())
    config["quantization_config"]["format_version"] = 99
    (glq / "config.json").write_text(json.dumps(config))
    assert_one_line_error(*run(["info", glq], capsys)[::2], "format version 99 is not supported")


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_quantize_then_info_and_eval_on_the_tiny_model(tiny_model_dir, tmp_path, capsys):
    """The README's two commands, on the tiny model: needs the real glq.quant.quantize and glq.hf."""
    import glq.quant

    if not hasattr(glq.quant, "quantize"):
        pytest.skip("glq.quant.quantize is not written yet")
    out = tmp_path / "glq"
    code, stdout, err = run(["quantize", "--model", tiny_model_dir, "--output", out, "--bpw", "3", "--nsamples", "4",
                             "--seqlen", "64", "--device", "cpu"], capsys)
    assert code == 0, err
    code, stdout, err = run(["info", out, "--summary"], capsys)
    assert code == 0, err
    code, stdout, err = run(["eval", out, "--tasks", "wikitext2,piqa", "--limit", "2", "--seqlen", "64",
                             "--device", "cpu"], capsys)
    assert code == 0, err
    assert "GLQ" in stdout
    shutil.rmtree(out)
