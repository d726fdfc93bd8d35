"""Video classifier for fine-tuning: our ViT encoder, mean pooling, ``fc_norm`` LayerNorm, linear head.

The layout is exactly ``transformers.VideoMAEForVideoClassification`` with ``use_mean_pooling=True``:
the encoder has no final norm on its tokens (``final_norm=False``), the clip feature is
``fc_norm(tokens.mean(1))`` and the logits ``classifier(feature)``. :func:`save_classifier_hf` writes a
folder that transformers loads with no missing keys and that gives the same logits;
:func:`load_classifier_hf` reads it back.

Initialising from a pretrained encoder (:func:`init_classifier_from_hf`): the transformer weights are
copied; the pretrained encoder's final token norm (VideoMAE pretraining has one) has no place in this
layout, so its affine weights initialise ``fc_norm`` instead (same width, the norm now applied to the
pooled feature). Drop path (stochastic depth) comes from ``ModelConfig.drop_path``.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from mgfm.model.hf import (EncoderFolderError, check_compatible, config_from_hf, encoder_to_hf_state,
                           hf_config_dict, hf_to_encoder_state, load_encoder_hf, read_hf_config, read_hf_weights,
                           write_hf_folder)
from mgfm.model.encoder import ModelConfig, VideoEncoder
from mgfm.model.layers import init_weights

log = logging.getLogger(__name__)

#: transformers builds ``fc_norm`` as ``nn.LayerNorm(hidden_size)`` (the torch default eps), not with
#: ``layer_norm_eps``; ours must match for equal logits.
HF_FC_NORM_EPS = 1e-5
HEAD_INIT_STD = 0.02  # truncated-normal std of the new head's weights (ViT/VideoMAE fine-tuning)


class VideoClassifier(nn.Module):
    """``video (B, T, C, H, W)`` normalised -> logits ``(B, num_classes)``.

    Parameters: ``encoder`` (a :class:`VideoEncoder` with ``final_norm=False``), ``fc_norm``
    (LayerNorm ``(D,)``), ``head`` (Linear ``D -> num_classes``), plus dropout before the head.
    """

    def __init__(self, cfg: ModelConfig, num_classes: int, head_dropout: float = 0.0) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes: expected >= 1, got {num_classes}")
        cfg = dataclasses.replace(cfg, final_norm=False)
        self.cfg = cfg
        self.num_classes = num_classes
        self.encoder = VideoEncoder(cfg)
        self.fc_norm = nn.LayerNorm(cfg.dim, eps=HF_FC_NORM_EPS)
        self.head_dropout = nn.Dropout(head_dropout)
        self.head = nn.Linear(cfg.dim, num_classes)
        init_weights(self.fc_norm)
        nn.init.trunc_normal_(self.head.weight, std=HEAD_INIT_STD)
        nn.init.zeros_(self.head.bias)

    def features(self, video: torch.Tensor) -> torch.Tensor:
        """``(B, T, C, H, W)`` -> pooled, normalised clip features ``(B, D)``."""
        return self.fc_norm(self.encoder(video).mean(dim=1))

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """``(B, T, C, H, W)`` -> logits ``(B, num_classes)``."""
        return self.head(self.head_dropout(self.features(video)))

    def layer_id(self, name: str) -> int:
        """Depth of a parameter for layer-wise lr decay: 0 = patch embedding, ``i + 1`` = block ``i``,
        ``depth + 1`` = fc_norm and head."""
        if name.startswith("encoder.patch_embed"):
            return 0
        if name.startswith("encoder.blocks."):
            return int(name.split(".")[2]) + 1
        return self.cfg.depth + 1


def layer_decay_groups(model: VideoClassifier, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW parameter groups with layer-wise lr decay: a parameter at depth ``l`` (see
    :meth:`VideoClassifier.layer_id`) gets ``lr_scale = layer_decay ** (depth + 1 - l)``; biases, norms and
    q/v biases (1-D) get no weight decay. Groups carry ``lr_scale``; multiply it into the lr."""
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"optim.layer_decay: expected a value in (0, 1], got {layer_decay}")
    top = model.cfg.depth + 1
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer, decay = model.layer_id(name), p.dim() >= 2
        group = groups.setdefault((layer, decay), {"params": [], "weight_decay": weight_decay if decay else 0.0,
                                                   "lr_scale": layer_decay ** (top - layer), "layer": layer})
        group["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def build_classifier(cfg: ModelConfig, num_classes: int, init_from: str | Path | None = None,
                     head_dropout: float = 0.0) -> VideoClassifier:
    """A classifier of ``cfg``'s geometry, its encoder random (seed torch first) or from ``init_from``."""
    model = VideoClassifier(cfg, num_classes, head_dropout)
    if init_from is not None:
        init_classifier_from_hf(model, init_from)
    return model


