"""`unlearn`: the command line.

JSON goes to stdout (with --json), messages and progress to stderr. Every user error
is one line `unlearn: error: ...` and exit status 1 (2 for usage errors); a failed
command leaves the store as it was.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from cluster import options as opt  # noqa: E402
from sisa.approx.config import APPROX_METHODS, ApproxConfig  # noqa: E402
from core.errors import UnlearnError  # noqa: E402

EPILOG = """storage: --store takes a directory or file:///directory (default $UNLEARN_STORE or
./unlearn-store) or s3://bucket/prefix, configured by the standard AWS_* variables (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION)."""


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (exit 2), like every other error, instead of a usage dump."""

    def error(self, message: str):
        hint = ""
        if "expected one argument" in message:
            hint = " (a value that starts with '-' goes after '=': --rate=-1/day)"
        where = self.prog.removeprefix("unlearn").strip()
        self.exit(2, f"unlearn: error: {where + ': ' if where else ''}{message}{hint}; see {self.prog} --help\n")


def _common(p: argparse.ArgumentParser, json_help: str = "print JSON on stdout", ray: bool = False) -> None:
    p.add_argument("--run", required=True, type=opt.run_name, help="name of the run (a safe storage key: no '/', '..' or control characters)")
    p.add_argument("--store", type=opt.given, default=None, help="directory, file:///directory or s3://bucket/prefix (default $UNLEARN_STORE or ./unlearn-store)")
    p.add_argument("--json", action="store_true", help=json_help)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    if ray:
        p.add_argument("--runtime", choices=("ray", "local"), default=os.environ.get("UNLEARN_RUNTIME", "ray"),
                       help="ray: one actor per shard, shards in parallel (default; $UNLEARN_RUNTIME); "
                            "local: every shard in this process, one after another")
        p.add_argument("--address", default=None,
                       help="join this Ray cluster (default $RAY_ADDRESS, else the one `unlearn up` started if it "
                            "answers, else start a local Ray on 127.0.0.1)")
        p.add_argument("--actor-cpus", type=opt.bounded(float, 0, opt.MAX_ACTOR_CPUS, above=True), default=None,
                       help="CPUs reserved per shard actor (default: the cluster's CPUs / S, at most 1)")
        p.add_argument("--actor-gpus", type=opt.bounded(float, 0, opt.MAX_ACTOR_GPUS, above=True), default=None,
                       help="GPUs reserved per shard actor of a --device cuda run, fractions allowed "
                            "(default: the cluster's GPUs / S, at most 1)")


def build_parser() -> argparse.ArgumentParser:
    from sisa.aggregate import METHODS
    from core.assets import MODEL_PRESETS as PRESETS

    parser = _Parser(
        prog="unlearn", description="Exact machine unlearning of fine-tuning data: SISA (LoRA shard models) "
                                    "or ERASE (in-context examples chosen by quantized k-means).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a run: SISA (S shards x R slices of LoRA models) or ERASE (k in-context examples)",
                       description="SISA (default): train S LoRA shard models, each in R cumulative stages with a "
                                   "checkpoint after every stage. ERASE (--method erase): embed every record, choose "
                                   "k examples by quantized k-means for the prompt of a frozen language model.")
    _common(p, ray=True)
    p.add_argument("--data", type=opt.given, default=None,
                   help="JSONL, CSV or Parquet with id, text, label[, owner] (or id, prompt, completion[, owner] "
                        "for --objective lm); or dataset:NAME[?split=train|test&limit=N] (required, but for "
                        "--method approx --from)")
    p.add_argument("--method", choices=("sisa", "erase", "approx"), default="sisa",
                   help="unlearning method (default sisa); approx: a BASELINE, not exact (one LoRA model on the "
                        "causal LM, each deletion unlearned in place by --approx; never verifiable)")
    p.add_argument("--objective", choices=("classify", "lm"), default=None,
                   help="SISA shards: classify (a classification head, default) or lm (a LoRA adapter on a causal "
                        "LM trained on completions: labelled records as 'Text: ...\nLabel: <label>', or "
                        "prompt/completion records; predict/eval score labels, generate writes text)")
    p.add_argument("--shards", type=opt.bounded(int, 1, opt.MAX_SHARDS), default=None,
                   help="number of shards S (default 4; 1 for --method approx)")
    p.add_argument("--slices", type=opt.bounded(int, 1, opt.MAX_SLICES), default=None,
                   help="slices per shard R (default 4; 1 for --method approx)")
    p.add_argument("--model", default=None,
                   help=f"preset ({', '.join(PRESETS)}; tiny-lm with --objective lm), a Hugging Face folder, or a hub "
                        "id (default minilm; smollm2-135m for --objective lm)")
    p.add_argument("--epochs", type=opt.epochs, default="3", help="total epochs over each shard, spread as 2e/(R+1) per stage (default 3)")
    p.add_argument("--seed", type=opt.bounded(int, 0, opt.MAX_SEED), default=0, help="seed of every keyed random choice (default 0)")
    p.add_argument("--labels", type=opt.labels, default=None, help="comma-separated label set (default: the labels in the data, sorted)")
    p.add_argument("--lr", type=opt.bounded(float, 0, opt.MAX_LR, above=True), default=3e-3, help="AdamW learning rate, constant (default 3e-3)")
    p.add_argument("--batch-size", type=opt.bounded(int, 1, opt.MAX_BATCH), default=16, help="batch size (default 16)")
    p.add_argument("--max-length", type=opt.bounded(int, opt.MIN_LENGTH, opt.MAX_LENGTH), default=64,
                   help="tokens per text after truncation, at most the model's positions (default 64)")
    p.add_argument("--lora-r", type=opt.bounded(int, 1, opt.MAX_LORA_R), default=8, help="LoRA rank (default 8)")
    p.add_argument("--lora-alpha", type=opt.bounded(int, 1, opt.MAX_LORA_ALPHA), default=16, help="LoRA alpha (default 16)")
    e = p.add_argument_group("ERASE options (--method erase)")
    e.add_argument("--shots", type=opt.bounded(int, 1, opt.MAX_SHOTS), default=8, help="k: examples in the prompt, one per cluster (default 8)")
    e.add_argument("--partitions", type=opt.bounded(int, 1, opt.MAX_PARTITIONS), default=1,
                   help="P: divide-and-conquer partitions, one Ray actor each (default 1)")
    e.add_argument("--eps", type=opt.bounded(float, 0, opt.MAX_EPS, above=True), default=0.05, help="quantisation grid step of the centroids (default 0.05)")
    e.add_argument("--gamma", type=opt.bounded(float, 0, 1), default=0.2, help="balance parameter of quantized k-means (default 0.2)")
    e.add_argument("--iters", type=opt.bounded(int, 1, opt.MAX_ITERS), default=10, help="Lloyd iterations T (default 10)")
    e.add_argument("--no-per-label", dest="per_label", action="store_false",
                   help="cluster all records together (default: each label apart, so every label is in the prompt)")
    e.add_argument("--embedder", default="minilm", help="encoder for the embeddings: minilm (default), tiny, or a folder")
    e.add_argument("--embed-workers", type=opt.bounded(int, 1, opt.MAX_EMBED_WORKERS), default=1,
                   help="processes that embed the records, each text alone as in one process, so the vectors are "
                        "the same bits (default 1; a worker starts only per 2,048 records)")
    e.add_argument("--lm", default="smollm2-135m",
                   help="frozen causal language model for predictions: smollm2-135m (default) or a folder")
    e.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                   help="raw label probabilities (default: contextual calibration, which removes the small "
                        "model's bias towards one label; see bench/results/erase_accuracy.md)")
    a = p.add_argument_group("approximate unlearning (--method approx; a baseline to audit, not exact)")
    a.add_argument("--approx", choices=APPROX_METHODS, default="gd-sine",
                   help="how a deletion is unlearned: ga (gradient ascent on the deleted records), gd (gradient "
                        "difference: descent on the retained records too), gd-sine (gd with the MLP updates "
                        "bounded by a sine); default gd-sine")
    a.add_argument("--approx-steps", type=opt.bounded(int, 1, 100_000), default=ApproxConfig.steps,
                   help=f"optimizer steps per deletion (default {ApproxConfig.steps})")
    a.add_argument("--approx-lr", type=opt.bounded(float, 0, 10.0, above=True), default=ApproxConfig.lr,
                   help=f"AdamW learning rate of the unlearning updates (default {ApproxConfig.lr:g})")
    a.add_argument("--from", dest="source", type=opt.run_name, default=None,
                   help="start from the model of this run (an lm run of 1 shard and 1 slice in the same store) "
                        "instead of training: what training would give, without the wait; no --data then")
    a.add_argument("--approx-omega", type=opt.bounded(float, 0, 1e6, above=True), default=ApproxConfig.omega,
                   help=f"gd-sine: the sine's frequency (default {ApproxConfig.omega:g})")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where shard models train and answer (default cpu). Part of the run's configuration: "
                        "GPU and CPU kernels round differently, so a deletion is exact against the same device")

    p = sub.add_parser("delete", help="forget records or whole data owners, retraining only the affected shards",
                       description="Remove records (by id) or data owners, retrain the affected shards from the earliest "
                                   "affected slice, commit, and purge every superseded checkpoint and data object.")
    _common(p, "print the receipt as JSON on stdout", ray=True)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--ids", type=opt.given, help="comma-separated record ids")
    g.add_argument("--ids-file", type=opt.given, help="file with one record id per line")
    g.add_argument("--owners", type=opt.given, help="comma-separated data owners")
    g.add_argument("--owners-file", type=opt.given, help="file with one data owner per line")
    p.add_argument("--ignore-missing", action="store_true", help="skip ids/owners the run never held instead of failing")
    p.add_argument("--window", type=opt.bounded(float, 0, opt.MAX_WINDOW_S), default=0.0,
                   help="batching window in seconds of the run's coordinator when this command creates it "
                        "(default 0, at most 3600)")

    p = sub.add_parser("verify", help="retrain shards from scratch and check the stored state is bit-identical",
                       description="Exit 0 only when every checked shard is bit-identical to a from-scratch retrain.")
    _common(p, ray=True)
    p.add_argument("--shard", type=opt.bounded(int, 0, opt.MAX_SHARDS - 1), action="append", help="shard to check (repeatable; default all)")
    p.add_argument("--embed-workers", type=opt.bounded(int, 1, opt.MAX_EMBED_WORKERS), default=1,
                   help="ERASE: processes that re-embed the retained records (default 1)")

    p = sub.add_parser("drop", help="remove a whole run and every object (and object version) it stored")
    _common(p)
    p.add_argument("--missing-ok", action="store_true", help="succeed when the run does not exist")

    p = sub.add_parser("serve", help="serve predictions and deletion requests over HTTP (Ray Serve)",
                       description="POST /predict {\"texts\": [...]}, POST /delete {\"ids\": [...]} or "
                                   "{\"owners\": [...]}, GET /requests/<id>. Runs until interrupted.")
    _common(p, ray=True)
    p.add_argument("--host", type=opt.host, default="127.0.0.1",
                   help="IP address or host name to bind (default 127.0.0.1: loopback only)")
    p.add_argument("--port", type=opt.bounded(int, 1, 65535), default=8000, help="HTTP port, 1..65535 (default 8000)")
    p.add_argument("--aggregate", choices=METHODS, default="vote", help="ensemble aggregation (default vote)")
    p.add_argument("--window", type=opt.bounded(float, 0, opt.MAX_WINDOW_S), default=0.0,
                   help="batching window of deletions in seconds (default 0, at most 3600)")
    p.add_argument("--intake-port", type=opt.bounded(int, 1, 65535), default=None,
                   help="also answer the same routes on this port from this process, without Ray Serve's proxy: "
                        "the fast front door for one deletion per POST (a pipeline), on --host")

    p = sub.add_parser("requests", help="the run's deletion requests with their status and receipts")
    _common(p)

    p = sub.add_parser("resume", help="apply every deletion request still queued (after a crash or a failed attempt)",
                       description="Apply the requests that were accepted but not applied yet: after a crash, a lost "
                                   "node, or a transient error. Nothing needs it in normal operation: any delete or "
                                   "serve on the run applies the queue too.")
    _common(p, "print the finished requests as JSON on stdout", ray=True)
    p.add_argument("--retry-failed", action="store_true",
                   help="also queue again the requests that failed for a permanent cause (a corrupted object), "
                        "once the store is repaired")
    p.add_argument("--discard-damaged", action="store_true",
                   help="remove queue entries that fail their checks (nothing in them can be trusted; while they "
                        "are there nothing answers); submit those deletions again")

    p = sub.add_parser("unlock", help="remove a run's lock by hand (a holder on another machine that will not come back)",
                       description="A lock whose holder is provably gone (its process on this machine is dead, or "
                                   "its heartbeat stopped for a whole lease) is taken over automatically by the "
                                   "next command; unlock is only for not waiting out the lease.")
    _common(p)
    p.add_argument("--force", action="store_true", help="remove it even if its holder is alive on this machine")

    p = sub.add_parser("status", help="shards, record counts and state digests of a run")
    _common(p)

    p = sub.add_parser("predict", help="labels and probabilities for texts, aggregated over the shard models")
    _common(p, ray=True)
    p.add_argument("--input", required=True, type=opt.given, help=".txt or - for stdin (one text per line), or JSONL/CSV/Parquet with a 'text' field")
    p.add_argument("--aggregate", choices=METHODS, default="vote", help="vote (default), mean, or weighted by shard size")
    p.add_argument("--wait", action="store_true",
                   help="if shards are retraining for an acknowledged deletion, wait and answer from all shards "
                        "(default: answer from the others and say which answered)")

    p = sub.add_parser("generate", help="continue prompts with an lm run's shards (greedy, mean of their next-token "
                                        "distributions)",
                       description="Greedy decoding from the mean of the shards' next-token distributions, token by "
                                   "token. A shard with an acknowledged deletion still being applied contributes no "
                                   "token. Runs trained with --objective lm only.")
    _common(p, ray=True)
    p.add_argument("--input", required=True, type=opt.given,
                   help=".txt or - for stdin (one prompt per line), or JSONL/CSV/Parquet with a 'text' or 'prompt' field")
    p.add_argument("--max-new-tokens", type=opt.bounded(int, 1, 512), default=32,
                   help="tokens to generate at most per prompt (default 32, at most 512)")
    p.add_argument("--shard", type=opt.bounded(int, 0, opt.MAX_SHARDS - 1), default=None,
                   help="generate with this shard alone (default: the ensemble of every shard)")
    p.add_argument("--wait", action="store_true",
                   help="if shards are retraining for an acknowledged deletion, wait and use all of them")

    p = sub.add_parser("eval", help="accuracy on a labelled file, overall and per shard")
    _common(p, ray=True)
    p.add_argument("--data", required=True, type=opt.given, help="labelled records, same formats as train")
    p.add_argument("--aggregate", choices=METHODS, default="vote", help="vote (default), mean, or weighted by shard size")

    p = sub.add_parser("audit", help="what a run still knows about a forget set: knowledge, membership "
                                     "inference, relearning and quantization attacks, next to a reference run",
                       description="Measures what the run's model (the mean of its shards, for SISA) still knows "
                                   "about the forget records: exact match, token accuracy and mean log-probability of "
                                   "their answers (and of paraphrased questions, retained records and the holdout); "
                                   "the AUC of forget vs holdout for loss, zlib and min-k% membership scores; the "
                                   "same after fine-tuning a copy on part of the forget set (relearning) and after "
                                   "rounding its weights to 8 and 4 bits. With --reference (a run trained without the "
                                   "forget set) both side by side: after an exact deletion every figure is equal. "
                                   "Runs in this process; the stored runs are never changed.")
    _common(p)
    p.add_argument("--forget", required=True, type=opt.given,
                   help="the forget set: records the run holds or deleted (same formats as train)")
    p.add_argument("--holdout", required=True, type=opt.given,
                   help="records no run was trained on (the non-members), same form as --forget")
    p.add_argument("--paraphrased", type=opt.given, default=None,
                   help="the forget set's questions reworded (any ids), scored for knowledge only")
    p.add_argument("--reference", type=opt.run_name, default=None,
                   help="a run of the same store trained without the forget set, audited the same way")
    p.add_argument("--retain-sample", type=opt.bounded(int, 1, 100_000), default=64,
                   help="retained records scored for utility, a keyed sample of what the run holds (default 64)")
    p.add_argument("--relearn-steps", type=opt.bounded(int, 1, 10_000), default=10,
                   help="fine-tuning steps of the relearning attack (default 10)")
    p.add_argument("--relearn-lr", type=opt.bounded(float, 0, 1.0, above=True), default=1e-4,
                   help="learning rate of the relearning attack's fine-tuning (default 1e-4)")
    p.add_argument("--relearn-fraction", type=opt.bounded(float, 0, 1, above=True), default=0.2,
                   help="part of the forget set the relearning attack trains on; the rest is measured (default 0.2)")
    p.add_argument("--plot", type=opt.given, default=None, help="write a PNG chart of the figures to this path")

    from cluster.capacity.commands import add_parsers as add_capacity_parsers

    add_capacity_parsers(sub)  # profile, plan
    from cluster.up_cli import add_parsers as add_up_parsers

    add_up_parsers(sub)  # up, down
    return parser


def _split(value: str, what: str) -> list[str]:
    items = opt.split_values(value)
    if not items:
        raise UnlearnError(f"--{what}: no values given")
    return items


def _audit(args, store, progress: bool) -> int:
    from cluster.audit import audit
    from core.sources import load_records

    if args.plot:
        from cluster.audit_plot import check_plot_path

        check_plot_path(args.plot)
    sets = {name: load_records(getattr(args, name)) if getattr(args, name) else []
            for name in ("forget", "holdout", "paraphrased")}
    say = (lambda msg: print(f"unlearn: audit: {msg}", file=sys.stderr)) if progress else None
    out = audit(store, args.run, sets["forget"], sets["holdout"], sets["paraphrased"], args.reference,
                files={name: getattr(args, name) for name in sets if getattr(args, name)},
                retain_sample=args.retain_sample, relearn_steps=args.relearn_steps,
                relearn_fraction=args.relearn_fraction, relearn_lr=args.relearn_lr, progress=say)
    from cluster.requestlog import RequestLog

    queued, _problems = RequestLog(store, args.run).queued()
    if queued:  # an audit inspects; it never serves: say what state it saw
        out["pending_requests"] = len(queued)
        print(f"unlearn: warning: run {args.run} has {len(queued)} deletion request(s) accepted but not yet "
              "applied; this audits its committed state, from before them", file=sys.stderr)
    if args.plot:
        from cluster.audit_plot import plot_audit

        plot_audit(out, args.plot)
    _emit(args, out, _audit_text(out))
    return 0


def _audit_text(out: dict) -> str:
    reports = [out["subject"]] + ([out["reference"]] if "reference" in out else [])
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    lines = [f"audit of {len(reports)} run(s): {out['forget_records']} forget, {out['holdout_records']} holdout, "
             f"{out['paraphrased_records']} paraphrased, {out['retain_records']} retained records",
             f"{'':34}" + "".join(f"{r['run'][:20]:>22}" for r in reports)]

    def row(label, get):
        values = []
        for r in reports:
            try:
                values.append(fmt(get(r)))
            except (KeyError, TypeError):
                values.append("n/a")
        lines.append(f"{label:34}" + "".join(f"{v:>22}" for v in values))

    for part in ("forget", "forget_paraphrased", "retain", "holdout"):
        if part in out["subject"]["knowledge"]:
            row(f"{part}: exact match", lambda r, p=part: r["knowledge"][p]["exact_match"])
            row(f"{part}: mean log-prob", lambda r, p=part: r["knowledge"][p]["mean_logprob"])
    for k in ("loss_auc", "zlib_auc", "min_k_auc"):
        row(f"membership AUC ({k[:-4]})", lambda r, k=k: r["membership"][k])
    row("relearned: forget rest exact match", lambda r: r["relearn"]["after"]["exact_match"])
    row("  (before relearning)", lambda r: r["relearn"]["before"]["exact_match"])
    for bits in (8, 4):
        row(f"{bits}-bit: forget exact match", lambda r, b=bits: r["quantization"][f"{b}bit"]["forget"]["exact_match"])
    if "identical_to_reference" in out:
        lines.append("every figure equals the reference's" if out["identical_to_reference"]
                     else "the figures differ from the reference's (see membership_gap in --json)")
    return "\n".join(lines)


def _emit(args, obj: dict, text: str) -> None:
    if args.json:
        print(json.dumps(obj, indent=None, sort_keys=False))
    else:
        print(text)


def _status_text(st: dict) -> str:
    lines = [f"run {st['run']} ({st['method']}, version {st['version']}) in {st['store']}: {st['records']} records, "
             f"{st['config']['shards']} shards x {st['config']['slices']} slices, model {st['config']['model']}"
             + (" (objective lm: LoRA adapters on the causal LM)" if st["config"]["extra"].get("objective") == "lm"
                else "")]
    if "approximate" in st:
        lines.append(f"  {st['approximate'].upper().split(' (')[0]} ({st['approximate'].split(' (', 1)[1]}")
    for s in st["shards"]:
        lines.append(f"  shard {s['shard']:>3}: {s['records']:>7} records  slices {s['slices']}  digest {s['digest'][:16]}")
    return "\n".join(lines)


def _unchanged_during(store, run: str, work):
    """Run `work()` (verify) and check that no deletion committed meanwhile: it would have
    purged objects verify was reading, which must not read as damage."""
    def head():
        try:
            return store.get(f"{run}/HEAD")
        except KeyError:
            return None

    before = head()
    try:
        report = work()
    except UnlearnError:
        if head() != before:
            raise UnlearnError(f"run {run} changed while it was verified (a deletion committed); "
                               f"run verify again") from None
        raise
    if head() != before:
        raise UnlearnError(f"run {run} changed while it was verified (a deletion committed); run verify again")
    return report


def _with_queue(store, st: dict) -> dict:
    """The status plus the deletion requests still queued (accepted, not yet applied) and
    what they keep out of every answer meanwhile."""
    from cluster.requestlog import RequestLog

    queued, problems = RequestLog(store, st["run"]).queued()
    for line in problems:
        print(f"unlearn: warning: {line}", file=sys.stderr)
    st["queued_requests"] = [{"request_id": r.request_id, "status": r.status, "accepted": r.accepted,
                              "attempts": r.attempts} for r in queued]
    st["quarantined"] = sorted({u for r in queued for u in r.units}) if st["method"] == "sisa" else \
        sorted({u for r in queued for u in r.units} & set(st.get("selected_ids", [])))
    return st


def _with_warm(args, store, st: dict) -> dict:
    """On the cluster of `unlearn up`: the status plus the run's warm coordinator there
    (`"cluster": {"address", "coordinator_pid"}`, the pid None when none runs). Nothing is
    started or created for it."""
    if not args.on_up:
        return st
    from cluster.runtime import coordinator_pid, init_ray

    init_ray(args.address)
    st["cluster"] = {"address": args.address, "coordinator_pid": coordinator_pid(store, args.run)}
    return st


def _warm_text(st: dict) -> str:
    if "cluster" not in st:
        return ""
    pid = st["cluster"]["coordinator_pid"]
    return (f"\n  on the cluster of `unlearn up` at {st['cluster']['address']}: "
            + (f"coordinator warm (pid {pid})" if pid else "no coordinator yet (the next delete starts one)"))


def _stop_warm_coordinator(args, store) -> None:
    """`drop` on the cluster of `unlearn up`: the run's warm coordinator and shard actors go
    too (they would hold CPUs for a run that no longer exists)."""
    if not args.on_up:
        return
    from cluster.runtime import init_ray, stop_coordinator

    init_ray(args.address)
    if stop_coordinator(store, args.run) and not args.quiet:
        print(f"unlearn: stopped run {args.run}'s coordinator on the cluster of `unlearn up`", file=sys.stderr)


def _queue_text(st: dict) -> str:
    if not st["queued_requests"]:
        return ""
    what = "shards" if st["method"] == "sisa" else "prompt examples"
    return (f"\n  {len(st['queued_requests'])} deletion requests queued "
            f"({', '.join(sorted({r['status'] for r in st['queued_requests']}))}); {what} withheld from answers "
            f"until applied: {st['quarantined']}")


def _delete(args, store, run, progress: bool) -> dict:
    """Through the run's coordinator (a named Ray actor, or in this process): logged
    durably, acknowledged, applied (by this process, or by the live one that holds the
    run lock), receipted. Returns the receipt."""
    ids, owners = args.targets if getattr(args, "targets", None) else opt.delete_targets(args)
    from core.receipts import not_found

    targets, already, unknown = run.resolve(ids, owners)  # for the receipt; the coordinator validates

    def waiting(who: str) -> None:
        print(f"unlearn: another process applies this run's deletions ({who.split(': ', 1)[-1].split(';')[0]}); "
              f"request {request_id} is queued and applied with them", file=sys.stderr, flush=True)

    if args.runtime == "ray":
        from cluster.runtime import coordinator_actor, ray_get, wait_request

        handle = coordinator_actor(store, args.run, args.window, args.actor_cpus, args.address, detached=args.on_up)
        request_id = ray_get(handle.submit.remote(ids, owners, args.ignore_missing))
        print(f"unlearn: request {request_id} accepted (durable); applying", file=sys.stderr, flush=True)
        req = wait_request(handle, request_id, on_busy=waiting)
        if args.on_up:  # the coordinator stays: let it load every shard's model for the next deletion
            ray_get(handle.warm_in_background.remote())
    else:
        from cluster.coordinator import Coordinator

        coordinator = Coordinator(store, args.run, run_factory=lambda: run, window_s=args.window)
        request_id = coordinator.submit(ids, owners, ignore_missing=args.ignore_missing)
        print(f"unlearn: request {request_id} accepted (durable); applying", file=sys.stderr, flush=True)
        req = _apply_until(coordinator, lambda: coordinator.get(request_id).status in ("done", "failed"),
                           progress, waiting).get(request_id).to_json()
    if req["status"] != "done":
        raise UnlearnError(f"request {request_id} {req['status']}: {req['reason']}")
    for warning in req["warnings"]:
        print(f"unlearn: warning: {warning}", file=sys.stderr)
    # the printed receipt names what was asked and found; the stored one keeps counts only
    return {"run": args.run, **req, "ids": sorted(targets), "owners": owners, "already_deleted": already,
            "not_found": not_found(ids, owners, unknown)}


def _receipt_text(receipt: dict, text: str) -> str:
    """The end of a printed delete receipt: what was requested but not deleted now."""
    if receipt["already_deleted"]:
        text += f"; already deleted before: {', '.join(receipt['already_deleted'])}"
    if receipt["not_found"]:
        text += f"; not found (never in the run, skipped): {', '.join(receipt['not_found'])}"
    return text


def _apply_until(coordinator, finished, progress: bool, waiting, attempts: int = 3):
    """Apply the queue in this process until `finished()`; while another live process
    holds the run lock, wait for it (it applies the queue). A transient failure is tried
    again (`attempts` in all); after that the request stays queued, and the error says so."""
    import time

    from cluster.coordinator import is_permanent
    from core.errors import one_line

    told, failures = False, 0
    while not finished():
        try:
            coordinator.apply_due(progress=progress)
        except Exception as exc:
            if is_permanent(exc):
                continue  # the entries say failed, with the reason
            failures += 1
            if failures >= attempts:
                raise UnlearnError(f"accepted but not applied yet ({one_line(exc)}); the request stays queued and its "
                                   f"records out of every answer: `unlearn resume --run {coordinator.run}` applies it") from None
            time.sleep(2 ** failures)
            continue
        if coordinator.busy:
            if not told:
                waiting(coordinator.busy)
                told = True
            time.sleep(0.5)
    return coordinator


def _resume(args, store, run, progress: bool) -> int:
    """Apply what is queued: requeue failed ones first if asked; wait for a live holder."""
    from cluster.coordinator import Coordinator

    def waiting(who: str) -> None:
        print(f"unlearn: another process applies this run's deletions ({who.split(': ', 1)[-1].split(';')[0]}); "
              f"waiting for it", file=sys.stderr, flush=True)

    coordinator = Coordinator(store, args.run, run_factory=lambda: run)
    before = {r.request_id for r in coordinator.log() if r.status != "done"}
    if args.discard_damaged:
        coordinator.discard_damaged(on_wait=waiting)
    if args.retry_failed:
        coordinator.requeue_failed(on_wait=waiting)
    if args.runtime == "ray":
        import time

        from cluster.runtime import coordinator_actor, ray_get

        handle = coordinator_actor(store, args.run, actor_cpus=args.actor_cpus, address=args.address,
                                   detached=args.on_up)
        told = False
        while ray_get(handle.pending.remote()):
            who = ray_get(handle.busy.remote())
            if who and not told:
                waiting(who)
                told = True
            time.sleep(0.2)
    else:
        _apply_until(coordinator, lambda: not coordinator.pending(), progress, waiting)
    coordinator.sweep()  # what killed writers left, also when nothing was queued
    log = [r.to_json() for r in coordinator.log() if r.request_id in before]
    lines = [f"{r['request_id']}  {r['status']:<8}  " + (f"{r['records_deleted']} records" if r["status"] == "done"
                                                          else (r["reason"] or r["last_error"] or ""))
             for r in log] or [f"run {args.run}: nothing queued"]
    _queued, damaged = coordinator.requests.queued()
    lines += [f"{line}: `unlearn resume --run {args.run} --discard-damaged` removes it" for line in damaged]
    _emit(args, {"run": args.run, "requests": log, "damaged": damaged}, "\n".join(lines))
    return 0 if all(r["status"] == "done" for r in log) and not damaged else 1


def _serve(args, store) -> int:
    if args.runtime != "ray":
        raise UnlearnError("serve needs the Ray runtime (--runtime ray)")
    import signal
    import time

    from cluster.serving import start_serving

    sock = None
    if args.intake_port is not None:  # bound first: a port in use fails before anything starts
        if args.intake_port == args.port:
            raise UnlearnError(f"--intake-port {args.intake_port} is --port too: give the intake a port of its own")
        from cluster.intake import bind

        sock = bind(args.host, args.intake_port)
    intake = None
    try:
        url = start_serving(store, args.run, args.host, args.port, args.aggregate, args.window, args.actor_cpus,
                            args.address)
        also = ""
        if sock is not None:
            from cluster.intake import IntakeFront, IntakeServer
            from cluster.runtime import coordinator_actor

            coordinator = coordinator_actor(store, args.run, args.window, args.actor_cpus, args.address)
            intake = IntakeServer(sock, IntakeFront(coordinator, args.aggregate), [store.uri])
            intake.start()
            from cluster.serving import base_url

            also = f" and, without Ray Serve, at {base_url(args.host, args.intake_port)}"
        print(f"unlearn: serving run {args.run} at {url}{also} (POST /predict, POST /delete, GET /requests/<id>); "
              f"Ctrl-C stops", file=sys.stderr, flush=True)
        stop = []
        signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
        try:
            while not stop:
                if intake is not None and not intake.alive():
                    raise UnlearnError(f"the intake server on port {args.intake_port} stopped "
                                       f"({intake.error or 'no reason given'})")
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
    finally:
        if intake is not None:
            intake.stop()
        elif sock is not None:
            sock.close()
        import ray

        if ray.is_initialized():  # whatever failed: Serve's app and proxy must not outlive this process
            from ray import serve

            serve.shutdown()
    return 0


def _requests(args, store) -> int:
    """The log, read-only: queued requests (with the ids they name) and receipts."""
    from cluster.requestlog import RequestLog

    from core.stored_run import run_method

    entries, problems = RequestLog(store, args.run).entries()
    for line in problems:
        print(f"unlearn: warning: {line}", file=sys.stderr)
    try:
        units = "partitions" if run_method(store, args.run) == "erase" else "shards"
    except (UnlearnError, KeyError):  # the log stays readable without the manifest
        units = None
    log = [r.to_json() for r in entries]

    def done(r: dict) -> str:
        text = (f"{units or ('partitions' if r['details'] else 'shards')} {r['shards']}  "
                f"{r['records_deleted']} records")
        text += f", {r['already_deleted_count']} already deleted" if r["already_deleted_count"] else ""
        text += f", {r['not_found_count']} not found" if r["not_found_count"] else ""
        return text + ("  (receipt compacted: counts only)" if r["compacted"] else "")

    lines = [f"{r['request_id']}  {r['status']:<8}  accepted {r['accepted']}  "
             + (done(r) if r["status"] == "done"
                else (r["reason"] or (f"attempt {r['attempts']}: {r['last_error']}" if r["last_error"] else "")))
             for r in log] or [f"run {args.run}: no deletion requests"]
    _emit(args, {"run": args.run, "requests": log, "unreadable": problems}, "\n".join(lines))
    return 0


def _serving(args, store, run):
    """(Serving, serve) for predict and eval: the shard models (SISA) or the in-context
    answers (ERASE), in this process or on Ray, behind the quarantine of every deletion
    request queued in the store, whichever process accepted it. Never locks, never applies."""
    from cluster.quarantine import Serving

    if run.manifest.method != "erase":
        return Serving(store, args.run), run._executor(False).predict
    from erase.run import format_predictions

    if args.runtime == "ray":
        from cluster.runtime import InContextAnswers, init_ray

        init_ray(args.address)
        probabilities = InContextAnswers(store).probabilities
    else:
        def probabilities(manifest, texts, exclude):
            run.manifest = manifest
            probs = run.classifier().predict_proba(run.examples(exclude), list(texts), calibrate=manifest.config.calibrate)
            return probs, [i for i in manifest.selected_ids if i not in set(exclude)]

    def serve(manifest, texts, exclude):
        probs, _used = probabilities(manifest, texts, exclude)
        out = format_predictions(manifest.config.labels, texts, probs, manifest.selected_ids, exclude)
        out["probs"] = probs  # for eval; not printed
        return out

    return Serving(store, args.run), serve


def _warn_problems(serving) -> None:
    for line in serving.quarantine.problems:
        print(f"unlearn: warning: {line}", file=sys.stderr)


def _note_test_model(run) -> None:
    """One line on stderr when the run's model is a random network made for tests."""
    config = run.manifest.config
    model = getattr(config, "lm", None) if run.manifest.method == "erase" else getattr(config, "model", None)
    if model in ("tiny", "tiny-lm"):
        print(f"unlearn: note: run {run.manifest.run} uses the test model {model!r}, a fixed random network: "
              f"its predictions and accuracy mean nothing", file=sys.stderr)


