"""Fit, phase switch, resume, few-shot, export and segmentation on tiny phantoms (CPU)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from callbacks import CosineWarmRestarts, PruningExport
from callbacks.lr_schedule import warm_restart_factor
from datamodules.multitask import MultiTaskDataModule
from inference.checkpoints import CheckpointError, load_model, read_checkpoint
from lightning_modules.losses import pair_soft_dice
from lightning_modules.prompt_seg_module import PromptSegModule
from segment import main as segment_main
from tests.conftest import TINY_NETWORK

pytestmark = pytest.mark.slow


def data_module(registry: Path, cache: Path, **overrides) -> MultiTaskDataModule:
    settings = dict(
        registry=str(registry),
        cache_dir=str(cache),
        spacing_candidates=(3.0,),
        patch_size=64,
        batch_size=1,
        prompts_per_image=2,
        samples_per_epoch=2,
        augment=False,
    )
    return MultiTaskDataModule(**(settings | overrides))


def module(**overrides) -> PromptSegModule:
    settings = dict(TINY_NETWORK, joint_epochs=2, path_epochs=1, lr=1e-3, sw_roi=64, sw_batch_size=1)
    return PromptSegModule(**(settings | overrides))


def trainer(root: Path, max_epochs: int, validate: bool = False, callbacks=()) -> L.Trainer:
    checkpoints = [L.pytorch.callbacks.ModelCheckpoint(dirpath=root / "checkpoints", filename="latest", save_last=True)]
    if validate:
        checkpoints.append(
            L.pytorch.callbacks.ModelCheckpoint(
                dirpath=root / "checkpoints", filename="best", monitor="val/mean_dice", mode="max"
            )
        )
    return L.Trainer(
        default_root_dir=root,
        max_epochs=max_epochs,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=1 if validate else 0,
        num_sanity_val_steps=0,
        callbacks=[*checkpoints, CosineWarmRestarts(warmup=1, period=2), *callbacks],
        deterministic=True,
    )


def test_warm_restart_schedule_values():
    assert warm_restart_factor(0, 2, 4, 1.0, 0.0) == pytest.approx(0.5)
    assert warm_restart_factor(2, 2, 4, 1.0, 0.0) == pytest.approx(1.0)
    assert warm_restart_factor(4, 2, 4, 1.0, 0.0) == pytest.approx(0.5)  # half-way down the cosine
    assert warm_restart_factor(5, 2, 4, 1.0, 0.0) == pytest.approx((1 + np.cos(0.75 * np.pi)) / 2)
    assert warm_restart_factor(6, 2, 4, 1.0, 0.0) == pytest.approx(1.0)  # restarted


@pytest.mark.parametrize(
    "configs",
    [
        ["configs/quickstart.yaml"],
        ["configs/quickstart.yaml", "configs/phantoms_long.yaml"],
        ["configs/quickstart.yaml", "configs/reference.yaml"],
        [
            "configs/quickstart.yaml",
            "configs/phantoms_long.yaml",
            "configs/reference.yaml",
            "configs/reference_long.yaml",
        ],
        ["configs/paper.yaml"],
    ],
)
def test_every_shipped_schedule_ends_annealed(configs):
    """The last epoch trains at most at 5 % of the peak lr: a cycle that restarts shortly before the end
    would leave the final weights from the noisiest steps of the run."""
    trainer_config, schedule = {}, {}
    for config in configs:
        loaded = yaml.safe_load(Path(config).read_text())["trainer"]
        trainer_config.update(loaded)
        for callback in loaded.get("callbacks", []):
            if callback["class_path"].endswith("CosineWarmRestarts"):
                schedule = callback["init_args"]
    lr = CosineWarmRestarts(**schedule)
    assert lr.interval == "epoch"
    last = trainer_config["max_epochs"] - 1
    factor = warm_restart_factor(last, lr.warmup, lr.period, lr.period_mult, lr.min_factor)
    assert factor <= 0.05, (configs, factor)


@pytest.fixture(scope="module")
def trained(phantom_registry, tmp_path_factory) -> tuple[Path, PromptSegModule]:
    root = tmp_path_factory.mktemp("run")
    L.seed_everything(0)
    model = module()
    export = PruningExport()
    trainer(root, 3, validate=True, callbacks=[export]).fit(model, data_module(phantom_registry, root / "cache"))
    return root, model


def test_router_lr_scale_survives_the_lr_schedule():
    model = module(router_lr_scale=0.1, lr=2e-3)
    optimizer = model.configure_optimizers()
    router_ids = {id(p) for n, p in model.network.named_parameters() if ".router." in n}
    lrs = {all(id(p) in router_ids for p in g["params"]): g["lr"] for g in optimizer.param_groups}
    assert lrs == {False: pytest.approx(2e-3), True: pytest.approx(2e-4)}
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.network.parameters()))

    class Stub:
        optimizers = [optimizer]
        current_epoch = 0

    model.log = lambda *args, **kwargs: None
    CosineWarmRestarts(warmup=2, period=4)._apply(Stub(), model)  # warm-up factor 0.5
    assert sorted(g["lr"] for g in optimizer.param_groups) == [pytest.approx(1e-4), pytest.approx(1e-3)]


def test_two_phases_freeze_all_but_the_selected_sub_pathways(trained):
    root, model = trained
    assert model.phase == 2
    trainable = {n for n, p in model.network.named_parameters() if p.requires_grad}
    assert trainable and all(".sub_pathways." in n for n in trainable)
    routes = model.network.routes(model.embed(model.task_prompts))
    for level, pathway in enumerate(model.network.pathways):
        selected = {str(k) for k in routes[:, level].tolist()}
        for key, sub_pathway in pathway.sub_pathways.items():
            assert all(p.requires_grad == (key in selected) for p in sub_pathway.parameters())


def test_checkpoint_holds_phase_embeddings_and_loads_weights_only(trained):
    root, model = trained
    checkpoint = read_checkpoint(root / "checkpoints" / "last.ckpt")
    assert checkpoint["phase"] == 2
    assert set(checkpoint["prompt_embeddings"]) == set(model.task_prompts)
    assert checkpoint["preprocessing"]["spacing_candidates"] == [3.0] or checkpoint["preprocessing"][
        "spacing_candidates"
    ] == (3.0,)
    assert not any(k.startswith("network.") is False for k in checkpoint["state_dict"])  # no text encoder weights


def test_pruning_export_matches_the_full_model_for_its_prompts(trained, tmp_path):
    root, model = trained
    exported = root / "checkpoints" / "trimmed.pt"
    full, trimmed = load_model(root / "checkpoints" / "last.ckpt"), load_model(exported)
    prompts = ["liver", "aorta"]
    embeddings = torch.stack([full.prompt_embeddings[p] for p in prompts])
    image = torch.rand(1, 1, 64, 64, 64)
    index = torch.zeros(2, dtype=torch.long)
    difference = (
        (full.network(image, embeddings, index).logits - trimmed.network(image, embeddings, index).logits).abs().max()
    )
    assert difference <= 1e-5


def test_segment_writes_masks_on_the_input_grid_and_refuses_overwrite(trained, phantom_root, tmp_path):
    root, _ = trained
    images = sorted(phantom_root.glob("Dataset00[123]_*/imagesTr/*.nii.gz"))
    image = next(p for p in images if nib.aff2axcodes(nib.load(p).affine) != ("R", "A", "S"))  # not RAS, anisotropic
    args = [
        "--checkpoint",
        str(root / "checkpoints" / "trimmed.pt"),
        "--input",
        str(image),
        "--prompt",
        "liver",
        "--prompt",
        "aorta",
        "--output",
        str(tmp_path / "out"),
        "--device",
        "cpu",
        "--overlap",
        "0.25",
    ]
    assert segment_main(args) == 0
    source = nib.load(image)
    for slug in ("liver", "aorta"):
        mask = nib.load(tmp_path / "out" / image.name.removesuffix(".nii.gz").removesuffix("_0000") / f"{slug}.nii.gz")
        assert mask.shape == source.shape and np.allclose(mask.affine, source.affine)
        assert set(np.unique(np.asanyarray(mask.dataobj))) <= {0, 1}
    assert segment_main(args) == 2  # exists, no --overwrite
    full_args = [
        a if a != str(root / "checkpoints" / "trimmed.pt") else str(root / "checkpoints" / "last.ckpt") for a in args
    ]
    full_args[full_args.index(str(tmp_path / "out"))] = str(tmp_path / "full")
    assert segment_main(full_args) == 0
    for slug in ("liver", "aorta"):
        case = image.name.removesuffix(".nii.gz").removesuffix("_0000")
        a = np.asanyarray(nib.load(tmp_path / "out" / case / f"{slug}.nii.gz").dataobj)
        b = np.asanyarray(nib.load(tmp_path / "full" / case / f"{slug}.nii.gz").dataobj)
        assert np.array_equal(a, b)


def test_segment_bad_inputs_give_one_line_and_no_output(trained, tmp_path, capsys):
    root, _ = trained
    checkpoint = str(root / "checkpoints" / "last.ckpt")
    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 1), np.int16), np.eye(4)), flat)
    cases = {
        "missing input": ["--checkpoint", checkpoint, "--input", str(tmp_path / "nope.nii.gz")],
        "2D image": ["--checkpoint", checkpoint, "--input", str(flat)],
        "missing checkpoint": ["--checkpoint", str(tmp_path / "none.ckpt"), "--input", str(flat)],
        "bad device": ["--checkpoint", checkpoint, "--input", str(flat), "--device", "tpu"],
    }
    for name, args in cases.items():
        code = segment_main([*args, "--prompt", "liver", "--output", str(tmp_path / "out")])
        error = capsys.readouterr().err.strip()
        assert code == 2 and error.startswith("error:") and "\n" not in error, name
    assert not (tmp_path / "out").exists()


class Payload:
    """An arbitrary object: loading it would run unpickling code."""


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": Payload()}, path)
    with pytest.raises(CheckpointError, match="refused"):
        read_checkpoint(path)


def test_resume_at_the_phase_boundary_continues_like_the_uninterrupted_run(phantom_registry, tmp_path):
    L.seed_everything(0)
    straight = module()
    trainer(tmp_path / "a", 3).fit(straight, data_module(phantom_registry, tmp_path / "cache"))
    L.seed_everything(0)
    first = module()
    trainer(tmp_path / "b", 2).fit(first, data_module(phantom_registry, tmp_path / "cache"))
    L.seed_everything(1)  # a different global seed must not matter after resuming
    resumed = module()
    trainer(tmp_path / "b", 3).fit(
        resumed,
        data_module(phantom_registry, tmp_path / "cache"),
        ckpt_path=str(tmp_path / "b" / "checkpoints" / "last.ckpt"),
    )
    assert resumed.phase == 2
    for (name, a), (_, b) in zip(straight.network.state_dict().items(), resumed.network.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), name


class LearningRates(L.Callback):
    """Records (epoch, phase, lr of the first group) at the first batch of every epoch."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int, float]] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if batch_idx == 0:
            self.seen.append((trainer.current_epoch, module.phase, trainer.optimizers[0].param_groups[0]["lr"]))


