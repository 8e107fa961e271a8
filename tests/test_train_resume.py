"""Robustness of training runs: SIGKILL mid-training and mid-checkpoint-write, SIGTERM
(preemption), the NaN policy and restoring a checkpoint onto a different mesh.

Every run is `python main.py --config ...` (through tests/train_launcher.py) in a subprocess
(the real entry point, the real signal delivery), on a tiny model and a small generated demo
data set, logging every step to metrics.jsonl. Interruptions happen at precise points through
fault-injection hooks of the training loop (`TrainHooks`), which tests/train_launcher.py
installs from QILIN_TEST_KILL_AT / QILIN_TEST_NAN_AT. The interrupted-and-resumed runs are
compared with one uninterrupted run of the same config: subprocesses share the environment and
a persistent compilation cache, so the comparison is exact (bit-identical losses, gradient
norms and final parameters).
"""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest

from tests import train_helpers as H

KILL = "QILIN_TEST_KILL_AT"
NAN = "QILIN_TEST_NAN_AT"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return H.make_data(tmp_path_factory.mktemp("train_data"))


@pytest.fixture(scope="module")
def curriculum(data_dir, tmp_path_factory):
    """An uninterrupted run of the two-stage config: (config dict, run dir, rows)."""
    root = tmp_path_factory.mktemp("reference")
    raw = H.base_config(data_dir, root / "runs")
    p = H.run_main(H.write_config(root / "cfg.yaml", raw))
    assert p.returncode == 0, p.stderr[-4000:]
    run = root / "runs" / "run"
    rows = H.read_metrics(run)
    assert [(r["stage"], r["step"]) for r in rows] == [("stage1", i) for i in range(1, 7)] + [
        ("stage2", i) for i in range(1, 7)
    ]
    assert all(r["finite"] for r in rows)
    return raw, run, rows


