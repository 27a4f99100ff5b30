from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
import torchio as tio
import yaml
from pydicom.data import get_testdata_file

from datamodules.multitask import (
    Augmentation,
    MultiTaskDataModule,
    PrioritisedTasks,
    TrainingPatches,
    task_probabilities,
)
from datamodules.preprocessing import Preprocessing, grid_offsets, shifted_grid
from datamodules.registry import load_registry
from datamodules.volumes import BadCaseError, VolumeCache, read_image


def write_nifti(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 2.0)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.diag([*spacing, 1.0])), path)


def volume_and_labels(shape=(20, 20, 12)) -> tuple[np.ndarray, np.ndarray]:
    image = np.full(shape, -500, np.int16)
    labels = np.zeros(shape, np.uint8)
    labels[5:12, 5:12, 3:8] = 1
    image[labels == 1] = 60
    return image, labels


def registry(tmp_path: Path, path: Path, fmt: str) -> Path:
    file = tmp_path / f"registry-{fmt}.yaml"
    file.write_text(yaml.safe_dump({"datasets": [{"name": "D", "path": str(path), "format": fmt}]}))
    return file


def test_msd_format(tmp_path):
    image, labels = volume_and_labels()
    root = tmp_path / "Task03_Liver"
    write_nifti(root / "imagesTr/liver_0.nii.gz", image)
    write_nifti(root / "labelsTr/liver_0.nii.gz", labels)
    (root / "dataset.json").write_text(
        json.dumps(
            {
                "labels": {"0": "background", "1": "liver"},
                "training": [{"image": "./imagesTr/liver_0.nii.gz", "label": "./labelsTr/liver_0.nii.gz"}],
            }
        )
    )
    (entry,) = load_registry(registry(tmp_path, root, "msd"))
    assert [t.prompt for t in entry.tasks] == ["liver"] and entry.tasks[0].label_values == (1,)
    assert entry.cases[0].case_id == "liver_0"


def test_totalsegmentator_format_merges_structure_files(tmp_path):
    image, labels = volume_and_labels()
    case = tmp_path / "ts" / "s0001"
    write_nifti(case / "ct.nii.gz", image)
    write_nifti(case / "segmentations/liver.nii.gz", labels)
    write_nifti(case / "segmentations/spleen.nii.gz", np.zeros_like(labels))
    path = registry(tmp_path, tmp_path / "ts", "totalsegmentator")
    data = MultiTaskDataModule(
        registry=str(path), cache_dir=str(tmp_path / "cache"), spacing_candidates=(2.0,), validation_fraction=0.0
    )
    data.setup()
    assert sorted(t.prompt for t in data.tasks) == ["liver", "spleen"]
    volume = data.volume(data.entries[0].cases[0], 2.0)
    liver_value = next(t for t in data.tasks if t.prompt == "liver").label_values[0]
    assert (volume.labels == liver_value).sum() > 0


def test_totalsegmentator_case_missing_a_mask_file_keeps_the_data_set_label_values(tmp_path, caplog):
    """Label values come from the data set's name -> value map, not from each case's own files: a case
    without ``aorta.nii.gz`` (the first name) keeps liver and spleen at their values, and lacks the aorta."""
    image, liver = volume_and_labels()
    spleen = np.zeros_like(liver)
    spleen[14:18, 14:18, 2:6] = 1
    for case, structures in (("s0001", ("aorta", "liver", "spleen")), ("s0002", ("liver", "spleen"))):
        write_nifti(tmp_path / "ts" / case / "ct.nii.gz", image)
        for name in structures:
            mask = {"aorta": np.roll(spleen, -12, axis=0), "liver": liver, "spleen": spleen}[name]
            write_nifti(tmp_path / "ts" / case / "segmentations" / f"{name}.nii.gz", mask)
    data = MultiTaskDataModule(
        registry=str(registry(tmp_path, tmp_path / "ts", "totalsegmentator")),
        cache_dir=str(tmp_path / "cache"),
        spacing_candidates=(1.0,),
        random_spacing_probability=0.0,
        validation_fraction=0.0,
    )
    data.setup()
    value = {t.prompt: t.label_values[0] for t in data.tasks}
    first, second = (data.volume(case, 1.0).labels for case in data.entries[0].cases)
    for name, mask in (("liver", liver), ("spleen", spleen)):
        expected = int(mask.sum()) * 2  # 2 mm slices resampled to 1 mm
        assert int((first == value[name]).sum()) == int((second == value[name]).sum()) == expected, name
    assert (first == value["aorta"]).any() and not (second == value["aorta"]).any()
    assert "1 case(s) lack some of the 3 structure files" in caplog.text and "s0002" in caplog.text


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_nrrd_and_mha_images_read_like_nifti(tmp_path, suffix):
    image, _ = volume_and_labels()
    write_nifti(tmp_path / "a.nii.gz", image)
    sitk.WriteImage(sitk.ReadImage(str(tmp_path / "a.nii.gz")), str(tmp_path / f"a{suffix}"))
    a, b = read_image(tmp_path / "a.nii.gz"), read_image(tmp_path / f"a{suffix}")
    assert torch.equal(a.data, b.data) and np.allclose(a.affine, b.affine, atol=1e-4)


