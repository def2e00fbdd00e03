"""Train the embedded model: a tiny LLaVA (CLIP-style tower with [CLS], MLP projector, Llama decoder) that answers
questions about grids of real handwritten digits (:mod:`vtprune.data.digit_grids`), on a CPU.

    python -m vtprune.embedded.train [--out vtprune/embedded/digits-llava] [--seed 0] [--threads 2]

Each image comes with a dialogue of 12 questions (the first exactly as evaluation asks it), so one image pass
supervises many answers. The recipe splits the work so that every step is one the models learn quickly:

1. The tower alone (``tower_steps``, a tenth of an LLM step each) learns, on the layer LLaVA feeds to the
   projector, per patch: its cell's digit, how often that digit occurs in the image and the digit to its left;
   and on [CLS] and every patch which digits appear anywhere (CLIP's [CLS] job, so [CLS]-attention pruners have
   a real signal).
   Counting and looking left are thus done in the tower, where they take a couple of thousand cheap steps.
2. For the first ``symbolic_steps`` the LLM reads the grid as words: each image token is replaced by its cell's
   digit word plus directions for its row, column, count, left neighbour and the digits present. Every question
   is then one lookup
   (by digit or by place) followed by reading a feature off the token found. Meanwhile the projector learns to
   land on exactly those embeddings (read-out heads whose weights are the directions, and a regression).
3. Then the LLM reads the projected tokens, all trained end to end with the auxiliary losses kept on; half the
   sequences lose a random share of their image tokens, half of those with positions renumbered (gaps closed) and
   half with the original ones, the two conventions pruning methods use (:func:`drop_image_tokens`).

Throughout, each question's answering token must name what the question asks about (a cell question's row and
column, the others' digit) after two LLM layers (the *parse* loss, linear read-outs). This is what made an
8-layer LLM learn the lookups in budget: without it, lookup by place stayed near chance (cell 0.32 held-out after
1,300 steps); with it for cell questions only, cell reached 0.98 but count and existence stayed at chance by step
1,000; with it for every type, all four passed 0.93 on the training turns by step 650. It also means a cell's place
is known only from layer 2 on, so the LLM reads the image there and after, as pruning at layer 2 should find.

The loop knows a model family only through :class:`Family` (:data:`LLAVA` here; the Qwen2-VL twin's in
:mod:`vtprune.embedded.train_qwen`): where the tower, its read layer and the projector are, how the tower orders
its patches, what the positions are.

The run is seeded (data, initialisation, order; results also depend on the thread count, recorded); it writes
safetensors weights, config, tokenizer, processor and ``training.json`` (recipe, time, held-out accuracy), so
``from_pretrained(path)`` + ``AutoProcessor.from_pretrained(path)`` work offline like any checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from vtprune.data.digit_grids import (
    PLACE_WORDS,
    QUESTION_TYPES,
    GridSpec,
    ask,
    generate,
    labels_of,
    render,
)

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "digits-llava"
IMAGE_SIZE, PATCH = 64, 8  # 8 x 8 = 64 visual tokens; each 16 px cell covers 2 x 2 patches
IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2
POST_PROMPT = "\nAnswer the question using a single word or phrase."
# Llama's default 0.02 leaves a 192-wide model's attention uniform for hundreds of steps (q.k ~ 0); ~1/sqrt(width)
# gets the question-to-image lookups learning at once.
INIT_STD = 0.07
GRID = GridSpec()  # the grids trained on: 4 x 4 cells of 16 px
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
    " {% else %}ASSISTANT: {% for c in m['content'] %}{{ c['text'] }}{% endfor %}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def vocabulary() -> list[str]:
    """Every word the task's prompts and answers use (split as the tokenizer's pre-tokenizer splits them)."""
    words = ["USER", ":", "ASSISTANT", "?", ".", "yes", "no", "none"]
    words += "what digit is in row column how many are there a which left of the".split() + list(PLACE_WORDS)
    words += "Answer question using single word or phrase".split()
    words += ["read", "grid"]  # the reading task used in training
    # "7s" is read as "7" "s", so the count question names its digit with the same token as the image's digit word
    words += [str(d) for d in range(17)] + ["s"]
    return SPECIALS + list(dict.fromkeys(words))


def word_tokenizer(words: list[str], extra_special_tokens: dict[str, str]) -> Any:
    """A word-level tokenizer over ``words`` (ids in that order; numbers kept whole, split from letters), with the
    task's pad / bos / eos / unk and the family's ``extra_special_tokens`` (its image markers)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    word_level = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=False)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=word_level, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        extra_special_tokens=extra_special_tokens,
    )  # fmt: skip


