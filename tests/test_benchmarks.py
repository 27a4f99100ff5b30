"""The benchmarks that print measured figures run, at tiny sizes."""

from __future__ import annotations

import json

from benchmarks import dataloader, validation_memory
from lightning_modules.validation import VolumeValidation


def test_validation_memory_benchmark_runs_the_real_validation_step_at_a_tiny_size(capsys):
    assert validation_memory.CheapValidation.validation_step is VolumeValidation.validation_step
    record = validation_memory.main(["--size", "24", "20", "16", "--prompts", "10", "--roi", "16"])
    assert record["scored_prompts"] == 10  # every prompt's structure is present, so each got a Dice
    assert record["bound_gib"] > 0 and record["peak_rss_gib"] > 0
    assert "analytic bound" in capsys.readouterr().out


def test_validation_memory_bound_hand_computed():
    voxels, chunk = 1000, 8
    base = 6 * voxels  # float32 image, uint8 labels, uint8 overlay label map
    one_chunk = 4 * chunk * voxels
    assert validation_memory.analytic_bound(voxels, 8, chunk, 0, 4) == base + 2 * one_chunk
    assert validation_memory.analytic_bound(voxels, 100, chunk, 0, 4) == base + 2 * one_chunk  # chunks don't add up
    assert validation_memory.analytic_bound(voxels, 3, chunk, 0, 4) == base + 2 * 4 * 3 * voxels


def test_validation_frees_each_chunk_before_predicting_the_next(monkeypatch):
    """Every chunk's probabilities are unreferenced when the next chunk is predicted (the overlay keeps a
    uint8 label map, not the probabilities)."""
    import gc
    import weakref

    import torch

    from lightning_modules import validation

    alive_at_call: list[int] = []
    chunks: list[weakref.ref] = []

    def fake_predict(network, image, embedding, *args, **kwargs):
        gc.collect()
        alive_at_call.append(sum(ref() is not None for ref in chunks))
        probabilities = torch.rand(len(embedding), *image.shape[2:])
        chunks.append(weakref.ref(probabilities))
        return probabilities

    monkeypatch.setattr(validation, "predict_volume", fake_predict)
    module = validation_memory.CheapValidation(16, 0.0, 1)
    module.validation_step(validation_memory.synthetic_batch((12, 10, 8), 20), 0)
    assert alive_at_call == [0, 0, 0]  # 20 prompts, 8 at a time
    assert module.overlay_sample[1].dtype == "uint8"


def test_dataloader_benchmark_reports_per_worker_rates_and_the_node_extrapolation(phantom_registry, capsys):
    args = ["--registry", str(phantom_registry), "--spacings", "3.0", "--patch", "16", "--batches", "1"]
    records = dataloader.main([*args, "--workers", "0", "1", "--modes", "cached", "--no-augment"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["workers"] for r in lines[:2]] == [0, 1] and all(r["samples_per_second"] > 0 for r in lines[:2])
    summary = records[-1]
    assert summary["from_workers"] == 1 and summary["per_worker"] == records[1]["per_worker"] > 0
    assert summary["node_samples_per_second"] == round(8 * summary["per_worker"], 1)
    assert summary["outruns_gpu"] == (summary["node_samples_per_second"] >= 2 / 0.134)