def test_resume_mid_phase_two_continues_like_the_uninterrupted_run(phantom_registry, tmp_path):
    """Stopped in phase 2, resumed: same sub-pathways trainable, same optimiser groups, same weights."""
    settings = dict(joint_epochs=2, path_epochs=2)
    L.seed_everything(0)
    straight = module(**settings)
    rates = LearningRates()
    trainer(tmp_path / "a", 4, callbacks=[rates]).fit(straight, data_module(phantom_registry, tmp_path / "cache"))
    L.seed_everything(0)
    trainer(tmp_path / "b", 3).fit(module(**settings), data_module(phantom_registry, tmp_path / "cache"))
    assert read_checkpoint(tmp_path / "b" / "checkpoints" / "last.ckpt")["phase"] == 2
    L.seed_everything(1)
    resumed = module(**settings)
    trainer(tmp_path / "b", 4).fit(
        resumed,
        data_module(phantom_registry, tmp_path / "cache"),
        ckpt_path=str(tmp_path / "b" / "checkpoints" / "last.ckpt"),
    )
    trainable = lambda m: {n for n, p in m.network.named_parameters() if p.requires_grad}  # noqa: E731
    assert resumed.phase == 2 and trainable(resumed) == trainable(straight)
    for (name, a), (_, b) in zip(straight.network.state_dict().items(), resumed.network.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), name
    # Phase 2 runs on along the schedule (warm-up 1, period 2): its first epoch sits half-way down
    # the first cycle (factor 0.505), where a restarted schedule would give the full lr.
    assert [(e, phase) for e, phase, _ in rates.seen] == [(0, 1), (1, 1), (2, 2), (3, 2)]
    expected = [1e-3 * warm_restart_factor(e, 1, 2, 2.0, 0.01) for e in range(4)]  # trainer()'s schedule
    assert [lr for _, _, lr in rates.seen] == pytest.approx(expected)
    assert rates.seen[2][2] == pytest.approx(0.505e-3)