def _decision(p: dict, aggregate: str, voters: int) -> str:
    """How a SISA ensemble reached a label: the votes, and for mean/weighted the probabilities
    that decided (they can disagree with the votes)."""
    names = list(p["votes"])
    order = sorted(names, key=lambda n: (-p["votes"][n], names.index(n)))
    votes = ", ".join(f"{n} {p['votes'][n]}/{voters}" for n in order)
    probs = ", ".join(f"{n} {p['probabilities'][n]:.3f}" for n in order)
    if aggregate != "vote":
        return f"{aggregate} probability {probs} (votes {votes})"
    top = [n for n in names if p["votes"][n] == p["votes"][order[0]]]
    tie = f"; tie broken by mean probability ({probs})" if len(top) > 1 else ""
    return f"votes {votes}{tie}"


def _predict_text(out: dict) -> str:
    lines = []
    for p in out["predictions"]:
        if "votes" in p:  # SISA: an ensemble of shard models
            how = _decision(p, out.get("aggregate", "vote"), len(out.get("shards", [])))
        else:  # ERASE: one model's label probabilities
            how = "probability " + ", ".join(f"{k} {v:.3f}" for k, v in p["probabilities"].items())
        lines.append(f"{p['label']}\t{how}\t{p['text'][:60]}")
    return "\n".join(lines)