def build_processor() -> Any:
    """Word-level tokenizer + CLIP image processor at 64 px + a LLaVA-1.5-style chat template."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    tokenizer = word_tokenizer(vocabulary(), {"image_token": "<image>"})
    size = {"shortest_edge": IMAGE_SIZE}
    image_processor = CLIPImageProcessor(size=size, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
    )  # fmt: skip


def build_model(
    vocab_size: int, seed: int = 0, text_layers: int = 8, vision_layers: int = 5, text_width: int = 192,
    text_intermediate: int = 512,
) -> nn.Module:
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=128, intermediate_size=512, num_hidden_layers=vision_layers, num_attention_heads=4,
        image_size=IMAGE_SIZE, patch_size=PATCH,
    )  # fmt: skip
    text = LlamaConfig(
        hidden_size=text_width, intermediate_size=text_intermediate, num_hidden_layers=text_layers,
        num_attention_heads=4, num_key_value_heads=4,
        vocab_size=vocab_size, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=True, initializer_range=INIT_STD,
    )  # fmt: skip
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=SPECIALS.index("<image>"),
        vision_feature_layer=-2, vision_feature_select_strategy="default",
    )  # fmt: skip
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 2
    return model


class Family:
    """What the training loop needs to know of a model family; this one is the LLaVA (CLIP tower with [CLS] and
    absolute position embeddings, MLP projector, 1D positions). :mod:`vtprune.embedded.train_qwen` has the Qwen2-VL
    twin's."""

    name: ClassVar[str] = "llava"
    default_out: ClassVar[Path] = DEFAULT_OUT
    image_text: ClassVar[str] = "<image>"  # the image in a prompt; the processor repeats its image token
    has_cls: ClassVar[bool] = True
    # what the tower learns per patch besides its cell's digit (counting and looking left are done there)
    tower_features: ClassVar[tuple[str, ...]] = ("count", "left")
    renumbers: ClassVar[bool] = True  # whether pruning may renumber positions (so training drops under both)
    # the shipped run's step counts (the command line's defaults); 2 threads: 35 min
    schedule: ClassVar[dict[str, int]] = {"tower_steps": 2000, "steps": 1400, "symbolic_steps": 950}
    # the features the projected tokens must carry: the place too, since the tower has absolute positions
    token_features: ClassVar[tuple[str, ...]] = ("row", "col", "count", "left")

    def build_processor(self) -> Any:
        return build_processor()

    def build_model(self, vocab_size: int, seed: int, **sizes: int) -> nn.Module:
        return build_model(vocab_size, seed, **sizes)

    def tower(self, model: nn.Module) -> nn.Module:
        return model.model.vision_tower

    def tower_width(self, model: nn.Module) -> int:
        return model.config.vision_config.hidden_size

    def feature_layer(self, model: nn.Module) -> nn.Module:
        """The tower layer whose output the projector reads (the auxiliary tower losses apply there)."""
        tower = self.tower(model)
        return getattr(tower, "vision_model", tower).encoder.layers[model.config.vision_feature_layer]

    def projector(self, model: nn.Module) -> nn.Module:
        return model.model.multi_modal_projector

    def per_image(self, values: Tensor, images: int) -> Tensor:
        """A hooked tower or projector output as ``[images, tokens, width]``."""
        return values[0] if isinstance(values, tuple) else values

    def tower_cells(self) -> Tensor:
        """The grid cell of each tower patch, in the order the tower holds them."""
        return patch_cells()

    def pixel_inputs(self, processor: Any, images: list[Any]) -> dict[str, Tensor]:
        return {"pixel_values": processor.image_processor(images, return_tensors="pt")["pixel_values"]}

    def run_tower(self, model: nn.Module, pixels: dict[str, Tensor]) -> None:
        self.tower(model)(pixels["pixel_values"])

    def encode(self, model: nn.Module, inputs: dict[str, Tensor]) -> None:
        """Run the tower and projector (their outputs are read through hooks)."""
        model.model.get_image_features(pixel_values=inputs["pixel_values"])

    def positions(self, model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
        """The full prompt's position ids, before any image token is dropped."""
        batch, length = inputs["input_ids"].shape
        return torch.arange(length).expand(batch, -1)


LLAVA = Family()

FEATURES = {"row": GRID.rows, "col": GRID.cols, "count": 11, "left": 11}  # one class per image token each
DIGITS = 10
# Extra dialogue turns lean on the lookup by place, the slowest to learn; counting and existence need their share
# too (at a tenth of the turns they were not learnt in 900 steps).
TYPE_WEIGHTS = {"cell": 2.0, "count": 1.25, "exists": 1.25, "left": 1.0}


class AuxiliaryHeads(nn.Module):
    """Training-only heads. On the tower layer LLaVA reads: per patch, its cell's digit (11 classes, 10 = empty),
    how often that digit occurs in the image (``count``, 0 for empty) and the digit of the cell to its left
    (``left``, 10 = none); on [CLS] and every patch, which digits appear anywhere (``presence``, multi-label). On
    the projected tokens the LLM reads: the same features plus the patch's grid row and column, one linear read-out
    each, whose weight rows are also the directions the symbolic warm-up adds to digit words."""

    def __init__(self, width: int, text_width: int, tower_features: tuple[str, ...] = ("count", "left")) -> None:
        super().__init__()
        self.cell = nn.Linear(width, 11)
        self.presence = nn.Linear(width, DIGITS)
        self.tower = nn.ModuleDict({name: nn.Linear(width, 11) for name in tower_features})
        heads = {name: nn.Linear(text_width, n, bias=False) for name, n in FEATURES.items()}
        self.said = nn.ModuleDict({**heads, "presence": nn.Linear(text_width, DIGITS, bias=False)})
        # what a question asks about (a cell's place, or a digit), read off the answering token's state after a few
        # LLM layers
        self.parse = nn.ModuleDict({
            "place_row": nn.Linear(text_width, GRID.rows), "place_col": nn.Linear(text_width, GRID.cols),
            "digit": nn.Linear(text_width, DIGITS),
        })  # fmt: skip
        for head in self.said.values():  # as long as a word embedding, so the symbolic tokens hear every feature
            nn.init.normal_(head.weight, std=INIT_STD)

    def directions(self, targets: dict[str, Tensor], features: tuple[str, ...] = tuple(FEATURES)) -> Tensor:
        """Per patch, the sum of its ``features``' directions (``[batch, patches, text_width]``)."""
        per_patch = sum(self.said[name].weight[targets[name]] for name in features)
        return per_patch + (targets["presence"] @ self.said["presence"].weight)[:, None]


def prompt_text(processor: Any, question: str) -> str:
    content = [{"type": "image"}, {"type": "text", "text": question + POST_PROMPT}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def batch_for(processor: Any, docs: list[dict[str, Any]], with_answers: bool = True) -> dict[str, Tensor]:
    """Processor inputs; with answers, ``labels`` cover only the answer tokens and the end of turn."""
    prompts = [prompt_text(processor, doc["question"]) for doc in docs]
    texts = [p + f" {doc['answer']}</s>" for p, doc in zip(prompts, docs)] if with_answers else prompts
    processor.tokenizer.padding_side = "right"
    batch = processor(text=texts, images=[render(doc) for doc in docs], return_tensors="pt", padding=True)
    if with_answers:
        labels = batch["input_ids"].clone()
        labels[batch["attention_mask"] == 0] = -100
        for row, doc in enumerate(docs):
            answer_tokens = len(processor.tokenizer(f" {doc['answer']}</s>", add_special_tokens=False)["input_ids"])
            real = int(batch["attention_mask"][row].sum())
            labels[row, : real - answer_tokens] = -100
        batch["labels"] = labels
    return batch


PLACE_ASKED = re.compile(r"row (\w+) column (\w+)")
DIGIT_ASKED = re.compile(r"\b(\d)s?\b")  # the digit a count / exists / left question is about


@dataclass(frozen=True)
class Turn:
    """One question of a training dialogue: ``position`` is the token whose next-token logits give the answer."""

    row: int
    position: int
    kind: str
    place_row: int = -1  # the place a ``cell`` question asks for
    place_col: int = -1
    digit: int = -1  # the digit a ``count`` / ``exists`` / ``left`` question asks about


def dialogue_batch(
    processor: Any, docs: list[dict[str, Any]], turns: int, rng: random.Random, read_share: float,
    type_weights: dict[str, float] | None = None, turns_out: list[Turn] | None = None, family: Family = LLAVA,
) -> dict[str, Tensor]:
    """Several question turns per image (the document's own first, as evaluation asks it; then others about the
    same grid, drawn by ``type_weights`` (default: uniform), or the reading task), so one image pass supervises
    many answers. Built token by token so the labels cover exactly the answers and their end-of-turn tokens.
    ``turns_out`` (if given) receives one :class:`Turn` per question: where its answer is predicted, its type and
    what it asks about (a ``cell`` question's place, the others' digit)."""
    tokenizer = processor.tokenizer
    image_id = tokenizer.convert_tokens_to_ids(processor.image_token)
    kinds = list(QUESTION_TYPES)
    weights = [(type_weights or {}).get(kind, 1.0) for kind in kinds]
    seqs, labels = [], []
    for doc in docs:
        questions = [(doc["question"], doc["answer"], doc["type"])]
        reading = turns > 1 and rng.random() < read_share
        while len(questions) < turns - reading:
            kind = rng.choices(kinds, weights)[0]
            asked = ask(kind, rng, doc["cells"])
            if asked is not None:
                questions.append((*asked, kind))
        if reading:  # last: its answer spells out the grid, which later questions could otherwise copy from
            read = reading_task(doc)
            questions.append((read["question"], read["answer"], read["type"]))
        ids: list[int] = []
        targets: list[int] = []
        for turn, (question, answer, kind) in enumerate(questions):
            # the first turn is exactly what evaluation asks; later ones skip the instruction to stay short
            user = f"USER: {family.image_text}\n{question}{POST_PROMPT} ASSISTANT:" if turn == 0 else \
                f" USER: {question} ASSISTANT:"
            user_ids = tokenizer(user, add_special_tokens=False)["input_ids"]
            user_ids = [t for u in user_ids for t in ([image_id] * IMAGE_TOKENS if u == image_id else [u])]
            answer_ids = tokenizer(f" {answer}</s>", add_special_tokens=False)["input_ids"]
            if turns_out is not None:
                place = PLACE_ASKED.search(question) if kind == "cell" else None
                row, col = (PLACE_WORDS.index(w) for w in place.groups()) if place else (-1, -1)
                digit = DIGIT_ASKED.search(question) if kind in ("count", "exists", "left") else None
                where = len(ids) + len(user_ids) - 1
                turns_out.append(Turn(len(seqs), where, kind, row, col, int(digit.group(1)) if digit else -1))
            ids += user_ids + answer_ids
            targets += [-100] * len(user_ids) + answer_ids
        seqs.append(ids)
        labels.append(targets)
    length = max(len(ids) for ids in seqs)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([ids + [pad] * (length - len(ids)) for ids in seqs])
    return {
        "input_ids": input_ids,
        "attention_mask": torch.tensor([[1] * len(ids) + [0] * (length - len(ids)) for ids in seqs]),
        "labels": torch.tensor([t + [-100] * (length - len(t)) for t in labels]),
        **family.pixel_inputs(processor, [render(d) for d in docs]),
    }


def reading_task(doc: dict[str, Any]) -> dict[str, Any]:
    """The same image with a dense target: every cell in raster order ("8 none none 8 ..."), as LLaVA's captioning
    stage teaches its LLM to read the image; 16 supervised words instead of one."""
    words = [str(d) if d >= 0 else "none" for d in labels_of(doc["cells"])]
    return {**doc, "type": "read", "question": "read the grid .", "answer": " ".join(words)}


def patch_cells(spec: GridSpec = GridSpec()) -> Tensor:
    """The grid cell (``row * cols + col``) each patch lies in, in raster order."""
    side = IMAGE_SIZE // PATCH
    per_cell = spec.cell // PATCH
    index = torch.arange(side) // per_cell
    return (index[:, None] * spec.cols + index[None, :]).reshape(-1)


def patch_targets(
    docs: list[dict[str, Any]], spec: GridSpec = GridSpec(), cells: Tensor | None = None
) -> dict[str, Tensor]:
    """Per patch (raster order, ``[batch, patches]``): ``cell`` its cell's digit or 10 for empty, ``count`` how
    often that digit occurs in the image (0 for empty), ``left`` the digit left of its cell (10: none or edge),
    ``row`` and ``col`` its grid place; per image (``[batch, 10]``): ``presence``, the multi-hot digits present.
    ``cells``: each patch's cell in another order than the raster one (a tower that holds patches otherwise)."""
    cell_of_patch = patch_cells(spec) if cells is None else cells
    per_cell: dict[str, list[Tensor]] = {"cell": [], "count": [], "left": []}
    presence = []
    for doc in docs:
        labels = labels_of(doc["cells"])
        per_cell["cell"].append(torch.tensor([d if d >= 0 else 10 for d in labels]))
        per_cell["count"].append(torch.tensor([min(labels.count(d), 10) if d >= 0 else 0 for d in labels]))
        left = [labels[i - 1] if i % spec.cols and labels[i - 1] >= 0 else 10 for i in range(len(labels))]
        per_cell["left"].append(torch.tensor(left))
        present = torch.zeros(10)
        present[[d for d in labels if d >= 0]] = 1.0
        presence.append(present)
    targets = {name: torch.stack(values)[:, cell_of_patch] for name, values in per_cell.items()}
    targets["row"] = (cell_of_patch // spec.cols).expand(len(docs), -1)
    targets["col"] = (cell_of_patch % spec.cols).expand(len(docs), -1)
    targets["presence"] = torch.stack(presence)
    return targets


def prompt_batch(processor: Any, docs: list[dict[str, Any]]) -> tuple[dict[str, Tensor], Tensor]:
    """The documents' evaluation prompts, left-padded so the last row is each prompt's end also when a wrapped model
    prunes tokens (the tokenizer's padding side is restored), and each answer's token (every answer is one word)."""
    tokenizer = processor.tokenizer
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        prompts = [prompt_text(processor, doc["question"]) for doc in docs]
        inputs = processor(text=prompts, images=[render(d) for d in docs], return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side
    answers = [tokenizer(f" {doc['answer']}", add_special_tokens=False)["input_ids"][0] for doc in docs]
    return inputs, torch.tensor(answers)


def answer_accuracy(
    model: nn.Module, processor: Any, docs: list[dict[str, Any]], batch: int = 100,
    after_batch: Callable[[], None] | None = None,
) -> dict[str, float]:
    """Greedy accuracy per question type, read off the next-token logits after the prompt (every answer is one
    word). Prompts are left-padded so the last row is the prompt's end also when a wrapped model prunes tokens.
    ``after_batch`` runs after each batch's forward (e.g. to read a wrapped model's record of it)."""
    correct: dict[str, list[float]] = {}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(docs), batch):
                chunk = docs[start : start + batch]
                inputs, answers = prompt_batch(processor, chunk)
                predicted = model(**inputs).logits[:, -1].argmax(-1)
                if after_batch is not None:
                    after_batch()
                for row, doc in enumerate(chunk):
                    correct.setdefault(doc["type"], []).append(float(int(predicted[row]) == int(answers[row])))
    finally:
        model.train(was_training)
    scores = {kind: sum(v) / len(v) for kind, v in sorted(correct.items())}
    scores["mean over types"] = sum(scores.values()) / len(scores)
    return scores


def presence_loss(logits: Tensor, targets: dict[str, Tensor]) -> Tensor:
    """Every token (``logits``: [batch, tokens, 10]) predicts the image's multi-hot digit presence."""
    return nn.functional.binary_cross_entropy_with_logits(logits, targets["presence"][:, None].expand_as(logits))


def tower_losses(heads: AuxiliaryHeads, features: Tensor, targets: dict[str, Tensor], has_cls: bool = True) -> Tensor:
    """Auxiliary losses on the tower layer LLaVA reads (``features``: [CLS] then patches): each patch its cell's
    digit, that digit's count and its left neighbour, every token the digits present (the tower counts, looks left
    and takes stock, so the LLM only looks up). Without ``has_cls``, ``features`` are patches only."""
    patches = features[:, 1:] if has_cls else features
    loss = nn.functional.cross_entropy(heads.cell(patches).flatten(0, 1), targets["cell"].flatten())
    for name, head in heads.tower.items():
        loss = loss + nn.functional.cross_entropy(head(patches).flatten(0, 1), targets[name].flatten())
    return loss + presence_loss(heads.presence(features), targets)


def drop_image_tokens(
    embeds: Tensor, inputs: dict[str, Tensor], is_image: Tensor, rng: random.Random, share: float,
    renumber: float = 0.0, kept_out: list[Tensor] | None = None, positions: Tensor | None = None,
) -> dict[str, Tensor]:
    """Model inputs where, in a ``share`` of the sequences, some image tokens stay (a budget drawn log-uniformly in
    2..63 per image, so the small budgets sweeps probe are trained as often as the large ones) and the others are
    removed (with their mask and labels). Positions keep the full prompt's numbering, as vtprune's pruning does for
    methods with ``positions="keep"``; in a ``renumber`` share of the dropped sequences they are renumbered with the
    gaps closed, as most methods do (the text after the image then sits closer to it than in any dense prompt).
    :func:`train` drops only after the symbolic warm-up (from the first step it slowed a 3-layer LLM's ``cell``
    lookups: held-out 0.76 at step 1,400, cell 0.26); the shipped recipe drops in half the sequences and renumbers
    half of those, so neither convention is new to the LLM when a method prunes. ``kept_out`` (if given) receives
    each row's kept token indices. ``positions``: the full prompt's position ids (default ``0 .. length - 1``;
    M-RoPE's ``[3, batch, length]`` are kept, never renumbered, as vtprune prunes M-RoPE models)."""
    batch, length = is_image.shape
    if positions is not None and positions.ndim == 3 and renumber > 0:
        raise ValueError("renumber must be 0 with M-RoPE positions (pruning keeps their (t, h, w) positions)")
    kept, renumbered = [], []
    for row in range(batch):
        keep = torch.ones(length, dtype=torch.bool)
        dropped = share > 0 and rng.random() < share
        if dropped:
            image_at = is_image[row].nonzero().flatten().tolist()
            budget = min(len(image_at) - 1, max(2, round(math.exp(rng.uniform(math.log(2), math.log(len(image_at)))))))
            keep[rng.sample(image_at, len(image_at) - budget)] = False
        kept.append(keep.nonzero().flatten())
        renumbered.append(dropped and renumber > 0 and rng.random() < renumber)
    longest = max(len(rows) for rows in kept)
    if kept_out is not None:
        kept_out.extend(kept)

    def gather(values: Tensor, pad: float) -> Tensor:
        return torch.stack([
            torch.cat([values[row, rows], values.new_full((longest - len(rows), *values.shape[2:]), pad)])
            for row, rows in enumerate(kept)
        ])  # fmt: skip

    if positions is None:
        positions = torch.arange(length).expand(batch, -1)
    position_ids = torch.stack([gather(axis, 0) for axis in positions]) if positions.ndim == 3 else gather(positions, 0)
    for row, closed in enumerate(renumbered):
        if closed:
            position_ids[row, : len(kept[row])] = torch.arange(len(kept[row]))
    return {"inputs_embeds": gather(embeds, 0), "attention_mask": gather(inputs["attention_mask"], 0),
            "labels": gather(inputs["labels"], -100), "position_ids": position_ids}  # fmt: skip


def pretrain_tower(
    model: nn.Module, heads: AuxiliaryHeads, captured: dict[str, Tensor], processor: Any, steps: int,
    batch_size: int, seed: int, lr: float, log_every: int, family: Family = LLAVA,
) -> None:
    """The tower alone on :func:`tower_losses` (a tenth of an LLM step each): counting and looking left take it
    thousands of steps, which the whole model could not afford."""
    if steps <= 0:
        return
    tower = family.tower(model)
    parameters = list(tower.parameters()) + list(heads.cell.parameters()) + list(heads.presence.parameters()) + \
        list(heads.tower.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, min(200, steps // 10))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    began = time.time()
    for step in range(steps):
        docs = generate("train", batch_size, seed=-(seed * 1_000_003 + step + 1))
        family.run_tower(model, family.pixel_inputs(processor, [render(d) for d in docs]))
        features = family.per_image(captured["features"], len(docs))
        loss = tower_losses(heads, features, patch_targets(docs, cells=family.tower_cells()), family.has_cls)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        scheduler.step()
        if log_every and (step + 1) % (4 * log_every) == 0:
            print(f"tower step {step + 1}/{steps}  loss {loss.item():.3f}  {time.time() - began:.0f}s", flush=True)


def train(
    steps: int, out: Path | None, *, seed: int = 0, batch_size: int = 24, lr: float = 2e-3, log_every: int = 50,
    eval_docs: int = 400, eval_every: int = 4, turns: int = 12, read_share: float = 0.0, threads: int | None = None,
    text_layers: int = 8, vision_layers: int = 5, symbolic_steps: int = 950, tower_steps: int = 0, drop_share: float = 0.5,
    renumber_share: float | None = None, text_width: int = 192, text_intermediate: int = 512,
    type_weights: dict[str, float] | None = None, parse_weight: float = 1.0, parse_layer: int = 2,
    family: Family = LLAVA,
) -> tuple[nn.Module, Any, dict[str, float]]:
    """Train the tower alone on its auxiliary targets for ``tower_steps`` steps, then the whole model for ``steps``
    steps (the first ``symbolic_steps`` with the grid given to the LLM as words); save to ``out`` (if given);
    returns (model, processor, held-out accuracy per question type).

    ``type_weights`` draws the extra dialogue turns (default :data:`TYPE_WEIGHTS`). With ``parse_weight`` > 0, each
    question's answering token must name what it asks about (linear read-outs: a cell question's row and column,
    the digit of the others) after ``parse_layer`` LLM layers, so the lookups have their query ready there. The
    log prints, per question type, the training turns' answer accuracy (each batch is new grids, so it tracks
    held-out accuracy without an evaluation pass). ``family``: the model family (:data:`LLAVA`, or
    :data:`vtprune.embedded.train_qwen.QWEN`)."""
    if parse_weight > 0 and not 1 <= parse_layer <= text_layers:
        raise ValueError(f"parse_layer must lie in [1, {text_layers}] (text_layers), got {parse_layer}")
    type_weights = dict(TYPE_WEIGHTS if type_weights is None else type_weights)
    if renumber_share is None:  # half the dropped sequences renumbered, where pruning may renumber
        renumber_share = 0.5 if family.renumbers else 0.0
    recipe = {k: v for k, v in locals().items() if k not in ("out", "threads", "log_every", "eval_every", "family")}
    recipe["family"] = family.name
    if threads:
        torch.set_num_threads(threads)
    rng = random.Random(seed)
    processor = family.build_processor()
    model = family.build_model(len(processor.tokenizer), seed, text_layers=text_layers, vision_layers=vision_layers,
                               text_width=text_width, text_intermediate=text_intermediate)  # fmt: skip
    text_width = model.config.text_config.hidden_size
    heads = AuxiliaryHeads(family.tower_width(model), text_width, family.tower_features)
    # clipped apart: the projector's early regression error would otherwise scale the LLM's steps down to nothing
    language = list(model.model.language_model.parameters()) + list(heads.said.parameters()) + \
        list(heads.parse.parameters())
    taken = {id(p) for p in language}
    vision = [p for p in list(model.parameters()) + list(heads.parameters()) if id(p) not in taken]
    parameters = language + vision
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, min(300, steps // 10))

    def rate(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))) * 0.95 + 0.05

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, rate)
    held_out = generate("test", eval_docs, seed=seed + 1000)
    # the word each patch should "say" after the projector: its cell's digit, or "none"
    digit_words = torch.tensor(processor.tokenizer.convert_tokens_to_ids([str(d) for d in range(10)] + ["none"]))
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    captured: dict[str, Tensor] = {}
    projector_hook = family.projector(model).register_forward_hook(
        lambda _m, _i, out: captured.__setitem__("projected", out)
    )
    hook = family.feature_layer(model).register_forward_hook(lambda _m, _i, out: captured.__setitem__("features", out))
    model.train()
    began, chunk = time.time(), 0
    right: dict[str, list[float]] = {}
    pretrain_tower(model, heads, captured, processor, tower_steps, batch_size, seed, lr, log_every, family)
    for step in range(steps):
        docs = generate("train", batch_size, seed=seed * 1_000_003 + step)
        asked: list[Turn] = []
        inputs = dialogue_batch(processor, docs, turns, rng, read_share, type_weights, asked, family)
        targets = patch_targets(docs)
        family.encode(model, inputs)  # the tower and projector, hooked
        projected = family.per_image(captured["projected"], len(docs))
        features = family.per_image(captured["features"], len(docs))
        is_image = inputs["input_ids"] == image_id
        # each image token as words: its cell's digit word plus the directions of its features
        symbolic_image = model.get_input_embeddings()(digit_words[targets["cell"]]) + \
            heads.directions(targets, family.token_features)
        # warm-up: the LLM reads the grid as those words while the tower and projector learn to produce exactly
        # them; afterwards the LLM reads the projected tokens in the same terms
        image_rows = symbolic_image if step < symbolic_steps else projected
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        embeds = embeds.masked_scatter(is_image[..., None], image_rows.flatten(0, 1).to(embeds.dtype))
        # dropping starts with the projected tokens (from the first step it slowed the 3-layer LLM's lookups)
        share = drop_share if step >= symbolic_steps else 0.0
        kept: list[Tensor] = []
        dropped = drop_image_tokens(embeds, inputs, is_image, rng, share, renumber_share, kept,
                                    family.positions(model, inputs))  # fmt: skip
        output = model(**dropped, output_hidden_states=parse_weight > 0)
        # each turn's answering token where it sits after the drop (text tokens are never dropped)
        rows = torch.tensor([turn.row for turn in asked])
        at = torch.tensor([int((kept[turn.row] < turn.position).sum()) for turn in asked])
        answers = inputs["input_ids"][rows, torch.tensor([turn.position + 1 for turn in asked])]
        hits = (output.logits[rows, at].argmax(-1) == answers).tolist()
        for turn, hit in zip(asked, hits):
            right.setdefault(turn.kind, []).append(float(hit))
        # each question's answering token names what is asked (place or digit) after parse_layer layers
        parse_loss = output.loss.new_zeros(())
        for name, head in heads.parse.items() if parse_weight > 0 else ():
            asking = [i for i, turn in enumerate(asked) if getattr(turn, name) >= 0]
            if asking:
                state = output.hidden_states[parse_layer][rows[asking], at[asking]]
                wanted = torch.tensor([getattr(asked[i], name) for i in asking])
                parse_loss = parse_loss + nn.functional.cross_entropy(head(state), wanted)
        tower_targets = patch_targets(docs, cells=family.tower_cells())
        tower_loss = tower_losses(heads, features, tower_targets, family.has_cls)
        # projected patches read through the (tied) LM head as their cell's digit word, and along each feature's
        # read-out as that feature: the terms the LLM learnt them in
        said_loss = nn.functional.cross_entropy(model.lm_head(projected).flatten(0, 1), digit_words[targets["cell"]].flatten())
        for name in family.token_features:
            said = heads.said[name](projected).flatten(0, 1)
            said_loss = said_loss + nn.functional.cross_entropy(said, targets[name].flatten())
        said_loss = said_loss + presence_loss(heads.said["presence"](projected), targets)
        # ... and land on the symbolic embedding itself (a fixed target here: only the projector side moves)
        target = symbolic_image.detach()
        align_loss = (projected - target).pow(2).mean() / target.pow(2).mean()
        loss = output.loss + 0.5 * (tower_loss + said_loss) + align_loss + parse_weight * parse_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(language, 1.0)
        torch.nn.utils.clip_grad_norm_(vision, 1.0)
        optimizer.step()
        scheduler.step()
        if log_every and (step + 1) % log_every == 0:
            chunk += 1
            typed = "  ".join(f"{kind} {sum(v) / len(v):.2f}" for kind, v in sorted(right.items()))
            right.clear()
            print(f"step {step + 1}/{steps}  answer {output.loss.item():.3f}  tower {tower_loss.item():.3f}  "
                  f"said {said_loss.item():.3f}  align {align_loss.item():.3f}  parse {parse_loss.item():.3f}  "
                  f"[{typed}]  {time.time() - began:.0f}s", flush=True)  # fmt: skip
            if chunk % eval_every == 0:
                print("  held-out", json.dumps(answer_accuracy(model, processor, held_out[:200])), flush=True)
    hook.remove()
    projector_hook.remove()
    model.eval()
    accuracy = answer_accuracy(model, processor, held_out)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        processor.save_pretrained(out)
        (out / "training.json").write_text(json.dumps({
            **recipe, "seconds": round(time.time() - began), "threads": torch.get_num_threads(),
            "held_out_accuracy": accuracy, "torch": torch.__version__,
        }, indent=2))  # fmt: skip
    return model, processor, accuracy


def main(family: Family = LLAVA) -> None:
    """The command line of :func:`train` for ``family`` (its defaults are the shipped recipe)."""
    import sys

    parser = argparse.ArgumentParser(description=(sys.modules[type(family).__module__].__doc__ or "").split("\n\n")[0])
    parser.add_argument("--tower-steps", type=int, default=family.schedule["tower_steps"])
    parser.add_argument("--steps", type=int, default=family.schedule["steps"])
    parser.add_argument("--symbolic-steps", type=int, default=family.schedule["symbolic_steps"])
    parser.add_argument("--batch-size", type=int, default=24)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--turns", type=int, default=12)
    parser.add_argument("--text-layers", type=int, default=8)
    parser.add_argument("--vision-layers", type=int, default=5)
    parser.add_argument("--drop-share", type=float, default=0.5)
    parser.add_argument("--renumber-share", type=float, default=None,
                        help="share of the dropped sequences renumbered (default 0.5; 0 for M-RoPE)")
    parser.add_argument("--text-width", type=int, default=192)
    parser.add_argument("--text-intermediate", type=int, default=512)
    parser.add_argument("--cell-weight", type=float, default=TYPE_WEIGHTS["cell"],
                        help="weight of cell questions among the extra dialogue turns")
    parser.add_argument("--parse-weight", type=float, default=1.0)
    parser.add_argument("--parse-layer", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=family.default_out)
    args = parser.parse_args()
    _, _, accuracy = train(args.steps, args.out, seed=args.seed, batch_size=args.batch_size, lr=args.lr,
                           turns=args.turns, text_layers=args.text_layers, vision_layers=args.vision_layers,
                           symbolic_steps=args.symbolic_steps, tower_steps=args.tower_steps, drop_share=args.drop_share,
                           renumber_share=args.renumber_share, text_width=args.text_width,
                           text_intermediate=args.text_intermediate, parse_weight=args.parse_weight,
                           parse_layer=args.parse_layer, type_weights={**TYPE_WEIGHTS, "cell": args.cell_weight},
                           threads=args.threads, family=family)  # fmt: skip
    print("held-out accuracy", json.dumps(accuracy))


if __name__ == "__main__":
    main()
