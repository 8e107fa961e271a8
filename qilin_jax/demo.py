"""The bundled demo: make its data, then (after training and evaluation) write its report.

`python main.py --config configs/demo.yaml` runs: prepare_demo (data, then the shipped
pretrained backbones checked and converted) -> train (stage 1, stage 2) -> eval -> chat ->
report. The report compares held-out accuracy per question type before (the weights training
starts from) and after training with chance beside it, plots the loss curves, and
writes report.json into the run folder.
"""

from __future__ import annotations

import json
import logging
import os
import time

from qilin_jax.config import RunConfig

log = logging.getLogger("qilin_jax.demo")

T0 = time.time()


def _resolve_pydicom(path: str) -> str:
    """'pydicom:CT_small.dcm' -> the path of a test file that pydicom ships."""
    if path.startswith("pydicom:"):
        from pydicom.data import get_testdata_file

        found = get_testdata_file(path.split(":", 1)[1])
        if not found:
            raise FileNotFoundError(f"pydicom ships no test file {path.split(':', 1)[1]!r}")
        return str(found)
    return path


def prepare(cfg: RunConfig) -> dict:
    """Generate the demo data (if missing) into demo.data_dir; resolve pydicom: image names."""
    global T0
    T0 = time.time()
    opts = dict(cfg.demo)
    out = opts.pop("data_dir", "data/demo/generated")
    opts.pop("targets", None)
    backbones = opts.pop("backbones", None)
    meta_path = os.path.join(out, "meta.json")
    from qilin_jax.demo_data import make_demo

    if os.path.exists(meta_path):
        meta = json.load(open(meta_path, encoding="utf-8"))
        counts = meta.get("counts", {})
        asked = {
            "seed": meta.get("seed"),
            "image_size": meta.get("image_size"),
            "n_align": counts.get("alignment"),
            "n_instruct": counts.get("instruction"),
            "n_heldout": counts.get("heldout"),
        }
        # Options the config leaves out mean generate()'s defaults: data made with other
        # values (e.g. by an earlier run with demo.n_align=...) is not the data asked for.
        import inspect

        want = {
            k: p.default
            for k, p in inspect.signature(make_demo.generate).parameters.items()
            if p.default is not inspect.Parameter.empty
        }
        want.update(opts)
        same = meta.get("generator_version") == make_demo.GENERATOR_VERSION and all(
            asked[k] == want.get(k) for k in asked
        )
        if same:
            print(f"demo data: {out} (already there)")
        else:
            meta = None
    else:
        meta = None
    if meta is None:
        t = time.time()
        kw = {
            k: v for k, v in opts.items() if k in ("seed", "n_align", "n_instruct", "n_heldout", "image_size", "n_csv")
        }
        meta = make_demo.generate(out, **kw)
        print(f"demo data: generated {meta['counts']} into {out} in {time.time() - t:.1f} s")
    if cfg.chat.get("image"):
        cfg.chat["image"] = _resolve_pydicom(cfg.chat["image"])
    if backbones:
        meta["pretrained"] = convert_backbones(cfg, backbones)
    return meta


def convert_backbones(cfg: RunConfig, backbones: str) -> str:
    """Check the shipped backbones against their sha256 manifest, convert them with the
    converter a user runs on the real CLIP and LLaMA-2 (`python -m converters to-jax --src
    LLAMA --vision CLIP`) into <run folder>/pretrained, and point model.checkpoint at it;
    returns that folder. A file that does not match its checksum stops the run, named."""
    from converters.to_jax import to_jax
    from qilin_jax.config import resolve_path
    from qilin_jax.demo_data.pretrain_backbones import LLM_DIR, VISION_DIR, verify_backbones

    t = time.time()
    root = resolve_path(backbones)
    verify_backbones(root)
    dst = os.path.join(cfg.run_dir, "pretrained")
    # The adapter is initialised at random (seeded): the release's stage-1 starting point.
    to_jax(
        os.path.join(root, LLM_DIR),
        dst,
        vision=os.path.join(root, VISION_DIR),
        seed=cfg.seed,
        overwrite=True,
        log=lambda m: log.info("%s", m),
    )
    cfg.model.checkpoint = dst
    print(f"pretrained backbones: {root} (sha256 checked) -> {dst} in {time.time() - t:.1f} s")
    return dst


