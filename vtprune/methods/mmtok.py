"""MMTok — "MMTok: Multimodal Coverage Maximization for Efficient Inference of VLMs" (arXiv 2508.18264, ICLR 2026),
https://github.com/Ironieser/MMTok.

Before the LLM, each image (each view on LLaVA-NeXT) keeps the set S of tokens that best *covers* both the question
and the image: greedy maximisation of the submodular coverage ``f(S) = sum_r max_{j in S} C[r, j]`` over the rows of

    C = [ softmax(Z X^T / tau_tv) / m ;  alpha * softmax(Xc Xc^T / tau_vv) / n ]

with X the image's projected tokens (LLM input space), Xc the same tokens before the projector (CLIP space; on Qwen
the pre-merger ViT output averaged over each merged group), Z the LLM input embeddings of the question's words, all
rows L2-normalised; tau_tv = 0.02, tau_vv = 0.2, alpha = 0.5 (the authors' ``mmtok()`` defaults). The greedy is
vectorised over candidates (one step per kept token) and has the (1 - 1/e) guarantee. Kept tokens keep their order;
M-RoPE positions on Qwen are sliced from the full prompt.

The question: with a ``tokenizer`` passed to ``vtprune.wrap``, the instruction text after the image is decoded, the
chat template and LLaVA's evaluation suffixes are removed and the authors' stop words filtered out, and the remaining
words are re-tokenised and embedded (the authors' text processor). Without a tokenizer every instruction token's
embedding is used. All families.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from vtprune.core.budget import Keep
from vtprune.core.context import PruneContext
from vtprune.core.registry import Method, ModelInfo, Stage, register_method

# The authors' VQATextProcessor: stop words with little visual content and LLaVA's evaluation suffixes.
NON_VISUAL_WORDS = {
    "a", "an", "the", "is", "are", "was", "were", "be", "been", "being", "have", "has", "had", "do", "does", "did",
    "it", "they", "he", "she", "we", "you", "i", "what", "where", "when", "why", "how", "who", "which",
    "and", "or", "but", "so", "if", "then", "question", "answer",
    "to", "for", "with", "by", "from", "at", "into", "onto", "upon",
}  # fmt: skip
EVAL_SUFFIXES = (
    "Answer the question using a single word or phrase.",
    "Answer with the option's letter from the given choices directly.",
)
# Chat-template words that follow the question in the prompt (our addition: the authors capture the bare question).
TEMPLATE_WORDS = {"assistant", "user", "system", "inst"}
WORD = re.compile(r"\b\w+\b")


def keywords(text: str) -> list[str]:
    """The question's content words, as the authors' ``extract_keywords_simple`` (plus chat-template words)."""
    for suffix in EVAL_SUFFIXES:
        text = text.replace(suffix, "")
    words = WORD.findall(text)
    kept = [w for w in words if w.lower() not in NON_VISUAL_WORDS | TEMPLATE_WORDS]
    return kept or words


def coverage_matrix(
    text: Tensor, vision: Tensor, vision_encoder: Tensor, alpha: float, tau_tv: float, tau_vv: float
) -> Tensor:
    """C = [P; alpha Q], ``[(m + n), n]``: how well each candidate token covers each text row and each image token."""
    z, x, xc = (F.normalize(t.float(), dim=-1) for t in (text, vision, vision_encoder))
    parts = []
    if z.shape[0]:
        parts.append(torch.softmax(z @ x.T / tau_tv, dim=1) / z.shape[0])
    parts.append(alpha * torch.softmax(xc @ xc.T / tau_vv, dim=1) / xc.shape[0])
    return torch.cat(parts)


def greedy_coverage(coverage: Tensor, count: int) -> Tensor:
    """Greedy maximum coverage: ``count`` columns, each maximising the gain ``f(S + j) - f(S)``; returns the columns
    in the order they were picked.

    Vectorised over candidates; the gains of all candidates are updated incrementally, only over the rows whose best
    cover the last pick improved (in float64, so the running gains do not drift from the exact ones).
    """
    coverage = coverage.double()
    rows, candidates = coverage.shape
    columns = coverage.T.contiguous()  # a pick's column as one contiguous row: read at every step
    best = coverage.new_zeros(rows)
    gains = coverage.clamp(min=0).sum(0)
    picked = []
    # The loop is sequential, so its cost is the number of tensor ops per step: a picked column's gain is set to
    # -inf once (no mask of available columns rebuilt per step) and the improved rows are gathered by index.
    for _ in range(min(count, candidates)):
        choice = int(gains.argmax())
        picked.append(choice)
        column = columns[choice]
        improved = (column > best).nonzero().squeeze(1)
        changed = coverage.index_select(0, improved)
        old, new = best[improved, None], column[improved, None]
        gains -= (changed - old).clamp_(min=0).sum(0) - (changed - new).clamp_(min=0).sum(0)
        gains[choice] = float("-inf")
        best = torch.maximum(best, column)
    return torch.tensor(picked, dtype=torch.long, device=coverage.device)


@register_method
@dataclass
class MMTok(Method):
    """Keep each image's (view's) tokens that greedily maximise the coverage of question and image."""

    name = "mmtok"
    summary = "greedy coverage of question words (LLM embeddings) and image tokens (encoder features)"
    paper = "ICLR 2026, arXiv 2508.18264 (Ironieser/MMTok)"

    alpha: float = 0.5
    tau_tv: float = 0.02
    tau_vv: float = 0.2
    positions: str = "renumber"

    def count_known_early(self) -> bool:
        return True

    def stages(self, model: ModelInfo, keep: Keep) -> list[Stage]:
        return [Stage(layer=None, per_crop=True, encoder_features=True, text_embeddings=True)]

    def select(self, ctx: PruneContext) -> list[Tensor]:
        texts = [self.question(ctx, sample) for sample in range(ctx.layout.batch_size)]
        selections = []
        for view in ctx.items:
            text = texts[view.sample]
            encoder = view.encoder_features if view.encoder_features is not None else view.features
            chosen = []
            for members, budget in view.budget_groups():
                if budget == 0:
                    continue
                coverage = coverage_matrix(
                    text, view.features[members], encoder[members], self.alpha, self.tau_tv, self.tau_vv
                )
                chosen.append(members[greedy_coverage(coverage, budget)])
            selections.append(torch.cat(chosen) if chosen else view.tokens.new_zeros(0))
        return selections

    def question(self, ctx: PruneContext, sample: int) -> Tensor:
        """Embeddings of sample's question words (or of all its instruction tokens without a tokenizer)."""
        embeddings = ctx.instruction_embeddings[sample]
        tokenizer = ctx.tokenizer
        if tokenizer is None or ctx.instruction_ids is None or ctx.embed is None:
            return embeddings
        text = tokenizer.decode(ctx.instruction_ids[sample].tolist(), skip_special_tokens=True)
        words = keywords(text)
        if not words:
            return embeddings[:0]
        ids = tokenizer(words, is_split_into_words=True, add_special_tokens=False, return_tensors="pt")["input_ids"]
        return ctx.embed(ids[0].to(embeddings.device))