@pytest.mark.parametrize("config", ["configs/quickstart.yaml", "configs/paper.yaml"])
def test_last_checkpoint_is_written_every_epoch_whatever_the_validation_interval(config, phantom_registry, tmp_path):
    callbacks = yaml.safe_load(Path(config).read_text())["trainer"]["callbacks"]
    settings = next(c["init_args"] for c in callbacks if c["init_args"].get("filename") == "latest")
    saved_epochs = []

    class Spy(L.Callback):
        def on_train_epoch_start(self, trainer, module) -> None:
            last = tmp_path / "ckpt" / "last.ckpt"
            saved_epochs.append(read_checkpoint(last)["epoch"] if last.exists() else None)

    run = L.Trainer(
        max_epochs=3,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        check_val_every_n_epoch=5,
        num_sanity_val_steps=0,
        callbacks=[L.pytorch.callbacks.ModelCheckpoint(**settings | {"dirpath": tmp_path / "ckpt"}), Spy()],
    )
    run.fit(module(joint_epochs=3, path_epochs=0), data_module(phantom_registry, tmp_path / "cache"))
    assert saved_epochs == [None, 0, 1]


def test_few_shot_routes_prunes_and_freezes_the_encoder(trained, fewshot_registry, tmp_path):
    root, _ = trained
    model = module(
        init_checkpoint=str(root / "checkpoints" / "last.ckpt"),
        finetune_prompt="renal artery",
        joint_epochs=0,
        path_epochs=0,
    )
    data = data_module(fewshot_registry, tmp_path / "cache", shots=1, prompts_per_image=1)
    trainer(tmp_path / "fewshot", 1).fit(model, data)
    assert all(len(p.sub_pathways) == 1 for p in model.network.pathways)
    state = read_checkpoint(root / "checkpoints" / "last.ckpt")["state_dict"]
    encoder = model.network.encoder.state_dict()
    assert all(torch.equal(state[f"network.encoder.{k}"], v) for k, v in encoder.items())
    decoder = model.network.decoder.state_dict()
    assert any(not torch.equal(state[f"network.decoder.{k}"], v) for k, v in decoder.items())
    assert len(data.train_cases["PhantomRenalArtery"]) == 1 and len(data.val_cases) == 2


def test_few_shot_bad_input(phantom_registry, fewshot_registry, tmp_path):
    with pytest.raises(ValueError, match="finetune_prompt is empty"):
        module(init_checkpoint="x.ckpt", finetune_prompt=" ")
    with pytest.raises(ValueError, match="shots must be at least 1"):
        data_module(fewshot_registry, tmp_path, shots=0)
    with pytest.raises(ValueError, match="leaves no validation case"):
        data_module(fewshot_registry, tmp_path, shots=3).setup()


