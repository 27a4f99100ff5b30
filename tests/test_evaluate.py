from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from scipy import stats

from evaluate import main, markdown_table, paired_p_values, read_csv


def write(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array.astype(np.uint8), np.eye(4)), path)


@pytest.fixture
def dataset(tmp_path):
    gt = tmp_path / "Dataset001_X"
    (gt / "labelsTr").mkdir(parents=True)
    (gt / "dataset.json").write_text(
        json.dumps({"labels": {"background": 0, "liver": 1, "aorta": 2}, "file_ending": ".nii.gz"})
    )
    for i in range(3):
        labels = np.zeros((10, 10, 10), np.uint8)
        labels[2:6, 2:6, 2:6] = 1
        labels[8, 1:9, 5] = 2
        write(gt / "labelsTr" / f"case_{i}.nii.gz", labels)
        prediction = labels == 1
        prediction[2 : 2 + i, 2:6, 2:6] = False  # case i misses i of 4 slices
        write(tmp_path / "pred" / f"case_{i}_0000" / "liver.nii.gz", prediction)
        write(tmp_path / "pred" / f"case_{i}_0000" / "aorta.nii.gz", labels == 2)
    return gt


def test_per_case_values_and_table(dataset, tmp_path):
    assert main(["--pred", str(tmp_path / "pred"), "--gt", str(dataset), "--output", str(tmp_path / "eval")]) == 0
    rows = read_csv(tmp_path / "eval" / "per_case.csv")
    liver = sorted((r for r in rows if r["task"] == "liver"), key=lambda r: r["case"])
    assert [r["Dice"] for r in liver] == pytest.approx([1.0, 2 * 48 / (48 + 64), 2 * 32 / (32 + 64)])
    assert all(r["clDice"] == 1.0 for r in rows if r["task"] == "aorta")
    table = (tmp_path / "eval" / "table.md").read_text()
    assert "| Dice | ours |" in table and (tmp_path / "eval" / "boxplot.png").stat().st_size > 0
    assert main(["--pred", str(tmp_path / "pred"), "--gt", str(dataset), "--output", str(tmp_path / "eval")]) == 2


def test_paired_t_test_matches_scipy_and_marks_significance():
    ours = [
        {"case": str(i), "task": "t", "Dice": 0.9 + 0.01 * i, "clDice": 0.5, "Tsens": 0.5, "Tprec": 0.5}
        for i in range(6)
    ]
    other = [dict(r, Dice=r["Dice"] - 0.1 - 0.002 * i) for i, r in enumerate(ours)]
    p = paired_p_values(ours, other)
    expected = stats.ttest_rel([r["Dice"] for r in ours], [r["Dice"] for r in other]).pvalue
    assert p[("t", "Dice")] == pytest.approx(expected) and expected < 0.05
    assert ("t", "clDice") not in p  # identical values: no test
    table = markdown_table({"ours": ours, "other": other}, {"other": p})
    assert "| Dice | other |" in table and "*" in table.split("| Dice | other |")[1].splitlines()[0]


def test_missing_ground_truth_is_one_line(tmp_path, capsys):
    assert main(["--pred", str(tmp_path), "--gt", str(tmp_path / "none"), "--output", str(tmp_path / "e")]) == 2
    assert capsys.readouterr().err.startswith("error:")


def test_few_shot_table_compares_each_baseline_with_ours(tmp_path):
    from fewshot_experiment import write_outputs

    rows = []
    jitter = [0.01, -0.01, 0.02, -0.02, 0.0]  # sole-path: no systematic difference from ours
    for method, offset in (("ours", 0.0), ("SwinUNETR", -0.3), ("sole-path (M = 1)", 0.0)):
        for case in range(5):
            value = 0.8 + 0.02 * case + offset + (0.01 * case if method == "SwinUNETR" else 0.0)
            value += jitter[case] if method == "sole-path (M = 1)" else 0.0
            rows.append(
                {"method": method, "shots": 1, "case": str(case), "task": "renal artery"}
                | {"Dice": value, "clDice": value, "Tsens": value, "Tprec": value}
            )
    table = write_outputs(rows, tmp_path)
    assert (tmp_path / "per_case.csv").is_file() and (tmp_path / "table.md").read_text() == table
    swin_row = next(line for line in table.splitlines() if line.startswith("| Dice | SwinUNETR |"))
    sole_row = next(line for line in table.splitlines() if line.startswith("| Dice | sole-path"))
    assert swin_row.endswith("* |") and not sole_row.endswith("* |")
