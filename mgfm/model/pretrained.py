"""Reading public VideoMAE checkpoints: encoder and pretraining decoder, for a run's ``init_from=``.

Layouts understood (:data:`LAYOUTS`):

* a Hugging Face VideoMAE folder (``config.json`` + weights) of ``VideoMAEModel``,
  ``VideoMAEForPreTraining`` (its decoder too) or ``VideoMAEForVideoClassification``; the encoder is read
  by :mod:`mgfm.model.hf`, the decoder here;
* an original VideoMAE (MCG-NJU/VideoMAE) or VideoMAE V2 (OpenGVLab/VideoMAEv2) checkpoint file: ``.pth``
  / ``.pt`` / ``.bin`` read with ``torch.load(weights_only=True)`` (``argparse.Namespace``, which the
  original training scripts store as ``args``, is allowed as well), or ``.safetensors``; the state dict
  under ``model``, ``module`` or ``state_dict``, or at the top level. Two key layouts:

  - pretraining (``PretrainVisionTransformer``): ``encoder.patch_embed.proj.*``, ``encoder.blocks.{i}.*``,
    ``encoder.norm.*``, ``encoder_to_decoder.weight``, ``mask_token``, ``decoder.blocks.{i}.*``,
    ``decoder.norm.*``, ``decoder.head.*``;
  - encoder or fine-tuned (``VisionTransformer``): ``patch_embed.proj.*``, ``blocks.{i}.*`` and ``norm.*``,
    or with mean pooling ``fc_norm.*``, plus a classifier ``head.*``; ``fc_norm`` (applied after pooling)
    and ``head`` are not part of the encoder and are left out (logged), as ``VideoMAEModel`` leaves them
    out of a ``VideoMAEForVideoClassification``. A ``backbone.`` prefix is dropped (VideoMAE V2 does).

  Blocks carry ``attn.qkv.weight`` with optional ``attn.q_bias`` / ``attn.v_bias``; a ``pos_embed`` table
  is either the fixed sinusoid table or a learned one (``use_learnable_pos_emb``).

Key names and shapes were read from the public model definitions (``modeling_pretrain.py`` /
``modeling_finetune.py`` of both repositories); no code was taken from them (VideoMAE V1 is CC BY-NC). No
kept library ships this mapping: transformers 5.25 has no VideoMAE conversion script (its
``conversion_mapping`` only renames the q/v biases, which :mod:`mgfm.model.hf` accepts) and timm has no
VideoMAE, so the names are mapped here.

What a ``.pth`` does not hold is inferred (:func:`read_checkpoint`): depth and widths from the tensors;
attention heads, which no tensor shape shows, from the recipe's ``model.heads`` when its width is the
checkpoint's, else from the standard sizes (:data:`HEADS_BY_WIDTH`); frames / crop size from the length
of a stored position table, else the recipe's (the fixed table is then built for the recipe's clip, as
VideoMAE's own fine-tuning rebuilds it); layer norm eps 1e-6 (both repositories' ``LayerNorm``).

VideoMAE's decoder head (and ``VideoMAEForPreTraining``'s) predicts a token's pixels in the order
``(tubelet, patch, patch, C)``; ours predicts ``(C, tubelet, patch, patch)`` (:func:`mgfm.model.encoder.patchify`),
so the head's rows are permuted on reading and the loss is the same.
"""

from __future__ import annotations

import argparse
import logging
import math
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file

from mgfm.model.hf import (BLOCK_KEYS, EncoderFolderError, WeightReader, check_compatible, hf_block_state,
                           hf_folder_config, hf_to_encoder_state, read_hf_weights)
from mgfm.model.encoder import CUSTOM, SIZES, ModelConfig, VideoEncoder, at_geometry
from mgfm.model.layers import sinusoid_table
from mgfm.model.masked import MaskedVideoModel, PixelDecoder

log = logging.getLogger(__name__)

