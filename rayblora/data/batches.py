"""Tokenised batches and a resumable, deterministic training order.

A batch is a dict of tensors: `input_ids` (B, T) and `attention_mask` (B, T), left-padded so that position
T-1 is every prompt's last token, `labels` (B,) and `num_choices` (B,). A generation task's batch
(rows with a `target`) holds prompt + target + end-of-sequence tokens instead, with `target_mask` (B, T) marking
the target's tokens and the end-of-sequence token (the positions whose likelihood is trained). A multiple-choice
batch scored by option likelihood (rows with `choices`) packs each row into one sequence, its prompt followed by
every option's tokens, with `segments` (B, T) numbering the parts (0: prompt or padding, c + 1: option c): each
option attends to the prompt and to itself only and its positions continue the prompt's, so every option is
scored exactly as a separate prompt + option sequence would be, while the prompt runs once per row
(:func:`choice_batch`, :func:`position_ids`, :func:`model_attention`).
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np
import torch


CHAT = "rayblora_chat_template"
"""Attribute that marks a tokenizer whose prompts go through its chat template (:func:`use_chat_template`)."""


def use_chat_template(tokenizer) -> None:
    """Mark `tokenizer` so every prompt tokenised here is first wrapped in its own chat template (one user turn,
    the assistant's turn opened): the one switch for training, evaluation, serving and generation, which all
    tokenise prompts through this module. Raises ValueError if the tokenizer has no template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("data.chat_template: the base model's tokenizer has no chat template")
    setattr(tokenizer, CHAT, True)


def prompt_texts(tokenizer, prompts: Sequence[str]) -> list[str]:
    """The prompts as they are tokenised: in the chat template when the tokenizer is marked, else as given."""
    if not getattr(tokenizer, CHAT, False):
        return list(prompts)
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                          add_generation_prompt=True) for p in prompts]


