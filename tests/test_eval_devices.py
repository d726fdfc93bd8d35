"""Evaluation on the launcher's devices and processes: each process its own GPU, the recipe's device reaching
feature extraction, a 2-process `accelerate launch` of the linear probe, bf16 features on GPUs (keyed in
the cache), multi-view averages over the views that decoded, and page-locked batches on CUDA."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import subprocess_env, tiny_encoder_folder

from mgfm.data.stream import StreamConfig
from mgfm.runtime import feature_precision, local_device
from mgfm.evaluate.extract import cache_key, eval_stream_config

REPO = Path(__file__).resolve().parents[1]


def _stream() -> StreamConfig:
    return eval_stream_config(StreamConfig(frames=4, img_size=32), batch_size=2, num_workers=0)


def test_each_process_computes_on_its_own_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert local_device("auto") == torch.device("cuda", 3)
    assert local_device("cuda") == torch.device("cuda", 3), "every rank on GPU 0"
    assert local_device("cuda:1") == torch.device("cuda", 1) and local_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert local_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="device: expected auto, cpu, cuda or cuda:N, got 'gpu0'"):
        local_device("gpu0")


class _Stop(Exception):
    pass


@pytest.mark.parametrize("evaluator", ["probe_eval", "emotion_eval", "retrieval_eval"])
def test_the_recipe_device_reaches_feature_extraction(monkeypatch, tmp_path, tiny_shards, evaluator):
    import importlib

    module = importlib.import_module(f"mgfm.evaluate.{evaluator}")
    seen = []

    def spy(*args, device="cpu", **kwargs):
        seen.append(torch.device(device))
        raise _Stop

    monkeypatch.setattr("mgfm.evaluate.encoder_eval.split_features", spy)  # where every evaluator gets features
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")
    run = tmp_path / "run"
    tiny_encoder_folder(run / "encoder")
    recipe_cls = {"probe_eval": "ProbeRecipe", "emotion_eval": "EmotionRecipe", "retrieval_eval": "RetrievalRecipe"}[evaluator]
    recipe = getattr(module, recipe_cls)(run=str(run), shards=str(tiny_shards), stream=StreamConfig(masks=False, num_workers=0))
    with pytest.raises(_Stop):
        module.run(recipe)
    assert seen == [torch.device("cuda", 1)]


@pytest.mark.slow
def test_linear_probe_under_accelerate_launch_with_two_processes(tmp_path, tiny_shards):
    run = tmp_path / "run"
    tiny_encoder_folder(run / "encoder")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "eval/linear_probe.py",
           f"run={run}", f"shards={tiny_shards}", "stream.num_workers=0", "stream.batch_size=2", "references=false",
           "kmeans=false", "linear.c_grid=[1.0]"]
    result = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "joined a process group of 2 (gloo)" in result.stderr
    report = json.loads((run / "eval" / tiny_shards.name / "report.json").read_text())
    assert report["results"]["pretrained"]["probe"]["n"] == 6, "every test clip exactly once"
    assert result.stdout.count("report:") == 1, "one process writes the report"


def test_features_on_a_bf16_gpu_are_cached_apart_from_fp32_ones(monkeypatch, tiny_shards):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert feature_precision(torch.device("cuda", 0)) == "bf16"
    assert feature_precision(torch.device("cpu")) == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert feature_precision(torch.device("cuda", 0)) == "fp32", "emulated bf16 (V100) would be slower"
    cfg = _stream()
    assert cache_key("e", tiny_shards, "test", cfg, 1, "bf16") != cache_key("e", tiny_shards, "test", cfg, 1, "fp32")


def test_multi_view_features_average_the_views_that_decoded(monkeypatch, tiny_shards):
    import mgfm.evaluate.extract as features
    from mgfm.evaluate.extract import encode_split

    real = features.make_loader

    def loses_a_clip_in_view_two(source, split, cfg, mode="eval"):
        loader, skips = real(source, split, cfg, mode=mode)
        if cfg.eval_view == 0:
            return loader, skips

        def batches():
            for batch in loader:
                keep = [i for i, c in enumerate(batch["clip_id"]) if c != lost]
                yield {"video": batch["video"][keep], "clip_id": [batch["clip_id"][i] for i in keep],
                       "meta": [batch["meta"][i] for i in keep]}
        return batches(), skips

    one = encode_split(lambda v: v.flatten(1)[:, :8], tiny_shards, "test", _stream(), views=1, progress=False)
    lost = one.clip_ids[0]
    monkeypatch.setattr(features, "make_loader", loses_a_clip_in_view_two)
    two = encode_split(lambda v: v.flatten(1)[:, :8], tiny_shards, "test", _stream(), views=2, progress=False)
    assert two.clip_ids == one.clip_ids
    # the clip seen in one view only keeps that view's features instead of half of them
    first_view = encode_split(lambda v: v.flatten(1)[:, :8], tiny_shards, "test",
                              StreamConfig(**{**_stream().__dict__, "eval_view": 0, "eval_views": 2}), progress=False)
    np.testing.assert_allclose(two.features[0], first_view.features[0], rtol=1e-6)


def test_batches_are_page_locked_when_cuda_is_there(monkeypatch, tiny_shards):
    from mgfm.data.stream import make_loader

    assert make_loader(tiny_shards, "test", _stream(), mode="eval")[0].pin_memory is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert make_loader(tiny_shards, "test", _stream(), mode="eval")[0].pin_memory is True
    off = StreamConfig(**{**_stream().__dict__, "pin_memory": False})
    assert make_loader(tiny_shards, "test", off, mode="eval")[0].pin_memory is False
