//! Tests that need no model and no downloaded data: prompt strings per task shape (hand-written docs),
//! HellaSwag preprocessing, WinoGrande partial scoring, metrics, readers and their error messages.
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use serde_json::{json, Value};

use qtale_eval::data::{read_rows, Row};
use qtale_eval::metrics::{argmax, csqa7_average, mean_stderr, DocScore, TaskMetrics};
use qtale_eval::ppl::{windows, WindowConfig};
use qtale_eval::report::format_utc;
use qtale_eval::scorer::truncate_request;
use qtale_eval::tasks::{build_doc, hellaswag_preprocess, load_task, py_capitalize, McDoc};
use qtale_eval::{EvalError, LlRequest, TaskId};

fn row(v: Value) -> Row {
    Row {
        path: Arc::new(PathBuf::from("mem.jsonl")),
        row: 7,
        value: v.as_object().unwrap().clone(),
    }
}

/// A registered task by name.
fn t(name: &str) -> TaskId {
    TaskId::parse(name).unwrap()
}

fn doc(task: TaskId, v: Value) -> McDoc {
    build_doc(task, 0, &row(v)).unwrap()
}

fn pairs(d: &McDoc) -> Vec<(&str, &str)> {
    d.requests
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect()
}

#[test]
fn arc_prompts_from_raw_fields_and_from_olmes_docs() {
    let raw = doc(
        t("arc_easy"),
        json!({"question": "Which is a gas?", "choices": {"text": ["ice", "steam"], "label": ["A", "B"]}, "answerKey": "B"}),
    );
    assert_eq!(
        pairs(&raw),
        [
            ("Question: Which is a gas?\nAnswer:", " ice"),
            ("Question: Which is a gas?\nAnswer:", " steam")
        ]
    );
    assert_eq!(raw.gold, 1);
    let olmes = doc(
        t("arc_challenge"),
        json!({"query": "Question: Which is a gas?\nAnswer:", "choices": ["ice", "steam"], "gold": 1}),
    );
    assert_eq!(olmes.requests, raw.requests);
    assert_eq!(olmes.gold, 1);
    // Numeric labels ("1".."4") as some ARC rows have.
    let num = doc(
        t("arc_easy"),
        json!({"question": "Q", "choices": {"text": ["a", "b", "c"], "label": ["1", "2", "3"]}, "answerKey": "3"}),
    );
    assert_eq!(num.gold, 2);
}

#[test]
fn openbookqa_uses_the_bare_question_stem() {
    let d = doc(
        t("openbookqa"),
        json!({"question_stem": "The sun is responsible for", "choices": {"text": ["puppies learning new tricks", "plants sprouting"], "label": ["A", "B"]}, "answerKey": " B"}),
    );
    assert_eq!(
        pairs(&d),
        [
            ("The sun is responsible for", " puppies learning new tricks"),
            ("The sun is responsible for", " plants sprouting")
        ]
    );
    assert_eq!(d.gold, 1);
    let o = doc(
        t("openbookqa"),
        json!({"query": "Question: The sun is responsible for\nAnswer:", "choices": ["puppies learning new tricks", "plants sprouting"], "gold": 1}),
    );
    assert_eq!(o.requests, d.requests);
}

#[test]
fn boolq_choices_are_no_then_yes() {
    // google/boolq (no title): only as `boolq_google`.
    let d = doc(
        t("boolq_google"),
        json!({"question": "is water wet", "answer": true, "passage": "Water is a liquid."}),
    );
    assert_eq!(
        pairs(&d),
        [
            (
                "Water is a liquid.\nQuestion: is water wet?\nAnswer:",
                " no"
            ),
            (
                "Water is a liquid.\nQuestion: is water wet?\nAnswer:",
                " yes"
            )
        ]
    );
    assert_eq!(d.gold, 1);
    let f = doc(
        t("boolq_google"),
        json!({"question": "q", "answer": false, "passage": "p"}),
    );
    assert_eq!(f.gold, 0);
}