def test_profile_steps_write_a_trace(data_dir, tmp_path):
    """train.profile_steps [2, 3] traces steps 2-3 of each stage into <run>/<stage>/profile;
    the run itself is unchanged (every step logged and finite)."""
    raw = H.base_config(data_dir, tmp_path / "runs", steps=(4, None), every_steps=100)
    raw["train"] = {"profile_steps": [2, 3]}
    p = H.run_main(H.write_config(tmp_path / "cfg.yaml", raw))
    assert p.returncode == 0, p.stderr[-4000:]
    run = tmp_path / "runs" / "run"
    traces = list((run / "stage1" / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 1000, traces
    rows = H.read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(r["finite"] for r in rows)
    assert "profiling steps 2-3" in p.stderr


def _config_copy(raw: dict, root: Path) -> Path:
    """The reference config writing to another run folder."""
    return H.write_config(root / "cfg.yaml", {**raw, "output_dir": str(root / "runs")})


def _tmp_entries(names):
    return [n for n in names if "tmp" in n]


def test_sigkill_sigterm_resume_equals_uninterrupted(curriculum, tmp_path):
    """One run directory, interrupted four times, each time resumed by the same command:
    A: SIGKILL after stage-1 step 5 (checkpoint 3 exists) -> resume from 3;
    B: SIGTERM after stage-1 step 6, the stage's last -> it saves 6, stops, exits 143; the
       resume has nothing left to train in stage 1 and only writes its final weights;
    C: SIGTERM after stage-2 step 3, a checkpoint step -> saved once, stops -> resume from 3;
    D: SIGKILL in the middle of writing stage-2 checkpoint 6 -> the temporary directory is
       never picked up -> resume from 3;
    E: runs to the end. The logged steps and the final parameters equal the reference's."""
    raw, ref_run, ref_rows = curriculum
    cfg = _config_copy(raw, tmp_path)
    run = tmp_path / "runs" / "run"

    def stages_summary():
        summary = json.loads((run / "train_summary.json").read_text())
        return [(s["name"], s["steps"], s["interrupted"]) for s in summary]

    # A: SIGKILL mid-training.
    p = H.run_main(cfg, **{KILL: "stage1:5:after_step"})
    assert p.returncode == -signal.SIGKILL, p.stderr[-4000:]
    assert H.checkpoint_entries(run, "stage1") == ["3"]
    assert [r["step"] for r in H.read_metrics(run)] == [1, 2, 3, 4, 5]

    # B: resume; SIGTERM (preemption) at the stage's last step: save, stop, exit 128 + 15
    # (an unfinished job to a scheduler), still naming the run folder last.
    p = H.run_main(cfg, **{KILL: "stage1:6:after_step:SIGTERM"})
    assert p.returncode == 143, p.stderr[-4000:]
    assert p.stdout.strip().splitlines()[-1].startswith("run folder: ")
    assert "training interrupted (SIGTERM) in stage stage1 at step 6" in p.stderr
    assert "stage stage1: resumed from step 3" in p.stderr
    assert H.checkpoint_entries(run, "stage1") == ["3", "6"]
    assert not (run / "stage1" / "final").exists() and not (run / "stage2").exists()
    assert stages_summary() == [("stage1", 6, "SIGTERM")]

    # C: resume (stage 1 only writes its final weights); SIGTERM at stage-2 checkpoint step 3.
    p = H.run_main(cfg, **{KILL: "stage2:3:after_step:SIGTERM"})
    assert p.returncode == 143, p.stderr[-4000:]
    assert "stage stage1: resumed from step 6" in p.stderr
    assert (run / "stage1" / "final" / "config.json").exists()
    assert H.checkpoint_entries(run, "stage2") == ["3"]
    assert not (run / "stage2" / "final").exists()
    assert stages_summary() == [("stage1", 6, None), ("stage2", 3, "SIGTERM")]

    # D: resume; SIGKILL while checkpoint 6 (the stage's final save) is half written.
    p = H.run_main(cfg, **{KILL: "stage2:6:during_save"})
    assert p.returncode == -signal.SIGKILL, p.stderr[-4000:]
    assert "stage stage1 already finished" in p.stderr
    assert "stage stage2: resumed from step 3" in p.stderr
    names = H.checkpoint_entries(run, "stage2")
    tmp = _tmp_entries(names)
    assert [n for n in names if n not in tmp] == ["3"] and len(tmp) == 1 and tmp[0].startswith("6."), names
    # Orbax names the item directories of an unfinished step temporary as well.
    half = list((run / "stage2" / "checkpoints" / tmp[0]).glob("data*/process_0-of-1.json"))
    assert len(half) == 1, half
    with pytest.raises(json.JSONDecodeError):  # really cut mid-write
        json.loads(half[0].read_text())
    from qilin_jax.train.checkpointing import TrainCheckpointer

    ck = TrainCheckpointer(str(run / "stage2" / "checkpoints"), async_save=False)
    try:
        assert ck.latest_step() == 3
    finally:
        ck.close()

    # E: resume from 3 (not from the torn 6) and finish.
    p = H.run_main(cfg)
    assert p.returncode == 0, p.stderr[-4000:]
    assert "stage stage2: resumed from step 3" in p.stderr
    assert "6" in H.checkpoint_entries(run, "stage2")
    assert not _tmp_entries(H.checkpoint_entries(run, "stage2"))

    # Every step, whether logged once or twice (before a kill and after the resume), equals
    # the uninterrupted run exactly; so do the final parameters.
    assert H.by_step(H.read_metrics(run)) == H.by_step(ref_rows)
    got, want = H.final_params(run, "stage2"), H.final_params(ref_run, "stage2")
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_nan_policy_stop_keeps_last_good_checkpoint(curriculum, tmp_path):
    """A non-finite loss at stage-1 step 6 (the stage's last, where the final checkpoint and
    weights would be saved) with nan_policy=stop: TrainingError naming the last good
    checkpoint (3), nothing saved after the bad step (no 6, no final weights), the steps
    before it equal the reference."""
    raw, _, ref_rows = curriculum
    cfg = _config_copy(raw, tmp_path)
    run = tmp_path / "runs" / "run"
    p = H.run_main(cfg, "train.nan_policy=stop", **{NAN: "stage1:6"})
    assert p.returncode != 0
    assert "TrainingError: stage stage1: non-finite loss or gradient at step(s) [6]" in p.stderr
    ckdir = run / "stage1" / "checkpoints"
    assert f"The last good checkpoint is step 3 in {ckdir}" in p.stderr
    assert H.checkpoint_entries(run, "stage1") == ["3"]
    assert not (run / "stage1" / "final").exists() and not (run / "stage2").exists()
    rows = H.read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert not rows[-1]["finite"] and not np.isfinite(rows[-1]["loss"])
    assert H.by_step(rows[:5]) == H.by_step(ref_rows[:5])


def test_nan_policy_skip_goes_on(curriculum, tmp_path):
    """nan_policy=skip: the bad step is logged as non-finite, its update dropped, and training
    goes on with finite losses through both stages."""
    raw, _, ref_rows = curriculum
    cfg = _config_copy(raw, tmp_path)
    run = tmp_path / "runs" / "run"
    p = H.run_main(cfg, "train.nan_policy=skip", **{NAN: "stage1:2"})
    assert p.returncode == 0, p.stderr[-4000:]
    assert "skipped non-finite update(s) at step(s) [2]" in p.stderr
    rows = H.read_metrics(run)
    assert len(rows) == 12
    assert [r["finite"] for r in rows] == [True, False] + [True] * 10
    assert all(np.isfinite(r["loss"]) for i, r in enumerate(rows) if i != 1)
    assert H.by_step(rows[:1]) == H.by_step(ref_rows[:1])
    # Step 3 starts from the parameters of step 1's update (step 2 was dropped), so it differs
    # from the reference, which applied step 2.
    assert rows[2]["loss"] != ref_rows[2]["loss"]
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary[0]["skipped_nonfinite"] == 1
    assert (run / "stage2" / "final" / "config.json").exists()


@pytest.fixture(scope="module")
def fsdp8_runs(data_dir, tmp_path_factory):
    """On mesh fsdp=8 (8 devices), one stage training LLM + adapter (so parameters and
    optimizer moments are really sharded), 6 steps: an uninterrupted run, and a run stopped
    by SIGTERM after step 3 (checkpoint 3). Returns (config dict, reference run dir,
    metrics by step, stopped run dir)."""
    root = tmp_path_factory.mktemp("fsdp8")
    raw = H.base_config(data_dir, root / "ref", steps=(None, 6), batch_size=8)
    raw["mesh"] = {"data": 1, "fsdp": 8, "tensor": 1}
    p = H.run_main(H.write_config(root / "ref.yaml", raw), devices=8)
    assert p.returncode == 0, p.stderr[-4000:]
    ref_run = root / "ref" / "run"
    cfg = _config_copy(raw, root / "stopped")
    p = H.run_main(cfg, devices=8, **{KILL: "stage2:3:after_step:SIGTERM"})
    assert p.returncode == 0, p.stderr[-4000:]
    stopped = root / "stopped" / "runs" / "run"
    assert H.checkpoint_entries(stopped, "stage2") == ["3"]
    return raw, ref_run, H.by_step(H.read_metrics(ref_run)), stopped


@pytest.mark.slow
@pytest.mark.parametrize("mesh", [("data=2", "fsdp=4"), ("fsdp=4", "tensor=2")], ids=["data2_fsdp4", "fsdp4_tensor2"])
def test_restore_onto_other_mesh(fsdp8_runs, tmp_path, mesh):
    """The fsdp=8 checkpoint of step 3 resumes on another mesh shape and goes on with the
    same losses and final parameters (<= 1e-5) as the uninterrupted fsdp=8 run."""
    raw, ref_run, ref, stopped = fsdp8_runs
    cfg = _config_copy(raw, tmp_path)
    run = tmp_path / "runs" / "run"
    shutil.copytree(stopped, run)
    overrides = ["mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1"] + [f"mesh.{m}" for m in mesh]
    p = H.run_main(cfg, *overrides, devices=8)
    assert p.returncode == 0, p.stderr[-4000:]
    assert "stage stage2: resumed from step 3" in p.stderr
    got = H.by_step(H.read_metrics(run))
    assert got.keys() == ref.keys()
    for key in ref:
        for k in ("loss", "grad_norm"):
            np.testing.assert_allclose(got[key][k], ref[key][k], rtol=1e-5, err_msg=f"{key} {k}")
    a, b = H.final_params(run, "stage2"), H.final_params(ref_run, "stage2")
    for k in b:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)


@pytest.mark.slow
def test_grad_accum_step_sees_batch_size_times_accum_rows(curriculum, tmp_path):
    """data.batch_size=2 with grad_accum_steps=2 trains on the same 4 rows per optimizer step
    as the reference's batch_size=4 without accumulation (the loader batch is one step, split
    into micro-batches): same token counts, losses and final parameters (<= 1e-5)."""
    raw, ref_run, _ = curriculum
    cfg = _config_copy(raw, tmp_path)
    run = tmp_path / "runs" / "run"
    p = H.run_main(cfg, "data.batch_size=2", "stages.0.grad_accum_steps=2", "stages.1.grad_accum_steps=2")
    assert p.returncode == 0, p.stderr[-4000:]
    H.assert_same_training(run, ref_run)


def test_shared_prefix_run_equals_whole_rows(curriculum, tmp_path):
    """train.shared_prefix=true (with gradient accumulation: 2 micro-batches of 2 rows): the
    v1 stage runs its 45-token preamble once per micro-batch and matches the reference run
    (whole rows, no accumulation) in tokens, losses, gradient norms and final parameters; the
    plain-template stage (preamble = BOS only) is left as it is."""
    raw, ref_run, _ = curriculum
    cfg = _config_copy(raw, tmp_path)
    run = tmp_path / "runs" / "run"
    p = H.run_main(
        cfg,
        "train.shared_prefix=true",
        "data.batch_size=2",
        "stages.0.grad_accum_steps=2",
        "stages.1.grad_accum_steps=2",
    )
    assert p.returncode == 0, p.stderr[-4000:]
    summary = {s["name"]: s for s in json.loads((run / "train_summary.json").read_text())}
    assert summary["stage1"]["shared_prefix_tokens"] == 0
    assert summary["stage2"]["shared_prefix_tokens"] == 45
    assert summary["stage2"]["unshared_batches"] == 0
    H.assert_same_training(run, ref_run)


def _one_epoch_stage(data_dir, tmp_path) -> dict:
    """The tiny config with stage 1 only, one epoch long (num_epochs 1, no max_steps)."""
    raw = H.base_config(data_dir, tmp_path / "runs", steps=(6, None))
    raw["stages"][0].pop("max_steps")
    raw["stages"][0]["num_epochs"] = 1
    return raw


def test_packed_stage_counts_packed_rows(data_dir, tmp_path):
    """A packed stage without max_steps: the step count is one epoch of packed rows (the
    estimate from the source, here all of it), not of samples, and the stage runs exactly that
    many steps, with the schedule made for that count, without running out of data."""
    raw = _one_epoch_stage(data_dir, tmp_path)
    raw["data"].update({"packing": True, "pack_length": 256, "pack_buffer": 64})
    p = H.run_main(H.write_config(tmp_path / "cfg.yaml", raw))
    assert p.returncode == 0, p.stderr[-4000:]
    run = tmp_path / "runs" / "run"
    est = json.loads((run / "train_summary.json").read_text())[0]["packing_estimate"]
    assert est["whole_source"] and est["sampled"] == 48 and est["samples_per_row"] > 1.5
    steps = int(48 * est["rows_per_sample"]) // 4  # rows per epoch // batch_size
    assert 1 <= steps < 48 // 4  # fewer steps than one epoch of unpacked samples (12)
    rows = H.read_metrics(run)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert "data ended" not in p.stderr
    assert f"-> {steps} steps for 1" in p.stderr
    from qilin_jax.train.optim import warmup_cosine

    schedule = warmup_cosine(1.0e-3, steps, 0.03)
    assert [r["lr"] for r in rows] == pytest.approx([float(schedule(i)) for i in range(steps)], rel=1e-6)


def test_epoch_stage_with_skipped_samples_runs_its_schedule(tmp_path):
    """A stage of one epoch whose data has bad samples: they are skipped and counted, and the
    next epoch's first samples make up for them, so the stage runs all its planned steps (48
    samples / batch 4 = 12) instead of stopping when the epoch's data ends."""
    data = H.make_data(tmp_path / "data", n_align=48, n_instruct=8)
    rows = json.loads((data / "alignment.json").read_text())
    for r in rows[:2]:  # two samples whose image is missing
        (data / "images" / r["image"]).unlink()
    raw = _one_epoch_stage(data, tmp_path)
    p = H.run_main(H.write_config(tmp_path / "cfg.yaml", raw))
    assert p.returncode == 0, p.stderr[-4000:]
    run = tmp_path / "runs" / "run"
    assert [r["step"] for r in H.read_metrics(run)] == list(range(1, 13))
    assert "data ended" not in p.stderr
    summary = json.loads((run / "train_summary.json").read_text())[0]
    assert summary["data_stats"]["skipped"] == {"missing_image": 2}