def _needs_labels(run, command: str) -> None:
    config = run.manifest.config
    if getattr(config, "objective", None) == "lm" and not config.labels:
        raise UnlearnError(f"run {run.manifest.run} learned prompt/completion records: it has no labels to "
                           f"{command}; use `unlearn generate`")


def _predict(args, store, run) -> int:
    from core.sources import load_texts

    _needs_labels(run, "predict")
    texts = load_texts(args.input)
    _note_test_model(run)
    serving, serve = _serving(args, store, run)
    out = serving.predict(texts, serve, getattr(args, "aggregate", "vote"), args.wait)
    out.pop("probs", None)
    _warn_problems(serving)
    if not args.json and out.get("quarantined"):
        what = "prompt examples" if run.manifest.method == "erase" else "shards"
        print(f"unlearn: {what} {out['quarantined']} withheld (an acknowledged deletion is being applied); "
              f"answered without them", file=sys.stderr)
    _emit(args, out, _predict_text(out))
    return 0


def _generate(args, store, run) -> int:
    from cluster.quarantine import Serving
    from core.sources import load_texts

    if run.config.objective != "lm":
        raise UnlearnError(f"run {args.run} is a classifier (objective classify): only runs trained with "
                           "--objective lm generate text; use predict")
    if args.shard is not None and not 0 <= args.shard < run.config.shards:
        raise UnlearnError(f"--shard {args.shard}: run {args.run} has shards 0..{run.config.shards - 1}")
    if args.shard is not None and not run.manifest.shards[args.shard].records:
        raise UnlearnError(f"--shard {args.shard}: run {args.run}'s shard {args.shard} holds no records")
    prompts = load_texts(args.input, fields=("text", "prompt"))
    _note_test_model(run)
    serving = Serving(store, args.run)
    out = serving.generate(prompts, run._executor(False).next_token_probs, args.max_new_tokens, args.shard, args.wait)
    _warn_problems(serving)
    if not args.json and out.get("quarantined"):
        print(f"unlearn: shards {out['quarantined']} withheld (an acknowledged deletion is being applied); "
              f"generated without them", file=sys.stderr)
    _emit(args, out, "\n".join(f"{g['prompt'][:60]}\t->{g['completion']}" for g in out["generations"]))
    return 0