/// lm-eval's `boolq` is `super_glue/boolq`: `{title} -- {passage}`. The same doc from its three
/// layouts (OLMES request doc, HF super_glue, original JSONL with `title`) gives one prompt.
#[test]
fn boolq_is_the_super_glue_form_from_every_layout() {
    let want = [
        (
            "Water -- Water is a liquid.\nQuestion: is water wet?\nAnswer:",
            " no",
        ),
        (
            "Water -- Water is a liquid.\nQuestion: is water wet?\nAnswer:",
            " yes",
        ),
    ];
    // OLMES lists the choices yes-first; `gold` indexes that list.
    let olmes = doc(
        t("boolq"),
        json!({"idx": 0, "query": "Water -- Water is a liquid.\nQuestion: is water wet?\nAnswer:", "choices": ["yes", "no"], "gold": 0}),
    );
    assert_eq!(pairs(&olmes), want);
    assert_eq!(olmes.gold, 1);
    let no = doc(
        t("boolq"),
        json!({"query": "T -- p\nQuestion: q?\nAnswer:", "choices": ["yes", "no"], "gold": 1}),
    );
    assert_eq!(no.gold, 0);
    assert_eq!(no.requests[0].0, "T -- p\nQuestion: q?\nAnswer:");
    // A passage that itself mentions "Question:" on a new line: the last one starts the question.
    let tricky = doc(
        t("boolq"),
        json!({"query": "T -- a\nQuestion: x? no\nQuestion: q?\nAnswer:", "choices": ["yes", "no"], "gold": 0}),
    );
    assert_eq!(
        tricky.requests[0].0,
        "T -- a\nQuestion: x? no\nQuestion: q?\nAnswer:"
    );
    let hf = doc(
        t("boolq"),
        json!({"question": "is water wet", "passage": "Water -- Water is a liquid.", "idx": 0, "label": 1}),
    );
    assert_eq!(pairs(&hf), want);
    assert_eq!(hf.gold, 1);
    let jsonl = doc(
        t("boolq"),
        json!({"question": "is water wet", "title": "Water", "passage": "Water is a liquid.", "answer": true}),
    );
    assert_eq!(pairs(&jsonl), want);
    assert_eq!(jsonl.gold, 1);
}

#[test]
fn boolq_forms_are_not_mixed_up() {
    // The untitled google form as `boolq` would silently change every prompt: refused, naming the way out.
    let e = build_doc(
        t("boolq"),
        0,
        &row(json!({"question": "q", "answer": true, "passage": "p"})),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("mem.jsonl") && e.contains("boolq_google"), "{e}");
    for v in [
        json!({"query": "T -- p\nQuestion: q?\nAnswer:", "choices": ["yes", "no"], "gold": 0}),
        json!({"question": "q", "passage": "T -- p", "label": 1}),
        json!({"question": "q", "title": "T", "passage": "p", "answer": true}),
    ] {
        let e = build_doc(t("boolq_google"), 0, &row(v))
            .unwrap_err()
            .to_string();
        assert!(e.contains("use task `boolq`"), "{e}");
    }
    // Malformed OLMES docs name the field.
    let e = build_doc(
        t("boolq"),
        0,
        &row(json!({"query": "T -- p\nQuestion: q?", "choices": ["yes", "no"], "gold": 0})),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("query"), "{e}");
    let e = build_doc(
        t("boolq"),
        0,
        &row(json!({"query": "T -- p\nQuestion: q?\nAnswer:", "choices": ["true", "false"], "gold": 0})),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("choices") && e.contains("\"true\""), "{e}");
    assert_eq!(TaskId::parse("boolq_google").unwrap(), t("boolq_google"));
    assert_eq!(t("boolq_google").name(), "boolq_google");
    assert!(!qtale_eval::tasks::CSQA7.contains(&"boolq_google"));
}

#[test]
fn piqa_and_siqa_prompts() {
    let p = doc(
        t("piqa"),
        json!({"goal": "To open a jar", "sol1": "twist the lid", "sol2": "eat the lid", "label": 0}),
    );
    assert_eq!(
        pairs(&p),
        [
            ("Question: To open a jar\nAnswer:", " twist the lid"),
            ("Question: To open a jar\nAnswer:", " eat the lid")
        ]
    );
    assert_eq!(p.gold, 0);
    let s = doc(
        t("social_iqa"),
        json!({"context": "Tracy gave a gift.", "question": "How would Tracy feel?", "answerA": "happy", "answerB": "sad", "answerC": "bored", "label": "3"}),
    );
    assert_eq!(
        s.requests[2],
        (
            "Q: Tracy gave a gift. How would Tracy feel?\nA:".to_string(),
            " bored".to_string()
        )
    );
    assert_eq!(s.gold, 2);
}

