"""What ``train.py`` does around Hydra when torchrun or SLURM's srun start all processes of a run at once.

Lightning's own launcher (``trainer=ddp trainer.devices=N`` on one machine) starts the other processes itself and
passes them the run directory. Under ``torchrun`` or ``srun`` every process starts ``train.py`` independently, so
every process must be given the same ``hydra.run.dir`` (a default made of the start time could differ between
them), and only rank 0 should write Hydra's ``.hydra/`` config copy.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence

from potentials.errors import PotentialsInputError


def launched_processes(env: Mapping[str, str]) -> tuple[int, int, str] | None:
    """(world size, global rank, launcher) when an external launcher started several processes, else None."""
    if int(env.get("WORLD_SIZE", "1") or 1) > 1 and "RANK" in env:
        return int(env["WORLD_SIZE"]), int(env["RANK"]), "torchrun"
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_PROCID" in env:
        return int(env["SLURM_NTASKS"]), int(env["SLURM_PROCID"]), "srun"
    return None


def external_launch_overrides(argv: Sequence[str], env: Mapping[str, str]) -> list[str]:
    """Hydra overrides to add to ``argv`` for a process started by torchrun or srun (none otherwise).

    Raises:
        PotentialsInputError: several processes were launched but ``hydra.run.dir`` was not given.
    """
    launched = launched_processes(env)
    if launched is None or any(a.startswith("hydra.output_subdir=") for a in argv):  # Lightning's own children
        return []
    world, rank, launcher = launched
    if not any(a.lstrip("+").startswith("hydra.run.dir=") for a in argv):
        raise PotentialsInputError(
            f"{launcher} started {world} processes, so all of them need the same run directory: add "
            "hydra.run.dir=<dir> (under SLURM e.g. hydra.run.dir=outputs/$SLURM_JOB_ID, which also makes a requeued "
            "job resume)")
    if rank == 0:
        return []
    return ["hydra.output_subdir=null", f"hydra.job.name=train_rank{rank}"]


def print_input_error(error: BaseException) -> None:
    """One paragraph on stderr: what is wrong with the input, and how to see the traceback."""
    text = " ".join(str(error).split()) or type(error).__name__
    print(f"error: {text}\n(this is a problem with the input or the options; set HYDRA_FULL_ERROR=1 for the "
          "traceback)", file=sys.stderr)
