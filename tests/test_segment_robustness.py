"""segment.py and export.py on bad or unusual input (issue #14): one error line, exit 2, nothing written.

The checkpoint is a randomly initialised tiny network saved like a Lightning checkpoint (no training):
these tests are about inputs and outputs, not about the masks' quality.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.data import get_testdata_file

import export
import segment
from datamodules.files import atomic_write
from inference.checkpoints import load_model
from tests.conftest import PROMPTS


def ct_volume(shape: tuple[int, int, int] = (24, 20, 16)) -> np.ndarray:
    """A body-like block in air: soft tissue, a lung of -800 HU and a bone of 700 HU."""
    hu = np.full(shape, -1000, np.int16)
    x, y, z = (s // 2 for s in shape)
    hu[x - 8 : x + 8, y - 7 : y + 7, :] = 40
    hu[x - 6 : x - 1, y - 4 : y + 4, 2:-2] = -800
    hu[x + 2 : x + 5, y - 2 : y + 2, :] = 700
    return hu


def write_nifti(path: Path, data: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.diag([4.0, 4.0, 4.0, 1.0])), path)
    return path


def segment_args(checkpoint: Path, source: Path, output: Path, *extra: str, prompts=PROMPTS) -> list[str]:
    args = ["--checkpoint", str(checkpoint), "--input", str(source), "--output", str(output), "--device", "cpu"]
    return args + [a for p in prompts for a in ("--prompt", p)] + list(extra)


def one_error(captured) -> str:
    """The single stderr line of a failed run (fd-level, so C++ printouts count too)."""
    error = captured.err.strip()
    assert error.startswith("error:") and "\n" not in error and "Traceback" not in error, error
    return error


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


# --- does it look like CT? ------------------------------------------------------------------------


def test_air_only_and_mr_like_volumes_are_warned_about_and_counted(checkpoint, tmp_path, capfd):
    cases = tmp_path / "cases"
    write_nifti(cases / "ct.nii.gz", ct_volume())
    write_nifti(cases / "air.nii.gz", np.full((24, 20, 16), -1000, np.int16))
    write_nifti(cases / "mr.nii.gz", np.random.default_rng(0).integers(0, 4000, (24, 20, 16)).astype(np.int16))
    assert segment.main(segment_args(checkpoint, cases, tmp_path / "out")) == 0
    captured = capfd.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2, captured.err
    assert any(f"{cases / 'air.nii.gz'}: does not look like CT" in w and "air" in w for w in warnings)
    assert any(f"{cases / 'mr.nii.gz'}: does not look like CT" in w and "no air:" in w for w in warnings)
    summary = captured.out.strip().splitlines()[-1]
    assert "3 case(s)" in summary and "2 prompt(s)" in summary and "2 warning(s)" in summary and " s," in summary
    assert all((tmp_path / "out" / case / "liver.nii.gz").is_file() for case in ("ct", "air", "mr"))


def test_ct_problems_thresholds():
    assert segment.ct_problems(ct_volume()) == []
    assert len(segment.ct_problems(np.full((8, 8, 8), -1000.0))) == 2  # air, no body
    assert segment.ct_problems(np.full((8, 8, 8), 5000.0))[0].startswith("no air:")


# --- prompts ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompts, extra, message",
    [
        (("liver", "LIVER!"), (), "would both be written to liver.nii.gz"),
        (("???",), (), "no letter or digit"),
        (("liver", "Labels"), ("--label-map",), "labels.nii.gz"),
    ],
)
def test_prompts_without_a_file_name_of_their_own_are_refused(checkpoint, tmp_path, capfd, prompts, extra, message):
    image = write_nifti(tmp_path / "ct.nii.gz", ct_volume())
    assert segment.main(segment_args(checkpoint, image, tmp_path / "out", *extra, prompts=prompts)) == 2
    assert message in one_error(capfd.readouterr())
    assert not (tmp_path / "out").exists()


def test_slug_of_nothing_raises():
    assert segment.slug("Renal artery (left)") == "renal-artery-left"
    with pytest.raises(ValueError, match="no letter or digit"):
        segment.slug("???")


def test_unknown_prompt_of_an_embedding_table_names_the_prompt(checkpoint, tmp_path, capfd):
    image = write_nifti(tmp_path / "ct.nii.gz", ct_volume())
    assert segment.main(segment_args(checkpoint, image, tmp_path / "out", prompts=("liver", "spleen"))) == 2
    error = one_error(capfd.readouterr())
    assert "'spleen'" in error and "no entry" in error and "liver" in error and "aorta" in error
    assert not (tmp_path / "out").exists()


# --- existing outputs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flag, name", [("--label-map", "labels.json"), ("--label-map", "labels.nii.gz"), ("--preview", "preview.png")]
)
def test_label_map_legend_and_preview_are_not_replaced_without_overwrite(checkpoint, tmp_path, capfd, flag, name):
    image = write_nifti(tmp_path / "ct.nii.gz", ct_volume())
    existing = tmp_path / "out" / "ct" / name
    existing.parent.mkdir(parents=True)
    existing.write_text("keep me")
    assert segment.main(segment_args(checkpoint, image, tmp_path / "out", flag)) == 2
    assert str(existing) in one_error(capfd.readouterr())
    assert existing.read_text() == "keep me" and files_under(tmp_path / "out") == ["ct", f"ct/{name}"]


# --- case names -----------------------------------------------------------------------------------------


def test_nnunet_channel_suffix_is_dropped_from_case_names(checkpoint, tmp_path, capfd):
    images = tmp_path / "imagesTr"
    write_nifti(images / "case_000_0000.nii.gz", ct_volume())
    write_nifti(images / "case_001_0000.nii.gz", ct_volume())
    assert segment.main(segment_args(checkpoint, images, tmp_path / "out")) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["case_000", "case_001"]
    write_nifti(images / "case_000.nii.gz", ct_volume())
    assert segment.main(segment_args(checkpoint, images, tmp_path / "again")) == 2
    assert "would both be written to case case_000" in one_error(capfd.readouterr())


# --- DICOM -------------------------------------------------------------------------------------------------


def write_series(folder: Path, uid: str, slices: int, suffix: str = "") -> None:
    """A CT series of ``slices`` files (the one real slice of pydicom's CT_small, repeated) with ``uid``."""
    dataset = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    folder.mkdir(parents=True, exist_ok=True)
    dataset.SeriesInstanceUID = uid
    for index in range(slices):
        dataset.ImagePositionPatient[2] = float(index * 5.0)
        dataset.InstanceNumber = index + 1
        dataset.SOPInstanceUID = f"{uid}.{index + 1}"
        dataset.save_as(folder / f"IM{uid[-1]}{index:03d}{suffix}")


def mask_shape(path: Path) -> tuple[int, ...]:
    return nib.load(path).shape


def test_dicom_series_without_suffix_is_found_by_content(checkpoint, tmp_path):
    write_series(tmp_path / "export", "1.2.826.0.1.1", 4)
    assert segment.main(segment_args(checkpoint, tmp_path / "export", tmp_path / "out")) == 0
    assert mask_shape(tmp_path / "out" / "export" / "liver.nii.gz") == (128, 128, 4)


def test_folder_with_two_series_uses_the_longest_and_says_so_or_the_one_asked_for(checkpoint, tmp_path, capfd):
    folder = tmp_path / "study"
    write_series(folder, "1.2.826.0.1.1", 4)
    write_series(folder, "1.2.826.0.1.2", 3)
    assert segment.main(segment_args(checkpoint, folder, tmp_path / "a")) == 0
    note = next(line for line in capfd.readouterr().err.splitlines() if line.startswith("note:"))
    assert "2 DICOM series" in note and "1.2.826.0.1.1 (4 slices)" in note and "1.2.826.0.1.2 (3 slices)" in note
    assert "using 1.2.826.0.1.1" in note
    assert mask_shape(tmp_path / "a" / "study" / "liver.nii.gz")[2] == 4
    assert segment.main(segment_args(checkpoint, folder, tmp_path / "b", "--series", "1.2.826.0.1.2")) == 0
    assert mask_shape(tmp_path / "b" / "study" / "liver.nii.gz")[2] == 3
    assert segment.main(segment_args(checkpoint, folder, tmp_path / "c", "--series", "9.9")) == 2
    assert "no DICOM series 9.9" in one_error(capfd.readouterr())


def test_every_series_folder_of_a_parent_is_a_case(checkpoint, tmp_path, capfd):
    write_series(tmp_path / "pacs" / "plain", "1.2.826.0.1.1", 3)
    write_series(tmp_path / "pacs" / "suffixed", "1.2.826.0.1.2", 3, suffix=".dcm")
    (tmp_path / "pacs" / "notes").mkdir()
    (tmp_path / "pacs" / "notes" / "readme.txt").write_text("not DICOM")
    assert segment.main(segment_args(checkpoint, tmp_path / "pacs", tmp_path / "out")) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["plain", "suffixed"]
    assert "1 case" not in capfd.readouterr().out


# --- unreadable input ---------------------------------------------------------------------------------------


def truncated(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def write_any(path: Path, data: np.ndarray) -> Path:
    image = sitk.GetImageFromArray(data.transpose(2, 1, 0).copy())
    image.SetSpacing((4.0, 4.0, 4.0))
    sitk.WriteImage(image, str(path), useCompression=False)
    return path


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".mha", ".nrrd"])
def test_truncated_files_give_one_error_line_naming_the_file(checkpoint, tmp_path, capfd, suffix):
    image = truncated(write_any(tmp_path / f"ct{suffix}", ct_volume((40, 40, 40))))
    assert segment.main(segment_args(checkpoint, image, tmp_path / "out")) == 2
    error = one_error(capfd.readouterr())
    assert str(image) in error and "cannot be read" in error and "No such file" not in error
    assert not (tmp_path / "out").exists()