def test_dicom_ct_slice_reads_in_hounsfield_units(tmp_path):
    source = get_testdata_file("CT_small.dcm")
    dataset = pydicom.dcmread(source)
    expected = dataset.pixel_array * float(dataset.RescaleSlope) + float(dataset.RescaleIntercept)
    folder = tmp_path / "series"
    folder.mkdir()
    for index in range(3):  # a three-slice series made from the one real slice
        dataset.ImagePositionPatient[2] = float(index * 5.0)
        dataset.InstanceNumber = index + 1
        dataset.SOPInstanceUID = f"1.2.3.{index + 1}"
        dataset.save_as(folder / f"slice{index}.dcm")
    image = read_image(folder)
    assert image.data.shape[1:] == (dataset.Columns, dataset.Rows, 3)
    assert np.allclose(image.data[0, :, :, 0].numpy().T, expected)


def test_spacing_rule_frequencies_and_closest_choice():
    preprocessing = Preprocessing()
    assert preprocessing.closest_spacing((0.7, 0.7, 0.7)) == 0.6
    assert preprocessing.closest_spacing((0.9, 0.9, 1.2)) == 1.0
    assert preprocessing.closest_spacing((0.8, 0.8, 5.0)) == 1.5
    rng = np.random.default_rng(0)
    draws = [preprocessing.sample_spacing((1.0, 1.0, 1.0), rng) for _ in range(20000)]
    share_closest = draws.count(1.0) / len(draws)
    assert share_closest == pytest.approx(0.9 + 0.1 / 3, abs=0.01)
    assert draws.count(0.6) / len(draws) == pytest.approx(0.1 / 3, abs=0.006)


def test_window_values():
    window = Preprocessing().window(torch.tensor([-2000.0, -900.0, 0.0, 450.0, 900.0, 3000.0]))
    assert torch.allclose(window, torch.tensor([0.0, 0.0, 0.5, 0.75, 1.0, 1.0]))


def test_antialias_averages_the_fine_voxels_and_leaves_labels_alone():
    # Noise of 100 HU at 0.5 mm in-plane, 2 mm through-plane, and a label stripe, resampled to 2 mm. A
    # point sample falls midway between 2 x 2 fine voxels in-plane: their mean, spread 100 / 2 = 50 HU.
    # Antialiased, each coarse voxel averages at least the 4 x 4 fine voxels beneath it: under 100 / 4.
    # The z axis is not downsampled.
    rng = np.random.default_rng(0)
    noise = rng.normal(0.0, 100.0, (64, 64, 16)).astype(np.float32)
    labels = np.zeros((64, 64, 16), np.uint8)
    labels[20:40, :, :] = 1
    affine = np.diag([0.5, 0.5, 2.0, 1.0])
    prepared = {}
    for antialias in (False, True):
        subject = tio.Subject(
            image=tio.ScalarImage(tensor=torch.from_numpy(noise)[None], affine=affine),
            label=tio.LabelMap(tensor=torch.from_numpy(labels)[None], affine=affine),
        )
        prepared[antialias] = Preprocessing(spacing_candidates=(2.0,), antialias=antialias).prepare(subject, 2.0)
    hu = {a: (p["image"].data * 1800.0 - 900.0)[:, 2:-2, 2:-2, 2:-2] for a, p in prepared.items()}
    assert float(hu[False].std()) == pytest.approx(50.0, rel=0.1)
    assert 5.0 < float(hu[True].std()) < 25.0
    assert torch.equal(prepared[False]["label"].data, prepared[True]["label"].data)
    assert prepared[True]["image"].shape == prepared[False]["image"].shape == (1, 16, 16, 16)
    # the data module hands the option to the preprocessing its cache and checkpoints store
    assert MultiTaskDataModule(antialias=True).preprocessing.as_dict()["antialias"] is True
    # a checkpoint written before the option existed loads with it off
    stored = Preprocessing(spacing_candidates=(2.0,)).as_dict()
    del stored["antialias"]
    assert Preprocessing(**stored) == Preprocessing(spacing_candidates=(2.0,))


