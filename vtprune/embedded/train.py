"""Train the embedded model: a tiny LLaVA (CLIP-style tower with [CLS], MLP projector, Llama decoder) that answers
questions about grids of real handwritten digits (:mod:`vtprune.data.digit_grids`), on a CPU.

    python -m vtprune.embedded.train [--steps 2000] [--out vtprune/embedded/digits-llava] [--seed 0]

Each image comes with a dialogue of 12 questions (the first exactly as evaluation asks it), so one image pass
supervises many answers. Auxiliary losses (their heads are dropped after training): every patch token of the tower
layer LLaVA feeds to the projector predicts the digit of its cell (or "empty"); the [CLS] token of that layer
predicts which digits appear anywhere in the image, which gives [CLS] the job it has in CLIP (its attention has to
find the digits, so [CLS]-attention pruners have a real signal); each projected token, read through the tied LM
head, says its cell's digit word, and a linear head reads its grid row and column off it. For the first
``symbolic_steps`` the LLM reads the grid as words (each image token replaced by its cell's digit word plus the row
and column directions of that head) while the tower trains on its own; then the LLM reads the tower.
The run is seeded (data, initialisation, order; results also depend on the thread count, recorded); it writes
safetensors weights, config, tokenizer, processor and ``training.json`` (recipe, time, held-out accuracy), so
``from_pretrained(path)`` + ``AutoProcessor.from_pretrained(path)`` work offline like any checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vtprune.data.digit_grids import QUESTION_TYPES, GridSpec, ask, generate, labels_of, render

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
    words += "what digit is in row column how many are there a which left of the".split()
    words += "Answer question using single word or phrase".split()
    words += ["read", "grid"]  # the reading task used in training
    words += [str(d) for d in range(17)] + [f"{d}s" for d in range(10)]
    return SPECIALS + list(dict.fromkeys(words))


def build_processor() -> Any:
    """Word-level tokenizer + CLIP image processor at 64 px + a LLaVA-1.5-style chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    words = vocabulary()
    word_level = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=word_level, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
    )  # fmt: skip
    size = {"shortest_edge": IMAGE_SIZE}
    image_processor = CLIPImageProcessor(size=size, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
    )  # fmt: skip


