"""`python -m edge_sdk train`: train against a running cloud backend.

The training flags are defined once here and reused by ``emulate``.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from collections.abc import Callable, Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

from edge_sdk.training import CliOption, TrainConfig, TrainResult


def add_training_arguments(p: argparse.ArgumentParser, *, exclude: tuple[str, ...] = ()) -> None:
    """One flag per `TrainConfig` field that has a `CliOption`, with its default and
    choices from the dataclass (the one source of both); ``exclude``: fields that
    mean nothing for this command."""
    g = p.add_argument_group("training")
    for f in fields(TrainConfig):
        opt = f.metadata.get("cli")
        if not isinstance(opt, CliOption) or f.name in exclude:
            continue
        name = f.name.replace("_", "-")
        if isinstance(f.default, bool):  # an on/off switch: --no-NAME turns a default-on field off
            flag = opt.flag or (f"--no-{name}" if f.default else f"--{name}")
            g.add_argument(flag, dest=f.name, action="store_false" if f.default else "store_true", help=opt.help)
            continue
        flag = opt.flag or f"--{name}"
        if opt.recipe:
            default, shown = None, "from the dataset's recipe"
        else:  # %(default)s: a command's set_defaults shows too
            default, shown = f.default, opt.shown or ("none" if f.default is None else "%(default)s")
        kwargs: dict[str, Any] = dict(dest=f.name, default=default, help=f"{opt.help} (default: {shown})")
        kwargs["type"] = opt.parse or _scalar_type(str(f.type))
        if opt.choices is not None:
            kwargs["choices"] = list(opt.choices())
        if opt.metavar is not None:
            kwargs["metavar"] = opt.metavar
        g.add_argument(flag, **kwargs)
    out = p.add_argument_group("output")
    out.add_argument("--json", dest="json_path", help="write the run's report as JSON here (default: not written)")
    out.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar; one line per epoch")
    out.add_argument(
        "-v", "--verbose", action="store_true", help="print each decision-engine switch as it happens, with its reason"
    )


def _scalar_type(annotation: str) -> Callable[[str], Any]:
    """int, float or str from a field's (string) annotation."""
    for name, kind in (("float", float), ("int", int)):
        if name in annotation:
            return kind
    return str


def setup_logging(args: argparse.Namespace) -> None:
    """Warnings always; with ``-v`` the engine's switches too, one line each."""
    import logging

    logging.basicConfig(format="%(message)s", stream=sys.stderr)
    logging.getLogger("edge_sdk").setLevel(logging.INFO if getattr(args, "verbose", False) else logging.WARNING)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The run's configuration: every `TrainConfig` field the parser has, by name;
    model, epochs, batch size, optimizer and lr from the dataset's recipe unless given."""
    setup_logging(args)
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    return TrainConfig.from_recipe(**given)


def resume_point(cfg: TrainConfig) -> tuple[TrainConfig, Any]:
    """With ``--resume``: the saved run's configuration (the connection options from
    this command line) and its newest device checkpoint; else ``(cfg, None)``.
    Raises ValueError (for the user) when there is nothing to resume."""
    if not cfg.resume:
        return cfg, None
    from edge_sdk.device_checkpoint import RESUME_OVERRIDES, DeviceCheckpoint

    assert cfg.checkpoint_dir is not None  # TrainConfig.validate
    checkpoint = DeviceCheckpoint.load(cfg.checkpoint_dir)
    resumed = checkpoint.config(**{k: getattr(cfg, k) for k in RESUME_OVERRIDES})
    print(
        f"resuming session {checkpoint.manifest['session']} from its checkpoint of step {checkpoint.step} "
        f"(epoch {checkpoint.epoch + 1}/{resumed.epochs}, batch {checkpoint.batch}); "
        "the run's options come from the checkpoint",
        file=sys.stderr,
    )
    return resumed, checkpoint


def write_json(result: TrainResult, path: str | None) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(result.to_json())


