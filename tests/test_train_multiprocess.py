"""Two processes on localhost (jax.distributed, 4 CPU devices each) train the same steps as
one process with 8 devices.

The equivalence, and why it is built this way: the data loader shards the *sample* stream
by process (process p of n reads records p, p+n, ... and shuffles its own share), so one
process with a global batch of 2B rows would read the records in another order than two
processes with B rows each; comparing those two runs would compare different batches. The
reference is therefore one process with 8 devices whose loader is replaced by the
concatenation, in process order, of the loaders that process 0 and process 1 of a
2-process run build (make_loader(process_index=p, process_count=2)), padded to a common
bucket like the training loop pads across hosts. Its global batch holds exactly the rows of
the 2-process run's global batch, in the same order (process 0's rows are on devices 0-3,
the first half of the batch axis). Both runs use the same mesh shape (fsdp=8), so they differ
only in where the devices live: the losses, gradient norms and final parameters agree to
<= 1e-5 (float summation order across processes may differ).

The slow curriculum test uses two sequence buckets: with instruction samples of varied
length the two hosts pick different buckets in some steps, which exercises the cross-host
padding; it also preempts one host only and resumes. Timing (2 shared CPU cores): the
default test ~1 min, the slow one ~3 min (every process compiles its own programs).
"""

from __future__ import annotations

import subprocess
import time

import numpy as np
import pytest

from tests import train_helpers as H


class ConcatLoader:
    """The loaders of processes 0..n-1 of an n-process run, as one loader (rows concatenated
    in process order, padded to the longest bucket of the step)."""

    def __init__(self, make_loader, cfg, tokenizer, n: int = 2):
        self.parts = [make_loader(cfg, tokenizer, process_index=i, process_count=n) for i in range(n)]
        self.num_samples = sum(p.num_samples for p in self.parts)
        self.mismatched_steps = 0  # steps whose processes picked different buckets

    def __iter__(self):
        return self

    def __next__(self):
        from qilin_jax.data.conversation import IGNORE_INDEX

        batches = [next(p) for p in self.parts]
        lengths = {b["input_ids"].shape[1] for b in batches}
        t = max(lengths)
        self.mismatched_steps += len(lengths) > 1
        out = {}
        for k in batches[0]:
            vals = []
            for b in batches:
                v = b[k]
                if k in ("input_ids", "labels", "attention_mask", "segment_ids", "position_ids"):
                    fill = IGNORE_INDEX if k == "labels" else 0
                    v = np.concatenate([v, np.full((v.shape[0], t - v.shape[1]), fill, v.dtype)], 1)
                vals.append(v)
            out[k] = np.concatenate(vals, 0)
        return out

    def get_state(self):
        return {"parts": [p.get_state() for p in self.parts]}

    def set_state(self, state):
        for p, s in zip(self.parts, state["parts"]):
            p.set_state(s)

    def stats(self):
        return self.parts[0].stats()

    def close(self):
        for p in self.parts:
            p.close()


