"""VTC-CLS, FasterVLM, EntropyPrune, TransPrune, MMTok: defining behaviour on hand-made inputs, and a reference
written here from the spec (eager attention maps, plain loops) that must select exactly what the method selects."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import vtprune
from tests.helpers import Image, make_batch, samples_for, tiny_model, visual_mask, with_positions
from vtprune.core.budget import stage_budgets
from vtprune.core.context import ItemView, PruneContext
from vtprune.core.layout import Layout, VisualItem
from vtprune.core.registry import ModelInfo, Stage
from vtprune.eval.collapse import find_collapse_layer
from vtprune.methods.entropyprune import token_matrix_entropy
from vtprune.methods.mmtok import coverage_matrix, greedy_coverage, keywords
from vtprune.methods.transprune import transition_variation

LLAVA = ModelInfo(family="llava", num_layers=32, has_cls_token=True, mrope=False, vision_layers=24, vision_feature_layer=22)
QWEN = ModelInfo(family="qwen_vl", num_layers=28, has_cls_token=False, mrope=True, family_name="Qwen2-VL / Qwen2.5-VL")


def _single_item_context(n: int, budget: int, stage: Stage, **view_fields) -> PruneContext:
    item = VisualItem(0, 0, "image", n, 0)
    view = ItemView(item, 0, torch.arange(n), torch.arange(n), torch.ones(n, dtype=torch.bool), budget, **view_fields)
    layout = Layout(
        token=torch.arange(n)[None],
        valid=torch.ones(1, n, dtype=torch.bool),
        item=torch.zeros(1, n, dtype=torch.long),
        item_token=torch.arange(n)[None],
        positions=torch.arange(n)[None],
        shift=torch.zeros(1, dtype=torch.long),
        first_layer=0,
    )
    return PruneContext(stage=stage, model=LLAVA, layout=layout, items=[view])


# -- VTC-CLS / FasterVLM -------------------------------------------------------------------------------------------


def test_vtc_cls_sums_the_cls_rows_of_its_layers():
    # layer 1 alone favours tokens 0 and 1, layer 2 alone token 3; the sum favours 1 and 3
    rows = torch.tensor([[0.40, 0.30, 0.00, 0.05, 0.25], [0.00, 0.25, 0.10, 0.60, 0.05]])
    ctx = _single_item_context(5, 2, Stage(layer=None, vision_layers=(21, 22)), cls_attention=rows)
    assert sorted(vtprune.VTCCLS().select(ctx)[0].tolist()) == [1, 3]


def test_vtc_cls_default_layers_follow_the_repository():
    stage = vtprune.VTCCLS().stages(LLAVA, 64)[0]
    assert stage.layer is None and stage.vision_layers == tuple(range(16, 23))  # attentions[16:-1] of 24
    assert vtprune.VTCCLS(start_layer=20).stages(LLAVA, 64)[0].vision_layers == (20, 21, 22)
    with pytest.raises(ValueError, match=r"start_layer=23 must lie in \[0, 22\]"):
        vtprune.VTCCLS(start_layer=23).stages(LLAVA, 64)


def test_fastervlm_keeps_its_budget_in_every_view():
    rows = torch.tensor([[0.9, 0.8, 0.7, 0.1, 0.2, 0.3, 0.05]])
    groups = torch.tensor([0, 0, 0, 1, 1, 1, -1])  # two views and a newline
    selectable = groups >= 0
    item = VisualItem(0, 0, "image", 7, 0, structural=~selectable)
    view = ItemView(item, 0, torch.arange(7), torch.arange(7), selectable, 4, cls_attention=rows, groups=groups,
                    group_budgets={0: 2, 1: 2})
    ctx = _single_item_context(7, 4, Stage(layer=None, per_crop=True, vision_layers=(22,)))
    ctx.items = [view]
    assert sorted(vtprune.FasterVLM().select(ctx)[0].tolist()) == [0, 1, 4, 5]  # top 2 of each view, not top 4


@pytest.mark.parametrize("method", ["vtc_cls", "fastervlm"])
def test_cls_methods_refuse_towers_without_cls(method):
    with pytest.raises(ValueError, match=r"Qwen2-VL / Qwen2.5-VL towers have no \[CLS\] token; methods that apply"):
        vtprune.method_class(method)().stages(QWEN, 64)
    model = tiny_model("qwen2_vl")
    with pytest.raises(ValueError, match=r"no \[CLS\] token.*fastv.*mmtok"):
        vtprune.wrap(model, method, keep=4)


def _tower_cls_attention(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Head-averaged [CLS] rows of every tower layer from eager attention maps, [layers, views, T]."""
    tower = model.model.vision_tower
    tower.set_attn_implementation("eager")
    attentions = tower(pixel_values, output_attentions=True).attentions
    return torch.stack([a.mean(1)[:, 0] for a in attentions])