def test_a_bad_case_in_a_folder_stops_the_run_before_any_output(checkpoint, tmp_path, capfd):
    cases = tmp_path / "cases"
    write_nifti(cases / "a.nii.gz", ct_volume())
    truncated(write_nifti(cases / "b.nii.gz", ct_volume((40, 40, 40))))
    assert segment.main(segment_args(checkpoint, cases, tmp_path / "out")) == 2
    assert str(cases / "b.nii.gz") in one_error(capfd.readouterr())
    assert not (tmp_path / "out").exists()


def test_cases_are_read_one_at_a_time(checkpoint, tmp_path, monkeypatch):
    cases = tmp_path / "cases"
    for name in ("a", "b"):
        write_nifti(cases / f"{name}.nii.gz", ct_volume())
    events = []
    read, segment_case = segment.read_image, segment.segment_case
    monkeypatch.setattr(
        segment, "read_image", lambda path, series=None: events.append(f"read {path.name}") or read(path)
    )
    monkeypatch.setattr(
        segment,
        "segment_case",
        lambda model, image, *rest: events.append("segment") or segment_case(model, image, *rest),
    )
    assert segment.main(segment_args(checkpoint, cases, tmp_path / "out")) == 0
    # a checking pass (nothing kept), then each case read right before it is segmented
    assert events == ["read a.nii.gz", "read b.nii.gz", "read a.nii.gz", "segment", "read b.nii.gz", "segment"]