def init_classifier_from_hf(model: VideoClassifier, folder: str | Path) -> ModelConfig:
    """Copy a pretrained VideoMAE encoder folder into ``model`` (see the module docstring); returns the
    folder's config. Widths, patch geometry and position table must fit (:func:`check_compatible`)."""
    source, cfg = load_encoder_hf(folder)
    check_compatible(cfg, model.cfg, folder, ("dim", "depth", "heads", "mlp_dim", "channels", "tubelet", "patch",
                                              "qv_bias"))
    state = source.state_dict()
    norm = {k[len("norm."):]: state.pop(k) for k in list(state) if k.startswith("norm.")}
    model.encoder.load_state_dict(state, strict=True)
    if norm:
        model.fc_norm.load_state_dict(norm)
    log.info("classifier encoder initialised from %s (%s)", folder,
             "its final norm -> fc_norm" if norm else "no final norm; fresh fc_norm")
    return cfg


# ----------------------------------------------------------------------------------------- HF folders


def classifier_hf_config(model: VideoClassifier, class_names: Sequence[str]) -> dict:
    """The ``VideoMAEForVideoClassification`` config dict (with ``id2label``/``label2id``)."""
    if len(class_names) != model.num_classes:
        raise ValueError(f"class_names: {len(class_names)} names for a {model.num_classes}-class head")
    config = hf_config_dict(model.cfg)
    config["architectures"] = ["VideoMAEForVideoClassification"]
    config["use_mean_pooling"] = True
    config["id2label"] = {str(i): str(n) for i, n in enumerate(class_names)}
    config["label2id"] = {str(n): i for i, n in enumerate(class_names)}
    config["num_labels"] = model.num_classes
    config["problem_type"] = "single_label_classification"
    return config


def classifier_to_hf_state(model: VideoClassifier) -> dict[str, torch.Tensor]:
    """Weights under ``VideoMAEForVideoClassification`` names (contiguous CPU tensors)."""
    state = {f"videomae.{k}": v for k, v in encoder_to_hf_state(model.encoder).items()}
    for ours, theirs in (("fc_norm", "fc_norm"), ("head", "classifier")):
        module = getattr(model, ours)
        state[f"{theirs}.weight"] = module.weight.detach().cpu().contiguous().clone()
        state[f"{theirs}.bias"] = module.bias.detach().cpu().contiguous().clone()
    return state


def save_classifier_hf(model: VideoClassifier, folder: str | Path, class_names: Sequence[str]) -> Path:
    """Write ``folder`` as a Hugging Face ``VideoMAEForVideoClassification`` (``config.json`` with label
    names, ``model.safetensors``, ``preprocessor_config.json``), built beside it and swapped in."""
    model = unwrap_classifier(model)
    config = classifier_hf_config(model, class_names)
    folder = write_hf_folder(folder, classifier_to_hf_state(model), config, model.cfg)
    log.info("saved classifier (%d classes) to %s", model.num_classes, folder)
    return folder


def load_classifier_hf(folder: str | Path) -> tuple[VideoClassifier, list[str]]:
    """Read a ``VideoMAEForVideoClassification`` folder (ours or a public one with mean pooling) ->
    ``(classifier in eval mode, class names)``."""
    folder = Path(folder)
    hf = read_hf_config(folder)
    if not hf.get("use_mean_pooling", True):
        raise EncoderFolderError(folder, "use_mean_pooling=False (CLS-token head) is not supported")
    cfg = config_from_hf(hf, folder)
    state = read_hf_weights(folder)
    missing = [k for k in ("fc_norm.weight", "fc_norm.bias", "classifier.weight", "classifier.bias") if k not in state]
    if missing:
        raise EncoderFolderError(folder, f"weights lack {missing[0]!r} (not a video classification model?)")
    num_classes = int(state["classifier.weight"].shape[0])
    id2label = hf.get("id2label") or {}
    names = [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(num_classes)]
    model = VideoClassifier(cfg, num_classes)
    model.encoder.load_state_dict({k: v.float() for k, v in hf_to_encoder_state(state, cfg, folder).items()})
    model.fc_norm.load_state_dict({"weight": state["fc_norm.weight"].float(), "bias": state["fc_norm.bias"].float()})
    model.head.load_state_dict({"weight": state["classifier.weight"].float(), "bias": state["classifier.bias"].float()})
    return model.eval(), names


def unwrap_classifier(model: nn.Module) -> VideoClassifier:
    """The :class:`VideoClassifier` inside ``model`` (a DDP / DeepSpeed / Accelerate wrapper, or itself)."""
    for _ in range(3):
        if isinstance(model, VideoClassifier):
            return model
        model = getattr(model, "module", None)
        if model is None:
            break
    raise TypeError("expected a VideoClassifier (or a wrapper with .module)")


__all__ = ["HF_FC_NORM_EPS", "VideoClassifier", "layer_decay_groups", "build_classifier", "init_classifier_from_hf",
           "classifier_hf_config", "classifier_to_hf_state", "save_classifier_hf", "load_classifier_hf"]