def test_shifted_grids_are_torchios_grid_moved_by_the_given_fraction_of_a_voxel():
    # A ramp of 10 HU per mm along R and 1 HU per mm along A on a flipped 0.8 / 0.9 / 1.3 mm grid. Unshifted,
    # the grid is TorchIO's own; shifted by (0.5, -0.25, 0) voxels of 2 mm it samples the ramp 1 mm further
    # right and 0.5 mm further posterior: 10 - 0.5 = 9.5 HU more wherever both grids interpolate inside.
    affine = np.diag([-0.8, 0.9, 1.3, 1.0])
    affine[:3, 3] = (12.0, -20.0, 3.0)
    index = np.stack(np.meshgrid(*(np.arange(n) for n in (40, 44, 30)), indexing="ij"), -1)
    world = index @ affine[:3, :3].T + affine[:3, 3]
    image = tio.ScalarImage(tensor=torch.from_numpy(10.0 * world[..., 0] + world[..., 1])[None].float(), affine=affine)
    canonical = tio.ToCanonical()(image)
    shape, grid = shifted_grid(canonical, 2.0, (0.0, 0.0, 0.0))
    resampled = tio.Resample(2.0)(canonical)
    assert shape == resampled.spatial_shape == (16, 19, 19) and np.allclose(grid, resampled.affine)
    preprocessing = Preprocessing(spacing_candidates=(2.0,))
    prepared = {
        shift: preprocessing.prepare(tio.Subject(image=image), 2.0, shift=shift)["image"]
        for shift in [(0.0, 0.0, 0.0), (0.5, -0.25, 0.0)]
    }
    unshifted, shifted = (p.data[0, 1:-1, 1:-1, 1:-1] * 1800.0 for p in prepared.values())
    assert torch.allclose(shifted - unshifted, torch.tensor(9.5), atol=0.05)
    moved = prepared[(0.5, -0.25, 0.0)].affine[:3, 3] - prepared[(0.0, 0.0, 0.0)].affine[:3, 3]
    assert np.allclose(moved, (1.0, -0.5, 0.0))


def test_grid_offsets_spread_over_a_voxel_around_the_unshifted_grid():
    for count in (1, 2, 4, 8):
        offsets = np.array(grid_offsets(count))
        assert offsets.shape == (count, 3) and len({tuple(o) for o in offsets}) == count
        assert np.allclose(offsets.mean(0), 0.0)  # centred on the unshifted grid
        assert count == 1 or np.allclose(np.abs(offsets), 0.25)  # a half voxel apart along each axis
    with pytest.raises(ValueError, match="--grid-shifts must be 1, 2, 4 or 8, got 3"):
        grid_offsets(3)


def test_thin_occupancy_labels_the_background_voxels_a_thin_structure_partly_fills():
    # 1 mm -> 3 mm along x: coarse voxel k covers fine x = 3k..3k+2, its centre at 3k+1. A thin sheet
    # (value 2) at x = 3 fills a third of coarse voxel 1 but misses its centre; another at x = 6 fills a
    # third of coarse voxel 2, which nearest gives to the organ (value 1, x = 7..11). Antialiased
    # occupancy: 0.08 / 0.32 / 0.24 / 0.00 for coarse voxels 0..3.
    labels = np.zeros((12, 6, 6), np.uint8)
    labels[3] = labels[6] = 2
    labels[7:] = 1
    affine = np.eye(4)

    def prepare(occupancy: float, thin_values: tuple[int, ...] = (2,)) -> tio.Subject:
        subject = tio.Subject(
            image=tio.ScalarImage(tensor=torch.from_numpy(labels * 100.0)[None], affine=affine),
            label=tio.LabelMap(tensor=torch.from_numpy(labels)[None], affine=affine),
        )
        return Preprocessing(spacing_candidates=(3.0,), thin_occupancy=occupancy).prepare(subject, 3.0, thin_values)

    along_x = {
        key: p["label"].data[0, :, 1, 1].tolist()
        for key, p in {
            "nearest": prepare(0.0),
            "0.2": prepare(0.2),
            "0.5": prepare(0.5),
            "no thin values": prepare(0.2, ()),
        }.items()
    }
    assert along_x == {
        "nearest": [0, 0, 1, 1],
        "0.2": [0, 2, 1, 1],  # the labelled organ keeps its voxel
        "0.5": [0, 0, 1, 1],
        "no thin values": [0, 0, 1, 1],
    }
    assert torch.equal(prepare(0.0)["image"].data, prepare(0.2)["image"].data)
    # a thick part: a slab over x = 5..9 fills a third of coarse voxels 1 and 3 (0.33) but also the
    # whole of voxel 2 (0.97) between them, so its rim stays as nearest made it
    labels = np.zeros((15, 6, 6), np.uint8)
    labels[5:10] = 2
    assert prepare(0.2)["label"].data[0, :, 1, 1].tolist() == prepare(0.0)["label"].data[0, :, 1, 1].tolist()
    assert prepare(0.0)["label"].data[0, :, 1, 1].tolist() == [0, 0, 2, 0, 0]
    with pytest.raises(ValueError, match="thin_occupancy"):
        Preprocessing(thin_occupancy=1.0)


