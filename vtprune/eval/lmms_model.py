"""The lmms-eval model ``vtprune``: any supported VLM checkpoint, pruned by any registered method.

    python -m lmms_eval --model vtprune \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=fastv,keep=64 --tasks pope --batch_size 8
    accelerate launch --num_processes 8 -m lmms_eval --model vtprune --model_args ... --tasks ...   # data parallel

``model_args``: ``pretrained`` (checkpoint path or hub id, loaded with ``AutoModelForImageTextToText`` and its
``AutoProcessor``), ``method`` (a registered method, a composition such as ``divprune+random``, or ``dense``, the
default), ``keep`` (``64``, ``0.25``, or ``128/64``: one budget per part of a composition), ``budget``, any field of the
method's config (e.g. ``layer=3``), ``budget_unit`` (what ``keep`` counts on a video: ``video``, the default, or
``frame``), ``device``, ``dtype``, ``batch_size``, ``max_new_tokens`` (when a task sets none), ``chat_template`` (a
Jinja string, when the processor has none), ``cost_path`` (a JSON file for the cost side). Prompts are built with the
processor's chat template: the document's images and videos first, then its text; a document whose text holds one
``<image>`` placeholder per image (several images) gets each image at its placeholder.

Visuals (what a task's ``doc_to_visual`` returns): a ``PIL.Image`` is an image; a video is lmms-eval's media dict
``{"type": "video", "url": ...}`` (also ``"path"``, ``"video"`` or ``"frames"``) holding a list of ``PIL.Image``
frames or a video file path, or a bare path string that is not an image file (lmms-eval's convention for video
files). Videos reach the processor as ``videos=`` (one list of frames, or one path, per video: the processor's video
processor decodes a path), so only families whose processor has a video processor take them (Qwen2-VL, Qwen2.5-VL,
Qwen3-VL, LLaVA-OneVision); others raise a ``ValueError`` naming the family. Qwen encodes frames in temporal pairs,
so an odd frame count gets its last frame repeated by the processor.

Requests: ``generate_until`` (batched with left padding, grouped by generation kwargs; greedy, sampling or beams as
the task asks) and ``loglikelihood`` (the continuation's summed negative log-likelihood, read from the logits of
the kept tokens, and whether greedy decoding would produce it). Multi-round generation is not supported.

The cost side is gathered while lmms-eval runs: per sample, the visual tokens the LLM kept per image (per budgeted
item: an image, a video, or with ``budget_unit=frame`` a video frame), all of the sample's kept visual tokens
(``sample_visual_tokens``: per video, for a one-video document) and those it had before pruning, the
analytical prefill FLOPs of what the forward really did, and the prefill time (time to first token of each
``generate`` batch, divided among its samples; the whole forward for a scored continuation, whose logits all
count). :meth:`VtpruneLMM.cost_summary` returns the means, and counts both forwards and documents (a two-way
multiple-choice document is two scored forwards).

Feedback: a progress bar over the requests (rich, transient), or ``on_progress(done, total)`` when a caller (the
sweep) draws its own.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms
from loguru import logger

import vtprune
from vtprune.core.budget import parse_budget
from vtprune.eval.flops import model_shape, prefill_flops, sample_llm_flops
from vtprune.eval.inputs import load_model

DENSE = "dense"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class VideoInput:
    """One video of a document: its frames (``PIL.Image`` s, in order) or the path of a video file."""

    frames: tuple[Any, ...] | str


class VtpruneLMM(lmms):
    """An lmms-eval model: a Hugging Face VLM wrapped by :func:`vtprune.wrap` (or left dense)."""

    is_simple = True

    def __init__(
        self,
        pretrained: str | None = None,
        method: str = DENSE,
        keep: Any = None,
        budget: str = "final",
        budget_unit: str = "video",
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int | str = 1,
        max_new_tokens: int = 64,
        chat_template: str | None = None,
        cost_path: str | None = None,
        model: Any = None,
        processor: Any = None,
        on_progress: Callable[[int, int], None] | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        self.on_progress = on_progress
        from accelerate import PartialState

        state = PartialState()
        if state.num_processes > 1:  # accelerate launch: one process per GPU, lmms-eval shards the requests
            from accelerate import Accelerator

            device = f"cuda:{state.local_process_index}"
            self.accelerator = Accelerator()
            self._rank, self._world_size = state.process_index, state.num_processes
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if model is None:
            if not pretrained:
                raise ValueError("pretrained is required: a checkpoint directory or hub id of a supported VLM")
            model, processor = load_model(str(pretrained), dtype=dtype, device=str(self._device), text_processor=True)
        if processor is None:
            raise ValueError(
                f"pretrained={pretrained!r} has no processor; lmms-eval builds prompts from text, so the model needs "
                "its tokenizer and image processor (a checkpoint saved with them)"
            )
        self.model, self.processor, self.tokenizer = model, processor, processor.tokenizer
        if chat_template is not None:
            self.processor.chat_template = chat_template
        if getattr(self.processor, "chat_template", None) is None:
            raise ValueError("the processor has no chat template; pass chat_template=<jinja> in model_args")
        self.batch_size_per_gpu = int(batch_size)
        if self.batch_size_per_gpu < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.max_new_tokens = int(max_new_tokens)
        self.cost_path = cost_path
        self.pretrained = pretrained
        self.method_name = str(method)
        self.budget_unit = budget_unit
        if self.method_name == DENSE:
            if keep is not None or options:
                given = ", ".join(["keep", *options] if keep is not None else list(options))
                raise ValueError(f"method=dense runs the unpruned model; {given} only apply to pruning methods")
            # keeps every token: the dense model's outputs, plus a record of what each forward saw
            self.pruning = vtprune.wrap(model, "random", keep=1.0)
            self.config: dict[str, Any] = {"method": DENSE}
        else:
            if keep is None:
                raise ValueError(f"method={method} needs keep= (tokens per image, or a fraction in (0, 1])")
            if isinstance(keep, str):  # model_args text: "64", "0.25", or per-part budgets "128/64"
                keep = parse_budget(keep)
            self.pruning = vtprune.wrap(
                model, self.method_name, keep=keep, budget=budget, budget_unit=budget_unit, tokenizer=self.tokenizer,
                **options,
            )  # fmt: skip
            self.config = self.pruning.config()
        self.costs: list[dict[str, float]] = []

    # -- lmms-eval's model interface -------------------------------------------------------------------------------

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self._device

    def close(self) -> None:
        """Unwrap the model (it stays usable for the next grid point)."""
        self.pruning.unwrap()

    def clean(self) -> None:
        # lmms-eval calls this after each evaluation; its default deletes the model, which a sweep reuses
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def generate_until(self, requests: list[Instance]) -> list[str]:
        answers: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = defaultdict(list)
        for index, request in enumerate(requests):
            groups[json.dumps(request.args[1], sort_keys=True, default=str)].append(index)
        with self._progress(len(requests), "generating") as advance:
            for indices in groups.values():
                for start in range(0, len(indices), self.batch_size):
                    batch = indices[start : start + self.batch_size]
                    texts = self._generate([requests[i] for i in batch], dict(requests[batch[0]].args[1]))
                    for index, text in zip(batch, texts):
                        answers[index] = text
                        self.cache_hook.add_partial("generate_until", requests[index].args[:2], text)
                    advance(len(batch))
        self._write_costs()
        return [answer or "" for answer in answers]

    def loglikelihood(self, requests: list[Instance]) -> list[Any]:
        """Per request (negative log-likelihood of the continuation, summed over its tokens; greedy or not).

        The loss rather than the log-probability, because lmms-eval's multiple-choice scoring takes the argmin (its
        built-in models return losses). Each pair is wrapped in a ``GenerationResult``: lmms-eval 0.7.3 turns any
        other non-string response into its ``str()``, which breaks every log-likelihood task.
        """
        results = []
        with self._progress(len(requests), "scoring") as advance:
            for request in requests:
                context, target, doc_to_visual, doc_id, task, split = request.args
                doc = self.task_dict[task][split][doc_id]
                continuation = target if isinstance(target, str) else target(doc)
                loss, greedy = self._loglikelihood(
                    (task, doc_id), context, continuation, self._visuals(doc_to_visual, doc)
                )  # fmt: skip
                results.append(GenerationResult(text=(loss, greedy)))  # type: ignore[arg-type]
                advance(1)
        self._write_costs()
        return results

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("vtprune's lmms-eval model does not support multi-round generation")

    @contextmanager
    def _progress(self, total: int, label: str) -> Iterator[Callable[[int], None]]:
        """``advance(n)`` after each finished batch: the caller's ``on_progress`` or a transient rich bar."""
        done = 0
        if self.on_progress is not None:
            callback = self.on_progress

            def advance(count: int) -> None:
                nonlocal done
                done += count
                callback(done, total)

            callback(0, total)
            yield advance
            return
        from rich.progress import Progress

        with Progress(transient=True, disable=total < 2) as progress:
            task = progress.add_task(f"vtprune {self.method_name}: {label}", total=total)
            yield lambda count: progress.advance(task, count)

    # -- cost side -------------------------------------------------------------------------------------------------

    def cost_summary(self) -> dict[str, Any]:
        """Means over the evaluated forwards (one per generated answer or scored continuation): visual tokens kept
        per image (per budgeted item), per sample, and per sample before pruning, prefill TFLOPs, prefill ms; overall
        and per task under ``"tasks"``."""

        def means(costs: list[dict[str, Any]]) -> dict[str, Any]:
            documents = len({(cost["task"], cost.get("doc")) for cost in costs})
            summary: dict[str, Any] = {"forwards": len(costs), "documents": documents}
            for key in ("visual_tokens", "sample_visual_tokens", "sample_visual_tokens_before",
                        "visual_tokens_per_layer", "tflops_prefill", "prefill_ms"):  # fmt: skip
                values = [cost[key] for cost in costs if key in cost]
                summary[key] = sum(values) / len(values) if values else None
            exits = [cost["exit_layer"] for cost in costs if "exit_layer" in cost]
            if exits:  # where samples' visual tokens all left (DyVTE): how many left at each layer
                summary["exit_layers"] = {layer: exits.count(layer) for layer in sorted(set(exits))}
            return summary

        tasks = dict.fromkeys(cost["task"] for cost in self.costs)
        return {
            **means(self.costs),
            "config": self.config,
            "tasks": {task: means([c for c in self.costs if c["task"] == task]) for task in tasks},
        }

    def _write_costs(self) -> None:
        summary = self.cost_summary()
        logger.info(f"vtprune cost: {json.dumps(summary, default=str)}")
        if self.cost_path:
            Path(self.cost_path).write_text(json.dumps(summary, indent=2, default=str))

    def _record_costs(self, docs: list[tuple[str, int]], prefill_ms: float, logits_rows: list[int]) -> None:
        """One cost per sample of the last forward; ``docs``: each sample's (task, document id)."""
        record = self.pruning.last
        batch = len(docs)
        flops = prefill_flops(self.model, record, record.encoder_inputs, logits_rows=logits_rows)
        final = record.stages[-1].kept_per_item if record.stages else []
        per_sample: dict[int, list[int]] = defaultdict(list)
        before: dict[int, int] = defaultdict(int)
        for item, kept in zip(record.items, final):
            per_sample[item["sample"]].append(kept.numel())
        for item in record.items:
            before[item["sample"]] += item["num_tokens"]
        per_layer = record.visual_tokens_per_layer()
        exits = record.exit_layers()
        # each sample's share of the batch's FLOPs by its own tokens per layer (samples may leave visual tokens at
        # different layers: DyVTE's exits, ATP's instance-wise counts)
        own = sample_llm_flops(model_shape(self.model).language, record.tokens_per_layer)
        shares = [f / sum(own) for f in own] if len(own) == batch and sum(own) > 0 else [1 / batch] * batch
        for sample, (task, doc) in enumerate(docs):
            counts = per_sample.get(sample, [])
            cost = {"task": task, "doc": doc, "tflops_prefill": flops.prefill / 1e12 * shares[sample],
                    "prefill_ms": prefill_ms / batch}  # fmt: skip
            if sample < len(exits) and exits[sample] is not None:
                cost["exit_layer"] = exits[sample]
            if counts:
                cost["visual_tokens"] = sum(counts) / len(counts)
                # a sample's items summed: comparable between budget units (a video is one item or one per frame)
                cost["sample_visual_tokens"] = sum(counts)
                cost["sample_visual_tokens_before"] = before[sample]
                # a sample's visual tokens averaged over the decoder layers (in-LLM stages, DyVTE's exits)
                cost["visual_tokens_per_layer"] = per_layer[sample]
            self.costs.append(cost)

    # -- work --------------------------------------------------------------------------------------------------------

    def _visuals(self, doc_to_visual: Any, doc: dict[str, Any]) -> list[Any]:
        """The document's images (RGB ``PIL.Image``) and videos (:class:`VideoInput`), in order."""
        visuals = doc_to_visual(doc) if doc_to_visual is not None else []
        flat = [v for group in visuals for v in (group if isinstance(group, (list, tuple)) else [group])]
        out = [self._visual(visual) for visual in flat]
        if any(isinstance(v, VideoInput) for v in out) and getattr(self.processor, "video_processor", None) is None:
            raise ValueError(
                f"{type(self.model).__name__} takes no video input (its processor has no video processor), and this "
                "task's documents hold a video; video tasks need a family with video input (Qwen2-VL, Qwen2.5-VL, "
                "Qwen3-VL, LLaVA-OneVision)"
            )
        return out

    @staticmethod
    def _visual(visual: Any) -> Any:
        if hasattr(visual, "convert"):
            return visual.convert("RGB")
        if isinstance(visual, dict) and visual.get("type", "video") == "video":
            source = next((visual[k] for k in ("url", "path", "video", "frames") if visual.get(k) is not None), None)
            if isinstance(source, (list, tuple)) and source and all(hasattr(f, "convert") for f in source):
                return VideoInput(tuple(frame.convert("RGB") for frame in source))
            if isinstance(source, (str, Path)):
                return VideoInput(str(source))
            raise ValueError(
                f"a video visual needs a list of PIL frames or a file path under 'url', got {visual!r:.80}"
            )  # fmt: skip
        if isinstance(visual, (str, Path)):  # lmms-eval: a path is a video unless it names an image file
            if str(visual).lower().endswith(IMAGE_SUFFIXES):
                from PIL import Image

                return Image.open(visual).convert("RGB")
            return VideoInput(str(visual))
        raise NotImplementedError(
            f"vtprune's lmms-eval model takes images (PIL), videos (frames or paths), got {type(visual).__name__}"
        )

    def _prompt(self, context: str, visuals: list[Any]) -> str:
        images = [v for v in visuals if not isinstance(v, VideoInput)]
        pieces = context.split("<image>")
        if len(images) > 1 and len(images) == len(visuals) and len(pieces) == len(images) + 1:
            # one placeholder per image (interleaved documents, e.g. few-shot demonstrations): each image where its
            # placeholder stands, the text between them in order
            content: list[dict[str, Any]] = []
            for index, piece in enumerate(pieces):
                if piece.strip():
                    content.append({"type": "text", "text": piece.strip()})
                if index < len(images):
                    content.append({"type": "image"})
        else:
            text = context.replace("<image>", "").replace("<video>", "").strip()  # the template places the visuals
            content = [{"type": "video" if isinstance(v, VideoInput) else "image"} for v in visuals]
            content.append({"type": "text", "text": text})
        return self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)

    def _encode(self, texts: list[str], visuals: list[Any]) -> dict[str, torch.Tensor]:
        self.tokenizer.padding_side = "left"
        images = [v for v in visuals if not isinstance(v, VideoInput)]
        videos = [
            list(v.frames) if isinstance(v.frames, tuple) else v.frames for v in visuals if isinstance(v, VideoInput)
        ]  # one list of frames (or one path) per video
        media: dict[str, Any] = {"images": images or None}
        if videos:  # only then: processors without a video processor take no videos argument
            media["videos"] = videos
        batch = self.processor(text=texts, **media, return_tensors="pt", padding=True)
        dtype = next(self.model.parameters()).dtype
        return {k: v.to(self.device, dtype) if v.is_floating_point() else v.to(self.device) for k, v in batch.items()}

    def _generate(self, requests: list[Instance], kwargs: dict[str, Any]) -> list[str]:
        texts, images = [], []
        for request in requests:
            context, _, doc_to_visual, doc_id, task, split = request.args
            visuals = self._visuals(doc_to_visual, self.task_dict[task][split][doc_id])
            texts.append(self._prompt(context, visuals))
            images.extend(visuals)
        inputs = self._encode(texts, images)
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(kwargs.pop("temperature", 0) or 0)
        sample = bool(kwargs.pop("do_sample", False)) or temperature > 0
        options = {
            "max_new_tokens": int(kwargs.pop("max_new_tokens", self.max_new_tokens)),
            "num_beams": int(kwargs.pop("num_beams", 1) or 1),
            "do_sample": sample,
            "pad_token_id": self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id,
        }  # fmt: skip
        if sample:
            options["temperature"] = temperature or 1.0
            if kwargs.get("top_p") is not None:
                options["top_p"] = float(kwargs["top_p"])
        prefill = _FirstForwardTimer(self.model, self.device)
        with prefill, torch.inference_mode():
            output = self.model.generate(**inputs, **options)
        docs = [(r.args[4], r.args[3]) for r in requests]
        self._record_costs(docs, prefill.milliseconds or 0.0, [1] * len(requests))
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        answers = []
        for text in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True):
            for stop in until:
                if stop and stop in text:
                    text = text.split(stop)[0]
            answers.append(text)
        return answers

    def _loglikelihood(
        self, doc: tuple[str, int], context: str, continuation: str, images: list[Any]
    ) -> tuple[float, bool]:
        prompt = self._encode([self._prompt(context, images)], images)
        target = self.tokenizer(continuation, add_special_tokens=False, return_tensors="pt")["input_ids"].to(self.device)
        if target.shape[1] == 0:
            return 0.0, True
        start = prompt["input_ids"].shape[1]
        inputs = dict(prompt)
        inputs["input_ids"] = torch.cat([prompt["input_ids"], target], dim=1)
        inputs["attention_mask"] = torch.cat([prompt["attention_mask"], torch.ones_like(target)], dim=1)
        if "mm_token_type_ids" in inputs:
            inputs["mm_token_type_ids"] = torch.cat([prompt["mm_token_type_ids"], torch.zeros_like(target)], dim=1)
        forward = _FirstForwardTimer(self.model, self.device)
        with forward, torch.inference_mode():
            logits = self.model(**inputs).logits[0].float()
        self._record_costs([doc], forward.milliseconds or 0.0, [inputs["input_ids"].shape[1]])
        # with pruning the logits cover only the kept tokens: find the rows of the positions that predict the target
        rows = self.pruning.last.output_index[0].tolist()
        wanted = [rows.index(position) for position in range(start - 1, start - 1 + target.shape[1])]
        log_probs = torch.log_softmax(logits[wanted], dim=-1)
        expected = target[0]
        loss = -float(log_probs.gather(1, expected[:, None]).sum())
        greedy = bool((log_probs.argmax(dim=-1) == expected).all())
        return loss, greedy


class _FirstForwardTimer:
    """Milliseconds from entering the block to the end of the model's first forward (``generate``'s prefill)."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.model, self.cuda = model, device.type == "cuda"
        self.milliseconds: float | None = None

    def __enter__(self) -> _FirstForwardTimer:
        if self.cuda:
            torch.cuda.synchronize()
        self._began = time.perf_counter()

        def done(*_: Any) -> None:
            if self.milliseconds is None:
                if self.cuda:
                    torch.cuda.synchronize()
                self.milliseconds = (time.perf_counter() - self._began) * 1e3

        self._hook = self.model.register_forward_hook(done)
        return self

    def __exit__(self, *_: Any) -> None:
        self._hook.remove()
