"""Batch inference: a JSONL/JSON/CSV of (id, image, question) in, a JSONL of answers out.

Rows are answered `batch_size` at a time with the KV-cache `generate` (one compiled program
per prompt-length bucket: the last batch is padded with repeats so its shape is the same).
The output is appended and flushed after every batch; a rerun skips every id already in it,
so an interrupted run loses at most the batch in flight. A bad row (missing image, no
question, prompt too long) is reported with its file and line and skipped, or raises when
`strict`.

Input fields (names configurable): `id` (optional: "row-<n>"), `image` (a path, relative to
`image_folder`, or a list of paths composited into one image as in training; optional),
`question` (or LLaVA `conversations`: the first human turn; or PMC-VQA `Question`).

Why one file (over 450 lines): reading requests, resuming from the output file and the
batched generation loop share one output format.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qilin_jax.data.conversation import IMAGE_TAG
from qilin_jax.data.errors import DataError
from qilin_jax.infer.common import (
    check_tokenizer,
    cut_at_stop,
    first_turn,
    load_pixels,
    pad_batch,
    prompt_ids,
    sampling_kwargs,
    template_name,
)
from qilin_jax.infer.config import BatchConfig, DecodeOptions

MAX_REPORTED_ERRORS = 20


@dataclass
class Request:
    """One question to answer: id, turns (LLaVA, ending with the human turn), image refs, origin."""

    id: str
    turns: list[dict]
    images: list = field(default_factory=list)  # paths or bytes
    names: list[str] = field(default_factory=list)
    origin: str = ""  # "file:line", for error messages
    echo: dict = field(default_factory=dict)  # fields copied into the output record
    error: str = ""  # set when the row could not be read (reported, skipped unless strict)
    reason: str = ""


def request(
    id: str, question: str, images: Sequence = (), *, image_folder: str = "", origin: str = "", echo: dict | None = None
) -> Request:
    """A single-turn Request; relative image paths are resolved against image_folder."""
    refs, names = [], []
    for im in images:
        if isinstance(im, (str, os.PathLike)):
            p = os.fspath(im)
            names.append(p)
            refs.append(p if os.path.isabs(p) or not image_folder else os.path.join(image_folder, p))
        else:
            names.append(f"<image {len(names)}>")
            refs.append(im)
    return Request(str(id), [first_turn(question, bool(refs))], refs, names, origin, dict(echo or {}))


# --------------------------------------------------------------------------------------------
# Reading the input


def _read_rows(path: str) -> list[tuple[str, Any]]:
    """[(origin "file:line", row or an Exception)] from .jsonl / .json / .csv."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"batch input not found: {path} (set batch.input)")
    text = p.read_bytes().decode("utf-8-sig", errors="replace")
    name = p.name
    suffix = p.suffix.lower()
    rows: list[tuple[str, Any]] = []
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        for ln, row in enumerate(reader, 2):
            rows.append((f"{name}:{ln}", {(k or "").strip(): v for k, v in row.items()}))
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{path}: not valid JSON ({e}); a .json input is one list of objects, "
                "use .jsonl for one object per line"
            ) from None
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
        rows = [(f"{name}[{i}]", r) for i, r in enumerate(data)]
    elif suffix in (".jsonl", ".ndjson"):
        for ln, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append((f"{name}:{ln}", json.loads(line)))
            except json.JSONDecodeError as e:
                rows.append((f"{name}:{ln}", DataError("bad_json", f"not valid JSON: {e}")))
    else:
        raise ValueError(f"{path}: unsupported input type {suffix!r}; use .jsonl, .json or .csv")
    return rows


def _question_of(row: dict, field_name: str) -> str:
    q = row.get(field_name)
    if q is None:
        q = row.get("Question")
    if q is None and isinstance(row.get("conversations"), list):
        for turn in row["conversations"]:
            if isinstance(turn, dict) and turn.get("from") == "human":
                q = turn.get("value")
                break
    if not isinstance(q, str) or not q.replace(IMAGE_TAG, "").strip():
        raise DataError("bad_record", f"no question: field {field_name!r} is missing or empty")
    return q


