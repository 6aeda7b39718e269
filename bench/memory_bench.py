"""Memory per shard actor with the base LM shared through Ray's object store, against
the other ways S shard actors on one node can hold it, and a bit-for-bit check that
sharing changes no answer.

SISA-LM (`--objective lm`) on `smollm2-135m`: S shard actors on a local Ray, each holding
its LoRA adapter on the frozen 135M-parameter LM (538 MB of float32 weights). Three ways
to hold the base, each with S fresh actors:

- `object store`: what `unlearn` does (RayExecutor, share_base=True): the driver loads the
  weights once and puts them into Ray's object store; every actor maps that one copy
  read-only (core/shared_weights.py);
- `own load`: share_base=False: each actor loads the model from its safetensors file
  itself. transformers maps a float32 safetensors file and keeps the tensors as views of
  the mapping, so these pages are the kernel's page cache, shared by every process that
  maps the same file: not S copies either;
- `private copy`: each actor then copies its base weights into its own memory (what a
  loader that converts or does not map gives: a bfloat16 or GGUF checkpoint, another
  dtype). These are the S separate copies that sharing exists to avoid.

Per actor: RSS (shared pages counted in full), USS (pages only it maps), PSS (shared
pages divided among the processes that map them), and where its resident pages come from
(/proc/PID/smaps). The group's total is the sum of USS plus the shared pages counted once.
Then the answers: next-token distributions and greedy generations on a few prompts, and
label probabilities, from every layout and from the in-process engine, compared bit for bit.

    python bench/memory_bench.py                 # S = 4, about 3 minutes on 2 cores
    python bench/memory_bench.py --shards 2

Results in bench/results/memory.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cluster  # noqa: E402,F401  (Ray environment defaults)
from cluster.runtime import RayExecutor, init_ray, ray_get  # noqa: E402
from core.records import with_labels  # noqa: E402
from core.sources import load_records  # noqa: E402
from core.store import LocalStore, open_store  # noqa: E402
from sisa.config import SisaConfig  # noqa: E402
from sisa.generate import generate_answers  # noqa: E402
from sisa.run import SisaRun  # noqa: E402
from sisa.shard import LocalExecutor, ShardWorker  # noqa: E402

MB = 2**20
PROMPTS = ["Text: a gorgeous, witty, seductive movie.\nLabel:", "The capital of France is",
           "Question: Where was Caspar Lindqvell born?\nAnswer:"]
TEXTS = ["a gorgeous, witty, seductive movie.", "the plot is a mess and the jokes fall flat."]


def mappings(pid: int) -> list[tuple[str, dict[str, int]]]:
    """(path, {field: bytes}) of every mapping of a process (/proc/PID/smaps)."""
    out: list[tuple[str, dict[str, int]]] = []
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and not head[0].endswith(":"):
                out.append((" ".join(head[5:]) if len(head) > 5 else "", {}))
            elif len(head) == 3 and head[2] == "kB" and out:
                out[-1][1][head[0].rstrip(":")] = int(head[1]) * 1024
    return out


def source(path: str) -> str:
    if path.endswith(".safetensors"):
        return "weights file"
    if path.startswith("/dev/shm") or os.path.basename(path).startswith("plasma"):  # or Ray's fallback file
        return "object store"
    return "other files" if path.startswith("/") else "anonymous"


def smaps(pid: int) -> dict[str, dict[str, int]]:
    """Resident bytes of a process by where the pages come from: the model's safetensors
    file, Ray's object store (plasma), other files (libraries), anonymous memory."""
    out: dict[str, dict[str, int]] = {}
    for path, f in mappings(pid):
        slot = out.setdefault(source(path), {"rss": 0, "pss": 0, "private": 0})
        slot["rss"] += f.get("Rss", 0)
        slot["pss"] += f.get("Pss", 0)
        slot["private"] += f.get("Private_Clean", 0) + f.get("Private_Dirty", 0)
    return out


def top_mappings(pid: int, n: int = 5) -> list[tuple[str, float]]:
    """The n mapped paths with the most resident memory (MB), to check what smaps() counted."""
    rss: dict[str, int] = {}
    for path, f in mappings(pid):
        rss[path or "[anonymous]"] = rss.get(path or "[anonymous]", 0) + f.get("Rss", 0)
    return [(p, round(b / MB, 1)) for p, b in sorted(rss.items(), key=lambda x: -x[1])[:n]]


