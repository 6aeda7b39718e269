#!/usr/bin/env bash
# The main job on the embedded defaults (a local Ray, a local store):
# train SISA on Rotten Tomatoes with MiniLM, evaluate, forget a few data owners,
# verify the result is bit-identical to retraining without them, evaluate again.
# Then the same with ERASE (in-context examples): delete a prompt example, verify.
set -euo pipefail
STORE="${UNLEARN_STORE:-./unlearn-store}"
RUN="${DEMO_RUN:-demo}"
TRAIN="dataset:rotten_tomatoes?split=train&limit=${DEMO_RECORDS:-1000}"
TEST="dataset:rotten_tomatoes?split=test&limit=${DEMO_TEST:-400}"
say() { printf '\n\033[1m== %s\033[0m\n' "$*" >&2; }
run() { printf '$ %s\n' "$*" >&2; "$@"; }

say "fresh start: drop an earlier demo run from $STORE"
run unlearn drop --run "$RUN" --store "$STORE" --missing-ok

say "train 4 shards x 4 slices of LoRA(MiniLM) on ${TRAIN#dataset:}"
start=$(date +%s)
run unlearn train --run "$RUN" --store "$STORE" --data "$TRAIN" --model minilm --shards 4 --slices 4
echo "trained in $(( $(date +%s) - start )) s" >&2

say "accuracy on held-out movies"
run unlearn eval --run "$RUN" --store "$STORE" --data "$TEST" --quiet

say "three data owners (movies) ask to be forgotten"
OWNERS=$(python - "$TRAIN" <<'PY'
import sys
from collections import Counter
from core.sources import load_records
counts = Counter(r.owner for r in load_records(sys.argv[1]))
# three owners with a few reviews each, chosen deterministically
print(",".join(sorted(o for o, n in counts.items() if 2 <= n <= 4)[:3]))
PY
)
run unlearn delete --run "$RUN" --store "$STORE" --owners "$OWNERS" --json

say "verify: retrain every shard from scratch on the retained records and compare digests"
run unlearn verify --run "$RUN" --store "$STORE"

say "accuracy after forgetting"
run unlearn eval --run "$RUN" --store "$STORE" --data "$TEST" --quiet

say "status"
run unlearn status --run "$RUN" --store "$STORE"

# ERASE: the same records, learned in context by a frozen SmolLM2 instead of fine-tuned.
ERUN="${RUN}-erase"
say "ERASE: drop an earlier run, then embed the records (MiniLM) and choose 8 prompt examples by quantized k-means"
run unlearn drop --run "$ERUN" --store "$STORE" --missing-ok
run unlearn train --method erase --run "$ERUN" --store "$STORE" --data "$TRAIN" --shots 8 --partitions 2

say "ERASE accuracy (8-shot SmolLM2-135M) on ${DEMO_ERASE_TEST:-100} held-out reviews"
ETEST="dataset:rotten_tomatoes?split=test&limit=${DEMO_ERASE_TEST:-100}"
run unlearn eval --run "$ERUN" --store "$STORE" --data "$ETEST" --quiet

say "the author of a prompt example withdraws consent: delete that record"
EXAMPLE=$(unlearn status --run "$ERUN" --store "$STORE" --json | python -c "import json,sys; print(json.load(sys.stdin)['selected_ids'][0])")
run unlearn delete --run "$ERUN" --store "$STORE" --ids "$EXAMPLE"

say "verify: embed and cluster the retained records from scratch; same state, same examples"
run unlearn verify --run "$ERUN" --store "$STORE"

say "ERASE accuracy with the new prompt (a 135M model is sensitive to which examples it sees)"
run unlearn eval --run "$ERUN" --store "$STORE" --data "$ETEST" --quiet
run unlearn status --run "$ERUN" --store "$STORE"
