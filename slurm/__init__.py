"""SLURM support: cluster profiles, submitit submission of `adm` stages and pipelines, preemption
and requeue, job queries, sbatch templates and a one-node local cluster (see docs/slurm.md)."""
