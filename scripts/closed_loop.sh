#!/usr/bin/env bash
# Issue 21's loop closed in simulation, as a robot team would run it on hardware: demonstrations
# recorded through ROS2 (`vla teleop` stands in for a person with a leader arm, `vla record` records
# the topics of configs/ros_contract_sim.yaml), a policy trained on them, run on the arm with `vla run`;
# beside it the same recipe trained on `vla collect` data of the same tasks, seeds and size.
#   bash scripts/closed_loop.sh [EPISODES_PER_TASK] [TRAIN_STEPS] [RUN_EPISODES_PER_TASK]
# Logs in logs/closed_loop_*; results in runs/closed_loop_{ros,collect}_N.json. Run nothing else beside it.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-50}
STEPS=${2:-9000}
RUN_EPISODES=${3:-20}
DOMAIN=${ROS_DOMAIN_ID_CLOSED_LOOP:-71}
VLA=.venv/bin/vla
# the shipped architecture at 96-px frames, L1 head, no keypoint aid (a ROS recording has no sim state)
RECIPE=(configs/nano_diffusion_narrow.yaml model.head.type=l1 model.keypoints=0 model.keypoint_cond=false
        train.keypoint_dataset=null train.steps="$STEPS")
mkdir -p logs

if [ ! -f data/ros_demos_$N/meta/info.json ]; then  # 8 * N: the suite's 8 tasks
    $VLA record --contract configs/ros_contract_sim.yaml --out data/ros_demos_$N --episodes $((8 * N)) \
        --domain-id $DOMAIN > logs/closed_loop_record.log 2>&1 &
    RECORDER=$!
    sleep 5  # the recorder subscribes before the first episode starts
    $VLA teleop --tasks all --episodes "$N" --speed 4 --domain-id $DOMAIN > logs/closed_loop_teleop.log 2>&1
    wait $RECORDER
fi
[ -f data/collect_$N/meta/info.json ] || \
    $VLA collect --tasks all --episodes "$N" --image-size 96 --out data/collect_$N --workers 2 > logs/closed_loop_collect.log 2>&1

for source in ros collect; do
    data=data/ros_demos_$N; [ $source = collect ] && data=data/collect_$N
    out=runs/closed_loop_${source}_$N
    [ -f $out/final/model.safetensors ] || \
        $VLA train "${RECIPE[@]}" train.dataset=$data train.output_dir=$out > logs/closed_loop_train_$source.log 2>&1
    $VLA run --policy $out/final --tasks all --episodes "$RUN_EPISODES" --domain-id $DOMAIN \
        --json $out.json > logs/closed_loop_run_$source.log 2>&1
    tail -3 logs/closed_loop_run_$source.log
done