def summary_table(result: TrainResult) -> str:
    alone = result.num_blocks and result.point == result.num_blocks
    rows = [
        ("model / dataset", f"{result.model} / {result.dataset}"),
        ("partition point", f"{result.point}" + (" (device-only: every block on the device)" if alone else "")),
        ("codec, staleness K", f"{result.codec}, {result.staleness}" + ("" if result.error_feedback else " (no error feedback)")),
        ("network, device slowdown", f"{result.network}, {result.device_slowdown:g}x"),
        ("epochs, steps", f"{result.epochs}, {result.steps}"),
        ("test accuracy", f"{100 * result.test_accuracy:.2f} %"),
        ("train loss (last epoch)", f"{result.train_loss:.4f}"),
        ("wall time", wall_text(result)),
        ("bytes up / down", f"{result.bytes_up / 1e6:.2f} MB / {result.bytes_down / 1e6:.2f} MB"),
    ]
    for k, v in result.stage_ms.items():
        rows.append((f"stage {k}", f"{v:.2f} ms/step"))
    rows += decision_rows(result)
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(w)}  {v}" for k, v in rows)


def wall_text(result: TrainResult) -> str:
    """The whole run's time, start-up included, and where it went."""
    total = result.prepare_s + result.wall_s
    rest = result.wall_s - result.startup_s - result.train_s  # evaluation, epoch ends, shutdown
    rate = result.steps / result.train_s if result.train_s else 0.0
    return (
        f"{total:.1f} s: profiling {result.prepare_s:.1f} s, start-up {result.startup_s:.1f} s, "
        f"training {result.train_s:.1f} s ({rate:.1f} steps/s), evaluation and the rest {max(0.0, rest):.1f} s"
    )


def decision_rows(result: TrainResult) -> list[tuple[str, str]]:
    """The decision timeline in a few lines: switches, share of steps per
    configuration, the last reason, and what training alone would have cost."""
    rows: list[tuple[str, str]] = []
    history = result.partition_history
    switches = [h for h in history if h.get("switch")]
    if history and history[0].get("reason") != "fixed by the user":
        late = sum(1 for h in switches if h["step"] > 50)
        rows.append(("engine switches", f"{len(switches)} ({late} after step 50)"))
    total = sum(result.steps_by_choice.values())
    if total:
        alone = f"p={result.num_blocks} fp32 K=0"
        shares = sorted(result.steps_by_choice.items(), key=lambda kv: -kv[1])
        rows.append(
            (
                "steps per configuration",
                ", ".join(f"{'device-only' if k == alone else k} {100 * n / total:.0f} %" for k, n in shares),
            )
        )
    decided = [h for h in history if not h.get("waiting") and h.get("reason") != "fixed by the user"]
    if decided:
        reason = decided[-1]["reason"]
        rows.append(("last decision", f"step {decided[-1]['step']}: {reason[:200]}{'...' if len(reason) > 200 else ''}"))
    est = result.device_only_estimate
    trained_alone = result.steps_by_choice.get(f"p={result.num_blocks} fp32 K=0", 0)
    if est and result.train_s > 0 and trained_alone < total:
        ratio = est["train_s"] / result.train_s
        verdict = (
            f"splitting was {ratio:.1f}x faster" if ratio >= 1 else f"training alone would have been {1 / ratio:.1f}x faster"
        )
        how = "measured step" if est["measured"] else "profiled blocks"
        rows.append(
            (
                "device alone (predicted)",
                f"{est['step_ms']:.1f} ms/step ({how}), {est['train_s']:.1f} s for these steps vs {result.train_s:.1f} s "
                f"here: {verdict}",
            )
        )
    return rows


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", required=True, help="cloud backend URL, e.g. ws://cloud.example:8765 or wss://...")
    add_training_arguments(p)