def _evaluate(args, store, run) -> dict:
    """Accuracy on labelled records from what may answer now (quarantined shards or
    examples left out, and named)."""
    import time

    from core.sources import load_records
    from sisa.run import check_labels, evaluation

    _needs_labels(run, "evaluate")
    records = load_records(args.data)
    check_labels(run.config, records)
    _note_test_model(run)
    texts = [r.text for r in records]
    serving, serve = _serving(args, store, run)
    if run.manifest.method == "erase":
        import numpy as np

        t0 = time.perf_counter()
        answer = serving.predict(texts, serve)
        seconds = time.perf_counter() - t0
        index = {label: i for i, label in enumerate(run.config.labels)}
        truth = np.array([index[r.label] for r in records])
        out = {"method": "erase", "records": len(records), "shots": len(answer["examples"]),
               "accuracy": round(float((answer["probs"].argmax(axis=1) == truth).mean()), 6) if records else None,
               "seconds_per_query": round(seconds / max(1, len(records)), 6),
               "withheld_examples": answer["withheld_examples"]}
    else:
        manifest, shards, probs, quarantined, _ = serving.shards(serve, texts)
        out = {**evaluation(manifest, records, shards, probs, args.aggregate), "quarantined": quarantined}
    _warn_problems(serving)
    return out


