"""Zero-shot scoring: shipped task data, lm-eval's templates and tokenization, batched = brute force."""

from __future__ import annotations

import json

import pytest

from glq.cli import tasks
from glq.cli import zeroshot as z


@pytest.mark.parametrize(("name", "count", "choices"), [
    pytest.param("piqa", 1838, {2}, id="piqa"),
    pytest.param("winogrande", 1267, {2}, id="winogrande"),
    pytest.param("arc_easy", 2376, {3, 4}, id="arc_easy"),
    pytest.param("arc_challenge", 1172, {3, 4}, id="arc_challenge"),
])
def test_task_sizes_are_the_scored_splits(name, count, choices):
    items = tasks.load_task(name)
    assert len(items) == count
    assert {len(it.requests) for it in items} == choices
    assert len(tasks.load_task(name, limit=5)) == 5


def test_templates_follow_lm_eval():
    piqa = tasks.load_task("piqa", limit=1)[0]
    assert piqa.requests[0] == ("Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:",
                                " Provide the guinea pig with a cage full of a few inches of bedding made of ripped "
                                "paper strips, you will also need to supply it with a water bottle and a food dish.")
    assert piqa.choices[0] == piqa.requests[0][1][1:] and piqa.gold == 0

    # WinoGrande partial evaluation: option substituted into the context, the rest of the
    # sentence is the shared continuation.
    wino = tasks.load_task("winogrande", limit=1)[0]
    assert wino.requests == (("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
                             ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases."))
    assert wino.gold == 1  # answer "2"

    arc = tasks.load_task("arc_easy", limit=1)[0]
    assert arc.requests[0] == ("Question: A cell's chromosomes contain\nAnswer:", " genes")  # stray spaces stripped
    assert arc.choices == ("genes", "chlorophyll", "sperm", "eggs") and arc.gold == 0
    three = [it for it in tasks.arc("easy") + tasks.arc("challenge") if len(it.choices) == 3]
    assert three and all(all(c for c in it.choices) for it in three)


def test_encode_pair_moves_trailing_spaces_like_lm_eval(tiny_tokenizer):
    tok = tiny_tokenizer
    ctx, cont = z.encode_pair(tok, "Question: why?\nAnswer: ", "because")
    assert (ctx, cont) == z.encode_pair(tok, "Question: why?\nAnswer:", " because")
    whole = tok("Question: why?\nAnswer: because", add_special_tokens=False).input_ids
    assert ctx + cont == whole and ctx == tok("Question: why?\nAnswer:", add_special_tokens=False).input_ids
    # An empty context becomes the end-of-text token, as lm-eval's prefix token.
    assert z.encode_pair(tok, "", "hello")[0] == [tok.eos_token_id]


def test_accuracy_metrics_by_hand():
    items = [tasks.Item((("q", " a"), ("q", " bbbb")), ("a", "bbbb"), gold=1),
             tasks.Item((("q", " a"), ("q", " b")), ("a", "b"), gold=0)]
    # Item 1: raw picks "a" (-2 > -4); per character picks "bbbb" (-1 > -2). Item 2: a tie goes to choice 0.
    res = z.accuracy(items, [[-2.0, -4.0], [-3.0, -3.0]])
    assert res["acc"] == 0.5 and res["acc_norm"] == 1.0 and res["n"] == 2
    assert res["acc_stderr"] == pytest.approx((0.5 * 0.5 / 1) ** 0.5)
    assert "acc_norm" not in z.accuracy(items, [[-2.0, -4.0], [-3.0, -3.0]], with_norm=False)


def test_batched_scores_equal_brute_force(tiny_model, tiny_tokenizer):
    # Three items of each task (mixed lengths, shared and distinct contexts) and one request
    # longer than the tiny model's 256 positions (left truncation).
    items = [it for name in tasks.TASKS for it in tasks.load_task(name, limit=3)]
    pairs = [z.encode_pair(tiny_tokenizer, c, k) for it in items for c, k in it.requests]
    long_context = " ".join(c for it in tasks.load_task("piqa", limit=20) for c, _ in it.requests)
    pairs.append(z.encode_pair(tiny_tokenizer, long_context, " The end."))
    assert max(len(c) + len(k) for c, k in pairs) > tiny_model.config.max_position_embeddings + 1
    reference = [z.loglikelihood_reference(tiny_model, p) for p in pairs]
    for batch_size in (1, 5, 64):  # one row per batch, ragged batches, everything in one batch
        batched = z.loglikelihoods(tiny_model, pairs, batch_size=batch_size)
        # fp32 forward, sums of up to ~250 log-probabilities: agreement to ~1e-5 relative.
        assert batched == pytest.approx(reference, rel=1e-4, abs=1e-3), batch_size
    scored = z.score_items(tiny_model, tiny_tokenizer, items, batch_size=7)
    assert [ll for item in scored for ll in item] == pytest.approx(reference[:-1], rel=1e-4, abs=1e-3)


@pytest.mark.slow
def test_smollm2_beats_chance_on_a_few_dozen_items(smollm2_path, tmp_path, capsys):
    """SmolLM2-135M-Instruct (converted from a Q4_1 GGUF) through `glq eval --limit 40`."""
    from glq.cli.main import main

    out = tmp_path / "eval.json"
    rc = main(["eval", str(smollm2_path), "--tasks", "piqa,arc_easy,winogrande", "--limit", "40",
               "--device", "cpu", "--json", str(out)])
    assert rc == 0
    table = capsys.readouterr().out
    assert "| piqa" in table and "acc_norm" in table
    res = json.loads(out.read_text())["results"]
    assert {res[t]["n"] for t in res} == {40}
    # Chance is 0.5 (PIQA) and about 0.25 (ARC-Easy); 40 items give a standard error near
    # 0.08, so these bars sit about two errors above chance. WinoGrande at 135M parameters
    # is close to chance even on the full set, so it is only checked for sanity.
    assert res["piqa"]["acc"] >= 0.6, res["piqa"]
    assert res["arc_easy"]["acc"] >= 0.4, res["arc_easy"]
    assert 0.3 <= res["winogrande"]["acc"] <= 0.8, res["winogrande"]
