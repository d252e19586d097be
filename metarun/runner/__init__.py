"""Running experiments: `metarun train` and `metarun eval` around the algorithms and the data.

- train.py: `train()`, one run in four phases (build, restore, loop, finish); the loop itself.
- restore.py: which saved run a command continues, what execution it keeps, its state restored.
- finish.py: the final test, results.json and the TensorBoard HParams record.
- state.py: `TrainState`, what a run carries across iterations and resumes: the checkpoint schema.
- checkpoint.py: checkpoint files written and read (checked, one-line errors).
- files.py: `RunFiles`, the name of every file in a run dir.
- resume.py: a resumed run's config (which settings may change) and its history entries.
- signals.py: SIGINT/SIGTERM/SIGUSR2 turned into a clean stop (`StopRequest`, `Stopped`).
- distributed.py: torchrun data parallelism over the meta-batch.
- setup.py: a config turned into device, execution, data splits, learner and algorithm.
- evaluate.py: accuracy and its 95% CI on fixed tasks (validation, test, eval).
- evaluate_checkpoint.py: `metarun eval` of a checkpoint (or an ensemble, or a curve).
- lake_benchmark.py: `metarun eval benchmark=lake`, Lake et al.'s 20 one-shot runs.
- rundir.py: claiming and locking run dirs.
- logs.py: console and log-file handling while the progress bar runs.
"""