def test_thin_occupancy_widens_only_the_tubular_tasks_and_keys_the_cache(tmp_path, phantom_registry):
    def lesions(occupancy: float, cache: str) -> MultiTaskDataModule:
        data = MultiTaskDataModule(
            registry=str(phantom_registry),
            cache_dir=str(tmp_path / cache),
            spacing_candidates=(3.0,),
            thin_occupancy=occupancy,
            only_datasets=("PhantomLesions",),
        )
        data.setup()
        return data

    nearest, widened = lesions(0.0, "nearest"), lesions(0.3, "widened")
    (entry,) = widened.entries
    assert widened.cache.thin_values == {"PhantomLesions": (entry.labels["superior mesenteric artery"],)}
    sma = entry.labels["superior mesenteric artery"]
    widened_voxels = 0
    for case in entry.cases:
        before, after = (d.volume(case, 3.0).labels for d in (nearest, widened))
        changed = before != after
        assert bool((before[changed] == 0).all()) and bool((after[changed] == sma).all())
        widened_voxels += int(changed.sum())
    assert widened_voxels > 0
    # the thin values are part of the key only when the option is on
    case = entry.cases[0]
    keys = {}
    for occupancy in (0.0, 0.3):
        for thin in ((), (sma,)):
            preprocessing = Preprocessing(spacing_candidates=(3.0,), thin_occupancy=occupancy)
            cache = VolumeCache(tmp_path / "keys", preprocessing, thin_values={case.dataset: thin})
            keys[occupancy, thin] = cache.key(case, 3.0)
    assert keys[0.0, ()] == keys[0.0, (sma,)] and keys[0.3, ()] != keys[0.3, (sma,)]


def test_task_probabilities_interpolate_uniform_and_proportional():
    assert np.allclose(task_probabilities([1, 9], 0.0), [0.5, 0.5])
    assert np.allclose(task_probabilities([1, 9], 1.0), [0.1, 0.9])


def test_task_probabilities_sample_small_structures_more_often():
    # weights 0.1 ** -0.5 = 3.16 and 0.001 ** -0.5 = 31.6; an absent structure counts as 1e-6 (weight 1000)
    assert np.allclose(task_probabilities([4, 4], 0.0, [0.1, 0.001], 0.5), [1 / 11, 10 / 11])
    assert np.allclose(
        task_probabilities([4, 4], 0.0, [0.1, 0.0], 0.5), np.array([0.1**-0.5, 1000]) / (0.1**-0.5 + 1000)
    )
    assert np.allclose(task_probabilities([1, 4], 1.0, [0.1, 0.1], 0.5), [0.2, 0.8])


def test_cache_is_reused_and_invalidated(tmp_path, phantom_registry):
    entry = load_registry(phantom_registry)[0]
    case, values = entry.cases[0], set(entry.labels.values())
    cache = VolumeCache(tmp_path / "cache", Preprocessing(spacing_candidates=(3.0,)))
    first = cache.load(case, 3.0, values)
    second = cache.load(case, 3.0, values)
    assert (cache.misses, cache.hits) == (1, 1) and torch.equal(first.image, second.image)
    other = VolumeCache(tmp_path / "cache", Preprocessing(spacing_candidates=(3.0,), window_width=1000.0))
    other.load(case, 3.0, values)
    assert other.misses == 1 and len(list((tmp_path / "cache").glob("*.json"))) == 2


def test_two_writers_of_one_cache_entry_do_not_collide(tmp_path, phantom_registry, monkeypatch):
    entry = load_registry(phantom_registry)[0]
    case, values = entry.cases[0], set(entry.labels.values())
    first, second = (VolumeCache(tmp_path / "cache", Preprocessing(spacing_candidates=(3.0,))) for _ in range(2))
    save, interleaved = np.save, []

    def save_while_another_rank_writes(file, array):  # the second writer runs while the first is mid-write
        save(file, array)
        if not interleaved:
            interleaved.append(None)
            interleaved.append(second.load(case, 3.0, values))

    monkeypatch.setattr(np, "save", save_while_another_rank_writes)
    volume = first.load(case, 3.0, values)
    assert torch.equal(volume.image, interleaved[1].image)
    cache = tmp_path / "cache"
    assert len(list(cache.glob("*.json"))) == 1 and len(list(cache.glob("*.npy"))) == 3
    assert not list(cache.glob(".tmp-*"))


def _mapped_files() -> str:
    with open("/proc/self/maps") as maps:
        return maps.read()


