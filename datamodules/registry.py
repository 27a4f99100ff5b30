"""The data-set registry: which folders hold which structures, and the prompt for each.

A registry YAML (see ``configs/data/phantoms.yaml``) lists data sets::

    datasets:
      - name: PhantomLesions
        path: data/phantoms/Dataset003_PhantomLesions   # relative to the working directory
        format: nnunet            # nnunet | msd | totalsegmentator
        tasks:                    # optional; default: one task per label, prompt = label name
          - prompt: liver
            labels: [liver, liver tumor]   # the union of these labels is the target
            aliases: [hepatic parenchyma]
            tubular: false        # true adds the soft-clDice loss term and the clDice metric

A task is one (data set, structure, prompt) triple.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import yaml

FORMATS = ("nnunet", "msd", "totalsegmentator")
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Task:
    """A (data set, structure, prompt) triple; ``label_values`` are the integers forming the target."""

    dataset: str
    prompt: str
    label_values: tuple[int, ...]
    tubular: bool = False
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class Case:
    """One image with its labels: a label map, or one binary file per structure (TotalSegmentator),
    given as (structure, its label value in the data set, file)."""

    dataset: str
    case_id: str
    image: Path
    label_map: Path | None = None
    structure_files: tuple[tuple[str, int, Path], ...] = ()


@dataclass
class DatasetEntry:
    name: str
    path: Path
    format: str
    labels: dict[str, int]
    cases: list[Case]
    tasks: list[Task] = field(default_factory=list)


class RegistryError(ValueError):
    """Every problem found in a data registry, one line each (``problems``)."""

    def __init__(self, registry: Path, problems: list[str]) -> None:
        super().__init__(f"{len(problems)} problem(s) in data registry {registry}:\n" + "\n".join(problems))
        self.problems = problems


def load_registry(path: str | Path, tubular_default: tuple[str, ...] = ()) -> list[DatasetEntry]:
    """Read a registry YAML and list each data set's cases and tasks; every problem of every data
    set is reported together (:class:`RegistryError`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data registry {path} does not exist")
    spec = yaml.safe_load(path.read_text()) or {}
    if not spec.get("datasets"):
        raise ValueError(f"data registry {path} lists no datasets")
    entries, problems = [], []
    for item in spec["datasets"]:
        try:
            entries.append(_load_entry(item, path, tubular_default))
        except (ValueError, FileNotFoundError) as error:
            problems += str(error).splitlines()
    if problems:
        raise RegistryError(path, problems)
    return entries


def _load_entry(item: dict, registry: Path, tubular_default: tuple[str, ...]) -> DatasetEntry:
    for key in ("name", "path", "format"):
        if key not in item:
            raise ValueError(f"data registry {registry}: a dataset lacks '{key}'")
    if item["format"] not in FORMATS:
        raise ValueError(f"data registry {registry}: dataset {item['name']} has unknown format {item['format']!r}")
    root = Path(item["path"])
    if not root.is_dir():
        raise FileNotFoundError(f"dataset {item['name']}: folder {root} does not exist")
    reader = {"nnunet": _nnunet, "msd": _msd, "totalsegmentator": _totalsegmentator}[item["format"]]
    labels, cases = reader(item["name"], root)
    tasks = _tasks(item, labels, tubular_default)
    return DatasetEntry(item["name"], root, item["format"], labels, cases, tasks)


def _tasks(item: dict, labels: dict[str, int], tubular_default: tuple[str, ...]) -> list[Task]:
    specs = item.get("tasks") or [{"prompt": name, "labels": [name]} for name in labels if name != "background"]
    tasks, problems = [], []
    for spec in specs:
        unknown = [name for name in spec.get("labels", [spec["prompt"]]) if name not in labels]
        if unknown:
            problems.append(f"dataset {item['name']}: task {spec['prompt']!r} names unknown labels {unknown}")
            continue
        values = tuple(labels[name] for name in spec.get("labels", [spec["prompt"]]))
        tubular = bool(spec.get("tubular", spec["prompt"] in tubular_default))
        tasks.append(Task(item["name"], spec["prompt"], values, tubular, tuple(spec.get("aliases", ()))))
    if problems:
        raise ValueError("\n".join(problems))
    return tasks


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None


def _nnunet(name: str, root: Path) -> tuple[dict[str, int], list[Case]]:
    meta = _read_json(root / "dataset.json")
    ending = meta.get("file_ending", ".nii.gz")
    labels = {k: int(v) for k, v in meta["labels"].items()}
    cases = []
    for image in sorted((root / "imagesTr").glob(f"*_0000{ending}")):
        case_id = image.name[: -len(f"_0000{ending}")]
        cases.append(Case(name, case_id, image, label_map=root / "labelsTr" / f"{case_id}{ending}"))
    return labels, cases


def _msd(name: str, root: Path) -> tuple[dict[str, int], list[Case]]:
    meta = _read_json(root / "dataset.json")
    labels = {str(v): int(k) for k, v in meta["labels"].items()}
    cases = []
    for pair in meta.get("training", []):
        image = root / pair["image"]
        case_id = image.name.split(".")[0]
        cases.append(Case(name, case_id, image, label_map=root / pair["label"]))
    return labels, cases


def _totalsegmentator(name: str, root: Path) -> tuple[dict[str, int], list[Case]]:
    """One case per folder holding ``segmentations/``. Label values number the data set's union of
    structure names (sorted), the same in every case: a case without a structure's file lacks that
    structure (it is absent there; a warning names how many cases lack files)."""
    folders = sorted(p for p in root.iterdir() if (p / "segmentations").is_dir())
    files = {f: {_strip_suffix(m.name): m for m in (f / "segmentations").iterdir()} for f in folders}
    structures = sorted(set().union(*files.values()))
    if len(structures) > 255:
        raise ValueError(f"dataset {name}: {len(structures)} structures exceed the 255 values of a uint8 label map")
    labels = {"background": 0} | {s: i for i, s in enumerate(structures, start=1)}
    cases = []
    for folder in folders:
        image = next((folder / f"ct{s}" for s in IMAGE_SUFFIXES if (folder / f"ct{s}").exists()), folder / "ct.nii.gz")
        masks = tuple((s, labels[s], path) for s, path in sorted(files[folder].items()))
        cases.append(Case(name, folder.name, image, structure_files=masks))
    incomplete = [f.name for f in folders if len(files[f]) < len(structures)]
    if incomplete:
        log.warning(
            "dataset %s: %d case(s) lack some of the %d structure files (those structures count as absent there): %s",
            name,
            len(incomplete),
            len(structures),
            ", ".join(incomplete[:5]) + (" ..." if len(incomplete) > 5 else ""),
        )
    return labels, cases


def _strip_suffix(filename: str) -> str:
    for suffix in IMAGE_SUFFIXES:
        if filename.endswith(suffix):
            return filename[: -len(suffix)]
    return filename
