"""Command lines: --help explains, bad input is a clear message, signals stop cleanly."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from edge_sdk.emulation.cli import cloud_process


@pytest.mark.parametrize(
    "argv, expect",
    [
        (["-m", "edge_sdk", "--help"], "emulate"),
        (["-m", "edge_sdk", "train", "--help"], "--staleness"),
        (["-m", "edge_sdk", "emulate", "--help"], "--network"),
        (["-m", "cloud_backend", "serve", "--help"], "--max-frame-bytes"),
    ],
)
def test_help_explains(argv, expect):
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and expect in proc.stdout


def test_serve_stops_cleanly_on_sigterm_and_sigint():
    for sig in (signal.SIGTERM, signal.SIGINT):
        with cloud_process() as (proc, _port):
            proc.send_signal(sig)
            out, _ = proc.communicate(timeout=30)
            assert proc.returncode == 0
            assert "shutting down" in out


def test_serve_rejects_bad_settings_without_a_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "cloud_backend", "serve", "--tls-cert", "x.pem"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and "--tls-key" in proc.stderr and "Traceback" not in proc.stderr


def test_train_with_a_bad_model_is_a_clear_error():
    proc = subprocess.run(
        [sys.executable, "-m", "edge_sdk", "train", "--server", "ws://127.0.0.1:9", "--model", "nope"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    # refused by the parser, which lists the zoo's models
    assert proc.returncode == 2 and "'nope'" in proc.stderr and "digits_cnn" in proc.stderr
    assert "Traceback" not in proc.stderr


def _parse(*argv: str):
    from edge_sdk.cli import build_parser

    return build_parser().parse_args(list(argv))


def test_every_training_option_comes_from_the_config_with_its_default_and_choices():
    from dataclasses import fields

    from edge_sdk.cli import build_parser
    from edge_sdk.training import TrainConfig

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    for command in ("train", "emulate"):
        actions = {a.dest: a for a in sub[command]._actions}
        for f in fields(TrainConfig):
            opt = f.metadata.get("cli")
            if opt is None or (command == "emulate" and f.name in ("token", "tls_ca")):
                assert opt is not None or f.name not in actions, f.name
                continue
            action = actions[f.name]
            if not isinstance(f.default, bool):
                assert "(default: " in action.help, (command, f.name)
    emulate = {a.dest for a in sub["emulate"]._actions}
    assert "token" not in emulate and "tls_ca" not in emulate  # emulate starts its own server
    codec = next(a for a in sub["train"]._actions if a.dest == "codec")
    assert codec.choices == ["auto", "fp32", "fp16", "bf16", "int8", "int8c", "int4", "topk"]


def test_the_dataset_picks_its_recipe_unless_told_otherwise():
    from edge_sdk.train_cli import config_from_args
    from edge_sdk.training import build_local

    cfg = config_from_args(_parse("emulate", "--dataset", "mnist1d"))
    assert (cfg.model, cfg.epochs, cfg.batch_size) == ("mnist1d_cnn", 30, 32)
    assert build_local(cfg).spec.input_shape == (1, 40)  # the failure this replaces: a digits model on mnist1d
    cfg = config_from_args(_parse("train", "--server", "ws://x", "--dataset", "mnist1d", "--epochs", "3", "--lr", "0.1"))
    assert (cfg.model, cfg.epochs, cfg.lr) == ("mnist1d_cnn", 3, 0.1)
    cfg = config_from_args(_parse("emulate"))
    assert (cfg.model, cfg.epochs, cfg.device_slowdown, cfg.point, cfg.staleness) == ("digits_cnn", 20, 4.0, None, None)
    cfg = config_from_args(_parse("emulate", "--point", "device", "--staleness", "3", "--no-device-only"))
    assert (cfg.point, cfg.staleness, cfg.allow_device_only) == ("device", 3, False)


def test_one_device_vocabulary_across_commands():
    for command in (["profile"], ["emulate"]):
        assert _parse(*command, "--device", "pi4").device == "raspberry-pi-4"
    args = _parse("profile")
    assert (args.model, args.batch_size) == ("digits_cnn", 32)  # the same defaults as train
    proc = subprocess.run(
        [sys.executable, "-m", "edge_sdk", "profile", "--device", "toaster"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and "toaster" in proc.stderr and "pi4" in proc.stderr and "Traceback" not in proc.stderr


def test_profile_offers_the_cuts_train_accepts():
    from edge_sdk import zoo
    from edge_sdk.profile import format_table, profile_model

    prof = profile_model(zoo.build("digits_cnn"), 8, repeats=1, warmup=0)
    L = zoo.build("digits_cnn").model.num_blocks
    line = format_table(prof, 1.0, None).splitlines()[-1]
    assert line == f"cut points for --point: {list(range(1, L))}, or {L} / 'device' (the whole model on the device)"


def test_summary_shows_the_decision_timeline_and_the_cost_of_training_alone():
    from edge_sdk.train_cli import summary_table
    from edge_sdk.training import TrainResult

    result = TrainResult(point=5, num_blocks=5, steps=100, train_s=10.0, wall_s=12.0, test_accuracy=0.9)
    result.partition_history = [
        {"step": 0, "point": 2, "codec": "int8", "staleness": 2, "switch": False, "reason": "initial choice p=2"},
        {"step": 60, "point": 5, "codec": "fp32", "staleness": 0, "switch": True, "reason": "switching p=2 int8 K=2 -> p=5"},
    ]
    result.steps_by_choice = {"p=2 int8 K=2": 60, "p=5 fp32 K=0": 40}
    result.device_only_estimate = {"step_ms": 50.0, "train_s": 5.0, "measured": True}
    text = summary_table(result)
    assert "5 (device-only: every block on the device)" in text
    assert "1 (1 after step 50)" in text
    assert "p=2 int8 K=2 60 %, device-only 40 %" in text
    assert "step 60: switching p=2 int8 K=2 -> p=5" in text
    assert (
        "50.0 ms/step (measured step), 5.0 s for these steps vs 10.0 s here: training alone would have been 2.0x faster" in text
    )


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stopped_run_says_where_it_stopped_and_writes_its_report(tmp_path, sig, code):
    import json

    out = tmp_path / "run.json"
    cmd = [sys.executable, "-m", "edge_sdk", "emulate", "--network", "none", "--device-slowdown", "1"]
    cmd += ["--point", "2", "--epochs", "50", "--max-steps-per-epoch", "20", "--no-progress", "--json", str(out)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    lines = []
    for line in proc.stderr:  # wait for the first finished epoch, then stop the run
        lines.append(line)
        if line.startswith("epoch 1/50:"):
            proc.send_signal(sig)
            break
    _, rest = proc.communicate(timeout=120)
    err = "".join(lines) + rest
    assert proc.returncode == code, err[-2000:]
    name = "SIGINT" if sig == signal.SIGINT else "SIGTERM"
    assert f"interrupted ({name}) after epoch" in err and f"report written to {out}" in err
    assert "Traceback" not in err
    report = json.loads(out.read_text())
    assert report["interrupted"] == name and len(report["history"]) >= 1 and report["steps"] >= 20


@pytest.mark.slow
def test_ctrl_c_keeps_a_checkpoint_at_the_step_it_stopped_and_resume_finishes_the_run(tmp_path):
    """With --checkpoint-dir, Ctrl-C finishes the steps in flight, agrees a checkpoint
    at that very step and says how to resume; --resume then trains the remaining epochs."""
    import json

    ckpt, out = tmp_path / "ck", tmp_path / "run.json"
    base = [sys.executable, "-m", "edge_sdk", "emulate", "--network", "none", "--device-slowdown", "1", "--no-progress"]
    cmd = [*base, "--point", "2", "--staleness", "2", "--epochs", "6", "--max-steps-per-epoch", "20"]
    cmd += ["--checkpoint-dir", str(ckpt), "--checkpoint-every", "0", "--json", str(out)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if line.startswith("epoch 2/6:"):
            proc.send_signal(signal.SIGINT)
            break
    _, rest = proc.communicate(timeout=120)
    err = "".join(lines) + rest
    assert proc.returncode == 130, err[-2000:]
    assert "SIGINT: stopping after the steps in flight" in err and "Traceback" not in err
    report = json.loads(out.read_text())
    stopped_at = report["steps"]
    assert report["interrupted"] == "SIGINT" and report["checkpoints"]["step"] == stopped_at  # saved where it stopped
    assert f"checkpoint of step {stopped_at} kept: resume with `python -m edge_sdk emulate" in err
    resumed = subprocess.run(
        [*base, "--checkpoint-dir", str(ckpt), "--resume", "--json", str(out)], capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"from its checkpoint of step {stopped_at}" in resumed.stderr and "epoch 6/6:" in resumed.stderr
    final = json.loads(out.read_text())
    assert final["steps"] == 6 * 20 and [h["epoch"] for h in final["history"]] == list(range(6))


@pytest.mark.slow
def test_a_saved_model_evaluates_to_the_accuracy_the_run_reported(tmp_path):
    import json

    model, report = tmp_path / "m.safetensors", tmp_path / "run.json"
    cmd = [sys.executable, "-m", "edge_sdk", "emulate", "--network", "none", "--device-slowdown", "1", "--point", "2"]
    cmd += ["--codec", "fp32", "--staleness", "1", "--epochs", "2", "--max-steps-per-epoch", "15", "--no-progress"]
    cmd += ["--save-model", str(model), "--json", str(report)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"model saved: {model}, {model.with_suffix('.json')}" in proc.stdout
    reported = json.loads(report.read_text())["test_accuracy"]
    proc = subprocess.run(
        [sys.executable, "-m", "edge_sdk", "evaluate", "--model-file", str(model)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = proc.stdout.strip()
    assert line.startswith("digits_cnn on digits test (")
    accuracy = float(line.split("accuracy ")[1].split(" %")[0]) / 100
    assert abs(accuracy - reported) < 1e-3, (line, reported)  # the split eval at fp32 is the whole model's
    bad = subprocess.run(
        [sys.executable, "-m", "edge_sdk", "evaluate", "--model-file", str(tmp_path / "nope.safetensors")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 1 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr
