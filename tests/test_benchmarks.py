"""The benchmarks that print measured figures run, at tiny sizes."""

from __future__ import annotations

import json

import pytest

from benchmarks import cpu_step, dataloader, soft_skeleton, take_rows, validation_memory
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


def test_validation_scores_a_batch_that_arrives_on_the_accelerator():
    """DDP's forward moves the validation volume to the GPU; scoring reads host copies (the label map's
    ``.numpy()`` on a CUDA tensor failed the GPU node's sanity check)."""
    import torch

    class OnAccelerator(torch.Tensor):
        """NumPy refuses it, as it refuses a CUDA tensor, until ``.cpu()`` or ``.to()`` copies it."""

        def numpy(self, *args, **kwargs):
            raise TypeError("can't convert cuda:0 device type tensor to numpy")

        def cpu(self, *args, **kwargs):
            return self.as_subclass(torch.Tensor)

        def to(self, *args, **kwargs):
            return self.as_subclass(torch.Tensor).to(*args, **kwargs)

    module = validation_memory.CheapValidation(16, 0.0, 1)
    batch = validation_memory.synthetic_batch((12, 10, 8), 3)
    on_accelerator = {k: v.as_subclass(OnAccelerator) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    with pytest.raises(TypeError, match="cuda"):
        on_accelerator["labels"].numpy()
    module.validation_step(on_accelerator, 0)
    assert sorted(module.validation_scores["dice"]) == batch["prompts"]
    assert module.overlay_sample[0].shape == (12, 10, 8)


def test_dataloader_benchmark_reports_per_worker_rates_and_the_node_extrapolation(phantom_registry, capsys):
    args = ["--registry", str(phantom_registry), "--spacings", "3.0", "--patch", "16", "--batches", "1"]
    records = dataloader.main([*args, "--workers", "0", "1", "--modes", "cached", "--no-augment"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["workers"] for r in lines[:2]] == [0, 1] and all(r["samples_per_second"] > 0 for r in lines[:2])
    summary = records[-1]
    assert summary["from_workers"] == 1 and summary["per_worker"] == records[1]["per_worker"] > 0
    assert summary["node_samples_per_second"] == round(8 * summary["per_worker"], 1)
    assert summary["outruns_gpu"] == (summary["node_samples_per_second"] >= 2 / 0.134)


def test_soft_skeleton_benchmark_times_both_skeletons_and_finds_them_equal(capsys):
    record = soft_skeleton.main(["--pairs", "2", "--size", "16", "--repeats", "1"])
    assert record["max_value_difference"] == 0.0 and record["max_grad_difference"] < 1e-5
    assert record["speedup_forward"] > 0 and record["shifted_backward_s"] > 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["pairs"] == 2


def test_cpu_step_batch_holds_a_structure_in_every_pair():
    """Every pair present, so the timed loss runs Dice and soft clDice as a training step does."""
    network = type("Network", (), {"embedding_dim": 8})()
    batch = cpu_step.quickstart_batch(network, 32, 4)
    fractions = batch["masks"].mean(dim=(1, 2, 3, 4))
    assert ((fractions > 0.005) & (fractions < 0.1)).all() and batch["tubular"].sum() == 2


def test_take_rows_benchmark_times_both_gathers_with_the_same_gradients(capsys):
    record = take_rows.main(["--patch", "32", "--prompts", "3", "--repeats", "1"])
    assert record["max_grad"] > 0 and record["max_grad_difference"] <= 1e-2 * record["max_grad"]
    assert record["take_rows_step_s"] > 0 and record["indexing_step_s"] > 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["prompts"] == 3
    assert take_rows.networks.decoder.take_rows is take_rows.GATHERS["take_rows"]  # restored after the run