def test_checkpoint_of_another_configuration_names_the_mismatch(trained, tmp_path, fewshot_registry):
    root, _ = trained
    model = module(
        init_checkpoint=str(root / "checkpoints" / "last.ckpt"),
        finetune_prompt="renal artery",
        decoder_channels=(32, 24, 16, 16, 8, 8),
    )
    with pytest.raises(CheckpointError, match="shape mismatch"):
        trainer(tmp_path / "x", 1).fit(model, data_module(fewshot_registry, tmp_path / "cache", shots=1))


def test_export_command_writes_a_trimmed_model_and_names_unknown_prompts(trained, tmp_path, capsys):
    from export import main as export_main

    root, _ = trained
    checkpoint = str(root / "checkpoints" / "last.ckpt")
    assert export_main(["--checkpoint", checkpoint, "--prompt", "liver", "--output", str(tmp_path / "liver.pt")]) == 0
    before_after = capsys.readouterr().out
    assert "params_before" in before_after and (tmp_path / "liver.pt").is_file()
    assert load_model(tmp_path / "liver.pt").network.pathways[0].kept_paths.__len__() == 1
    assert (
        export_main(["--checkpoint", checkpoint, "--prompt", "kidney stone", "--output", str(tmp_path / "x.pt")]) == 2
    )
    assert "no embedding" in capsys.readouterr().err and not (tmp_path / "x.pt").exists()


def test_ddp_on_two_cpu_processes(phantom_registry, tmp_path):
    import subprocess
    import sys

    args = [
        sys.executable,
        "train.py",
        "fit",
        "--config",
        "configs/quickstart.yaml",
        "--trainer.strategy",
        "ddp_find_unused_parameters_true",  # routing leaves unselected sub-pathways without gradient
        "--trainer.devices",
        "2",
        "--trainer.accelerator",
        "cpu",
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_val_batches",
        "2",  # each rank validates its own cases; the logged means gather every rank's
        "--trainer.check_val_every_n_epoch",
        "1",
        "--trainer.logger",
        "false",
        "--trainer.default_root_dir",
        str(tmp_path),
        "--trainer.callbacks",
        "[]",
        "--trainer.enable_checkpointing",
        "false",
        "--model.feature_size",
        "12",
        "--model.decoder_channels",
        "[24, 24, 16, 16, 8, 8]",
        "--model.num_paths",
        "3",
        "--model.router_hidden_dim",
        "16",
        "--data.registry",
        str(phantom_registry),
        "--data.cache_dir",
        str(tmp_path / "cache"),
        "--data.samples_per_epoch",
        "4",
        "--data.num_workers",
        "0",
        "--data.prompts_per_image",
        "2",
        "--data.spacing_candidates",
        "[3.0]",
    ]
    result = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "max_epochs=1" in result.stderr + result.stdout


def write_dicom_series(source: Path, folder: Path) -> None:
    """Write a NIfTI volume as a CT DICOM series (one file per slice), geometry preserved."""
    import SimpleITK as sitk

    image = sitk.Cast(sitk.ReadImage(str(source)), sitk.sitkInt16)
    folder.mkdir(parents=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    direction = image.GetDirection()
    orientation = "\\".join(
        f"{v:.6f}" for v in (direction[0], direction[3], direction[6], direction[1], direction[4], direction[7])
    )
    for index in range(image.GetDepth()):
        slice_image = image[:, :, index]
        position = image.TransformIndexToPhysicalPoint((0, 0, index))
        tags = {
            "0008|0060": "CT",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
            "0020|000e": "1.2.826.0.1.3680043.2.1125.1.2",
            "0020|0037": orientation,
            "0020|0032": "\\".join(f"{v:.6f}" for v in position),
            "0020|0013": str(index + 1),
            "0018|0050": f"{image.GetSpacing()[2]:.6f}",
            "0028|1052": "0",
            "0028|1053": "1",
        }
        for tag, value in tags.items():
            slice_image.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{index:04d}.dcm"))
        writer.Execute(slice_image)


def test_dicom_series_segments_like_its_nifti_twin_with_label_map_and_preview(trained, phantom_root, tmp_path):
    root, _ = trained
    nifti = sorted((phantom_root / "Dataset002_PhantomThorax" / "imagesTr").glob("*.nii.gz"))[1]
    write_dicom_series(nifti, tmp_path / "dicom" / "series")
    common = [
        "--checkpoint",
        str(root / "checkpoints" / "last.ckpt"),
        "--prompt",
        "lung",
        "--prompt",
        "aorta",
        "--device",
        "cpu",
        "--overlap",
        "0.25",
    ]
    assert (
        segment_main(
            [
                *common,
                "--input",
                str(nifti),
                "--output",
                str(tmp_path / "a"),
                "--label-map",
                "--preview",
                "--largest-component",
            ]
        )
        == 0
    )
    assert (
        segment_main(
            [
                *common,
                "--input",
                str(tmp_path / "dicom" / "series"),
                "--output",
                str(tmp_path / "b"),
                "--largest-component",
            ]
        )
        == 0
    )
    case = next((tmp_path / "a").iterdir())
    assert (case / "labels.nii.gz").is_file() and (case / "preview.png").stat().st_size > 0
    assert __import__("json").loads((case / "labels.json").read_text()) == {"lung": 1, "aorta": 2}
    for slug in ("lung", "aorta"):
        from_nifti = nib.load(case / f"{slug}.nii.gz")
        from_dicom = nib.load(tmp_path / "b" / "series" / f"{slug}.nii.gz")
        # DICOM is stored in LPS slice order; compare in the common RAS world through the affines.
        a = nib.as_closest_canonical(from_nifti)
        b = nib.as_closest_canonical(from_dicom)
        assert np.allclose(a.affine, b.affine, atol=1e-3)
        assert np.array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj))


