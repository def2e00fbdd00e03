"""MMTok: greedy coverage, the coverage matrix, keywords, and a brute-force reference on LLaVA."""

from __future__ import annotations

import itertools
import math

import torch
from torch.testing import assert_close

import vtprune
from tests.helpers import Image, make_batch, samples_for, tiny_model, visual_mask
from vtprune.methods.mmtok import coverage_matrix, greedy_coverage, keywords


def _coverage_value(coverage: torch.Tensor, chosen: list[int]) -> float:
    return float(coverage[:, chosen].max(1).values.sum()) if chosen else 0.0


def test_greedy_gains_are_marginal_coverage_and_meet_the_submodular_bound():
    generator = torch.Generator().manual_seed(0)
    for _ in range(40):
        rows, n = int(torch.randint(3, 9, (1,), generator=generator)), int(torch.randint(3, 9, (1,), generator=generator))
        coverage = torch.rand(rows, n, generator=generator) ** 3
        k = min(3, n)
        picked = greedy_coverage(coverage, k).tolist()
        # every pick is the brute-force argmax of f(S + j) - f(S)
        for step in range(k):
            before = picked[:step]
            gains = [(_coverage_value(coverage, before + [j]) - _coverage_value(coverage, before)) if j not in before
                     else -1.0 for j in range(n)]
            assert math.isclose(gains[picked[step]], max(gains), rel_tol=1e-6, abs_tol=1e-7)
        best = max(_coverage_value(coverage, list(c)) for c in itertools.combinations(range(n), k))
        assert _coverage_value(coverage, picked) >= (1 - 1 / math.e) * best - 1e-7


def test_greedy_finds_the_exact_cover_when_rows_are_disjoint():
    # rows 0-1 only covered by token 4, rows 2-3 by token 1, row 4 by token 2: the optimum {4, 1, 2}
    coverage = torch.zeros(5, 6)
    coverage[0:2, 4], coverage[2:4, 1], coverage[4, 2] = 1.0, 0.9, 0.5
    coverage[:, 0] = 0.2
    assert greedy_coverage(coverage, 3).tolist() == [4, 1, 2]


def test_coverage_matrix_rows_are_scaled_distributions():
    text, vision, encoder = torch.randn(3, 8), torch.randn(5, 8), torch.randn(5, 4)
    coverage = coverage_matrix(text, vision, encoder, alpha=0.5, tau_tv=0.02, tau_vv=0.2)
    assert coverage.shape == (8, 5)
    assert_close(coverage[:3].sum(1), torch.full((3,), 1 / 3))
    assert_close(coverage[3:].sum(1), torch.full((5,), 0.5 / 5))


def test_keywords_follow_the_authors_filter():
    text = "\nWhat color is the cat on the sofa? Answer the question using a single word or phrase. ASSISTANT:"
    assert keywords(text) == ["color", "cat", "on", "sofa"]


def test_mmtok_matches_a_reference_on_llava():
    model = tiny_model("llava")
    batch = make_batch(model, samples_for("llava")[:2])
    keep = 6
    with vtprune.wrap(model, "mmtok", keep=keep) as pruning:
        model(**batch)
    vlm = model.model
    out = vlm.get_image_features(pixel_values=batch["pixel_values"], output_hidden_states=True)
    encoder = out.hidden_states[-2][:, 1:]
    embed = vlm.get_input_embeddings()
    visual = visual_mask(batch)
    kept = iter(pruning.last.stages[0].kept_per_item)
    image = 0
    for b in range(2):
        real = batch["attention_mask"][b].bool()
        last_visual = int(visual[b].nonzero().max())
        instruction = batch["input_ids"][b, last_visual + 1 :][real[last_visual + 1 :]]
        text = embed(instruction)
        for _ in range(int(visual[b].sum()) // 64):
            coverage = coverage_matrix(text, out.pooler_output[image], encoder[image], 0.5, 0.02, 0.2)
            chosen = []
            for _ in range(keep):  # plain brute-force greedy
                gains = [(_coverage_value(coverage, chosen + [j]) - _coverage_value(coverage, chosen))
                         if j not in chosen else -1.0 for j in range(64)]
                chosen.append(max(range(64), key=lambda j: gains[j]))
            assert next(kept).tolist() == sorted(chosen)
            image += 1


def test_mmtok_reads_the_question_words_with_a_tokenizer():
    class WordTokenizer:  # a tiny word-level tokenizer: id = position in its vocabulary
        vocab = ["<pad>", "what", "color", "is", "the", "cat", "?", "assistant", ":"]

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(self.vocab[i] for i in ids)

        def __call__(self, words, is_split_into_words=True, add_special_tokens=False, return_tensors="pt"):
            return {"input_ids": torch.tensor([[self.vocab.index(w) for w in words]])}

    model = tiny_model("llava")
    batch = make_batch(model, [[3, Image(), 8]])
    batch["input_ids"][0, -8:] = torch.arange(1, 9)  # "what color is the cat ? assistant :"
    captured = {}
    original = vtprune.MMTok.question

    def spy(self, ctx, sample):
        captured[sample] = original(self, ctx, sample)
        return captured[sample]

    vtprune.MMTok.question = spy
    try:
        with vtprune.wrap(model, "mmtok", keep=4, tokenizer=WordTokenizer()):
            model(**batch)
    finally:
        vtprune.MMTok.question = original
    embed = model.model.get_input_embeddings()
    assert_close(captured[0], embed(torch.tensor([2, 5])))  # "color", "cat"