def test_vtc_cls_matches_a_reference_from_eager_attention_maps():
    model = tiny_model("llava")
    batch = make_batch(model, samples_for("llava")[:2])
    keep = 7
    with vtprune.wrap(model, "vtc_cls", keep=keep, start_layer=0) as pruning:
        model(**batch)
    cls = _tower_cls_attention(model, batch["pixel_values"])  # [3 layers, 3 images, 65]
    scores = cls[0:2, :, 1:].sum(0)  # layers start..penultimate (feature layer -2 of 3), patches only
    for image, kept in enumerate(pruning.last.stages[0].kept_per_item):
        assert torch.equal(kept, scores[image].topk(keep).indices.sort().values)


def test_fastervlm_matches_a_per_view_reference_on_llava_next():
    model = tiny_model("llava_next")
    batch = make_batch(model, [[2, Image((32, 48)), 3], [1, Image((64, 64)), 2]])
    keep = 5
    with vtprune.wrap(model, "fastervlm", keep=keep) as pruning:
        model(**batch)
    vlm = model.model
    pixels = torch.cat([batch["pixel_values"][0, :3], batch["pixel_values"][1, :5]])  # each image's real views
    cls = _tower_cls_attention(model, pixels)[1]  # penultimate layer, [8 views, 65]
    features = vlm.get_image_features(batch["pixel_values"], batch["image_sizes"], output_hidden_states=True)
    encoder = vlm.vision_tower(pixels, output_hidden_states=True).hidden_states[-2]
    projected = vlm.multi_modal_projector(encoder[:, 1:])  # [views, 64, D]
    first_view = [0, 3]
    for image, (packed, kept) in enumerate(zip(features.pooler_output, pruning.last.stages[0].kept_per_item)):
        # find every packed token's view and patch by brute-force matching its feature vector
        owner = {}
        for token, vector in enumerate(packed):
            match = (projected == vector).all(-1).nonzero()
            if len(match):
                owner[token] = (int(match[0, 0]), int(match[0, 1]))
        expected = set(t for t in range(len(packed)) if t not in owner)  # newlines
        views = sorted({v for v, _ in owner.values()})
        assert views == list(range(first_view[image], first_view[image] + len(views)))
        for view in views:
            mine = [t for t, (v, _) in owner.items() if v == view]
            scores = torch.tensor([float(cls[view, 1 + owner[t][1]]) for t in mine])
            expected |= {mine[i] for i in scores.topk(min(keep, len(mine))).indices.tolist()}
        assert kept.tolist() == sorted(expected)


# -- EntropyPrune -------------------------------------------------------------------------------------------------


def test_dual_gram_entropy_equals_the_covariance_spectrum_entropy():
    torch.manual_seed(0)
    queries = torch.randn(5, 32, 128)  # 5 tokens, 32 heads x 128 dims, as LLaVA-1.5-7B
    centred = queries.double() - queries.double().mean(dim=-2, keepdim=True)
    covariance = centred.transpose(-1, -2) @ centred / 32  # [128, 128]
    eigenvalues = torch.linalg.eigvalsh(covariance).clamp_min(1e-10)
    top = eigenvalues.sort(descending=True).values[..., :32]  # the 32 non-zero ones (rank <= heads)
    expected = -(top * top.log()).sum(-1) / math.log(32)
    assert_close(token_matrix_entropy(queries), expected, rtol=1e-6, atol=1e-6)


