"""The project's Hydra launcher plugin (Hydra loads launcher classes only from the `hydra_plugins` namespace):
`slurm.SlurmLauncher`, hydra-submitit-launcher's `submitit_slurm` with a robust requeue."""
