"""The tasks privet fine-tunes for, and everything that differs between them.

A task owns five things: how the model is built (a new classification head, or the pretrained
language-model head), how examples are tokenized and batched, the per-example loss, the
evaluation metrics, and what an export needs to know. The training loop (``client/training.py``),
DP-SGD, aggregation, the privacy ledger and the transport never look at which task runs: they call
these methods.

``classification``: texts with one label each; the loss of an example is the cross-entropy of
its label. ``causal_lm``: a prompt (or nothing) and a target text; the loss of an example is the
mean next-token cross-entropy over its target tokens (prompt and padding take none), so the
privacy unit of DP-SGD is one example, one sequence or one chat, however many tokens it has.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import threading
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from numpy.typing import NDArray

from privet.common.config import AdapterConfig, ModelConfig
from privet.common.data import (
    Examples,
    GenerationExamples,
    TokenizedExamples,
    TokenizedGeneration,
    collate,
    collate_generation,
    length_sorted_microbatches,
)
from privet.common.data.text import IGNORE_INDEX, chat_prompt_ids
from privet.common.errors import DataError
from privet.common.evaluation import EvalResult, autocast_for, eval_mode
from privet.common.evaluation import evaluate as evaluate_classification
from privet.common.modeling import (
    BuiltModel,
    ReadoutBasis,
    _unwrapped,
    build_model,
    draws_randomness,
    readout_basis,
)

__all__ = ["CausalLM", "Classification", "Task", "TaskData", "task_for"]

#: Logit elements one evaluation micro-batch may hold (128 MiB in float32): a causal LM's logits
#: are ``[batch, length, vocabulary]``, 50k wide for SmolLM2.
_EVAL_LOGITS = 1 << 25
#: Generated samples per evaluation (the report shows them), and their length in new tokens.
SAMPLES, SAMPLE_TOKENS = 3, 24


class TaskData(Protocol):
    """What the training loop needs of tokenized data: rows by index and their token counts."""

    lengths: NDArray[np.int64]

    def __len__(self) -> int:
        """Number of examples."""

    def __getitem__(self, index: int) -> Any:
        """One tokenized example, as :meth:`Task.collate` takes it."""


class Task(ABC):
    """What differs between tasks; the loop, DP, aggregation and ledger call only these methods."""

    #: ``model.task``'s value.
    name: ClassVar[str]
    #: The transformers auto class that loads an exported merged model.
    auto_model: ClassVar[str]
    #: The transformers pipeline an exported merged model serves.
    pipeline: ClassVar[str]

    def build_model(
        self,
        model_cfg: ModelConfig,
        adapter_cfg: AdapterConfig,
        *,
        num_labels: int = 2,
        seed: int = 0,
    ) -> BuiltModel:
        """Load the pretrained model and tokenizer and attach the adapter (:func:`build_model`)."""
        if model_cfg.task != self.name:
            model_cfg = model_cfg.model_copy(update={"task": self.name})
        return build_model(model_cfg, adapter_cfg, num_labels=num_labels, seed=seed)

    @abstractmethod
    def tokenize(self, examples: Any, tokenizer: Any, *, max_length: int) -> TaskData:
        """Tokenize ``examples`` once (no padding)."""

    @abstractmethod
    def collate(self, items: Sequence[Any], pad_token_id: int) -> dict[str, torch.Tensor]:
        """Pad a micro-batch of tokenized rows into tensors (``labels`` among them)."""

    @abstractmethod
    def per_example_loss(
        self,
        model: torch.nn.Module,
        batch: dict[str, torch.Tensor],
        *,
        device: torch.device,
        mixed_precision: str,
    ) -> torch.Tensor:
        """The loss of each example of ``batch``, shape ``[B]``, in the autograd graph.

        Example ``i``'s loss depends on row ``i`` only: DP-SGD's per-example clipping relies on it.
        ``batch`` loses its ``labels``.
        """

    @abstractmethod
    def evaluate(
        self,
        model: torch.nn.Module,
        data: Any,
        *,
        batch_size: int,
        pad_token_id: int,
        device: torch.device | None = None,
        mixed_precision: str = "auto",
    ) -> EvalResult:
        """Loss, accuracy and the task's own metrics of ``model`` on ``data`` (no gradients)."""

    def samples(
        self,
        model: torch.nn.Module,
        examples: Any,
        tokenizer: Any,
        *,
        max_length: int,
        device: torch.device | None = None,
    ) -> list[dict[str, str]]:
        """A few of the model's own outputs on ``examples``, for people to read (none by default)."""
        return []

    def training_basis(self, model: torch.nn.Module) -> contextlib.AbstractContextManager[None]:
        """The coordinates the trainable weights train in; the loop trains inside this block.

        The weights read after the block are the model's own. Nothing changes by default.
        """
        return contextlib.nullcontext()


