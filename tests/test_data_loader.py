"""The Grain loader: batch format, buckets, shuffling/epochs, sharding, packing, resume."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from qilin_jax.data import DataConfig, make_loader
from qilin_jax.data.images import load_and_preprocess
from qilin_jax.data.packing import bucket_for, estimate_packed_rows, plan_rows
from tests.data_fixtures import (
    answers_in_batch,
    make_llava_dataset,
    sample_number,
)

N = 10
SIZE = 28  # 28 px, patch 14 -> 4 image tokens: small and fast
BUCKETS = [64, 96, 128, 192]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_llava_dataset(tmp_path_factory.mktemp("llava"), n=N)


def cfg_for(dataset, **kw):
    path, img = dataset
    base = dict(
        paths=[path],
        image_folder=img,
        image_size=SIZE,
        seq_buckets=BUCKETS,
        batch_size=3,
        seed=7,
        read_threads=0,
        prefetch_buffer=0,
        max_length=None,
        drop_remainder=False,
    )
    base.update(kw)
    return DataConfig(**base)


def run(cfg, tok, **kw):
    loader = make_loader(cfg, tok, process_index=kw.pop("process_index", 0), process_count=kw.pop("process_count", 1))
    batches = list(loader)
    return loader, batches


def test_batch_format_and_contents(dataset, tokenizer):
    cfg = cfg_for(dataset, shuffle=False)
    loader, batches = run(cfg, tokenizer)
    assert len(batches) == 4  # 10 samples, batch 3, last batch padded with an empty row
    image_id = len(tokenizer)
    seen = []
    for b in batches:
        B, T = b["input_ids"].shape
        assert B == 3 and T in BUCKETS
        assert set(b) == {
            "input_ids",
            "labels",
            "attention_mask",
            "segment_ids",
            "position_ids",
            "pixel_values",
            "image_valid",
        }
        for k in ("input_ids", "labels", "attention_mask", "segment_ids", "position_ids", "image_valid"):
            assert b[k].dtype == np.int32, k
        assert b["pixel_values"].shape == (3, 1, 3, SIZE, SIZE) and b["pixel_values"].dtype == np.float32
        am = b["attention_mask"]
        # Unpacked rows: segment 1 on real tokens, positions 0..n-1, right padding with 0 / -100.
        assert np.array_equal(b["segment_ids"], am)
        for r in range(B):
            n = int(am[r].sum())
            assert am[r, :n].all() and not am[r, n:].any()
            assert np.array_equal(b["position_ids"][r, :n], np.arange(n))
            assert (b["input_ids"][r, n:] == 0).all() and (b["labels"][r, n:] == -100).all()
            if n:
                assert b["input_ids"][r, 0] == tokenizer.bos_token_id
                assert (b["input_ids"][r] == image_id).sum() == (SIZE // 14) ** 2
                assert b["image_valid"][r, 0] == 1
            else:
                assert b["image_valid"][r, 0] == 0 and not b["pixel_values"][r].any()
        # Labels are NOT shifted: every supervised label equals the input id at its position.
        sup = b["labels"] != -100
        assert np.array_equal(b["labels"][sup], b["input_ids"][sup])
        assert T == bucket_for(int(am.sum(1).max()), BUCKETS)
        for r, answers in enumerate(answers_in_batch(b, tokenizer)):
            for a in answers:
                i = sample_number(a)
                seen.append(i)
                # The image in slot 0 is this sample's image, preprocessed (pad mode).
                name = f"{dataset[1]}/PMC{i:04d}_Fig1_{i}.jpg"
                ref = load_and_preprocess([name], size=SIZE, mode="pad")[0]
                assert np.array_equal(b["pixel_values"][r, 0], ref)
    assert seen == list(range(N))  # shuffle off: file order
    s = loader.stats()
    assert s["samples"] == N and s["rows"] == N and s["batches"] == 4
    assert 0 < s["padding_fraction"] < 1
    assert s["padding_fraction"] == pytest.approx(
        1 - sum(int(b["attention_mask"].sum()) for b in batches) / sum(b["attention_mask"].size for b in batches)
    )


def order(batches, tok):
    return [sample_number(a) for b in batches for row in answers_in_batch(b, tok) for a in row]


def test_seeded_shuffle_and_epochs(dataset, tokenizer):
    cfg = cfg_for(dataset, num_epochs=2, batch_size=2)
    o1 = order(run(cfg, tokenizer)[1], tokenizer)
    o2 = order(run(cfg, tokenizer)[1], tokenizer)
    assert o1 == o2  # same seed, same data
    assert sorted(o1[:N]) == list(range(N)) and sorted(o1[N:]) == list(range(N))
    assert o1[:N] != o1[N:]  # reshuffled each epoch
    assert o1[:N] != list(range(N))
    o3 = order(run(cfg_for(dataset, num_epochs=2, batch_size=2, seed=8), tokenizer)[1], tokenizer)
    assert o3 != o1


def test_sharding_by_process(dataset, tokenizer):
    cfg = cfg_for(dataset, batch_size=1)
    a = order(run(cfg, tokenizer, process_index=0, process_count=2)[1], tokenizer)
    b = order(run(cfg, tokenizer, process_index=1, process_count=2)[1], tokenizer)
    assert len(a) == len(b) == N // 2
    assert sorted(a + b) == list(range(N))
    c = order(run(cfg, tokenizer, process_index=0, process_count=3)[1], tokenizer)
    assert len(c) == N // 3  # equal shards: the remainder is dropped


def test_packing(dataset, tokenizer):
    cfg = cfg_for(dataset, packing=True, pack_length=192, batch_size=2, pack_buffer=6, num_epochs=1)
    loader, batches = run(cfg, tokenizer)
    slots = cfg.image_slots()
    assert slots == 192 // (4 + 16)
    unpacked = run(cfg_for(dataset, shuffle=True), tokenizer)
    numbers = []
    for b in batches:
        assert b["input_ids"].shape == (2, 192) and b["pixel_values"].shape[1] == slots
        for r in range(2):
            seg, pos = b["segment_ids"][r], b["position_ids"][r]
            k = int(seg.max())
            assert np.array_equal(b["attention_mask"][r], (seg > 0).astype(np.int32))
            assert b["image_valid"][r].sum() == k  # one image per sample, slots filled in order
            assert (b["image_valid"][r, :k] == 1).all()
            for j in range(1, k + 1):
                idx = np.nonzero(seg == j)[0]
                assert np.array_equal(idx, np.arange(idx[0], idx[0] + len(idx)))  # contiguous
                assert np.array_equal(pos[idx], np.arange(len(idx)))  # positions restart
                assert b["input_ids"][r, idx[0]] == tokenizer.bos_token_id
            for j, a in enumerate(answers_in_batch(b, tokenizer)[r]):
                i = sample_number(a)
                numbers.append(i)
                ref = load_and_preprocess([f"{dataset[1]}/PMC{i:04d}_Fig1_{i}.jpg"], size=SIZE, mode="pad")[0]
                assert np.array_equal(b["pixel_values"][r, j], ref)  # k-th run <-> slot k
    assert sorted(numbers) == list(range(N))
    assert loader.stats()["padding_fraction"] < unpacked[0].stats()["padding_fraction"]


def test_estimate_packed_rows_matches_the_loader(dataset, tokenizer):
    """With one packing window over the whole (small) source, the estimate is exact: the rows
    the loader packs from one epoch. Tokenization only: no image is decoded."""
    cfg = cfg_for(dataset, packing=True, pack_length=192, batch_size=2, pack_buffer=16, num_epochs=1)
    est = estimate_packed_rows(cfg, tokenizer, _source(cfg))
    assert est["whole_source"] and est["sampled"] == N and est["skipped"] == 0
    loader, _ = run(cfg, tokenizer)
    rows = loader.stats()["rows"]
    assert est["rows_per_sample"] * N == pytest.approx(rows)
    assert est["samples_per_row"] == pytest.approx(N / rows)
    assert 1 < est["samples_per_row"] <= cfg.image_slots()


def test_estimate_packed_rows_counts_skips_and_samples(tmp_path, tokenizer):
    """A sample whose image is missing makes no row but counts as a source sample; a source
    bigger than the sample size is estimated from a seeded subset (the same on every call)."""
    path, img = make_llava_dataset(tmp_path / "d", n=12)
    (Path(img) / "PMC0003_Fig1_3.jpg").unlink()
    cfg = cfg_for((path, img), packing=True, pack_length=192, batch_size=2, pack_buffer=4)
    est = estimate_packed_rows(cfg, tokenizer, _source(cfg))
    assert est["skipped"] == 1 and est["sampled"] == 12
    loader, _ = run(dataclasses.replace(cfg, pack_buffer=16, num_epochs=1), tokenizer)
    assert loader.skip_summary()["skipped"] == {"missing_image": 1}
    # At least four packing windows are sampled (4 x 4 > 12 here: the whole source).
    assert estimate_packed_rows(cfg, tokenizer, _source(cfg), max_samples=5) == est
    small = dataclasses.replace(cfg, pack_buffer=1)
    a = estimate_packed_rows(small, tokenizer, _source(small), max_samples=6)
    b = estimate_packed_rows(small, tokenizer, _source(small), max_samples=6)
    assert a == b and a["sampled"] == 6 and not a["whole_source"]
    assert a["rows_per_sample"] * 6 == 6 - a["skipped"]  # one sample per window: one row each


def _source(cfg):
    from qilin_jax.data.sources import open_source

    return open_source(cfg.format, cfg.paths, cfg.image_folder, cfg.split)


def test_plan_rows_best_fit():
    rows = plan_rows([50, 60, 40, 30, 20, 90], [1, 1, 1, 1, 1, 1], 100, 2)
    assert sorted(i for r in rows for i in r) == list(range(6))
    for r in rows:
        assert sum([50, 60, 40, 30, 20, 90][i] for i in r) <= 100 and len(r) <= 2
    assert len(rows) == 4  # 90 | 60+40 | 50+30 (slot cap 2) | 20
    with pytest.raises(ValueError):
        plan_rows([101], [1], 100, 2)


@pytest.mark.parametrize("packing", [False, True])
def test_resume_gives_the_exact_next_batches(dataset, tokenizer, packing):
    cfg = cfg_for(dataset, num_epochs=2, batch_size=2, packing=packing, pack_length=192, pack_buffer=5)
    full = run(cfg, tokenizer)[1]
    for k in (1, 3, len(full) - 1):
        loader = make_loader(cfg, tokenizer, process_index=0, process_count=1)
        for _ in range(k):
            next(loader)
        state = json.loads(json.dumps(loader.get_state()))  # JSON round trip, as Orbax stores it
        resumed = make_loader(cfg, tokenizer, process_index=0, process_count=1)
        resumed.set_state(state)
        rest = list(resumed)
        assert len(rest) == len(full) - k
        for a, b in zip(rest, full[k:]):
            for key in a:
                assert np.array_equal(a[key], b[key]), key
        assert resumed.stats()["batches"] == len(full)


def test_resume_refuses_a_different_setup(dataset, tokenizer):
    loader = make_loader(cfg_for(dataset), tokenizer, process_index=0, process_count=1)
    next(loader)
    state = loader.get_state()
    other = make_loader(cfg_for(dataset, seed=99), tokenizer, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="different data options"):
        other.set_state(state)
    other = make_loader(cfg_for(dataset), tokenizer, process_index=1, process_count=2)
    with pytest.raises(ValueError, match="process"):
        other.set_state(state)


def test_release_max_length_counts_each_image_as_one_token(dataset, tokenizer):
    full = [int(b["attention_mask"].sum()) for b in run(cfg_for(dataset, shuffle=False, batch_size=1), tokenizer)[1]]
    image_tokens = (SIZE // 14) ** 2
    cap = (min(full) + max(full)) // 2 - (image_tokens - 1)  # text tokens, image counted once
    cfg = cfg_for(dataset, shuffle=False, batch_size=1, max_length=cap)
    loader, batches = run(cfg, tokenizer)
    lengths = [int(b["attention_mask"].sum()) for b in batches]
    assert lengths == [min(n, cap + image_tokens - 1) for n in full]
    assert min(full) < cap + image_tokens - 1 < max(full)  # some cut, some not
    assert loader.stats()["skipped"] == {}


def test_prompt_mode_is_seeded_per_sample(dataset, tokenizer):
    cfg = cfg_for(dataset, shuffle=False, batch_size=1, template="v1", prompt_mode="instruction")
    a = [b["input_ids"].copy() for b in run(cfg, tokenizer)[1]]
    b = [
        x["input_ids"].copy()
        for x in run(cfg_for(dataset, shuffle=True, batch_size=1, template="v1", prompt_mode="instruction"), tokenizer)[
            1
        ]
    ]
    # Same sample -> same prompt whatever the order; the prompt text is in the ids.
    key = lambda ids: tuple(ids[ids != 0].tolist())
    assert sorted(map(key, a)) == sorted(map(key, b))
    texts = [tokenizer.decode(x[0][x[0] != 0].tolist()) for x in a]
    assert any("简洁" in t or "直接" in t for t in texts)


def test_text_only_samples(tmp_path, tokenizer):
    rows = [
        {
            "id": "t0",
            "conversations": [{"from": "human", "value": "肝脏在哪里？"}, {"from": "gpt", "value": "编号0：右上腹。"}],
        }
    ]
    (tmp_path / "t.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    cfg = DataConfig(
        paths=[str(tmp_path / "t.json")],
        image_size=SIZE,
        seq_buckets=BUCKETS,
        batch_size=1,
        read_threads=0,
        prefetch_buffer=0,
    )
    (b,) = list(make_loader(cfg, tokenizer, process_index=0, process_count=1))
    assert b["image_valid"].tolist() == [[0]] and not b["pixel_values"].any()
    assert not (b["input_ids"] == len(tokenizer)).any()
    assert answers_in_batch(b, tokenizer) == [["编号0：右上腹。"]]


def test_config_from_dict_and_validation():
    cfg = DataConfig.from_dict({"template": "plain", "image_mode": "square", "seq_buckets": [640, 1024]})
    assert cfg.resolved_image_tokens() == 576 and cfg.image_slots() == 1
    assert DataConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"data.batchsize: unknown key \(did you mean data.batch_size\?\)"):
        DataConfig.from_dict({"batchsize": 3})
    with pytest.raises(ValueError, match="template"):
        DataConfig.from_dict({"template": "vicuna"})
    with pytest.raises(ValueError, match="seq_buckets"):
        DataConfig.from_dict({"seq_buckets": [1024, 512]})
    with pytest.raises(ValueError, match="cannot hold one image"):
        DataConfig.from_dict({"seq_buckets": [256]})


@pytest.mark.slow
def test_worker_processes_give_the_same_batches_and_resume(dataset, tokenizer):
    base = cfg_for(dataset, num_epochs=2, batch_size=2, packing=True, pack_length=192, pack_buffer=5)
    ref = run(base, tokenizer)[1]
    cfg = cfg_for(
        dataset,
        num_epochs=2,
        batch_size=2,
        packing=True,
        pack_length=192,
        pack_buffer=5,
        worker_count=2,
        read_threads=1,
        prefetch_buffer=2,
    )
    loader = make_loader(cfg, tokenizer, process_index=0, process_count=1)
    got = [next(loader) for _ in range(3)]
    state = json.loads(json.dumps(loader.get_state()))
    loader.close()
    resumed = make_loader(cfg, tokenizer, process_index=0, process_count=1)
    resumed.set_state(state)
    got += list(resumed)
    resumed.close()
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        for key in a:
            assert np.array_equal(a[key], b[key]), key


def test_group_by_length(tmp_path, tokenizer):
    # Samples of very different lengths: grouped batches hold similar lengths, so the length
    # buckets pad less; every sample still comes once per epoch; resume is exact.
    rows = []
    for i in range(24):
        words = " ".join(["word"] * (2 + 5 * (i % 4)))  # four length classes (64-109 tokens)
        rows.append(
            {
                "id": f"s{i}",
                "conversations": [
                    {"from": "human", "value": f"question {i} {words}"},
                    {"from": "gpt", "value": f"answer {i}"},
                ],
            }
        )
    path = tmp_path / "text.json"
    path.write_text(json.dumps(rows))
    base = dict(
        paths=[str(path)],
        image_size=SIZE,
        seq_buckets=[64, 80, 96, 112, 128],
        batch_size=3,
        seed=1,
        read_threads=0,
        prefetch_buffer=0,
        max_length=None,
        num_epochs=2,
        pack_buffer=13,
    )
    plain_loader, plain = run(DataConfig(**base), tokenizer)
    cfg = DataConfig(**base, group_by_length=True)
    loader, grouped = run(cfg, tokenizer)
    assert len(grouped) == len(plain) == 16
    assert loader.stats()["skipped"] == {} and loader.stats()["samples"] == 48
    assert loader.stats()["padding_fraction"] < 0.5 * plain_loader.stats()["padding_fraction"]

    def numbers(batches):
        out = []
        for b in batches:
            for r in answers_in_batch(b, tokenizer):
                out += [int(a.split()[-1]) for a in r]
        return out

    got = numbers(grouped)
    assert sorted(got[:24]) == sorted(got[24:]) == list(range(24))  # each epoch: every sample once
    # Windows of 12 (13 rounded down to 4 batches of 3), sorted by length within each: the
    # batches in a window have non-overlapping length ranges, and their order is shuffled.
    lengths = [b["attention_mask"].sum(1) for b in grouped]
    for w in range(0, 16, 4):
        spans = sorted((int(x.min()), int(x.max())) for x in lengths[w : w + 4])
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), spans
    starts = [[int(x.min()) for x in lengths[w : w + 4]] for w in range(0, 16, 4)]
    assert any(s != sorted(s) for s in starts)  # not simply short-to-long
    assert run(cfg, tokenizer)[1][5]["input_ids"].tolist() == grouped[5]["input_ids"].tolist()  # seeded
    for k in (2, 5):  # resume inside a window
        it = make_loader(cfg, tokenizer, process_index=0, process_count=1)
        for _ in range(k):
            next(it)
        state = json.loads(json.dumps(it.get_state()))
        resumed = make_loader(cfg, tokenizer, process_index=0, process_count=1)
        resumed.set_state(state)
        rest = list(resumed)
        assert len(rest) == len(grouped) - k
        for a, b in zip(rest, grouped[k:]):
            assert np.array_equal(a["input_ids"], b["input_ids"])
    with pytest.raises(ValueError, match="group_by_length applies to unpacked rows"):
        DataConfig(**base, group_by_length=True, packing=True).validate()
    assert cfg.fingerprint() != DataConfig(**base).fingerprint()
