"""Loading CineMA checkpoints into a ConvViT with CineMA's exact semantics.

Chapter: notebooks/00_foundation_model_and_lora (loading the foundation model).

Two kinds of file are understood:

- an **MAE pretraining checkpoint** (CineMA's ``pretrained/cinema.safetensors``, or one
  written by :mod:`medlora_lib.models.mae`): keys are copied under their own name after
  dropping every key that contains ``mask``, ``decoder``, ``_head``, a non-SAX view
  name (``lax_2c``, ``lax_3c``, ``lax_4c``), ``dec_linear`` or ``pos_embed`` (the
  reason reported is the first substring in that order, as in CineMA's list); the
  first conv kernel ``[C, 1, ...]`` is tiled ``in_frames`` times along dim 1 without
  rescaling; afterwards only ``enc_down_dict.sax.pos_embed`` (recomputed, identical)
  and the heads may be missing, and no key may be unexpected
  (``cinema.convvit.load_pretrain_weights``);
- a **fine-tuned ConvViT checkpoint** (it has ``pred_head_dict.cls.*``): loaded
  strictly, every key and shape must match (``ConvViT.from_finetuned``).

``.safetensors`` files are read key by key; ``.pt`` files are ``torch.load(...)
["model"]`` (CineMA's ``save_checkpoint``) or a plain state dict.
"""

from __future__ import annotations

import json
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from medlora_lib.errors import CheckpointError
from medlora_lib.models.convvit import VIEW, ConvViT, ConvViTConfig

__all__ = [
    "SMALL_FM_PATH",
    "HUB_REPO_ID",
    "HUB_FILENAME",
    "DROP_SUBSTRINGS",
    "LoadReport",
    "load_pretrained",
    "resolve_weights",
    "drop_reason",
    "read_state_dict",
    "save_convvit",
    "load_convvit",
]

