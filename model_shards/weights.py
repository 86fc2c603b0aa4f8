"""HF-layout safetensors checkpoints: write the whole model, read back any slice of it.

Why our own loader: each pipeline stage and expert shard must read only the tensors it owns (a Super
checkpoint is ~240 GB in bf16), so we open every file with `safe_open` (memory-mapped) and pull just
the needed keys. Names on disk are the Hugging Face ones (MODEL.md): `backbone.layers.{i}...`,
`lm_head.weight`, `mtp.layers...`, and one tensor per routed expert (`experts.{e}.up_proj.weight`),
which we stack into the model's `experts.up` / `experts.down`.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .config import ModelConfig
from .model import HybridModel
from .moe import RoutedExperts

log = logging.getLogger("hybridserve.weights")

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_EXPERT_PROJ = {"up": "up_proj", "down": "down_proj"}


class CheckpointError(ValueError):
    """A checkpoint folder is incomplete or does not fit the config; the message names what and where."""


@dataclass(frozen=True)
class Target:
    """Where one checkpoint tensor goes: a model state-dict entry, or row `expert` of a stacked one."""

    model_name: str
    expert: int | None = None


# ---- names ---------------------------------------------------------------------------------------
def checkpoint_names(model: nn.Module) -> dict[str, Target]:
    """Checkpoint tensor name -> where it lands in `model`, for every tensor this (slice of the) model owns."""
    stacked = {f"{prefix}.{attr}": (prefix, attr, mod)
               for prefix, mod in model.named_modules() if isinstance(mod, RoutedExperts)
               for attr in _EXPERT_PROJ}
    out: dict[str, Target] = {}
    for name in model.state_dict():
        if name in stacked:
            prefix, attr, mod = stacked[name]
            for j in range(mod.num_local):
                out[f"{prefix}.{mod.first_expert + j}.{_EXPERT_PROJ[attr]}.weight"] = Target(name, j)
        else:
            out[name] = Target(name)
    return out


def required_tensor_names(model: nn.Module) -> set[str]:
    """The checkpoint names a slice reads: exactly these, no others."""
    return set(checkpoint_names(model))


# ---- save ----------------------------------------------------------------------------------------
def _is_whole(model: HybridModel) -> bool:
    experts = [m for m in model.modules() if isinstance(m, RoutedExperts)]
    return (model.first and model.last and len(model.layer_ids) == model.cfg.num_hidden_layers
            and all(m.first_expert == 0 and m.num_local == model.cfg.n_routed_experts for m in experts))


def checkpoint_tensors(model: HybridModel) -> dict[str, torch.Tensor]:
    """Checkpoint name -> tensor (experts unstacked, the router's correction bias in float32)."""
    state = model.state_dict()
    out = {}
    for ck_name, t in checkpoint_names(model).items():
        x = _dest(state, t)
        if ck_name.endswith("e_score_correction_bias"):
            x = x.float()
        out[ck_name] = x.detach().to("cpu").contiguous()
    return out


def save_checkpoint(model: HybridModel, folder: str | os.PathLike, *, max_shard_bytes: int | None = None) -> list[Path]:
    """Write config.json and the weights in HF layout; returns the safetensors files written.

    One `model.safetensors`, or with `max_shard_bytes` as many `model-0000i-of-0000n.safetensors` as
    needed (a tensor larger than the limit gets a file of its own) plus `model.safetensors.index.json`.
    """
    if not _is_whole(model):
        raise CheckpointError("save_checkpoint needs the whole model (all layers and experts), not a slice")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    if cfg.has_mtp and model.mtp is None:   # the files will hold no MTP: say so in the config too
        cfg = _without_mtp(cfg)
    cfg.save(folder)
    tensors = checkpoint_tensors(model)
    meta = {"format": "pt"}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if max_shard_bytes is None:
        save_file(tensors, str(folder / SINGLE_FILE), metadata=meta)
        log.info("saved %d tensors (%.1f MB) to %s", len(tensors), total / 1e6, folder / SINGLE_FILE)
        return [folder / SINGLE_FILE]
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    n = len(shards)
    weight_map, files = {}, []
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file(shard, str(folder / fname), metadata=meta)
        weight_map.update({k: fname for k in shard})
        files.append(folder / fname)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    log.info("saved %d tensors (%.1f MB) in %d files to %s", len(tensors), total / 1e6, n, folder)
    return files


# ---- load ----------------------------------------------------------------------------------------
def checkpoint_index(folder: str | os.PathLike) -> dict[str, str]:
    """Tensor name -> file name, from the index if there is one, else from the files' headers."""
    folder = Path(folder)
    if (folder / INDEX_FILE).exists():
        try:
            weight_map = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{folder / INDEX_FILE}: unreadable index ({e})") from None
        for fname in sorted(set(weight_map.values())):
            if not (folder / fname).exists():
                raise CheckpointError(f"{folder / INDEX_FILE} names {fname}, which is not in {folder}")
        return dict(weight_map)
    files = [folder / SINGLE_FILE] if (folder / SINGLE_FILE).exists() else sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no {SINGLE_FILE}, {INDEX_FILE} or other *.safetensors in {folder}")
    index = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            index.update({k: path.name for k in f.keys()})
    return index


def _has_weight_files(folder: Path) -> bool:
    return (folder / INDEX_FILE).exists() or any(folder.glob("*.safetensors"))


def _require_config(folder: Path) -> Path:
    path = folder / "config.json"
    if not path.exists():
        raise CheckpointError(f"config.json is missing from checkpoint folder {folder}")
    return path


def _without_mtp(cfg: ModelConfig) -> ModelConfig:
    return cfg.replace(num_nextn_predict_layers=0, mtp_hybrid_override_pattern="")


def read_config(folder: str | os.PathLike, *, index: dict[str, str] | None = None) -> ModelConfig:
    """config.json as this checkpoint can serve it: with MTP off when the files hold no `mtp.*` tensors
    (a warning), so that planners, engines and the loader all agree on whether there is an MTP block."""
    folder = Path(folder)
    cfg = ModelConfig.from_json(_require_config(folder))
    if cfg.has_mtp and (index is not None or _has_weight_files(folder)):
        index = checkpoint_index(folder) if index is None else index
        if not any(k.startswith("mtp.") for k in index):
            log.warning("config.json in %s describes an MTP block but the files hold no mtp.* tensors: "
                        "serving with MTP off", folder)
            cfg = _without_mtp(cfg)
    return cfg


def _dest(state: dict[str, torch.Tensor], t: Target) -> torch.Tensor:
    return state[t.model_name] if t.expert is None else state[t.model_name][t.expert]


def load_into(model: nn.Module, folder: str | os.PathLike, *, index: dict[str, str] | None = None,
              device: str | torch.device = "cpu") -> set[str]:
    """Fill every tensor `model` owns from the checkpoint in `folder`; returns the names read.

    Reads only those names, file by file; checks each shape before reading the data. Tensors in the
    files that the slice does not own (other layers, experts, transformers-only buffers) are never read.
    """
    folder = Path(folder)
    index = checkpoint_index(folder) if index is None else index
    wanted = checkpoint_names(model)
    missing = sorted(n for n in wanted if n not in index)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"tensor {missing[0]} is missing from the checkpoint in {folder}{more}")
    by_file: dict[str, list[str]] = {}
    for name in sorted(wanted):
        by_file.setdefault(index[name], []).append(name)
    state = model.state_dict()          # detached views that share storage with the parameters
    total_bytes = sum(_dest(state, t).numel() * _dest(state, t).element_size() for t in wanted.values())
    done_bytes, read = 0, set()
    for n_file, (fname, names) in enumerate(sorted(by_file.items()), 1):
        with safe_open(str(folder / fname), framework="pt", device=str(device)) as f:
            present = set(f.keys())
            for name in names:
                if name not in present:
                    raise CheckpointError(f"tensor {name} is missing from {folder / fname} (the index puts it there)")
                t = wanted[name]
                dest = _dest(state, t)
                found = tuple(f.get_slice(name).get_shape())
                if found != tuple(dest.shape):
                    raise CheckpointError(f"tensor {name} in {folder / fname}: expected shape {tuple(dest.shape)}, "
                                          f"found {found}")
                with torch.no_grad():
                    dest.copy_(f.get_tensor(name))
                read.add(name)
                done_bytes += dest.numel() * dest.element_size()
        log.info("loaded %s: %d tensors (file %d/%d, %.0f%%)", fname, len(names), n_file, len(by_file),
                 100.0 * done_bytes / max(total_bytes, 1))
    return read


