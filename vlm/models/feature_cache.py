"""A frozen vision tower's features, computed once per training sample and reused in every later epoch.

With the ViT frozen (and kept in eval mode) and the tiler deterministic, a sample's tiles always give the same patch
features, so the tower need only see each image once. Features are kept per sample (all its tiles), in memory up to a
byte budget, then in a folder: `DIR/<fingerprint>/<hash of the sample's identity>.safetensors`. The fingerprint hashes
the tower's settings and weights (their dtype too), the tiler's settings and any autocast the tower runs under, so a
changed tower, tiler or precision reads a fresh subfolder and never the old features. A sample's identity is its key
in its shard, and the shard file's full path, size and modification time, so a rewritten shard, or another project's
shard of the same relative name, is a miss. A shard that is no local file (a URL, a `pipe:` command) has no such
fingerprint, so its features serve this process only: a later run reads the shard's images again. Files are written
atomically, so ranks sharing a folder can read each other's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vlm.data.shards import file_version
from vlm.data.tiler import Tiler
from vlm.models.vision import VisionTower

log = logging.getLogger(__name__)


def fingerprint(vision: VisionTower, tiler: Tiler, precision: str = "") -> str:
    """A hash of everything a tile's features depend on: the tower's settings and weights, the tiler's settings, and
    the `precision` the tower runs in (bf16 autocast gives other features than float32)."""
    digest = hashlib.sha256()
    settings = {"vision": dataclasses.asdict(vision.config), "tiler": dataclasses.asdict(tiler.config),
                "tile_size": tiler.tile_size, "mean": tiler.mean, "std": tiler.std, "precision": precision}
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for name, tensor in sorted(vision.state_dict().items()):
        digest.update(name.encode())
        # a copy: numpy() pins a tensor's storage, and FSDP resizes the storage of the parameters it shards
        copy = tensor.detach().to("cpu", copy=True).reshape(-1)
        digest.update(copy.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:20]


def computed_in(device: torch.device) -> str:
    """How the tower computes on `device` here, beyond its weights' dtype (in the fingerprint already): under an
    autocast dtype (a bf16-mixed run), and on CUDA with TF32 matmuls or not (trainer.matmul_precision)."""
    autocast = f"autocast {torch.get_autocast_dtype(device.type)}" if torch.is_autocast_enabled(device.type) else ""
    matmuls = f"float32 matmuls {torch.get_float32_matmul_precision()}" if device.type == "cuda" else ""
    return f"{autocast};{matmuls}"


class VisionFeatureCache:
    """Patch features (N_tiles, P, Dv) per sample key; `patch_features` computes only those not seen before."""

    def __init__(self, vision: VisionTower, tiler: Tiler, memory_bytes: int, directory: str | Path):
        self.vision, self.tiler = vision, tiler
        self.memory_bytes = memory_bytes
        self.root = Path(directory).expanduser()
        self.memory: dict[str, torch.Tensor] = {}
        self.memory_used = 0
        self.folder: Path | None = None  # fingerprinted at first use, once a resumed run has loaded its weights
        self.hits = self.misses = 0
        self.shard_ids: dict[str, str] = {}  # shard name as read -> its identity (path, size, modification time)
        self.process = uuid.uuid4().hex  # the identity of the shards read here that are no local files

    def patch_features(self, keys: list[str], pixel_values: torch.Tensor, tiles: list[int]) -> torch.Tensor:
        """The tower's features of (N_tiles, 3, S, S) tiles belonging to samples `keys`, `tiles[i]` tiles each in
        order -> (N_tiles, P, Dv), the tower run once on the tiles of the samples not cached yet.

        The tower runs at every call, on no tiles when every sample is cached or text-only, and the first call
        fingerprints it: under FSDP every rank must run the same blocks and gathers, whatever its batch holds."""
        if self.folder is None:
            self.folder = self.root / fingerprint(self.vision, self.tiler, computed_in(pixel_values.device))
            log.info("vision feature cache: %s (up to %.1f GB in memory)", self.folder, self.memory_bytes / 1e9)
        keys = [self._identity(key) for key in keys]
        chunks = pixel_values.split(tiles)  # per sample: (tiles[i], 3, S, S)
        with_tiles = [i for i, count in enumerate(tiles) if count]
        found = {i: self._get(keys[i]) for i in with_tiles}
        # a sample cut to another model.llm.max_length keeps fewer (or more) of its images: not the cached tiles
        found = {i: None if f is not None and f.shape[0] != tiles[i] else f for i, f in found.items()}
        missing = [i for i in with_tiles if found[i] is None]
        self.hits += len(with_tiles) - len(missing)
        self.misses += len(missing)
        with torch.no_grad():
            computed = self.vision.patch_features(torch.cat([pixel_values[:0], *(chunks[i] for i in missing)]))
        for i, features in zip(missing, computed.split([tiles[i] for i in missing]), strict=True):
            found[i] = features
            self._put(keys[i], features)
        device = pixel_values.device
        return torch.cat([computed[:0].to(device), *(found[i].to(device) for i in with_tiles)])  # (N_tiles, P, Dv)

    def _identity(self, key: str) -> str:
        """"shard:key" -> the key with the shard file's resolved path, size and modification time; a shard that is no
        local file (a URL or a pipe), whose content may have changed since another run read it, with this process's
        identity instead."""
        shard, _, sample = key.rpartition(":")
        if shard not in self.shard_ids:
            self.shard_ids[shard] = file_version(shard) or f"{shard}|{self.process}"
        return f"{self.shard_ids[shard]}:{sample}"

    def _file(self, key: str) -> Path:
        assert self.folder is not None
        return self.folder / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.safetensors"

    def _get(self, key: str) -> torch.Tensor | None:
        if key in self.memory:
            return self.memory[key]
        path = self._file(key)
        return load_file(path)["features"] if path.is_file() else None

    def _put(self, key: str, features: torch.Tensor) -> None:
        features = features.detach().to("cpu", copy=True)  # its own storage, not a view of the batch's
        size = features.numel() * features.element_size()
        if self.memory_used + size <= self.memory_bytes:
            self.memory[key] = features
            self.memory_used += size
            return
        path = self._file(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(handle)
        save_file({"features": features.contiguous()}, temporary)
        os.replace(temporary, path)
