"""chimed_vl: ChiMed-VL (Alignment / Instruction / Chat) as array_record with encoded images.

Build without TensorFlow:
    python -m qilin_jax.data.build_tfds chimed_vl --config alignment \
        --manual_dir /path/to/manual --data_dir /path/to/tfds
(`tfds build data/chimed_vl ... --file_format array_record` also works, but the tfds CLI
itself imports TensorFlow.)
Read: data.format=tfds, data.paths=[<data_dir>/chimed_vl/alignment/1.0.0].
"""

import tensorflow_datasets as tfds
from etils import epath

from qilin_jax.data import tfds_builders as tb


class Builder(tfds.core.GeneratorBasedBuilder):
    """ChiMed-VL: one example per usable row; images stored as the original file bytes."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release: rows + encoded PMC-OA images."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = tb.CHIMED_VL_MANUAL
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name="alignment", description="ChiMed-VL-Alignment (stage 1 captions)"),
        tfds.core.BuilderConfig(name="instruction", description="ChiMed-VL-Instruction (stage 2 QA)"),
        tfds.core.BuilderConfig(name="chat", description="ChiMed-VL-Chat (multi-turn)"),
    ]
    DEFAULT_CONFIG_NAME = "alignment"
    # Set by callers that want the first bad row to raise (python -m qilin_jax.data.build_tfds --strict).
    strict = False

    # TFDS resolves code_path through `importlib_resources` (not a dependency here) for
    # builders inside packages; point it at this file directly.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(__file__)

    def _info(self):
        return self.dataset_info_from_configs(
            features=tb.chimed_vl_features(),
            homepage="https://github.com/williamliujl/Qilin-Med-VL",
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        manual = dl_manager.manual_dir
        path = tb.chimed_vl_file(manual, self.builder_config.name)
        return {"train": self._generate_examples(path, tb.find_image_dir(manual))}

    def _generate_examples(self, path, image_dir):
        counter = tb.SkipCounter(strict=self.strict)
        yield from tb.generate_chimed_vl(path, image_dir, counter)
        counter.log(f"chimed_vl/{self.builder_config.name}")
        self.info.metadata["build_summary"] = counter.summary()
