#!/usr/bin/env bash
# The whole GPU check of `dqn_pong` as one prepared command, for a lent machine whose minutes are few:
#
#     bash benchmarks/dqn_pong_gpu.sh MINUTES OUT_DIR [lab overrides ...]
#
# 1. Packages the machine's image lacks come from wheels in .whl/ (git-ignored) into /tmp/site, each only
#    if it does not import already. The H200 image seen so far had Python 3.12, torch 2.11, numpy, PyYAML,
#    imageio and cloudpickle, not the rest. .whl/ holds ale-py and PyYAML for CPython 3.10-3.13 and the pure
#    wheels; fill it with (for V in 3.10 3.11 3.12 3.13)
#      pip download --no-deps --only-binary=:all: --python-version V --implementation cp \
#        --platform manylinux_2_28_x86_64 -d .whl ale-py==0.12.1
#      pip download --no-deps --only-binary=:all: --python-version V --implementation cp \
#        --platform manylinux2014_x86_64 -d .whl PyYAML==6.0.2
#      pip download --no-deps --only-binary=:all: -d .whl gymnasium==1.4.0 hydra-core==1.3.8 omegaconf==2.3.1 \
#        farama-notifications==0.0.6 cloudpickle==3.1.1 imageio==2.37.0
#      pip download --no-deps --only-binary=:all: --platform manylinux2014_x86_64 -d .whl imageio-ffmpeg==0.6.0
#      pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3   # sdist only on PyPI
#    and pass carry [".whl"] to the device tool (64 MiB in all: .whl/ is 45 MB; imageio-ffmpeg 0.8 alone is 68).
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
start=$(date +%s)
mkdir -p "$out"
site=${SITE:-/tmp/site}
need=()
for pair in hydra:hydra-core omegaconf:omegaconf gymnasium:gymnasium farama_notifications:farama-notifications \
    cloudpickle:cloudpickle ale_py:ale-py yaml:PyYAML imageio:imageio imageio_ffmpeg:imageio-ffmpeg; do
  python3 -c "import ${pair%%:*}" 2>/dev/null || need+=("${pair#*:}")
done
# omegaconf's parser needs antlr4 4.9 exactly: another antlr4 already there does not do
python3 -c "import importlib.metadata as m; assert m.version('antlr4-python3-runtime').startswith('4.9.')" \
  2>/dev/null || need+=(antlr4-python3-runtime)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing from .whl/ into $site: ${need[*]}"
  python3 -m pip install -q --no-index --find-links .whl --no-deps --no-compile --no-cache-dir --target "$site" \
    "${need[@]}" || { echo "error: ${need[*]} not importable and not installable from .whl/ (see this script's" \
                          "header for how to fill it)" >&2; exit 2; }
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 MPLCONFIGDIR="${MPLCONFIGDIR:-/tmp/mpl}"

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
