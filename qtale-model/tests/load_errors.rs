//! Bad checkpoints give typed errors that name the file and the tensor or field; and the hf-hub cache
//! path resolves a repo id offline from a cache laid out as hf-hub lays it out.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use qtale_model::config::HfConfig;
use qtale_model::load::{load_hf_weights, load_model, ModelSource};
use qtale_model::weights::{read_safetensors, resolve_hub_repo_in};
use qtale_model::ModelError;
use safetensors::tensor::TensorView;
use tch::{Device, Kind};

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny/gqa_tied")
}

/// Copy the tiny fixture into a temp dir (with a tokenizer.json so `load_model` works).
fn scratch() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(tiny().join(f), dir.path().join(f)).unwrap();
    }
    std::fs::write(dir.path().join("tokenizer.json"), TINY_TOKENIZER).unwrap();
    dir
}

/// A minimal byte-level BPE tokenizer.json (the tiny models have no real tokenizer).
const TINY_TOKENIZER: &str = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],
"normalizer":null,"pre_tokenizer":{"type":"ByteLevel","add_prefix_space":false,"trim_offsets":true,"use_regex":true},
"post_processor":null,"decoder":{"type":"ByteLevel","add_prefix_space":false,"trim_offsets":true,"use_regex":true},
"model":{"type":"BPE","dropout":null,"unk_token":null,"continuing_subword_prefix":null,"end_of_word_suffix":null,
"fuse_unk":false,"byte_fallback":false,"ignore_merges":false,"vocab":{"a":0,"b":1,"ab":2},"merges":["a b"]}}"#;

fn load_dir(dir: &Path) -> Result<(), ModelError> {
    let cfg_path = dir.join("config.json");
    let cfg = HfConfig::from_file(&cfg_path)?.resolve(&cfg_path)?;
    load_hf_weights(dir, cfg, Device::Cpu, Kind::Float).map(|_| ())
}

/// Rewrite model.safetensors with `edit` applied to the (name -> (shape, f32 data)) map.
fn rewrite(dir: &Path, edit: impl FnOnce(&mut HashMap<String, (Vec<usize>, Vec<f32>)>)) {
    let path = dir.join("model.safetensors");
    let mut map: HashMap<String, (Vec<usize>, Vec<f32>)> = read_safetensors(&path)
        .unwrap()
        .into_iter()
        .map(|(n, t)| {
            let shape = t.size().iter().map(|&x| x as usize).collect();
            let data = Vec::<f32>::try_from(t.flatten(0, -1)).unwrap();
            (n, (shape, data))
        })
        .collect();
    edit(&mut map);
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = map
        .into_iter()
        .map(|(n, (s, d))| (n, s, d.iter().flat_map(|x| x.to_le_bytes()).collect()))
        .collect();
    let views: Vec<(String, TensorView)> = bytes
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                TensorView::new(safetensors::Dtype::F32, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, &None, &path).unwrap();
}

#[test]
fn the_unmodified_copy_loads() {
    let dir = scratch();
    load_dir(dir.path()).unwrap();
    let lm = load_model(
        &ModelSource::HfDir(dir.path().to_path_buf()),
        Device::Cpu,
        Kind::Float,
    )
    .unwrap();
    assert_eq!(lm.tokenizer.encode("ab", false).unwrap().get_ids(), &[2]);
}

#[test]
fn truncated_safetensors_names_the_file() {
    let dir = scratch();
    let p = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 100]).unwrap();
    let err = load_dir(dir.path()).unwrap_err();
    assert!(matches!(err, ModelError::Safetensors { .. }), "{err:?}");
    assert!(err.to_string().contains("model.safetensors"), "{err}");
    // A header that is not even complete.
    std::fs::write(&p, &bytes[..5]).unwrap();
    let err = load_dir(dir.path()).unwrap_err();
    assert!(matches!(err, ModelError::Safetensors { .. }), "{err:?}");
}

#[test]
fn missing_tensor_is_named() {
    let dir = scratch();
    rewrite(dir.path(), |m| {
        m.remove("model.layers.1.mlp.up_proj.weight");
    });
    let err = load_dir(dir.path()).unwrap_err();
    match &err {
        ModelError::MissingTensors { names, .. } => {
            assert_eq!(names, &["model.layers.1.mlp.up_proj.weight"])
        }
        other => panic!("expected MissingTensors, got {other:?}"),
    }
    assert!(err
        .to_string()
        .contains("model.layers.1.mlp.up_proj.weight"));
}

#[test]
fn unexpected_tensor_is_named() {
    let dir = scratch();
    rewrite(dir.path(), |m| {
        m.insert(
            "model.layers.0.self_attn.qkv_proj.weight".into(),
            (vec![2, 2], vec![0.0; 4]),
        );
    });
    let err = load_dir(dir.path()).unwrap_err();
    assert!(
        matches!(err, ModelError::UnexpectedTensors { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("qkv_proj"), "{err}");
}

#[test]
fn shape_mismatch_is_named() {
    let dir = scratch();
    rewrite(dir.path(), |m| {
        let (s, d) = m.get_mut("model.layers.0.self_attn.k_proj.weight").unwrap();
        s[0] -= 1;
        d.truncate(s[0] * s[1]);
    });
    let err = load_dir(dir.path()).unwrap_err();
    match &err {
        ModelError::ShapeMismatch { name, .. } => {
            assert_eq!(name, "model.layers.0.self_attn.k_proj.weight")
        }
        other => panic!("expected ShapeMismatch, got {other:?}"),
    }
}

#[test]
fn bad_config_names_the_field() {
    let dir = scratch();
    let p = dir.path().join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    v["num_key_value_heads"] = 3.into();
    std::fs::write(&p, v.to_string()).unwrap();
    let err = load_dir(dir.path()).unwrap_err();
    assert!(
        matches!(err, ModelError::Config { ref field, .. } if field == "num_key_value_heads"),
        "{err:?}"
    );
    v["num_key_value_heads"] = "two".into();
    std::fs::write(&p, v.to_string()).unwrap();
    let err = load_dir(dir.path()).unwrap_err();
    assert!(err.to_string().contains("config.json"), "{err}");
    std::fs::write(&p, "{not json").unwrap();
    assert!(matches!(
        load_dir(dir.path()).unwrap_err(),
        ModelError::Config { .. }
    ));
}

#[test]
fn missing_shard_is_named() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny/sharded");
    let dir = tempfile::tempdir().unwrap();
    let mut shards = Vec::new();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.path().join(e.file_name())).unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("model-") {
            shards.push(name);
        }
    }
    shards.sort();
    load_dir(dir.path()).unwrap();
    std::fs::remove_file(dir.path().join(&shards[1])).unwrap();
    let err = load_dir(dir.path()).unwrap_err();
    assert!(err.to_string().contains(&shards[1]), "{err}");
}

