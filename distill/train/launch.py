"""Entry point of a training run on every rank: ``deepspeed launchers/run.py --config X.yaml key=value ...``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from distill.errors import DistillError, print_error
from distill.files import describe_write_error
from distill.runtime.environment import rank_env
from distill.runtime.process_group import another_rank_failed, error_line, exit_rank


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="run.py", description="Distill a teacher into a student (one rank).")
    parser.add_argument("--config", help="YAML recipe")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the deepspeed launcher")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides, e.g. training.max_steps=100")
    return parser.parse_args(argv)


def _limit_cpu_threads() -> None:
    """On CPU ranks, share the cores instead of every rank claiming all of them."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // rank_env().local_world))


def _quiet_libraries() -> None:
    """Keep each rank's console to the run's own lines: no per-rank INFO logs or loading bars."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    from deepspeed.utils import logger as ds_logger
    from transformers.utils import logging as hf_logging

    ds_logger.setLevel(logging.WARNING)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from distill.runtime.environment import adopt_slurm_env
    from distill.runtime.process_group import leave_process_group_at_exit
    from distill.runtime.stops import StopRequest

    adopt_slurm_env()  # srun with one task per rank: SLURM_* -> RANK, WORLD_SIZE, MASTER_ADDR, ...
    leave_process_group_at_exit()
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    rank = rank_env().rank
    # Armed first, so a signal or the launcher's death during set-up also ends in a clean stop.
    stop_file = os.environ.get("DISTILL_STOP_FILE")  # touched by the sbatch script's signal trap
    stop = StopRequest(Path(stop_file) if stop_file else None)
    trainer = None
    try:
        from distill.config.parsing import load_config
        from distill.train.loop import Trainer

        cfg = load_config(args.config, args.overrides)
        _quiet_libraries()
        _limit_cpu_threads()
        trainer = Trainer(cfg)
        trainer.stop = stop
        trainer.setup()
        final = trainer.train()
    except DistillError as exc:
        # one line: rank 0's for a check every rank makes, the rank's own for a check only it makes
        line = error_line(rank, str(exc))
        if line is not None:
            print_error(line)
        return 2
    except OSError as exc:  # the machine, not the code: a full disk, a read-only or vanished directory
        print_error(f"rank {rank}: {describe_write_error(exc, Path(exc.filename or '.'))}")
        return 2
    except Exception:
        if another_rank_failed(rank, rank_env().world):
            return 2  # the connection to a rank that stopped with an error: that rank's line says why
        raise
    finally:
        stop.close()
        if trainer is not None:
            trainer.close()
    if trainer.stopped:
        if rank == 0:
            print(f"distill: stopped at step {trainer.step} on request; checkpoint {trainer.ckpt_dir / 'latest'} "
                  "resumes it", flush=True)
        return 0
    if rank == 0:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in final.items())
        print(f"distill: done at step {trainer.step}" + (f"; {shown}" if shown else "")
              + f"; outputs in {trainer.out}", flush=True)
    return 0


if __name__ == "__main__":  # distill train starts the ranks as `-m distill.train.launch`
    exit_rank(main())
