"""Sources: LLaVA JSON/JSONL, PMC-VQA CSV, and the TFDS builders (built and read without TF)."""

import csv
import json
import sys

import pytest

from qilin_jax.data import DataConfig, DataError, make_loader
from qilin_jax.data.sources import (
    LlavaJsonSource,
    PmcVqaCsvSource,
    TfdsSource,
    pmc_vqa_conversation,
    row_to_sample,
)
from tests.data_fixtures import make_llava_dataset, save_image

PMC_ROWS = [
    {
        "Figure_path": "PMC1_F1.jpg",
        "Question": "Which organ is shown?",
        "Answer": "Liver",
        "Choice A": "A:Liver",
        "Choice B": " B:Lung",
        "Choice C": "C:Heart",
        "Choice D": "Brain",
        "Answer_label": "A",
    },
    {
        "Figure_path": "PMC2_F2.jpg",
        "Question": "What modality?",
        "Answer": "CT",
        "Choice A": "A: MRI",
        "Choice B": "B: CT",
        "Choice C": "C: X-ray",
        "Choice D": "D: US",
        "Answer_label": "B",
    },
    {
        "Figure_path": "PMC3_F3.jpg",
        "Question": "Where is the lesion?",
        "Answer": "Left lobe",
        "Choice A": "A:Left lobe",
        "Choice B": "B:Right lobe",
        "Choice C": "C:None",
        "Choice D": "D:Both",
        "Answer_label": "E",
    },  # bad label
]


def write_pmc_csv(path, rows, answer_col="Answer"):
    cols = ["Figure_path", "Question", answer_col, "Choice A", "Choice B", "Choice C", "Choice D", "Answer_label"]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            r = dict(r)
            r[answer_col] = r.pop("Answer")
            w.writerow(r)


def test_pmc_vqa_csv_both_answer_spellings(tmp_path):
    for col in ("Answer", "Anwser"):
        p = tmp_path / f"{col}.csv"
        write_pmc_csv(p, PMC_ROWS, col)
        src = PmcVqaCsvSource([str(p)], str(tmp_path / "images"))
        assert len(src) == 3
        sid, refs, names, turns = row_to_sample(src[0], str(tmp_path / "images"))
        assert names == ["PMC1_F1.jpg"] and refs == [str(tmp_path / "images" / "PMC1_F1.jpg")]
        assert turns == [
            {
                "from": "human",
                "value": "<image>\nWhich organ is shown?\nA:Liver\nB:Lung\nC:Heart\n"
                "D: Brain\nAnswer with the option's letter from the given "
                "choices directly.",
            },
            {"from": "gpt", "value": "A"},
        ]
        _, _, _, turns = row_to_sample(src[1], "", pmc_style="open")
        assert turns[1]["value"] == "CT" and turns[0]["value"] == "<image>\nWhat modality?"
        with pytest.raises(DataError) as e:
            row_to_sample(src[2], "")
        assert e.value.reason == "bad_record" and "Answer_label" in str(e.value)
    zh = pmc_vqa_conversation(PMC_ROWS[0], "choice", "zh")
    assert zh[0]["value"].endswith("请直接回答选项字母。")


