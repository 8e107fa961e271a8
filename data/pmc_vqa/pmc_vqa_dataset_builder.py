"""pmc_vqa: PMC-VQA (train / test / test_clean CSVs) as array_record with encoded images.

Build without TensorFlow:
    python -m qilin_jax.data.build_tfds pmc_vqa --manual_dir /path/to/PMC-VQA --data_dir /path/to/tfds
(`tfds build data/pmc_vqa ... --file_format array_record` needs TensorFlow for the CLI.)
Read: data.format=tfds, data.paths=[<data_dir>/pmc_vqa/1.0.0], data.split=test.
"""

from pathlib import Path

import tensorflow_datasets as tfds
from etils import epath

from qilin_jax.data import tfds_builders as tb


class Builder(tfds.core.GeneratorBasedBuilder):
    """PMC-VQA: one example per usable CSV row; the figure stored as its original file bytes."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release: CSV rows + encoded figures."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = tb.PMC_VQA_MANUAL
    strict = False

    # TFDS resolves code_path through `importlib_resources` (not a dependency here) for
    # builders inside packages; point it at this file directly.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(__file__)

    def _info(self):
        return self.dataset_info_from_configs(
            features=tb.pmc_vqa_features(),
            homepage="https://github.com/xiaoman-zhang/PMC-VQA",
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        manual = Path(dl_manager.manual_dir)
        splits = {s: manual / f for s, f in tb.PMC_VQA_SPLITS.items() if (manual / f).exists()}
        if not splits:
            raise FileNotFoundError(
                f"pmc_vqa: none of {sorted(tb.PMC_VQA_SPLITS.values())} in {manual}.\n" + tb.PMC_VQA_MANUAL
            )
        image_dir = tb.find_image_dir(manual)
        return {s: self._generate_examples(str(p), image_dir, s) for s, p in splits.items()}

    def _generate_examples(self, path, image_dir, split):
        counter = tb.SkipCounter(strict=self.strict)
        yield from tb.generate_pmc_vqa(path, image_dir, counter)
        counter.log(f"pmc_vqa/{split}")
        self.info.metadata.setdefault("build_summary", {})[split] = counter.summary()