#: The embedded small foundation model (written by the pretraining script).
SMALL_FM_PATH = (
    Path(__file__).resolve().parent.parent / "assets" / "small_fm.safetensors"
)
HUB_REPO_ID = "mathpluscode/CineMA"
HUB_FILENAME = "pretrained/cinema.safetensors"
#: Substrings that drop an MAE key, in CineMA's order (views other than SAX included).
DROP_SUBSTRINGS = (
    "mask",
    "decoder",
    "_head",
    "lax_2c",
    "lax_3c",
    "lax_4c",
    "dec_linear",
    "pos_embed",
)
FIRST_CONV = f"enc_down_dict.{VIEW}.conv_blocks.0.patch_embed.conv.weight"
_CONVVIT_FORMAT = "medlora-convvit-v1"


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did with every key."""

    source: str
    kind: str  #: "mae" (CineMA pretraining semantics) or "convvit" (strict)
    loaded: list[str] = field(default_factory=list)  #: copied unchanged
    adapted: dict[str, str] = field(default_factory=dict)  #: key -> what was done
    dropped: dict[str, str] = field(default_factory=dict)  #: file key -> reason
    missing: list[str] = field(default_factory=list)  #: model keys left as initialised
    frozen: bool = False

    @property
    def n_loaded(self) -> int:
        """Keys taken from the file (unchanged + adapted)."""
        return len(self.loaded) + len(self.adapted)

    def __str__(self) -> str:
        reasons: dict[str, int] = {}
        for r in self.dropped.values():
            reasons[r] = reasons.get(r, 0) + 1
        lines = [
            f"LoadReport({self.kind} checkpoint: {self.source})",
            f"  loaded    {len(self.loaded)} keys unchanged"
            + (" (now frozen)" if self.frozen else ""),
            f"  adapted   {len(self.adapted)}"
            + "".join(f"\n    {k}: {v}" for k, v in self.adapted.items()),
            f"  dropped   {len(self.dropped)}"
            + "".join(f"\n    {n:4d} x {r}" for r, n in sorted(reasons.items())),
            f"  missing   {len(self.missing)} (left as initialised)"
            + "".join(f"\n    {k}" for k in self.missing),
        ]
        return "\n".join(lines)


def drop_reason(key: str) -> str | None:
    """CineMA's reason to drop an MAE key when fine-tuning SAX, or None to keep it."""
    for s in DROP_SUBSTRINGS:
        if s in key:
            return f"substring '{s}'"
    return None


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Cheap TCP probe of the hub host, so that no network fails in seconds."""
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        with socket.create_connection((host or "huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_error(why: str, err: BaseException | None = None) -> CheckpointError:
    detail = ""
    if err is not None:
        first = str(err).splitlines()[0] if str(err) else ""
        detail = f": {type(err).__name__}: {first}"
    return CheckpointError(
        f"cannot fetch {HUB_FILENAME} from the Hugging Face hub repo {HUB_REPO_ID} "
        f"({why}{detail}). On a machine with internet run `hf download "
        f"{HUB_REPO_ID} {HUB_FILENAME} --local-dir cinema_weights` (or download it from "
        f"https://huggingface.co/{HUB_REPO_ID}/tree/main/pretrained), copy the file here "
        "and pass its path: load_pretrained(model, "
        "'cinema_weights/pretrained/cinema.safetensors'), or in a run config "
        "model.pretrained='cinema_weights/pretrained/cinema.safetensors' (`medlora run "
        "... --set model.pretrained=cinema_weights/pretrained/cinema.safetensors`)."
    )


def _hub_download() -> Path:
    """The public CineMA checkpoint: HF cache first, then a fast-failing download."""
    import huggingface_hub

    try:
        return Path(
            huggingface_hub.hf_hub_download(
                repo_id=HUB_REPO_ID, filename=HUB_FILENAME, local_files_only=True
            )
        )
    except Exception:  # noqa: BLE001 - not cached: try the network below
        pass
    if os.environ.get("HF_HUB_OFFLINE", "").lower() not in ("", "0", "false", "no"):
        raise _hub_error("HF_HUB_OFFLINE is set and the file is not in the HF cache")
    if not _hub_reachable():
        raise _hub_error("no network: the hub host cannot be reached")
    try:
        return Path(
            huggingface_hub.hf_hub_download(
                repo_id=HUB_REPO_ID, filename=HUB_FILENAME, etag_timeout=10
            )
        )
    except Exception as err:  # noqa: BLE001 - any failure means "not available here"
        raise _hub_error("download failed", err) from err


def _resolve(source: str | os.PathLike[str]) -> Path:
    s = str(source)
    if s in ("hub", HUB_REPO_ID):
        return _hub_download()
    if s in ("small", "default"):
        if not SMALL_FM_PATH.is_file():
            raise CheckpointError(
                f"the embedded small foundation model {SMALL_FM_PATH} is missing; "
                "create it with the small-FM pretraining script in data_scripts/ "
                "(or reinstall medlora), or pass a checkpoint path"
            )
        return SMALL_FM_PATH
    path = Path(s).expanduser()
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} does not exist; pass a .safetensors / .pt file, "
            "'hub' for CineMA's public weights or 'small' for the embedded model"
        )
    return path


def resolve_weights(source: str | os.PathLike[str]) -> Path:
    """The file ``source`` names (``"hub"``: the HF cache, then a fast-failing
    download), without reading it: lets a run refuse missing weights before it starts.

    Raises:
        CheckpointError: the file does not exist, or the hub file is not cached and
            cannot be fetched (the message says how to get it).
    """
    return _resolve(source)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` file or a ``.pt`` file (``["model"]`` or a state dict).

    Raises:
        CheckpointError: unknown suffix or unreadable content.
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        if path.suffix in (".pt", ".pth"):
            obj = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
                obj = obj["model"]
            if isinstance(obj, dict) and all(
                isinstance(v, torch.Tensor) for v in obj.values()
            ):
                return dict(obj)
            raise CheckpointError(
                f"{path} holds no state dict: expected a dict with a 'model' state dict "
                "(CineMA save_checkpoint) or a plain {name: tensor} dict"
            )
    except CheckpointError:
        raise
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from err
    raise CheckpointError(
        f"{path}: unknown checkpoint suffix {path.suffix!r}; use .safetensors or .pt"
    )


def _shape_error(path: Path, key: str, got: Any, want: Any) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {path} does not fit this model: first mismatching key '{key}' has "
        f"shape {list(got)} in the file but {list(want)} in the model; build the model "
        "with the checkpoint's architecture (size, conv_chans, image_size, num_classes)"
    )


_BLOCK_KEY = re.compile(r"^encoder\.blocks\.(\d+)\.")


def _n_blocks(keys: Any) -> int:
    """Transformer blocks named in a state dict's keys (highest index + 1; 0 if none)."""
    found = [int(m.group(1)) for k in keys if (m := _BLOCK_KEY.match(k))]
    return max(found) + 1 if found else 0


def _depth_hint(ckpt_keys: Any, target_keys: Any) -> str:
    """The fix when a checkpoint and the model differ in depth ("" otherwise)."""
    have, want = _n_blocks(ckpt_keys), _n_blocks(target_keys)
    if not have or not want or have == want:
        return ""
    return (
        f" [depth: {have} transformer blocks in the checkpoint, {want} in the model; "
        f"build the model with depth={have}, e.g. build_convvit(size, image_size, "
        f"depth={have}); the embedded 'small' FM and CineMA-base have 12]"
    )