def _evaluate_initial(cfg: RunConfig) -> dict:
    """Held-out accuracy of the weights training starts from (model.checkpoint: the pretrained
    backbones with a fresh adapter; else the random initialisation), for the before/after table."""
    from flax import nnx

    from qilin_jax.infer.config import EvalConfig
    from qilin_jax.infer.evaluate import run_eval
    from qilin_jax.models import QilinMedVL
    from qilin_jax.runtime import load_model, load_tokenizer

    if cfg.model.checkpoint:
        model = load_model(cfg, cfg.model.checkpoint)
    else:
        model = QilinMedVL(cfg.model_config(), rngs=nnx.Rngs(cfg.seed))
    ecfg = EvalConfig(**{**cfg.eval, "output_dir": os.path.join(cfg.run_dir, "eval_before"), "progress": False})
    return run_eval(model, load_tokenizer(cfg), ecfg)


def plot_losses(metrics_jsonl: str, png: str) -> str | None:
    """Plot per-stage loss curves from metrics.jsonl into a PNG; returns its path."""
    if not os.path.exists(metrics_jsonl):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_stage: dict = {}
    for line in open(metrics_jsonl, encoding="utf-8"):
        r = json.loads(line)
        by_stage.setdefault(r["stage"], []).append((r["step"], r["loss"]))
    fig, axes = plt.subplots(1, len(by_stage), figsize=(4.5 * len(by_stage), 3.5), squeeze=False)
    for ax, (stage, pts) in zip(axes[0], by_stage.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1)
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def report(cfg: RunConfig, outputs: dict) -> dict:
    """Write report.json (+ loss_curves.png) into the run folder and print the summary table."""
    after = outputs.get("eval")
    if after is None:
        raise RuntimeError("the demo report needs the `eval` task to run before `report`")
    before = _evaluate_initial(cfg)
    targets = cfg.demo.get("targets", {"location": 0.9, "modality": 0.9})
    by_type = after["heldout_accuracy_by_type"]
    chance = after["chance_by_type"]
    checks = {f"{q}>={t}": bool(by_type.get(q, 0.0) >= t) for q, t in targets.items()}
    rest = {q: by_type[q] / chance[q] for q in by_type if q not in targets}
    elapsed = time.time() - T0
    train = outputs.get("train") or []
    rep = {
        "heldout_accuracy": after["heldout_accuracy"],
        "heldout_accuracy_by_type": by_type,
        "chance_by_type": chance,
        "before_training": {
            "heldout_accuracy": before["heldout_accuracy"],
            "heldout_accuracy_by_type": before["heldout_accuracy_by_type"],
        },
        "targets": targets,
        "targets_met": checks,
        "times_chance_other_types": rest,
        "n_by_type": after.get("n_by_type"),
        "stages": [
            {
                "name": s["name"],
                "steps": s["steps"],
                "seconds": round(s["seconds"], 1),
                "first_loss": s["losses"][0] if s["losses"] else None,
                "last_loss": s["losses"][-1] if s["losses"] else None,
            }
            for s in train
        ],
        "chat_answer": outputs.get("chat"),
        "wall_seconds": round(elapsed, 1),
    }
    png = plot_losses(os.path.join(cfg.run_dir, "metrics.jsonl"), os.path.join(cfg.run_dir, "loss_curves.png"))
    rep["loss_plot"] = png
    path = os.path.join(cfg.run_dir, "report.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(rep, f, ensure_ascii=False, indent=2)
    lines = ["", "held-out accuracy (demo task)", f"{'type':<10}{'before':>8}{'after':>8}{'chance':>8}"]
    for q in by_type:
        lines.append(f"{q:<10}{before['heldout_accuracy_by_type'].get(q, 0):>8.3f}{by_type[q]:>8.3f}{chance[q]:>8.3f}")
    lines.append(f"{'overall':<10}{before['heldout_accuracy']:>8.3f}{after['heldout_accuracy']:>8.3f}")
    lines.append("targets: " + ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in checks.items()))
    lines.append(f"total time {elapsed / 60:.1f} min")
    lines.append(f"report: {path}")
    if png:
        lines.append(f"loss curves: {png}")
    for s in train:
        lines.append(f"checkpoint ({s['name']}): {s['final_dir']}")
    metrics, board = os.path.join(cfg.run_dir, "metrics.jsonl"), os.path.join(cfg.run_dir, "tensorboard")
    lines.append(f"metrics: {metrics} (TensorBoard: {board})")
    print("\n".join(lines))
    return rep
