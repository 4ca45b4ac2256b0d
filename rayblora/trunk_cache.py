"""Frozen-trunk feature cache: the hidden states entering the first adapted decoder layer, once per prompt.

With LoRA on the top layers only (`adapter.layers`), the hidden states h_{L₀} (T, H) that enter the first
adapted layer L₀ depend on nothing but the frozen base, L₀ and the prompt's real token ids (positions count
real tokens only and left padding is masked, :func:`rayblora.data.batches.position_ids`). They are the same for every
member, epoch, sample and evaluation method, so this cache computes them once per prompt and every later forward
starts at L₀ (:meth:`rayblora.scoring.AnswerScorer.shared_trunk`).

* An entry's key is the sha256 of the prompt's real token ids after truncation (and, for a packed multiple-choice
  row, of which option each token belongs to): another tokenizer, another `max_length` or another example gives
  other ids and misses; equal ids (and parts) have equal hidden states.
* A cache belongs to one identity: the base model's fingerprint, L₀ and the hidden dtype. Its file is
  `<dir>/<identity digest>.safetensors` (hidden states of every entry concatenated, offsets, key digests; the
  identity in the safetensors metadata) beside a JSON sidecar holding the file's sha256: a truncated or altered
  file fails that check and the cache starts empty (and is written again), never read as valid.
* Pad positions of an assembled batch hold zeros: no real position attends to them, and their outputs reach
  neither the answer logits nor a gradient (KFAC masks them too).

The driver of a Ray run fills the cache for the training and validation splits and writes it once
(:func:`rayblora.workflows.members.prepare_trunk_cache`); each member's workers read the file, so the trunk runs
once for K members × E epochs. Read with safetensors only: no pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from rayblora.manifest import sha256_file, write_atomic, write_text_atomic

TrunkFn = Callable[[dict[str, torch.Tensor]], torch.Tensor]
"""Computes the trunk hidden states (B, T, H) of a left-padded batch (input_ids, attention_mask[, segments])."""


def token_key(ids: torch.Tensor, segments: torch.Tensor | None = None) -> bytes:
    """Digest (32 bytes) of one prompt's real token ids (T,), and of a packed multiple-choice row's `segments` (T,)
    (which option each token belongs to: the same ids split into other options attend otherwise)."""
    digest = hashlib.sha256(ids.to(torch.int64).cpu().numpy().tobytes())
    if segments is not None:
        digest.update(b"segments" + segments.to(torch.int64).cpu().numpy().tobytes())
    return digest.digest()


class TrunkCache:
    """Hidden states h_{L₀} (T_i, H) per prompt, for one base model (fingerprint), L₀ and dtype.

    Args:
        fingerprint: `base_fingerprint` of the frozen base model.
        start: L₀, the first adapted decoder layer (> 0).
        dtype: the dtype the trunk computes in (entries are kept in it: fp32, or bf16 for a bf16 base).
        directory: where the cache file lives ("" / None = memory only).
        log: where hits / misses / size and file events are reported.
    """

    def __init__(self, fingerprint: str, start: int, dtype: torch.dtype, directory: str | os.PathLike | None = None,
                 log: Callable[[str], object] = print):
        if start < 1:
            raise ValueError(f"a trunk cache needs a first adapted layer > 0, got {start}")
        self.fingerprint, self.start, self.dtype, self.log = fingerprint, int(start), dtype, log
        self.directory = Path(directory) if directory else None
        self.entries: dict[bytes, torch.Tensor] = {}
        self.hits = self.misses = 0
        self._on_disk = 0
        """Entries the file at :attr:`path` holds (read or written by this object): save() skips an unchanged cache."""

    # --- identity and size --------------------------------------------------------------------------------
    @property
    def identity(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "first_adapted_layer": self.start, "dtype": str(self.dtype)}

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.identity, sort_keys=True).encode()).hexdigest()[:20]

    @property
    def path(self) -> Path | None:
        return None if self.directory is None else self.directory / f"{self.digest}.safetensors"

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.entries.values())

    def summary(self) -> str:
        return (f"trunk cache (layers < {self.start}): {len(self.entries)} prompts, {self.nbytes / 2**20:.1f} MiB, "
                f"{self.hits} hits / {self.misses} misses")

    # --- lookup ---------------------------------------------------------------------------------------------
    def hidden(self, batch: dict[str, torch.Tensor], compute: TrunkFn) -> torch.Tensor:
        """Trunk hidden states (B, T, H) of a left-padded batch: cached rows copied, missing prompts computed once
        with `compute` on a sub-batch of their own (trimmed to its longest prompt) and stored; pad positions 0.
        A row counts as a miss when it was computed, as a hit otherwise."""
        ids, mask, segments = batch["input_ids"], batch["attention_mask"].bool(), batch.get("segments")
        keys = [token_key(ids[b][mask[b]], None if segments is None else segments[b][mask[b]])
                for b in range(ids.shape[0])]
        first_rows = {key: b for b, key in reversed(list(enumerate(keys)))}
        missing = sorted(b for key, b in first_rows.items() if key not in self.entries)
        if missing:
            self._fill({name: batch[name][missing] for name in ("input_ids", "attention_mask", "segments")
                        if name in batch}, [keys[b] for b in missing], compute)
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        return self._assemble(keys, mask)

    def _fill(self, rows: dict[str, torch.Tensor], keys: list[bytes], compute: TrunkFn) -> None:
        lengths = rows["attention_mask"].sum(-1)
        width = int(lengths.max())
        hidden = compute({name: tensor[:, -width:] for name, tensor in rows.items()})
        for row, (key, n) in enumerate(zip(keys, lengths.tolist())):
            self.entries[key] = hidden[row, hidden.shape[1] - n:].detach().to("cpu", self.dtype).clone()

    def _assemble(self, keys: list[bytes], mask: torch.Tensor) -> torch.Tensor:
        first = self.entries[keys[0]]
        out = torch.zeros(len(keys), mask.shape[1], first.shape[-1], dtype=self.dtype)
        for row, key in enumerate(keys):
            entry = self.entries[key]
            if entry.shape[0] != int(mask[row].sum()):
                raise RuntimeError("trunk cache: an entry's length differs from its prompt's (digest collision)")
            out[row, mask.shape[1] - entry.shape[0]:] = entry
        return out

    # --- the file -------------------------------------------------------------------------------------------
    def save(self) -> Path | None:
        """Write every entry to :attr:`path` (atomically, with its sha256 in the JSON sidecar); None if memory-only
        or if the file already holds every entry."""
        if self.path is None or len(self.entries) == self._on_disk:
            return None
        keys = list(self.entries)
        lengths = torch.tensor([self.entries[k].shape[0] for k in keys], dtype=torch.int64)
        tensors = {"hidden": torch.cat([self.entries[k] for k in keys]).contiguous(),
                   "offsets": torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]),
                   "keys": torch.frombuffer(bytearray(b"".join(keys)), dtype=torch.uint8).view(len(keys), 32)}
        metadata = {k: str(v) for k, v in self.identity.items()}

        def write(tmp: str) -> None:  # the sidecar goes first: a failure leaves the old file and sidecar as pair
            save_file(tensors, tmp, metadata=metadata)
            sidecar = {**self.identity, "entries": len(keys), "sha256": sha256_file(tmp)}
            write_text_atomic(self._sidecar, json.dumps(sidecar, indent=2))

        try:
            write_atomic(self.path, write, mode=0o644)
        except OSError as exc:
            self.log(f"[trunk cache] could not write {self.path} ({exc.strerror or exc}); the file on disk is "
                     "unchanged and this run goes on with the cache in memory")
            return None
        self._on_disk = len(keys)
        self.log(f"[trunk cache] wrote {len(keys)} prompts ({self.path.stat().st_size / 2**20:.1f} MiB) to "
                 f"{self.path}")
        return self.path

    @property
    def _sidecar(self) -> Path:
        return self.path.with_suffix(".json")

    def load(self) -> bool:
        """Read :attr:`path` if it is there and verifies (identity and sha256); False (cache unchanged) else."""
        path = self.path
        if path is None or not path.is_file():
            return False
        try:
            sidecar = json.loads(self._sidecar.read_text())
            identity = {k: sidecar.get(k) for k in self.identity}
            if sidecar.get("sha256") != sha256_file(path) or identity != self.identity:
                raise ValueError("checksum or identity mismatch")
            tensors = load_file(str(path))
            hidden, offsets, keys = tensors["hidden"], tensors["offsets"].tolist(), tensors["keys"]
        except (OSError, ValueError, KeyError, SafetensorError) as exc:
            self.log(f"[trunk cache] {path} is not a valid cache ({exc}); recomputing it")
            return False
        for row in range(keys.shape[0]):
            self.entries[bytes(keys[row].tolist())] = hidden[offsets[row]:offsets[row + 1]].to(self.dtype)
        self._on_disk = len(self.entries)
        self.log(f"[trunk cache] read {keys.shape[0]} prompts from {path}")
        return True