def test_entropy_is_highest_for_spread_out_queries():
    flat = torch.zeros(1, 8, 16)
    flat[0, :, 0] = 1.0  # every head identical: no variance, minimal entropy
    spread = torch.eye(16)[None, :8] * 0.5  # heads orthogonal: a flat spectrum of 7 eigenvalues 0.25 / 8
    entropy = token_matrix_entropy(torch.cat([flat, spread]))
    assert entropy[0] < 1e-6
    assert_close(entropy[1], torch.tensor(-7 * (0.25 / 8) * math.log(0.25 / 8) / math.log(8), dtype=torch.float64))


def test_entropyprune_defaults_and_average_budget():
    assert vtprune.EntropyPrune().stages(LLAVA, 64) == [Stage(layer=2, states_from=1)]
    assert vtprune.EntropyPrune().stages(QWEN, 64) == [Stage(layer=1, states_from=0)]
    # the authors' save_num = int((L * avg - K * N) / (L - K)) on LLaVA-1.5-7B
    assert [stage_budgets(avg, 576, [(2, 1.0)], 32, "average")[0] for avg in (192, 128, 64)] == [166, 98, 29]


def test_entropyprune_average_budget_end_to_end():
    model = tiny_model("llava")  # 4 layers, 64 tokens per image
    batch = make_batch(model, samples_for("llava")[:1])
    with vtprune.wrap(model, "entropyprune", keep=40, budget="average") as pruning:
        model(**batch)
    assert pruning.last.stages[0].kept_per_item[0].numel() == (4 * 40 - 2 * 64) // 2
    assert pruning.config()["budget"] == "average" and pruning.last.budget == "average"


def _query_states_reference(model, batch, layer: int) -> torch.Tensor:
    """Layer `layer`'s query states after RoPE, recomputed from the dense model's hidden states, [B, L, H, d]."""
    lm = model.model.language_model
    hidden = model(**batch, output_hidden_states=True).hidden_states[layer]
    decoder = lm.layers[layer]
    attn = decoder.self_attn
    q = attn.q_proj(decoder.input_layernorm(hidden)).view(*hidden.shape[:2], -1, attn.head_dim)
    positions = batch["position_ids"]
    cos, sin = lm.rotary_emb(hidden, positions)
    rotated = torch.cat([-q[..., attn.head_dim // 2 :], q[..., : attn.head_dim // 2]], -1)
    return q * cos[:, :, None] + rotated * sin[:, :, None]


def test_entropyprune_matches_a_covariance_reference():
    model = tiny_model("llava")
    batch = with_positions(model, make_batch(model, samples_for("llava")[:2]))
    keep = 9
    with vtprune.wrap(model, "entropyprune", keep=keep) as pruning:
        model(**batch)
    queries = _query_states_reference(model, batch, layer=1).double()  # states of layer K - 1 = 1
    visual = visual_mask(batch)
    kept = iter(pruning.last.stages[0].kept_per_item)
    for sample in range(2):
        for image in queries[sample][visual[sample]].split(64):
            entropies = []
            for token in image:  # plain loop, through the head_dim x head_dim covariance
                centred = token - token.mean(0, keepdim=True)
                spectrum = torch.linalg.eigvalsh(centred.T @ centred / token.shape[0]).clamp_min(1e-10)
                spectrum = spectrum.sort(descending=True).values[: token.shape[0]]
                entropies.append(float(-(spectrum * spectrum.log()).sum() / math.log(token.shape[0])))
            expected = torch.tensor(entropies).topk(keep).indices.sort().values
            assert torch.equal(next(kept), expected)


def test_find_collapse_layer_reports_and_plots(tmp_path):
    model = tiny_model("llava")
    batch = make_batch(model, samples_for("llava")[:2])
    model(**batch)  # transformers installs its own output-capturing hooks on first use
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    report = find_collapse_layer(model, batch, plot=tmp_path / "entropy.png")
    assert len(report.entropy) == 4 and 1 <= report.collapse_layer < 4
    drops = [report.entropy[i - 1] - report.entropy[i] for i in range(1, 4)]
    assert report.collapse_layer == 1 + max(range(3), key=lambda i: drops[i])
    assert report.plot.exists() and report.plot.stat().st_size > 1000
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks


# -- TransPrune ---------------------------------------------------------------------------------------------------


def test_transition_variation_norm_ratio_and_softmax():
    x = torch.randn(2, 5, 8)
    y = 2 * x  # same direction: 1 - cos = 0 for every token -> uniform softmax; norm ratio 2
    valid = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]], dtype=torch.bool)
    ttv = transition_variation(x, y, valid)
    assert ttv.shape == (2, 5)
    assert_close(ttv[0], torch.full((5,), 2 / 5))
    assert_close(ttv[1], torch.tensor([0.0, 0.5, 0.5, 0.5, 0.5]))  # padding excluded from the softmax
    z = y.clone()
    z[0, 2] = -z[0, 2]  # a token that turns around changes most
    assert int(transition_variation(x, z, valid)[0].argmax()) == 2