# --- output folder ------------------------------------------------------------------------------------------


def forbid_inference(monkeypatch) -> None:
    def fail(*_):
        raise AssertionError("inference ran although the output cannot be written")

    monkeypatch.setattr(segment, "segment_case", fail)


def test_output_under_a_regular_file_fails_before_inference(checkpoint, tmp_path, capfd, monkeypatch):
    image = write_nifti(tmp_path / "ct.nii.gz", ct_volume())
    (tmp_path / "file").write_text("")
    forbid_inference(monkeypatch)
    assert segment.main(segment_args(checkpoint, image, tmp_path / "file" / "out")) == 2
    assert "is a file, not a folder" in one_error(capfd.readouterr())


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs Linux /proc")
def test_output_in_an_unwritable_location_fails_before_inference(checkpoint, tmp_path, capfd, monkeypatch):
    image = write_nifti(tmp_path / "ct.nii.gz", ct_volume())
    forbid_inference(monkeypatch)
    assert segment.main(segment_args(checkpoint, image, Path("/proc/segment-test/out"))) == 2
    assert "cannot write in /proc" in one_error(capfd.readouterr())


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_output_in_a_read_only_folder_fails_before_inference(checkpoint, tmp_path, capfd, monkeypatch):
    image = write_nifti(tmp_path / "ct.nii.gz", ct_volume())
    (tmp_path / "locked").mkdir(mode=0o555)
    forbid_inference(monkeypatch)
    try:
        assert segment.main(segment_args(checkpoint, image, tmp_path / "locked" / "out")) == 2
    finally:
        (tmp_path / "locked").chmod(0o755)
    assert "cannot write in" in one_error(capfd.readouterr())