def _images_of(row: dict, field_name: str) -> list[str]:
    im = row.get(field_name)
    if im is None:
        im = row.get("Figure_path")
    if im is None or im == "":
        return []
    if isinstance(im, str):
        return [im.strip()]
    if isinstance(im, list) and all(isinstance(x, str) and x for x in im):
        return list(im)
    raise DataError("bad_record", f"field {field_name!r} must be a path or a list of paths, got {im!r:.80}")


def read_requests(cfg: BatchConfig) -> list[Request]:
    """The Requests of cfg.input (unreadable rows carry `error`); raises on duplicate ids."""
    out: list[Request] = []
    seen: dict[str, str] = {}
    for i, (origin, row) in enumerate(_read_rows(cfg.input)):
        rid = f"row-{i}"
        try:
            if isinstance(row, Exception):
                raise row
            if not isinstance(row, dict):
                raise DataError("bad_record", f"a row must be an object, got {type(row).__name__}")
            if row.get(cfg.id_field) not in (None, ""):
                rid = str(row[cfg.id_field])
            q = _question_of(row, cfg.question_field)
            ims = _images_of(row, cfg.image_field)
            req = request(
                rid,
                q,
                ims,
                image_folder=cfg.image_folder,
                origin=origin,
                echo={"image": ims[0] if len(ims) == 1 else ims or None, "question": q.replace(IMAGE_TAG, "").strip()},
            )
        except DataError as e:
            req = Request(rid, [], origin=origin, error=str(e), reason=e.reason)
        if rid in seen:
            raise ValueError(
                f"{cfg.input}: id {rid!r} appears at {seen[rid]} and {origin}; ids key the "
                f"output for resuming, so make them unique (or drop the "
                f"{cfg.id_field!r} field to number rows)"
            )
        seen[rid] = origin
        out.append(req)
    return out


# --------------------------------------------------------------------------------------------
# The output file


def read_done(path: str | os.PathLike) -> dict[str, dict]:
    """Records already in an output JSONL, by id; a torn last line (killed mid-write) is cut off."""
    p = Path(path)
    if not p.is_file():
        return {}
    data = p.read_bytes()
    lines = data.split(b"\n")
    torn = lines.pop()  # b"" when the file ends with a newline
    done: dict[str, dict] = {}

    def parse(line: bytes):
        rec = json.loads(line.decode("utf-8"))
        return str(rec["id"]), rec

    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            k, rec = parse(line)
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            raise ValueError(
                f"{p}:{i + 1}: not a JSON record with an 'id'; fix or delete that "
                "line, then rerun (the other rows are kept)"
            ) from None
        done[k] = rec
    if torn.strip():
        try:  # a complete record that only lacks its newline: keep it
            k, rec = parse(torn)
            done[k] = rec
            with open(p, "ab") as f:
                f.write(b"\n")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            with open(p, "r+b") as f:  # an interrupted write: drop it, that row is redone
                f.truncate(len(data) - len(torn))
            print(f"{p}: dropped an incomplete last line (interrupted write); its row will be redone", file=sys.stderr)
    return done


def settings_of(model, opts: DecodeOptions) -> dict:
    """What the answers depend on: decoding, prompt format and the model (config + a weight sample)."""
    import hashlib

    import jax

    cfg_json = json.dumps(model.config.to_dict(), sort_keys=True, default=str)
    emb = model.llm.embed_tokens.get_value()
    sample = np.asarray(jax.device_get(emb[:2, :16]), np.float32).tobytes()
    return {
        "max_new_tokens": opts.max_new_tokens,
        "do_sample": opts.do_sample,
        "temperature": opts.temperature,
        "top_k": opts.top_k,
        "top_p": opts.top_p,
        "seed": opts.seed,
        "stop": list(opts.stop),
        "template": opts.template,
        "system": opts.system,
        "image_mode": opts.image_mode,
        "model": hashlib.sha256(cfg_json.encode() + sample).hexdigest()[:16],
    }