def test_transprune_schedule_on_32_layers_and_scaled():
    stages = vtprune.TransPrune().stages(LLAVA, 72)
    assert [s.layer for s in stages] == [7, 9, 12]
    assert all(s.attention_from == s.layer and s.query == "instruction" for s in stages)
    budgets = stage_budgets(72, 576, [(s.layer, s.scale) for s in stages], 32)
    assert budgets == [504, 360, 72]  # 576 -> 504 -> 360 -> 72
    assert stage_budgets(0.125, 576, [(s.layer, s.scale) for s in stages], 32) == [504, 360, 72]
    assert vtprune.TransPrune().observed_layers(LLAVA) == tuple(range(6, 12))  # layers 7..12, 1-based
    tiny = ModelInfo(family="llava", num_layers=4, has_cls_token=True, mrope=False)
    assert tiny.scale_layers((7, 9, 12)) == [1, 2, 3]
    assert LLAVA.scale_layers((7, 9, 12)) == [7, 9, 12]
    assert [s.attention_from for s in vtprune.TransPrune(ttv_only=True).stages(LLAVA, 72)] == [None] * 3


def test_transprune_matches_a_reference_from_dense_internals():
    """One stage after layer 2 (1-based): TTV of layers 1-2 plus instruction attention of layer index 2."""
    model = tiny_model("llava", attn_implementation="eager")
    batch = with_positions(model, make_batch(model, samples_for("llava")[:2], padding_side="right"))
    layers = model.model.language_model.layers
    transitions = []

    def record(module, args, kwargs, output):
        x = args[0] if args else kwargs["hidden_states"]
        transitions.append((x, output[0] if isinstance(output, tuple) else output))

    hooks = [m.register_forward_hook(record, with_kwargs=True) for i in (0, 1) for m in (layers[i].self_attn, layers[i].mlp)]
    dense = model(**batch, output_attentions=True)
    for hook in hooks:
        hook.remove()
    mask = batch["attention_mask"].bool()
    ttv = torch.zeros(mask.shape)
    for x, y in transitions:  # plain per-sample loops
        for b in range(2):
            real = mask[b]
            ratio = y[b, real].norm(dim=-1) / x[b, real].norm(dim=-1)
            change = 1 - F.cosine_similarity(x[b, real], y[b, real], dim=-1)
            ttv[b, real] += ratio * change.exp() / change.exp().sum()
    attention = dense.attentions[2].mean(1)  # layer index 2 sees the unpruned sequence
    visual = visual_mask(batch)
    keep = 6
    with vtprune.wrap(model, "transprune", keep=keep, prune_layers=(2,), ratios=(0.25,), accumulate_from=1) as pruning:
        model(**batch)
    kept = iter(pruning.last.stages[0].kept_per_item)
    for b in range(2):
        positions = visual[b].nonzero().squeeze(1)
        instruction = [p for p in range(int(positions.max()) + 1, int(mask[b].sum()))]
        iga = attention[b, instruction][:, positions].mean(0)
        for image in range(len(positions) // 64):
            span = slice(64 * image, 64 * (image + 1))
            t, a = ttv[b, positions[span]], iga[span]
            score = t / (t.sum() + 1e-8) + a / (a.sum() + 1e-8)
            assert torch.equal(next(kept), score.topk(keep).indices.sort().values)


# -- MMTok --------------------------------------------------------------------------------------------------------


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
