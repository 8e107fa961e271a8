"""The tasks main.py runs from a config, in the order of `tasks:`."""

from __future__ import annotations

import json
import logging
import os

from qilin_jax.config import RunConfig
from qilin_jax.runtime import load_model, load_tokenizer

log = logging.getLogger("qilin_jax")


def interrupted_exit_code(out: dict) -> int:
    """The exit status of a run whose training was interrupted: 128 + the signal number, as a
    shell reports a process killed by it (SIGTERM 143, SIGINT 130), so that schedulers and
    `&&` chains see an unfinished job (Kubernetes restarts it, a job array does not mark it
    done); 0 for a run that was not interrupted."""
    info = out.get("interrupted")
    if not info:
        return 0
    import signal

    sig = getattr(signal, str(info.get("signal")), None)  # "signal on another process": SIGTERM
    return 128 + int(sig if isinstance(sig, signal.Signals) else signal.SIGTERM)


def run(cfg: RunConfig, *, train_hooks=None) -> dict:
    """Run the config's tasks; returns what each produced (`interrupted`: where training was
    stopped by a signal, after which no further task runs). `train_hooks`: see
    `qilin_jax.train.loop.TrainHooks`."""
    out: dict = {}
    os.makedirs(cfg.run_dir, exist_ok=True)
    for task in cfg.tasks:
        if task == "prepare_demo":
            from qilin_jax import demo

            out[task] = demo.prepare(cfg)
        elif task == "train":
            from qilin_jax.train.loop import run_training

            results = run_training(cfg, hooks=train_hooks)
            out[task] = [r.__dict__ for r in results]
            summary = [{k: v for k, v in r.__dict__.items() if k != "losses"} for r in results]
            import jax

            if jax.process_index() == 0:  # one writer in multi-host runs
                with open(os.path.join(cfg.run_dir, "train_summary.json"), "w") as f:
                    json.dump(summary, f, indent=2, default=str)
            stopped = [r for r in results if r.interrupted]
            if stopped:
                # A preempted run stops here: the later tasks would evaluate, chat with or
                # report on a half-trained model. main.py exits non-zero (interrupted_exit_code).
                out["interrupted"] = {
                    "stage": stopped[-1].name,
                    "step": stopped[-1].steps,
                    "signal": stopped[-1].interrupted,
                }
                log.warning(
                    "training interrupted (%s) in stage %s at step %d; the checkpoint is "
                    "saved: rerun the same command to resume; tasks after `train` skipped",
                    stopped[-1].interrupted,
                    stopped[-1].name,
                    stopped[-1].steps,
                )
                return out
        elif task == "eval":
            from qilin_jax.infer.config import EvalConfig, section_from_dict
            from qilin_jax.infer.evaluate import run_eval

            # Evaluation output goes into the run folder unless the config says otherwise.
            ecfg = section_from_dict(EvalConfig, {"output_dir": os.path.join(cfg.run_dir, "eval"), **cfg.eval}, "eval")
            out[task] = run_eval(load_model(cfg, tensor_parallel=ecfg.tensor_parallel), load_tokenizer(cfg), ecfg)
        elif task == "chat":
            from qilin_jax.infer.chat import run_chat
            from qilin_jax.infer.config import ChatConfig, section_from_dict

            ccfg = section_from_dict(ChatConfig, cfg.chat, "chat")
            out[task] = run_chat(load_model(cfg, tensor_parallel=ccfg.tensor_parallel), load_tokenizer(cfg), ccfg)
        elif task == "batch":
            from qilin_jax.infer.batch import run_batch
            from qilin_jax.infer.config import BatchConfig, section_from_dict

            bcfg = section_from_dict(BatchConfig, cfg.batch, "batch")
            out[task] = run_batch(load_model(cfg, tensor_parallel=bcfg.tensor_parallel), load_tokenizer(cfg), bcfg)
        elif task == "serve":
            out[task] = run_serve_task(cfg)
        elif task == "report":
            from qilin_jax import demo

            out[task] = demo.report(cfg, out)
    return out


def run_serve_task(cfg: RunConfig) -> dict:
    """The `serve` task: the OpenAI-compatible server over `serve.checkpoint` until interrupted."""
    from qilin_jax.infer.config import section_from_dict
    from qilin_jax.infer.sharded import prepare
    from qilin_jax.serve.api import run_serve
    from qilin_jax.serve.config import ServeConfig

    scfg = section_from_dict(ServeConfig, cfg.serve, "serve")
    scfg.validate("serve")
    if not os.path.exists(os.path.join(scfg.checkpoint, "config.json")):
        raise SystemExit(
            f"serve.checkpoint {scfg.checkpoint!r} has no checkpoint (config.json): run the demo "
            "first (python main.py --config configs/demo.yaml) or set serve.checkpoint=PATH"
        )
    model, mesh = prepare(load_model(cfg, scfg.checkpoint, tensor_parallel=scfg.tensor_parallel), scfg.tensor_parallel)
    return run_serve(model, load_tokenizer(cfg), scfg, mesh=mesh)
