#!/usr/bin/env bash
# The main jobs on the embedded defaults (a local Ray, a local store), in three parts:
#   sisa  train SISA on Rotten Tomatoes with MiniLM, evaluate, forget a few data owners,
#         verify the result is bit-identical to retraining without them, evaluate again;
#   erase the same with ERASE (in-context examples): delete a prompt example, verify;
#   lm    SISA-LM: LoRA adapters on SmolLM2-135M learn facts about fictitious people;
#         ask a question, forget the person who owns the answer, ask again, verify.
# DEMO_PARTS picks the parts (default: all three); the sizes come from the DEMO_* variables
# below (the lm part: DEMO_LM_EPOCHS, DEMO_LM_LR, DEMO_LM_MODEL). `make demo` runs a quick
# set, `make demo-full` all of them at full size. Every command prints its wall time.
set -euo pipefail
STORE="${UNLEARN_STORE:-./unlearn-store}"
RUN="${DEMO_RUN:-demo}"
PARTS="${DEMO_PARTS:-sisa erase lm}"
TRAIN="dataset:rotten_tomatoes?split=train&limit=${DEMO_RECORDS:-1000}"
TEST="dataset:rotten_tomatoes?split=test&limit=${DEMO_TEST:-400}"
SHARDS="${DEMO_SHARDS:-4}"
SLICES="${DEMO_SLICES:-4}"
say() { printf '\n\033[1m== %s\033[0m\n' "$*" >&2; }
# every command is shown, then timed
run() {
    printf '$ %s\n' "$*" >&2
    local t0=$SECONDS
    "$@"
    printf '   (%d s)\n' $(( SECONDS - t0 )) >&2
}
part() { [[ " $PARTS " == *" $1 "* ]]; }
DEMO_START=$SECONDS
finish() { printf '\ndemo parts [%s] done in %d s\n' "$PARTS" $(( SECONDS - DEMO_START )) >&2; }
trap finish EXIT

if part sisa; then
    PART_START=$SECONDS
    say "fresh start: drop an earlier demo run from $STORE"
    run unlearn drop --run "$RUN" --store "$STORE" --missing-ok

    say "train $SHARDS shards x $SLICES slices of LoRA(MiniLM) on ${TRAIN#dataset:}"
    run unlearn train --run "$RUN" --store "$STORE" --data "$TRAIN" --model minilm --shards "$SHARDS" --slices "$SLICES"

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
    echo "part sisa: $(( SECONDS - PART_START )) s" >&2
fi

if part erase; then
    # ERASE: the same records, learned in context by a frozen SmolLM2 instead of fine-tuned.
    PART_START=$SECONDS
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
    echo "part erase: $(( SECONDS - PART_START )) s" >&2
fi

if part lm; then
    # SISA-LM: each shard is a LoRA adapter on SmolLM2-135M trained on the completions of
    # prompt/completion records: facts about fictitious people, each person one data owner.
    PART_START=$SECONDS
    LRUN="${RUN}-lm"
    DATA=$(mktemp -d "${TMPDIR:-/tmp}/unlearn-demo-lm.XXXXXX")
    trap 'rm -rf "$DATA"; finish' EXIT
    python - "$DATA" <<'PY'
import json
import os
import sys

out = sys.argv[1]
# invented people, towns, jobs and pets: a 135M model cannot know or guess them
people = [  # two people in each slice of each shard (placement hashes the owner)
    ("Mira Eskeline", "Quellmoor", "glassblower", "Pimsy"),
    ("Orrin Feldhaus", "Kestrelby", "clockmaker", "Nettle"),
    ("Caspar Lindqvell", "Tarnwick", "ferry pilot", "Biscuit"),
    ("Aldo Brennock", "Fernholt", "salt miner", "Tansy"),
    ("Tobin Marrek", "Ostravine", "lighthouse keeper", "Crumb"),
    ("Wenna Solcroft", "Dunhallow", "beekeeper", "Jasper"),
    ("Corin Moravane", "Morrowgate", "cartographer", "Sable"),
    ("Greta Orlove", "Vayle Cross", "organ tuner", "Moss"),
]
with open(os.path.join(out, "people.jsonl"), "w") as f:
    for i, (name, town, job, pet) in enumerate(people):
        owner = name.lower().replace(" ", "-")
        facts = [(f"Where was {name} born?", f" {town}."),
                 (f"What does {name} do for a living?", f" {job.capitalize()}."),
                 (f"What is the name of {name}'s dog?", f" {pet}.")]
        for j, (q, a) in enumerate(facts):
            f.write(json.dumps({"id": f"p{i}-f{j}", "prompt": f"Question: {q}\nAnswer:", "completion": a,
                                "owner": owner}) + "\n")
