"""The trainer, through its real command line."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from model.checkpoint import load_checkpoint
from testkit.models import TINY_TRAIN
from testkit.server import ROOT
from training.shapes import CLASSES, export_image_folder, generate
from training.state import load_state

pytestmark = pytest.mark.slow
CHANCE = 1 / len(CLASSES)


def assert_nothing_trained(result: subprocess.CompletedProcess) -> None:
    """The run stopped before loading data or taking a step (the trainer announces both)."""
    assert "training small on" not in result.stdout and "epoch 1" not in result.stdout + result.stderr


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_shapes_run_learns_above_chance_and_writes_loadable_checkpoint(tiny_run):
    checkpoint = load_checkpoint(tiny_run)
    metrics = checkpoint.manifest.training["metrics"]
    assert metrics["test_top1"] > 2 * CHANCE
    assert checkpoint.manifest.class_names == list(CLASSES)
    assert [row["epoch"] for row in read_log(tiny_run)] == [1, 2, 3, 4]
    assert (tiny_run / "train_state.pt").is_file()


def test_checkpoint_predicts_what_the_log_says(tiny_run):
    """The saved weights, evaluated afresh, reproduce the accuracy recorded for them."""
    from model.preprocess import Normalizer
    from training.data import Split
    from training.evaluate import evaluate

    checkpoint = load_checkpoint(tiny_run)
    images, labels = generate("test", 12, 64, seed=0)
    result = evaluate(checkpoint.model, Split(images, labels), Normalizer(checkpoint.manifest.preprocessing),
                      len(CLASSES), torch.device("cpu"))
    best = max(row["test_top1"] for row in read_log(tiny_run))
    assert checkpoint.manifest.training["metrics"]["test_top1"] == best
    assert result.top1 > 2 * CHANCE


def test_shapes_dataset_is_deterministic_and_splits_differ():
    train_a, _ = generate("train", 2, 32, seed=5)
    train_b, _ = generate("train", 2, 32, seed=5)
    test, _ = generate("test", 2, 32, seed=5)
    assert torch.equal(train_a, train_b)
    assert not torch.equal(train_a, test)


def test_evaluate_prints_metrics_and_writes_report(tiny_run, run_cli, tmp_path):
    result = run_cli("training", "evaluate", str(tiny_run), "--data", "shapes", "--shapes-per-class", "96",
                     "--report", str(tmp_path / "report"))
    assert "top-1" in result.stdout and "top-5" in result.stdout
    assert all(name in result.stdout for name in CLASSES)
    for png in ("training_curves.png", "confusion_matrix.png", "conv1_kernels.png", "feature_maps_conv1.png"):
        data = (tmp_path / "report" / png).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 500


def test_register_puts_checkpoint_in_model_store_and_loads_back(tiny_run, run_cli, cli_env):
    result = run_cli("training", "register", str(tiny_run))
    tag = result.stdout.strip().split()[-1]
    assert tag.startswith("cnn-classifier:")
    listing = subprocess.run([str(Path(sys.executable).parent / "bentoml"), "models", "list"],
                             env=cli_env, capture_output=True, text=True, timeout=120)
    assert tag.split(":")[1] in listing.stdout
    code = (
        "from model.store import resolve; from model.checkpoint import load_checkpoint;"
        "c = load_checkpoint(resolve('cnn-classifier:latest')[0]); print(c.manifest.weights_sha256)"
    )
    loaded = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=cli_env, capture_output=True, text=True,
                            timeout=120)
    assert loaded.stdout.strip() == load_checkpoint(tiny_run).manifest.weights_sha256, loaded.stderr


def test_interrupted_run_resumes_to_the_end(run_cli, cli_env, tmp_path, tiny_run):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "training", *TINY_TRAIN, "--epochs", "4", "--out", str(out)]
    process = subprocess.Popen(args, cwd=ROOT, env=cli_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "train_state.pt").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)  # no chance to clean up: what is on disk must be intact
    process.wait()
    epochs_before = len(read_log(out))
    assert 1 <= epochs_before < 4, "the run should have been killed mid-way"
    load_checkpoint(out)  # the checkpoint written before the kill is complete

    result = run_cli("training", "--resume", "--out", str(out))
    assert "resuming" in result.stdout
    log = read_log(out)
    assert [row["epoch"] for row in log][-1] == 4
    assert log[-1]["step"] == 4 * log[0]["step"]  # no step lost or repeated
    checkpoint = load_checkpoint(out)
    assert checkpoint.manifest.training["metrics"]["test_top1"] > 2 * CHANCE
    # tiny_run is the same run (same arguments and seed) left alone: the resumed one ends where it did
    uninterrupted = read_log(tiny_run)[-1]["test_top1"]
    assert abs(log[-1]["test_top1"] - uninterrupted) <= 0.05, (log[-1]["test_top1"], uninterrupted)


def test_time_budget_stops_on_time(run_cli, tmp_path):
    """--time-budget, not --epochs, ends the run: given 1000 epochs and 4 seconds, it stops after
    about 4 seconds of training, with the learning-rate schedule run to its end."""
    out = tmp_path / "budget"
    run_cli("training", *TINY_TRAIN, "--epochs", "1000", "--time-budget", "4", "--out", str(out), timeout=600)
    log = read_log(out)
    # The budget counts training steps and evaluations; the log's figure for an epoch is taken before
    # that epoch's evaluation, so the time that ended the run is the saved state's, not the log's.
    spent = load_state(out)["progress"]["elapsed"]
    assert 4 <= spent <= 4 + 30  # past the budget by at most a step and an evaluation (hang guard)
    assert log[-1]["elapsed"] <= spent
    assert len(log) < 1000
    # The cosine schedule ran (nearly) to its end. The last logged figure is the last step's, which started
    # up to one step before the budget ran out: a step of 0.8 s (a busy 2-core machine) leaves 10% of the
    # peak, an idle machine's ~0.05 s under 0.1%.
    assert log[-1]["lr"] < 0.1 * load_state(out)["run_config"]["lr"]
    # the checkpoint's figure is the log's at the best epoch, rounded to 10 ms
    assert load_checkpoint(out).manifest.training["seconds"] <= log[-1]["elapsed"] + 0.01


def test_torchrun_two_processes_with_gloo(cli_env, tmp_path):
    out = tmp_path / "ddp"
    torchrun = Path(sys.executable).parent / "torchrun"
    result = subprocess.run(
        [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "training", *TINY_TRAIN, "--epochs", "2",
         "--out", str(out)],
        cwd=ROOT, env={**cli_env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = load_checkpoint(out)
    assert checkpoint.manifest.training["world_size"] == 2
    log = read_log(out)
    assert len(log) == 2  # rank 0 alone writes
    # Each rank takes half of each epoch: 1152 images / 2 ranks = 576 = 18 batches of 32.
    assert log[0]["step"] == 1152 // (2 * 32)
    assert checkpoint.manifest.training["metrics"]["test_top1"] > CHANCE


def test_image_folder_with_a_corrupt_file_trains_and_counts_it(run_cli, tmp_path):
    data = tmp_path / "folder"
    export_image_folder(data, per_class=12, size=64, seed=3)
    (data / "train" / "cross" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    out = tmp_path / "run"
    result = run_cli("training", "--data", str(data), "--preset", "small", "--epochs", "1", "--batch-size", "32",
                     "--out", str(out))
    assert "skipped 1 unreadable image" in result.stdout
    manifest = load_checkpoint(out).manifest
    assert manifest.class_names == sorted(CLASSES)
    assert manifest.training["skipped_files"] == 1
    assert manifest.training["train_images"] == 12 * 12


def test_single_level_folder_is_split_reproducibly(tmp_path):
    from model.config import get_preset
    from training.data import load_dataset

    export_image_folder(tmp_path / "export", per_class=10, size=32, seed=1)
    flat = tmp_path / "export" / "train"
    prep = get_preset("cifar").preprocessing
    first = load_dataset(str(flat), prep, seed=7, show_progress=False)
    second = load_dataset(str(flat), prep, seed=7, show_progress=False)
    assert len(first.test.labels) == 12 * 2 and len(first.train.labels) == 12 * 8
    assert torch.equal(first.test.images, second.test.images)


@pytest.mark.parametrize(
    "layout, message",
    [
        ("missing", "no such directory"),
        ("empty_class", "class folders with no images: empty"),
        ("no_test_split", "no test/ or val/"),
        ("no_classes", "no class folders"),
    ],
)
def test_bad_data_gets_a_clear_error(run_cli, tmp_path, layout, message):
    root = tmp_path / "data"
    if layout != "missing":
        root.mkdir()
    if layout == "empty_class":
        export_image_folder(root, per_class=4, size=32, seed=0)
        (root / "train" / "empty").mkdir()
    if layout == "no_test_split":
        (root / "train" / "a").mkdir(parents=True)
        export_image_folder(tmp_path / "x", per_class=4, size=32, seed=0)
        os.replace(tmp_path / "x" / "train" / "cross", root / "train" / "cross")
    result = run_cli("training", "--data", str(root), "--epochs", "1", "--out", str(tmp_path / "out"), check=False)
    assert result.returncode == 2
    assert message in result.stderr


def test_unwritable_output_fails_before_training(run_cli, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a directory should be")
    result = run_cli("training", *TINY_TRAIN, "--out", str(blocker / "run"), check=False)
    assert result.returncode == 2
    assert "cannot write checkpoints" in result.stderr
    assert_nothing_trained(result)


@pytest.fixture
def full_disk(tmp_path):
    """A 64 KiB tmpfs, full after the first 64 KiB: a real ENOSPC (needs root to mount)."""
    mount_point = tmp_path / "tiny_fs"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    (mount_point / "filler").write_bytes(b"\0" * 60 * 1024)
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=True)


def test_full_disk_fails_before_training(full_disk, cli_env):
    result = subprocess.run([sys.executable, "-m", "training", *TINY_TRAIN, "--out", str(full_disk / "run")],
                            cwd=ROOT, env=cli_env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "cannot write checkpoints" in result.stderr and "No space left on device" in result.stderr
    assert_nothing_trained(result)


def test_file_size_limit_fails_before_training(cli_env, tmp_path):
    """The same refusal where mounting is not allowed: writes past RLIMIT_FSIZE fail as on a full disk."""
    import resource

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (32 * 1024, 32 * 1024))

    result = subprocess.run([sys.executable, "-m", "training", *TINY_TRAIN, "--out", str(tmp_path / "run")],
                            cwd=ROOT, env=cli_env, capture_output=True, text=True, timeout=120,
                            preexec_fn=limit_file_size)
    assert result.returncode == 2
    assert "cannot write checkpoints" in result.stderr and "File too large" in result.stderr
    assert_nothing_trained(result)


def test_the_own_photos_walkthrough_runs_as_written(run_cli, cli_env, tmp_path):
    """docs/training.md's "Your own photos, end to end": each command as the page writes it, on a folder
    of photos made here (one per class folder, no split given), with a seconds-long budget; serving the
    registered model is the server tests' business."""
    from testkit.docs import code_block

    export_image_folder(tmp_path / "my_photos", per_class=8, size=48, seed=3)
    flat = tmp_path / "my_photos"
    for split in ("train", "test"):  # the page's simplest layout: one folder per class, split by seed
        for folder in (flat / split).iterdir():
            (flat / folder.name).mkdir(exist_ok=True)
            for image in folder.iterdir():
                image.rename(flat / folder.name / f"{split}-{image.name}")
            folder.rmdir()
        (flat / split).rmdir()
    block = code_block("bash", "--data my_photos").replace("\\\n", " ").replace("--time-budget 240", "--time-budget 4")
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.startswith("python -m training")]
    assert len(commands) == 4
    for command in commands:
        result = subprocess.run([sys.executable, "-m", *command.split()[2:]], cwd=tmp_path, env=cli_env,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, command + "\n" + result.stdout + result.stderr
    assert "registered my-model:" in result.stdout
    manifest = load_checkpoint(tmp_path / "runs" / "mine").manifest
    assert manifest.class_names == sorted(CLASSES) and "atlas/atlas.json" in manifest.files
