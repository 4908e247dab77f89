"""Ray Tune sweeps (``python -m jobs.sweep``) whose every trial runs :func:`pipeline.train.loop.train_loop` — the function torchrun runs.

A sweep is a base config (``--config`` + overrides) and a *space file* (``launch/sweeps/<name>.yaml``)::

    name: tiny                    # optional; default: the file's stem. The sweep directory is <storage>/<name>
    metric: val_bits_per_dim      # optional; default eval.metric of the config (a key the validation returns)
    mode: min                     # optional; default eval.mode
    num_samples: 1                # Tune's num_samples (with grid entries: repeats of the whole grid)
    max_concurrent_trials: 2      # 0 = as many as the resources allow
    seed: 0                       # seeds the random sampling of the space
    storage: ""                   # absolute local path or s3://bucket/prefix; "" = <project root>/runs/sweeps
    scheduler:
      name: asha                  # asha (default) or fifo (no early stopping)
      max_t: 0                    # in validations (reports); 0 = ceil(train.max_steps / eval.every)
      grace_period: 1             # validations before a trial can be stopped
      reduction_factor: 2
    resources:                    # per trial
      workers: 1                  # > 1: Ray Train TorchTrainer, one DeepSpeed rank per worker
      cpus_per_worker: 1
      gpus_per_worker: 0
    fixed:                        # overrides applied to every trial
      train.max_steps: 8
    space:                        # any config key → one sampler
      optim.lr: {loguniform: [1.0e-4, 1.0e-2]}
      model.partitions: {choice: [all, mmca]}

Samplers: ``loguniform|uniform|randn: [a, b]``, ``quniform|qloguniform: [lo, hi, q]``, ``randint|lograndint:
[lo, hi]`` (hi exclusive, as in Tune), ``choice: [...]``, ``grid: [...]`` (every value, × num_samples).
:func:`load_space` checks the file and every key/value against the config (unknown key, wrong type, values
outside a field's range: :class:`SpaceError` naming the key) before Ray starts.

Trials. Each trial's config = base ← ``fixed`` ← sampled values ← what the sweep sets itself (``run.dir`` =
``<sweep dir>/trials/<trial id>``, ``run.name``, ``tracking.uri`` resolved once in the driver,
``tracking.parent_run_id``, and with s3 storage ``checkpoint.remote``); those keys cannot be swept. One
worker: the trial calls ``train_loop`` in its Tune actor. Several: the trial starts a Ray Train
``TorchTrainer`` whose workers call ``train_loop`` (``RANK``/``WORLD_SIZE``/``MASTER_*`` set by Ray Train, read
by :func:`pipeline.world.world_info_from_env`; DeepSpeed adopts Ray's process group). ``train_loop`` calls the
reporter at every validation on every rank, after that step's checkpoint is saved; the reporter hands
``metric``, ``step``, ``checkpoint_step`` and ``checkpoint_dir`` to ``tune.report`` (one worker) or
``ray.train.report`` (every rank; rank 0's values reach Tune through ``TuneReportCallback``). ASHA's time
unit is that report, i.e. one validation.

Tracking. The driver opens one parent MLflow run per sweep; every trial's run is created by ``train_loop``
on rank 0 with the ``mlflow.parentRunId`` tag (the URI and parent id travel in the trial's config, not via
Tune callbacks). Trials that ASHA stopped are left RUNNING by their killed actor; the driver marks them
KILLED and tags ``sweep.status``. At the end the results table is printed and logged to the parent
(``results.txt``, ``results.csv``).

Best trial → ``<sweep dir>/best.json`` (the format :func:`write_best` documents) and the consolidated
weights ``<sweep dir>/best.safetensors`` with ``best.config.yaml`` beside them (the trial's resolved config),
so ``jobs.register`` can take them directly.
"""

from .driver import SweepResult, TrialRow, format_table, pick_best, run_sweep, write_best
from .space import RESERVED_KEYS, SAMPLERS, SpaceError, SweepSpec, load_space, tune_space
from .trial import TrialContext, TrialReporter, run_trial, trial_config

__all__ = [
    "RESERVED_KEYS",
    "SAMPLERS",
    "SpaceError",
    "SweepResult",
    "SweepSpec",
    "TrialContext",
    "TrialReporter",
    "TrialRow",
    "format_table",
    "load_space",
    "pick_best",
    "run_sweep",
    "run_trial",
    "trial_config",
    "tune_space",
    "write_best",
]
