"""Training without a split: the whole model in one place.

Two baselines use it: *centralized* training (the accuracy reference for split
training, same batches, same optimizer and schedule) and *device-only* training
(every block on the device, with the same emulated slowdown, the speed reference
for the pipeline).
"""

from __future__ import annotations

import time

import torch

from edge_sdk.optim import build_optimizer, set_lr
from edge_sdk.training import LocalSetup, TrainConfig, TrainResult, build_local


def evaluate(setup: LocalSetup, cfg: TrainConfig) -> tuple[float, float]:
    """(mean loss, accuracy) of the full model on the test split."""
    model = setup.spec.model
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for x, y in setup.test_loader(cfg):
            loss, c = setup.spec.loss(model(x), y)
            loss_sum += float(loss) * len(y)
            correct += int(c)
            count += len(y)
    return loss_sum / count, correct / count


def train_locally(cfg: TrainConfig, *, setup: LocalSetup | None = None, slowdown: float = 1.0) -> TrainResult:
    """Train the full model here; ``slowdown`` > 1 sleeps to emulate a slower device."""
    torch.manual_seed(cfg.seed)
    setup = setup or build_local(cfg)
    model = setup.spec.model
    opt_cfg = cfg.optimizer_config()
    optimizer = build_optimizer(model.parameters(), opt_cfg)
    result = TrainResult(
        point=model.num_blocks,
        codec="none",
        staleness=0,
        network="none",
        device_slowdown=slowdown,
        model=cfg.model,
        dataset=cfg.dataset,
        runtime="eager",
        error_feedback=False,
    )
    t_start = time.perf_counter()
    busy = 0.0
    steps = 0
    for epoch in range(cfg.epochs):
        model.train()
        set_lr(optimizer, opt_cfg.lr_at(epoch))
        loss_sum, correct, count = 0.0, 0, 0
        t_epoch = time.perf_counter()
        for i, (x, y) in enumerate(setup.train_loader(cfg, epoch)):
            if cfg.max_steps_per_epoch is not None and i >= cfg.max_steps_per_epoch:
                break
            t0, c0 = time.perf_counter(), time.thread_time()
            optimizer.zero_grad(set_to_none=True)
            loss, c = setup.spec.loss(model(x), y)
            loss.backward()
            optimizer.step()
            if slowdown > 1.0:  # (s-1) x CPU time, as the emulated split device does
                time.sleep((slowdown - 1.0) * (time.thread_time() - c0))
            busy += time.perf_counter() - t0
            steps += 1
            loss_sum += float(loss.detach()) * len(y)
            correct += int(c)
            count += len(y)
        result.train_s += time.perf_counter() - t_epoch
        test_loss, test_acc = evaluate(setup, cfg)
        result.history.append(
            dict(
                epoch=epoch,
                train_loss=loss_sum / count,
                train_accuracy=correct / count,
                test_loss=test_loss,
                test_accuracy=test_acc,
                wall_s=time.perf_counter() - t_start,
                steps=steps,
            )
        )
        result.train_loss, result.train_accuracy = loss_sum / count, correct / count
        result.test_loss, result.test_accuracy = test_loss, test_acc
    result.wall_s = time.perf_counter() - t_start
    result.steps, result.epochs = steps, cfg.epochs
    result.stage_ms = {"edge": 1e3 * busy / steps if steps else 0.0}
    return result