def test_cached_volume_is_memory_mapped_and_patches_are_copies_of_the_same_crop(tmp_path, phantom_registry):
    entry = load_registry(phantom_registry)[0]
    case, values = entry.cases[0], set(entry.labels.values())
    cache = VolumeCache(tmp_path / "cache", Preprocessing(spacing_candidates=(3.0,)))
    loaded = cache.load(case, 3.0, values)  # preprocessed now, in memory
    mapped = cache.load(case, 3.0, values)
    assert cache.hits == 1 and str(next((tmp_path / "cache").glob("*.image.npy"))) in _mapped_files()
    shape = loaded.labels.shape
    for start in ([3, 5, 7], [-4, 0, shape[2] - 20]):  # inside, and crossing the edges (zero-padded)
        image, labels = mapped.patch(np.array(start), 24)
        padded_image = torch.nn.functional.pad(loaded.image, (30,) * 6)
        padded_labels = torch.nn.functional.pad(loaded.labels, (30,) * 6)
        box = tuple(slice(a + 30, a + 54) for a in start)
        assert torch.equal(image, padded_image[(slice(None), *box)]) and torch.equal(labels, padded_labels[box])
        assert image.untyped_storage().nbytes() == 24**3 * 2 and labels.untyped_storage().nbytes() == 24**3
    assert mapped.counts == loaded.counts and all(
        np.array_equal(mapped.locations[v], loaded.locations[v]) for v in loaded.counts
    )
    for value, voxels in mapped.locations.items():  # the foreground samples hold their label
        assert len(voxels) == min(mapped.counts[value], 10_000) and (loaded.labels[tuple(voxels.T)] == value).all()


def test_a_training_sample_reads_only_its_patch(phantom_data, monkeypatch):
    """No whole-volume pass per sample: masks and foreground centres come from the patch and the
    cached foreground samples, and the returned tensors are patch-sized copies."""
    isin = torch.isin

    def patch_sized_isin(elements, test_elements, *args, **kwargs):
        assert elements.numel() <= 32**3, f"isin over {tuple(elements.shape)}"
        return isin(elements, test_elements, *args, **kwargs)

    monkeypatch.setattr(torch, "isin", patch_sized_isin)
    dataset = TrainingPatches(phantom_data, phantom_data.train_cases)
    for index in range(6):
        sample = dataset[index]
        assert sample["image"].untyped_storage().nbytes() == 32**3 * 4
        assert sample["masks"].untyped_storage().nbytes() == len(sample["prompts"]) * 32**3 * 4


@pytest.mark.parametrize("damage", ["format", "shape", "missing"])
def test_a_cache_entry_of_another_format_or_damaged_is_rebuilt(tmp_path, phantom_registry, damage):
    entry = load_registry(phantom_registry)[0]
    case, values = entry.cases[0], set(entry.labels.values())
    cache = VolumeCache(tmp_path / "cache", Preprocessing(spacing_candidates=(3.0,)))
    good = cache.load(case, 3.0, values)
    header = next((tmp_path / "cache").glob("*.json"))
    labels = next((tmp_path / "cache").glob("*.labels.npy"))
    if damage == "format":
        header.write_text(header.read_text().replace('"format": 2', '"format": 1'))
    elif damage == "shape":
        np.save(labels, np.zeros((2, 2, 2), np.uint8))
    else:
        labels.unlink()
    rebuilt = cache.load(case, 3.0, values)
    assert cache.misses == 2 and torch.equal(rebuilt.labels, good.labels) and torch.equal(rebuilt.image, good.image)
    assert cache.load(case, 3.0, values) is not None and cache.hits == 1


def test_cache_fill_is_announced_with_its_size_before_writing(phantom_registry, tmp_path, capsys, monkeypatch):
    import datamodules.volumes as volumes

    written = []
    write = volumes.VolumeCache._write
    monkeypatch.setattr(
        volumes.VolumeCache, "_write", lambda self, *a: written.append(capsys.readouterr().err) or write(self, *a)
    )
    data = MultiTaskDataModule(registry=str(phantom_registry), cache_dir=str(tmp_path), spacing_candidates=(3.0, 5.0))
    data.setup()
    cases = sum(len(e.cases) for e in data.entries)
    (line,) = [line for line in written[0].splitlines() if line.startswith("cache:")]
    assert f"writing {cases} volume(s)" in line and "more if training samples the other spacings" in line
    announced = float(line.split("about ")[1].split(" MiB")[0])
    actual = sum(f.stat().st_size for f in tmp_path.glob("*.npy") if not f.name.endswith(".locations.npy"))
    assert announced == pytest.approx(actual / 2**20, abs=0.1)
    assert len(written) == cases and all("cache:" not in err for err in written[1:])
    MultiTaskDataModule(registry=str(phantom_registry), cache_dir=str(tmp_path), spacing_candidates=(3.0, 5.0)).setup()
    assert "cache:" not in capsys.readouterr().err  # filled: nothing to announce


@pytest.fixture(scope="module")
def phantom_data(phantom_registry, tmp_path_factory) -> MultiTaskDataModule:
    data = MultiTaskDataModule(
        registry=str(phantom_registry),
        cache_dir=str(tmp_path_factory.mktemp("cache")),
        spacing_candidates=(3.0,),
        patch_size=32,
        batch_size=2,
        prompts_per_image=3,
        samples_per_epoch=4,
    )
    data.setup()
    return data


