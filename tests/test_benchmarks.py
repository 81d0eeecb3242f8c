"""The benchmark scripts run and print the figures the README quotes, as one JSON object on
`--json` (tiny settings here: the figures themselves are measured by hand, not asserted)."""

from __future__ import annotations

import json
import subprocess

from conftest import PYTHON, REPO, write_camvid_subset


def run_benchmark(script: str, *args: str) -> dict:
    proc = subprocess.run([PYTHON, f"benchmarks/{script}", *args, "--json"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, f"--json must print exactly one line, got:\n{proc.stdout[-3000:]}"
    return json.loads(lines[0])


def test_loader_benchmark_reports_cached_and_naive_rates(tmp_path):
    data = write_camvid_subset(tmp_path / "camvid8", n_train=8)
    report = run_benchmark("loader.py", "--data", str(data), "--size", "128", "--samples", "8", "--naive-samples", "4", "--repeats", "2")
    assert report["img_per_s_per_core"] > 0 and report["naive_img_per_s_per_core"] > 0, report
    assert len(report["runs_img_per_s"]) == 2 and len(report["naive_runs_img_per_s"]) == 2, report


def test_train_step_benchmark_reports_each_encoder():
    report = run_benchmark("train_step.py", "--encoders", "resnet18,tu-efficientnet_b0", "--size", "64", "--batch", "2",
                           "--warmup", "1", "--steps", "2", "--threads", "1")
    assert [e["encoder"] for e in report["encoders"]] == ["resnet18", "tu-efficientnet_b0"], report
    for row in report["encoders"]:
        assert row["img_per_s"] > 0 and row["img_per_s_per_core"] > 0 and row["amp"] == "off", row


def test_ensemble_inference_benchmark_reports_with_and_without_tta():
    report = run_benchmark("ensemble_inference.py", "--size", "64", "--folds", "2", "--images", "2", "--batch", "2",
                           "--repeats", "2", "--device", "cpu")  # default TTA settings: none; hflip; flip,scale
    assert report["members"] == 2 and report["output_size"] == 256, report
    views = [r["views"] for r in report["results"]]
    assert views[0] == 1 and views[1] == 2 and views[2] > 2, report
    for row in report["results"]:
        assert row["img_per_s"] > 0 and len(row["img_per_s_runs"]) == 2, row


def test_onnx_inference_benchmark_reports_torch_and_onnxruntime():
    report = run_benchmark("onnx_inference.py", "--size", "64", "--encoder", "resnet18", "--images", "2", "--batch", "2", "--repeats", "1")
    text = json.dumps(report)
    assert "torch" in text and "onnxruntime" in text, report


def test_upernet_memory_benchmark_reports_each_encoder():
    report = run_benchmark("upernet_memory.py", "--encoders", "tu-convnext_atto,tu-swin_tiny_patch4_window7_224", "--size", "64")
    assert [r["encoder"] for r in report["rows"]] == ["tu-convnext_atto", "tu-swin_tiny_patch4_window7_224"], report
    for row in report["rows"]:
        assert 0 < row["act_fp16_gb_per_img"] < row["act_fp32_gb_per_img"] and row["max_batch_amp"] > 0, row
    assert report["rows"][0]["params_m"] == 11.0  # UPerNet over ConvNeXt-atto, 11 classes: 11.0M parameters


def test_ema_benchmark_reports_both_curves(tmp_path):
    data = write_camvid_subset(tmp_path / "camvid16", n_train=16)
    report = run_benchmark("ema.py", "--data", str(data), "--epochs", "2", "--image-size", "64", "--subset", "16", "--batch", "4",
                           "--warmup", "0")
    assert len(report["plain"]["val_miou"]) == len(report["ema"]["val_miou"]) == 2, report
    assert report["plain"]["val_miou"] != report["ema"]["val_miou"], report  # validation scored the average, not the weights

def test_pseudo_label_benchmark_reports_each_round(tmp_path):
    # threshold 0.08 < 1/12 (12 classes): every pixel is confident, so a 1-epoch ensemble still labels the test images
    report = run_benchmark("pseudo_label.py", "--subset", "16", "--test-images", "4", "--epochs", "1", "--rounds", "1", "--folds", "2",
                           "--threshold", "0.08", "--variants", "rare")
    assert report["settings"]["annotated"] == 16 and report["settings"]["test_images"] == 4, report["settings"]
    rare = report["rare_classes"]
    shares = report["pixel_share"]
    assert len(rare) == 3 and "Background" not in rare, rare
    assert max(shares[c] for c in rare) <= min(v for c, v in shares.items() if c not in rare and c != "Background"), shares
    rounds = report["variants"]["rare"]["rounds"]
    assert [r["round"] for r in rounds] == [0, 1] and report["variants"]["rare"]["error"] is None, rounds
    assert rounds[0]["confident_share"] is None and rounds[1]["confident_share"] == 1.0, rounds
    assert abs(rounds[1]["delta"] - (rounds[1]["oof_miou"] - rounds[0]["oof_miou"])) <= 1.5e-4, rounds  # each rounded to 4 places
    for r in rounds:
        assert 0 <= r["oof_miou"] <= 1 and set(r["rare_iou"]) == set(rare), r