def train_erase(args, store, progress: bool) -> int:
    from erase.config import EraseConfig
    from erase.run import EraseRun
    from core.records import quote
    from core.sources import load_records
    from core.records import with_labels

    config = EraseConfig(shots=args.shots, partitions=args.partitions, eps=args.eps, gamma=args.gamma,
                         iters=args.iters, seed=args.seed, per_label=args.per_label, embedder=args.embedder,
                         lm=args.lm, calibrate=args.calibrate, labels=tuple(_split(args.labels, "labels")) if args.labels else ())
    from erase.icl import PRESETS as LM_PRESETS
    from core.assets import resolve_model

    if args.lm not in LM_PRESETS:  # fail now, not at the first predict
        resolve_model(args.lm, "--lm", LM_PRESETS)
    store.check()
    if EraseRun.exists(store, args.run):
        raise UnlearnError(f"run {quote(args.run)} already exists in {store.uri}; choose another --run")
    records = load_records(args.data)
    opt.check_layout(args, records)
    config = with_labels(config, records)
    pool = _erase_pool(args, store, config)
    run = EraseRun.train(store, args.run, records, config, progress=progress, pool=pool,
                         embed_workers=args.embed_workers)
    st = run.status()
    _emit(args, st, _erase_status_text(st) + f"\ntrained in {st['stats']['train_seconds']:.1f} s")
    return 0