def _run_two_processes(cfg, *overrides, timeout=600, env1=None):
    """main.py as process 0 and 1 of a jax.distributed job on 127.0.0.1 (4 CPU devices each);
    env1: extra environment of process 1 only. Returns their (returncode, stderr)."""
    port = H.free_port()
    procs = []
    for i in range(2):
        ov = [
            *overrides,
            f"distributed.coordinator_address=127.0.0.1:{port}",
            "distributed.num_processes=2",
            f"distributed.process_id={i}",
        ]
        env = H.subprocess_env(4, **((env1 or {}) if i == 1 else {}))
        procs.append(
            subprocess.Popen(
                H.main_cmd(cfg, *ov), cwd=H.REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    out = []
    deadline = time.time() + timeout
    try:
        for p in procs:
            _, err = p.communicate(timeout=max(1, deadline - time.time()))
            out.append((p.returncode, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


def _check_ok(results):
    for i, (rc, err) in enumerate(results):
        assert rc == 0, f"process {i}:\n{err[-4000:]}"


def _reference(monkeypatch, cfg_path, out_dir):
    """The one-process, 8-device run with the concatenated loaders (in this process, whose
    8 CPU devices tests/conftest.py sets); returns the ConcatLoaders it made."""
    import jax

    from qilin_jax.config import load_config
    from qilin_jax.data import pipeline
    from qilin_jax.train.loop import run_training

    assert jax.device_count() == 8 and jax.process_count() == 1
    made = []
    orig = pipeline.make_loader

    def make_concat(cfg, tokenizer, **kw):
        made.append(ConcatLoader(orig, cfg, tokenizer))
        return made[-1]

    monkeypatch.setattr(pipeline, "make_loader", make_concat)
    cfg = load_config(str(cfg_path), [f"output_dir={out_dir}"])
    results = run_training(cfg)
    assert all(r.interrupted is None for r in results)
    return made


def _assert_same_training(mp_run, one_run, stage, n_steps):
    assert len(H.by_step(H.read_metrics(mp_run))) == n_steps
    H.assert_same_training(mp_run, one_run, stage)


def _config(tmp_path, tmp_path_factory, steps, buckets, **kw):
    data_dir = H.make_data(tmp_path_factory.getbasetemp() / "train_data_mp")
    raw = H.base_config(data_dir, tmp_path / "mp", steps=steps, buckets=buckets, **kw)
    raw["mesh"] = {"data": 1, "fsdp": 8, "tensor": 1}
    return H.write_config(tmp_path / "cfg.yaml", raw)


def test_two_processes_equal_one(tmp_path, tmp_path_factory, monkeypatch):
    """Stage 2 (LLM + adapter trainable, FSDP over both hosts' devices), 3 steps, a
    checkpoint at step 2 holding both hosts' data positions, final weights saved by both.
    The two processes run with train.shared_prefix (the v1 preamble once per batch, one
    replicated copy on every host, agreed on by both); the one-process reference runs whole
    rows (the slow test below runs both without it)."""
    cfg = _config(tmp_path, tmp_path_factory, steps=(None, 3), buckets=(128,), every_steps=2)
    results = _run_two_processes(cfg, "train.shared_prefix=true")
    _check_ok(results)
    assert all("the 45-token 'v1' preamble runs once per batch" in err for _, err in results)
    mp_run = tmp_path / "mp" / "run"
    ck = mp_run / "stage2" / "checkpoints" / "2" / "data"
    assert sorted(p.name for p in ck.glob("process_*.json")) == ["process_0-of-2.json", "process_1-of-2.json"]
    _reference(monkeypatch, cfg, tmp_path / "one")
    _assert_same_training(mp_run, tmp_path / "one" / "run", "stage2", 3)


@pytest.mark.slow
def test_two_processes_curriculum_preempted_on_one_host(tmp_path, tmp_path_factory, monkeypatch):
    """Both stages with two sequence buckets (the hosts pick different buckets in some steps:
    the cross-host padding). Process 1 alone gets SIGTERM after stage-2 step 1; logging every
    2 steps, so both hosts agree to stop at step 2, save it and exit; the same two commands
    resume and finish. The result equals the uninterrupted one-process reference."""
    cfg = _config(tmp_path, tmp_path_factory, steps=(2, 4), buckets=(96, 128), every_steps=3)
    stopped = _run_two_processes(
        cfg, "logging.every_steps=2", env1={"QILIN_TEST_KILL_AT": "stage2:1:after_step:SIGTERM"}
    )
    # Both exit 143 (128 + SIGTERM): process 0 never got the signal but stopped with process 1.
    assert [rc for rc, _ in stopped] == [143, 143], [err[-2000:] for _, err in stopped]
    mp_run = tmp_path / "mp" / "run"
    assert H.checkpoint_entries(mp_run, "stage2") == ["2"]
    ck = mp_run / "stage2" / "checkpoints" / "2" / "data"
    assert sorted(p.name for p in ck.glob("process_*.json")) == ["process_0-of-2.json", "process_1-of-2.json"]
    assert not (mp_run / "stage2" / "final").exists()
    results = _run_two_processes(cfg, "logging.every_steps=2")
    _check_ok(results)
    assert all("stage stage2: resumed from step 2" in err for _, err in results)
    made = _reference(monkeypatch, cfg, tmp_path / "one")
    assert sum(m.mismatched_steps for m in made) > 0, "no step exercised the cross-host padding"
    _assert_same_training(mp_run, tmp_path / "one" / "run", "stage2", 6)


@pytest.mark.parametrize(
    "env, dist, expect",
    [
        ({}, {}, None),  # one process, nothing detected: no jax.distributed
        ({"SLURM_NTASKS": "1"}, {}, None),
        ({"SLURM_NTASKS": "16"}, {}, {}),  # SLURM job step of 16 tasks: JAX auto-detects the rest
        (
            {"SLURM_NTASKS": "2"},
            {"local_device_ids": [0, 1, 2, 3]},
            {"local_device_ids": [0, 1, 2, 3]},
        ),  # one process per node keeps all its GPUs
        (
            {},
            {"coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 1},
            {"coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 1},
        ),
        ({}, {"enabled": "on"}, {}),  # e.g. a TPU pod slice: JAX reads the TPU metadata
        ({"SLURM_NTASKS": "16"}, {"enabled": "off"}, None),
    ],
)
def test_distributed_initialize_arguments(monkeypatch, env, dist, expect):
    """What maybe_initialize_distributed passes to jax.distributed.initialize (or whether it
    calls it at all) for configured values and detected cluster environments."""
    import jax

    from qilin_jax.config import DistributedConfig
    from qilin_jax.train import distributed

    for k in ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    calls = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    distributed.maybe_initialize_distributed(DistributedConfig(**dist))
    assert calls == ([] if expect is None else [expect])
