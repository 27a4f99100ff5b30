"""The multi-task DataModule: (patch, prompts, masks) samples from partially labelled data sets."""

from __future__ import annotations

import json
import logging
import math
import sys
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torchio as tio
from lightning.fabric.utilities.rank_zero import rank_zero_only
from torch.utils.data import DataLoader, Dataset, Sampler

from datamodules.preprocessing import Preprocessing
from datamodules.registry import Case, DatasetEntry, Task, load_registry
from datamodules.volumes import (
    MAX_LOCATIONS,
    BadCaseError,
    PreparedVolume,
    VolumeCache,
    entry_bytes,
    image_geometry,
    prepared_shape,
    read_case,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Augmentation:
    """Paper augmentation: rotation, scaling, flipping, shifting, noise (TorchIO), on windowed patches.

    Flipping defaults to the anterior-posterior and superior-inferior axes: a left-right flip would
    turn a "left kidney" into a right one.
    """

    probability: float = 0.8
    degrees: float = 10.0
    scale: float = 0.1
    shift_mm: float = 5.0
    flip_axes: tuple[int, ...] = (1, 2)
    flip_probability: float = 0.5
    noise_std: float = 0.02

    def transform(self) -> tio.Transform:
        return tio.Compose(
            [
                tio.RandomAffine(
                    scales=self.scale, degrees=self.degrees, translation=self.shift_mm, p=self.probability
                ),
                tio.RandomFlip(axes=self.flip_axes, flip_probability=self.flip_probability),
                tio.RandomNoise(std=(0.0, self.noise_std), p=self.probability),
            ]
        )


def task_probabilities(
    sizes: list[int],
    size_exponent: float,
    fractions: list[float] | None = None,
    rarity_exponent: float = 0.0,
    task_weights: list[float] | None = None,
) -> np.ndarray:
    """Task sampling weights proportional to ``size ** size_exponent`` (0: uniform, 1: by size), times
    ``fraction ** -rarity_exponent`` where ``fractions`` give each task's share of its volumes' voxels
    (small structures sampled more often; floored at one voxel in a million), times ``task_weights``
    (one per task: its data set's weight)."""
    weights = np.asarray(sizes, dtype=float) ** size_exponent
    if fractions is not None:
        weights *= np.maximum(np.asarray(fractions, dtype=float), 1e-6) ** -rarity_exponent
    if task_weights is not None:
        weights *= np.asarray(task_weights, dtype=float)
    return weights / weights.sum()


def crop_patch(
    volume: PreparedVolume, values: tuple[int, ...], patch_size: int, foreground: bool, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A cube of ``patch_size`` (zero-padded where the volume is smaller), centred on a voxel of the
    label ``values`` when ``foreground`` and the volume holds one, else anywhere. Only the cube is
    read: a memory-mapped volume stays on disk."""
    shape = np.array(volume.labels.shape)
    before = np.maximum(patch_size - shape, 0) // 2  # the padding's leading part
    padded = np.maximum(shape, patch_size)
    centre = volume.foreground_voxel(values, rng) if foreground else None
    if centre is not None:
        start = np.clip(centre + before - patch_size // 2, 0, padded - patch_size)
    else:
        start = np.array([rng.integers(0, s - patch_size + 1) for s in padded])
    return volume.patch(start - before, patch_size)


class TrainingPatches(Dataset):
    """``samples_per_epoch`` random samples; sample ``i`` of epoch ``e`` depends only on (seed, e, i).

    Each sample draws a task (balanced across tasks), a case of that task's data set, a spacing by
    the paper's rule, and a patch (foreground-oversampled for that task), and supervises up to
    ``prompts_per_image`` tasks of the same data set on it: they share one encoder pass.
    """

    def __init__(self, module: MultiTaskDataModule, cases: dict[str, list[Case]]) -> None:
        self.module = module
        self.cases = cases
        self.tasks = [t for t in module.tasks if cases.get(t.dataset)]
        sizes = [len(cases[t.dataset]) for t in self.tasks]
        fractions = None
        if module.rarity_exponent:
            shares = {dataset: module.label_shares(dataset_cases) for dataset, dataset_cases in cases.items()}
            fractions = [sum(shares[t.dataset].get(v, 0.0) for v in t.label_values) for t in self.tasks]
        weights = [module.dataset_weights.get(t.dataset, 1.0) for t in self.tasks]
        self.probabilities = task_probabilities(sizes, module.size_exponent, fractions, module.rarity_exponent, weights)
        self.epoch = 0
        self.augment = module.augmentation.transform() if module.augment else None

    def __len__(self) -> int:
        return self.module.samples_per_epoch

    def __getitem__(self, index: int | tuple[int, int]) -> dict:
        """Sample ``index``; an ``(index, task)`` pair (``PrioritisedTasks``) names its task instead."""
        m = self.module
        index, task_index = index if isinstance(index, tuple) else (index, None)
        rng = np.random.default_rng([m.seed, self.epoch, index])
        drawn = rng.choice(len(self.tasks), p=self.probabilities)  # drawn either way: the same case and patch draws
        task = self.tasks[drawn if task_index is None else task_index]
        case = self.cases[task.dataset][rng.integers(len(self.cases[task.dataset]))]
        spacing = m.preprocessing.sample_spacing(m.case_spacing(case), rng)
        volume = m.volume(case, spacing)
        foreground = rng.random() < m.foreground_fraction
        image, labels = crop_patch(volume, task.label_values, m.patch_size, foreground, rng)
        if self.augment is not None:
            image, labels = self._augment(image, labels, int(rng.integers(2**31)))
        others = [t for t in m.tasks_of(task.dataset) if t != task]
        chosen = [task, *(others[i] for i in rng.permutation(len(others))[: m.prompts_per_image - 1])]
        masks = torch.stack([torch.isin(labels, torch.tensor(t.label_values)) for t in chosen]).float()
        return {
            "image": image.float(),
            "masks": masks,
            "prompts": [t.prompt for t in chosen],
            "tubular": torch.tensor([t.tubular for t in chosen]),
        }

    def _augment(self, image: torch.Tensor, labels: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        subject = tio.Subject(image=tio.ScalarImage(tensor=image.float()), label=tio.LabelMap(tensor=labels[None]))
        with torch.random.fork_rng(devices=[]):  # the CPU generator only: forked workers must not touch CUDA
            torch.default_generator.manual_seed(seed)
            augmented = self.augment(subject)
        return augmented["image"].data, augmented["label"].data[0]


class PrioritisedTasks(Sampler):
    """Each training sample's task, drawn as the loader asks for it from the model's running task
    difficulty (``TaskPriorities.difficulty``: ``(1 - running Dice) ** exponent``): with probability
    ``share`` from the fixed task probabilities times the difficulties (renormalised), else from the
    fixed ones. Tasks not learned yet get more patches, centred on their own structure as often as
    any task's, and so do their data sets' other tasks; every task keeps at least ``1 - share`` of
    its fixed rate. Yields ``(index, task)`` for ``TrainingPatches``; the draws of the patches' epoch
    ``e`` are seeded by the data seed and ``e`` and follow the difficulties of the moment, so they
    depend on training. Under DDP Lightning's distributed wrapper draws a whole epoch at its start,
    from each rank's own values.
    """

    def __init__(self, patches: TrainingPatches, difficulty: Callable[[list[str]], torch.Tensor], share: float):
        self.patches, self.difficulty, self.share = patches, difficulty, share
        self.prompts = [t.prompt for t in patches.tasks]

    def __len__(self) -> int:
        return len(self.patches)

    def probabilities(self) -> np.ndarray:
        """The mixture; the fixed probabilities where a steep exponent rounds every difficulty to 0."""
        fixed = self.patches.probabilities
        prioritised = fixed * self.difficulty(self.prompts).double().numpy()
        total = prioritised.sum()
        return (1 - self.share) * fixed + self.share * prioritised / total if total > 0 else fixed

    def __iter__(self) -> Iterator[tuple[int, int]]:
        # salted with the epoch's length: no stream shared with a sample's own [seed, epoch, index]
        rng = np.random.default_rng([self.patches.module.seed, self.patches.epoch, len(self.patches)])
        for index in range(len(self.patches)):
            yield index, int(rng.choice(len(self.prompts), p=self.probabilities()))


class ValidationVolumes(Dataset):
    """Whole preprocessed validation volumes at their closest spacing, with the label map and each
    task's label values (masks are made one task at a time, so 100 tasks of a 512x512x300 volume
    never sit in memory together)."""

    def __init__(self, module: MultiTaskDataModule, cases: list[Case]) -> None:
        self.module = module
        self.cases = cases

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> dict:
        case = self.cases[index]
        m = self.module
        volume = m.volume(case, m.preprocessing.closest_spacing(m.case_spacing(case)))
        tasks = m.tasks_of(case.dataset)
        return {
            "image": volume.image.float()[None],
            "labels": volume.labels,
            "label_values": [t.label_values for t in tasks],
            "prompts": [t.prompt for t in tasks],
            "tubular": torch.tensor([t.tubular for t in tasks]),
            "case": f"{case.dataset}/{case.case_id}",
        }


def collate_pairs(samples: list[dict]) -> dict:
    """Stack images (B, 1, ...) and flatten (image, prompt) pairs: masks (N, 1, ...), image_index (N,)."""
    return {
        "image": torch.stack([s["image"] for s in samples]),
        "masks": torch.cat([s["masks"] for s in samples])[:, None],
        "prompts": [p for s in samples for p in s["prompts"]],
        "tubular": torch.cat([s["tubular"] for s in samples]),
        "image_index": torch.cat([torch.full((len(s["prompts"]),), i) for i, s in enumerate(samples)]),
    }


def first_sample(samples: list[dict]) -> dict:
    return samples[0]


class MultiTaskDataModule(L.LightningDataModule):
    """Multi-task CT data for prompt-based segmentation (paper sec. 3.1-3.2).

    Args:
        registry: YAML listing the data sets, formats and prompts (see ``datamodules/registry.py``).
        cache_dir: on-disk cache of preprocessed volumes.
        use_cache: keep preprocessed volumes on disk (off: resample from the source files each time).
        spacing_candidates: isotropic spacings (mm) a sample is resampled to (paper: 0.6, 1.0, 1.5).
        random_spacing_probability: chance of a random candidate instead of the closest (paper: 0.1).
        window_level: HU window centre (paper: 0).
        window_width: HU window width (paper: 1800).
        antialias: smooth the image before downsampling it to the sample's spacing (``Preprocessing``).
        thin_occupancy: a tubular task's structure also labels the coarser voxels it fills at least
            this share of (0: nearest, like every label; ``Preprocessing``).
        patch_size: edge of the cubic training patch in voxels.
        batch_size: images per batch (each with up to ``prompts_per_image`` prompts).
        prompts_per_image: tasks of the same data set supervised on one patch.
        samples_per_epoch: training samples drawn per epoch.
        foreground_fraction: share of patches centred on the sampled task's structure.
        size_exponent: task sampling weight ``cases ** size_exponent`` (0 uniform, 1 proportional).
        rarity_exponent: task sampling weight also times ``fraction ** -rarity_exponent``, ``fraction``
            the task's share of its training volumes' voxels: 0 ignores size; 0.5 samples a structure
            of 1/10,000 of the volume 31.6x as often as one of a tenth (lesions and thin vessels seen in
            more patches; the organs still appear around them).
        dataset_weights: task sampling weight also times its data set's weight here (registry names;
            data sets not named weigh 1). Each patch supervises up to ``prompts_per_image`` tasks of its
            data set, so this sets how many patches a data set's tasks learn from: on the phantom
            registry (6 + 6 + 5 tasks, equal case counts, no rarity exponent) ``{PhantomLesions: 2.0}``
            draws the lesion phantoms for 10 of 22 patches on average instead of 5 of 17. A name not
            among the data sets in use is reported and ignored (the quickstart config on another
            registry). On the command line ``--data.dataset_weights '{A: 2.0}'`` replaces the config's
            whole mapping; ``--data.dataset_weights.A 2.0`` adds or changes one entry.
        priority_sampling: share of each training task draw that follows the model's running task
            difficulty (``PrioritisedTasks``; needs ``model.task_priority_exponent > 0``): 0 draws
            by the fixed probabilities alone; 0.5 keeps half of every task's fixed share and hands
            the other half out by difficulty.
        validation_fraction: share of each data set's cases held out (at least one).
        split_file: JSON ``{dataset: {"train": [...], "val": [...]}}`` overriding the seeded split.
        augment: apply the paper's augmentation to training patches.
        augmentation: its parameters.
        skip_bad_cases: drop unreadable or inconsistent cases with a summary instead of failing.
        tubular: prompts that get the clDice term and metric unless the registry says otherwise.
        only_datasets: if given, use only these data sets of the registry.
        shots: if given, train on only this many cases per data set (few-shot); the rest validate.
        num_workers: loader worker processes.
        seed: seed of the split and of every sample.
    """

    def __init__(
        self,
        registry: str = "configs/data/phantoms.yaml",
        cache_dir: str = "data/cache",
        use_cache: bool = True,
        spacing_candidates: tuple[float, ...] = (0.6, 1.0, 1.5),
        random_spacing_probability: float = 0.1,
        window_level: float = 0.0,
        window_width: float = 1800.0,
        antialias: bool = False,
        thin_occupancy: float = 0.0,
        patch_size: int = 96,
        batch_size: int = 2,
        prompts_per_image: int = 4,
        samples_per_epoch: int = 250,
        foreground_fraction: float = 0.67,
        size_exponent: float = 0.5,
        rarity_exponent: float = 0.0,
        dataset_weights: dict[str, float] | None = None,
        priority_sampling: float = 0.0,
        validation_fraction: float = 0.2,
        split_file: str | None = None,
        augment: bool = True,
        augmentation: Augmentation = Augmentation(),
        skip_bad_cases: bool = False,
        tubular: tuple[str, ...] = (
            "aorta",
            "pulmonary artery",
            "airway",
            "superior mesenteric artery",
            "renal artery",
        ),
        only_datasets: tuple[str, ...] | None = None,
        shots: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if patch_size < 16 or batch_size < 1 or prompts_per_image < 1 or samples_per_epoch < 1:
            raise ValueError("patch_size >= 16, batch_size, prompts_per_image and samples_per_epoch >= 1 required")
        if shots is not None and shots < 1:
            raise ValueError(f"data.shots must be at least 1, got {shots}")
        self.registry = registry
        self.preprocessing = Preprocessing(
            spacing_candidates, random_spacing_probability, window_level, window_width, antialias, thin_occupancy
        )
        self.cache_dir = cache_dir
        self.use_cache = use_cache
        self.cache: VolumeCache  # made in setup, once the registry names the thin structures
        self.patch_size = patch_size
        self.batch_size = batch_size
        self.prompts_per_image = prompts_per_image
        self.samples_per_epoch = samples_per_epoch
        self.foreground_fraction = foreground_fraction
        self.size_exponent = size_exponent
        self.rarity_exponent = rarity_exponent
        self.dataset_weights = dict(dataset_weights or {})
        if not all(math.isfinite(w) and w > 0 for w in self.dataset_weights.values()):
            raise ValueError(f"data.dataset_weights must all be positive and finite, got {self.dataset_weights}")
        if not 0.0 <= priority_sampling <= 1.0:
            raise ValueError(f"data.priority_sampling must lie in [0, 1], got {priority_sampling}")
        self.priority_sampling = priority_sampling
        self.validation_fraction = validation_fraction
        self.split_file = split_file
        self.augment = augment
        self.augmentation = augmentation
        self.skip_bad_cases = skip_bad_cases
        self.tubular = tuple(tubular)
        self.only_datasets = only_datasets
        self.shots = shots
        self.num_workers = num_workers
        self.seed = seed
        self.entries: list[DatasetEntry] = []
        self.train_cases: dict[str, list[Case]] = {}
        self.val_cases: list[Case] = []
        self._spacings: dict[Case, tuple[float, ...]] = {}
        self.train_set: TrainingPatches | None = None
        self.task_sampler: PrioritisedTasks | None = None

    # ------------------------------------------------------------------ setup
    @property
    def tasks(self) -> list[Task]:
        return [t for e in self.entries for t in e.tasks]

    def tasks_of(self, dataset: str) -> list[Task]:
        return next(e.tasks for e in self.entries if e.name == dataset)

    def _labels_of(self, dataset: str) -> set[int]:
        return set(next(e.labels for e in self.entries if e.name == dataset).values())

    def setup(self, stage: str | None = None) -> None:
        if self.entries:
            return
        entries = load_registry(self.registry, self.tubular)
        if self.only_datasets:
            entries = [e for e in entries if e.name in self.only_datasets]
        if not entries:
            raise ValueError(f"data registry {self.registry}: no data sets selected")
        unknown = sorted(set(self.dataset_weights) - {e.name for e in entries})
        if unknown:
            log.warning(
                "data.dataset_weights: %s not among the data sets of %s in use, ignored", unknown, self.registry
            )
        self.entries = entries
        thin_values = {
            e.name: tuple(sorted({v for t in e.tasks if t.tubular for v in t.label_values})) for e in entries
        }
        self.cache = VolumeCache(self.cache_dir, self.preprocessing, self.use_cache, thin_values)
        self._validate_cases()
        self._split()

    def _validate_cases(self) -> None:
        """Read every new or changed case once (filling the cache at its closest spacing) and report
        each bad file; cases checked at an earlier start with unchanged files are not re-read
        (``manifest.json`` in the cache folder)."""
        faults: list[str] = []
        self._announce_cache_fill()
        for entry in self.entries:
            good = []
            known = set(entry.labels.values())
            for case in entry.cases:
                try:
                    spacing = self.cache.checked_spacing(case, known)
                    if spacing is None:
                        spacing = self._read_spacing(case, known)
                    elif not self.cache.has(case, closest := self.preprocessing.closest_spacing(spacing)):
                        self.cache.load(case, closest, known)  # checked before, its entry since removed
                    self._spacings[case] = spacing
                    good.append(case)
                except BadCaseError as error:
                    faults.append(str(error))
            entry.cases = good
        self.cache.save_manifest()
        if faults and not self.skip_bad_cases:
            raise BadCaseError(f"{len(faults)} bad case(s):\n" + "\n".join(faults))
        if faults:
            log.warning("skipped %d bad case(s):\n%s", len(faults), "\n".join(faults))

    def _announce_cache_fill(self) -> None:
        """Print, before any entry is written, how many volumes setup will cache and their size on
        disk estimated from the image headers, and what the other spacing candidates may add."""
        if not self.cache.enabled:
            return
        volumes, closest, others, samples = 0, 0, 0, 0
        for entry in self.entries:
            for case in entry.cases:
                try:
                    size, spacing = image_geometry(case.image)
                except BadCaseError:
                    continue  # reported when the case is read
                target = self.preprocessing.closest_spacing(spacing)
                if self.cache.has(case, target):
                    continue
                volumes += 1
                closest += entry_bytes(prepared_shape(size, spacing, target))
                others += sum(
                    entry_bytes(prepared_shape(size, spacing, s))
                    for s in set(self.preprocessing.spacing_candidates) - {target}
                )
                samples += 12 * MAX_LOCATIONS * (len(entry.labels) - 1)
        if volumes and rank_zero_only.rank == 0:
            extra = f"; up to {_size(others)} more if training samples the other spacings" if others else ""
            print(
                f"cache: writing {volumes} volume(s) at their closest spacing to {self.cache.folder}: "
                f"about {_size(closest)} on disk (float16 image + uint8 labels, plus at most {_size(samples)} "
                f"of foreground samples){extra}",
                file=sys.stderr,
                flush=True,
            )

    def _read_spacing(self, case: Case, known_values: set[int]) -> tuple[float, ...]:
        subject = read_case(case, known_values)
        spacing = tuple(float(s) for s in subject["image"].spacing)
        self.cache.load(case, self.preprocessing.closest_spacing(spacing), known_values, subject)
        self.cache.remember(case, known_values, spacing)
        return spacing

    def case_spacing(self, case: Case) -> tuple[float, ...]:
        return self._spacings[case]

    def volume(self, case: Case, spacing: float) -> PreparedVolume:
        return self.cache.load(case, spacing, self._labels_of(case.dataset))

    def label_shares(self, cases: list[Case]) -> dict[int, float]:
        """Each label value's share of the voxels of ``cases`` at their closest spacing (from the
        cache's counts: no label map is read when the volumes are cached)."""
        held: dict[int, int] = defaultdict(int)
        total = 0
        for case in cases:
            volume = self.volume(case, self.preprocessing.closest_spacing(self.case_spacing(case)))
            for value, count in volume.counts.items():
                held[value] += count
            total += volume.labels.numel()
        return {value: count / max(total, 1) for value, count in held.items()}

    def _split(self) -> None:
        fixed = _read_split(self.split_file) if self.split_file else {}
        for i, entry in enumerate(self.entries):
            cases = entry.cases
            if entry.name in fixed:
                train = [c for c in cases if c.case_id in fixed[entry.name]["train"]]
                val = [c for c in cases if c.case_id in fixed[entry.name]["val"]]
            else:
                order = np.random.default_rng([self.seed, i]).permutation(len(cases))
                if self.shots is not None:
                    if self.shots >= len(cases):
                        raise ValueError(
                            f"data.shots={self.shots} leaves no validation case in {entry.name} ({len(cases)} cases)"
                        )
                    n_val = len(cases) - self.shots
                else:
                    n_val = max(1, round(self.validation_fraction * len(cases))) if len(cases) > 1 else 0
                val = [cases[j] for j in order[:n_val]]
                train = [cases[j] for j in order[n_val:]]
            self.train_cases[entry.name] = train
            self.val_cases += val

    # ------------------------------------------------------------------ loaders
    def set_epoch(self, epoch: int) -> None:
        if self.train_set is not None:
            self.train_set.epoch = epoch

    def train_dataloader(self) -> DataLoader:
        self.train_set = TrainingPatches(self, self.train_cases)
        if self.trainer is not None:
            # Loader workers copy the data set when Lightning first iterates, before the epoch-start
            # hooks: give them the epoch about to run. After a resume ``current_epoch`` still reads
            # the last finished one there; the epochs the loop has processed do not.
            self.train_set.epoch = self.trainer.fit_loop.epoch_progress.current.processed
        if self.priority_sampling > 0:
            self.task_sampler = PrioritisedTasks(self.train_set, self._task_difficulty(), self.priority_sampling)
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=False,
            sampler=self.task_sampler,
            num_workers=self.num_workers,
            collate_fn=collate_pairs,
            pin_memory=self._on_gpu(),
            persistent_workers=False,
        )

    def _task_difficulty(self) -> Callable[[list[str]], torch.Tensor]:
        priorities = getattr(self.trainer.lightning_module, "task_priorities", None) if self.trainer else None
        if priorities is None:
            raise ValueError(
                "data.priority_sampling needs a model that keeps running task Dice "
                "(PromptSegModule with model.task_priority_exponent > 0)"
            )
        return priorities.difficulty

    def _on_gpu(self) -> bool:
        """Pin host memory only when the trainer trains on a GPU (not merely because one exists)."""
        return self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            ValidationVolumes(self, self.val_cases), batch_size=1, num_workers=self.num_workers, collate_fn=first_sample
        )


def _size(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def _read_split(path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"split file {path} does not exist")
    return json.loads(file.read_text())