def _erase_pool(args, store, config):
    """ERASE partitions in Ray actors (one per partition), or None: in this process."""
    if args.runtime != "ray":
        return None
    from cluster.runtime import erase_pool, init_ray

    init_ray(args.address)
    return erase_pool(store, args.run, config, args.actor_cpus)


def _erase_status_text(st: dict) -> str:
    c = st["config"]
    lines = [f"run {st['run']} (erase, version {st['version']}) in {st['store']}: {st['records']} records, "
             f"{c['shots']} shots, {c['partitions']} partitions, embedder {c['embedder']}, lm {c['lm']}",
             f"  digest {st['digest'][:16]}  deletions {st['stats'].get('deletions', 0)}: certified "
             f"{st['stats'].get('certified', 0)}, partition re-fits {st['stats'].get('partition_refits', 0)}, "
             f"root re-fits {st['stats'].get('root_refits', 0)}",
             "  prompt examples: " + " ".join(st["selected_ids"])]
    return "\n".join(lines)


def erase_command(args, store, progress: bool) -> int:
    from erase.run import EraseRun

    # In this process: deletions on Ray go to the coordinator actor (whose partition actors
    # hold the state), and verify must not disturb those actors with its fresh clustering.
    run = EraseRun.open(store, args.run)
    if args.command == "delete":
        receipt = _delete(args, store, run, progress)
        receipt["selected_ids"] = EraseRun.open(store, args.run).manifest.selected_ids  # not kept in the log
        d = receipt["details"]
        text = (f"deleted {len(receipt['ids'])} records from run {receipt['run']} in {receipt['seconds']:.3f} s "
                f"(clustering {d.get('cluster_seconds', 0):.4f} s): partitions {receipt['shards'] or 'none'}; "
                f"certificate held for {d.get('certified', 0)}, re-clustered {d.get('reclustered_partitions', [])}"
                f"{', root re-fit' if d.get('root_refit') else ''}; selection "
                f"{'CHANGED' if d.get('selection_changed') else 'unchanged'}; purged {receipt['purged_objects']} objects")
        text = _receipt_text(receipt, text)
        if d.get("selection_changed"):
            text += "\nprompt examples now: " + " ".join(receipt["selected_ids"])
        _emit(args, receipt, text)
        return 0
    if args.command == "verify":
        report = _unchanged_during(store, args.run, lambda: run.verify(progress=progress,
                                                                         embed_workers=args.embed_workers))
        text = (f"exact: a fresh clustering of the {report['records']} retained records gives the same state "
                f"(digest {report['digest'][:16]}) and the same {len(report['selected_ids'])} examples"
                if report["exact"] else "NOT EXACT: " + "; ".join(report["problems"]))
        _emit(args, report, text)
        return 0 if report["exact"] else 3
    if args.command == "status":
        st = _with_warm(args, store, _with_queue(store, run.status()))
        _emit(args, st, _erase_status_text(st) + _queue_text(st) + _warm_text(st))
        return 0
    if args.command == "predict":
        return _predict(args, store, run)
    if args.command == "eval":
        out = _evaluate(args, store, run)
        _emit(args, out, f"accuracy (erase, {out['shots']}-shot, {out['records']} records): {out['accuracy']:.4f}; "
                         f"{out['seconds_per_query'] * 1000:.1f} ms per query")
        return 0
    if args.command == "serve":
        return _serve(args, store)
    if args.command == "requests":
        return _requests(args, store)
    if args.command == "resume":
        return _resume(args, store, run, progress)
    if args.command == "generate":
        raise UnlearnError(f"run {args.run} is an ERASE run: it classifies with a frozen LM; only SISA runs "
                           "trained with --objective lm generate text")
    raise AssertionError(args.command)


