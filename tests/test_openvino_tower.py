"""RUNTIME: which runtime runs the frozen image tower, that OpenVINO's pass is torch's pass, and that
OpenVINO's telemetry never runs."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from demo.train_clip import DENSE_METHOD
from model import openvino_tower
from model.build import SegmentationModel
from model.config import ModelConfig, openvino_installed
from model.openvino_tower import resolve_runtime

ROOT = Path(__file__).parents[1]
CPU, CUDA = torch.device("cpu"), torch.device("cuda")
needs_openvino = pytest.mark.skipif(not openvino_installed(), reason="the optional OpenVINO runtime is not installed")


def test_auto_is_openvino_on_a_cpu_where_it_is_installed_and_torch_elsewhere(monkeypatch):
    monkeypatch.setattr(openvino_tower, "openvino_installed", lambda: True)
    assert resolve_runtime("auto", CPU) == "openvino" and resolve_runtime("auto", CUDA) == "torch"
    assert resolve_runtime("torch", CPU) == "torch"
    with pytest.raises(ValueError, match="runs on the CPU"):
        resolve_runtime("openvino", CUDA)
    monkeypatch.setattr(openvino_tower, "openvino_installed", lambda: False)
    assert resolve_runtime("auto", CPU) == "torch"
    with pytest.raises(ValueError, match="requirements-openvino.txt"):
        resolve_runtime("openvino", CPU)
    with pytest.raises(ValueError, match="RUNTIME must be one of"):
        resolve_runtime("onnx", CPU)


def test_the_setting_refuses_openvino_where_it_is_absent(monkeypatch):
    from backend import settings

    monkeypatch.setattr(settings, "openvino_installed", lambda: False)
    with pytest.raises(ValueError, match="RUNTIME=openvino needs the openvino package"):
        settings.Settings(runtime="openvino")
    assert settings.Settings(runtime="auto").model_config().runtime == "auto"


@needs_openvino
def test_openvinos_tower_gives_torchs_outputs_at_any_size_and_batch(demo_clip):
    """fp32 in both runtimes: the same numbers, at the CLIP's own grid, off it (the position embeddings are
    resized inside the graph), and for a batch of two."""
    segmenter = SegmentationModel(demo_clip, ModelConfig(dense_method=DENSE_METHOD)).segmenter()
    compiled = openvino_tower.OpenVinoTower(segmenter.image_tower, bf16=False)
    grid = demo_clip.model.visual.grid_size[0] * segmenter.stride
    for shape in ((1, 3, grid, grid), (2, 3, grid + 2 * segmenter.stride, grid - segmenter.stride)):
        images = torch.randn(*shape)
        with torch.no_grad():
            ours, theirs = segmenter.image_tower(images), compiled(images)
        for mine, other in zip([ours.dense, *ours.features, ours.image],
                               [theirs.dense, *theirs.features, theirs.image], strict=True):
            assert mine.shape == other.shape
            assert torch.allclose(mine, other, atol=1e-3 * float(mine.abs().max())), float((mine - other).abs().max())


@needs_openvino
def test_versions_that_keep_the_frozen_tower_share_the_compiled_one_in_training_too(demo_clip):
    model = SegmentationModel(demo_clip, ModelConfig(dense_method=DENSE_METHOD, runtime="openvino"))
    zero_shot, tuned = model.predictor(), model.predictor(model.segmenter(seed=3))
    assert zero_shot.segmenter.compiled_tower is tuned.segmenter.compiled_tower is not None
    unfrozen = model.predictor(model.segmenter(unfreeze_blocks=1))
    assert unfrozen.segmenter.compiled_tower is None  # its last block is its own: it runs in torch
    assert SegmentationModel(demo_clip, ModelConfig(runtime="torch")).predictor().segmenter.compiled_tower is None

    training = model.segmenter(seed=4).train()  # a training job's, before any predictor
    compiled, calls = training.compiled_tower, []
    assert compiled is zero_shot.segmenter.compiled_tower
    training.compiled_tower = lambda images: calls.append(images) or compiled(images)
    tuned_embedding, _ = training.embed(torch.zeros(1, 3, 64, 64))
    assert len(calls) == 1  # no gradient goes through a frozen tower: training runs it where inference does
    tuned_embedding.sum().backward()
    assert all(p.grad is not None for p in training.decoder.parameters() if p.requires_grad)


@needs_openvino
def test_openvino_is_imported_without_its_telemetry(tmp_path):
    """openvino-telemetry would send events to Google Analytics, each from a process it forks (one such child
    hung the service's exit), and keep files under ~/intel: converting and compiling a graph does neither."""
    script = ("import multiprocessing, sys, torch; from model.openvino_tower import compile_for_cpu, openvino_module; "
              "graph = openvino_module().convert_model(torch.nn.Conv2d(3, 4, 3), example_input=torch.zeros(1, 3, 8, 8)); "
              "compile_for_cpu(graph, bf16=False); "
              "print(len(multiprocessing.active_children()), sys.modules['openvino_telemetry'])")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env={**os.environ, "HOME": str(tmp_path)},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["0", "None"], result.stdout
    assert not (tmp_path / "intel").exists()
