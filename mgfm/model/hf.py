"""Save and load our encoder as a Hugging Face ``VideoMAEModel`` folder (``config.json`` + ``model.safetensors``).

``save_encoder_hf`` writes a folder that ``transformers.VideoMAEModel.from_pretrained`` loads with no
missing or unexpected keys, with ``use_mean_pooling=False`` so the model applies our final LayerNorm and
``VideoMAEModel(...).last_hidden_state.mean(1)`` equals :meth:`VideoEncoder.features`. The attention
biases are written under the names used by the public VideoMAE checkpoints (``attention.attention.q_bias``
/ ``v_bias``): transformers 4.x loads them as they are and 5.x renames them on load.

``load_encoder_hf`` reads such a folder, or any public VideoMAE checkpoint folder in ``VideoMAEModel``,
``VideoMAEForPreTraining`` or ``VideoMAEForVideoClassification`` format (the ``videomae.`` prefix is
stripped; decoder and head weights are ignored), with either attention-bias naming. The pretraining
decoder of such a folder, and the original ``.pth`` layouts, are read by :mod:`mgfm.model.pretrained`,
with :class:`WeightReader` and :func:`hf_block_state` from here. This module does not import
``transformers``.

An encoder with a learned position table (``learned_pos``) is saved with it as
``embeddings.position_embeddings`` and reloads here exactly; ``transformers.VideoMAEModel`` has no such
parameter (its table is fixed), ignores the key and computes other features, which :func:`save_encoder_hf`
logs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mgfm.files import atomic_folder
from mgfm.errors import MgfmError
from mgfm.model.encoder import CUSTOM, SIZES, ModelConfig, VideoEncoder

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
SHARDED_INDEX_NAME = "model.safetensors.index.json"
TORCH_WEIGHTS_NAME = "pytorch_model.bin"
PREPROCESSOR_NAME = "preprocessor_config.json"
HEAD_PREFIX = "videomae."
POSITIONS_KEY = "embeddings.position_embeddings"  # written only for a learned table (ModelConfig.learned_pos)

# our block parameter -> Hugging Face ``encoder.layer.{i}.`` suffix (q/k/v handled separately)
BLOCK_KEYS = {
    "attn.proj.weight": "attention.output.dense.weight",
    "attn.proj.bias": "attention.output.dense.bias",
    "norm1.weight": "layernorm_before.weight",
    "norm1.bias": "layernorm_before.bias",
    "norm2.weight": "layernorm_after.weight",
    "norm2.bias": "layernorm_after.bias",
    "mlp.fc1.weight": "intermediate.dense.weight",
    "mlp.fc1.bias": "intermediate.dense.bias",
    "mlp.fc2.weight": "output.dense.weight",
    "mlp.fc2.bias": "output.dense.bias",
}
_QKV = ("query", "key", "value")
# accepted spellings of the q/v biases: public checkpoints / transformers 4.x, and transformers 5.x
_BIAS_ALIASES = {"q_bias": ("attention.attention.q_bias", "attention.attention.query.bias"),
                 "v_bias": ("attention.attention.v_bias", "attention.attention.value.bias")}
_LAYER_RE = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")


class EncoderFolderError(MgfmError, ValueError):
    """A folder that is not a loadable VideoMAE encoder; the message is one line naming the folder."""

    def __init__(self, folder: str | Path, problem: str) -> None:
        super().__init__(f"{folder}: {problem}")
        self.folder = str(folder)
        self.problem = problem


# ----------------------------------------------------------------------------------------------------
# config


def hf_config_dict(cfg: ModelConfig) -> dict:
    """Our config as a Hugging Face ``VideoMAEConfig`` dict (plus an ``mgfm`` section for our extras)."""
    return {
        "architectures": ["VideoMAEModel"],
        "model_type": "videomae",
        "image_size": cfg.img_size,
        "patch_size": cfg.patch,
        "num_channels": cfg.channels,
        "num_frames": cfg.frames,
        "tubelet_size": cfg.tubelet,
        "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.depth,
        "num_attention_heads": cfg.heads,
        "intermediate_size": cfg.mlp_dim,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": cfg.layer_norm_eps,
        "qkv_bias": cfg.qv_bias,  # the 4.x name; 5.x reads it too
        "qv_bias": cfg.qv_bias,
        "use_mean_pooling": not cfg.final_norm,
        "decoder_hidden_size": cfg.decoder_dim,
        "decoder_num_hidden_layers": cfg.decoder_depth,
        "decoder_num_attention_heads": cfg.decoder_heads,
        "decoder_intermediate_size": cfg.decoder_mlp_dim,
        "norm_pix_loss": cfg.norm_pix_loss,
        "mgfm": {"size": cfg.size, "pixel_mean": list(cfg.pixel_mean), "pixel_std": list(cfg.pixel_std),
                 "drop_path": cfg.drop_path, **({"pos_grid": list(cfg.pos_grid)} if cfg.pos_grid else {}),
                 **({"learned_pos": True} if cfg.learned_pos else {})},
    }


def _square(value, name: str, folder: Path) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise EncoderFolderError(folder, f"{CONFIG_NAME} {name}={value!r}: only square sizes are supported")
        value = value[0]
    if not isinstance(value, int) or isinstance(value, bool):
        raise EncoderFolderError(folder, f"{CONFIG_NAME} {name}={value!r}: expected an integer")
    return value


def config_from_hf(hf: dict, folder: str | Path = "<config>") -> ModelConfig:
    """Build a :class:`ModelConfig` from a Hugging Face VideoMAE config dict (errors name ``folder``)."""
    folder = Path(folder)
    if hf.get("model_type") != "videomae":
        raise EncoderFolderError(folder, f"{CONFIG_NAME} model_type is {hf.get('model_type')!r}, expected 'videomae'")
    if hf.get("hidden_act", "gelu") != "gelu":
        raise EncoderFolderError(folder, f"{CONFIG_NAME} hidden_act={hf.get('hidden_act')!r}: only 'gelu' is supported")
    try:
        dim, depth, heads = int(hf["hidden_size"]), int(hf["num_hidden_layers"]), int(hf["num_attention_heads"])
        mlp = int(hf["intermediate_size"])
    except KeyError as err:
        raise EncoderFolderError(folder, f"{CONFIG_NAME} lacks {err.args[0]!r}") from None
    dec_dim = int(hf.get("decoder_hidden_size", 384))
    extras = hf.get("mgfm") if isinstance(hf.get("mgfm"), dict) else {}
    size = next((name for name, p in SIZES.items() if (p["dim"], p["depth"], p["heads"]) == (dim, depth, heads)),
                CUSTOM)
    kwargs = dict(
        size=size,
        img_size=_square(hf.get("image_size", 224), "image_size", folder),
        patch=_square(hf.get("patch_size", 16), "patch_size", folder),
        frames=int(hf.get("num_frames", 16)),
        tubelet=int(hf.get("tubelet_size", 2)),
        channels=int(hf.get("num_channels", 3)),
        dim=dim, depth=depth, heads=heads, mlp_ratio=mlp / dim,
        decoder_dim=dec_dim,
        decoder_depth=int(hf.get("decoder_num_hidden_layers", 4)),
        decoder_heads=int(hf.get("decoder_num_attention_heads", 6)),
        decoder_mlp_ratio=int(hf.get("decoder_intermediate_size", 4 * dec_dim)) / dec_dim,
        layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
        qv_bias=bool(hf.get("qv_bias", hf.get("qkv_bias", True))),
        final_norm=not bool(hf.get("use_mean_pooling", True)),
        norm_pix_loss=bool(hf.get("norm_pix_loss", True)),
    )
    for key in ("pixel_mean", "pixel_std", "drop_path", "pos_grid", "learned_pos"):
        if key in extras:
            kwargs[key] = extras[key]
    try:
        cfg = ModelConfig(**kwargs)
    except ValueError as err:
        raise EncoderFolderError(folder, f"{CONFIG_NAME} describes an invalid model ({err})") from None
    if cfg.mlp_dim != mlp:
        raise EncoderFolderError(folder, f"{CONFIG_NAME} intermediate_size={mlp} is not a whole multiple of hidden_size")
    return cfg


# ----------------------------------------------------------------------------------------------------
# state dicts


def encoder_to_hf_state(encoder: VideoEncoder) -> dict[str, torch.Tensor]:
    """Our encoder's weights under ``VideoMAEModel`` names (contiguous CPU tensors, ready for safetensors)."""
    cfg = encoder.cfg
    sd = {k: v.detach().cpu() for k, v in encoder.state_dict().items()}
    out = {
        "embeddings.patch_embeddings.projection.weight": sd["patch_embed.weight"].reshape(
            cfg.dim, cfg.channels, cfg.tubelet, cfg.patch, cfg.patch),
        "embeddings.patch_embeddings.projection.bias": sd["patch_embed.bias"],
    }
    for i in range(cfg.depth):
        ours, theirs = f"blocks.{i}.", f"encoder.layer.{i}."
        for name, w in zip(_QKV, sd[ours + "attn.qkv_weight"].chunk(3, dim=0)):
            out[f"{theirs}attention.attention.{name}.weight"] = w
        if cfg.qv_bias:
            out[theirs + _BIAS_ALIASES["q_bias"][0]] = sd[ours + "attn.q_bias"]
            out[theirs + _BIAS_ALIASES["v_bias"][0]] = sd[ours + "attn.v_bias"]
        for k_ours, k_theirs in BLOCK_KEYS.items():
            out[theirs + k_theirs] = sd[ours + k_ours]
    if cfg.final_norm:
        out["layernorm.weight"] = sd["norm.weight"]
        out["layernorm.bias"] = sd["norm.bias"]
    if cfg.learned_pos:
        out[POSITIONS_KEY] = sd["pos_embed.table"][None]
    return {k: v.contiguous().clone() for k, v in out.items()}


