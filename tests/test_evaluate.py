from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
from scipy import stats

from evaluate import main, markdown_table, paired_p_values, read_csv

# anisotropic voxels (2 x 1.5 x 2.5 mm, 7.5 mm³) away from the world origin
AFFINE = np.array([[2.0, 0, 0, -10], [0, 1.5, 0, 20], [0, 0, 2.5, 5], [0, 0, 0, 1]])


def write(path, array, affine=AFFINE):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array).astype(np.uint8), affine), path)


def run(tmp_path, *extra: str) -> int:
    paths = ["--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "Dataset001_X"), "--output"]
    return main([*paths, str(tmp_path / "eval"), *extra])


def cells(table: str, row_start: str) -> dict[str, str]:
    """Task -> cell of the markdown row starting with ``row_start``."""
    header = table.splitlines()[0].strip("|").split("|")[2:]
    row = next(line for line in table.splitlines() if line.startswith(row_start))
    return dict(zip((h.strip() for h in header), (c.strip() for c in row.strip("|").split("|")[2:])))


@pytest.fixture
def dataset(tmp_path):
    """Three cases: liver (case i misses i of 4 slices), aorta (exact), tumour (only in case_0; case_2
    predicts 40 false-positive voxels, 0.3 ml)."""
    gt = tmp_path / "Dataset001_X"
    (gt / "labelsTr").mkdir(parents=True)
    (gt / "dataset.json").write_text(
        json.dumps({"labels": {"background": 0, "liver": 1, "aorta": 2, "tumour": 3}, "file_ending": ".nii.gz"})
    )
    for i in range(3):
        labels = np.zeros((10, 10, 10), np.uint8)
        labels[2:6, 2:6, 2:6] = 1
        labels[8, 1:9, 5] = 2
        if i == 0:
            labels[6:8, 6:8, 2:4] = 3
        write(gt / "labelsTr" / f"case_{i}.nii.gz", labels)
        prediction = labels == 1
        prediction[2 : 2 + i, 2:6, 2:6] = False  # case i misses i of 4 slices
        tumour = labels == 3
        if i == 2:
            tumour[0:2, 0:4, 0:5] = True
        write(tmp_path / "pred" / f"case_{i}_0000" / "liver.nii.gz", prediction)
        write(tmp_path / "pred" / f"case_{i}_0000" / "aorta.nii.gz", labels == 2)
        write(tmp_path / "pred" / f"case_{i}_0000" / "tumour.nii.gz", tumour)
    return gt


def test_per_case_values_and_table(dataset, tmp_path):
    assert run(tmp_path) == 0
    rows = read_csv(tmp_path / "eval" / "per_case.csv")
    liver = sorted((r for r in rows if r["task"] == "liver"), key=lambda r: r["case"])
    assert [r["Dice"] for r in liver] == pytest.approx([1.0, 2 * 48 / (48 + 64), 2 * 32 / (32 + 64)])
    assert all(r["clDice"] == 1.0 for r in rows if r["task"] == "aorta")
    table = (tmp_path / "eval" / "table.md").read_text()
    assert "| Dice | ours |" in table and (tmp_path / "eval" / "boxplot.png").stat().st_size > 0
    assert run(tmp_path) == 2


def test_hd95_and_nsd_in_mm_per_case_and_in_the_table(dataset, tmp_path):
    """Liver surfaces (56 truth, 44 / 32 predicted surface voxels): the truth's first face, 16 of 56
    voxels (> 5 %), lies 1 slice (2 mm) from case_1's prediction and 2 slices (4 mm) from case_2's,
    every other distance is at most 2 mm (case_1: 1.5 mm sideways), so HD95 = 0, 2, 4 mm. NSD at
    1.9 mm: case_1 loses those 16 of 100 surface voxels."""
    assert run(tmp_path, "--nsd-tolerance", "1.9") == 0
    rows = read_csv(tmp_path / "eval" / "per_case.csv")
    liver = sorted((r for r in rows if r["task"] == "liver"), key=lambda r: r["case"])
    assert [r["HD95"] for r in liver] == pytest.approx([0.0, 2.0, 4.0])
    assert [r["NSD"] for r in liver][:2] == pytest.approx([1.0, 84 / 100])
    table = (tmp_path / "eval" / "table.md").read_text()
    assert cells(table, "| HD95 | ours |")["liver"] == "2.00 ± 2.00"  # mm, not percent
    assert cells(table, "| NSD | ours |")["aorta"] == "100.00 ± 0.00" and "tolerance 1.9 mm" in table


def flip(array, affine, axis):
    """The same mask with voxel order reversed along ``axis`` (same world points)."""
    turn = np.eye(4)
    turn[axis, axis], turn[axis, 3] = -1, array.shape[axis] - 1
    return np.flip(array, axis), affine @ turn


def swap_first_axes(array, affine):
    swap = np.eye(4)[[1, 0, 2, 3]]
    return array.transpose(1, 0, 2), affine @ swap


def test_reversed_or_permuted_voxel_order_scores_like_the_original(dataset, tmp_path):
    case_1 = tmp_path / "pred" / "case_1_0000" / "liver.nii.gz"
    case_2 = tmp_path / "pred" / "case_2_0000" / "liver.nii.gz"
    array, affine = flip(*flip(np.asarray(nib.load(case_1).dataobj), AFFINE, 0), 2)
    write(case_1, array, affine)
    array, affine = flip(*swap_first_axes(np.asarray(nib.load(case_2).dataobj), AFFINE), 1)
    write(case_2, array, affine)
    assert run(tmp_path) == 0
    rows = read_csv(tmp_path / "eval" / "per_case.csv")
    liver = sorted((r for r in rows if r["task"] == "liver"), key=lambda r: r["case"])
    assert [r["Dice"] for r in liver] == pytest.approx([1.0, 2 * 48 / (48 + 64), 2 * 32 / (32 + 64)])
    assert [r["HD95"] for r in liver] == pytest.approx([0.0, 2.0, 4.0])


def test_shifted_mask_is_refused_without_output(dataset, tmp_path, capsys):
    shifted = AFFINE.copy()
    shifted[0, 3] += 40.0
    path = tmp_path / "pred" / "case_1_0000" / "aorta.nii.gz"
    write(path, np.asarray(nib.load(path).dataobj), shifted)
    assert run(tmp_path) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith(f"error: {path}: geometry differs from ")
    assert "case_1.nii.gz" in error and "origin 40 mm away" in error
    assert not (tmp_path / "eval").exists()


def test_missing_case_and_masks_are_listed_or_scored_empty(dataset, tmp_path, capsys):
    for name in ("liver", "aorta", "tumour"):
        (tmp_path / "pred" / "case_1_0000" / f"{name}.nii.gz").unlink()
    (tmp_path / "pred" / "case_1_0000").rmdir()
    (tmp_path / "pred" / "case_2_0000" / "aorta.nii.gz").unlink()
    assert run(tmp_path) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("error:") and "4 of 9 predicted masks missing" in error
    assert "case_1 (no folder)" in error and "case_2_0000/aorta.nii.gz" in error
    assert not (tmp_path / "eval").exists()

    assert run(tmp_path, "--missing-as-empty") == 0
    captured = capsys.readouterr()
    assert captured.err.startswith("warning: missing predictions scored as empty masks: case_1 (no folder)")
    rows = {(r["case"], r["task"]): r for r in read_csv(tmp_path / "eval" / "per_case.csv")}
    assert rows[("case_1", "liver")]["Dice"] == 0.0 and rows[("case_1", "liver")]["NSD"] == 0.0
    assert np.isnan(rows[("case_2", "aorta")]["HD95"])  # present, predicted empty: not found
    table = (tmp_path / "eval" / "table.md").read_text()
    assert cells(table, "| HD95 | ours |")["aorta"] == "0.00 ± 0.00 (2 not found)"
    assert cells(table, "| Dice | ours |")["aorta"] == f"{100 / 3:.2f} ± {np.std([100, 0, 0], ddof=1):.2f}"
    assert "Note: missing predictions scored as empty masks (--missing-as-empty): case_1 (no folder)" in table


def test_absent_structures_leave_the_means_and_count_as_false_positives(dataset, tmp_path):
    assert run(tmp_path) == 0
    rows = {(r["case"], r["task"]): r for r in read_csv(tmp_path / "eval" / "per_case.csv")}
    assert [rows[(f"case_{i}", "tumour")]["present"] for i in range(3)] == [1, 0, 0]
    assert np.isnan(rows[("case_1", "tumour")]["Dice"]) and np.isnan(rows[("case_2", "tumour")]["NSD"])
    assert rows[("case_2", "tumour")]["pred_voxels"] == 40
    assert rows[("case_2", "tumour")]["pred_ml"] == pytest.approx(40 * 7.5 / 1000)
    table = (tmp_path / "eval" / "table.md").read_text()
    assert cells(table, "| Dice | ours |")["tumour"] == "100.00 ± 0.00"  # case_0 only, not (1 + 1 + 0) / 3
    assert cells(table, "| cases | ours |") == {"aorta": "3", "liver": "3", "tumour": "1"}
    absent = table.split("### Absent-structure cases (false positives)")[1]
    assert "| tumour | ours | 2 | 1 | 50.0 % | 0.15 |" in absent  # 0.3 ml and 0 ml
    assert "| liver |" not in absent


def write_other(path, rows, columns=("case", "task", "Dice", "clDice", "Tsens", "Tprec")):
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def test_compare_uses_only_the_shared_pairs(dataset, tmp_path, capsys):
    other = tmp_path / "other.csv"
    metrics = {"clDice": 0.5, "Tsens": 0.5, "Tprec": 0.5}
    write_other(
        other,
        [
            {"case": "case_0", "task": "liver", "Dice": 0.5} | metrics,
            {"case": "case_1", "task": "liver", "Dice": 0.7} | metrics,
            {"case": "case_0", "task": "aorta", "Dice": 0.9} | metrics,
            {"case": "case_9", "task": "liver", "Dice": 0.1} | metrics,
        ],
    )
    assert run(tmp_path, "--compare", str(other)) == 0
    out = capsys.readouterr().out
    assert "compared with other on 2 shared cases (3 of 9 case-task pairs of ours, 3 of 4 of theirs)" in out
    table = (tmp_path / "eval" / "table.md").read_text()
    ours, theirs = cells(table, "| Dice | ours |"), cells(table, "| Dice | other |")
    assert ours["liver"] == f"{(100 + 9600 / 112) / 2:.2f} ± {np.std([100, 9600 / 112], ddof=1):.2f}"  # not case_2
    assert theirs["liver"] == f"60.00 ± {np.std([50, 70], ddof=1):.2f}"  # not case_9
    assert "tumour" not in ours and theirs.get("aorta") == "90.00 ± 0.00"
    assert cells(table, "| HD95 | other |")["liver"] == "-"  # an older CSV without HD95


def test_compare_without_shared_pairs_or_columns_is_one_line(dataset, tmp_path, capsys):
    other = tmp_path / "other.csv"
    write_other(other, [{"case": "case_9", "task": "liver", "Dice": 0.1}])
    assert run(tmp_path, "--compare", str(other)) == 2
    error = capsys.readouterr().err
    assert error == f"error: {other}: no (case, task) pair in common with this evaluation\n"
    write_other(other, [{"case": "case_0", "Dice": 0.1}], columns=("case", "Dice"))
    assert run(tmp_path, "--compare", str(other)) == 2
    assert capsys.readouterr().err == f"error: {other}: no 'task' column\n"
    assert not (tmp_path / "eval").exists()


def test_argument_errors_are_one_line(dataset, tmp_path, capsys):
    assert run(tmp_path, "--nsd-tolerance", "-1") == 2
    assert capsys.readouterr().err == "error: --nsd-tolerance must be a finite number of mm >= 0, got -1.0\n"
    assert run(tmp_path, "--nsd-tolerance", "two") == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("error: argument --nsd-tolerance")
    assert not (tmp_path / "eval").exists()


def test_pool_counts_every_data_sets_cases_and_keeps_absent_cases_apart(tmp_path, capsys):
    columns = ("case", "task", "present", "Dice", "clDice", "pred_voxels", "pred_ml")
    for data_set in ("A", "B"):
        (tmp_path / "eval" / data_set).mkdir(parents=True)
    # both data sets name their case case_0: pooled, the liver has 2 cases
    write_other(tmp_path / "eval" / "A" / "per_case.csv", [
        {"case": "case_0", "task": "liver", "present": 1, "Dice": 0.8, "clDice": 0.9, "pred_voxels": 9, "pred_ml": 1},
        {"case": "case_0", "task": "tumour", "present": 1, "Dice": 0.5, "clDice": 0.4, "pred_voxels": 2, "pred_ml": 1},
        {"case": "case_1", "task": "tumour", "present": 0, "pred_voxels": 10, "pred_ml": 0.2},
    ], columns)  # fmt: skip
    write_other(tmp_path / "eval" / "B" / "per_case.csv", [
        {"case": "case_0", "task": "liver", "present": 1, "Dice": 0.6, "clDice": 0.7, "pred_voxels": 9, "pred_ml": 1},
        {"case": "case_1", "task": "tumour", "present": 0, "pred_voxels": 0, "pred_ml": 0.0},
    ], columns)  # fmt: skip
    assert main(["--pool", str(tmp_path / "eval")]) == 0
    table = (tmp_path / "eval" / "pooled.md").read_text()
    assert table in capsys.readouterr().out
    # liver: (80 + 60) / 2 = 70, sample std 14.14; tumour: its one present case, not lifted by the absent ones
    assert "| liver | 2 | 70.00 ± 14.14 | 80.00 ± 14.14 | 0 | - | - | - |" in table
    assert "| tumour | 1 | 50.00 ± 0.00 | 40.00 ± 0.00 | 2 | 1 | 50.0 % | 0.10 |" in table
    assert "Mean Dice over the 2 tasks with present cases: 60.00" in table


def test_pool_errors_are_one_line_and_keep_existing_output(tmp_path, capsys):
    (tmp_path / "eval").mkdir()
    assert main(["--pool", str(tmp_path / "eval")]) == 2
    assert (
        capsys.readouterr().err
        == f"error: --pool {tmp_path / 'eval'}: no */per_case.csv in it (run evaluate.py per data set first)\n"
    )
    (tmp_path / "eval" / "pooled.md").write_text("mine")
    assert main(["--pool", str(tmp_path / "eval")]) == 2
    assert (
        capsys.readouterr().err == f"error: {tmp_path / 'eval' / 'pooled.md'} exists; pass --overwrite to replace it\n"
    )
    assert (tmp_path / "eval" / "pooled.md").read_text() == "mine"
    assert main(["--pool", str(tmp_path / "eval"), "--gt", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: --pool reads existing evaluations")
    assert main([]) == 2
    assert capsys.readouterr().err == "error: --pred, --gt, --output required (or --pool DIR)\n"


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
    absent = {"case": "9", "task": "t", "present": 0, "Dice": 1.0, "clDice": 1.0, "Tsens": 1.0, "Tprec": 1.0}
    with_absent = paired_p_values([*ours, absent], [*other, absent | {"Dice": 0.0}])
    assert with_absent[("t", "Dice")] == pytest.approx(expected)  # the absent pair stays out of the test
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
    budgets = [
        {
            "method": "ours",
            "shots": 1,
            "steps": 360,
            "best_step": 216,
            "validation": [[36, 0.1], [216, 0.6], [360, 0.5]],
        },
        {"method": "SwinUNETR", "shots": 1, "steps": 720, "best_step": None, "validation": None},
    ]
    table = write_outputs(rows, budgets, tmp_path)
    assert (tmp_path / "per_case.csv").is_file() and (tmp_path / "table.md").read_text() == table
    assert "| ours | 360 | 60.00 | 216 |" in table and "| SwinUNETR | 720 | - | - |" in table
    swin_row = next(line for line in table.splitlines() if line.startswith("| Dice | SwinUNETR |"))
    sole_row = next(line for line in table.splitlines() if line.startswith("| Dice | sole-path"))
    assert swin_row.endswith("* |") and not sole_row.endswith("* |")


def test_validation_plateau_stops_after_patience_and_keeps_the_best_weights():
    """Dice per check 0, 2/3, 1, 2/3, 2/3 with patience 2: training stops after the fifth epoch (10
    steps) and keeps the weights of step 6, where SGD on (w - 100)^2 with lr 0.01 put w at 100 (1 - 0.98^6)."""
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from fewshot_experiment import ValidationPlateau

    class Toy(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def training_step(self, batch, batch_idx):
            return ((self.w - 100.0) ** 2).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

        def train_dataloader(self):
            return DataLoader(torch.zeros(2, 1), batch_size=1)  # two steps an epoch

    def fit(plateau: ValidationPlateau, min_epochs: int) -> L.Trainer:
        trainer = L.Trainer(
            max_epochs=20,
            min_epochs=min_epochs,
            callbacks=[plateau],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
        )
        trainer.fit(Toy())
        return trainer

    masks = {"none": [0, 0, 0, 0], "one": [1, 0, 0, 0], "both": [1, 1, 0, 0]}
    predictions = iter(torch.tensor([masks[k]], dtype=torch.float32) for k in ("none", "one", "both", "one", "one"))
    volume = {"image": torch.zeros(1), "labels": torch.tensor([1, 1, 0, 0]), "label_values": [(1,)]}
    plateau = ValidationPlateau(lambda image: next(predictions), [volume], every=1, patience=2)
    trainer = fit(plateau, min_epochs=1)
    assert trainer.global_step == 10 and plateau.best_step == 6
    assert [round(d, 3) for _, d in plateau.history] == [0.0, 0.667, 1.0, 0.667, 0.667]
    assert plateau.best_state["w"].item() == pytest.approx(100 * (1 - 0.98**6), rel=1e-5)

    # a stop signalled before min_epochs is withdrawn when the model improves again: Dice 0, 0, 0
    # (patience 2 signals at epoch 3), then 2/3 at epoch 4 (min_epochs), then 2/3, 2/3: stops after epoch 6
    predictions = iter(torch.tensor([masks[k]], dtype=torch.float32) for k in ("none",) * 3 + ("one",) * 3)
    plateau = ValidationPlateau(lambda image: next(predictions), [volume], every=1, patience=2)
    trainer = fit(plateau, min_epochs=4)
    assert trainer.global_step == 12 and plateau.best_step == 8


def test_few_shot_plateau_without_validation_cases_is_one_line(tmp_path, capsys):
    from fewshot_experiment import main as fewshot_main

    checkpoint = tmp_path / "joint.ckpt"
    checkpoint.write_bytes(b"")
    assert fewshot_main(["--checkpoint", str(checkpoint), "--until-plateau", "--output", str(tmp_path / "t3")]) == 2
    assert capsys.readouterr().err.startswith("error: --until-plateau needs --validation-registry")
    assert not (tmp_path / "t3").exists()
