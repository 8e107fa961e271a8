"""Training checkpoints: an Orbax CheckpointManager over (train state, data-iterator states).

Each step directory holds the `state` item (step, trainable params, optimizer state, rng)
and a `data` item with one JSON file per process (the Grain iterator position of each
host). Orbax writes to a temporary directory and renames it when complete, so a run killed
mid-write never leaves a checkpoint that `latest_step()` would pick up. The frozen
parameters are not repeated in every step: they are the stage's starting point, recorded
in the run folder, and rebuilt on resume.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath


class DataStateHandler(ocp.CheckpointHandler):
    """Saves each process's data-loader state as process_<i>-of-<n>.json."""

    def save(self, directory: epath.Path, args: DataStateSave):
        i, n = jax.process_index(), jax.process_count()
        text = json.dumps(args.state)
        path = directory / f"process_{i}-of-{n}.json"
        if args.write is not None:
            args.write(path, text)
            return
        path.write_text(text)

    def restore(self, directory: epath.Path, args: DataStateRestore = None):
        i, n = jax.process_index(), jax.process_count()
        path = directory / f"process_{i}-of-{n}.json"
        if not path.exists():
            found = sorted(p.name for p in directory.iterdir())
            raise FileNotFoundError(
                f"{path} does not exist (found {found}): the checkpoint was "
                f"written by a different number of processes than {n}"
            )
        return json.loads(path.read_text())

    def metadata(self, directory):
        return None

    def structure(self, directory):
        return None

    def finalize(self, directory):
        pass

    def close(self):
        pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    state: Any
    write: Callable | None = None  # (path, text) -> None in place of path.write_text(text)


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    pass


class TrainCheckpointer:
    """Save/restore of (TrainState, data state) every N steps, keeping K."""

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        self.directory = epath.Path(directory).absolute()
        opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=opts, item_names=("state", "data"))
        # (path, text) -> None: writes the data item of the next save instead of
        # path.write_text (fault-injection tests cut a save short through it).
        self.data_writer: Callable | None = None
        self._last_started = None

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step (None when there is none)."""
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict | None, *, force: bool = False) -> bool:
        """Start saving (asynchronously when enabled); returns whether a save was started.
        The step this checkpointer is saving or restored is not saved again: a preemption at
        a checkpoint step, or the final save of a stage resumed from its last step. (Any
        other existing step is Orbax's StepAlreadyExistsError: never silently kept.)"""
        if step == self._last_started:
            return False
        self._last_started = step
        args = {"state": ocp.args.StandardSave(state)}
        if data_state is not None:
            args["data"] = DataStateSave(data_state, self.data_writer)
        return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

    def restore(self, step: int, abstract_state, *, with_data: bool = True):
        """(state, data state or None) of `step`, placed like `abstract_state` (ShapeDtypeStructs
        with shardings: a different mesh than the one that saved is fine)."""
        self._last_started = step  # it is saved: the same state need not be written again
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        has_data = with_data and (self.directory / str(step) / "data").exists()
        if has_data:
            items["data"] = DataStateRestore()
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        return out["state"], (out["data"] if has_data else None)

    def wait(self):
        """Block until pending async saves are complete."""
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()