def test_batches_pair_images_with_prompts_and_partial_labels(phantom_data):
    batch = next(iter(phantom_data.train_dataloader()))
    assert batch["image"].shape == (2, 1, 32, 32, 32)
    assert batch["masks"].shape == (len(batch["prompts"]), 1, 32, 32, 32)
    assert batch["image_index"].tolist() == sorted(batch["image_index"].tolist())
    assert "renal artery" not in {t.prompt for t in phantom_data.tasks}
    assert len(phantom_data.val_cases) == 3  # one per joint data set


def test_each_image_is_supervised_only_on_the_tasks_its_data_set_labels(phantom_data):
    """Partial labels: an image meets only its own data set's prompts, and each mask is the union
    of that task's labels (the lesion data set's liver includes the liver tumour)."""
    dataset = TrainingPatches(phantom_data, phantom_data.train_cases)
    prompts_of = {e.name: {t.prompt for t in e.tasks} for e in phantom_data.entries}
    seen_nested = False
    for index in range(60):
        sample = dataset[index]
        owners = [name for name, prompts in prompts_of.items() if set(sample["prompts"]) <= prompts]
        assert len(owners) == 1, sample["prompts"]
        assert len(sample["prompts"]) == len(set(sample["prompts"])) == min(3, len(prompts_of[owners[0]]))
        masks = dict(zip(sample["prompts"], sample["masks"].bool()))
        if owners[0] == "PhantomLesions" and {"liver", "liver tumor"} <= masks.keys() and masks["liver tumor"].any():
            assert not (masks["liver tumor"] & ~masks["liver"]).any()
            seen_nested = True
        if seen_nested and index >= 12:
            break
    assert seen_nested


def test_label_shares_give_each_tasks_share_of_the_training_volumes(phantom_data):
    cases = phantom_data.train_cases["PhantomLesions"]
    shares = phantom_data.label_shares(cases)

    def voxel_fraction(task):
        return sum(shares.get(v, 0.0) for v in task.label_values)

    for task in phantom_data.tasks_of("PhantomLesions"):
        held, total = 0, 0
        for case in cases:
            labels = phantom_data.volume(case, 3.0).labels
            held += int(torch.isin(labels, torch.tensor(task.label_values)).sum())
            total += labels.numel()
        assert voxel_fraction(task) == pytest.approx(held / total)
    fraction = {t.prompt: voxel_fraction(t) for t in phantom_data.tasks_of("PhantomLesions")}
    assert 0 < fraction["liver tumor"] < fraction["liver"]


def test_rarity_exponent_samples_the_lesion_more_often_than_its_organ(phantom_data, monkeypatch):
    uniform = TrainingPatches(phantom_data, phantom_data.train_cases)
    monkeypatch.setattr(phantom_data, "rarity_exponent", 0.5)
    rarity = TrainingPatches(phantom_data, phantom_data.train_cases)
    cases = phantom_data.train_cases["PhantomLesions"]
    index = {(t.dataset, t.prompt): i for i, t in enumerate(rarity.tasks)}
    tumour, liver = index["PhantomLesions", "liver tumor"], index["PhantomLesions", "liver"]
    assert uniform.probabilities[tumour] == pytest.approx(uniform.probabilities[liver])
    shares = phantom_data.label_shares(cases)
    share = {i: sum(shares.get(v, 0.0) for v in rarity.tasks[i].label_values) for i in (liver, tumour)}
    ratio = (share[liver] / share[tumour]) ** 0.5
    assert rarity.probabilities[tumour] / rarity.probabilities[liver] == pytest.approx(ratio)


def test_task_probabilities_times_each_tasks_data_set_weight():
    assert np.allclose(task_probabilities([4, 4, 4], 0.0, task_weights=[1.0, 1.0, 2.0]), [0.25, 0.25, 0.5])
    assert np.allclose(task_probabilities([1, 9, 9], 1.0, task_weights=[3.0, 1.0, 1.0]), [3 / 21, 9 / 21, 9 / 21])


def test_dataset_weights_raise_one_data_sets_share_of_the_patches(phantom_data, monkeypatch):
    monkeypatch.setattr(phantom_data, "dataset_weights", {"PhantomLesions": 3.0})
    weighted = TrainingPatches(phantom_data, phantom_data.train_cases)
    lesions = np.array([t.dataset == "PhantomLesions" for t in weighted.tasks])
    share = 3.0 * lesions.sum() / (3.0 * lesions.sum() + (~lesions).sum())
    assert weighted.probabilities[lesions].sum() == pytest.approx(share)
    assert np.allclose(weighted.probabilities[~lesions], weighted.probabilities[~lesions][0])
    lesion_prompts = {t.prompt for t in phantom_data.tasks_of("PhantomLesions")}
    drawn = [set(weighted[i]["prompts"]) <= lesion_prompts for i in range(120)]  # the lesions' own sets
    uniform = lesions.sum() / len(lesions)
    assert abs(np.mean(drawn) - share) < 0.15 and np.mean(drawn) > uniform + 0.1