class Classification(Task):
    """Sequence classification: a new head, one label per text, cross-entropy of the label."""

    name = "classification"
    auto_model = "AutoModelForSequenceClassification"
    pipeline = "text-classification"

    def tokenize(self, examples: Any, tokenizer: Any, *, max_length: int) -> TokenizedExamples:
        """Texts to token ids (truncated to ``max_length``), labels kept."""
        if not isinstance(examples, Examples):
            raise DataError(
                "model.task = 'classification' needs labelled texts, but the data holds "
                f"{type(examples).__name__} (prompts and targets for generation)",
                fix="set model.task = 'causal_lm', or use a data source with labels",
            )
        return TokenizedExamples(examples, tokenizer, max_length=max_length)

    def collate(self, items: Sequence[Any], pad_token_id: int) -> dict[str, torch.Tensor]:
        """Pad to the longest row; one label per row (:func:`~privet.common.data.collate`)."""
        return collate(items, pad_token_id)

    def per_example_loss(
        self,
        model: torch.nn.Module,
        batch: dict[str, torch.Tensor],
        *,
        device: torch.device,
        mixed_precision: str,
    ) -> torch.Tensor:
        """Cross-entropy of each row's label."""
        labels = batch.pop("labels")
        with autocast_for(device, mixed_precision):
            logits = model(**batch).logits
        return torch.nn.functional.cross_entropy(logits.float(), labels, reduction="none")

    def evaluate(
        self,
        model: torch.nn.Module,
        data: Any,
        *,
        batch_size: int,
        pad_token_id: int,
        device: torch.device | None = None,
        mixed_precision: str = "auto",
    ) -> EvalResult:
        """Mean cross-entropy and accuracy (:func:`~privet.common.evaluation.evaluate`)."""
        return evaluate_classification(
            model,
            data,
            batch_size=batch_size,
            pad_token_id=pad_token_id,
            device=device,
            mixed_precision=mixed_precision,
        )


@dataclass
class _Rows:
    """Tokenized rows (ids, labels) without a tokenizer: the answer choices of an evaluation."""

    input_ids: list[list[int]]
    labels: list[list[int]]

    def __post_init__(self) -> None:
        self.lengths = np.array([len(r) for r in self.input_ids], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> tuple[list[int], list[int]]:
        return self.input_ids[index], self.labels[index]


class GenerationData(TokenizedGeneration):
    """Tokenized generation examples, plus each answer choice after the same prompts.

    Attributes
    ----------
    choices : list of _Rows
        One row set per answer choice (empty without ``answer_choices``): row ``i`` is example
        ``i``'s prompt followed by that choice.
    answers : numpy.ndarray
        Index of each example's target among the choices (``-1``: not one of them, never counted
        as a match).

    """

    def __init__(self, examples: GenerationExamples, tokenizer: Any, *, max_length: int) -> None:
        super().__init__(examples, tokenizer, max_length)
        self.choices: list[_Rows] = []
        choices = tuple(examples.answer_choices or ())
        norm = [c.strip() for c in choices]
        self.answers = np.array(
            [norm.index(t.strip()) if t.strip() in norm else -1 for t in examples.targets],
            dtype=np.int64,
        )
        for choice in choices:
            bare = tokenizer(choice, add_special_tokens=False)["input_ids"]
            plain = tokenizer(choice, add_special_tokens=True)["input_ids"]
            rows = [self.row(h, plain if h is None else bare) for h in self.heads]
            self.choices.append(_Rows([r[0] for r in rows], [r[1] for r in rows]))


class CausalLM(Task):
    """Causal language modelling: next-token prediction on each example's target tokens."""

    name = "causal_lm"
    auto_model = "AutoModelForCausalLM"
    pipeline = "text-generation"

    def tokenize(self, examples: Any, tokenizer: Any, *, max_length: int) -> GenerationData:
        """Prompts and targets to token ids and per-token labels (:class:`GenerationData`)."""
        if not isinstance(examples, GenerationExamples):
            raise DataError(
                "model.task = 'causal_lm' needs generation examples (plain text, or prompts and "
                f"completions), but the data holds {type(examples).__name__} (labelled texts)",
                fix="use a generation data source, or set model.task = 'classification'",
            )
        return GenerationData(examples, tokenizer, max_length=max_length)

    def collate(self, items: Sequence[Any], pad_token_id: int) -> dict[str, torch.Tensor]:
        """Pad on the right; labels ignored on prompt and padding (:func:`collate_generation`)."""
        return collate_generation(items, pad_token_id)

    def per_example_loss(
        self,
        model: torch.nn.Module,
        batch: dict[str, torch.Tensor],
        *,
        device: torch.device,
        mixed_precision: str,
    ) -> torch.Tensor:
        """Mean next-token cross-entropy over each row's target tokens."""
        ce, mask = _kept_losses(model, batch, device, mixed_precision)
        # Mean over the example's own target tokens: each example weighs the same in the batch
        # however long its target, and its loss depends on its own row only.
        return ce.sum(dim=1) / mask.sum(dim=1).clamp(min=1)

    def training_basis(self, model: torch.nn.Module) -> contextlib.AbstractContextManager[None]:
        """A centered readout trains in its basis (:func:`~privet.common.modeling.readout_basis`)."""
        return readout_basis(model)

    @torch.no_grad()
    def state_directions(
        self,
        model: torch.nn.Module,
        data: TaskData,
        *,
        pad_token_id: int,
        device: torch.device | None = None,
        mixed_precision: str = "auto",
        batch_size: int = 32,
        on_batch: Callable[[int, int], None] | None = None,
    ) -> torch.Tensor:
        """The sum over ``data``'s examples of their unit-norm final state where the answer starts.

        That state (at the position before an example's first target token, the LM head's input
        that picks the answer's first token) is what the readout reads. Each example adds one
        unit vector, so adding or removing an example moves the sum by at most 1: the sensitivity
        of the sum that ``adapter.readout_center`` releases with Gaussian noise. Needs a frozen
        trunk (the readout alone trains); the states are kept (:class:`TrunkStates`) for the
        training that follows. Returns a float64 vector of the hidden size. ``on_batch(done,
        total)`` is told the examples measured after each batch (a progress display).
        """
        trunk = _frozen_trunk(model)
        if trunk is None:
            raise DataError(
                "the readout's direction is measured on a frozen model, but this model trains "
                "more than the readout",
                fix="set adapter.top_layers = 0 with adapter.readout_center",
            )
        decoder, head = trunk
        device = device or next(model.parameters()).device
        total: torch.Tensor | None = None
        order = np.argsort(data.lengths, kind="stable")  # similar lengths pad little
        with eval_mode(model):
            for start in range(0, len(data), batch_size):
                rows = order[start : start + batch_size]
                batch = {
                    k: v.to(device)
                    for k, v in self.collate([data[int(i)] for i in rows], pad_token_id).items()
                }
                labels = batch.pop("labels")
                batch.pop("logits_to_keep", None)
                states, aligned, _ = TRUNK_STATES.states(
                    decoder, head, batch, labels, device, mixed_precision
                )
                # Entry 0 of a row is its answer's first position; a row without a target has
                # nothing kept there (a zero state, an ignored label) and adds nothing.
                first = states[:, 0].double()
                has = (aligned[:, 1] != IGNORE_INDEX) & (first.norm(dim=-1) > 0)
                unit = first[has] / first[has].norm(dim=-1, keepdim=True)
                part = unit.sum(dim=0).cpu()
                total = part if total is None else total + part
                if on_batch is not None:
                    on_batch(min(start + batch_size, len(data)), len(data))
        if total is None:
            raise DataError("no examples to measure the readout's direction on")
        return total

    @torch.no_grad()
    def evaluate(
        self,
        model: torch.nn.Module,
        data: Any,
        *,
        batch_size: int,
        pad_token_id: int,
        device: torch.device | None = None,
        mixed_precision: str = "auto",
    ) -> EvalResult:
        """Perplexity and next-token accuracy on the target tokens; exact match over the choices.

        ``loss`` is the mean cross-entropy over all target tokens of ``data`` (so ``perplexity`` is
        ``exp(loss)``). ``accuracy`` is the exact-match accuracy when the data has answer choices
        (each choice is scored by its log-likelihood after the prompt, the most likely one is the
        answer: deterministic, and cheaper than generating), else the next-token accuracy.
        """
        n = len(data)
        if n == 0:
            return EvalResult(loss=float("nan"), accuracy=float("nan"), num_examples=0)
        device = device or next(model.parameters()).device
        with eval_mode(model):
            ce, tokens, correct, scores = self._passes(
                model, data, batch_size, pad_token_id, device, mixed_precision
            )
        total = max(int(tokens.sum()), 1)
        loss = float(ce.sum()) / total
        metrics = {
            "perplexity": math.exp(min(loss, 700.0)),
            "token-accuracy": float(correct.sum()) / total,
        }
        accuracy = metrics["token-accuracy"]
        if len(scores):
            # Lowest summed cross-entropy = highest log-likelihood of the whole choice.
            picked = scores.argmin(axis=0)
            accuracy = metrics["exact-match"] = float(np.mean(picked == data.answers))
        return EvalResult(loss=loss, accuracy=accuracy, num_examples=n, metrics=metrics)

    @torch.no_grad()
    def samples(
        self,
        model: torch.nn.Module,
        examples: Any,
        tokenizer: Any,
        *,
        max_length: int,
        device: torch.device | None = None,
    ) -> list[dict[str, str]]:
        """Greedy generations for the first :data:`SAMPLES` examples.

        Each is ``{"prompt", "target", "generated"}``: for a chat the last turn, the expected
        answer and the model's; for plain text the first half of the text, the second half, and
        the model's continuation of the first half.
        """
        if not isinstance(examples, GenerationExamples) or len(examples) == 0:
            return []
        device = device or next(model.parameters()).device
        out = []
        with eval_mode(model):
            for i in range(min(SAMPLES, len(examples))):
                turns, target = examples.prompts[i], examples.targets[i]
                if turns is None:
                    ids = [int(t) for t in tokenizer(target)["input_ids"]][: max_length // 2]
                    half = max(1, len(ids) // 2)
                    ids, rest = ids[:half], ids[half:]
                    shown = str(tokenizer.decode(ids, skip_special_tokens=True))
                    target = str(tokenizer.decode(rest, skip_special_tokens=True))
                else:
                    ids = chat_prompt_ids(tokenizer, turns)[-(max_length - 1) :]
                    shown = turns[-1].content
                generated = _generate(model, tokenizer, ids, device)
                out.append({"prompt": shown, "target": target, "generated": generated})
        return out

    @torch.no_grad()
    def choice_losses(
        self,
        model: torch.nn.Module,
        data: Any,
        *,
        batch_size: int,
        pad_token_id: int,
        device: torch.device | None = None,
        mixed_precision: str = "auto",
    ) -> NDArray[np.float64]:
        """Summed cross-entropy of each answer choice after each prompt: what exact match compares.

        Returns
        -------
        numpy.ndarray
            ``[choices, examples]``: entry ``(c, i)`` is minus the log-likelihood of choice ``c``'s
            tokens and the end-of-sequence token after example ``i``'s prompt, the same number a
            forward pass over that whole row gives (up to float rounding). Empty without choices.

        """
        device = device or next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            return self._passes(model, data, batch_size, pad_token_id, device, mixed_precision)[3]
        finally:
            model.train(was_training)

    def _passes(
        self,
        model: torch.nn.Module,
        data: Any,
        batch_size: int,
        pad_token_id: int,
        device: torch.device,
        mixed_precision: str,
    ) -> tuple[NDArray[np.float64], NDArray[np.int64], NDArray[np.int64], NDArray[np.float64]]:
        """Per row: target cross-entropy sum, target tokens, correct next tokens; choice sums.

        The fourth array is ``[choices, rows]``: each answer choice's summed cross-entropy after
        each row's prompt (:meth:`choice_losses`).

        One forward pass over each row. A choice row that is the row itself (the example's own
        answer) takes that pass's sum. Any other choice row shares the row's prompt, so it
        continues from the pass's key/value cache: only its own tokens, and the prompt's last one
        (whose logits predict the choice's first token), go through the model, not the whole
        prompt again. A model without a reusable cache gets one full pass per such row instead.
        """
        n = len(data)
        choices: list[_Rows] = list(getattr(data, "choices", []))
        ce_sum = np.zeros(n, dtype=np.float64)
        tokens = np.zeros(n, dtype=np.int64)
        correct = np.zeros(n, dtype=np.int64)
        scores = np.zeros((len(choices), n), dtype=np.float64)
        vocab = _vocab(model)
        # Logits are kept from the position before a micro-batch's first target token (and a
        # choice's continuation keeps no more): that, not the rows' length, bounds them.
        longest = int(data.lengths.max()) if n else 1
        kept = longest - min((_logits_start(data[i][1]) for i in range(n)), default=0)
        rows = max(1, min(batch_size, _EVAL_LOGITS // max(1, kept * vocab)))
        for mb in length_sorted_microbatches(np.arange(n), data.lengths, rows):
            items = [data[int(i)] for i in mb]
            # (row in the micro-batch, choice, shared prefix) of each choice row to score.
            pending: list[tuple[int, int, int]] = []
            for c, choice in enumerate(choices):
                for j, i in enumerate(mb.tolist()):
                    ids, labels = choice[i]
                    if ids != items[j][0] or labels != items[j][1]:
                        pending.append((j, c, _shared_prefix(ids, labels, items[j][0])))
            batch = collate_generation(items, pad_token_id)
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            labels_t = batch.pop("labels")
            keep = batch["logits_to_keep"]
            with autocast_for(device, mixed_precision):
                out = model(**batch, use_cache=bool(pending))
            ce, mask, hits = _next_token(out.logits, labels_t.index_select(1, keep), hits=True)
            assert hits is not None
            ce_sum[mb] = ce.sum(dim=1).double().cpu().numpy()
            tokens[mb] = mask.sum(dim=1).cpu().numpy()
            correct[mb] = (hits & mask).sum(dim=1).cpu().numpy()
            scores[:, mb] = ce_sum[mb]  # the rows that are their own answer; the rest below
            if not pending:
                continue
            # transformers 5 names the cache ``cache`` (``past_key_values`` before).
            key = "cache" if hasattr(out, "cache") else "past_key_values"
            cache = _layer_cache(getattr(out, key, None))
            if cache is None:
                pending = [(j, c, 0) for j, c, _ in pending]  # whole rows, no cache
            tails = [choices[c][int(mb[j])] for j, c, _ in pending]
            tails = [
                (ids[s:], lab[s:]) for (ids, lab), (_, _, s) in zip(tails, pending, strict=True)
            ]
            width = max(len(t[0]) for t in tails)
            step = max(1, _EVAL_LOGITS // max(1, width * vocab))
            for at in range(0, len(pending), step):
                part = pending[at : at + step]
                got = _continue(
                    model,
                    (key, cache),
                    [j for j, _, _ in part],
                    [s for _, _, s in part],
                    tails[at : at + step],
                    pad_token_id,
                    device,
                    mixed_precision,
                )
                for (j, c, _), value in zip(part, got, strict=True):
                    scores[c, int(mb[j])] = value
        return ce_sum, tokens, correct, scores


def _vocab(model: torch.nn.Module) -> int:
    """The model's vocabulary size (bounds the logits of a micro-batch)."""
    return int(getattr(getattr(model, "config", None), "vocab_size", 0) or 50_000)


def _logits_start(labels: Sequence[int]) -> int:
    """The first position whose logits a row's loss needs: the one before its first label."""
    first = next((t for t, y in enumerate(labels) if y != IGNORE_INDEX), len(labels))
    return max(first - 1, 0)


def _shared_prefix(ids: list[int], labels: list[int], row: list[int]) -> int:
    """How many leading tokens of the choice row ``ids`` may come from ``row``'s cache.

    The tokens both rows share, but at most up to the position before the choice row's first
    predicted label: that position's logits predict the choice's first token, so it goes through
    the model with the choice. A row whose prompt was truncated differently (a longer choice
    leaves less of the prompt) shares only what is really the same.
    """
    first = next((t for t in range(1, len(labels)) if labels[t] != IGNORE_INDEX), len(labels))
    limit = min(first - 1, len(ids) - 1, len(row))
    shared = 0
    while shared < limit and ids[shared] == row[shared]:
        shared += 1
    return shared


def _layer_cache(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """The ``[batch, heads, positions, dim]`` keys and values of each layer, or None.

    Only transformers' plain dynamic cache is read (every layer a full-attention
    ``DynamicLayer``): a sliding-window, quantized or state-space cache cannot be cut per row
    this way, and its model scores each choice row by a full pass instead.
    """
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer
    except ImportError:  # pragma: no cover - an older transformers
        return None
    if type(cache) is not DynamicCache:
        return None
    layers: list[Any] = list(cache.layers)
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        return None
    if any(not layer.is_initialized for layer in layers):
        return None
    return [(layer.keys, layer.values) for layer in layers]


def _continue(
    model: torch.nn.Module,
    named_cache: tuple[str, list[tuple[torch.Tensor, torch.Tensor]] | None],
    rows: list[int],
    shared: list[int],
    tails: list[tuple[list[int], list[int]]],
    pad_token_id: int,
    device: torch.device,
    precision: str,
) -> list[float]:
    """Summed target cross-entropy of choice rows whose first ``shared[k]`` tokens are cached.

    Row ``k`` continues micro-batch row ``rows[k]``: the model sees that row's cached keys and
    values at positions ``0..shared[k]-1`` (the rest of the cache is masked out, so the row's own
    answer and padding take no part) and the choice row's remaining tokens ``tails[k]`` at
    positions ``shared[k]...``, exactly as a pass over the whole choice row would place them.
    """
    from transformers.cache_utils import DynamicCache

    key, cache = named_cache
    batch = collate_generation(tails, pad_token_id)
    keep = batch["logits_to_keep"].to(device)
    labels = batch.pop("labels").to(device).index_select(1, keep)
    tail_mask = batch["attention_mask"]
    past = max(shared) if cache is not None else 0
    start = torch.tensor(shared, dtype=torch.long).unsqueeze(1)
    kept = (torch.arange(past).unsqueeze(0) < start).long()
    inputs: dict[str, Any] = {
        "input_ids": batch["input_ids"].to(device),
        "attention_mask": torch.cat([kept, tail_mask], dim=1).to(device),
        "position_ids": (start + torch.arange(tail_mask.shape[1])).to(device),
        "logits_to_keep": keep,
    }
    if cache is not None and past > 0:
        src = torch.tensor(rows, dtype=torch.long, device=cache[0][0].device)
        # A new cache of copies: the continuation appends to it, and the next chunk of rows
        # reads the micro-batch's cache as the loss pass left it.
        inputs[key] = DynamicCache(
            ddp_cache_data=[(k[src, :, :past], v[src, :, :past]) for k, v in cache]
        )
    with autocast_for(device, precision):
        logits = model(**inputs, use_cache=True).logits
    ce, _, _ = _next_token(logits, labels)
    return [float(v) for v in ce.sum(dim=1).double().cpu()]


def _generate(model: torch.nn.Module, tokenizer: Any, ids: list[int], device: torch.device) -> str:
    """Greedy continuation of ``ids`` (deterministic), decoded without special tokens."""
    prompt = torch.tensor([ids], dtype=torch.long, device=device)
    out = model.generate(  # type: ignore[operator]
        input_ids=prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=SAMPLE_TOKENS,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    return str(tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)).strip()


def _kept_losses(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device, precision: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy at ``batch['logits_to_keep']`` and its mask (:func:`_next_token`)."""
    labels = batch.pop("labels")
    keep = batch["logits_to_keep"]
    trunk = _frozen_trunk(model)
    if trunk is not None:
        # Only the LM head trains: its input comes from the kept states, and only the positions
        # that reach each row's loss (TrunkStates.states: aligned per row, not per batch).
        decoder, head = trunk
        readout = ReadoutHead.of(head)
        states, aligned, fixed = TRUNK_STATES.states(
            decoder, head, batch, labels, device, precision, readout=readout
        )
        if readout is not None and fixed is not None:
            return readout.losses(states, aligned, fixed, device, precision)
        with autocast_for(device, precision):
            logits = head(states)
        ce, mask, _ = _next_token(logits, aligned)
        return ce, mask
    with autocast_for(device, precision):
        logits = model(**batch).logits
    ce, mask, _ = _next_token(logits, labels.index_select(1, keep))
    return ce, mask


@dataclass(frozen=True)
class ReadoutHead:
    """The answer readout's LM head, split into its frozen part and the few weights that train.

    The readout (``adapter.readout_tokens``) is a PEFT LoRA on the LM head whose ``B`` is frozen
    and non-zero on a few token rows only, so ``logits = W h + s B A h`` differs from the base
    model's logits ``W h`` on those rows alone. With a frozen trunk, ``W h`` is the same for a
    kept position in every step; what a step needs from it is fixed: the log-sum-exp of the other
    tokens' base logits, the readout rows' base logits and the label's (:meth:`fixed`). A step
    then costs ``A h`` and a softmax over ``rows + 1`` entries instead of the 49k-wide head
    (:meth:`losses`): the same loss and gradient, up to float rounding. ``A`` still runs as its
    own module, so the per-example clipping hooks (Opacus's and privet's) see its input and
    output as they do through the whole head. PEFT has no such shortcut; it is our own.
    """

    weight: torch.Tensor  # [vocabulary, hidden]: the frozen head
    bias: torch.Tensor | None
    lora_a: torch.nn.Module  # the trainable A
    slot: torch.nn.Module  # what A reads the states through: as they are, or projected
    rows: torch.Tensor  # [R]: the token ids the readout moves
    mix: torch.Tensor  # [R, rank]: scaling * B on those rows
    #: What :meth:`fixed` depends on besides a row and the frozen weights (which key the kept
    #: states already, :class:`TrunkStates`): the rows and the scale.
    signature: tuple[Any, ...]

    @staticmethod
    def of(head: torch.nn.Module, max_rows: int = 64) -> ReadoutHead | None:
        """The split of ``head`` when it is a plain LoRA whose frozen ``B`` moves few rows."""
        base = getattr(head, "base_layer", None)
        active = list(getattr(head, "active_adapters", []))
        if not isinstance(base, torch.nn.Linear) or len(active) != 1:
            return None
        name = active[0]
        if getattr(head, "disable_adapters", True) or getattr(head, "merged", True):
            return None
        if name in getattr(head, "lora_variant", {}) or getattr(head, "fan_in_fan_out", False):
            return None
        try:
            lora_a, lora_b = head.lora_A[name], head.lora_B[name]  # type: ignore[index]
            dropout, scaling = head.lora_dropout[name], head.scaling[name]  # type: ignore[index]
        except (AttributeError, KeyError, TypeError):
            return None
        if not isinstance(lora_a, torch.nn.Linear) or not isinstance(lora_b, torch.nn.Linear):
            return None
        if lora_b.bias is not None or not isinstance(dropout, torch.nn.Identity | ReadoutBasis):
            return None
        if lora_b.weight.requires_grad or any(p.requires_grad for p in base.parameters()):
            return None
        b = lora_b.weight.detach()
        rows = b.abs().sum(dim=1).nonzero().flatten()
        if len(rows) == 0 or len(rows) > max_rows:
            return None
        return ReadoutHead(
            signature=("readout", tuple(rows.tolist()), float(scaling)),
            weight=base.weight.detach(),
            bias=None if base.bias is None else base.bias.detach(),
            lora_a=lora_a,
            slot=dropout,
            rows=rows,
            mix=b.index_select(0, rows).float() * float(scaling),
        )

    @torch.no_grad()
    def fixed(
        self, states: torch.Tensor, labels: torch.Tensor, device: torch.device, precision: str
    ) -> torch.Tensor:
        """What the frozen head gives at one row's kept positions: ``[M, R + 2]``.

        Per position: the other tokens' log-sum-exp, the rows' base logits, and the base logit
        of the label at the next position (0 at the last).
        """
        with autocast_for(device, precision):
            logits = torch.nn.functional.linear(states, self.weight, self.bias)
        logits = logits.float()
        on_rows = logits.index_select(-1, self.rows)
        nxt = labels[1:].clamp(min=0)
        label = logits[:-1].gather(-1, nxt[:, None])[:, 0]
        label = torch.cat([label, label.new_zeros(1)])
        logits.index_fill_(-1, self.rows, float("-inf"))
        return torch.cat([torch.logsumexp(logits, dim=-1)[:, None], on_rows, label[:, None]], -1)

    def losses(
        self,
        states: torch.Tensor,
        labels: torch.Tensor,
        fixed: torch.Tensor,
        device: torch.device,
        precision: str,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The cross-entropy ``[B, M-1]`` and mask the whole head gives (:func:`_next_token`)."""
        with autocast_for(device, precision):
            moved = self.lora_a(self.slot(states))  # hooks fire here
        r = len(self.rows)
        moved = fixed[..., 1 : 1 + r] + moved.float() @ self.mix.T  # the rows' logits, [B, M, R]
        lse = torch.logsumexp(torch.cat([fixed[..., :1], moved], dim=-1), dim=-1)[:, :-1]
        target = labels[:, 1:]
        hit = target[..., None] == self.rows  # [B, M-1, R]: the label is a readout row
        on_row = (moved[:, :-1] * hit).sum(dim=-1)
        label = torch.where(hit.any(dim=-1), on_row, fixed[:, :-1, 1 + r])
        mask = target != IGNORE_INDEX
        return torch.where(mask, lse - label, torch.zeros_like(lse)), mask


def _frozen_trunk(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """``(decoder, LM head)`` when every trainable weight sits in the LM head, else ``None``.

    That is the answer readout alone (``adapter.readout_tokens`` with ``adapter.top_layers = 0``):
    the layers below the head are frozen and, without dropout, compute the same states for an
    example in every epoch and round. A model that draws randomness is never cached.
    """
    inner = _unwrapped(model)  # Opacus's wrapper, looked through
    get_base = getattr(inner, "get_base_model", None)
    base = get_base() if callable(get_base) else inner
    get_decoder = getattr(base, "get_decoder", None)
    get_head = getattr(base, "get_output_embeddings", None)
    if not callable(get_decoder) or not callable(get_head):
        return None
    head = get_head()
    trainable = {id(p) for p in inner.parameters() if p.requires_grad}
    if head is None or not trainable or not trainable <= {id(p) for p in head.parameters()}:
        return None
    if draws_randomness(inner):
        return None
    decoder = get_decoder()
    return (decoder, head) if isinstance(decoder, torch.nn.Module) else None


class TrunkStates:
    """The final hidden states of a frozen trunk, kept per example: the readout's features.

    Only the answer readout trains when :func:`_frozen_trunk` finds a model, so a training
    example's states below the LM head are the same in every epoch and round: they are computed
    once (without gradients) and reused, and an epoch after the first costs the head alone (for
    the readout, its few trainable rows: :class:`ReadoutHead`, whose fixed part is kept too). The
    trainable weights still run on every step with their hooks, so Opacus's and privet's
    per-example clipping see what they see without the cache. A row keeps the states from one
    before its first labelled token to its end (the only positions whose logits reach its loss).
    Keyed by a hash of the frozen weights (decoder and head: replicas of one model share what is
    kept) and the row's tokens and labels; an in-place change of a frozen weight leads to another
    hash, whose states start empty; at most ``max_bytes`` are kept (rows beyond that are
    computed each time).
    """

    def __init__(self, max_bytes: int = 2 << 30) -> None:
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        # The in-process engine's lanes hold replicas of one base model, and a client may play
        # on another lane next round: states are kept per frozen content, not per module object.
        self._fingerprints: weakref.WeakKeyDictionary[torch.nn.Module, tuple[Any, str]] = (
            weakref.WeakKeyDictionary()
        )
        self._by_content: dict[str, dict[Any, Any]] = {}

    @property
    def bytes(self) -> int:
        """Bytes kept now."""
        return sum(int(k["bytes"]) for k in list(self._by_content.values()))

    def clear(self) -> None:
        """Forget every kept state."""
        with self._lock:
            self._by_content = {}
            self._fingerprints = weakref.WeakKeyDictionary()

    def _rows(self, decoder: torch.nn.Module, head: torch.nn.Module) -> dict[Any, Any]:
        """What is kept for the frozen weights of ``decoder`` and ``head`` as they are now."""
        frozen = [p for m in (decoder, head) for p in m.parameters() if not p.requires_grad]
        stamp = tuple((id(p), p._version) for p in frozen)
        with self._lock:
            known = self._fingerprints.get(decoder)
        if known is None or known[0] != stamp:
            # Once per replica and weight change: a hash of every frozen weight (a second or so
            # for SmolLM2 on a CPU), so an in-place change is never read through stale states.
            digest = hashlib.sha256()
            for p in frozen:
                digest.update(str((tuple(p.shape), p.dtype)).encode())
                digest.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().data)
            known = (stamp, digest.hexdigest())
        with self._lock:
            self._fingerprints[decoder] = known
            kept = self._by_content.get(known[1])
            if kept is None:
                # Content no live module holds any more is dropped with its states.
                live = {f for _, f in self._fingerprints.values()}
                self._by_content = {f: k for f, k in self._by_content.items() if f in live}
                kept = {"rows": {}, "sizes": {}, "bytes": 0}
                self._by_content[known[1]] = kept
            return kept

    def states(
        self,
        decoder: torch.nn.Module,
        head: torch.nn.Module,
        batch: dict[str, torch.Tensor],
        labels: torch.Tensor,
        device: torch.device,
        precision: str,
        *,
        readout: ReadoutHead | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Each row's kept states and labels, left-aligned: ``[B, M, hidden]`` and ``[B, M]``.

        Row ``i``'s entry ``j`` is its position ``s_i + j``, where ``s_i`` is one before its first
        labelled token; ``M`` is the longest such range of the batch (3 for a one-word answer and
        its end token), and a shorter row is padded with zero states and ignored labels. Position
        ``j`` still predicts label ``j + 1``, so the loss is the whole model's, while the LM head
        runs on a few positions per row instead of the batch's span of prompts.

        With a ``readout``, the third item is what its frozen head gives at those positions
        (:meth:`ReadoutHead.fixed`, ``[B, M, R + 2]``), kept beside the states; else ``None``.
        """
        ids, mask = batch["input_ids"], batch["attention_mask"]
        kept = self._rows(decoder, head)
        lengths = mask.sum(dim=1).tolist()
        labelled = labels != IGNORE_INDEX
        firsts = [
            max(int(row.nonzero()[0]) - 1, 0) if bool(row.any()) else n
            for row, n in zip(labelled, lengths, strict=True)
        ]
        spans = [
            labels[i, first:n] for i, (first, n) in enumerate(zip(firsts, lengths, strict=True))
        ]
        # The labels are part of the key: the head's fixed part reads them.
        keys = [
            (first, ids[i, :n].cpu().numpy().tobytes(), spans[i].cpu().numpy().tobytes())
            for i, (first, n) in enumerate(zip(firsts, lengths, strict=True))
        ]
        entries: list[dict[Any, torch.Tensor] | None] = [kept["rows"].get(k) for k in keys]
        missing = [i for i, e in enumerate(entries) if e is None]
        if missing:
            rows = torch.tensor(missing, device=ids.device)
            inputs = {k: batch[k].index_select(0, rows) for k in ("input_ids", "attention_mask")}
            if "position_ids" in batch:
                inputs["position_ids"] = batch["position_ids"].index_select(0, rows)
            with torch.no_grad(), autocast_for(device, precision):
                hidden = decoder(**inputs).last_hidden_state
            for j, i in enumerate(missing):
                entries[i] = {"states": hidden[j, firsts[i] : lengths[i]].detach().clone()}
        signature = None if readout is None else readout.signature
        fresh = set(missing)
        for i, entry in enumerate(entries):
            assert entry is not None
            grew = i in fresh
            if readout is not None and signature not in entry:
                on = entry["states"].to(readout.weight.device)  # kept by another replica's lane
                entry[signature] = readout.fixed(on, spans[i].to(on.device), device, precision)
                grew = True
            if grew:  # a row kept as it was costs no bookkeeping on the step's hot path
                self._keep(kept, keys[i], entry)
        found = [e for e in entries if e is not None]
        width = max(2, max(len(e["states"]) for e in found))
        first = found[0]["states"]
        out = first.new_zeros((len(found), width, int(first.shape[-1])))
        aligned = labels.new_full((len(found), width), IGNORE_INDEX)
        fixed = None
        if signature is not None:
            fixed = torch.zeros((len(found), width, len(readout.rows) + 2), device=first.device)  # type: ignore[union-attr]
        for i, e in enumerate(found):
            n = len(e["states"])
            out[i, :n] = e["states"]
            aligned[i, :n] = spans[i]
            if fixed is not None:
                fixed[i, :n] = e[signature]
        return out, aligned, fixed

    def _keep(self, kept: dict[Any, Any], key: Any, entry: dict[Any, torch.Tensor]) -> None:
        """Keep ``entry`` under ``key`` (or count what it grew by) while ``max_bytes`` allows."""
        size = sum(t.numel() * t.element_size() for t in entry.values())
        with self._lock:
            known = kept["sizes"].get(key)
            if known is not None:
                kept["bytes"] += size - known  # kept already: only its readout part may be new
                kept["sizes"][key] = size
            elif self.bytes + size <= self.max_bytes:
                kept["rows"][key] = entry
                kept["sizes"][key] = size
                kept["bytes"] += size


#: The process's kept trunk states (one per process; replicas of a base model share them).
TRUNK_STATES = TrunkStates()


def _next_token(
    logits: torch.Tensor, labels: torch.Tensor, *, hits: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Position ``t`` predicts token ``t + 1``.

    Returns the cross-entropy ``[B, L-1]`` (0 where the label is ignored, with no gradient), the
    mask of labelled positions and, with ``hits``, where the most likely token is the label.
    """
    shifted = logits[:, :-1].float()
    target = labels[:, 1:]
    ce = torch.nn.functional.cross_entropy(
        shifted.transpose(1, 2), target, ignore_index=IGNORE_INDEX, reduction="none"
    )
    mask = target != IGNORE_INDEX
    return ce, mask, (shifted.argmax(dim=-1) == target) if hits else None


_TASKS: dict[str, Task] = {t.name: t for t in (Classification(), CausalLM())}


def task_for(model_cfg: ModelConfig | str) -> Task:
    """The task ``model.task`` names (or the task of that name)."""
    name = model_cfg if isinstance(model_cfg, str) else model_cfg.task
    return _TASKS[name]
