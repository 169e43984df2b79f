"""Cluster launch for setdiv: SLURM through submitit, sweeps and seed ensembles through Ray.

A leaf: it imports `setdiv`, `setdiv` never imports it. The scripts users run are the thin
`cluster/*.py` entry points in the repository (`python cluster/submit.py ...`); the code is
here, in a package whose name cannot collide with another top-level `cluster`.

    cli.py           the scripts' shared `main` wrapper and exit codes
    jobs.py          what runs on the allocated machines: the submitit training job that
                     requeues itself, `setdiv` commands as child processes in their own session
    ray_cluster.py   start a local Ray or join one, with explicit resources
    trials.py        one Ray Tune trial = one `setdiv train` run, reporting val_rsum per epoch
    submit.py        `python cluster/submit.py CONFIG ... --nodes N`: a training job on SLURM
    sweep.py         `python cluster/sweep.py CONFIG ... --space KEY=...`: Ray Tune sweeps
    ensemble.py      `python cluster/ensemble.py CONFIG ... --seeds 0,1,2`: seed ensembles

`cluster/ray_slurm.sbatch` starts a Ray head + workers across a SLURM allocation, then a sweep
or ensemble driver.
"""