def test_reference_network_trains_on_partial_labels_and_segments_through_segment_py(
    phantom_registry, phantom_root, tmp_path, capsys
):
    from lightning_modules.reference import ReferenceModule

    L.seed_everything(0)
    reference = ReferenceModule(filters=(4, 4, 8, 8, 16, 16), lr=1e-3, sw_roi=64, sw_batch_size=1, deep_supervision=1)
    data = data_module(phantom_registry, tmp_path / "cache")
    before = []
    heads = lambda module: [module.network.unet.output_block, *module.network.unet.deep_supervision_heads]  # noqa: E731

    class FirstWeights(L.Callback):
        def on_train_start(self, trainer, module) -> None:
            before.extend(head.conv.conv.weight.detach().clone() for head in heads(module))

    trainer(tmp_path, 2, validate=True, callbacks=[FirstWeights()]).fit(reference, data)
    assert reference.prompts == sorted({t.prompt for t in data.tasks}) and len(reference.prompts) == 15
    assert len(before) == 2  # the final head and the deep-supervision head at 1/2 resolution both learn
    assert not any(torch.equal(a, head.conv.conv.weight) for a, head in zip(before, heads(reference)))
    model = load_model(tmp_path / "checkpoints" / "last.ckpt")
    image = next((phantom_root / "Dataset002_PhantomThorax" / "imagesTr").glob("*.nii.gz"))
    output = tmp_path / "segment"
    args = ["--checkpoint", str(tmp_path / "checkpoints" / "last.ckpt"), "--input", str(image), "--output", str(output)]
    assert segment_main([*args, "--prompt", "aorta", "--prompt", "lung"]) == 0
    masks = sorted(p.name for p in output.rglob("*.nii.gz"))
    assert masks == ["aorta.nii.gz", "lung.nii.gz"] and model.network.num_tasks == 15
    assert segment_main([*args, "--prompt", "renal artery", "--overwrite"]) == 2
    assert "segments only its training prompts" in capsys.readouterr().err


def test_routing_callback_counts_route_changes_and_writes_the_map(tmp_path):
    import json

    from callbacks.routing_map import RoutingHeatmap

    sequence = [
        {"a": (0, 1), "b": (2, 2)},
        {"a": (0, 1), "b": (2, 2)},
        {"a": (1, 1), "b": (2, 0)},
        {"a": (1, 0), "b": (2, 0)},
    ]
    logged = []

    class Module:
        task_prompts = ["a", "b"]
        hparams = {"num_paths": 3}

        def current_routes(self):
            return sequence[min(len(logged), len(sequence) - 1)]

        def log(self, name, value):
            logged.append(value)

    class Trainer:
        sanity_checking, is_global_zero, log_dir, loggers, current_epoch, global_step = (
            False,
            True,
            str(tmp_path),
            [],
            3,
            4,
        )

    callback, module = RoutingHeatmap(), Module()
    module.hparams = type("H", (), {"num_paths": 3})()
    for step in range(4):
        callback.on_train_batch_end(Trainer(), module, None, None, step)
    assert logged == [0.0, 0.0, 2.0, 3.0]
    callback.on_validation_epoch_end(Trainer(), module)
    record = json.loads((tmp_path / "routing" / "epoch0003.json").read_text())
    assert record["route_changes"] == 3 and record["routes"] == {"a": [1, 0], "b": [2, 0]}