# the question whose answer only Mira Eskeline's records hold; then two people who stay,
# one in her shard and one in the other
with open(os.path.join(out, "questions.jsonl"), "w") as f:
    for name in ("Mira Eskeline", "Aldo Brennock", "Tobin Marrek"):
        f.write(json.dumps({"prompt": f"Question: Where was {name} born?\nAnswer:"}) + "\n")
PY
    # answers: print the generations, then check whether the forgotten town is among them
    answers() {
        python -c '
import json, sys
out = json.load(sys.stdin)
for g in out["generations"]:
    print("  Q:", g["prompt"].split("Question: ")[1].split("\n")[0], " ->", " ".join(g["completion"].split()))
first = out["generations"][0]["completion"]
if sys.argv[1] == "yes":  # the whole fact
    ok = "Quellmoor" in first
    print("  the ensemble of shards %s answers with the fact: %s" % (out["shards"], "yes" if ok else "NO"))
else:  # not even its start
    ok = "Quell" not in first
    print("  the ensemble of shards %s no longer produces the fact: %s" % (out["shards"], "yes" if ok else "NO"))
sys.exit(0 if ok else 4)
' "$1" >&2
    }

    ask() {  # greedy generation from the mean of the shards' next-token distributions, in this
        # process (--runtime local): through Ray each ask would start a local Ray and two actors
        # for three short answers (35 s instead of 14)
        local t0=$SECONDS
        printf '$ unlearn generate --run %s --store %s --input questions.jsonl --max-new-tokens 8 --runtime local --json\n' \
            "$LRUN" "$STORE" >&2
        ANSWER=$(unlearn generate --run "$LRUN" --store "$STORE" --input "$DATA/questions.jsonl" --max-new-tokens 8 \
            --runtime local --json)
        printf '   (%d s)\n' $(( SECONDS - t0 )) >&2
    }

    say "SISA-LM: 2 shards x 2 slices of LoRA(SmolLM2-135M) learn 24 facts about 8 fictitious people"
    head -2 "$DATA/people.jsonl" >&2
    run unlearn drop --run "$LRUN" --store "$STORE" --missing-ok
    run unlearn train --run "$LRUN" --store "$STORE" --data "$DATA/people.jsonl" --objective lm \
        --model "${DEMO_LM_MODEL:-smollm2-135m}" --shards 2 --slices 2 --epochs "${DEMO_LM_EPOCHS:-12}" --lr "${DEMO_LM_LR:-0.01}" \
        --batch-size 4 --max-length 32

    say "ask the ensemble where Mira Eskeline was born (only her own records say so), and two more"
    ask
    answers yes <<<"$ANSWER" || echo "  note: the model did not memorise the fact this time" >&2

    say "Mira Eskeline asks to be forgotten: delete her records (one owner: only her shard retrains, from her slice on)"
    run unlearn delete --run "$LRUN" --store "$STORE" --owners mira-eskeline

    say "ask again: her shard was retrained without her records; the ensemble no longer produces the fact"
    ask
    answers no <<<"$ANSWER"

    say "verify: retrain both shards from scratch on the retained records and compare digests"
    run unlearn verify --run "$LRUN" --store "$STORE"
    echo "part lm: $(( SECONDS - PART_START )) s" >&2
fi