def load_pretrained(
    model: nn.Module,
    source: str | os.PathLike[str],
    *,
    strict_shapes: bool = True,
    freeze: bool = False,
) -> LoadReport:
    """Load CineMA-format weights into ``model`` in place (CineMA's semantics).

    Args:
        model: a :class:`~medlora_lib.models.ConvViT` (real tensors, not meta).
        source: a ``.safetensors`` / ``.pt`` path; ``"hub"`` or
            ``"mathpluscode/CineMA"`` for the public CineMA MAE checkpoint (needs
            network or the HF cache); ``"small"`` / ``"default"`` for the embedded
            small FM (:data:`SMALL_FM_PATH`).
        strict_shapes: refuse (True) or skip and report (False) keys whose shapes do
            not fit; skipped keys must then be allowed to stay initialised.
        freeze: set ``requires_grad=False`` on every parameter taken from the file.

    Returns:
        A :class:`LoadReport`.

    Raises:
        CheckpointError: missing file / hub unreachable, shape mismatch (naming the
            first key and both shapes), missing encoder keys, unexpected keys.
    """
    path = _resolve(source)
    ckpt = read_state_dict(path)
    target = model.state_dict()
    finetuned = "pred_head_dict.cls.weight" in ckpt
    report = LoadReport(source=str(path), kind="convvit" if finetuned else "mae")
    state: dict[str, torch.Tensor] = {}
    skipped: list[str] = []

    kept: dict[str, torch.Tensor] = {}
    for key, value in ckpt.items():
        reason = None if finetuned else drop_reason(key)
        if reason is not None:
            report.dropped[key] = reason
        else:
            kept[key] = value
    unexpected = [k for k in kept if k not in target]
    if unexpected:
        raise CheckpointError(
            f"checkpoint {path} has {len(unexpected)} unexpected key(s) that this model "
            f"does not have: {unexpected[:10]}; is it a CineMA "
            f"{'ConvViT' if finetuned else 'MAE'} checkpoint of the same architecture?"
            + _depth_hint(kept, target)
        )
    # shapes are checked in the model's state-dict order, so "first" is well defined
    # whatever order the file stores its keys in (safetensors sorts them)
    for key, want_t in target.items():
        if key not in kept:
            continue
        value, want = kept[key], want_t.shape
        file_shape = value.shape
        if (
            not finetuned
            and key == FIRST_CONV
            and value.ndim == 5
            and value.shape[1] == 1
            and want[1] != 1
        ):
            value = value.repeat(1, want[1], 1, 1, 1)
            report.adapted[key] = f"repeat x{want[1]} along dim 1 (no rescale)"
        if value.shape != want:
            if strict_shapes:
                raise _shape_error(path, key, file_shape, want)
            report.adapted.pop(key, None)
            report.dropped[key] = f"shape {list(file_shape)} != model {list(want)}"
            skipped.append(key)
            continue
        state[key] = value
        if key not in report.adapted:
            report.loaded.append(key)

    report.missing = [k for k in target if k not in state]
    if finetuned:
        allowed = set(skipped)
    else:
        allowed = {f"enc_down_dict.{VIEW}.pos_embed", *skipped}
        allowed |= {k for k in target if k.startswith("pred_head_dict.")}
    bad = [k for k in report.missing if k not in allowed]
    if bad:
        raise CheckpointError(
            f"checkpoint {path} lacks {len(bad)} key(s) the model needs: "
            f"{bad[:10]}{' ...' if len(bad) > 10 else ''}; only the pos_embed and the "
            "heads may be missing"
            + (
                ""
                if not finetuned
                else " from an MAE file (this one is a fine-tuned ConvViT, loaded strictly)"
            )
            + _depth_hint(kept, target)
        )
    with torch.no_grad():
        incompatible = model.load_state_dict(state, strict=False)
    assert not incompatible.unexpected_keys
    if freeze:
        for name, p in model.named_parameters():
            if name in state:
                p.requires_grad_(False)
        report.frozen = True
    return report


def save_convvit(
    model: ConvViT, path: str | Path, metadata: dict[str, Any] | None = None
) -> Path:
    """Save a full ConvViT (250 CineMA keys at base size) with its config as metadata.

    The file is a fine-tuned CineMA-format checkpoint: :func:`load_pretrained` loads
    it strictly, :func:`load_convvit` rebuilds the model from it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": _CONVVIT_FORMAT,
        "config": model.config.to_json(),
        "extra": json.dumps(metadata or {}, sort_keys=True),
    }
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(sd, str(path), meta)
    return path


def load_convvit(path: str | Path) -> ConvViT:
    """Rebuild a ConvViT written by :func:`save_convvit` (strict load).

    Raises:
        CheckpointError: the file has no medlora config metadata or does not fit it.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
    if meta.get("format") != _CONVVIT_FORMAT:
        raise CheckpointError(
            f"{path} carries no medlora ConvViT config (metadata format "
            f"{meta.get('format')!r}); build the model with build_convvit(...) and use "
            "load_pretrained(model, path) instead"
        )
    model = ConvViT(ConvViTConfig.from_dict(json.loads(meta["config"])))
    load_pretrained(model, path)
    return model