def fail_on_call(monkeypatch, number: int) -> None:
    """Make the ``number``-th NIfTI write fail as a full disk would."""
    save, calls = nib.save, []

    def full_disk(image, path):
        calls.append(path)
        if len(calls) == number:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        save(image, path)

    monkeypatch.setattr(nib, "save", full_disk)


def test_a_write_failing_part_way_leaves_nothing_of_the_case(checkpoint, tmp_path, capfd, monkeypatch):
    image = write_nifti(tmp_path / "ct.nii.gz", ct_volume())
    fail_on_call(monkeypatch, 2)
    assert segment.main(segment_args(checkpoint, image, tmp_path / "out")) == 2
    error = one_error(capfd.readouterr())
    assert "No space left on device" in error and "nothing of it was kept" in error
    assert not (tmp_path / "out").exists()  # no mask, no temporary file, no folder made by the run


def test_skip_existing_resumes_a_folder_run(checkpoint, tmp_path, capfd, monkeypatch):
    cases = tmp_path / "cases"
    for name in ("a", "b"):
        write_nifti(cases / f"{name}.nii.gz", ct_volume())
    fail_on_call(monkeypatch, 4)  # the second file of case b
    assert segment.main(segment_args(checkpoint, cases, tmp_path / "out")) == 2
    assert "--skip-existing" in one_error(capfd.readouterr())
    assert files_under(tmp_path / "out") == ["a", "a/aorta.nii.gz", "a/liver.nii.gz"]
    monkeypatch.undo()
    stamp = (tmp_path / "out" / "a" / "liver.nii.gz").stat().st_mtime_ns
    assert segment.main(segment_args(checkpoint, cases, tmp_path / "out")) == 2  # exists, no flag
    assert segment.main(segment_args(checkpoint, cases, tmp_path / "out", "--skip-existing")) == 0
    assert "1 case(s), 1 skipped" in capfd.readouterr().out
    assert (tmp_path / "out" / "a" / "liver.nii.gz").stat().st_mtime_ns == stamp
    assert files_under(tmp_path / "out" / "b") == ["aorta.nii.gz", "liver.nii.gz"]


# --- file modes ------------------------------------------------------------------------------------------------


def test_written_files_respect_the_umask(checkpoint, tmp_path):
    previous = os.umask(0o022)
    try:
        atomic_write(tmp_path / "plain.txt", lambda path: path.write_text("x"))
        image = write_nifti(tmp_path / "ct.nii.gz", ct_volume())
        assert segment.main(segment_args(checkpoint, image, tmp_path / "out", "--label-map")) == 0
    finally:
        os.umask(previous)
    for path in (
        tmp_path / "plain.txt",
        tmp_path / "out" / "ct" / "liver.nii.gz",
        tmp_path / "out" / "ct" / "labels.json",
    ):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


# --- export ------------------------------------------------------------------------------------------------------


def test_export_to_a_name_without_extension(checkpoint, tmp_path, capfd, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert export.main(["--checkpoint", str(checkpoint), "--prompt", "liver", "--output", "liver_model"]) == 0
    assert json.loads(capfd.readouterr().out)["output"] == "liver_model"
    assert set(load_model(tmp_path / "liver_model").prompt_embeddings) == {"liver"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["liver_model"]


def test_export_writes_nothing_unless_every_export_succeeds(checkpoint, tmp_path, capfd, monkeypatch):
    (tmp_path / "file").write_text("")
    args = ["--checkpoint", str(checkpoint), "--prompt", "liver", "--output", str(tmp_path / "liver.pt")]
    assert export.main([*args, "--onnx", str(tmp_path / "file" / "onnx" / "liver.onnx")]) == 2
    captured = capfd.readouterr()
    assert "--onnx" in one_error(captured) and captured.out == ""

    def broken(*_):
        raise RuntimeError("exporter broke")

    monkeypatch.setattr(export, "export_onnx", broken)
    assert export.main([*args, "--onnx", str(tmp_path / "new" / "liver.onnx")]) == 2
    captured = capfd.readouterr()
    assert "exporter broke" in one_error(captured) and captured.out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
