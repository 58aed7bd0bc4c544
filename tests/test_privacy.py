"""Privacy at the cut (issue 18): the inversion attack is real, the defences do what
they say in every place that trains the head, and the floor rules out what it should."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from cloud_backend.session import CloudSession, SessionConfig
from edge_sdk import zoo
from edge_sdk.decision.cost_model import Choice
from edge_sdk.decision.policy import CostModelPolicy
from edge_sdk.hello import hello_frame
from edge_sdk.optim import OptimizerConfig, build_optimizer, set_lr
from edge_sdk.pipeline import EdgePipeline
from edge_sdk.privacy.defences import CutDefence, distance_correlation
from edge_sdk.privacy.floor import PrivacyFloor, PrivacyProfile, exclusions
from edge_sdk.privacy.measure import PrivacyConfig, measure
from edge_sdk.runtime.eager import EagerRuntime
from edge_sdk.training import TrainConfig, build_local
from schemas import codecs
from schemas import frames as fr
from tests.decision_inputs import L, make


def wire(frame):
    return fr.decode(fr.encode(fr.Envelope(frame=frame))).frame


# -- defences ---------------------------------------------------------------


def test_distance_correlation_matches_the_dcor_package():
    dcor = pytest.importorskip("dcor")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=g, dtype=torch.float64)
    for z in (torch.randn(40, 3, generator=g, dtype=torch.float64), torch.tanh(x[:, :2]) + 0.1 * x[:, 2:4] ** 2):
        ours = float(distance_correlation(x, z, eps=0.0))
        ref = float(dcor.distance_correlation(x.numpy(), z.numpy()))
        assert ours == pytest.approx(ref, rel=1e-6, abs=1e-9)
    assert float(distance_correlation(x, 3 * x + 1, eps=0.0)) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("text", ["none", "noise=0.5", "nopeek=0.25", "noise=1+nopeek=2"])
def test_defence_labels_parse_back(text):
    d = CutDefence.parse(text)
    assert d.label == text and CutDefence.parse(d.label) == d
    assert d.active == (text != "none")


@pytest.mark.parametrize("text", ["noise", "noise=-1", "dp=1", "noise=nan", "noise=1+blur=2"])
def test_bad_defences_are_clear_errors(text):
    with pytest.raises(ValueError, match="defence"):
        CutDefence.parse(text)


def test_noise_is_relative_to_the_first_batch_then_fixed_and_leaves_the_global_rng_alone():
    feats = 7.0 * torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    rms = float(feats.pow(2).mean().sqrt())
    state = torch.get_rng_state()
    noise = CutDefence(noise=0.5).noise_source(2)
    noisy = noise(feats)
    assert torch.equal(torch.get_rng_state(), state)  # dropout masks and batch order unchanged
    assert float((noisy - feats).std()) == pytest.approx(0.5 * rms, rel=0.03)
    # a head that grows its features does not grow the noise with them
    assert float((noise(10 * feats) - 10 * feats).std()) == pytest.approx(0.5 * rms, rel=0.03)
    plain = torch.ones(3)
    assert CutDefence().noise_source(0)(plain) is plain


def test_sequential_split_with_defences_equals_centralized_training_with_them():
    """K = 0, lossless codec: the pipeline's NoPeek (its penalty gradient added to
    the cloud's) and noise give exactly the update of centralized training of
    ``CE(tail(z + noise)) + nopeek x dcor(x, z)``, the loss the privacy
    measurement trains with."""
    point, defence = 2, CutDefence(noise=0.3, nopeek=0.5)
    opt = OptimizerConfig(name="sgd", lr=0.05, momentum=0.9, schedule="constant", epochs=1)
    spec = zoo.build("digits_cnn", seed=0)
    pipe = EdgePipeline(
        EagerRuntime(spec.model.head(point), name_map=spec.model.head_name_map(point)),
        point=point,
        optimizer=opt,
        codec="fp32",
        grad_codec="fp32",
        staleness=0,
        defence=defence,
        defence_seed=5,
    )
    cloud = CloudSession(1, SessionConfig(shared_rng=True))
    (ack,) = cloud.handle(wire(hello_frame(spec, point=point, codec="fp32", staleness=0, optimizer=opt, batch_size=16)))
    assert ack.accepted
    g = torch.Generator().manual_seed(1)
    data = [(torch.rand(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(6)]
    torch.manual_seed(7)
    for x, y in data:
        feats = pipe.start_step(x, y, epoch=0)
        (grads,) = [r for r in cloud.handle(wire(feats)) if isinstance(r, fr.Gradients)]
        pipe.on_gradients(wire(grads))

    central = zoo.build("digits_cnn", seed=0)
    head, tail = central.model.head(point), central.model.tail(point)
    c_opt = build_optimizer(central.model.parameters(), opt)
    noise = defence.noise_source(5)
    torch.manual_seed(7)
    central.model.train()
    for x, y in data:
        set_lr(c_opt, opt.lr_at(0))
        c_opt.zero_grad()
        z = head(x)
        loss, _ = central.loss(tail(noise(z)), y)
        (loss + defence.penalty(x, z)).backward()
        c_opt.step()
    ref = central.model.state_dict()
    split = spec.model.state_dict()
    for k in ref:
        if int(k.split(".")[1]) < point:
            torch.testing.assert_close(split[k].float(), ref[k].float(), rtol=1e-5, atol=1e-5, msg=f"{k} diverged")
    # and the defence did change training: without it the head ends elsewhere
    plain = zoo.build("digits_cnn", seed=0)
    assert not torch.allclose(plain.model.state_dict()["blocks.0.0.weight"], split["blocks.0.0.weight"])


def test_noise_reaches_the_wire_and_eval_features_too():
    spec = zoo.build("digits_cnn", seed=0)
    head = spec.model.head(1)
    opt = OptimizerConfig(name="sgd", lr=0.05, epochs=1)
    pipe = EdgePipeline(EagerRuntime(head), point=1, optimizer=opt, codec="fp32", defence=CutDefence(noise=1.0))
    x, y = torch.rand(16, 1, 8, 8), torch.zeros(16, dtype=torch.int64)
    spec.model.eval()
    with torch.no_grad():
        clean = head(x)
    sent = codecs.decode_tensor(wire(pipe.eval_features(x, y, epoch=0, batch=0)).tensor)
    rms = float(clean.pow(2).mean().sqrt())
    assert float((sent - clean).std()) == pytest.approx(rms, rel=0.1)


# -- the attack ---------------------------------------------------------------


def test_the_inversion_attack_is_real_and_deeper_cuts_reveal_less():
    report = measure(PrivacyConfig("digits_cnn", "digits", points=[1, 4], codecs=("int8",), epochs=3, attack_steps=400))
    by_point = {m.point: m for m in report.measurements}
    chance = report.baseline.psnr_db
    assert by_point[1].attack.psnr_db > chance + 6  # far better than answering the mean image
    assert by_point[1].attack.ssim > report.baseline.ssim + 0.2
    assert by_point[4].attack.psnr_db < by_point[1].attack.psnr_db - 2
    assert by_point[1].test_accuracy > 0.8
    assert report.public_samples + len(report.examples) and report.private_samples == 512
    doc = report.to_dict()
    assert doc["kind"] == "splitreplay-privacy-profile" and len(doc["results"]) == 2
    json.dumps(doc)


def test_privacy_command_writes_the_profile_and_pictures(tmp_path):
    out = tmp_path / "priv"
    cmd = [sys.executable, "-m", "edge_sdk", "privacy", "--points", "1", "--codec", "int8", "--epochs", "1"]
    proc = subprocess.run(
        [*cmd, "--attack-steps", "50", "--defence", "none", "--defence", "noise=0.5", "--out", str(out), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    profile = PrivacyProfile.load(out / "privacy.json")
    assert set(profile.psnr_db) == {(1, "int8", "none"), (1, "int8", "noise=0.5")}
    assert (out / "privacy.png").stat().st_size > 10_000 and (out / "reconstructions.png").stat().st_size > 5_000
    assert "chance (the mean public input)" in proc.stdout
    bad = subprocess.run([*cmd[:4], "--points", "9"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "not interior cuts" in bad.stderr and "Traceback" not in bad.stderr


# -- the floor ----------------------------------------------------------------


def _profile(tmp_path, rows, model="digits_cnn"):
    path = tmp_path / "privacy.json"
    results = [{"point": p, "codec": c, "defence": d, "psnr_db": v} for (p, c, d), v in rows.items()]
    path.write_text(json.dumps({"kind": "splitreplay-privacy-profile", "model": model, "dataset": "digits", "results": results}))
    return path


def test_the_floor_rules_out_leaky_and_unmeasured_cuts(tmp_path):
    rows = {(1, "int8", "none"): 22.0, (2, "int8", "none"): 20.0, (3, "int8", "none"): 18.0, (3, "fp32", "none"): 18.3}
    profile = PrivacyProfile.load(_profile(tmp_path, rows))
    out = exclusions(
        PrivacyFloor.parse("psnr=19"),
        profile,
        model="digits_cnn",
        defence="none",
        points=[1, 2, 3, 4],
        codec_labels=["int8", "fp32"],
        num_blocks=5,
    )
    assert set(out) == {(1, "int8"), (2, "int8"), (1, "fp32"), (2, "fp32"), (4, "int8"), (4, "fp32")}
    assert "22.0 dB > floor 19 dB" in out[(1, "int8")] and "not measured" in out[(4, "fp32")]
    # another defence has no measurement: everything but training alone goes
    other = exclusions(
        PrivacyFloor(max_psnr_db=19),
        profile,
        model="digits_cnn",
        defence="noise=1",
        points=[1, 3, 5],
        codec_labels=["int8"],
        num_blocks=5,
    )
    assert set(other) == {(1, "int8"), (3, "int8")}
    depth = exclusions(
        PrivacyFloor.parse("depth=3"), None, model="x", defence="none", points=[1, 2, 3], codec_labels=["int8"], num_blocks=5
    )
    assert set(depth) == {(1, "int8"), (2, "int8")}
    with pytest.raises(ValueError, match="measured mnist1d_cnn"):
        exclusions(
            PrivacyFloor(19.0),
            PrivacyProfile.load(_profile(tmp_path, rows, model="mnist1d_cnn")),
            model="digits_cnn",
            defence="none",
            points=[1],
            codec_labels=["int8"],
            num_blocks=5,
        )
    with pytest.raises(ValueError, match="needs --privacy-profile"):
        exclusions(PrivacyFloor(19.0), None, model="digits_cnn", defence="none", points=[1], codec_labels=["int8"], num_blocks=5)


@pytest.mark.parametrize("text", ["psnr", "psnr=x", "depth=1.5", "depth=-1", "ssim=0.3"])
def test_bad_floors_are_clear_errors(text):
    with pytest.raises(ValueError, match="privacy-floor"):
        PrivacyFloor.parse(text)


def test_bad_profiles_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        PrivacyProfile.load(tmp_path / "missing.json")
    (tmp_path / "x.json").write_text("{]")
    with pytest.raises(ValueError, match="not a readable JSON"):
        PrivacyProfile.load(tmp_path / "x.json")
    (tmp_path / "y.json").write_text(json.dumps({"kind": "something else"}))
    with pytest.raises(ValueError, match="not a privacy profile"):
        PrivacyProfile.load(tmp_path / "y.json")


def test_the_engine_never_picks_an_excluded_cut_and_says_privacy_decided():
    inputs = make(100)  # a fast link: p=1 wins on speed
    free = CostModelPolicy(allowed_points=range(1, L)).decide(inputs, None, inputs.remaining_steps)
    assert free.choice.point == 1
    excluded = {(1, c): f"p=1 {c}: attack PSNR 22.0 dB > floor 19 dB" for c in codecs.LABELS}
    policy = CostModelPolicy(allowed_points=range(1, L), excluded=excluded)
    d = policy.decide(inputs, None, inputs.remaining_steps)
    assert d.choice.point != 1
    assert "privacy, not speed, decided" in d.reason and "attack PSNR 22.0 dB" in d.reason
    # the current choice falling under the floor is a required switch
    kept = policy.decide(inputs, Choice(1, "int8", 2), inputs.remaining_steps)
    assert kept.switch and kept.required and kept.choice.point != 1
    # when the excluded cut would not have won, nothing is said about privacy
    slow = make(2)
    assert "privacy" not in policy.decide(slow, None, slow.remaining_steps).reason


def test_a_run_starts_within_the_floor_and_a_fixed_cut_below_it_is_refused(tmp_path):
    rows = {
        (p, c, "none"): v
        for p, v in ((1, 22.0), (2, 20.0), (3, 18.0), (4, 16.0))
        for c in ("fp32", "fp16", "int8", "int8c", "int4")
    }
    path = str(_profile(tmp_path, rows))
    auto = build_local(TrainConfig(privacy_profile=path, privacy_floor="psnr=19"))
    assert auto.point == 3  # the default cut (2) is too leaky: the nearest deeper allowed one
    assert (2, "int8") in auto.privacy_exclusions and (3, "int8") not in auto.privacy_exclusions
    with pytest.raises(ValueError, match=r"--point 1 breaks --privacy-floor psnr=19: p=1 int8: attack PSNR 22.0 dB"):
        build_local(TrainConfig(point=1, codec="int8", privacy_profile=path, privacy_floor="psnr=19"))
    alone = build_local(TrainConfig(privacy_profile=path, privacy_floor="psnr=10"))
    assert alone.point == alone.spec.model.num_blocks  # nothing is private enough: train alone
    with pytest.raises(ValueError, match="rules out every cut"):
        build_local(TrainConfig(privacy_profile=path, privacy_floor="psnr=10", allow_device_only=False))
    with pytest.raises(ValueError, match="--privacy-profile is read for --privacy-floor"):
        build_local(TrainConfig(privacy_profile=path))
    assert np.isfinite(PrivacyProfile.load(path).psnr_db[(3, "int8", "none")])