def test_every_registry_and_case_problem_is_one_error_line_before_any_output(phantom_root, tmp_path):
    import gzip
    import shutil
    import subprocess
    import sys

    thorax = tmp_path / "thorax"
    shutil.copytree(phantom_root / "Dataset002_PhantomThorax", thorax)
    truncated = next((thorax / "imagesTr").glob("*.nii.gz"))
    truncated.write_bytes(gzip.compress(gzip.decompress(truncated.read_bytes()))[:2000])
    registry = tmp_path / "registry.yaml"
    registry.write_text(
        yaml.safe_dump(
            {
                "datasets": [
                    {"name": "Missing", "path": str(tmp_path / "nowhere"), "format": "nnunet"},
                    {
                        "name": "Abdomen",
                        "path": str(phantom_root / "Dataset001_PhantomAbdomen"),
                        "format": "nnunet",
                        "tasks": [{"prompt": "gall bladder"}],
                    },
                    {"name": "Thorax", "path": str(thorax), "format": "nnunet"},
                ]
            }
        )
    )
    versions = lambda: set(Path("outputs/quickstart/logs").glob("version_*"))  # noqa: E731
    before = versions()
    args = [sys.executable, "train.py", "fit", "--config", "configs/quickstart.yaml", "--data.registry", str(registry)]
    root = ["--trainer.default_root_dir", str(tmp_path / "out"), "--data.cache_dir", str(tmp_path / "cache")]
    result = subprocess.run([*args, *root], capture_output=True, encoding="utf-8", errors="replace", timeout=300)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert any("nowhere" in e for e in errors) and any("gall bladder" in e for e in errors), errors
    registry.write_text(yaml.safe_dump({"datasets": [{"name": "Thorax", "path": str(thorax), "format": "nnunet"}]}))
    result = subprocess.run([*args, *root], capture_output=True, encoding="utf-8", errors="replace", timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert any(truncated.name in line for line in result.stderr.splitlines() if line.startswith("error:"))
    assert not (tmp_path / "out").exists() and versions() == before


def test_deep_supervision_weights_each_coarser_level_half_the_one_before():
    torch.manual_seed(0)
    model = module(deep_supervision=2, balance_weight=0.0)
    model.log = lambda *args, **kwargs: None  # no trainer attached
    model.prompt_embeddings = {"liver": torch.randn(384), "aorta": torch.randn(384)}
    model.network.train().set_routing_schedule(temperature=1.0, noise_scale=0.0)
    batch = {
        "image": torch.rand(1, 1, 64, 64, 64),
        "prompts": ["liver", "aorta"],
        "image_index": torch.tensor([0, 0]),
        "masks": (torch.rand(2, 1, 64, 64, 64) > 0.9).float(),
        "tubular": torch.tensor([False, True]),
    }
    output = model.network(batch["image"], model.embed(batch["prompts"]), batch["image_index"])
    final = model.supervised_losses(output.logits, batch)["loss"]
    half, quarter = (
        model.supervised_losses(x, batch | {"masks": F.avg_pool3d(batch["masks"], k)})["loss"]
        for x, k in zip(output.deep_logits, (2, 4))
    )  # the masks averaged over 2^3 and 4^3 blocks: each coarse voxel's foreground fraction
    assert not torch.allclose(final, half)
    expected = (final + 0.5 * half + 0.25 * quarter) / 1.75
    assert torch.allclose(model.training_step(batch, 0), expected, rtol=1e-5)


def test_task_priorities_weigh_the_step_by_running_dice_and_travel_in_the_checkpoint():
    """With "liver" at running Dice 0.8 and "aorta" unseen, the step's loss is the pairs' loss
    weighted 0.2 : 1 (normalised); then the liver's present pair updates its running Dice, the
    empty aorta pair does not, and the running values are saved and loaded with the checkpoint."""
    torch.manual_seed(0)
    model = module(task_priority_exponent=1.0, balance_weight=0.0)
    model.log = lambda *args, **kwargs: None  # no trainer attached
    model.prompt_embeddings = {"liver": torch.randn(384), "aorta": torch.randn(384)}
    model.network.train().set_routing_schedule(temperature=1.0, noise_scale=0.0)
    model.task_priorities.dice = {"liver": 0.8}
    masks = torch.zeros(2, 1, 64, 64, 64)
    masks[0, 0, 20:40, 20:40, 20:40] = 1
    batch = {
        "image": torch.rand(1, 1, 64, 64, 64),
        "prompts": ["liver", "aorta"],
        "image_index": torch.tensor([0, 0]),
        "masks": masks,
        "tubular": torch.tensor([False, True]),
    }
    output = model.network(batch["image"], model.embed(batch["prompts"]), batch["image_index"])
    weighted = model.supervised_losses(output.logits, batch | {"pair_weights": torch.tensor([0.2, 1.0]) / 0.6})
    plain = model.supervised_losses(output.logits, batch)
    assert not torch.allclose(weighted["loss"], plain["loss"])
    assert torch.allclose(model.training_step(batch, 0), weighted["loss"], rtol=1e-5)
    soft_dice = pair_soft_dice(torch.sigmoid(output.logits[:1].float()), masks[:1]).item()
    assert model.task_priorities.dice == pytest.approx({"liver": 0.9 * 0.8 + 0.1 * soft_dice})
    checkpoint = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    restored = module(task_priority_exponent=1.0)
    restored.on_load_checkpoint(checkpoint)
    assert restored.task_priorities.dice == model.task_priorities.dice


def test_priority_sampling_draws_the_tasks_the_model_has_not_learned(phantom_registry, tmp_path):
    """Every task but the spleen at running Dice 0.999 and a steep exponent: the loader draws the
    spleen for every patch of both epochs, reading the difficulties of the model being fitted."""
    model = module(task_priority_exponent=8.0)
    data = data_module(phantom_registry, tmp_path / "cache", samples_per_epoch=3, priority_sampling=1.0)
    data.setup()
    model.task_priorities.dice = {t.prompt: 0.999 for t in data.tasks if t.prompt != "spleen"}
    drawn: list[str] = []

    class FirstPrompts(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            drawn.append(batch["prompts"][0])

    trainer(tmp_path, max_epochs=2, callbacks=[FirstPrompts()]).fit(model, data)
    assert drawn == ["spleen"] * 6
    assert data.task_sampler.patches is data.train_set and data.train_set.epoch == 1


def test_an_update_with_non_finite_gradients_is_skipped_and_counted():
    from lightning_modules.reference import ReferenceModule

    module = ReferenceModule(filters=(4, 4, 8, 8, 16, 16), prompts=["liver"])
    module.configure_model()
    module.log = lambda *args, **kwargs: None  # no trainer attached
    optimizer = torch.optim.AdamW(module.parameters(), lr=1.0)
    before = [p.detach().clone() for p in module.parameters()]
    for p in module.parameters():
        p.grad = torch.ones_like(p)
    next(module.parameters()).grad[0] = float("nan")
    module.on_before_optimizer_step(optimizer)
    optimizer.step()
    assert module.skipped_steps == 1 and all(torch.equal(a, b) for a, b in zip(before, module.parameters()))
    for p in module.parameters():
        p.grad = torch.ones_like(p)
    module.on_before_optimizer_step(optimizer)
    optimizer.step()
    assert module.skipped_steps == 1 and not torch.equal(before[0], next(module.parameters()))


def test_simulated_gpu_node_breaks_cuda_state_calls_in_forked_workers_only():
    """The simulation itself: a worker calling the old ``fork_rng()`` fails, the parent does not."""
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from torch.utils.data import DataLoader\n"
        "from tests.simulated_gpu_node import simulate_gpu_node\n"
        "simulate_gpu_node()\n"
        "assert not torch.cuda.is_available()\n"
        "class Forking(torch.utils.data.Dataset):\n"
        "    def __len__(self): return 1\n"
        "    def __getitem__(self, i):\n"
        "        with torch.random.fork_rng(): return torch.zeros(1)\n"
        "next(iter(DataLoader(Forking(), num_workers=1)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, encoding="utf-8", errors="replace", timeout=120
    )
    assert result.returncode != 0 and "Cannot re-initialize CUDA in forked subprocess" in result.stderr


def test_paper_config_trains_two_steps_with_augmenting_workers_on_a_simulated_gpu_node(phantom_registry, tmp_path):
    """configs/paper.yaml as written (the paper network, augmentation, loader workers, its DDP
    strategy, bf16), shrunk only in batch and patch size, with the loader workers seeing CUDA. On a CPU
    without bfloat16 instructions bf16 is emulated about 20x slower, so there it trains in 32-bit."""
    import os
    import subprocess
    import sys

    from train import cpu_has_native_bf16

    repo = Path(__file__).resolve().parents[1]
    args = [
        *("fit", "--config", str(repo / "configs/paper.yaml")),
        *("--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.max_steps", "2"),
        *("--trainer.limit_val_batches", "0", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"),
        *("--data.registry", str(phantom_registry), "--data.spacing_candidates", "[3.0]"),
        *("--data.patch_size", "64", "--data.batch_size", "1", "--data.prompts_per_image", "2"),
        *("--data.samples_per_epoch", "2", "--data.num_workers", "2"),
        *("--model.text_encoder_weights", "null"),  # CLIP's architecture, random weights: no download here
        *(() if cpu_has_native_bf16() else ("--trainer.precision", "32-true")),
    ]
    environment = os.environ | {"WANDB_MODE": "disabled", "OMP_NUM_THREADS": "2", "MASTER_PORT": "29517"}
    result = subprocess.run(
        [sys.executable, str(repo / "tests/simulated_gpu_node.py"), *args],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = read_checkpoint(tmp_path / "outputs/paper/checkpoints/last.ckpt")
    assert checkpoint["global_step"] == 2
    assert checkpoint["hyper_parameters"]["decoder_channels"] == [192, 192, 192, 48, 48, 48]


@pytest.mark.parametrize("workers", [0, 2])
def test_the_first_epoch_after_a_resume_draws_its_own_samples_in_loader_workers(workers, phantom_registry, tmp_path):
    """Workers copy the data set when Lightning first iterates, before the epoch-start hooks; the
    resumed epoch must still draw its own samples, not those of the epoch before it."""

    class Recorder(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.images: list[tuple[int, torch.Tensor]] = []

        def on_train_epoch_start(self) -> None:
            self.trainer.datamodule.set_epoch(self.current_epoch)

        def training_step(self, batch, index):
            self.images.append((self.current_epoch, batch["image"].clone()))
            return self.weight.sum() * 0

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def run(max_epochs: int, folder: str, resume: Path | None = None) -> Recorder:
        recorder = Recorder()
        saver = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / folder, save_last=True)
        quiet = dict(logger=False, enable_progress_bar=False, enable_model_summary=False)
        run = L.Trainer(max_epochs=max_epochs, accelerator="cpu", callbacks=[saver], **quiet)
        data = data_module(phantom_registry, tmp_path / "cache", patch_size=32, num_workers=workers)
        run.fit(recorder, data, ckpt_path=resume)
        return recorder

    straight = run(3, "straight").images
    run(2, "stopped")
    resumed = run(3, "resumed", resume=tmp_path / "stopped/last.ckpt").images
    assert [e for e, _ in resumed] == [2, 2]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(resumed, straight[-2:]))
    assert not torch.equal(resumed[0][1], straight[2][1])  # epoch 1's first sample differs from epoch 2's


def test_shared_start_trains_candidate_zero_then_copies_it_to_every_candidate(phantom_registry, tmp_path):
    """Epoch 0 of a one-epoch shared start trains only candidate 0 at each level; its checkpoint
    holds every candidate equal to it; resumed, the routers choose again and the copies diverge."""
    L.seed_everything(0)
    model = module(shared_start_epochs=1, joint_epochs=2, path_epochs=0, gumbel_noise_start=1.0, gumbel_noise_end=1.0)
    initial = {k: v.clone() for k, v in model.network.state_dict().items()}
    data = data_module(phantom_registry, tmp_path / "cache", samples_per_epoch=3)
    trainer(tmp_path, 1).fit(model, data)
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    for level, pathway in enumerate(model.network.pathways):
        prefix = f"network.decoder.pathways.{level}.sub_pathways."
        shared = {k[len(prefix) + 2 :]: v for k, v in state.items() if k.startswith(prefix + "0.")}
        assert any(
            not torch.equal(v, initial[f"decoder.pathways.{level}.sub_pathways.0.{k}"]) for k, v in shared.items()
        )
        for path in range(1, pathway.num_paths):
            copy = {k[len(prefix) + 2 :]: v for k, v in state.items() if k.startswith(f"{prefix}{path}.")}
            assert copy.keys() == shared.keys() and all(torch.equal(copy[k], shared[k]) for k in shared)
        assert pathway.shared_path is None
    resumed = module(shared_start_epochs=1, joint_epochs=2, path_epochs=0, gumbel_noise_start=1.0, gumbel_noise_end=1.0)
    trainer(tmp_path, 2).fit(resumed, data, ckpt_path=str(tmp_path / "checkpoints" / "last.ckpt"))
    after = resumed.network.state_dict()
    moved = [
        k
        for k, v in after.items()
        if ".sub_pathways." in k
        and ".sub_pathways.0." not in k
        and not torch.equal(v, state[f"network.{k}"].to(v.dtype))
    ]
    assert moved, "after the shared start no candidate but 0 was trained: the routers did not choose again"


def test_centre_prompts_stores_the_mean_task_embedding_and_older_checkpoints_resume_uncentred(
    phantom_registry, tmp_path
):
    L.seed_everything(0)
    model = module(centre_prompts=True, joint_epochs=2, path_epochs=0)
    data = data_module(phantom_registry, tmp_path / "cache")
    trainer(tmp_path, 1).fit(model, data)
    tasks = sorted(model.tubular)
    assert len(tasks) > 1
    expected = torch.stack([model.prompt_embeddings[p] for p in tasks]).mean(dim=0)
    assert torch.allclose(model.network.prompt_centre, expected)
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert torch.equal(state["network.prompt_centre"], model.network.prompt_centre)
    older = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    del older["state_dict"]["network.prompt_centre"]  # saved before centring existed: resumes uncentred
    torch.save(older, tmp_path / "older.ckpt")
    resumed = module(joint_epochs=2, path_epochs=0)
    trainer(tmp_path / "resumed", 2).fit(resumed, data, ckpt_path=str(tmp_path / "older.ckpt"))
    assert torch.equal(resumed.network.prompt_centre, torch.zeros_like(expected))


@pytest.mark.parametrize("architecture", ["routed", "reference"])
def test_input_windows_read_the_data_window_and_segment_py_gets_it_from_the_checkpoint(
    architecture, phantom_registry, tmp_path
):
    """A data window other than the paper's: the extra channel still reads HU, in training and from the file."""
    from lightning_modules.reference import ReferenceModule

    windows = ((40.0, 400.0),)
    if architecture == "routed":
        model = module(input_windows=windows, joint_epochs=1, path_epochs=0)
    else:
        model = ReferenceModule(filters=(4, 4, 8, 8, 16, 16), input_windows=windows, sw_roi=64, sw_batch_size=1)
    data = data_module(phantom_registry, tmp_path / "cache", window_level=50.0, window_width=1500.0)
    trainer(tmp_path, 1).fit(model, data)
    assert torch.equal(model.network.window_channels.source_window, torch.tensor([50.0, 1500.0]))
    loaded = load_model(tmp_path / "checkpoints" / "last.ckpt")
    assert torch.equal(loaded.network.window_channels.source_window, torch.tensor([50.0, 1500.0]))
    assert loaded.preprocessing["window_width"] == 1500.0


def test_centre_prompts_leaves_a_single_task_prompt_uncentred(fewshot_registry, tmp_path):
    """The mean of one prompt is that prompt: subtracting it would hand routers and heads a zero vector."""
    model = module(centre_prompts=True, joint_epochs=1, path_epochs=0)
    data = data_module(fewshot_registry, tmp_path / "cache", shots=1, prompts_per_image=1)
    trainer(tmp_path, 1).fit(model, data)
    assert len(model.tubular) == 1
    assert torch.equal(model.network.prompt_centre, torch.zeros_like(model.network.prompt_centre))
    prompt = model.prompt_embeddings[next(iter(model.tubular))]
    assert model.network.condition(prompt[None]).abs().sum() > 0


def test_shared_start_longer_than_the_joint_phase_is_refused():
    with pytest.raises(ValueError, match="shared_start_epochs=3 must lie in 0..joint_epochs"):
        module(shared_start_epochs=3, joint_epochs=2)
