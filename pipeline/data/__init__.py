"""Data: dataset sources → WebDataset shards + manifest (local or ``s3://``) → distributed loaders.

Writing (``python -m jobs.shard``; see :mod:`pipeline.data.writer` for the layout and commit protocol)::

    write_split(source_name, src, out, split, *, options=None, samples_per_shard=256, workers=1,
                task_index=0, num_tasks=1, skip_bad=False, args=None, progress=True) -> ShardManifest
    merge_split(out, split, *, verify=True) -> ShardManifest
    resolve_task(task_index, num_tasks, environ=None) -> (index, count)    # flags > SLURM array > K8s index

Manifest (:mod:`pipeline.data.manifest`)::

    ShardManifest(dataset, split, modalities: {name: ModalitySpec}, samples_per_shard, shards: [ShardInfo],
                  total_samples, skipped_samples, skipped, source_config, args)
      .to_json() / ShardManifest.from_json(text, location=None) / .manifest_checksum() / .shard_urls()
    manifest_checksum(manifest) -> str     # sha256 of the data-defining fields (not the job's args)
    load_manifest(url) -> ShardManifest    # local path or s3:// URL of manifest-<split>.json

Loading (:mod:`pipeline.data.loader` and, for the exact pass, :mod:`pipeline.data.evalloader`; shapes, dtypes
and guarantees are in their docstrings)::

    build_train_loader(urls_or_manifest, batch_size, *, rank, world_size, num_workers, seed=None,
                       epoch_batches=None, decode="torch", state=None, shuffle_buffer=256,
                       modalities=None, pin_memory=False, verify="off", sampling=None) -> TrainLoader
        sampling "exact" (each sample of an epoch once, any world size, resizes) or "resample";
        one ``for`` loop = one epoch (exact: one round); loader.state: LoaderState
    build_eval_loader(urls_or_manifest, batch_size, *, rank, world_size, num_workers, decode="torch",
                      shuffle_seed=None, epoch=0, modalities=None, flag_device=None,
                      pin_memory=False) -> EvalLoader
        every batch has "__valid__" (bool (N,)); padding batches (all False) keep finished ranks stepping
    LoaderState(epoch=0, batches=0, seed=0).state_dict() / .load_state_dict(d) / .resplit(...)
    loader.skipped_samples, loader.shard_errors     # corrupt input counted, never fatal

Sample keys: ``__key__``, ``rgb.png`` (uint8 → (3, H, W)), ``right.png`` (second stereo view, same layout),
``depth.png`` (uint16 mm, 0 = invalid → uint16 (1, H, W)), ``label.png`` (uint8, 255 = ignore → int64
(H, W)), ``text.txt`` (str), ``labels.npy`` (multi-hot), ``json`` (metadata); Taskonomy uses one
``<domain>.png`` per domain.
"""

from importlib import import_module
from typing import Any

from .manifest import ModalitySpec, ShardInfo, ShardManifest, load_manifest, manifest_checksum, manifest_name

# The loader pulls in torch and webdataset, the writer numpy/Pillow/tqdm: import them on first use so that
# `python -m jobs.shard` and its spawned writer processes do not pay for torch.
_LAZY = {
    **dict.fromkeys(
        ("LoaderState", "TrainLoader", "build_train_loader", "collate", "decode_sample"),
        "loader",
    ),
    **dict.fromkeys(("EvalLoader", "build_eval_loader"), "evalloader"),
    **dict.fromkeys(("merge_split", "resolve_task", "write_split"), "writer"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "EvalLoader",
    "LoaderState",
    "ModalitySpec",
    "ShardInfo",
    "ShardManifest",
    "TrainLoader",
    "build_eval_loader",
    "build_train_loader",
    "collate",
    "decode_sample",
    "load_manifest",
    "manifest_checksum",
    "manifest_name",
    "merge_split",
    "resolve_task",
    "write_split",
]