def check_settings(output: Path, settings: dict) -> None:
    """Record the settings next to a new output; raise if an existing output was made otherwise."""
    meta = output.with_name(output.name + ".settings.json")
    if output.exists() and output.stat().st_size and meta.exists():
        old = json.loads(meta.read_text(encoding="utf-8"))
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if diff:
            raise ValueError(
                f"{output} was written with other settings ({', '.join(diff)} differ: "
                f"{ {k: old.get(k) for k in diff} } then, { {k: settings.get(k) for k in diff} } "
                "now); its answers would mix two set-ups. Use another output path, or "
                "delete it (eval: resume=false) to start over"
            )
        return
    meta.write_text(json.dumps(settings, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------
# Answering


def _prompt_limit(model, opts: DecodeOptions) -> int:
    return model.config.text.max_position_embeddings - opts.max_new_tokens


def prepare_request(model, tokenizer, req: Request, opts: DecodeOptions):
    """(prompt ids, pixel values [n, 3, S, S] or None) of a request; DataError if unusable."""
    if req.error:
        raise DataError(req.reason or "bad_record", req.error)
    pixels = load_pixels(model, req.images, req.names, opts.image_mode) if req.images else None
    ids = prompt_ids(model, tokenizer, req.turns, template_name(opts.template, opts.system))
    if len(ids) > _prompt_limit(model, opts):
        raise DataError(
            "bad_record",
            f"prompt of {len(ids)} tokens + max_new_tokens="
            f"{opts.max_new_tokens} exceeds the model's {model.config.text.max_position_embeddings} "
            "positions; shorten the question or lower max_new_tokens",
        )
    return ids, pixels


def generate_batch(
    model, tokenizer, prepared: Sequence[tuple], opts: DecodeOptions, *, batch_size: int | None = None
) -> list[tuple[str, int, bool]]:
    """(answer, generated tokens, finished) per prepared (ids, pixels); padded to batch_size rows."""
    from qilin_jax.infer.generate import generate

    n = len(prepared)
    rows = list(prepared)
    if batch_size and n < batch_size:  # keep the compiled shape: pad with repeats of the last row
        rows += [rows[-1]] * (batch_size - n)
    ids, mask = pad_batch([r[0] for r in rows], model.config.text.pad_token_id)
    pix = [r[1] for r in rows if r[1] is not None]
    pixels = np.concatenate(pix) if pix else None
    eos = tokenizer.eos_token_id
    out = generate(
        model, ids, pixels, mask, max_new_tokens=opts.max_new_tokens, eos_token_id=eos, **sampling_kwargs(opts)
    )
    results = []
    for b in range(n):
        toks = [int(t) for t in out[b]]
        finished = eos in toks
        n_tok = toks.index(eos) + 1 if finished else len(toks)
        raw = tokenizer.decode(toks[: n_tok - finished], skip_special_tokens=True)
        text, hit = cut_at_stop(raw, opts.stop)
        results.append((text.strip(), n_tok, finished or hit))
    return results


def answer_requests(
    model,
    tokenizer,
    requests: Iterable[Request],
    opts: DecodeOptions,
    *,
    output: str | os.PathLike | None = None,
    batch_size: int = 8,
    limit: int = 0,
    resume: bool = True,
    strict: bool = False,
    progress: bool = True,
    mesh=None,
    desc: str = "answering",
    on_record: Callable[[dict], None] | None = None,
) -> dict:
    """Answer requests in batches; returns {"records": {id: record}, "answered", "reused", "errors", ...}.

    With `output`, records are appended to that JSONL (flushed per batch) and ids already in it
    are reused, not redone. `limit` caps the rows attempted in this call (0 = all).
    """
    from tqdm import tqdm

    from qilin_jax.infer.sharded import inference_sharding, prepare

    check_tokenizer(model, tokenizer)
    if mesh is None:
        model, mesh = prepare(model, opts.tensor_parallel)
    requests = list(requests)
    done: dict[str, dict] = {}
    if output is not None:
        output = Path(output)
        if output.exists() and output.stat().st_size and not resume:
            raise FileExistsError(
                f"{output} exists; delete it, choose another output, or set "
                "resume=true to keep its rows and answer the rest"
            )
        output.parent.mkdir(parents=True, exist_ok=True)
        check_settings(output, settings_of(model, opts))
        done = read_done(output) if resume else {}
    wanted = {r.id for r in requests}
    records = {k: v for k, v in done.items() if k in wanted}
    todo = [r for r in requests if r.id not in done]
    if limit:
        todo = todo[:limit]
    errors: list[dict] = []
    bar = tqdm(total=len(todo), desc=desc, disable=not progress, file=sys.stderr, dynamic_ncols=True)
    fh = open(output, "a", encoding="utf-8") if output is not None else None
    answered = 0

    def report(req: Request, err: Exception):
        reason = getattr(err, "reason", type(err).__name__)
        errors.append({"id": req.id, "origin": req.origin, "reason": reason, "error": str(err)})
        if len(errors) <= MAX_REPORTED_ERRORS:
            bar.write(f"skipped {req.origin} (id {req.id}): {err}", file=sys.stderr)
        elif len(errors) == MAX_REPORTED_ERRORS + 1:
            bar.write("more rows skipped; the summary lists them all", file=sys.stderr)

    def flush(pending):
        nonlocal answered
        if not pending:
            return
        with inference_sharding(mesh):
            results = generate_batch(model, tokenizer, [p for _, p in pending], opts, batch_size=batch_size)
        lines = []
        for (req, _), (text, n_tok, finished) in zip(pending, results):
            rec = {"id": req.id, **req.echo, "answer": text, "num_tokens": n_tok, "finished": finished}
            records[req.id] = rec
            lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
            if on_record is not None:
                on_record(rec)
        if fh is not None:
            fh.write("".join(lines))
            fh.flush()
            os.fsync(fh.fileno())
        answered += len(pending)
        bar.update(len(pending))

    try:
        pending: list = []
        for req in todo:
            try:
                prep = prepare_request(model, tokenizer, req, opts)
            except (DataError, OSError) as e:
                if strict:
                    msg = f"{req.origin} (id {req.id}): {e}; fix the row or set strict=false to skip bad rows"
                    raise (DataError(e.reason, msg) if isinstance(e, DataError) else OSError(msg)) from e
                report(req, e)
                bar.update(1)
                continue
            pending.append((req, prep))
            if len(pending) == batch_size:
                flush(pending)
                pending = []
        flush(pending)
    finally:
        bar.close()
        if fh is not None:
            fh.close()
    if errors:
        print(f"{len(errors)} row(s) skipped ({', '.join(sorted({e['reason'] for e in errors}))})", file=sys.stderr)
    remaining = sum(1 for r in requests if r.id not in records) - len(errors)
    return {
        "records": records,
        "answered": answered,
        "reused": len(done),
        "errors": errors,
        "remaining": max(remaining, 0),
        "output": str(output) if output is not None else None,
    }


def default_output(cfg: BatchConfig) -> str:
    """cfg.output, or <input without suffix>.answers.jsonl next to the input."""
    if cfg.output:
        return cfg.output
    p = Path(cfg.input)
    return str(p.with_name(p.stem + ".answers.jsonl"))


def run_batch(model, tokenizer, batch_cfg: BatchConfig, *, mesh=None) -> dict:
    """Answer every row of batch_cfg.input into a JSONL (resumable); returns a summary dict."""
    batch_cfg.validate("batch")
    reqs = read_requests(batch_cfg)
    out = default_output(batch_cfg)
    res = answer_requests(
        model,
        tokenizer,
        reqs,
        batch_cfg,
        output=out,
        batch_size=batch_cfg.batch_size,
        limit=batch_cfg.limit,
        resume=batch_cfg.resume,
        strict=batch_cfg.strict,
        progress=batch_cfg.progress,
        mesh=mesh,
        desc="batch",
    )
    err_path = Path(out).with_name(Path(out).stem + ".errors.jsonl")
    if res["errors"]:
        with open(err_path, "w", encoding="utf-8") as f:
            for e in res["errors"]:
                f.write(json.dumps(e, ensure_ascii=False) + "\n")
    elif err_path.exists():
        err_path.unlink()
    summary = {k: v for k, v in res.items() if k != "records"}
    summary.update(rows=len(reqs), written=len(res["records"]), errors_file=str(err_path) if res["errors"] else None)
    print(
        f"batch: {res['answered']} answered, {res['reused']} already done, {len(res['errors'])} skipped -> {out}",
        file=sys.stderr,
    )
    return summary