def run_command(args) -> int:
    if args.command in ("profile", "plan"):
        from cluster.capacity.commands import run

        return run(args)
    if args.command in ("up", "down"):
        from cluster.up_cli import run

        return run(args)
    from cluster.up_cli import attach

    args.on_up = attach(args) if hasattr(args, "runtime") or args.command in ("status", "drop") else False
    from core.records import quote
    from core.sources import load_records
    from cluster.runtime import make_executor
    from sisa.run import SisaRun, config_for
    from core.store import open_store

    progress = not args.quiet
    opt.check_options(args)
    store = open_store(args.store)
    if args.command == "train" and args.method == "erase":
        return train_erase(args, store, progress)
    if args.command == "train" and args.source is not None:
        approx = ApproxConfig(method=args.approx, steps=args.approx_steps, lr=args.approx_lr, omega=args.approx_omega)
        run = SisaRun.start_approx(store, args.run, args.source, approx)
        st = run.status()
        _emit(args, st, _status_text(st))
        return 0
    if args.command == "train":
        from sisa.config import SisaConfig

        extra = {"device": args.device} if args.device != "cpu" else {}
        if args.objective == "lm":
            extra["objective"] = "lm"
        if args.method == "approx":
            extra["approx"] = ApproxConfig(method=args.approx, steps=args.approx_steps, lr=args.approx_lr,
                                           omega=args.approx_omega).to_json()
        model = args.model or ("smollm2-135m" if args.objective == "lm" else "minilm")
        config = SisaConfig(
            shards=args.shards, slices=args.slices, epochs=args.epochs, seed=args.seed, model=model,
            labels=tuple(_split(args.labels, "labels")) if args.labels else (), lora_r=args.lora_r,
            lora_alpha=args.lora_alpha, learning_rate=args.lr, batch_size=args.batch_size, max_length=args.max_length,
            extra=extra)
        store.check()
        if SisaRun.exists(store, args.run):
            raise UnlearnError(f"run {quote(args.run)} already exists in {store.uri}; choose another --run")
        records = load_records(args.data)
        warning = opt.check_layout(args, records)
        config = config_for(config, records)
        executor = make_executor(args.runtime, store, args.run, config, progress, args.address, args.actor_cpus,
                                 args.actor_gpus)
        run = SisaRun.train(store, args.run, records, config, progress=progress, executor=executor)
        if warning:  # once trained: a failed command says one line
            print(f"unlearn: warning: {warning}", file=sys.stderr)
        st = run.status()
        _emit(args, st, _status_text(st))
        return 0
    if args.command == "drop":
        from core.stored_run import StoredRun, check_run_name

        check_run_name(args.run)
        if not StoredRun.leftovers(store, args.run):  # a HEAD, or what a killed train left
            if args.missing_ok:
                _emit(args, {"run": args.run, "dropped_objects": 0}, f"run {args.run} does not exist; nothing to drop")
                return 0
            raise UnlearnError(f"run {quote(args.run)} not found in store {store.uri}")
        _stop_warm_coordinator(args, store)
        n = SisaRun.drop(store, args.run)
        _emit(args, {"run": args.run, "dropped_objects": n}, f"dropped run {args.run}: {n} objects purged")
        return 0
    if args.command == "unlock":
        from core.lock import force_unlock

        removed = force_unlock(store, args.run, args.force)
        _emit(args, {"run": args.run, "unlocked": removed},
              f"removed the lock of run {args.run}" if removed else f"run {args.run} was not locked")
        return 0
    from core.stored_run import check_run_name, run_method

    if args.command == "requests":  # the log alone: readable even if the manifest is not
        check_run_name(args.run)
        return _requests(args, store)
    if args.command == "audit":
        return _audit(args, store, progress)
    if run_method(store, args.run) == "erase":
        return erase_command(args, store, progress)
    run = SisaRun.open(store, args.run)
    if hasattr(args, "runtime"):
        run.executor = make_executor(args.runtime, store, args.run, run.config, progress, args.address,
                                     args.actor_cpus, args.actor_gpus)
    if args.command == "delete":
        receipt = _delete(args, store, run, progress)
        approx = run.config.approx
        text = (f"unlearned {len(receipt['ids'])} records from run {receipt['run']} in {receipt['seconds']:.1f} s "
                f"by {approx.method} ({approx.steps} steps, in place): APPROXIMATE, not verifiable; purged "
                f"{receipt['purged_objects']} objects") if approx else (f"deleted {len(receipt['ids'])} records from run {receipt['run']} in {receipt['seconds']:.1f} s: "
                f"retrained shards {receipt['shards'] or 'none'}"
                + "".join(f", shard {k} from stage {v[0]}" for k, v in receipt["stages_redone"].items())
                + "; "
                f"{receipt['retrain_fraction']:.3f} of a full training; purged {receipt['purged_objects']} objects")
        _emit(args, receipt, _receipt_text(receipt, text))
        return 0
    if args.command == "verify":
        report = _unchanged_during(store, args.run, lambda: run.verify(shards=args.shard, progress=progress))
        lines = [f"shard {r['shard']:>3}: {'bit-identical' if r['match'] else 'MISMATCH: ' + '; '.join(r['problems'])}"
                 for r in report["shards"]]
        lines.append("exact: every checked shard equals a from-scratch retrain" if report["exact"]
                     else "NOT EXACT: see the shards above")
        _emit(args, report, "\n".join(lines))
        return 0 if report["exact"] else 3
    if args.command == "serve":
        return _serve(args, store)
    if args.command == "requests":
        return _requests(args, store)
    if args.command == "resume":
        return _resume(args, store, run, progress)
    if args.command == "status":
        st = _with_warm(args, store, _with_queue(store, run.status()))
        _emit(args, st, _status_text(st) + _queue_text(st) + _warm_text(st))
        return 0
    if args.command == "predict":
        return _predict(args, store, run)
    if args.command == "generate":
        return _generate(args, store, run)
    if args.command == "eval":
        out = _evaluate(args, store, run)
        lines = [f"accuracy ({out['aggregate']} over {len(out['shards'])} shards, {out['records']} records): {out['accuracy']:.4f}"]
        lines += [f"  shard {s['shard']:>3}: {s['accuracy']:.4f}" for s in out["shards"]]
        _emit(args, out, "\n".join(lines))
        return 0
    raise AssertionError(args.command)


def main(argv: Sequence[str] | None = None) -> int:
    """The console script. Output into a closed pipe (`unlearn ... | head -1`) ends the
    command quietly with status 1, as Python's documentation recommends."""
    try:
        try:
            code = _main(argv)
        except SystemExit:  # --help and usage errors: their text may meet a closed pipe too
            sys.stdout.flush()
            raise
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's last flush must not fail again
        return 1


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run_command(args)
    except opt.OptionError as exc:  # a usage error found after parsing: said the way argparse says them
        print(f"unlearn: error: {args.command}: {exc}; see unlearn {args.command} --help", file=sys.stderr)
        return 2
    except BrokenPipeError:
        raise
    except UnlearnError as exc:
        print(f"unlearn: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # disk full, permissions, ... outside the store interface
        where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
        print(f"unlearn: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("unlearn: interrupted; the store keeps its last committed state", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