def build_model(vocab_size: int, seed: int = 0, text_layers: int = 3) -> nn.Module:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
        image_size=IMAGE_SIZE, patch_size=PATCH,
    )  # fmt: skip
    text = LlamaConfig(
        hidden_size=192, intermediate_size=512, num_hidden_layers=text_layers, num_attention_heads=4, num_key_value_heads=4,
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


class AuxiliaryHeads(nn.Module):
    """Training-only heads: on the tower layer LLaVA reads, per-patch cell digit (11 classes) and [CLS] digit
    presence (10); on the projected tokens the LLM reads, each patch's grid row and column (4 + 4)."""

    def __init__(self, width: int, text_width: int, spec: GridSpec = GridSpec()) -> None:
        super().__init__()
        self.cell = nn.Linear(width, 11)
        self.presence = nn.Linear(width, 10)
        self.place = nn.Linear(text_width, spec.rows + spec.cols)


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


def dialogue_batch(
    processor: Any, docs: list[dict[str, Any]], turns: int, rng: random.Random, read_share: float
) -> dict[str, Tensor]:
    """Several question turns per image (the document's own first, as evaluation asks it; then others about the
    same grid, or the reading task), so one image pass supervises many answers. Built token by token so the
    labels cover exactly the answers and their end-of-turn tokens."""
    tokenizer = processor.tokenizer
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    seqs, labels = [], []
    for doc in docs:
        pairs = [(doc["question"], doc["answer"])]
        reading = turns > 1 and rng.random() < read_share
        while len(pairs) < turns - reading:
            asked = ask(rng.choice(QUESTION_TYPES), rng, doc["cells"])
            if asked is not None:
                pairs.append(asked)
        if reading:  # last: its answer spells out the grid, which later questions could otherwise copy from
            read = reading_task(doc)
            pairs.append((read["question"], read["answer"]))
        ids: list[int] = []
        targets: list[int] = []
        for turn, (question, answer) in enumerate(pairs):
            # the first turn is exactly what evaluation asks; later ones skip the instruction to stay short
            user = f"USER: <image>\n{question}{POST_PROMPT} ASSISTANT:" if turn == 0 else f" USER: {question} ASSISTANT:"
            user_ids = tokenizer(user, add_special_tokens=False)["input_ids"]
            user_ids = [t for u in user_ids for t in ([image_id] * IMAGE_TOKENS if u == image_id else [u])]
            answer_ids = tokenizer(f" {answer}</s>", add_special_tokens=False)["input_ids"]
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
        "pixel_values": processor.image_processor([render(d) for d in docs], return_tensors="pt")["pixel_values"],
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


def cell_targets(docs: list[dict[str, Any]], spec: GridSpec = GridSpec()) -> tuple[Tensor, Tensor]:
    """Per patch (raster order) the digit of its cell or 10 for empty, and per image the multi-hot digit presence."""
    cell_of_patch = patch_cells(spec)
    cells, presence = [], []
    for doc in docs:
        labels = labels_of(doc["cells"])
        cells.append(torch.tensor([d if d >= 0 else 10 for d in labels])[cell_of_patch])
        present = torch.zeros(10)
        present[[d for d in labels if d >= 0]] = 1.0
        presence.append(present)
    return torch.stack(cells), torch.stack(presence)


def place_targets(spec: GridSpec = GridSpec()) -> tuple[Tensor, Tensor]:
    """Grid row and column of every patch (raster order)."""
    cell_of_patch = patch_cells(spec)
    return cell_of_patch // spec.cols, cell_of_patch % spec.cols


def answer_accuracy(model: nn.Module, processor: Any, docs: list[dict[str, Any]], batch: int = 100) -> dict[str, float]:
    """Greedy accuracy per question type, read off the next-token logits after the prompt (every answer is one
    word). Prompts are left-padded so the last row is the prompt's end also when a wrapped model prunes tokens."""
    correct: dict[str, list[float]] = {}
    tokenizer = processor.tokenizer
    was_training = model.training
    model.eval()
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        with torch.no_grad():
            for start in range(0, len(docs), batch):
                chunk = docs[start : start + batch]
                prompts = [prompt_text(processor, doc["question"]) for doc in chunk]
                inputs = processor(text=prompts, images=[render(d) for d in chunk], return_tensors="pt", padding=True)
                predicted = model(**inputs).logits[:, -1].argmax(-1)
                for row, doc in enumerate(chunk):
                    answer = tokenizer(f" {doc['answer']}", add_special_tokens=False)["input_ids"][0]
                    correct.setdefault(doc["type"], []).append(float(int(predicted[row]) == answer))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    scores = {kind: sum(v) / len(v) for kind, v in sorted(correct.items())}
    scores["mean over types"] = sum(scores.values()) / len(scores)
    return scores


def train(
    steps: int, out: Path | None, *, seed: int = 0, batch_size: int = 24, lr: float = 2e-3, log_every: int = 50,
    eval_docs: int = 400, eval_every: int = 4, turns: int = 12, read_share: float = 0.0, threads: int | None = None,
    text_layers: int = 3, symbolic_steps: int = 1000,
) -> tuple[nn.Module, Any, dict[str, float]]:
    """Train for ``steps`` steps (the first ``symbolic_steps`` with the grid given to the LLM as words); save to
    ``out`` (if given); returns (model, processor, held-out accuracy per question type)."""
    recipe = {k: v for k, v in locals().items() if k not in ("out", "threads", "log_every", "eval_every")}
    if threads:
        torch.set_num_threads(threads)
    rng = random.Random(seed)
    processor = build_processor()
    model = build_model(len(processor.tokenizer), seed, text_layers)
    heads = AuxiliaryHeads(model.config.vision_config.hidden_size, model.config.text_config.hidden_size)
    rows, cols = place_targets()
    parameters = list(model.parameters()) + list(heads.parameters())
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
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    captured: dict[str, Tensor] = {}
    projector_hook = model.model.multi_modal_projector.register_forward_hook(
        lambda _m, _i, out: captured.__setitem__("projected", out)
    )
    tower = model.model.vision_tower
    layer = getattr(tower, "vision_model", tower).encoder.layers[model.config.vision_feature_layer]
    hook = layer.register_forward_hook(lambda _m, _i, out: captured.__setitem__("features", out[0] if isinstance(out, tuple) else out))
    model.train()
    began, chunk = time.time(), 0
    for step in range(steps):
        docs = generate("train", batch_size, seed=seed * 1_000_003 + step)
        inputs = dialogue_batch(processor, docs, turns, rng, read_share)
        cells, presence = cell_targets(docs)
        if step < symbolic_steps:
            # warm-up: the LLM reads the grid as words (each image token -> its cell's digit word) while the tower
            # learns the cells on its own; afterwards the word alignment lets the LLM read the tower's tokens
            symbolic = inputs["input_ids"].clone()
            is_image = symbolic == image_id
            symbolic[is_image] = digit_words[cells].flatten()
            embeds = model.get_input_embeddings()(symbolic)
            # each word also says where it is, along the directions the place head reads off image tokens later
            where = heads.place.weight[rows] + heads.place.weight[GRID.rows + cols]  # [64, width]
            embeds = embeds.masked_scatter(is_image[..., None], embeds[is_image] + where.repeat(len(docs), 1))
            output = model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], labels=inputs["labels"])
            model.model.get_image_features(pixel_values=inputs["pixel_values"])
        else:
            output = model(**inputs)
        features = captured["features"]
        cell_loss = nn.functional.cross_entropy(heads.cell(features[:, 1:]).flatten(0, 1), cells.flatten())
        presence_loss = nn.functional.binary_cross_entropy_with_logits(heads.presence(features[:, 0]), presence)
        # projected patches read through the (tied) LM head as their cell's digit word: aligns image and text
        said = model.lm_head(captured["projected"]).flatten(0, 1)
        word_loss = nn.functional.cross_entropy(said, digit_words[cells.flatten()])
        # ... and say where they are: "row 2 column 3" questions match these directions, not RoPE offsets
        place = heads.place(captured["projected"])
        place_loss = nn.functional.cross_entropy(place[..., : GRID.rows].flatten(0, 1), rows.repeat(len(docs))) + \
            nn.functional.cross_entropy(place[..., GRID.rows :].flatten(0, 1), cols.repeat(len(docs)))
        loss = output.loss + 0.5 * (cell_loss + presence_loss + word_loss + place_loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        scheduler.step()
        if log_every and (step + 1) % log_every == 0:
            chunk += 1
            print(f"step {step + 1}/{steps}  answer {output.loss.item():.3f}  cell {cell_loss.item():.3f}  "
                  f"presence {presence_loss.item():.3f}  word {word_loss.item():.3f}  place {place_loss.item():.3f}  "
                  f"{time.time() - began:.0f}s",
                  flush=True)  # fmt: skip
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--symbolic-steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=24)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--turns", type=int, default=12)
    parser.add_argument("--text-layers", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    _, _, accuracy = train(args.steps, args.out, seed=args.seed, batch_size=args.batch_size, lr=args.lr,
                           turns=args.turns, text_layers=args.text_layers, symbolic_steps=args.symbolic_steps,
                           threads=args.threads)  # fmt: skip
    print("held-out accuracy", json.dumps(accuracy))


if __name__ == "__main__":
    main()