LAYOUTS = ("a Hugging Face VideoMAE folder (config.json + weights: VideoMAEModel, VideoMAEForPreTraining or "
           "VideoMAEForVideoClassification), or an original VideoMAE / VideoMAE V2 checkpoint file (.pth, "
           ".safetensors) with 'encoder.'/'decoder.' keys (pretraining) or 'patch_embed.'/'blocks.' keys "
           "(encoder, fine-tuned)")
CONTAINER_KEYS = ("model", "module", "state_dict")  # where training scripts put the state dict
DROPPED_PREFIXES = ("backbone.",)
HEAD_KEYS = ("fc_norm.", "head.")  # a fine-tuned model's pooling norm and classifier: not the encoder
DECODER_KEYS = ("decoder.", "encoder_to_decoder.", "mask_token")  # a pretraining checkpoint's decoder side
VIDEOMAE_EPS = 1e-6  # partial(nn.LayerNorm, eps=1e-6) in both repositories
VIDEOMAE_CLIP = {"frames": 16, "img_size": 224}  # the published checkpoints' clip, where nothing else says
TABLE_ATOL = 1e-4  # a stored table this close to the sinusoid one is the fixed table
VIDEOMAE_V2_GIANT = {"dim": 1408, "heads": 16}  # ViT-g/14 of VideoMAE V2 (not in SIZES)
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.")
# unsupported parts of the original blocks, named in the error (the weight name ends with the key)
_UNSUPPORTED = {"gamma_1": "layer scale (init_values > 0)", "gamma_2": "layer scale (init_values > 0)",
                "attn.scale": "cosine attention (VideoMAE V2 cos_attn)",
                "attn.qkv.bias": "a bias on k as well (VideoMAE has q and v biases only)"}


def _heads_by_width() -> dict[int, int]:
    table: dict[int, int] = {VIDEOMAE_V2_GIANT["dim"]: VIDEOMAE_V2_GIANT["heads"]}
    for preset in SIZES.values():
        for dim, heads in ((preset["dim"], preset["heads"]), (preset["decoder_dim"], preset["decoder_heads"])):
            if table.setdefault(dim, heads) != heads:
                raise AssertionError(f"SIZES give width {dim} two head counts")  # a table edit gone wrong
    return table


#: Attention heads of the standard widths (SIZES' encoders and decoders, VideoMAE V2's ViT-g): the weights of
#: a ``.pth`` do not say how many heads split a width.
HEADS_BY_WIDTH: dict[int, int] = _heads_by_width()


class CheckpointError(EncoderFolderError):
    """A checkpoint file or folder that cannot start a model; one line naming it and the first problem."""


@dataclass
class Checkpoint:
    """A public checkpoint read into our names: ``encoder`` is a :class:`VideoEncoder` state dict (with
    ``pos_embed.table`` when the table is learned), ``decoder`` a :class:`PixelDecoder` one for a pixel target
    (None when the checkpoint has no decoder); ``cfg`` describes both."""

    source: Path
    layout: str
    cfg: ModelConfig
    encoder: dict[str, torch.Tensor]
    decoder: dict[str, torch.Tensor] | None


# ----------------------------------------------------------------------------------------------------
# reading