def test_pmc_vqa_csv_missing_columns_is_a_clear_error(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("Figure_path,Question,Choice A\nx.jpg,q,A:1\n")
    with pytest.raises(ValueError) as e:
        PmcVqaCsvSource([str(p)])
    assert "bad.csv" in str(e.value) and "Choice B" in str(e.value) and "Answer (or Anwser)" in str(e.value)


def test_llava_json_and_jsonl_image_field_forms(tmp_path):
    rows = [
        {"id": "a", "image": "x.jpg", "conversations": []},
        {"id": "b", "image": ["x.jpg", "y.png"], "conversations": []},
        {"id": "c", "conversations": []},
        {"id": "d", "image": "", "conversations": []},
        {"id": "e", "image": ["x.jpg", 3], "conversations": []},
    ]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    src = LlavaJsonSource([str(tmp_path / "a.json"), str(tmp_path / "b.jsonl")], "/imgs")
    assert len(src) == 10
    assert src[0]["origin"] == "a.json[0]" and src[6]["origin"] == "b.jsonl:2"
    assert row_to_sample(src[1], "/imgs")[1] == ["/imgs/x.jpg", "/imgs/y.png"]
    assert row_to_sample(src[2], "/imgs")[1] == [] and row_to_sample(src[3], "/imgs")[1] == []
    with pytest.raises(DataError, match="'image' must be"):
        row_to_sample(src[4], "/imgs")


# ----------------------------------------------------------------------------------- TFDS


@pytest.fixture(scope="module")
def chimed_tfds(tmp_path_factory):
    from qilin_jax.data.build_tfds import build

    manual = tmp_path_factory.mktemp("manual")
    path, img_dir = make_llava_dataset(manual, n=7)
    rows = json.load(open(path))
    rows.append({"id": "bad", "image": "missing.jpg", "conversations": rows[0]["conversations"]})
    with open(manual / "ChiMed-VL-Instruction.json", "w", encoding="utf-8") as f:
        json.dump(rows, f, ensure_ascii=False)
    out = tmp_path_factory.mktemp("tfds")
    return build("chimed_vl", str(manual), str(out), config="instruction"), path, img_dir


def test_chimed_vl_build_and_read_without_tensorflow(chimed_tfds):
    d, path, img_dir = chimed_tfds
    assert "tensorflow" not in sys.modules
    src = TfdsSource(d)
    assert src.kind == "llava" and len(src) == 7  # the row with a missing image was skipped
    ids = set()
    for i in range(len(src)):
        sid, refs, names, turns = row_to_sample(src[i])
        ids.add(sid)
        assert isinstance(refs[0], bytes)
        assert refs[0] == open(f"{img_dir}/{names[0]}", "rb").read()  # encoded bytes as on disk
        assert turns[0]["from"] == "human" and "<image>" in turns[0]["value"]
    assert ids == {f"s{i}" for i in range(7)}
    import tensorflow_datasets as tfds

    meta = tfds.builder_from_directory(d).info.metadata["build_summary"]
    assert meta["kept"] == 7 and meta["skipped"] == {"missing_image": 1}


def test_loader_over_tfds_equals_loader_over_json(chimed_tfds, tokenizer):
    d, path, img_dir = chimed_tfds
    common = dict(
        image_size=28,
        seq_buckets=[64, 128, 192],
        batch_size=2,
        shuffle=False,
        read_threads=0,
        prefetch_buffer=0,
        drop_remainder=False,
    )
    from_tfds = list(
        make_loader(DataConfig(format="tfds", paths=[d], **common), tokenizer, process_index=0, process_count=1)
    )
    from_json = make_loader(
        DataConfig(paths=[path], image_folder=img_dir, **common), tokenizer, process_index=0, process_count=1
    )

    # TFDS shuffles rows at build time; compare as multisets of rows.
    def rows(batches):
        out = []
        for b in batches:
            for r in range(b["input_ids"].shape[0]):
                n = int(b["attention_mask"][r].sum())
                if n:
                    out.append(
                        (tuple(b["input_ids"][r, :n]), tuple(b["labels"][r, :n]), b["pixel_values"][r].tobytes())
                    )
        return sorted(out)

    assert rows(from_tfds) == rows(list(from_json))


def test_pmc_vqa_build_read_and_load(tmp_path, tokenizer):
    from qilin_jax.data.build_tfds import build

    manual = tmp_path / "pmc"
    for i, r in enumerate(PMC_ROWS):
        save_image(manual / "images" / r["Figure_path"], 50, 40, seed=i)
    write_pmc_csv(manual / "test.csv", PMC_ROWS[:2], "Anwser")
    write_pmc_csv(manual / "train.csv", PMC_ROWS, "Answer")
    d = build("pmc_vqa", str(manual), str(tmp_path / "out"))
    assert "tensorflow" not in sys.modules
    test = TfdsSource(d, "test")
    assert test.kind == "pmc_vqa" and len(test) == 2
    row = test[0]["row"]
    assert row["Answer"] in ("Liver", "CT") and isinstance(row["__image_bytes__"][0], bytes)
    cfg = dict(
        image_size=28,
        seq_buckets=[128, 192],
        batch_size=1,
        shuffle=False,
        read_threads=0,
        prefetch_buffer=0,
        max_length=None,
    )
    tf_loader = make_loader(
        DataConfig(format="tfds", paths=[d], split="train", **cfg), tokenizer, process_index=0, process_count=1
    )
    tf_batches = list(tf_loader)
    # Row 3's Answer_label "E" passes the build (structural checks) but not the choice format.
    assert len(tf_batches) == 2 and tf_loader.skip_summary()["skipped"] == {"bad_record": 1}
    answers = sorted(tokenizer.decode(b["labels"][b["labels"] != -100].tolist()) for b in tf_batches)
    assert answers == ["A</s>", "B</s>"]
    csv_loader = make_loader(
        DataConfig(format="pmc_vqa_csv", paths=[str(manual / "train.csv")], image_folder=str(manual / "images"), **cfg),
        tokenizer,
        process_index=0,
        process_count=1,
    )
    csv_batches = list(csv_loader)
    # The CSV loader checks Answer_label (row 3 has "E"): skipped and counted.
    assert len(csv_batches) == 2 and csv_loader.skip_summary()["skipped"] == {"bad_record": 1}
    key = lambda b: (b["input_ids"].tobytes(), b["pixel_values"].tobytes())
    assert sorted(map(key, csv_batches)) == sorted(map(key, tf_batches))