class WeightReader:
    """The tensors of a checkpoint, each taken once by name (``remaining`` holds the rest); a missing one is a
    one-line ``error(source, problem)``."""

    def __init__(self, state: dict[str, torch.Tensor], source: str | Path,
                 error: type[EncoderFolderError] = EncoderFolderError) -> None:
        self.remaining = dict(state)
        self.source = Path(source)
        self.error = error

    def __contains__(self, key: str) -> bool:
        return key in self.remaining

    def take(self, key: str, why: str = "not a VideoMAE encoder of this config?") -> torch.Tensor:
        if key not in self.remaining:
            raise self.error(self.source, f"weights lack {key!r} ({why})")
        return self.remaining.pop(key)

    def take_any(self, keys: list[str], why: str) -> torch.Tensor:
        """The first of ``keys`` present (spellings of one weight); the others stay."""
        present = [k for k in keys if k in self.remaining]
        return self.take(present[0] if present else keys[0], why)


def hf_block_state(reader: WeightReader, theirs: str, ours: str, qv_bias: bool) -> dict[str, torch.Tensor]:
    """One transformer block under Hugging Face names (prefix ``theirs``: ``encoder.layer.{i}.`` or
    ``decoder.decoder_layers.{i}.``) -> our :class:`~mgfm.model.layers.Block` keys under prefix ``ours``."""
    out = {ours + "attn.qkv_weight": torch.cat([reader.take(f"{theirs}attention.attention.{n}.weight") for n in _QKV])}
    if qv_bias:
        for name, aliases in _BIAS_ALIASES.items():
            out[ours + "attn." + name] = reader.take_any([theirs + a for a in aliases], "config says qv_bias")
    for k_ours, k_theirs in BLOCK_KEYS.items():
        out[ours + k_ours] = reader.take(theirs + k_theirs)
    return out