#[test]
fn hellaswag_preprocessing_edge_cases() {
    // Expected values computed with lm-eval's own `preprocess` (Python).
    assert_eq!(
        hellaswag_preprocess(
            "Home and Garden: [header] How to clean a grill. [title] Scrub it. Then he"
        ),
        "Home and Garden: How to clean a grill.. Scrub it. Then he"
    );
    assert_eq!(
        hellaswag_preprocess(" [step] Leading bracket step."),
        " Leading bracket step."
    );
    assert_eq!(hellaswag_preprocess("a   b  c"), "a  b c");
    assert_eq!(
        hellaswag_preprocess("keep [unclosed bracket"),
        "keep [unclosed bracket"
    );
    assert_eq!(hellaswag_preprocess("a [x\ny] b [z] c"), "a [x\ny] b c");
    assert_eq!(hellaswag_preprocess("[title] Start"), " Start");
    assert_eq!(hellaswag_preprocess("x [title]y"), "x. y");
    assert_eq!(
        hellaswag_preprocess("Ünïcode [a][b]  done  "),
        "Ünïcode  done"
    );
    assert_eq!(py_capitalize("tHE MAN IS"), "The man is");
    assert_eq!(py_capitalize("élan VITAL"), "Élan vital");
    assert_eq!(py_capitalize(""), "");

    let d = doc(
        t("hellaswag"),
        json!({
            "activity_label": "Home and Garden",
            "ctx_a": "[header] How to clean a grill. [title] Scrub it.",
            "ctx_b": "tHEN he",
            "endings": ["[step] Leading bracket step.", "rinses   it.", "dries it [x].", "stops."],
            "label": "2"
        }),
    );
    let ctx = "Home and Garden: How to clean a grill.. Scrub it. Then he";
    assert_eq!(
        pairs(&d),
        [
            (ctx, "  Leading bracket step."), // leading-space ending: two spaces kept
            (ctx, " rinses  it."),
            (ctx, " dries it ."),
            (ctx, " stops.")
        ]
    );
    assert_eq!(d.gold, 2);
    // acc_norm lengths count the ending as preprocessed, including its leading space.
    assert_eq!(d.choice_lens(), vec![22, 11, 10, 6]);
}

#[test]
fn winogrande_partial_scoring() {
    let d = doc(
        t("winogrande"),
        json!({"sentence": "The trophy didn't fit in the suitcase because _ was too big.", "option1": "the trophy", "option2": "the suitcase", "answer": "1"}),
    );
    assert_eq!(
        pairs(&d),
        [
            (
                "The trophy didn't fit in the suitcase because the trophy",
                " was too big."
            ),
            (
                "The trophy didn't fit in the suitcase because the suitcase",
                " was too big."
            )
        ]
    );
    assert_eq!(d.gold, 0);
    let d2 = doc(
        t("winogrande"),
        json!({"sentence": "Ann asked Mary because _ knew.  ", "option1": "Ann", "option2": "Mary", "answer": "2"}),
    );
    assert_eq!(d2.requests[1].1, " knew.");
    assert_eq!(d2.gold, 1);
    let bad = build_doc(
        t("winogrande"),
        0,
        &row(json!({"sentence": "no blank", "option1": "a", "option2": "b", "answer": "1"})),
    )
    .unwrap_err()
    .to_string();
    assert!(
        bad.contains("mem.jsonl") && bad.contains("row 7") && bad.contains("sentence"),
        "{bad}"
    );
}