def run(args: argparse.Namespace) -> int:
    from edge_sdk.client import EdgeClient, run_client
    from edge_sdk.progress import ProgressBar
    from edge_sdk.session import Stopped, TrainingError
    from edge_sdk.training import build_local

    cfg = config_from_args(args)
    client: EdgeClient | None = None
    clients: list[EdgeClient] = []
    stopped = False
    with stop_signals(clients) as caught:
        try:
            cfg.validate()
            cfg, checkpoint = resume_point(cfg)
            setup = build_local(cfg)
            with ProgressBar(cfg, enabled=args.progress, total=setup.total_steps(cfg)) as bar:
                client = EdgeClient(
                    args.server,
                    cfg,
                    setup=setup,
                    progress=bar.update,
                    on_epoch=bar.epoch,
                    status=bar.status,
                    resume_from=checkpoint,
                )
                clients.append(client)
                result = run_client(client)
        except (TrainingError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        except (KeyboardInterrupt, Stopped):
            stopped = True
    if stopped:
        hint = f"python -m edge_sdk train --server {args.server} --checkpoint-dir {cfg.checkpoint_dir} --resume"
        return interrupted(client, cfg, args.json_path, caught, resume_hint=hint)
    return finish(result, client, cfg, args.json_path)


def finish(result: TrainResult, client: Any, cfg: TrainConfig, json_path: str | None) -> int:
    """Summary, report, model: the run is done, so a file that cannot be written is one line, not a traceback."""
    print(summary_table(result))
    try:
        write_json(result, json_path)
        save_trained_model(client, cfg, result)
    except OSError as exc:
        print(f"error: cannot write {exc.filename or 'the output'}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


def save_trained_model(client: Any, cfg: TrainConfig, result: TrainResult) -> None:
    """``--save-model``: the whole model (the session brought it to the device) and its config."""
    if not cfg.save_model:
        return
    from edge_sdk.model_file import save_model

    paths = save_model(
        client.session.setup.spec,
        cfg.save_model,
        dataset=cfg.dataset,
        test_accuracy=result.test_accuracy,
        epochs=len(result.history),
    )
    print(f"model saved: {', '.join(str(p) for p in paths)}")


@contextlib.contextmanager
def stop_signals(clients: list[Any] | None = None) -> Iterator[list[int]]:
    """Ctrl-C (SIGINT) and SIGTERM. The first asks the run in ``clients`` to stop
    at the next batch (`EdgeClient.request_stop`: the steps in flight finish and a
    checkpoint is agreed there, so ``--resume`` loses nothing); a second signal, or
    one before the run exists, is a KeyboardInterrupt where the program is. The
    list names the signals received, in order."""
    caught: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        caught.append(signum)
        name = signal.Signals(signum).name
        if len(caught) == 1 and clients and clients[-1].request_stop(name):
            print(f"{name}: stopping after the steps in flight (again to stop at once)", file=sys.stderr)
            return
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield caught
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def interrupted(client: Any, cfg: TrainConfig, json_path: str | None, caught: list[int], *, resume_hint: str = "") -> int:
    """One line instead of a traceback, the partial report written; 130 (SIGINT) or 143 (SIGTERM).
    ``resume_hint``: the command that carries on, said when a checkpoint is on disk.
    A second signal while this writes is ignored."""
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _report_interrupted(client, cfg, json_path, caught, resume_hint)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _report_interrupted(client: Any, cfg: TrainConfig, json_path: str | None, caught: list[int], resume_hint: str) -> int:
    name = signal.Signals(caught[0]).name if caught else "SIGINT"
    code = 143 if name == "SIGTERM" else 130
    result = client.partial_result(name) if client is not None else None
    if result is None:
        print(f"interrupted ({name}) before training started", file=sys.stderr)
    else:
        try:
            write_json(result, json_path)
        except OSError as exc:
            print(f"interrupted ({name}); cannot write the report {json_path}: {exc.strerror or exc}", file=sys.stderr)
            return code
        done = len(result.history)
        where = f"interrupted ({name}) after epoch {done}/{cfg.epochs}, step {result.steps}"
        line = f"{where}; report written to {json_path}" if json_path else f"{where} (no --json report asked for)"
        saved = result.checkpoints.get("step", -1) if cfg.checkpoint_dir else -1
        if saved >= 0 and resume_hint:
            line += f"; checkpoint of step {saved} kept: resume with `{resume_hint}`"
        print(line, file=sys.stderr)
    return code