def encode(tokenizer, prompts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    """Left-pad and left-truncate prompts so the last token (the answer position) is kept."""
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"
    enc = tokenizer(prompt_texts(tokenizer, prompts), padding=True, truncation=True, max_length=max_length,
                    return_tensors="pt", add_special_tokens=False)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def choice_batch(tokenizer, prompts: Sequence[str], choices: Sequence[Sequence[str]],
                 max_length: int) -> dict[str, torch.Tensor]:
    """Packed rows (B, T ≤ max_length), left-padded: prompt tokens, then each option's tokens in order;
    `attention_mask` (B, T) marks real tokens and `segments` (B, T) the part each belongs to (0 prompt / pad,
    c + 1 option c). Prompt and options are tokenised apart (lm-evaluation-harness's continuation scoring); a long
    prompt loses its first tokens, and a row whose options alone do not fit is refused."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = []
    for prompt, options in zip(prompt_texts(tokenizer, prompts), choices):
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        o = tokenizer(list(options), add_special_tokens=False)["input_ids"]
        span = sum(len(t) for t in o)
        if span >= max_length or min(len(t) for t in o) == 0:
            raise ValueError(f"the options of {prompt[:40]!r} take {span} tokens (one is empty or they leave no room "
                             f"for the question); data.max_length is {max_length}")
        p = p[max(0, len(p) + span - max_length):]
        rows.append((p + [i for t in o for i in t], [0] * len(p) + [c + 1 for c, t in enumerate(o) for _ in t]))
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask, segments = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, (row_ids, row_segments) in enumerate(rows):
        ids[i, width - len(row_ids):] = torch.tensor(row_ids)
        mask[i, width - len(row_ids):] = 1
        segments[i, width - len(row_ids):] = torch.tensor(row_segments)
    return {"input_ids": ids, "attention_mask": mask, "segments": segments}


def option_token_counts(tokenizer, choices: Sequence[Sequence[str]]) -> np.ndarray:
    """Each row's tokens over all its options (N,), every option tokenised apart as :func:`choice_batch` does."""
    return np.array([sum(len(t) for t in tokenizer(list(options), add_special_tokens=False)["input_ids"])
                     for options in choices], dtype=np.int64)


def check_options_fit(splits: dict[str, Any], tokenizer, max_length: int) -> None:
    """Refuse, before any work, multiple-choice rows whose options alone leave no room for their question in
    `max_length` tokens (:func:`choice_batch` would fail on them mid-run); `splits` maps names to datasets. Raises
    ValueError naming the split, up to five rows, and the `data.max_length` the longest needs."""
    for name, split in splits.items():
        if "choices" not in split.column_names or not len(split):
            continue
        spans = option_token_counts(tokenizer, split["choices"])
        over = np.flatnonzero(spans >= max_length)
        if len(over):
            raise ValueError(f"split {name!r}: the options of {len(over)} rows (rows {over[:5].tolist()}) take "
                             f"{int(spans.max())} tokens at most, leaving no room for the question in "
                             f"data.max_length={max_length}; raise data.max_length above {int(spans.max())} or "
                             "drop those rows")


def position_ids(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Positions (B, T) counted over real tokens only, so left padding does not shift a prompt's score; in a
    packed multiple-choice row each option's positions continue the prompt's (as in its own sequence)."""
    mask = batch["attention_mask"].long()
    segments = batch.get("segments")
    if segments is None:
        return (mask.cumsum(-1) - 1).clamp(min=0)
    prompt = mask * (segments == 0)
    parts = torch.nn.functional.one_hot(segments, int(segments.max()) + 1) * mask[..., None]  # (B, T, C + 1)
    within = (parts.cumsum(1) * parts).sum(-1)  # 1-based index of each token inside its own part
    return torch.where(segments == 0, prompt.cumsum(-1) - 1, prompt.sum(-1, keepdim=True) + within - 1).clamp(min=0)


def model_attention(batch: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The attention mask a decoder forward takes: `attention_mask` (B, T) as it is, or for a packed
    multiple-choice batch the additive (B, 1, T, T) mask in `dtype` (0 where a query sees a key, the dtype's
    minimum elsewhere): real keys at or before the query, in the prompt or in the query's own option; every query
    sees itself, so no padded row is fully masked."""
    mask, segments = batch["attention_mask"].bool(), batch.get("segments")
    if segments is None:
        return batch["attention_mask"]
    length = mask.shape[-1]
    positions = torch.arange(length, device=mask.device)
    causal = positions[None, :] <= positions[:, None]  # (T query, T key)
    same_part = (segments[:, None, :] == 0) | (segments[:, None, :] == segments[:, :, None])  # (B, T, T)
    visible = (causal[None] & same_part & mask[:, None, :]) | torch.eye(length, dtype=torch.bool, device=mask.device)
    return torch.zeros(visible.shape, dtype=dtype, device=mask.device).masked_fill(
        ~visible, torch.finfo(dtype).min)[:, None]


def generation_batch(tokenizer, prompts: Sequence[str], targets: Sequence[str],
                     max_length: int) -> dict[str, torch.Tensor]:
    """Left-padded prompt + target + EOS token ids (B, T ≤ max_length), `attention_mask` and `target_mask` (B, T).

    Prompt and target are tokenised apart and joined (as lm-evaluation-harness scores a continuation), so the
    target's tokens are those the model generates after the prompt; a long prompt loses its first tokens."""
    eos = tokenizer.eos_token_id
    rows = []
    for prompt, target in zip(prompt_texts(tokenizer, prompts), targets):
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        t = tokenizer(target, add_special_tokens=False)["input_ids"] + [eos]
        if len(t) >= max_length:
            raise ValueError(f"target {target[:40]!r} has {len(t)} tokens with EOS; data.max_length is {max_length}")
        rows.append((p[max(0, len(p) + len(t) - max_length):], t))
    width = max(len(p) + len(t) for p, t in rows)
    ids = torch.full((len(rows), width), eos, dtype=torch.long)
    mask, target_mask = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, (p, t) in enumerate(rows):
        ids[i, width - len(p) - len(t):] = torch.tensor(p + t)
        mask[i, width - len(p) - len(t):] = 1
        target_mask[i, width - len(t):] = 1
    return {"input_ids": ids, "attention_mask": mask, "target_mask": target_mask}


def make_batch(tokenizer, rows: dict[str, list[Any]], max_length: int) -> dict[str, torch.Tensor]:
    """Batch from column-oriented rows (`prompt`, `label`, `num_choices`; `target` for generation, `choices` for
    multiple choice scored by option likelihood)."""
    if "target" in rows:
        batch = generation_batch(tokenizer, rows["prompt"], rows["target"], max_length)
    elif "choices" in rows:
        batch = choice_batch(tokenizer, rows["prompt"], rows["choices"], max_length)
    else:
        batch = encode(tokenizer, rows["prompt"], max_length)
    batch["labels"] = torch.as_tensor(rows["label"], dtype=torch.long)
    batch["num_choices"] = torch.as_tensor(rows["num_choices"], dtype=torch.long)
    return batch


def token_lengths(tokenizer, rows: dict[str, list[Any]], max_length: int) -> np.ndarray:
    """Each row's token count as batched (N,): its prompt's tokens (with a generation target's and EOS, or every
    option's), at most `max_length`."""
    prompts = tokenizer(prompt_texts(tokenizer, rows["prompt"]), add_special_tokens=False)["input_ids"]
    lengths = np.array([len(p) for p in prompts])
    if "target" in rows:
        targets = tokenizer(list(rows["target"]), add_special_tokens=False)["input_ids"]
        lengths += np.array([len(t) + 1 for t in targets])
    if "choices" in rows:
        lengths += option_token_counts(tokenizer, rows["choices"])
    return np.minimum(lengths, max_length)


def eval_batches(dataset, tokenizer, batch_size: int, max_length: int,
                 by_length: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Batches over a split (no shuffling, last batch may be short), in row order; with `by_length`, rows of
    similar token length together (shortest first, ties in row order), each batch carrying `rows` (B,), its rows'
    indices in the split. A left-padded batch runs every row at its longest row's length: on VADER's test
    splits, batches of 16 in row order are 63-69 % real tokens, by length 98-99 %."""
    order = np.arange(len(dataset))
    if by_length and len(dataset):
        order = np.argsort(token_lengths(tokenizer, dataset[:], max_length), kind="stable")
    for start in range(0, len(dataset), batch_size):
        rows = order[start:start + batch_size]
        batch = make_batch(tokenizer, dataset[rows.tolist()] if by_length else dataset[start:start + batch_size],
                           max_length)
        if by_length:
            batch["rows"] = torch.as_tensor(rows, dtype=torch.long)
        yield batch


def train_batch_indices(n: int, batch_size: int, seed: int, batch_number: int) -> np.ndarray:
    """Row indices of the `batch_number`-th training batch (0-based) of a seeded epoch-wise shuffle.

    Each epoch is a fresh permutation seeded by (seed, epoch); incomplete tail batches are dropped. A pure
    function of its arguments, so a resumed run continues at exactly the batch where it stopped.
    """
    if n < batch_size:
        raise ValueError(f"training split has {n} rows, fewer than one batch of {batch_size}")
    per_epoch = n // batch_size
    epoch, within = divmod(batch_number, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return order[within * batch_size:(within + 1) * batch_size]


def train_batch(dataset, tokenizer, batch_size: int, max_length: int, seed: int,
                batch_number: int) -> dict[str, torch.Tensor]:
    """The `batch_number`-th training batch (see :func:`train_batch_indices`)."""
    idx = train_batch_indices(len(dataset), batch_size, seed, batch_number)
    return make_batch(tokenizer, dataset[idx.tolist()] if len(idx) else dataset[:0], max_length)


def length_sorted_batches(dataset, tokenizer, batch_size: int, max_length: int) -> Iterator[dict[str, torch.Tensor]]:
    """Batches over a split with its prompts ordered by token length, so each batch pads little (for passes
    whose order does not matter, e.g. filling a cache); `labels` / `num_choices` as in :func:`make_batch`."""
    tokenizer.truncation_side = "left"
    lengths = [len(ids) for ids in tokenizer(prompt_texts(tokenizer, dataset["prompt"]), truncation=True,
                                             max_length=max_length, add_special_tokens=False)["input_ids"]]
    order = np.argsort(lengths, kind="stable")
    for start in range(0, len(order), batch_size):
        yield make_batch(tokenizer, dataset[order[start:start + batch_size].tolist()], max_length)
