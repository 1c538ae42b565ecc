"""Sharded safetensors checkpoints written straight from host memory, read back memory-mapped.

A checkpoint is a directory::

    model-00001-of-00004.safetensors ...   model weights, tensor names = the LightningModule's state_dict names
    model.safetensors.index.json           {"metadata": {"total_size": ...}, "weight_map": {name: file}}
    optimizer-00001-of-00008.safetensors ... optimizer state, names "optimizer_states.<i>.state.<param>.<key>"
    optimizer.safetensors.index.json
    lightning_state.pt                     everything else Lightning saves (loops, callbacks, schedulers, ...)
    megatrain.json                         format and version

Written by data-parallel training (:func:`save_sharded_distributed`), the same directory is written by
every rank of node 0 at once: each model tensor whole by one rank (the same model files and index as
above), and each rank's optimizer state, which covers only the flat element ranges of the parameters
that rank owns, as 1-D pieces in its own files ``optimizer-r<rank>-<k>.safetensors`` named
``<logical name>@<first element>``. The optimizer index then also has ``"pieces"``: for each logical
tensor its shape, dtype and parts ``[[lo, hi, stored name], ...]`` (a 0-d tensor, Adam's ``step``, is
stored whole under its logical name). Loading gives a :class:`Pieces` for such a tensor, from which any
world size takes its own range (``slice``) or the whole tensor (``materialize``). Such checkpoints are
version 2; single-device saves still write version 1, which every version reads.

Tensors are streamed to disk from the memory they live in (no copy of the model is built), one
shard file at a time, into a temporary directory beside the target that is renamed into place only
when complete: a process killed mid-save leaves the previous checkpoint as it was. Temporary
directories are named ``.<name>.megatrain-{tmp,old,del}-<pid>-<id>-<host>``; every save removes those
of dead processes on this host that it finds in its directory (and puts back a previous checkpoint
that a killed save had moved aside).

Loading checks the structure of every file (and the per-shard CRC-32 when the index has one) before
anything is returned, and raises :class:`CheckpointCorruptError` naming the checkpoint, the file and
what is wrong.

The code, by concern: :mod:`.format` (names, version, errors, writing one safetensors file),
:mod:`.publish` (atomic publish, removal, dead saves' leftovers), :mod:`.writer` (saving),
:mod:`.reader` (loading and checks), :mod:`.export` (Lightning ``.ckpt``, Hugging Face, the command
line) and :mod:`.strategy_io` (what ``MegaTrainStrategy`` does with checkpoints; imported by the
strategy, not here). Every name is importable from this package, as before the split.
"""

from .export import (
    _hf_submodule,
    _outermost,
    export_hf,
    load_hf_weights,
    main,
    to_lightning_checkpoint,
    weights_source,
)
from .format import (
    _DTYPES,
    _FROM_NAME,
    _VERSION_PIECES,
    _VERSION_WHOLE,
    DEFAULT_SHARD_BYTES,
    FORMAT,
    FROZEN_KEY,
    META_FILE,
    MODEL_INDEX,
    OPTIMIZER_INDEX,
    PIECES_KEY,
    STATE_FILE,
    VERSION,
    CheckpointCorruptError,
    CheckpointMismatchError,
    CheckpointWriteError,
    _check_cover,
    _Item,
    _nbytes,
    _PathLike,
    _plan,
    _raw,
    _Ref,
    _ShardWriter,
    _split,
    is_sharded_checkpoint,
)
from .publish import (
    _AUX,
    _HOST,
    _aux_name,
    _exchange,
    _fsync_dir,
    _publish,
    _tmp_name,
    remove_checkpoint,
    remove_stale,
)
from .reader import (
    Pieces,
    _crc32_file,
    _load_state,
    _read_header,
    _read_json,
    _read_pieces,
    _resolve,
    check_optimizer_state,
    check_state_dict,
    load_any,
    load_sharded,
    materialize,
    owned_slice,
    read_index,
    read_safetensors,
)
from .writer import (
    DistributedSave,
    ShardedSave,
    _Abandoned,
    _assign_model,
    _finish_distributed,
    _piece_items,
    _RankFailed,
    _ShardStream,
    save_sharded,
    save_sharded_distributed,
)

__all__ = [
    "DEFAULT_SHARD_BYTES", "FORMAT", "FROZEN_KEY", "META_FILE", "MODEL_INDEX", "OPTIMIZER_INDEX", "PIECES_KEY",
    "STATE_FILE", "VERSION",
    "CheckpointCorruptError", "CheckpointMismatchError", "CheckpointWriteError",
    "Pieces", "ShardedSave",
    "check_optimizer_state", "check_state_dict", "export_hf", "is_sharded_checkpoint", "load_any", "load_hf_weights",
    "load_sharded", "main", "materialize", "owned_slice", "read_index", "read_safetensors", "remove_checkpoint",
    "remove_stale", "save_sharded", "save_sharded_distributed", "to_lightning_checkpoint", "weights_source",
]
