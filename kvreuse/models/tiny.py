"""Build a tiny Llama- or Qwen2-shaped HF checkpoint offline, loadable by vLLM.

Weights are random (seeded); the tokenizer is a hand-built WordLevel vocabulary of made-up
words split on whitespace, plus the ChatML specials, and the chat template is ChatML with
spaces instead of newlines (the whitespace pre-tokenizer drops newlines); a blank line ("\\n\\n")
is one token of its own, as in real BPE vocabularies.  Any text made
of `tiny_words()` tokenizes one word per token, so tests control token counts exactly.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

SPECIALS = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
ROLES = ["system", "user", "assistant", "tool"]
PARAGRAPH = "\n\n"  # one token, as in real BPE vocabularies (retrieval pipelines join passages with it)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|> ' + message['role'] + ' ' + message['content'] + ' <|im_end|> ' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|> assistant ' }}{% endif %}"
)


@dataclass(frozen=True)
class TinySpec:
    """Shape of a tiny checkpoint.  `arch` is "llama", "qwen2" or "opt" (learned absolute positions, no RoPE:
    one KV head per head, `head_dim` = `hidden_size / num_heads`); `dtype` "float32" or "bfloat16"."""

    arch: str = "llama"
    num_layers: int = 2
    hidden_size: int = 64
    num_heads: int = 2
    num_kv_heads: int = 1
    head_dim: int = 32
    intermediate_size: int = 128
    vocab_size: int = 512
    max_position: int = 4096
    dtype: str = "float32"
    seed: int = 0
    init_std: float = 0.1
    tokenizer_version: int = 2  # 2: the blank-line token

    def __post_init__(self) -> None:
        if self.arch not in ("llama", "qwen2", "opt"):
            raise ValueError(f"arch: expected 'llama', 'qwen2' or 'opt', got {self.arch!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads: must be a multiple of num_kv_heads")
        if self.vocab_size < len(SPECIALS) + len(ROLES) + 16:
            raise ValueError(f"vocab_size: too small ({self.vocab_size})")

    def tag(self) -> str:
        return (f"{self.arch}-l{self.num_layers}-h{self.hidden_size}-a{self.num_heads}-kv{self.num_kv_heads}"
                f"-d{self.head_dim}-v{self.vocab_size}-{self.dtype}-s{self.seed}")


def tiny_words(vocab_size: int = 512) -> list[str]:
    """The plain words of the vocabulary (every one is a single token)."""
    cons, vows = "bdfgklmnprstvz", "aeiou"
    syll = [c + v for c in cons for v in vows]                       # 70 syllables
    words = [a + b for a in syll for b in syll]
    n = vocab_size - len(SPECIALS) - len(ROLES) - 1  # the last id is the blank-line token
    return words[:n]


def default_model_dir() -> Path:
    """Where `make demo` and the tests put the embedded default model."""
    root = os.environ.get("KVREUSE_MODEL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "kvreuse", "models")
    return Path(root)


def build_tiny_model(out_dir: str | os.PathLike | None = None, spec: TinySpec = TinySpec()) -> Path:
    """Write config, safetensors weights, tokenizer and chat template to `out_dir` (idempotent).

    Returns the directory.  Default: `default_model_dir() / spec.tag()`.
    """
    out = Path(out_dir) if out_dir is not None else default_model_dir() / spec.tag()
    marker = out / "kvreuse_tiny.json"
    if marker.exists() and json.loads(marker.read_text()) == asdict(spec):
        return out
    out.mkdir(parents=True, exist_ok=True)
    import torch
    import transformers

    vocab = {t: i for i, t in enumerate(SPECIALS + ROLES + tiny_words(spec.vocab_size) + [PARAGRAPH])}
    common = dict(vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
                  num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
                  num_key_value_heads=spec.num_kv_heads, max_position_embeddings=spec.max_position,
                  initializer_range=spec.init_std, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  bos_token_id=vocab["<|endoftext|>"], eos_token_id=vocab["<|im_end|>"],
                  pad_token_id=vocab["<|endoftext|>"])
    if spec.arch == "llama":
        cfg = transformers.LlamaConfig(head_dim=spec.head_dim, rope_theta=10000.0, **common)
        cls = transformers.LlamaForCausalLM
    elif spec.arch == "qwen2":
        assert spec.head_dim * spec.num_heads == spec.hidden_size, "qwen2 derives head_dim from hidden_size"
        cfg = transformers.Qwen2Config(rope_theta=10000.0, **common)
        cls = transformers.Qwen2ForCausalLM
    else:
        assert spec.head_dim * spec.num_heads == spec.hidden_size, "opt derives head_dim from hidden_size"
        assert spec.num_kv_heads == spec.num_heads, "opt has one KV head per head"
        cfg = transformers.OPTConfig(vocab_size=spec.vocab_size, hidden_size=spec.hidden_size,
                                     ffn_dim=spec.intermediate_size, num_hidden_layers=spec.num_layers,
                                     num_attention_heads=spec.num_heads, max_position_embeddings=spec.max_position,
                                     word_embed_proj_dim=spec.hidden_size, init_std=spec.init_std,
                                     tie_word_embeddings=False, bos_token_id=vocab["<|endoftext|>"],
                                     eos_token_id=vocab["<|im_end|>"], pad_token_id=vocab["<|endoftext|>"])
        cls = transformers.OPTForCausalLM
    torch.manual_seed(spec.seed)
    save_checkpoint(out, cls(cfg), spec.dtype, vocab)
    write_tokenizer(out, vocab, specials=["<|im_start|>", "<|im_end|>"], chat_template=CHAT_TEMPLATE, added=[PARAGRAPH])
    marker.write_text(json.dumps(asdict(spec)))
    return out


def save_checkpoint(out: Path, model, dtype: str, vocab: dict[str, int]) -> None:
    """Save a random-weight model in `dtype` with a generation config for the ChatML specials."""
    import torch

    model = model.to(getattr(torch, dtype))
    model.config.dtype = dtype
    model.save_pretrained(out, safe_serialization=True)
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": vocab["<|endoftext|>"], "eos_token_id": vocab["<|im_end|>"],
         "pad_token_id": vocab["<|endoftext|>"]}))


def write_tokenizer(out: Path, vocab: dict[str, int], *, specials: list[str], chat_template: str,
                    add_specials: bool = False, added: list[str] = ()) -> None:
    """A WordLevel tokenizer over `vocab` with `specials` and a chat template, saved for vLLM and HF.

    `add_specials` also registers the specials as added tokens of the tokenizer itself, so they
    match inside words (the VL template glues `<|vision_start|><|image_pad|>...` together).
    `added`: ordinary vocabulary entries matched before the whitespace split (the blank line).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    if added:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
    if add_specials:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<|endoftext|>",
                                   eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=specials)
    fast.chat_template = chat_template
    fast.model_max_length = 1 << 20
    fast.save_pretrained(out)
    # transformers 5 writes the template to chat_template.jinja; older readers want it in the config too
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = chat_template
    cfg_path.write_text(json.dumps(cfg, indent=1))


if __name__ == "__main__":
    import sys

    print(build_tiny_model(sys.argv[1] if len(sys.argv) > 1 else None))