#[test]
fn copa_csqa_sciq_prompts() {
    let c = doc(
        t("copa"),
        json!({"premise": "The man turned on the faucet.", "choice1": "The toilet filled.", "choice2": "Water flowed.", "question": "effect", "label": 1}),
    );
    assert_eq!(
        pairs(&c),
        [
            (
                "The man turned on the faucet therefore",
                "  the toilet filled."
            ),
            ("The man turned on the faucet therefore", "  water flowed.")
        ]
    );
    let q = doc(
        t("commonsense_qa"),
        json!({"question": " Where? ", "choices": {"label": ["A","B","C","D","E"], "text": ["a","b","c","d","e"]}, "answerKey": "C"}),
    );
    assert_eq!(
        q.requests[0].0,
        "Question: Where?\nA. a\nB. b\nC. c\nD. d\nE. e\nAnswer:"
    );
    assert_eq!(q.requests[4].1, " E");
    assert_eq!(q.gold, 2);
    let s = doc(
        t("sciq"),
        json!({"question": "Q?", "distractor1": "x", "distractor2": "y", "distractor3": "z", "correct_answer": "w", "support": "  S."}),
    );
    assert_eq!(
        s.requests[3],
        ("S.\nQuestion: Q?\nAnswer:".to_string(), " w".to_string())
    );
    assert_eq!(s.gold, 3);
}

#[test]
fn acc_norm_counts_characters_not_bytes() {
    let d = doc(
        t("piqa"),
        json!({"goal": "g", "sol1": "ééé", "sol2": "abcd", "label": 1}),
    );
    assert_eq!(d.choice_lens(), vec![3, 4]);
    // -3.3/3 = -1.1 < -4/4 = -1.0, so acc_norm picks choice 1; by bytes (6) it would pick choice 0.
    let s = DocScore::new(
        0,
        d.gold,
        vec![-3.3, -4.0],
        vec![false, false],
        d.choice_lens(),
    );
    assert_eq!((s.pred, s.pred_norm), (0, 1));
    assert_eq!((s.acc, s.acc_norm), (0.0, 1.0));
}

#[test]
fn metrics_mean_stderr_argmax_and_csqa7() {
    let m = mean_stderr(&[1.0, 0.0, 1.0, 1.0]);
    assert!((m.mean - 0.75).abs() < 1e-12 && (m.stderr - 0.25).abs() < 1e-12);
    assert_eq!(argmax(&[1.0, 3.0, 3.0]), 1);
    assert_eq!(argmax(&[f64::NAN, -1.0]), 1);
    let docs: Vec<DocScore> = (0..4)
        .map(|i| DocScore::new(i, 0, vec![-1.0, -2.0], vec![true, false], vec![1, 1]))
        .collect();
    let all: Vec<(TaskId, TaskMetrics)> = qtale_eval::tasks::CSQA7
        .iter()
        .map(|&n| (t(n), TaskMetrics::from_docs(t(n), &docs)))
        .collect();
    let refs: Vec<(TaskId, &TaskMetrics)> = all.iter().map(|(t, m)| (*t, m)).collect();
    assert_eq!(csqa7_average(&refs), Some(1.0));
    assert_eq!(csqa7_average(&refs[..6]), None);
    assert!(all[0].1.acc_norm.is_some()); // piqa
    assert!(all[1].1.acc_norm.is_none()); // boolq
}

#[test]
fn task_lists_parse() {
    assert_eq!(TaskId::parse_list("core8").unwrap().len(), 8);
    assert_eq!(
        TaskId::parse_list("arc_e,hellaswag,arc_easy").unwrap(),
        [t("arc_easy"), t("hellaswag")]
    );
    assert!(TaskId::parse_list("nope").is_err());
}

