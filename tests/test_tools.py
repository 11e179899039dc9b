"""The benchmark tools (tools/rd_curve.py, accuracy.py, bench_train.py, bench_all.py) at tiny scale on CPU.

Each tool runs for real on the bundled data and the tests assert on the JSON it writes: fields present and
values sane (PSNR above a floor, accuracies in [0, 1], sizes consistent with the files on disk).
"""
from __future__ import annotations

import gzip
import io
import json
import os
import re
import struct
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest

from inrfmt.presets import PRESETS

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / "tools"
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))

import accuracy  # noqa: E402
import bench_all  # noqa: E402
import bench_train  # noqa: E402
import plot_util  # noqa: E402
import rd_curve  # noqa: E402
import resnet  # noqa: E402

PHOTOS = ROOT / "data" / "photos"
SAMPLE = ROOT / "data" / "sample"
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def run_tool(script: str, *args, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(TOOLS / script), *map(str, args)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


# ---------------------------------------------------------------------------------------- rd_curve
@pytest.fixture(scope="module")
def rd_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("rd")
    run_tool("rd_curve.py", PHOTOS, "--square", "16", "--crops", "2", "--presets", "fast", "--steps", "20",
             "--variants", "prune-int8", "noprune-fp16", "prune-int8-f16", "--jpeg-qualities", "10", "90",
             "--webp-qualities", "50", "--avif-qualities", "50", "--device", "cpu", "--out", out)
    return out, json.loads((out / "rd.json").read_text())


def test_rd_curve_json_and_plot(rd_result):
    out, rd = rd_result
    from inrfmt.sources import open_source
    assert rd["tool"] == "rd_curve" and rd["images"] == 2 * len(open_source(str(PHOTOS)))
    assert rd["image_sizes"] == "16x16"
    assert (out / "rd.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    methods = [p["method"] for p in rd["points"]]
    assert methods.count("jpeg") == 2 and methods.count("webp") == 1
    f16_skipped = any("float_dtype" in note for note in rd["notes"])  # convert() without that option
    assert methods.count("inrfmt") == (2 if f16_skipped else 3)
    from PIL import features
    assert methods.count("avif") == (1 if features.check("avif") else 0)
    for p in rd["points"]:
        assert p["bytes_per_image"] > 0 and p["bits_per_pixel"] > 0
        assert 10.0 < p["psnr_mean"] < 100.0 and p["psnr_min"] <= p["psnr_p10"] <= p["psnr_mean"] + 1e-9
    jpeg = {p["quality"]: p for p in rd["points"] if p["method"] == "jpeg"}
    assert jpeg[90]["bytes_per_image"] > jpeg[10]["bytes_per_image"]
    assert jpeg[90]["psnr_mean"] > jpeg[10]["psnr_mean"]


def test_rd_curve_inr_points_match_their_files(rd_result):
    out, rd = rd_result
    ours = {p["variant"]: p for p in rd["points"] if p["method"] == "inrfmt"}
    for variant, p in ours.items():
        path = out / "work" / f"fast-{variant}-s20.inr"
        assert path.stat().st_size == p["file_bytes"]
        assert p["bytes_per_image"] == pytest.approx(p["file_bytes"] / rd["images"])
        # our uint8 decode and the PSNR the encoder stored differ only by the uint8 rounding
        assert abs(p["psnr_mean"] - p["psnr_index_mean"]) < 0.5
        arch = PRESETS["fast"].arch
        assert p["arch"] == f"{arch.sine_layers}x{arch.width}"
        assert ("jpeg_psnr_at_equal_bytes" in p) and isinstance(p["beats_jpeg"], bool)
    assert ours["prune-int8"]["quant"] == 8 and ours["noprune-fp16"]["quant"] == 16
    assert ours["prune-int8"]["hidden_dtype"] == "int8" and ours["noprune-fp16"]["hidden_dtype"] == "float16"
    if "prune-int8-f16" in ours:  # float16 first/last layers and biases: smaller than float32 ones
        assert ours["prune-int8-f16"]["float_dtype"] == "float16"
        assert ours["prune-int8-f16"]["file_bytes"] < ours["prune-int8"]["file_bytes"]
    assert ours["noprune-fp16"]["prune_ratio_mean"] == 0.0
    # fp16 hidden weights take twice the bytes of int8 ones
    assert ours["noprune-fp16"]["file_bytes"] > ours["prune-int8"]["file_bytes"]


def test_jpeg_interpolation_in_log_bytes():
    pts = [{"bytes_per_image": 100.0, "psnr_mean": 20.0}, {"bytes_per_image": 10000.0, "psnr_mean": 40.0}]
    assert rd_curve.jpeg_psnr_at(1000.0, pts) == pytest.approx(30.0)
    assert rd_curve.jpeg_psnr_at(50.0, pts) is None and rd_curve.jpeg_psnr_at(2e4, pts) is None
    points = [dict(method="jpeg", **pts[0]), dict(method="jpeg", **pts[1]),
              {"method": "inrfmt", "bytes_per_image": 1000.0, "psnr_mean": 31.0},
              {"method": "inrfmt", "bytes_per_image": 60.0, "psnr_mean": 15.0}]
    rd_curve.compare_with_jpeg(points)
    assert points[2]["beats_jpeg"] and points[2]["psnr_gain_vs_jpeg_db"] == pytest.approx(1.0)
    assert points[3]["beats_jpeg"] and points[3]["psnr_gain_vs_jpeg_db"] is None  # below JPEG's smallest file


# ---------------------------------------------------------------------------------------- accuracy
@pytest.fixture(scope="module")
def accuracy_result(tmp_path_factory):
    work = tmp_path_factory.mktemp("acc")
    run_tool("accuracy.py", "--data", SAMPLE, "--max-train", "60", "--max-test", "30", "--epochs", "2",
             "--steps", "20", "--model", "small", "--device", "cpu", "--work", work, "--out", work / "acc.json")
    return json.loads((work / "acc.json").read_text())


def test_accuracy_json(accuracy_result):
    acc = accuracy_result
    assert acc["tool"] == "accuracy" and acc["train_images"] == 60 and acc["test_images"] == 30
    assert acc["num_classes"] == 10 and acc["image_size"] == [28, 28]
    for side in ("original", "inr"):
        assert 0.0 <= acc[side]["test_accuracy"] <= 1.0
        assert len(acc[side]["runs"]) == 1 and acc[side]["runs"][0]["train_seconds"] > 0
    assert acc["accuracy_drop_points"] == pytest.approx(
        100 * (acc["original"]["test_accuracy"] - acc["inr"]["test_accuracy"]))
    f = acc["inr_file"]
    assert f["file_bytes"] == Path(f["path"]).stat().st_size
    assert f["bytes_per_image"] == pytest.approx(f["file_bytes"] / 60)
    assert 10.0 < f["psnr_mean"] < 100.0 and abs(f["psnr_mean"] - f["psnr_index_mean"]) < 0.5
    assert f["hidden_dtype"] == "int8" and acc["raw_bytes_per_image"] == 28 * 28 * 3


def test_stratified_split_is_deterministic_and_disjoint():
    labels = np.repeat(np.arange(4), 10)
    data = accuracy.Split(np.arange(40)[:, None, None, None].repeat(3, 3).astype(np.uint8), labels,
                          list("abcd"), "test")
    train, test = accuracy.stratified_split(data, 0.3, seed=5)
    train2, test2 = accuracy.stratified_split(data, 0.3, seed=5)
    assert np.array_equal(test.images, test2.images) and np.array_equal(train.labels, train2.labels)
    assert len(test) == 12 and np.bincount(test.labels).tolist() == [3, 3, 3, 3]
    assert not set(train.images[:, 0, 0, 0]) & set(test.images[:, 0, 0, 0])


def test_read_idx_roundtrip_and_bad_magic(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    good = tmp_path / "x-images-idx3-ubyte.gz"
    with gzip.open(good, "wb") as f:
        f.write(struct.pack(">IIII", 2051, 2, 3, 4) + images.tobytes())
    assert np.array_equal(accuracy.read_idx(good, 2051), images)
    with pytest.raises(plot_util.ToolError, match="magic 2049"):
        accuracy.read_idx(good, 2049)
    short = tmp_path / "short-idx3-ubyte"
    short.write_bytes(struct.pack(">IIII", 2051, 2, 3, 4) + images.tobytes()[:-1])
    with pytest.raises(plot_util.ToolError, match="header says"):
        accuracy.read_idx(short, 2051)


# -------------------------------------------------------------------------------------- bench_train
def bench(*args) -> dict:
    buf = io.StringIO()
    with redirect_stdout(buf):
        bench_train.main([*map(str, args)])
    return json.loads(buf.getvalue().strip().splitlines()[-1])


@pytest.fixture(scope="module")
def train_rows(tmp_path_factory):
    work = tmp_path_factory.mktemp("train")
    common = ["--data", SAMPLE, "--max-images", "40", "--size", "16", "--model", "small", "--batch-size", "8",
              "--steps", "2", "--warmup", "1", "--device", "cpu", "--encode-steps", "10", "--work", work,
              "--out", work / "train.jsonl"]
    rows = {}
    for pipeline, workers in (("gpu-raw", 0), ("inr", 0), ("torch", 1), ("nvjpeg", 0), ("dali", 1)):
        rows[pipeline] = bench("--pipeline", pipeline, "--workers", workers, *common)
    rows["inr-data-only"] = bench("--pipeline", "inr", "--data-only", *common)
    return work, rows


def test_bench_train_runs_every_pipeline_on_cpu(train_rows):
    work, rows = train_rows
    for name in ("gpu-raw", "inr", "torch", "inr-data-only"):
        r = rows[name]
        assert r["status"] == "ok", r
        assert r["img_per_s"] > 0 and r["seconds"] > 0 and r["images"] == 40 and r["unique_images"] == 40
        assert r["epoch_seconds"] == pytest.approx(r["images"] / r["img_per_s"])
        assert r["env"]["device"] == "cpu" and r["size"] == 16 and r["batch_size"] == 8
    for name in ("gpu-raw", "inr", "torch"):
        assert rows[name]["mode"] == "train" and np.isfinite(rows[name]["final_loss"])
    assert rows["inr-data-only"]["mode"] == "data-only" and rows["inr-data-only"]["final_loss"] is None
    assert rows["inr"]["inr_bytes_per_image"] == pytest.approx(Path(rows["inr"]["inr_file"]).stat().st_size / 40)
    assert rows["torch"]["jpeg_quality"] == 90 and rows["torch"]["jpeg_bytes_per_image"] > 0
    # no CUDA here: nvjpeg says so; DALI is not installed in CI (if it ever is, it must run CPU-only)
    assert rows["nvjpeg"]["status"] == "unavailable" and "CUDA" in rows["nvjpeg"]["reason"]
    assert rows["dali"]["status"] in ("unavailable", "ok")
    lines = (work / "train.jsonl").read_text().splitlines()
    assert len(lines) == 6 and all(json.loads(x)["tool"] == "bench_train" for x in lines)


def test_bench_train_plot(train_rows, tmp_path):
    work, _ = train_rows
    png = tmp_path / "train.png"
    bench_train.main(["--plot", str(work / "train.jsonl"), "--png", str(png)])
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_random_crop_flip_is_a_padded_crop_or_its_mirror():
    import torch
    batch = torch.arange(4 * 1 * 6 * 6, dtype=torch.float32).reshape(4, 1, 6, 6) + 1
    out = plot_util.random_crop_flip(batch, 2, torch.Generator().manual_seed(0))
    assert out.shape == batch.shape
    padded = torch.nn.functional.pad(batch, (2, 2, 2, 2))
    for b in range(4):
        windows = [padded[b, :, y:y + 6, x:x + 6] for y in range(5) for x in range(5)]
        assert any(torch.equal(out[b], w) or torch.equal(out[b], w.flip(-1)) for w in windows)
    assert torch.equal(plot_util.random_crop_flip(batch, 2, torch.Generator().manual_seed(0)), out)


def test_resnet18_matches_torchvision_layout():
    import torch
    model = resnet.resnet18(1000, 224)
    assert sum(p.numel() for p in model.parameters()) == 11_689_512  # torchvision's resnet18
    assert resnet.resnet18(10, 32)(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="unknown model"):
        resnet.build_model("vgg", 10, 32)


# ---------------------------------------------------------------------------------------- bench_all
def test_bench_all_renders_measured_tables(rd_result, accuracy_result, train_rows, tmp_path):
    out, rd = rd_result
    _, rows = train_rows
    md = tmp_path / "B.md"
    md.write_text("intro\n" + "".join(f"<!-- BEGIN cpu-{t} -->\nold\n<!-- END cpu-{t} -->\n"
                                      for t in ("summary", "rd", "accuracy", "train")) + "outro\n")
    bundle = {"tool": "bench_all", "plan": "cpu", "env": plot_util.environment("cpu"), "failures": [],
              "seconds": {"total": 1.0}, "commands": {"rd": ["python tools/rd_curve.py x"], "accuracy": ["a"],
                                                      "train": ["t"]},
              "rd": rd, "accuracy": accuracy_result, "train": list(rows.values())}
    (tmp_path / "bench_all.json").write_text(json.dumps(bundle))
    assert bench_all.main(["--render", str(tmp_path / "bench_all.json"), "--md", str(md)]) == 0
    text = md.read_text()
    assert "old" not in text and text.startswith("intro\n") and text.endswith("outro\n")
    jpeg10 = next(p for p in rd["points"] if p["method"] == "jpeg" and p["quality"] == 10)
    assert f"| JPEG | q10 | {jpeg10['bytes_per_image']:.0f} |" in text
    assert f"{100 * accuracy_result['inr']['test_accuracy']:.2f} %" in text
    assert f"{rows['gpu-raw']['img_per_s']:,.0f}" in text and "unavailable:" in text
    assert (tmp_path / "rd.png").is_file() and (tmp_path / "train.png").is_file()
    # a markdown file without the markers is refused with a message naming it
    bare = tmp_path / "bare.md"
    bare.write_text("nothing\n")
    with pytest.raises(plot_util.ToolError, match="bare.md"):
        bench_all.main(["--render", str(tmp_path / "bench_all.json"), "--md", str(bare)])


# ------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("script,args,expected", [
    ("rd_curve.py", ["/nonexistent/images"], "/nonexistent/images"),
    ("accuracy.py", ["--test-fraction", "1.5"], "--test-fraction"),
    ("bench_train.py", ["--pipeline", "torch", "--batch-size", "0"], "--batch-size"),
    ("bench_all.py", ["--cpu", "--only", "speed"], "--only"),
])
def test_bad_arguments_give_one_line_errors(script, args, expected):
    proc = run_tool(script, *args, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and "Traceback" not in proc.stderr


@pytest.mark.parametrize("plan_name", ["cpu", "gpu"])
def test_every_planned_command_parses(plan_name, tmp_path):
    # the GPU plan cannot run here: at least each of its commands must be one its tool accepts
    steps = bench_all.plan(plan_name, tmp_path)
    parsers = {"rd": rd_curve.parse_args, "accuracy": accuracy.parse_args, "train": bench_train.parse_args}
    assert all(steps[e] for e in bench_all.EXPERIMENTS)
    for experiment in bench_all.EXPERIMENTS:
        for argv in steps[experiment]:
            args = parsers[experiment](argv)
            assert getattr(args, "device") == steps["device"]
    pipelines = {argv[argv.index("--pipeline") + 1] for argv in steps["train"]}
    assert pipelines == set(bench_train.PIPELINES)
    # tools/gpu_check.sh's train stage keeps the runs the training-speed targets compare, at each size.
    kept = [a for a in steps["train"] if bench_all.pipeline_spec(a) in ("gpu-raw", "inr", "torch:1")]
    assert plan_name != "gpu" or len(kept) == 6


def test_accuracy_reads_a_cifar10_folder(tmp_path):
    # a CIFAR-10-format folder (pickled dicts of uint8 [N, 3*32*32] rows) holding real images of the sample
    import pickle

    from PIL import Image
    images, labels = [], []
    for k, folder in enumerate(sorted(p for p in SAMPLE.iterdir() if p.is_dir())[:4]):
        for path in sorted(folder.iterdir())[:6]:
            img = np.asarray(Image.open(path).convert("RGB").resize((32, 32)))
            images.append(img.transpose(2, 0, 1).reshape(-1))
            labels.append(k)
    data, labels = np.stack(images), np.array(labels)
    test_rows = np.arange(len(labels)) % 3 == 0
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    for name, rows in (("data_batch_1", ~test_rows), ("test_batch", test_rows)):
        with open(root / name, "wb") as f:
            pickle.dump({b"data": data[rows], b"labels": labels[rows].tolist()}, f, protocol=2)
    buf = io.StringIO()
    with redirect_stdout(buf):
        acc = accuracy.main(["--cifar10", str(root), "--epochs", "1", "--steps", "5", "--device", "cpu",
                             "--work", str(tmp_path / "work")])
    assert acc["train_images"] == int((~test_rows).sum()) and acc["test_images"] == int(test_rows.sum())
    assert acc["image_size"] == [32, 32] and acc["num_classes"] == 4 and acc["dataset"] == "cifar10"
    assert 0.0 <= acc["inr"]["test_accuracy"] <= 1.0 and acc["inr_file"]["bytes_per_image"] > 0


# ------------------------------------------------------------------------------------ gpu_check.sh
def test_gpu_check_script_runs_its_stages_and_writes_outputs(tmp_path):
    # The one-call GPU script, as a smoke run on this machine: quick sizes, CPU where there is no CUDA (the
    # GPU tests skip, the decode benchmark runs the kernel in triton's interpreter).
    # It must run each stage, log each exit code and kernel compile count, write its JSON and the JUnit
    # report under $OUT and exit 0 when all pass.
    import xml.etree.ElementTree as ET

    out = tmp_path / "out"
    env = dict(ENV, OUT=str(out), PYTHON=sys.executable, GPU_CHECK_STAGES="pytest decode encode",
               GPU_CHECK_QUICK="1", GPU_CHECK_TRITON_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run(["bash", str(TOOLS / "gpu_check.sh")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=400)
    log = (out / "gpu_check.log").read_text()
    assert proc.returncode == 0, log[-3000:]
    for stage in ("pytest_gpu", "bench_decode", "bench_encode"):
        assert f"== {stage}: exit 0" in log, log[-3000:]
        assert re.search(rf"== {stage}: exit 0 after \d+ s, 0 kernel compiles \(0 in all\)", log), log[-3000:]
    assert "gpu_check finished with status 0" in log and "torch" in log and "expected triton 3.6" in log
    assert sorted(p.name for p in out.iterdir()) == ["bench_decode.json", "bench_encode.jsonl", "gpu_check.log",
                                                    "pytest_gpu.xml"]
    suite = ET.parse(out / "pytest_gpu.xml").getroot()[0]
    assert int(suite.get("tests")) >= 20 and len(suite) == int(suite.get("tests"))  # every GPU test, skipped here
    decode = json.loads((out / "bench_decode.json").read_text())
    configs = {(r["arch"], r["backend"], r["config"]) for r in decode["decode"]}
    assert {("4x40", "torch", "default"), ("4x40", "torch", "compact"), ("10x28", "triton", "default"),
            ("4x40", "triton", "compact")} <= configs
    assert all(r["img_per_s"] > 0 and r["max_abs_err_vs_torch"] <= 5e-4 for r in decode["decode"])
    layouts = {(r["arch"], r["path"]): r for r in decode["load"]}
    assert layouts[("10x40", "default")]["layout"] == "compact"
    assert layouts[("10x40", "default")]["bank_over_file_bytes"] <= 1.1 < layouts[("10x40", "dense")][
        "bank_over_file_bytes"]
    import bench_decode

    table = bench_decode.render(decode)
    assert "| 4x40 | 12x12 | 4 | torch | compact |" in table and "bank ≤ 1.1× file: met" in table
    assert "NOT met" not in table
    encode = [json.loads(line) for line in (out / "bench_encode.jsonl").read_text().splitlines()]
    assert encode and encode[0]["img_steps_per_s"] > 0
    # A failing stage is logged and turns the exit status to 1 without stopping the others.
    env["GPU_CHECK_STAGES"] = "nonsense encode"
    proc = subprocess.run(["bash", str(TOOLS / "gpu_check.sh")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=400)
    log = (out / "gpu_check.log").read_text()
    assert proc.returncode == 1 and "unknown stage nonsense" in log and log.count("== bench_encode: exit 0") == 2


def test_bench_decode_exits_nonzero_past_the_error_tolerance(monkeypatch, tmp_path):
    # The kernel in triton's interpreter against the fp32 torch path: within 5e-4, not within 1e-9.
    import bench_decode

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(bench_decode, "QUICK_CASES", [(2, 12, 6, 2)])
    argv = ["--quick", "--only", "decode", "--device", "cpu", "--no-sweep", "--seconds", "0.01"]
    assert bench_decode.cli(argv + ["--out", str(tmp_path / "ok.json")]) == 0
    assert bench_decode.cli(argv + ["--out", str(tmp_path / "bad.json"), "--max-abs-err", "1e-9"]) == 1
    result = json.loads((tmp_path / "bad.json").read_text())
    assert any(r["backend"] == "triton" and r["max_abs_err_vs_torch"] > 1e-9 for r in result["decode"])
    assert bench_decode.accuracy_failures(result, 1e-9) and not bench_decode.accuracy_failures(result)


def test_bench_prior_reference_from_takes_only_a_run_on_the_same_crops(tmp_path):
    import bench_prior

    doc = dict(preset="rapid-inr-cifar10", size=32, n=32, crop_seed=1, device="cpu", photos="/x/data/photos/*/*.jpg")
    earlier = dict(doc, photos="/y/data/photos/*/*.jpg", date="d", reference={"steps": 15000, "psnr": 30.7})
    path = tmp_path / "earlier.json"
    path.write_text(json.dumps(earlier))
    assert bench_prior.earlier_reference(path, doc) == (earlier["reference"], {"file": str(path), "date": "d"})
    for key, value in (("n", 16), ("device", "cuda"), ("photos", "/y/other/*/*.jpg")):
        path.write_text(json.dumps(dict(earlier, **{key: value})))
        with pytest.raises(SystemExit, match=f"{key}"):
            bench_prior.earlier_reference(path, doc)
    for text in ("not json", json.dumps({k: v for k, v in earlier.items() if k != "reference"})):
        path.write_text(text)
        with pytest.raises(SystemExit, match="earlier.json"):
            bench_prior.earlier_reference(path, doc)


def test_train_priors_learns_step_sizes_on_top_of_the_shipped_prior(tmp_path, monkeypatch):
    import train_priors
    from PIL import Image

    from inrfmt.prior import Prior

    gradient = np.linspace(0, 255, 96 * 96 * 3).reshape(96, 96, 3)
    photos = [Image.fromarray(((gradient * (k + 1)) % 256).astype(np.uint8)) for k in range(3)]
    monkeypatch.setattr(train_priors, "load_photos", lambda directory: photos)  # instead of the manifest's files
    log = tmp_path / "log.json"
    train_priors.main(["--photos", str(tmp_path), "--preset", "fast", "--steps", "1", "--crops", "16",
                       "--step-sizes", "only", "--out", str(tmp_path), "--log", str(log)])
    learned, shipped = Prior.load(tmp_path / "fast.prior"), Prior.builtin("fast")
    assert all(np.array_equal(learned.theta0[k], shipped.theta0[k]) for k in shipped.theta0)
    assert learned.lr_scale is not None and not all((v == 1).all() for v in learned.lr_scale.values())
    assert json.loads(log.read_text())[0]["step_sizes"] == "only"
