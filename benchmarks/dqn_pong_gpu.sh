#!/usr/bin/env bash
# The whole GPU check of `dqn_pong` as one prepared command, for a lent machine whose minutes are few:
#
#     bash benchmarks/dqn_pong_gpu.sh MINUTES OUT_DIR [lab overrides ...]
#
# 1. Packages the machine's image lacks come from wheels in .whl/ (git-ignored) into /tmp/site. The
#    H200 image of 2026-11-27 had Python 3.12, torch 2.11 and numpy, not the rest; fill .whl/ with
#      python3.12 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#        --platform manylinux_2_28_x86_64 -d .whl ale-py==0.12.1 gymnasium==1.4.0 hydra-core==1.3.8 \
#        omegaconf==2.3.1 farama-notifications==0.0.6
#      python3.12 -m pip download ... (the same) --platform manylinux2014_x86_64 -d .whl imageio-ffmpeg==0.6.0
#      python3.12 -m pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3   # sdist only on PyPI
#    and pass carry [".whl"] to the device tool (64 MiB in all: imageio-ffmpeg 0.8 alone is 68 MB).
# 2. A smoke run (20k env steps, at most SMOKE_SECONDS=120) with agent.cuda_graph=true: if it finishes, the
#    main run uses CUDA graphs, else it runs eagerly and the smoke run's log says why.
# 3. benchmarks/dqn_pong_gpu.py for MINUTES (learning curve, best agent's 10 games, video) into OUT_DIR.
#    The whole script ends within DEADLINE_S=570 seconds of its start (the device tool stops a command
#    at 600 s, and what it has not written under OUT_DIR by then is lost): the training run gets
#    MINUTES or what is left after the steps before it less RESERVE_S=110 (saving on SIGINT, the best
#    agent's replay, the plot), whichever is shorter. The record and metrics reach OUT_DIR as soon as
#    training ends.
set -uo pipefail
cd "$(dirname "$0")/.."
minutes=${1:?minutes of training}
out=${2:?output folder}
shift 2
mkdir -p "$out"
if ! python3 -c "import hydra, gymnasium, ale_py" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "error: hydra, gymnasium or ale-py missing and no wheels in .whl/ to install" >&2; exit 2; }
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 MPLCONFIGDIR="${MPLCONFIGDIR:-/tmp/mpl}"

start=$(date +%s)
deadline=$(( start + ${DEADLINE_S:-570} ))
graph=false
t0=$(date +%s)
rm -rf /tmp/smoke_cuda_graph
if timeout "${SMOKE_SECONDS:-120}" python3 -m lab +experiment=dqn_pong logger=none trainer.progress=false agent.cuda_graph=true \
    agent.total_timesteps=20000 agent.learning_starts=5000 agent.log_every=5000 agent.eval_episodes=1 \
    agent.eval_num_envs=1 agent.video=false hydra.run.dir=/tmp/smoke_cuda_graph > "$out/smoke_cuda_graph.log" 2>&1; then
  graph=true
fi
echo "cuda_graph smoke run: $([ $graph = true ] && echo passed || echo FAILED) in $(( $(date +%s) - t0 )) s;" \
  "the main run uses agent.cuda_graph=$graph"
grep -h '"perf/steps_per_sec"' /tmp/smoke_cuda_graph/metrics.jsonl 2>/dev/null | tail -n 2 > "$out/smoke_cuda_graph_perf.jsonl"
tail -n 5 "$out/smoke_cuda_graph.log"

left=$(( deadline - $(date +%s) - ${RESERVE_S:-110} ))
main=$(python3 -c "import sys; print(round(min(float(sys.argv[1]), int(sys.argv[2]) / 60), 2))" "$minutes" "$left")
echo "training for $main minutes (asked: $minutes; $left s left before the deadline's reserve)"
if [ "$left" -lt 60 ]; then echo "error: under a minute left for training: raise DEADLINE_S" >&2; exit 2; fi
python3 benchmarks/dqn_pong_gpu.py --minutes "$main" --out "$out" logger=none "agent.cuda_graph=$graph" "$@"