# ---- dtype ---------------------------------------------------------------------------------------
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}  # what we compute in


def checkpoint_dtype(folder: str | os.PathLike, *, index: dict[str, str] | None = None) -> torch.dtype:
    """The floating dtype holding most of the checkpoint's weight elements (bf16 for a Hub Super checkpoint,
    float32 for our presets), read from the files' headers only. The router's correction bias, float32 in
    every checkpoint, does not count."""
    folder = Path(folder)
    index = checkpoint_index(folder) if index is None else index
    elements: dict[torch.dtype, int] = {}
    by_file: dict[str, list[str]] = {}
    for name, fname in index.items():
        if not name.endswith("e_score_correction_bias"):
            by_file.setdefault(fname, []).append(name)
    for fname, names in by_file.items():
        with safe_open(str(folder / fname), framework="pt") as f:
            for name in names:
                sl = f.get_slice(name)
                dt = _SAFETENSORS_DTYPES.get(sl.get_dtype().upper())
                if dt is not None:
                    n = 1
                    for d in sl.get_shape():
                        n *= d
                    elements[dt] = elements.get(dt, 0) + n
    if not elements:
        raise CheckpointError(f"no floating-point tensors in the checkpoint in {folder}")
    return max(elements, key=elements.get)


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device,
                  folder: str | os.PathLike | None = None, *, index: dict[str, str] | None = None) -> torch.dtype:
    """The dtype a model is loaded and computes in (EngineConfig.dtype). "auto": float32 on a CPU (what
    the CPU path computes in, end to end), the checkpoint's own dtype (`checkpoint_dtype`) on a GPU;
    else a name in DTYPES or a torch dtype. The KV cache is kept in it too (HybridModel.make_cache)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if torch.device(device).type == "cpu":
            return torch.float32
        if folder is None:
            raise ValueError("dtype 'auto' on a GPU needs the checkpoint folder (its dtype)")
        return checkpoint_dtype(folder, index=index)
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected auto or one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def load_checkpoint(folder: str | os.PathLike, *, layers: range | None = None,
                    expert_range: tuple[int, int] | None = None, with_mtp: bool | None = None,
                    dtype: str | torch.dtype = "auto", device: str | torch.device = "cpu") -> HybridModel:
    """Build the slice (`layers`, `expert_range`, MTP) described by config.json and load its tensors.

    `dtype` (resolve_dtype): "auto" is float32 on a CPU, the checkpoint's dtype on a GPU; the weights
    are converted to it as they are read (the router's correction bias stays float32).
    A checkpoint without `mtp.*` tensors loads with MTP off (a warning; the returned model's config says
    so too, as `read_config` does) unless `with_mtp=True` asks for it, which is then an error.
    """
    folder = Path(folder)
    _require_config(folder)
    index = checkpoint_index(folder)
    cfg = read_config(folder, index=index)
    dtype = resolve_dtype(dtype, device, folder, index=index)
    if with_mtp and not cfg.has_mtp:
        raise CheckpointError(f"with_mtp=True, but the checkpoint in {folder} has no MTP block "
                              f"(none in config.json, or no mtp.* tensors in the files)")
    with torch.device("meta"):          # no memory and no random init for weights we overwrite anyway
        model = HybridModel(cfg, layers, with_mtp=with_mtp, expert_range=expert_range)
    model = model.to(dtype=dtype).to_empty(device=device)
    for mod in model.modules():         # the router's correction bias stays float32, as on disk
        if hasattr(mod, "e_score_correction_bias"):
            mod.e_score_correction_bias = mod.e_score_correction_bias.float()
    load_into(model, folder, index=index, device=device)
    model.checkpoint_folder = folder     # its tokenizer.json, for grammar masks (model_shards/grammar.py)
    if model.mtp is not None:
        model.checkpoint_draft_vocab = read_draft_vocab(folder, cfg.vocab_size)
    return model.eval()


DRAFT_VOCAB_FILE = "draft_vocab.json"


def read_draft_vocab(folder: str | os.PathLike, vocab_size: int) -> torch.Tensor | None:
    """The token ids MTP drafts may take (`draft_vocab.json`: {"token_ids": [...]}, written by
    training/draft_vocab.py), or None when the checkpoint has none. Serving restricts drafts to them
    (model_shards/drafter.py): a smaller draft head, the same outputs."""
    path = Path(folder) / DRAFT_VOCAB_FILE
    if not path.exists():
        return None
    try:
        ids = json.loads(path.read_text())["token_ids"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: expected JSON with a token_ids list ({e})") from None
    if not ids or len(set(ids)) != len(ids) or not all(isinstance(i, int) and 0 <= i < vocab_size for i in ids):
        raise CheckpointError(f"{path}: token_ids must be distinct ints in 0..{vocab_size - 1}, at least one")
    log.info("draft vocabulary: %d of %d tokens (%s)", len(ids), vocab_size, path.name)
    return torch.tensor(ids, dtype=torch.long)