def test_a_non_positive_or_infinite_dataset_weight_is_an_error_and_an_unknown_name_a_warning(
    phantom_registry, phantom_data, caplog
):
    for weight in (0.0, float("inf")):
        with pytest.raises(ValueError, match="must all be positive and finite"):
            MultiTaskDataModule(registry=str(phantom_registry), dataset_weights={"PhantomLesions": weight})
    data = MultiTaskDataModule(
        registry=str(phantom_registry),
        cache_dir=str(phantom_data.cache.folder),  # the shared fixture's cache: nothing preprocessed again
        spacing_candidates=(3.0,),
        dataset_weights={"NoSuchSet": 2.0},
    )
    data.setup()
    assert "['NoSuchSet'] not among the data sets" in caplog.text
    patches = TrainingPatches(data, data.train_cases)
    assert np.allclose(patches.probabilities, patches.probabilities[0])  # ignored: every task alike


def test_prioritised_task_probabilities_mix_the_fixed_ones_with_their_difficulty(phantom_data):
    """Four tasks at fixed 0.4 / 0.3 / 0.2 / 0.1, difficulties 1 / 0.5 / 0.5 / 0: prioritised
    0.4 / 0.15 / 0.1 / 0 over 0.65; a quarter of that mixed with three quarters of the fixed."""
    patches = TrainingPatches(phantom_data, phantom_data.train_cases)
    patches.tasks = patches.tasks[:4]
    patches.probabilities = np.array([0.4, 0.3, 0.2, 0.1])
    sampler = PrioritisedTasks(patches, lambda prompts: torch.tensor([1.0, 0.5, 0.5, 0.0]), share=0.25)
    expected = 0.75 * np.array([0.4, 0.3, 0.2, 0.1]) + 0.25 * np.array([0.4, 0.15, 0.1, 0.0]) / 0.65
    assert np.allclose(sampler.probabilities(), expected)
    assert np.allclose(PrioritisedTasks(patches, sampler.difficulty, share=0.0).probabilities(), patches.probabilities)
    rounded_away = PrioritisedTasks(patches, lambda prompts: torch.zeros(4), share=0.25)  # a steep exponent
    assert np.allclose(rounded_away.probabilities(), patches.probabilities)


def test_prioritised_tasks_read_the_difficulty_at_each_draw_and_repeat_per_epoch(phantom_data, monkeypatch):
    monkeypatch.setattr(phantom_data, "samples_per_epoch", 24)
    patches = TrainingPatches(phantom_data, phantom_data.train_cases)
    hard = {"prompt": patches.tasks[3].prompt}
    difficulty = lambda prompts: torch.tensor([1.0 if p == hard["prompt"] else 1e-6 for p in prompts])  # noqa: E731
    sampler = PrioritisedTasks(patches, difficulty, share=1.0)
    draws = iter(sampler)
    first = [next(draws) for _ in range(10)]
    hard["prompt"] = patches.tasks[7].prompt  # the model's running Dice moved mid-epoch
    rest = list(draws)
    assert [i for i, _ in first + rest] == list(range(len(patches)))
    assert {t for _, t in first} == {3} and {t for _, t in rest} == {7}
    even = PrioritisedTasks(patches, lambda prompts: torch.ones(len(prompts)), share=0.5)
    first_epoch = list(even)
    assert list(even) == first_epoch  # the same epoch and difficulties: the same draws
    patches.epoch = 1
    assert list(even) != first_epoch


def test_a_sample_given_its_task_draws_the_same_case_and_patch_as_one_that_drew_it(phantom_data):
    patches = TrainingPatches(phantom_data, phantom_data.train_cases)
    drawn = patches[5]
    task = next(i for i, t in enumerate(patches.tasks) if t.prompt == drawn["prompts"][0])
    given = patches[(5, task)]
    assert torch.equal(given["image"], drawn["image"]) and given["prompts"] == drawn["prompts"]
    other = next(i for i, t in enumerate(patches.tasks) if t.dataset != patches.tasks[task].dataset)
    assert patches[(5, other)]["prompts"][0] == patches.tasks[other].prompt


def test_priority_sampling_out_of_range_or_without_running_dice_is_refused(phantom_registry, phantom_data):
    for share in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"data.priority_sampling must lie in \[0, 1\]"):
            MultiTaskDataModule(registry=str(phantom_registry), priority_sampling=share)
    data = MultiTaskDataModule(
        registry=str(phantom_registry),
        cache_dir=str(phantom_data.cache.folder),
        spacing_candidates=(3.0,),
        priority_sampling=0.5,
    )
    data.setup()
    with pytest.raises(ValueError, match="needs a model that keeps running task Dice"):
        data.train_dataloader()