/// The registry holds the built-in tasks in table order, each reachable by name and aliases, names
/// serialize as strings (the results files' keys), and a registration that would shadow a name, an
/// alias or a group is refused.
#[test]
fn task_registry_names_order_and_refusals() {
    let names = qtale_eval::tasks::names();
    assert_eq!(
        names[..12],
        [
            "piqa",
            "boolq",
            "boolq_google",
            "social_iqa",
            "arc_easy",
            "arc_challenge",
            "winogrande",
            "openbookqa",
            "hellaswag",
            "copa",
            "commonsense_qa",
            "sciq"
        ]
    );
    for task in qtale_eval::tasks::all() {
        let spec = task.spec();
        assert_eq!(t(spec.name), task);
        for a in spec.aliases {
            assert_eq!(t(a), task, "{a}");
        }
        assert_eq!(serde_json::to_value(task).unwrap(), json!(spec.name));
    }
    assert_eq!(t(" ARC-E "), t("arc_easy"));
    assert_eq!(t("siqa").label(), "SIQA");
    assert!(t("hellaswag").has_acc_norm() && !t("winogrande").has_acc_norm());
    let e = TaskId::parse("mmlu").unwrap_err().to_string();
    assert!(e.contains("mmlu") && e.contains("commonsense_qa"), "{e}");

    fn none(_: usize, r: &Row) -> qtale_eval::Result<McDoc> {
        Err(r.err("x", "unused"))
    }
    static SPEC: qtale_eval::TaskSpec = qtale_eval::TaskSpec {
        name: "piqa",
        aliases: &[],
        label: "x",
        acc_norm: false,
        full_count: 1,
        split: "test",
        file: "x.jsonl",
        note: None,
        build_doc: none,
    };
    static ALIAS: qtale_eval::TaskSpec = qtale_eval::TaskSpec {
        name: "piqa_again",
        aliases: &["obqa"],
        ..SPEC
    };
    static GROUP: qtale_eval::TaskSpec = qtale_eval::TaskSpec {
        name: "csqa7",
        ..SPEC
    };
    static UPPER: qtale_eval::TaskSpec = qtale_eval::TaskSpec {
        name: "Piqa-2",
        ..SPEC
    };
    for (spec, needle) in [
        (&SPEC, "already registered"),
        (&ALIAS, "`obqa` is already registered"),
        (&GROUP, "group"),
        (&UPPER, "lower case"),
    ] {
        let e = qtale_eval::tasks::register(spec).unwrap_err().to_string();
        assert!(e.contains(needle), "{e}");
    }
    assert!(TaskId::parse("piqa_again").is_err());
}

#[test]
fn csqa7_stderr_combines_the_tasks() {
    let docs: Vec<DocScore> = (0..4)
        .map(|i| DocScore::new(i, i % 2, vec![-1.0, -2.0], vec![true, false], vec![1, 1]))
        .collect();
    let all: Vec<(TaskId, TaskMetrics)> = qtale_eval::tasks::CSQA7
        .iter()
        .map(|&n| (t(n), TaskMetrics::from_docs(t(n), &docs)))
        .collect();
    let refs: Vec<(TaskId, &TaskMetrics)> = all.iter().map(|(t, m)| (*t, m)).collect();
    let c = qtale_eval::metrics::csqa7(&refs).unwrap();
    // Every task: mean 0.5, stderr sqrt(1/3 / 4); seven of them combine to sqrt(7) * se / 7.
    let se = (1.0f64 / 3.0 / 4.0).sqrt();
    assert!((c.mean - 0.5).abs() < 1e-12);
    assert!((c.stderr - se * 7f64.sqrt() / 7.0).abs() < 1e-12, "{c:?}");
}

#[test]
fn truncation_windows_and_dates() {
    let r = LlRequest {
        context: (0..10).collect(),
        continuation: vec![100, 101],
    };
    assert_eq!(truncate_request(&r, 100), r);
    let t = truncate_request(&r, 6);
    assert_eq!(t.context, vec![5, 6, 7, 8, 9]);
    assert_eq!(t.context.len() + t.continuation.len() - 1, 6);
    let ids: Vec<i64> = (0..10).collect();
    let cfg = WindowConfig {
        window: 4,
        bos: None,
        max_windows: None,
    };
    assert_eq!(windows(&ids, &cfg), vec![&ids[0..4], &ids[4..8]]);
    assert_eq!(format_utc(0), "1970-01-01T00:00:00Z");
    assert_eq!(format_utc(1_700_000_000), "2023-11-14T22:13:20Z");
    assert_eq!(format_utc(951_782_400), "2000-02-29T00:00:00Z");
}

// ---- readers -------------------------------------------------------------------------------------

fn piqa_batch(labels: Vec<Option<i64>>) -> arrow::record_batch::RecordBatch {
    use arrow::array::{ArrayRef, Int64Array, StringArray};
    let n = labels.len();
    let goal: ArrayRef = Arc::new(StringArray::from(
        (0..n).map(|i| format!("goal {i}")).collect::<Vec<_>>(),
    ));
    let sol1: ArrayRef = Arc::new(StringArray::from(vec!["a"; n]));
    let sol2: ArrayRef = Arc::new(StringArray::from(vec!["b"; n]));
    let label: ArrayRef = Arc::new(Int64Array::from(labels));
    arrow::record_batch::RecordBatch::try_from_iter([
        ("goal", goal),
        ("sol1", sol1),
        ("sol2", sol2),
        ("label", label),
    ])
    .unwrap()
}