#[test]
fn bad_model_argument_is_explained() {
    assert!(ModelSource::parse("/no/such/model.gguf")
        .unwrap_err()
        .to_string()
        .contains("no such file"));
    assert!(ModelSource::parse("not a repo").is_err());
    assert_eq!(
        ModelSource::parse("HuggingFaceTB/SmolLM2-135M@v1").unwrap(),
        ModelSource::Hub {
            repo_id: "HuggingFaceTB/SmolLM2-135M".into(),
            revision: Some("v1".into())
        }
    );
}

/// Lay out `dir` as the hub cache does: `models--owner--name/{refs/main, snapshots/<commit>/*, blobs}`,
/// snapshot files as symlinks into blobs.
fn fake_hub(cache: &Path, repo: &str, commit: &str, files: &[(&str, PathBuf)]) {
    let repo_dir = cache.join(format!("models--{}", repo.replace('/', "--")));
    std::fs::create_dir_all(repo_dir.join("refs")).unwrap();
    std::fs::create_dir_all(repo_dir.join("blobs")).unwrap();
    let snap = repo_dir.join("snapshots").join(commit);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::write(repo_dir.join("refs/main"), commit).unwrap();
    for (i, (name, src)) in files.iter().enumerate() {
        let blob = repo_dir.join("blobs").join(format!("blob{i}"));
        std::fs::copy(src, &blob).unwrap();
        std::os::unix::fs::symlink(&blob, snap.join(name)).unwrap();
    }
}

#[test]
fn hub_repo_resolves_offline_from_the_cache() {
    let scratch = scratch();
    let cache_dir = tempfile::tempdir().unwrap();
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let files: Vec<(&str, PathBuf)> = ["config.json", "model.safetensors", "tokenizer.json"]
        .iter()
        .map(|f| (*f, scratch.path().join(f)))
        .collect();
    fake_hub(cache_dir.path(), "tiny/llama", commit, &files);
    let cache = hf_hub::Cache::new(cache_dir.path().to_path_buf());
    let snap = resolve_hub_repo_in(
        &cache,
        "tiny/llama",
        None,
        &["config.json", "tokenizer.json"],
    )
    .unwrap();
    assert!(snap.ends_with(commit));
    // By commit hash, and through the public loader with HF_HUB_CACHE pointing at the cache.
    assert_eq!(
        resolve_hub_repo_in(&cache, "tiny/llama", Some(commit), &["config.json"]).unwrap(),
        snap
    );
    std::env::set_var("HF_HUB_CACHE", cache_dir.path());
    let lm = load_model(
        &ModelSource::Hub {
            repo_id: "tiny/llama".into(),
            revision: None,
        },
        Device::Cpu,
        Kind::Float,
    )
    .unwrap();
    assert_eq!(lm.model.layers.len(), 2);
    // Unknown repo, unknown branch, missing file: errors that say what is missing.
    let e = resolve_hub_repo_in(&cache, "other/model", None, &["config.json"])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("other/model") && e.contains("not in the cache"),
        "{e}"
    );
    let e = resolve_hub_repo_in(&cache, "tiny/llama", Some("dev"), &["config.json"])
        .unwrap_err()
        .to_string();
    assert!(e.contains("tiny/llama@dev"), "{e}");
    let e = resolve_hub_repo_in(
        &cache,
        "tiny/llama",
        None,
        &["model.safetensors.index.json"],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("model.safetensors.index.json"), "{e}");
}

/// A directory without tokenizer.json: `load_model` (which encodes text) names the file before reading
/// weights; `load_model_weights` (logits only) loads it. Another architecture's config is refused by
/// `model_type`.
#[test]
fn tokenizer_is_needed_only_for_text_and_model_type_is_checked() {
    let dir = scratch();
    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    let src = ModelSource::HfDir(dir.path().to_path_buf());
    let Err(e) = load_model(&src, Device::Cpu, Kind::Float) else {
        panic!("loaded without tokenizer.json");
    };
    assert!(e.to_string().contains("tokenizer.json"), "{e}");
    let m = qtale_model::load_model_weights(&src, Device::Cpu, Kind::Float).unwrap();
    assert!(m.config.num_hidden_layers > 0);
    let p = dir.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    cfg["model_type"] = "gpt2".into();
    std::fs::write(&p, cfg.to_string()).unwrap();
    let Err(e) = qtale_model::load_model_weights(&src, Device::Cpu, Kind::Float) else {
        panic!("a gpt2 config loaded as llama");
    };
    let msg = e.to_string();
    assert!(msg.contains("model_type") && msg.contains("gpt2"), "{msg}");
}