def hf_to_encoder_state(state: dict[str, torch.Tensor], cfg: ModelConfig,
                        folder: str | Path = "<weights>") -> dict[str, torch.Tensor]:
    """A VideoMAE checkpoint's weights (any head format) -> our :class:`VideoEncoder` state dict.

    Keys outside the ``videomae.`` encoder of a head model (decoder, mask token, classifier) are ignored;
    any other unknown, missing or wrongly shaped encoder key raises :class:`EncoderFolderError`. A position
    table is read only when ``cfg.learned_pos`` (otherwise it is the fixed table and skipped).
    """
    folder = Path(folder)
    if any(k.startswith(HEAD_PREFIX) for k in state):
        ignored = sorted(k for k in state if not k.startswith(HEAD_PREFIX))
        if ignored:
            log.info("%s: ignoring %d non-encoder weights (e.g. %s)", folder, len(ignored), ignored[0])
        state = {k[len(HEAD_PREFIX):]: v for k, v in state.items() if k.startswith(HEAD_PREFIX)}
    if not cfg.learned_pos:
        state = {k: v for k, v in state.items() if not k.endswith("position_embeddings")}  # fixed tables
    reader = WeightReader(state, folder)
    out: dict[str, torch.Tensor] = {}
    w = reader.take("embeddings.patch_embeddings.projection.weight")
    out["patch_embed.weight"] = w.reshape(w.shape[0], -1) if w.dim() == 5 else w
    out["patch_embed.bias"] = reader.take("embeddings.patch_embeddings.projection.bias")
    for i in range(cfg.depth):
        out.update(hf_block_state(reader, f"encoder.layer.{i}.", f"blocks.{i}.", cfg.qv_bias))
    if cfg.final_norm:
        out["norm.weight"] = reader.take("layernorm.weight")
        out["norm.bias"] = reader.take("layernorm.bias")
    if cfg.learned_pos:
        table = reader.take(POSITIONS_KEY, "config says learned_pos")
        out["pos_embed.table"] = table.reshape(-1, table.shape[-1])
    remaining = reader.remaining
    if remaining:
        extra = sorted(remaining)
        layers = {int(m.group(1)) for k in extra if (m := _LAYER_RE.match(k))}
        why = (f" (layer {max(layers)} exists but config says {cfg.depth} layers)" if layers and max(layers) >= cfg.depth
               else " (config use_mean_pooling=True but the weights have a final layernorm)"
               if "layernorm.weight" in remaining else "")
        raise EncoderFolderError(folder, f"unexpected encoder weight {extra[0]!r}{why}; {len(extra)} unexpected in all")

    expected = {k: v.shape for k, v in _encoder_shapes(cfg).items()}
    for key, shape in expected.items():
        got = out[key].shape
        if got != shape:
            raise EncoderFolderError(folder, f"weight for {key!r} has shape {tuple(got)}, config expects {tuple(shape)}")
    return out