#[test]
fn arrow_stream_parquet_and_jsonl_gz_read_the_same_docs() {
    let dir = tempfile::tempdir().unwrap();
    let batch = piqa_batch(vec![Some(0), Some(1), Some(1)]);
    let arrow_path = dir.path().join("data-00000-of-00001.arrow");
    {
        let f = std::fs::File::create(&arrow_path).unwrap();
        let mut w = arrow::ipc::writer::StreamWriter::try_new(f, &batch.schema()).unwrap();
        w.write(&batch).unwrap();
        w.finish().unwrap();
    }
    let pq_path = dir.path().join("validation-00000-of-00001.parquet");
    {
        let f = std::fs::File::create(&pq_path).unwrap();
        let mut w = parquet::arrow::ArrowWriter::try_new(f, batch.schema(), None).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
    }
    let gz_path = dir.path().join("piqa.jsonl.gz");
    {
        let f = std::fs::File::create(&gz_path).unwrap();
        let mut w = flate2::write::GzEncoder::new(f, flate2::Compression::default());
        let labels = [0, 1, 1];
        for (i, l) in labels.iter().enumerate() {
            let v = json!({"goal": format!("goal {i}"), "sol1": "a", "sol2": "b", "label": l});
            writeln!(w, "{v}").unwrap();
        }
        w.finish().unwrap();
    }
    let a = load_task(t("piqa"), dir.path(), Some(&arrow_path), None).unwrap();
    let p = load_task(t("piqa"), dir.path(), Some(&pq_path), None).unwrap();
    let g = load_task(t("piqa"), dir.path(), Some(&gz_path), Some(2)).unwrap();
    assert_eq!(a.docs.len(), 3);
    assert_eq!(a.docs, p.docs);
    assert_eq!(g.docs[..], a.docs[..2]);
    assert_eq!(g.available, 3);
    assert_eq!(a.docs[1].requests[0].0, "Question: goal 1\nAnswer:");
}

/// The OLMES BoolQ request file (`--data-file boolq=.../rc_0shot/requests.jsonl.gz`): one row per
/// (doc, choice), unconditional copies at doc_id + 1000000; docs come back once each, in doc_id
/// order, in the super_glue form, and the results note says so.
#[test]
fn boolq_loads_from_an_olmes_request_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("requests.jsonl.gz");
    {
        let f = std::fs::File::create(&path).unwrap();
        let mut w = flate2::write::GzEncoder::new(f, flate2::Compression::default());
        let doc = |i: i64, gold: i64| json!({"idx": i, "query": format!("T{i} -- p{i}\nQuestion: q{i}?\nAnswer:"), "choices": ["yes", "no"], "gold": gold});
        for (id, gold, cont) in [
            (1, 0, " yes"),
            (0, 1, " yes"),
            (1_000_000, 1, " yes"),
            (0, 1, " no"),
            (1, 0, " no"),
        ] {
            let d = doc(id % 1_000_000, gold);
            let v = json!({"request_type": "loglikelihood", "doc": d, "doc_id": id, "request": {"context": "x", "continuation": cont}});
            writeln!(w, "{v}").unwrap();
        }
        w.finish().unwrap();
    }
    let d = load_task(t("boolq"), dir.path(), Some(&path), None).unwrap();
    assert_eq!(d.available, 2);
    assert_eq!(
        pairs(&d.docs[0]),
        [
            ("T0 -- p0\nQuestion: q0?\nAnswer:", " no"),
            ("T0 -- p0\nQuestion: q0?\nAnswer:", " yes")
        ]
    );
    assert_eq!((d.docs[0].gold, d.docs[1].gold), (0, 1));
    assert!(
        d.source.note.contains("super_glue form"),
        "{}",
        d.source.note
    );
    let e = load_task(t("boolq_google"), dir.path(), Some(&path), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("use task `boolq`"), "{e}");
}