def _private_actor_class():
    import ray

    @ray.remote(max_restarts=0)
    class PrivateCopyActor:
        """A shard actor whose frozen base weights are its own (copied out of the file mapping)."""

        def __init__(self, store_uri: str, run: str, config: dict):
            import torch

            self.worker = ShardWorker(open_store(store_uri), run, SisaConfig.from_json(config))
            with torch.no_grad():
                for p in self.worker.trainer.clf.model.parameters():  # a tied weight is one parameter
                    if not p.requires_grad:
                        p.data = p.data.clone()

        def pid(self) -> int:
            return os.getpid()

        def memory(self) -> dict:
            import gc

            import psutil

            trainer = self.worker.trainer
            trainer.predict_proba(trainer.initial_state(0), ["touch every weight once"])
            gc.collect()
            info = psutil.Process().memory_full_info()
            return {"rss": info.rss, "uss": info.uss, "pss": info.pss}

        def predict(self, entry, texts):
            return self.worker.predict_proba(entry, texts)

        def next_token_probs(self, entry, sequences):
            return self.worker.next_token_probs(entry, sequences)

    return PrivateCopyActor


class PrivateExecutor:
    """Just enough of an executor over PrivateCopyActors for predictions and generation."""

    def __init__(self, store, run: str, config: SisaConfig, actor_cpus: float):
        cls = _private_actor_class()
        self.actors = {k: cls.options(num_cpus=actor_cpus).remote(store.uri, run, config.to_json())
                       for k in range(config.shards)}

    def actor(self, shard: int):
        return self.actors[shard]

    def predict(self, entries, texts):
        return [ray_get(self.actors[e.shard].predict.remote(e, list(texts))) for e in entries]

    def next_token_probs(self, entries, sequences):
        refs = [self.actors[e.shard].next_token_probs.remote(e, [list(s) for s in sequences]) for e in entries]
        return [ray_get(r) for r in refs]


def answers(config, entries, executor, tokenizer) -> dict:
    """What a layout answers: per shard the next-token distributions after each prompt, the
    ensemble's greedy generations, and the label probabilities."""
    seqs = [list(tokenizer(p, add_special_tokens=True)["input_ids"]) for p in PROMPTS]
    return {"next": [p for _, p in executor.next_token_probs(entries, seqs)],
            "generated": [g["tokens"] for g in
                          generate_answers(config, PROMPTS, entries, executor.next_token_probs, 12)["generations"]],
            "labels": [p for _, p in executor.predict(entries, TEXTS)]}


def same(a: dict, b: dict) -> bool:
    return (all(np.array_equal(x, y) for x, y in zip(a["next"], b["next"])) and a["generated"] == b["generated"]
            and all(np.array_equal(x, y) for x, y in zip(a["labels"], b["labels"])))