def read_checkpoint(path: str | Path, hint: ModelConfig | None = None) -> Checkpoint:
    """Read a checkpoint of any layout in :data:`LAYOUTS`; ``hint`` (the run's model config) gives what the
    weights of a ``.pth`` do not say (heads of a non-standard width, the clip geometry without a position
    table, the target normalisation). Raises :class:`CheckpointError` (one line) for anything unreadable."""
    path = Path(path)
    if path.is_dir():
        return _read_hf_folder(path)
    if not path.is_file():
        raise CheckpointError(path, f"no such file or folder (expected {LAYOUTS})")
    return _read_original(path, _state_dict(path), hint)


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            raw = load_file(str(path))
        else:
            with torch.serialization.safe_globals([argparse.Namespace]):
                raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        detail = _unpickler_detail(err)
        if detail.startswith("Unsupported global"):
            raise CheckpointError(path, f"torch.load(weights_only=True) refuses the Python objects it holds beside "
                                        f"tensors ({detail.split('. ')[0]})") from None
        raise CheckpointError(path, f"not a readable checkpoint (UnpicklingError: {detail})") from None
    except Exception as err:  # noqa: BLE001 - any reader failure is one line
        raise CheckpointError(path, f"not a readable checkpoint ({type(err).__name__}: {_first_line(err)})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(path, f"holds a {type(raw).__name__}, not a state dict (expected {LAYOUTS})")
    container = next((k for k in CONTAINER_KEYS if isinstance(raw.get(k), dict)), None)
    state = raw[container] if container else raw
    odd = next((k for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
    if not state or odd is not None:
        where = f"under {container!r}" if container else "at the top level"
        what = f"{odd!r} is a {type(state[odd]).__name__}" if odd is not None else "it is empty"
        raise CheckpointError(path, f"holds no state dict {where}: {what} (expected tensors at the top level or "
                                    f"under one of {list(CONTAINER_KEYS)})")
    return state


def _first_line(err: Exception) -> str:
    return next((line.strip() for line in str(err).splitlines() if line.strip()), "")


def _unpickler_detail(err: Exception) -> str:
    """What torch's weights-only unpickler objected to (its message wraps it in advice over several lines)."""
    text = str(err)
    if "WeightsUnpickler error:" not in text:
        return _first_line(err)
    rest = text.split("WeightsUnpickler error:", 1)[1]
    return next((line.strip() for line in rest.splitlines() if line.strip()), "")


def _read_hf_folder(folder: Path) -> Checkpoint:
    cfg = hf_folder_config(folder)
    weights = read_hf_weights(folder)
    decoder_keys = {k for k in weights if k.startswith(DECODER_KEYS)}
    encoder = hf_to_encoder_state({k: v for k, v in weights.items() if k not in decoder_keys}, cfg, folder)
    decoder = None
    if decoder_keys:
        decoder = _read_decoder({k: weights[k] for k in decoder_keys}, folder, cfg, lambda reader, i: hf_block_state(
            reader, f"decoder.decoder_layers.{i}.", f"blocks.{i}.", cfg.qv_bias), lambda key: f"decoder {key} (mgfm name)")
    kind = "VideoMAEForPreTraining" if decoder else "encoder"
    return Checkpoint(folder, f"Hugging Face {kind} folder", cfg, encoder, decoder)


def _read_original(path: Path, state: dict[str, torch.Tensor], hint: ModelConfig | None) -> Checkpoint:
    for prefix in DROPPED_PREFIXES:
        state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
    if "encoder.patch_embed.proj.weight" in state:
        prefix, kind = "encoder.", "pretraining"
    elif "patch_embed.proj.weight" in state:
        prefix, kind = "", "encoder"
    elif any(k.startswith(("videomae.", "embeddings.patch_embeddings")) for k in state):
        raise CheckpointError(path, "Hugging Face VideoMAE weights without their config.json: give the folder "
                                    "that holds both")
    else:
        raise CheckpointError(path, f"unknown layout (first key {next(iter(state))!r}); understood: {LAYOUTS}")
    if prefix and "pos_embed" in state:  # the decoder's table: fixed in both repositories
        _fixed_decoder_table(path, state.pop("pos_embed"))
    decoder_part = {k: v for k, v in state.items() if k.startswith(DECODER_KEYS)}
    dropped = sorted(k for k in state if k[len(prefix):].startswith(HEAD_KEYS) and k.startswith(prefix))
    if dropped:
        log.info("%s: leaving out %d weights that are not the encoder (%s)", path, len(dropped),
                 ", ".join(sorted({k[len(prefix):].split(".")[0] for k in dropped})))
    encoder_part = {k: v for k, v in state.items() if k not in decoder_part and k not in dropped}
    cfg = _infer_config(path, prefix, {k[len(prefix):]: v for k, v in encoder_part.items() if k.startswith(prefix)},
                        decoder_part, hint)
    encoder = _original_encoder(WeightReader(encoder_part, path, CheckpointError), cfg, prefix)
    decoder = None
    if decoder_part:
        decoder = _read_decoder(decoder_part, path, cfg, lambda reader, i: _original_block(
            reader, f"decoder.blocks.{i}.", f"blocks.{i}.", cfg.qv_bias), _original_decoder_name)
    layout = f"VideoMAE .pth ({kind}{' with decoder' if decoder else ''})"
    return Checkpoint(path, layout, cfg, encoder, decoder)


def _fixed_decoder_table(path: Path, table: torch.Tensor) -> None:
    rows = table.reshape(-1, table.shape[-1]).float()
    if not torch.allclose(rows, sinusoid_table(*rows.shape), atol=TABLE_ATOL):
        raise CheckpointError(path, "'pos_embed' (the decoder's position table) is not the fixed sinusoid table; a "
                                    "learned decoder table is not supported")


def _shape(state: dict[str, torch.Tensor], key: str, dims: int, what: str, source: Path, prefix: str = "") -> torch.Size:
    if key not in state:
        raise CheckpointError(source, f"weights lack {prefix + key!r} ({what})")
    shape = state[key].shape
    if len(shape) != dims:
        raise CheckpointError(source, f"{prefix + key!r} has shape {tuple(shape)}, expected {dims} dimensions ({what})")
    return shape


def _count_blocks(keys, source: Path, where: str) -> int:
    indices = {int(m.group(1)) for k in keys if (m := _BLOCK_RE.match(k))}
    if not indices:
        raise CheckpointError(source, f"no {where}blocks.N. weights (expected {LAYOUTS})")
    return max(indices) + 1  # a gap shows as the first missing weight


def _heads(width: int, hint_width: int | None, hint_heads: int | None, field: str, source: Path) -> int:
    if hint_width == width and hint_heads:
        return hint_heads
    if width in HEADS_BY_WIDTH:
        return HEADS_BY_WIDTH[width]
    raise CheckpointError(source, f"attention heads are not in the weights and width {width} is not a standard one "
                                  f"({sorted(HEADS_BY_WIDTH)}); set model.{field} (with model.{field.replace('heads', 'dim')}"
                                  f"={width})")


def _infer_config(source: Path, prefix: str, encoder: dict, decoder: dict, hint: ModelConfig | None) -> ModelConfig:
    """The :class:`ModelConfig` the weights describe (see the module docstring for what is inferred)."""
    dim, channels, tubelet, patch, patch_w = _shape(encoder, "patch_embed.proj.weight", 5,
                                                    "a Conv3d tubelet kernel (dim, C, tubelet, patch, patch)",
                                                    source, prefix)
    if patch != patch_w:
        raise CheckpointError(source, f"{prefix}patch_embed.proj.weight has {patch}x{patch_w} patches; only square "
                                      f"patches are supported")
    depth = _count_blocks(encoder, source, prefix)
    mlp = _shape(encoder, "blocks.0.mlp.fc1.weight", 2, "the first block's MLP", source, prefix)[0]
    heads = _heads(dim, hint and hint.dim, hint and hint.heads, "heads", source)
    frames, img_size, learned = _clip_geometry(source, prefix, encoder.get("pos_embed"), dim, tubelet, patch, hint)
    if decoder:
        dec_dim = _shape(decoder, "encoder_to_decoder.weight", 2, "a pretraining decoder", source)[0]
        dec_blocks = {k[len("decoder."):]: v for k, v in decoder.items() if k.startswith("decoder.")}
        dec_mlp = _shape(dec_blocks, "blocks.0.mlp.fc1.weight", 2, "the first decoder block's MLP", source, "decoder.")[0]
        extra = dict(decoder_dim=dec_dim, decoder_depth=_count_blocks(dec_blocks, source, "decoder."),
                     decoder_heads=_heads(dec_dim, hint and hint.decoder_dim, hint and hint.decoder_heads,
                                          "decoder_heads", source),
                     decoder_mlp_ratio=dec_mlp / dec_dim)
    else:  # no decoder to describe: the run's (or ViT-B's) widths, irrelevant to what is loaded
        base = hint or ModelConfig(size="B")
        extra = dict(decoder_dim=base.decoder_dim, decoder_depth=base.decoder_depth, decoder_heads=base.decoder_heads,
                     decoder_mlp_ratio=base.decoder_mlp_ratio)
    size = next((name for name, p in SIZES.items() if (p["dim"], p["depth"], p["heads"]) == (dim, depth, heads)), CUSTOM)
    norms = {} if hint is None else dict(pixel_mean=hint.pixel_mean, pixel_std=hint.pixel_std,
                                         norm_pix_loss=hint.norm_pix_loss)
    try:
        return ModelConfig(size=size, img_size=img_size, frames=frames, tubelet=tubelet, patch=patch,
                           channels=channels, dim=dim, depth=depth, heads=heads, mlp_ratio=mlp / dim,
                           layer_norm_eps=VIDEOMAE_EPS, qv_bias="blocks.0.attn.q_bias" in encoder,
                           final_norm="norm.weight" in encoder, learned_pos=learned, **extra, **norms)
    except ValueError as err:
        raise CheckpointError(source, f"the weights describe no valid model ({err})") from None


def _clip_geometry(source: Path, prefix: str, table: torch.Tensor | None, dim: int, tubelet: int, patch: int,
                   hint: ModelConfig | None) -> tuple[int, int, bool]:
    """``(frames, img_size, learned)``: from the length of a stored position table (the fixed sinusoid table or
    a learned one), else the hint's clip (else VideoMAE's 16 x 224^2)."""
    clip = (hint.frames, hint.img_size) if hint else (VIDEOMAE_CLIP["frames"], VIDEOMAE_CLIP["img_size"])
    if table is None:
        return *clip, False
    rows = table.reshape(-1, table.shape[-1]) if table.dim() == 3 and table.shape[0] == 1 else table
    if rows.dim() != 2 or rows.shape[1] != dim:
        raise CheckpointError(source, f"{prefix}pos_embed has shape {tuple(table.shape)}, expected (1, N, {dim})")
    n = rows.shape[0]
    grids = [(n // (s * s), s) for s in range(1, math.isqrt(n) + 1) if n % (s * s) == 0]
    fits = ([g for g in grids if g[0] * tubelet == clip[0]] or [g for g in grids if g[1] * patch == clip[1]])
    if len(fits) != 1:
        raise CheckpointError(source, f"{prefix}pos_embed has {n} positions, which give no single (frames/{tubelet}) x "
                                      f"(size/{patch})^2 token grid with frames={clip[0]} or img_size={clip[1]}; set "
                                      f"model.frames and model.img_size to the checkpoint's clip")
    t, s = fits[0]
    learned = not torch.allclose(rows.float(), sinusoid_table(n, dim), atol=TABLE_ATOL)
    return t * tubelet, s * patch, learned


def _original_block(reader: WeightReader, theirs: str, ours: str, qv_bias: bool) -> dict[str, torch.Tensor]:
    """One block under the original names (``attn.qkv.weight``, ``attn.q_bias``, ... ``mlp.fc2.bias``)."""
    out = {ours + "attn.qkv_weight": reader.take(theirs + "attn.qkv.weight")}
    names = (*(("attn.q_bias", "attn.v_bias") if qv_bias else ()), *BLOCK_KEYS)
    out.update({ours + name: reader.take(theirs + name) for name in names})
    return out


def _original_encoder(reader: WeightReader, cfg: ModelConfig, prefix: str) -> dict[str, torch.Tensor]:
    """The encoder under the original names (with ``prefix``: ``encoder.`` in a pretraining checkpoint)."""
    weight = reader.take(prefix + "patch_embed.proj.weight")
    out = {"patch_embed.weight": weight.reshape(weight.shape[0], -1),
           "patch_embed.bias": reader.take(prefix + "patch_embed.proj.bias")}
    for i in range(cfg.depth):
        out.update(_original_block(reader, f"{prefix}blocks.{i}.", f"blocks.{i}.", cfg.qv_bias))
    if cfg.final_norm:
        out.update({f"norm.{p}": reader.take(f"{prefix}norm.{p}") for p in ("weight", "bias")})
    table = reader.remaining.pop(prefix + "pos_embed", None)  # the fixed table when not learned: nothing to load
    if cfg.learned_pos:
        out["pos_embed.table"] = table.reshape(-1, table.shape[-1])
    _no_more(reader, f"the encoder has {cfg.depth} blocks")
    _check_shapes(out, VideoEncoder, cfg, reader.source, lambda key: prefix + _original_name(key))
    return out


def _original_name(key: str) -> str:
    """Our encoder / block key -> its name in the original layout (without a prefix)."""
    return (key.replace("patch_embed.", "patch_embed.proj.").replace("attn.qkv_weight", "attn.qkv.weight")
            .replace("pos_embed.table", "pos_embed"))


def _original_decoder_name(key: str) -> str:
    return key if key.startswith(("encoder_to_decoder", "mask_token")) else "decoder." + _original_name(key)


def _read_decoder(part: dict[str, torch.Tensor], source: Path, cfg: ModelConfig,
                  block: Callable[[WeightReader, int], dict[str, torch.Tensor]],
                  name: Callable[[str], str]) -> dict[str, torch.Tensor]:
    """A checkpoint's decoder side (``part``) -> our :class:`PixelDecoder` state; ``block(reader, i)`` reads
    decoder block ``i`` in the checkpoint's naming, ``name`` gives a checkpoint name for a shape error."""
    reader = WeightReader(part, source, CheckpointError)
    decoder = {key: reader.take(key, "a pretraining decoder") for key in ("encoder_to_decoder.weight", "mask_token")}
    for i in range(cfg.decoder_depth):
        decoder.update(block(reader, i))
    decoder.update(_decoder_ends(reader, cfg, "decoder."))
    _no_more(reader, f"the decoder has {cfg.decoder_depth} blocks")
    _check_shapes(decoder, PixelDecoder, cfg, source, name)
    return decoder


def _decoder_ends(reader: WeightReader, cfg: ModelConfig, prefix: str) -> dict[str, torch.Tensor]:
    """The decoder's final norm and its pixel head, the head's rows put in our patch-vector order."""
    out = {f"norm.{p}": reader.take(f"{prefix}norm.{p}", "a pretraining decoder") for p in ("weight", "bias")}
    for p in ("weight", "bias"):
        head = reader.take(f"{prefix}head.{p}", "a pretraining decoder")
        if head.shape[0] != cfg.patch_dim:
            raise CheckpointError(reader.source, f"{prefix}head.{p} has {head.shape[0]} outputs, a pixel head for "
                                                 f"{cfg.channels}x{cfg.tubelet}x{cfg.patch}x{cfg.patch} tubelets has "
                                                 f"{cfg.patch_dim}")
        out[f"head.{p}"] = pixel_rows_to_ours(head, cfg)
    return out


def pixel_rows_to_ours(rows: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Rows of a pixel head ``(P, ...)`` in VideoMAE's ``(tubelet, patch, patch, C)`` order -> our
    ``(C, tubelet, patch, patch)`` order (:func:`mgfm.model.encoder.patchify`)."""
    rest = rows.shape[1:]
    grid = rows.reshape(cfg.tubelet, cfg.patch, cfg.patch, cfg.channels, *rest)
    return grid.permute(3, 0, 1, 2, *range(4, grid.dim())).reshape(cfg.patch_dim, *rest).contiguous()


def _no_more(reader: WeightReader, expected: str) -> None:
    """A weight nothing took is an error naming the first (and why, where it is a known unsupported part)."""
    if not reader.remaining:
        return
    extra = sorted(reader.remaining)
    name = extra[0]
    why = next((f"{what} is not supported" for end, what in _UNSUPPORTED.items() if name.endswith(end)),
               expected if re.search(r"(^|\.)(blocks|decoder_layers)\.\d+\.", name) else "not part of a VideoMAE model")
    raise CheckpointError(reader.source, f"unexpected weight {name!r} ({why}); {len(extra)} unexpected in all")


def _check_shapes(state: dict[str, torch.Tensor], module: type, cfg: ModelConfig, source: Path,
                  name: Callable[[str], str]) -> None:
    """Every tensor of ``state`` (our names) against ``module(cfg)``'s; errors name the checkpoint's key."""
    with torch.device("meta"):
        expected = module(cfg).state_dict()
    for key, want in expected.items():
        if key in state and state[key].shape != want.shape:
            raise CheckpointError(source, f"{name(key)!r} has shape {tuple(state[key].shape)}, the rest of the "
                                          f"checkpoint implies {tuple(want.shape)}")


# ----------------------------------------------------------------------------------------------------
# starting a model


def fit_config(checkpoint: Checkpoint, model: ModelConfig, pos_embed: str) -> ModelConfig:
    """``model`` (the run's model) set to carry the checkpoint's position table: kept on the same token grid,
    else refused or resampled by ``pos_embed`` (:func:`mgfm.model.encoder.at_geometry`)."""
    return at_geometry(checkpoint.cfg, model, pos_embed, str(checkpoint.source))


DECODER_FIELDS = ("decoder_dim", "decoder_depth", "decoder_heads", "decoder_mlp_dim")


def load_pretrained(model: MaskedVideoModel, checkpoint: Checkpoint) -> None:
    """Copy the checkpoint's encoder, and its decoder when it has one, into ``model`` (built with
    :func:`fit_config`'s config); widths must match (one-line :class:`~mgfm.model.hf.EncoderFolderError`).
    With another target than pixels the decoder's pixel head starts fresh; everything is logged."""
    source, cfg = checkpoint.source, checkpoint.cfg
    check_compatible(cfg, model.cfg, source)
    model.encoder.load_state_dict(checkpoint.encoder)
    log.info("%s (%s): encoder loaded (%s, %d blocks, width %d)", source, checkpoint.layout, cfg.size, cfg.depth,
             cfg.dim)
    if tuple(cfg.pixel_mean) != tuple(model.cfg.pixel_mean) or tuple(cfg.pixel_std) != tuple(model.cfg.pixel_std):
        log.warning("%s was trained on inputs normalised with mean %s / std %s; this run normalises with %s / %s",
                    source, list(cfg.pixel_mean), list(cfg.pixel_std), list(model.cfg.pixel_mean),
                    list(model.cfg.pixel_std))
    if checkpoint.decoder is None:
        log.info("%s has no pretraining decoder: the decoder starts fresh", source)
        return
    check_compatible(cfg, model.cfg, source, DECODER_FIELDS)
    state = dict(checkpoint.decoder)
    target = model.objective.target
    if target != "pixels":
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        log.info("%s: decoder loaded (%d blocks) but not its pixel head: loss.target=%s predicts other values, so "
                 "the head starts fresh", source, cfg.decoder_depth, target)
    else:
        log.info("%s: decoder loaded (%d blocks, width %d, pixel head)", source, cfg.decoder_depth, cfg.decoder_dim)
        if cfg.norm_pix_loss != model.cfg.norm_pix_loss:
            log.warning("%s: its decoder learned %s pixels; this run's target is %s (model.norm_pix_loss=%s)", source,
                        "per-patch normalised" if cfg.norm_pix_loss else "plain",
                        "per-patch normalised" if model.cfg.norm_pix_loss else "plain", model.cfg.norm_pix_loss)
    missing, unexpected = model.decoder.load_state_dict(state, strict=target == "pixels")
    assert not unexpected and all(k.startswith("head.") for k in missing), (missing, unexpected)


__all__ = ["LAYOUTS", "HEADS_BY_WIDTH", "Checkpoint", "CheckpointError", "read_checkpoint", "fit_config",
           "load_pretrained", "pixel_rows_to_ours"]