def test_samples_are_reproducible_per_epoch_and_index(phantom_data):
    dataset = TrainingPatches(phantom_data, phantom_data.train_cases)
    a, b = dataset[1], dataset[1]
    assert torch.equal(a["image"], b["image"]) and a["prompts"] == b["prompts"]
    dataset.epoch = 1
    assert not torch.equal(dataset[1]["image"], a["image"])


def test_augmentation_keeps_image_and_mask_aligned(phantom_data):
    dataset = TrainingPatches(phantom_data, phantom_data.train_cases)
    dataset.augment = Augmentation(probability=1.0, degrees=20.0, noise_std=0.0).transform()
    image = torch.zeros(1, 32, 32, 32)
    labels = torch.zeros(32, 32, 32, dtype=torch.uint8)
    labels[8:20, 10:22, 12:24] = 1
    image[0][labels == 1] = 1.0
    augmented, moved = dataset._augment(image, labels, seed=5)
    assert not torch.equal(moved, labels)
    inside = augmented[0][moved == 1].mean()
    outside = augmented[0][moved == 0].mean()
    assert inside > 0.8 and outside < 0.1


def bad_case(tmp_path: Path, fault: str) -> Path:
    image, labels = volume_and_labels()
    root = tmp_path / f"Dataset900_{fault}"
    image_path, label_path = root / "imagesTr/c_0000.nii.gz", root / "labelsTr/c.nii.gz"
    if fault == "nan":
        write_nifti(image_path, np.where(labels == 1, np.nan, image.astype(np.float32)))
    elif fault == "flat":
        write_nifti(image_path, image[:, :, :1])
    else:
        write_nifti(image_path, image)
    if fault == "shape":
        write_nifti(label_path, labels[:-2])
    elif fault == "values":
        write_nifti(label_path, labels * 7)
    elif fault != "missing":
        write_nifti(label_path, labels[:, :, :1] if fault == "flat" else labels)
    if fault == "corrupt":
        image_path.write_bytes(b"not a nifti file")
    (root / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "liver": 1}, "file_ending": ".nii.gz"}))
    return root


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("missing", "does not exist"),
        ("corrupt", "cannot be read"),
        ("shape", "differs from the image"),
        ("values", "not in the label map"),
        ("nan", "NaN or infinite"),
        ("flat", "expected a 3D image"),
    ],
)
def test_bad_input_is_named_at_setup(tmp_path, fault, message):
    root = bad_case(tmp_path, fault)
    data = MultiTaskDataModule(
        registry=str(registry(tmp_path, root, "nnunet")), cache_dir=str(tmp_path / "cache"), spacing_candidates=(2.0,)
    )
    with pytest.raises(BadCaseError, match=message) as error:
        data.setup()
    assert "c_0000.nii.gz" in str(error.value) or "c.nii.gz" in str(error.value)


def test_bad_cases_can_be_skipped(tmp_path, caplog):
    root = bad_case(tmp_path, "nan")
    data = MultiTaskDataModule(
        registry=str(registry(tmp_path, root, "nnunet")),
        cache_dir=str(tmp_path / "cache"),
        spacing_candidates=(2.0,),
        skip_bad_cases=True,
    )
    data.setup()
    assert data.entries[0].cases == [] and "skipped 1 bad case" in caplog.text


def test_augmented_samples_never_touch_cuda(phantom_data, monkeypatch):
    """Loader workers are forked: reading or setting CUDA state there fails on a GPU node (seeding
    is queued lazily and stays allowed). Simulate that node."""

    def no_cuda(*args, **kwargs):
        raise RuntimeError("Cannot re-initialize CUDA in forked subprocess")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for name in ("get_rng_state", "set_rng_state", "get_rng_state_all", "set_rng_state_all", "init", "_lazy_init"):
        monkeypatch.setattr(torch.cuda, name, no_cuda)
    dataset = TrainingPatches(phantom_data, phantom_data.train_cases)
    dataset.augment = Augmentation(probability=1.0).transform()
    first, again = dataset[0], dataset[0]
    assert torch.equal(first["image"], again["image"]) and torch.equal(first["masks"], again["masks"])


def test_a_second_start_reads_no_unchanged_source_file(phantom_registry, tmp_path, monkeypatch):
    import datamodules.multitask as multitask

    def data() -> MultiTaskDataModule:
        return MultiTaskDataModule(registry=str(phantom_registry), cache_dir=str(tmp_path), spacing_candidates=(3.0,))

    first = data()
    first.setup()
    reads = []
    original = multitask.read_case
    monkeypatch.setattr(multitask, "read_case", lambda case, known: reads.append(case) or original(case, known))
    second = data()
    second.setup()
    assert reads == [] and second._spacings == first._spacings
    changed = second.entries[0].cases[0].image
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    data().setup()
    assert [case.image for case in reads] == [changed]
