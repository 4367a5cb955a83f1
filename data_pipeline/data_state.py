"""The data position inside an orbax checkpoint: one small JSON file per data shard.

    mgr.save(step, args=ocp.args.Composite(..., data=DataSave(it)))
    mgr.restore(step, args=ocp.args.Composite(data=DataRestore(it)))

Every process writes the files of the shards it owns (`shard_00003-of-00008.json`) and reads
back the files of the shards it owns now, so a checkpoint written by 2 processes restores in 1
or 4 as long as the pipeline's `data_shards` is the same. (grain's own handler writes one file
per *process*, which ties the position to the process count.) A missing shard file or a
differently configured pipeline raises ValueError naming the file or the fingerprints.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import orbax.checkpoint as ocp
from etils import epath


def shard_file(shard: int, data_shards: int) -> str:
    return f"shard_{shard:05d}-of-{data_shards:05d}.json"


class DataStateHandler(ocp.CheckpointHandler):
    """Orbax handler for `data_pipeline.pipeline.DataIterator` (anything with get_state/set_state,
    shard_ids and data_shards)."""

    def save(self, directory: epath.Path, args: "DataSave"):
        state = args.item.get_state()
        for shard, grain_state in state["shards"].items():
            body = {"fingerprint": state["fingerprint"], "data_shards": state["data_shards"], "shard": int(shard),
                    "settings": state.get("settings"), "grain": grain_state}
            (directory / shard_file(int(shard), state["data_shards"])).write_text(json.dumps(body, indent=1))

    def restore(self, directory: epath.Path, args: "DataRestore"):
        it = args.item
        shards = {}
        for s in it.shard_ids:
            f = directory / shard_file(s, it.data_shards)
            if not f.exists():
                saved = sorted(p.name for p in directory.glob("*.json")) if directory.exists() else []
                raise ValueError(f"{f} does not exist: this pipeline has data_shards={it.data_shards}, the "
                                 f"checkpoint holds {saved[:3]}{' …' if len(saved) > 3 else ''}")
            body = json.loads(f.read_text())
            if body["fingerprint"] != it.fingerprint:
                raise ValueError(f"{f}: {it.mismatch(body['fingerprint'], body.get('settings'))}")
            shards[str(s)] = body["grain"]
        it.set_state({"fingerprint": it.fingerprint, "data_shards": it.data_shards, "settings": it.settings,
                      "shards": shards})
        return it

    def structure(self, directory: epath.Path) -> Any:
        return None

    def metadata(self, directory: epath.Path) -> Any:
        return None

    def finalize(self, directory: epath.Path):
        pass

    def close(self):
        pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataSave(ocp.args.CheckpointArgs):
    item: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataRestore(ocp.args.CheckpointArgs):
    item: Any
