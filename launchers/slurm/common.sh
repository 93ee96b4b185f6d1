# Sourced by the sbatch scripts: where the master is, and how each node starts its ranks.
# Needs LAUNCHER (torchrun | deepspeed | srun), GPUS_PER_NODE, PYTHON, LOG_DIR.

set -uo pipefail
cd "${DISTILL_HOME:-$SLURM_SUBMIT_DIR}"
mkdir -p "$LOG_DIR"

NNODES=${SLURM_JOB_NUM_NODES:-1}
# srun: one rank per task of the job as allocated now, since a requeued job may come back with fewer or
# more (its SLURM_NTASKS keeps the submitted count; SLURM_TASKS_PER_NODE is the allocation's)
if [ "$LAUNCHER" = srun ]; then GPUS_PER_NODE=${SLURM_TASKS_PER_NODE%%[(,]*}; fi
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)  # the first host of the job
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}              # one port per job
export MASTER_ADDR MASTER_PORT NNODES GPUS_PER_NODE PYTHON
echo "distill-slurm: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $NNODES node(s) [$SLURM_JOB_NODELIST]," \
     "$GPUS_PER_NODE rank(s) per node, $LAUNCHER launcher, master $MASTER_ADDR:$MASTER_PORT"

# run_on_nodes SCRIPT ARGS...: start SCRIPT on every rank of the job and wait for it. The wait is in the
# background so that a trapped signal (the time-limit warning) is handled while the ranks run.
run_on_nodes() {
  local step
  case "$LAUNCHER" in
    torchrun)  # one task per node; torchrun starts that node's ranks
      step=(srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c
            '"$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node_rank "$SLURM_NODEID" \
               --nproc_per_node "$GPUS_PER_NODE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "$@"' bash) ;;
    deepspeed)  # one task per node; the deepspeed launcher starts that node's ranks, no ssh between nodes
      HOSTFILE="$LOG_DIR/hostfile-$SLURM_JOB_ID"
      scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/$/ slots=$GPUS_PER_NODE/" > "$HOSTFILE"
      export HOSTFILE
      step=(srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c
            '"$(dirname "$(command -v "$PYTHON")")/deepspeed" --hostfile "$HOSTFILE" --no_ssh --node_rank "$SLURM_NODEID" \
               --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "$@"' bash) ;;
    srun)  # one task per rank; each rank reads SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID
      step=(srun --ntasks=$((NNODES * GPUS_PER_NODE)) --ntasks-per-node="$GPUS_PER_NODE" --kill-on-bad-exit=1 "$PYTHON") ;;
    *) echo "distill-slurm: LAUNCHER must be torchrun, deepspeed or srun, got '$LAUNCHER'" >&2; return 2 ;;
  esac
  "${step[@]}" "$@" &
  local pid=$! rc
  while true; do
    wait "$pid"; rc=$?
    kill -0 "$pid" 2>/dev/null || return "$rc"  # still running: the wait was cut short by a signal
  done
}