def measure(layout: str, executor, shards: int) -> dict:
    t0 = time.perf_counter()
    ray_get([executor.actor(k).memory.remote() for k in range(shards)])  # every actor loads, all at once
    load_s = time.perf_counter() - t0
    infos = [ray_get(executor.actor(k).memory.remote()) for k in range(shards)]  # then all are measured
    pids = [ray_get(executor.actor(k).pid.remote()) for k in range(shards)]
    maps = [smaps(pid) for pid in pids]
    kinds = sorted({k for m in maps for k in m})
    by_kind = {k: {f: round(sum(m.get(k, {}).get(f, 0) for m in maps) / shards / MB, 1)
                   for f in ("rss", "pss", "private")} for k in kinds}
    shared_once = max(sum(v["rss"] - v["private"] for k, v in m.items() if k in ("weights file", "object store"))
                      for m in maps)
    row = {"layout": layout, "actors": shards, "load_s": round(load_s, 1),
           "rss_mb": round(sum(i["rss"] for i in infos) / shards / MB, 1),
           "uss_mb": round(sum(i["uss"] for i in infos) / shards / MB, 1),
           "pss_mb": round(sum(i["pss"] for i in infos) / shards / MB, 1),
           "group_mb": round((sum(i["uss"] for i in infos) + shared_once) / MB, 1),
           "pages_by_source_mb": by_kind, "first_actor_top_mappings_mb": top_mappings(pids[0])}
    print(json.dumps(row), file=sys.stderr, flush=True)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--records", type=int, default=40, help="labelled training records (rotten_tomatoes)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()

    import ray

    from core.causal_lm import load_tokenizer

    started = time.perf_counter()
    init_ray()
    records = load_records(f"dataset:rotten_tomatoes?split=train&limit={args.records}")
    config = with_labels(SisaConfig(shards=args.shards, slices=1, epochs="1", model=args.model, batch_size=16,
                                    max_length=48, extra={"objective": "lm"}), records)
    tokenizer = load_tokenizer(args.model)
    rows, got = [], {}
    with tempfile.TemporaryDirectory(prefix="unlearn-membench-") as tmp:
        store = LocalStore(tmp)
        t0 = time.perf_counter()
        trainer = RayExecutor(store, "mem", config, share_base=False)  # no copy left in the object store
        run = SisaRun.train(store, "mem", records, config, executor=trainer)
        train_s = time.perf_counter() - t0
        for k in range(args.shards):
            ray.kill(trainer.actor(k))
        entries = [s for s in run.manifest.shards if s.records]
        for i, layout in enumerate(("private copy", "own load", "object store")):
            time.sleep(2)  # the killed actors' CPUs come back
            # fresh actors under a name of their own (answers read the checkpoints the entries name)
            if layout == "private copy":
                executor = PrivateExecutor(store, f"mem{i}", config, trainer.actor_cpus)
            else:
                executor = RayExecutor(store, f"mem{i}", config, share_base=layout == "object store")
            rows.append(measure(layout, executor, args.shards))
            got[layout] = answers(config, entries, executor, tokenizer)
            for k in range(args.shards):
                ray.kill(executor.actor(k))
        got["in-process"] = answers(config, entries, LocalExecutor(store, "mem", config), tokenizer)
    reference = got["in-process"]
    checks = {layout: same(a, reference) for layout, a in got.items() if layout != "in-process"}
    text = tokenizer.decode(reference["generated"][1], skip_special_tokens=True)
    result = {"bench": "memory", "model": args.model, "objective": "lm", "shards": args.shards,
              "machine": f"{platform.machine()}, {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d"),
              "object_store_mb": int(os.environ.get("UNLEARN_OBJECT_STORE_MB", "512")),
              "train_s": round(train_s, 1), "layouts": rows,
              "bit_identical_to_in_process": checks, "prompts": PROMPTS, "texts": TEXTS,
              "example_generation": {"prompt": PROMPTS[1], "completion": text},
              "seconds": round(time.perf_counter() - started, 1)}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "memory.json"), "w") as f:
        json.dump(result, f, indent=2)
    lines = [f"Memory per shard actor, SISA-LM on {args.model} (LoRA r={config.lora_r}), {args.shards} actors on a "
             f"local Ray, {platform.machine()} with {os.cpu_count()} cores, {result['date']}",
             "",
             "| base weights | RSS MB/actor | USS MB/actor | PSS MB/actor | all actors MB (USS + shared once) "
             "| weights file RSS | object store RSS | anonymous RSS | load s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        src = r["pages_by_source_mb"]
        lines.append(f"| {r['layout']} | {r['rss_mb']} | {r['uss_mb']} | {r['pss_mb']} | {r['group_mb']} "
                     f"| {src.get('weights file', {}).get('rss', 0.0)} | {src.get('object store', {}).get('rss', 0.0)} "
                     f"| {src.get('anonymous', {}).get('rss', 0.0)} | {r['load_s']} |")
    store_maps = [m for r in rows if r["layout"] == "object store" for m in r["first_actor_top_mappings_mb"]
                  if source(m[0]) == "object store" and m[1] > 100]
    if store_maps:  # /dev/shm, or a file of Ray's session directory when the object does not fit the store
        lines += ["", f"The object store's copy was mapped from {store_maps[0][0]} (object store of "
                      f"{result['object_store_mb']} MB, UNLEARN_OBJECT_STORE_MB)."]
    lines += ["", "Answers bit-identical to the in-process engine (next-token distributions of every shard on "
              f"{len(PROMPTS)} prompts, greedy generations of the ensemble, label probabilities): "
              + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in checks.items())]
    table = "\n".join(lines)
    with open(os.path.join(args.out, "memory.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
