"""Dirty data: every bad case is skipped with a counted reason, or named in strict mode."""

import json
from pathlib import Path

import pytest

from qilin_jax.data import DataConfig, DataError, make_loader
from tests.data_fixtures import (
    answers_in_batch,
    conv,
    jpeg_bytes,
    sample_number,
    save_image,
)

GOOD = 6


# (reason, row or raw line) for every bad case, after GOOD good rows.
def _bad_rows(img_dir: Path):
    good_conv = conv("<image>\n这是什么？", "编号99：不应出现。")
    (img_dir / "junk.jpg").write_bytes(b"not a jpeg at all" * 20)
    data = jpeg_bytes(64, 48, seed=5)
    (img_dir / "trunc.jpg").write_bytes(data[: len(data) // 3])
    for k in range(5):
        save_image(img_dir / f"multi{k}.jpg", 40, 30, seed=50 + k)
    long_q = "<image>\n" + "病变位于哪里？" * 400  # the question alone exceeds max_length
    return [
        ("missing_image", {"id": "b1", "image": "nope.jpg", "conversations": good_conv}),
        ("corrupt_image", {"id": "b2", "image": "junk.jpg", "conversations": good_conv}),
        ("corrupt_image", {"id": "b3", "image": "trunc.jpg", "conversations": good_conv}),
        ("empty_conversation", {"id": "b4", "image": "img0.jpg", "conversations": []}),
        (
            "no_assistant_turn",
            {"id": "b5", "image": "img0.jpg", "conversations": [{"from": "human", "value": "<image>\n问？"}]},
        ),
        ("image_count_mismatch", {"id": "b6", "image": "img0.jpg", "conversations": conv("这是什么？", "答。")}),
        ("image_count_mismatch", {"id": "b7", "conversations": conv("<image>\n这是什么？", "答。")}),
        ("too_many_images", {"id": "b8", "image": [f"multi{k}.jpg" for k in range(5)], "conversations": good_conv}),
        ("no_supervised_tokens", {"id": "b9", "image": "img0.jpg", "conversations": conv(long_q, "编号98：太长。")}),
        ("bad_record", {"id": "b10", "image": "img0.jpg", "messages": []}),
        ("bad_record", {"id": "b11", "image": 7, "conversations": good_conv}),
        (
            "bad_roles",
            {
                "id": "b12",
                "image": "img0.jpg",
                "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "human", "value": "q"}],
            },
        ),
        ("image_in_answer", {"id": "b13", "image": "img0.jpg", "conversations": conv("<image>\nq", "see <image>")}),
        (
            "not_utf8",
            b'{"id": "b14", "image": "img0.jpg", "conversations": [{"from": "human", '
            b'"value": "<image>\\n\xff\xfe bad bytes"}, {"from": "gpt", "value": "a"}]}',
        ),
        ("bad_json", b'{"id": "b15", "image": "img0.jpg", "conversations": [ }'),
    ]


@pytest.fixture(scope="module")
def dirty(tmp_path_factory):
    root = tmp_path_factory.mktemp("dirty")
    img_dir = root / "images"
    lines = []
    for i in range(GOOD):
        save_image(img_dir / f"img{i}.jpg", 60 + i, 50, seed=i)
        row = {
            "id": f"g{i}",
            "image": f"img{i}.jpg",
            "conversations": conv("<image>\n图中显示了什么？", f"编号{i}：肝脏可见低密度病灶。"),
        }
        lines.append(json.dumps(row, ensure_ascii=False).encode())
    bad = _bad_rows(img_dir)
    for _, row in bad:
        lines.append(row if isinstance(row, bytes) else json.dumps(row, ensure_ascii=False).encode())
    path = root / "dirty.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path), str(img_dir), bad


def _cfg(dirty, **kw):
    path, img, _ = dirty
    base = dict(
        paths=[path],
        image_folder=img,
        image_size=28,
        seq_buckets=[128, 256],
        batch_size=2,
        max_length=200,
        read_threads=0,
        prefetch_buffer=0,
        seed=3,
        drop_remainder=False,
    )
    base.update(kw)
    return DataConfig(**base)


def test_bad_samples_are_skipped_and_counted(dirty, tokenizer):
    _, _, bad = dirty
    loader = make_loader(_cfg(dirty, num_epochs=2), tokenizer, process_index=0, process_count=1)
    got = []
    for b in loader:
        got += [sample_number(a) for row in answers_in_batch(b, tokenizer) for a in row]
    assert sorted(got) == sorted(list(range(GOOD)) * 2)  # only the good ones, each epoch
    summary = loader.skip_summary()
    expected = {}
    for reason, _ in bad:
        expected[reason] = expected.get(reason, 0) + 1
    assert summary["skipped"] == {k: 2 * v for k, v in expected.items()}
    assert summary["seen"] == 2 * (GOOD + len(bad)) and summary["kept"] == 2 * GOOD
    for epoch in ("0", "1"):
        e = summary["by_epoch"][epoch]
        assert e["seen"] == GOOD + len(bad) and e["skipped"] == expected
    # The examples say where: file:line and the sample id.
    assert any("dirty.jsonl:" in x and "'b1'" in x for x in summary["examples"]["missing_image"])
    assert loader.stats()["skipped"] == summary["skipped"]


def test_skip_counts_survive_resume(dirty, tokenizer):
    cfg = _cfg(dirty)
    loader = make_loader(cfg, tokenizer, process_index=0, process_count=1)
    next(loader)
    state = json.loads(json.dumps(loader.get_state()))
    before = loader.skip_summary()
    resumed = make_loader(cfg, tokenizer, process_index=0, process_count=1)
    resumed.set_state(state)
    assert resumed.skip_summary() == before
    list(resumed)
    full = make_loader(cfg, tokenizer, process_index=0, process_count=1)
    list(full)
    assert resumed.skip_summary() == full.skip_summary()


@pytest.mark.parametrize("index", range(15))
def test_strict_mode_names_file_sample_and_problem(dirty, tokenizer, index):
    path, img, bad = dirty
    reason, row = bad[index]
    # A file with the one bad row: strict mode raises on it with file:line, id and reason.
    one = Path(path).with_name(f"one_{index}.jsonl")
    one.write_bytes(row if isinstance(row, bytes) else json.dumps(row, ensure_ascii=False).encode())
    loader = make_loader(_cfg(dirty, paths=[str(one)], strict=True), tokenizer, process_index=0, process_count=1)
    with pytest.raises(DataError) as e:
        next(loader)
    msg = str(e.value)
    assert e.value.reason == reason
    assert f"one_{index}.jsonl:1" in msg and reason in msg and "strict=false" in msg
    if isinstance(row, dict):
        assert repr(row["id"]) in msg


def test_unreadable_files_fail_early_with_the_file_name(tmp_path, tokenizer):
    bad = tmp_path / "array.json"
    bad.write_text('[{"id": 1,,}]')
    with pytest.raises(ValueError, match="array.json.*not valid JSON"):
        make_loader(DataConfig(paths=[str(bad)]), tokenizer, process_index=0, process_count=1)
    obj = tmp_path / "obj.json"
    obj.write_text('{"data": []}\n{"x": 1}')  # looks like JSONL: per-line rows, not an error
    top = tmp_path / "top.json"
    top.write_text('"just a string"')
    with pytest.raises(ValueError, match="top.json.*top level is a str"):
        make_loader(DataConfig(paths=[str(top)]), tokenizer, process_index=0, process_count=1)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        make_loader(DataConfig(paths=[str(tmp_path / "missing.json")]), tokenizer, process_index=0, process_count=1)


def test_inspect_reports_the_same_reasons(dirty, tokenizer):
    from qilin_jax.data.inspect import inspect_dataset

    _, _, bad = dirty
    report = inspect_dataset(_cfg(dirty), tokenizer)
    expected = {}
    for reason, _ in bad:
        expected[reason] = expected.get(reason, 0) + 1
    assert report["rows"] == GOOD + len(bad) and report["kept"] == GOOD
    assert report["skipped"] == expected
    assert int(report["length_percentiles"]["50"]) > 0
    # Without decoding, corrupt images are not found; everything else is.
    fast = inspect_dataset(_cfg(dirty), tokenizer, images=False)
    assert fast["skipped"] == {k: v for k, v in expected.items() if k != "corrupt_image"}
