"""VisionZip: the authors' budget split and per-view algorithm, reproduced on LLaVA."""

from __future__ import annotations

import torch
from torch.testing import assert_close

import vtprune
from tests.helpers import make_batch, samples_for, tiny_model, visual_mask


def test_visionzip_budget_split_follows_the_authors():
    from vtprune.methods.visionzip import split_budget

    assert [split_budget(k) for k in (64, 128, 192)] == [(54, 10), (108, 20), (162, 30)]


def _visionzip_reference(attention, keys, hidden, dominant, contextual):
    """The authors' per-view algorithm on [T = 1 + N] tower tokens; returns {token: CLIP feature} (token -1 = [CLS])."""
    patches = attention[1:]
    top = patches.topk(dominant - 1).indices
    out = {-1: hidden[0]}
    for t in top.tolist():
        out[t] = hidden[1 + t]
    remaining = [t for t in range(len(patches)) if t not in set(top.tolist())]
    step = max(1, len(remaining) // contextual)
    targets = remaining[::step][:contextual]
    others = [t for t in remaining if t not in targets]
    normed = keys[1:] / keys[1:].norm(dim=-1, keepdim=True)
    joined = {t: [] for t in targets}
    for t in others:  # plain loop: each joins its most similar target
        similarity = [float(normed[t] @ normed[g]) for g in targets]
        joined[targets[max(range(len(targets)), key=lambda i: similarity[i])]].append(hidden[1 + t])
    for g in targets:
        out[g] = hidden[1 + g] + (torch.stack(joined[g]).mean(0) if joined[g] else 0)
    carrier = next(t for t in remaining if t not in targets)
    return out, carrier


def test_visionzip_matches_the_authors_algorithm_on_llava():
    model = tiny_model("llava")
    batch = make_batch(model, samples_for("llava")[:2])
    keep = 20  # 17 dominant (16 patches + [CLS]) + 3 contextual
    seen = {}
    spy = model.model.language_model.register_forward_pre_hook(
        lambda m, args, kwargs: seen.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True
    )
    with vtprune.wrap(model, "visionzip", keep=keep) as pruning:
        model(**batch)
    spy.remove()
    tower = model.model.vision_tower
    tower.set_attn_implementation("eager")
    keys = {}
    layer = tower.encoder.layers[1].self_attn  # penultimate of 3
    hook = layer.k_proj.register_forward_hook(lambda m, a, o: keys.setdefault("k", o))
    out = tower(batch["pixel_values"], output_hidden_states=True, output_attentions=True)
    hook.remove()
    attention = out.attentions[1].mean(1)[:, 0]  # head sum ranks like head mean
    head_keys = keys["k"].unflatten(-1, (layer.num_heads, -1)).mean(2)
    hidden = out.hidden_states[-2]
    index = pruning.last.output_index
    kept = pruning.last.stages[0].kept_per_item
    visual = visual_mask(batch)
    image = 0
    for b in range(2):
        positions = visual[b].nonzero().squeeze(1)  # prompt positions of this sample's image tokens
        for first in range(0, positions.numel(), 64):
            expected, carrier = _visionzip_reference(attention[image], head_keys[image], hidden[image], 17, 3)
            tokens = sorted(t for t in expected if t >= 0) + [carrier]
            assert kept[image].tolist() == sorted(tokens)
            # the LLM input at each kept slot is the projected feature the authors build for it
            for token in kept[image].tolist():
                feature = expected[-1] if token == carrier else expected[token]
                row = (index[b] == positions[first + token]).nonzero().item()
                projected = model.model.multi_modal_projector(feature)
                assert_close(seen["embeds"][b, row], projected, rtol=1e-4, atol=1e-5)
            image += 1
