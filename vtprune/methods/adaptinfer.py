"""AdaptInfer — Zhang, Zhu, Li, Tao, Liu, Liu, "AdaptInfer: Adaptive Token Pruning for Vision-Language Model Inference
with Dynamical Text Guidance" (arXiv 2508.06084, submitted to ICLR 2026), https://github.com/weiczh02/AdaptInfer-base
(``llava/model/language_model/score.py::attn_postprocess_topk_with_t2t_weighting``, ``modelling_sparse_llama.py``;
the Qwen2-VL port ``qwen2_vl/pruning.py::select_visual_tokens``).

Text-guided progressive pruning inside the LLM. At each pruning layer l (0-based; the authors' LLaVA-1.5-7B
``pruning_loc`` 1 / 10 / 20 of 32, scaled to other depths), from layer l's attention probabilities ``A_h`` (per head
h) over the instruction's text tokens T (every token after the image: the question and the answer template):

1. text prior, per head: ``S_h = A_h[T, T] + A_h[T, T]^T - diag(A_h[T, T])`` and ``w_h[t] = sum_i S_h[i, t]``, i.e.
   the attention text token t receives from the text plus the attention it pays to the text (its own counted once);
   unnormalised, as in the authors' code;
2. vision score ``s[v] = sum_h sum_t w_h[t] * A_h[t, v]``: text->vision attention weighted per head by the prior;
3. each image keeps its top-k tokens by ``s``; layer l's output (the input of layer l + 1) is pruned.

The rows are recomputed from layer l's captured queries and keys for just the instruction rows
(``ctx.attention_rows(..., per_head=True)``), so the model runs with SDPA / FlashAttention throughout; the authors
materialise the full eager map at those layers. Positions are renumbered contiguously, as the authors' truncated
``position_ids`` do.

:func:`vtprune.eval.inflection.find_inflection_layers` is the offline analysis the schedule comes from (the authors'
``prepocess.py``): per decoder layer the same weighted score over the visual tokens; for the most attended tokens, the
layer after which each one's cumulative score changes regime (one least-squares change point, as their ruptures
``Binseg``); the most frequent such layers are the inflection layers. It also reports the Jensen-Shannon shift between
consecutive layers.

The prior follows the authors' code (LLaVA ``score.py`` and the Qwen2-VL ``pruning.py``; the Qwen port also has an
ablation switch, ``disable_t2t_prior``, that drops it). A paper-level reading, "the last token's attention over the
instruction, head-averaged and normalised, as weights", is not what the code computes: here the weights are per head,
from every instruction row and column, and unnormalised (normalising would only scale a sample's scores).

Choices that are ours (the paper and code leave them open, or we deviate), stated so results can be compared:

* Budget schedule. The authors' LLaVA tables give counts per stage in their average-token accounting (128: 290 / 72
  / 18, 64: 133 / 27 / 3, 48: 80 / 24 / 2; Qwen2-VL: ratios of the current count per stage, e.g. 0.5 / 0.6 / 0.3).
  Here ``keep`` is the final count (or, with ``budget="average"``, vtprune's average accounting) and each earlier
  stage keeps ``ratio`` (4) times the next: 16 / 4 / 1 x keep, the shape of the authors' 128 profile (290 / 72 / 18 ~
  16 : 4 : 1), so ``keep=18`` gives 288 / 72 / 18. Their 64 / 48 profiles end at 3 / 2 tokens, too steep to be a
  fixed shape for every budget.
* Default layers: the authors' LLaVA schedule (1, 10, 20 of 32) scaled for every family; their Qwen2-VL-2B port uses
  (0, 9, 19) of 28 (pass ``layers=(0, 9, 19)``). The paper calls these "inflection locations" but does not list
  them; :func:`vtprune.eval.inflection.find_inflection_layers` measures candidates on a given model.
* Scores and top-k per sample and per image (the authors' code is batch-1, one image: ``mask[0]``); the text rows
  are the tokens after the sample's last image (text between two images does not rate them).
* The authors' ``k = min(count, tokens - 1)`` always drops at least one token; here a budget at least the image's
  size keeps it whole (``keep=1.0`` equals the unpruned model).
* Heads are summed in fp32 (the authors' fp16); the ranking is the same up to rounding. The per-head rows of a stage
  are held at once, ``[B, heads, R, L]`` fp32 for R instruction tokens (about 6 MB for LLaVA-1.5-7B with a 50-token
  question), instead of the authors' full ``L x L`` map.
* Token recycling (SparseVLM's merge, ``s_flag``) is off in the authors' code and not implemented.

Families: every family vtprune can prune inside (the signal is the LLM's own attention). Qwen3.5 is refused with
the default layers, which fall on its linear-attention (Gated DeltaNet) layers that have no attention map to read
(as PyramidDrop / FastV / SparseVLM); ``layers`` naming its full-attention layers (e.g. from
:func:`vtprune.eval.inflection.find_inflection_layers`, which measures only those) work.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vtprune.core.budget import Keep
from vtprune.core.context import PruneContext
from vtprune.core.registry import Method, ModelInfo, Stage, register_method
from vtprune.core.signals import query_slots

AUTHORS_LAYERS, REFERENCE_DEPTH = (1, 10, 20), 32
DEFAULT_RATIO = 4.0


def text_prior(text_attention: Tensor) -> Tensor:
    """The authors' text-token importance per head: ``[..., T, T]`` text->text attention (rows: queries) to
    ``[..., T]``, the symmetrised map ``A + A^T - diag(A)`` summed over its rows (received + paid - self)."""
    diagonal = torch.diagonal(text_attention, dim1=-2, dim2=-1)
    return text_attention.sum(-2) + text_attention.sum(-1) - diagonal


def weighted_vision_scores(attention: Tensor, rows: Tensor, real: Tensor) -> Tensor:
    """Per sample, ``sum_h sum_t w_h[t] * A_h[t, slot]`` for every slot, ``[B, L]``.

    ``attention [B, heads, R, L]`` holds the probabilities of the text rows at slots ``rows [B, R]`` (``real``
    marks the rows that exist; their rows are zero otherwise); ``w`` is :func:`text_prior` of the text->text block.
    """
    batch, heads, count, _ = attention.shape
    columns = rows[:, None, None, :].expand(batch, heads, count, count)
    text = attention.gather(-1, columns) * real[:, None, None, :].to(attention.dtype)
    prior = text_prior(text) * real[:, None, :].to(attention.dtype)  # [B, heads, R]
    return torch.einsum("bhr,bhrl->bl", prior, attention)


@register_method
@dataclass
class AdaptInfer(Method):
    """Prune after ``layers`` (0-based; default 1/10/20 of 32, scaled) by text-prior-weighted text->vision attention."""

    name = "adaptinfer"
    summary = "text->vision attention weighted by a text->text prior, after layers 1 / 10 / 20 of 32"
    paper = "Zhang et al., arXiv 2508.06084 (weiczh02/AdaptInfer-base)"

    layers: tuple[int, ...] | None = None
    ratio: float = DEFAULT_RATIO
    positions: str = "renumber"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layers is not None:
            self.layers = tuple(self.layers)
            if not self.layers:
                raise ValueError(f"{self.name}: layers must name at least one decoder layer, got ()")
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not self.ratio >= 1:
            raise ValueError(
                f"{self.name}: ratio must be a number >= 1 (each stage keeps ratio x the next), got {self.ratio!r}"
            )

    def stages(self, model: ModelInfo, keep: Keep) -> list[Stage]:
        layers = model.output_pruned_layers(self.name, self.layers, AUTHORS_LAYERS, REFERENCE_DEPTH)
        count = len(layers)
        # scored with layer l's own attention and dropped from its output = at the input of layer l + 1, from l's Q/K
        return [
            Stage(layer=layer + 1, scale=float(self.ratio) ** (count - 1 - i), attention_from=layer)
            for i, layer in enumerate(layers)
        ]

    def score(self, ctx: PruneContext) -> list[Tensor]:
        """Per image, :func:`weighted_vision_scores` of its tokens, from layer ``attention_from``'s per-head attention
        rows of the sample's instruction (the text after its last image)."""
        rows, real = query_slots(ctx.layout, "instruction")
        return ctx.per_item(weighted_vision_scores(ctx.attention_rows(rows, real, per_head=True), rows, real))