#[test]
fn malformed_rows_name_file_row_and_field() {
    let dir = tempfile::tempdir().unwrap();
    // Arrow: a null label in row 1.
    let batch = piqa_batch(vec![Some(0), None]);
    let path = dir.path().join("bad.arrow");
    {
        let f = std::fs::File::create(&path).unwrap();
        let mut w = arrow::ipc::writer::StreamWriter::try_new(f, &batch.schema()).unwrap();
        w.write(&batch).unwrap();
        w.finish().unwrap();
    }
    let e = load_task(t("piqa"), dir.path(), Some(&path), None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("bad.arrow") && e.contains("row 1") && e.contains("`label`"),
        "{e}"
    );
    // JSONL: a missing field and an invalid line.
    let path = dir.path().join("bad.jsonl");
    std::fs::write(
        &path,
        "{\"goal\": \"g\", \"sol1\": \"a\", \"sol2\": \"b\", \"label\": 0}\n{\"goal\": \"g\", \"sol1\": \"a\", \"label\": 0}\n",
    )
    .unwrap();
    let e = load_task(t("piqa"), dir.path(), Some(&path), None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("bad.jsonl") && e.contains("row 1") && e.contains("`sol2`"),
        "{e}"
    );
    std::fs::write(&path, "{\"goal\": 1}\nnot json\n").unwrap();
    let e = read_rows(&path).unwrap_err().to_string();
    assert!(e.contains("row 1") && e.contains("invalid JSON"), "{e}");
    // Wrong type.
    std::fs::write(
        &path,
        "{\"goal\": \"g\", \"sol1\": \"a\", \"sol2\": \"b\", \"label\": \"x\"}\n",
    )
    .unwrap();
    let e = load_task(t("piqa"), dir.path(), Some(&path), None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("row 0") && e.contains("`label`") && e.contains("integer"),
        "{e}"
    );
    // Not an Arrow stream at all.
    let path = dir.path().join("junk.arrow");
    std::fs::write(&path, b"junk").unwrap();
    assert!(matches!(
        load_task(t("piqa"), dir.path(), Some(&path), None),
        Err(EvalError::Format { .. })
    ));
    // Missing file.
    let e = load_task(
        t("piqa"),
        dir.path(),
        Some(&dir.path().join("none.arrow")),
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("none.arrow"), "{e}");
}

#[test]
fn data_files_resolve_from_the_hub_dataset_cache() {
    use qtale_eval::tasks::resolve_data_file_in;
    let d = tempfile::tempdir().unwrap();
    let repo = d.path().join("datasets--allenai--ai2_arc");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let snap = repo.join("snapshots").join(commit).join("ARC-Easy");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    let f = snap.join("test-00000-of-00001.parquet");
    std::fs::write(&f, b"PAR1").unwrap();
    let cache = hf_hub::Cache::new(d.path().to_path_buf());
    // A file, a directory with one parquet file, a commit revision; plain paths pass through.
    let want = std::fs::canonicalize(&f).unwrap();
    for spec in [
        "hub:allenai/ai2_arc/ARC-Easy/test-00000-of-00001.parquet",
        "hub:allenai/ai2_arc/ARC-Easy",
        &format!("hub:allenai/ai2_arc@{commit}/ARC-Easy"),
    ] {
        let got = resolve_data_file_in(&cache, spec).unwrap();
        assert_eq!(std::fs::canonicalize(got).unwrap(), want, "{spec}");
    }
    assert_eq!(
        resolve_data_file_in(&cache, "/x/y.parquet").unwrap(),
        std::path::PathBuf::from("/x/y.parquet")
    );
    // Errors name what is missing.
    std::fs::write(snap.join("train-00000-of-00001.parquet"), b"PAR1").unwrap();
    let e = resolve_data_file_in(&cache, "hub:allenai/ai2_arc/ARC-Easy").unwrap_err();
    assert!(e.to_string().contains("2 parquet files"), "{e}");
    let e = resolve_data_file_in(&cache, "hub:allenai/ai2_arc/ARC-Hard/test.parquet").unwrap_err();
    assert!(e.to_string().contains("ARC-Hard/test.parquet"), "{e}");
    let e = resolve_data_file_in(&cache, "hub:allenai/piqa/x.parquet").unwrap_err();
    assert!(e.to_string().contains("allenai/piqa"), "{e}");
    let e = resolve_data_file_in(&cache, "hub:allenai").unwrap_err();
    assert!(e.to_string().contains("OWNER/NAME"), "{e}");
}