def _encoder_shapes(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return VideoEncoder(cfg).state_dict()


# ----------------------------------------------------------------------------------------------------
# folders


def _unwrap_encoder(model_or_encoder: nn.Module) -> VideoEncoder:
    module = model_or_encoder
    for _ in range(3):
        if isinstance(module, VideoEncoder):
            return module
        module = getattr(module, "encoder", None) or getattr(module, "module", None)
        if module is None:
            break
    raise TypeError(f"save_encoder_hf: expected a VideoEncoder or a model with .encoder, "
                    f"got {type(model_or_encoder).__name__}")


def preprocessor_dict(cfg: ModelConfig) -> dict:
    return {
        "image_processor_type": "VideoMAEImageProcessor",
        "do_resize": True, "size": {"shortest_edge": cfg.img_size},
        "do_center_crop": True, "crop_size": {"height": cfg.img_size, "width": cfg.img_size},
        "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": list(cfg.pixel_mean), "image_std": list(cfg.pixel_std),
        "resample": 2,
    }


def write_hf_folder(folder: str | Path, state: dict[str, torch.Tensor], config: dict, cfg: ModelConfig) -> Path:
    """Write a Hugging Face folder (``model.safetensors``, ``config.json``, ``preprocessor_config.json``)
    atomically: built beside the target and swapped in, so a reader never sees half a folder."""
    with atomic_folder(folder) as tmp:
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        (tmp / PREPROCESSOR_NAME).write_text(json.dumps(preprocessor_dict(cfg), indent=2) + "\n")
    return Path(folder)


def save_encoder_hf(model_or_encoder: nn.Module, folder: str | Path) -> Path:
    """Write ``folder`` as a Hugging Face ``VideoMAEModel`` (``config.json``, ``model.safetensors``,
    ``preprocessor_config.json``). The folder is built beside the target and swapped in, so a reader
    never sees half a folder. Returns the folder."""
    encoder = _unwrap_encoder(model_or_encoder)
    folder = write_hf_folder(folder, encoder_to_hf_state(encoder), hf_config_dict(encoder.cfg), encoder.cfg)
    log.info("saved encoder (%s, %d layers) to %s", encoder.cfg.size, encoder.cfg.depth, folder)
    if encoder.cfg.learned_pos:
        log.warning("%s: the encoder's position table is learned; mgfm reloads it, but transformers' VideoMAEModel "
                    "uses its fixed table instead and computes other features", folder)
    return folder


def read_hf_config(folder: str | Path) -> dict:
    """``folder/config.json`` as a dict; one-line :class:`EncoderFolderError` when absent or not JSON."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EncoderFolderError(folder, "not a folder (expected a Hugging Face VideoMAE model folder)")
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise EncoderFolderError(folder, f"no {CONFIG_NAME} (expected a Hugging Face VideoMAE model folder)")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise EncoderFolderError(folder, f"{CONFIG_NAME} is not readable JSON ({err})") from None
    if not isinstance(data, dict):
        raise EncoderFolderError(folder, f"{CONFIG_NAME} must hold a JSON object")
    return data


def read_hf_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of ``folder`` (``model.safetensors``, a sharded index, or ``pytorch_model.bin``)."""
    folder = Path(folder)
    try:
        if (folder / WEIGHTS_NAME).is_file():
            return load_file(str(folder / WEIGHTS_NAME))
        if (folder / SHARDED_INDEX_NAME).is_file():
            index = json.loads((folder / SHARDED_INDEX_NAME).read_text())
            state: dict[str, torch.Tensor] = {}
            for shard in sorted(set(index["weight_map"].values())):
                state.update(load_file(str(folder / shard)))
            return state
        if (folder / TORCH_WEIGHTS_NAME).is_file():
            state = torch.load(folder / TORCH_WEIGHTS_NAME, map_location="cpu", weights_only=True)
            if not isinstance(state, dict):
                raise ValueError("not a state dict")
            return state
    except EncoderFolderError:
        raise
    except Exception as err:  # noqa: BLE001 - any reader failure is reported as one line
        raise EncoderFolderError(folder, f"weights cannot be read ({type(err).__name__}: {err})") from None
    raise EncoderFolderError(folder, f"no {WEIGHTS_NAME} (nor {SHARDED_INDEX_NAME} or {TORCH_WEIGHTS_NAME})")


def hf_folder_config(folder: str | Path) -> ModelConfig:
    """The :class:`ModelConfig` of a VideoMAE folder (ours or a public checkpoint, whose
    ``preprocessor_config.json`` gives the input normalisation)."""
    folder = Path(folder)
    hf = read_hf_config(folder)
    cfg = config_from_hf(hf, folder)
    prep = folder / PREPROCESSOR_NAME
    if prep.is_file() and "mgfm" not in hf:  # a public checkpoint: take its normalisation
        try:
            data = json.loads(prep.read_text())
            mean, std = data.get("image_mean"), data.get("image_std")
            if mean and std and len(mean) == len(std) == cfg.channels:
                cfg.pixel_mean, cfg.pixel_std = tuple(map(float, mean)), tuple(map(float, std))
        except (OSError, json.JSONDecodeError, TypeError, ValueError):
            log.warning("%s: ignoring unreadable %s", folder, PREPROCESSOR_NAME)
    return cfg


def load_encoder_hf(folder: str | Path, device: str | torch.device = "cpu") -> tuple[VideoEncoder, ModelConfig]:
    """Load a VideoMAE encoder folder (ours or a public checkpoint) -> ``(encoder, config)``.

    The returned encoder is fp32, in eval mode, on ``device``.
    Raises :class:`EncoderFolderError` (one line naming the folder) if the folder is not such an encoder.
    """
    folder = Path(folder)
    cfg = hf_folder_config(folder)
    state = hf_to_encoder_state(read_hf_weights(folder), cfg, folder)
    encoder = VideoEncoder(cfg)
    encoder.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return encoder.to(device).eval(), cfg


def check_compatible(trained: ModelConfig, ours: ModelConfig, folder: str | Path,
                     names: tuple[str, ...] = ("dim", "depth", "heads", "mlp_dim", "channels", "tubelet", "patch",
                                               "qv_bias", "final_norm", "learned_pos")) -> None:
    """One-line :class:`EncoderFolderError` unless the encoder of ``folder`` (``trained``) fits a model of
    ``ours``: the same widths and tubelet geometry, and a position table made for the same token grid (a
    model at another clip length or crop size gets one from :func:`mgfm.model.encoder.at_geometry`)."""
    for name in names:
        if getattr(trained, name) != getattr(ours, name):
            raise EncoderFolderError(folder, f"encoder has {name}={getattr(trained, name)!r}, the model expects "
                                             f"{getattr(ours, name)!r}")
    if trained.position_grid != ours.position_grid:
        raise EncoderFolderError(folder, f"encoder's position table is for a {'x'.join(map(str, trained.position_grid))}"
                                         f" token grid, the model's for {'x'.join(map(str, ours.position_grid))} "
                                         f"(clips of {ours.frames}x{ours.img_size}^2); set pos_embed=interpolate or "
                                         f"keep the encoder's frames/img_size")


def init_encoder_from_hf(model_or_encoder: nn.Module, folder: str | Path) -> ModelConfig:
    """Copy the encoder of ``folder`` into ``model_or_encoder`` (a run's ``init_from=``); returns its config.

    Widths, patch/tubelet geometry, norm layout and position table must fit (:func:`check_compatible`).
    """
    target = _unwrap_encoder(model_or_encoder)
    source, cfg = load_encoder_hf(folder)
    check_compatible(cfg, target.cfg, folder)
    target.load_state_dict(source.state_dict())
    return cfg


def encoder_checksum(folder: str | Path) -> str:
    """sha256 hex digest of ``folder/model.safetensors`` (keys feature caches to the exact encoder)."""
    path = Path(folder) / WEIGHTS_NAME
    if not path.is_file():
        raise EncoderFolderError(folder, f"no {WEIGHTS_NAME} to checksum")
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


__all__ = ["EncoderFolderError", "WeightReader", "hf_block_state", "hf_folder_config", "check_compatible", "save_encoder_hf", "load_encoder_hf", "init_encoder_from_hf", "encoder_checksum", "hf_config_dict",
           "config_from_hf", "encoder_to_hf_state", "hf_to_encoder_state", "read_hf_config", "read_hf_weights"]
