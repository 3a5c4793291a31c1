"""Build a tiny random Qwen2-VL or Qwen2.5-VL checkpoint offline, loadable by vLLM (CPU included).

Same conventions as `kvreuse.models.tiny`: random seeded weights, a hand-built WordLevel
vocabulary of made-up words (one word = one token) split on whitespace, ChatML with spaces
instead of newlines.  On top of that:

  * the Qwen vision specials (`<|vision_start|>`, `<|vision_end|>`, `<|image_pad|>`,
    `<|video_pad|>`, `<|vision_pad|>`, ...) are special tokens, so the placeholder string vLLM
    and the template emit, `<|vision_start|><|image_pad|><|vision_end|>`, is three tokens;
  * the chat template renders OpenAI-style content parts (text, image / image_url, video /
    video_url) the way Qwen's own template does, so vLLM detects the "openai" content format;
  * `preprocessor_config.json` is a `Qwen2VLImageProcessor` with patch 14, merge 2 and
    `min_pixels = 56*56`, `max_pixels = 112*112`: a 112×112 image is an 8×8 patch grid,
    i.e. 4×4 = 16 LM tokens, and no image is ever more than 16 tokens (keeps CPU tests cheap);
    a video frame pair (temporal patch 2) of 112×112 is also 16 tokens;
  * a one-block vision tower whose output width is the LM's hidden size.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from kvreuse.models.tiny import ROLES, SPECIALS, default_model_dir, save_checkpoint, tiny_words, write_tokenizer

VISION_SPECIALS = ["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
                   "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
                   "<|quad_start|>", "<|quad_end|>"]
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO_PLACEHOLDER = "<|vision_start|><|video_pad|><|vision_end|>"

VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|> ' + message['role'] + ' ' }}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|> ' }}"
    "{% elif content['type'] == 'video' or 'video' in content or 'video_url' in content %}"
    "{{ '<|vision_start|><|video_pad|><|vision_end|> ' }}"
    "{% elif 'text' in content %}{{ content['text'] + ' ' }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|> ' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|> assistant ' }}{% endif %}"
)

PATCH, MERGE, TEMPORAL = 14, 2, 2
MIN_PIXELS, MAX_PIXELS = 56 * 56, 112 * 112


@dataclass(frozen=True)
class TinyVLSpec:
    """Shape of a tiny VL checkpoint.  `arch`: "qwen2_vl" or "qwen2_5_vl".

    `mrope_section` splits the `head_dim // 2` rotary frequencies over (t, h, w).
    """

    arch: str = "qwen2_vl"
    num_layers: int = 1
    hidden_size: int = 64
    num_heads: int = 2
    num_kv_heads: int = 1
    intermediate_size: int = 128
    vocab_size: int = 512
    mrope_section: tuple[int, int, int] = (4, 6, 6)
    vision_depth: int = 1
    vision_dim: int = 32
    vision_heads: int = 2
    max_position: int = 4096
    dtype: str = "float32"
    seed: int = 0
    init_std: float = 0.1
    max_pixels: int = MAX_PIXELS  # larger (e.g. 448*448 = 256 tokens) for benchmarks

    def __post_init__(self) -> None:
        if self.arch not in ("qwen2_vl", "qwen2_5_vl"):
            raise ValueError(f"arch: expected 'qwen2_vl' or 'qwen2_5_vl', got {self.arch!r}")
        if sum(self.mrope_section) * 2 != self.hidden_size // self.num_heads:
            raise ValueError(f"mrope_section {self.mrope_section} must sum to head_dim // 2 = "
                             f"{self.hidden_size // self.num_heads // 2}")

    def tag(self) -> str:
        return (f"{self.arch}-l{self.num_layers}-h{self.hidden_size}-a{self.num_heads}-kv{self.num_kv_heads}"
                f"-vd{self.vision_depth}x{self.vision_dim}-v{self.vocab_size}-{self.dtype}-s{self.seed}"
                + (f"-px{self.max_pixels}" if self.max_pixels != MAX_PIXELS else ""))


def vl_vocab(vocab_size: int) -> dict[str, int]:
    specials = SPECIALS + VISION_SPECIALS
    words = tiny_words(vocab_size)[: vocab_size - len(specials) - len(ROLES)]
    return {t: i for i, t in enumerate(specials + ROLES + words)}


def vl_words(vocab_size: int = 512) -> list[str]:
    """The plain words of a VL checkpoint's vocabulary (every one is a single token)."""
    return [w for w in vl_vocab(vocab_size) if w not in SPECIALS + VISION_SPECIALS + ROLES]


def build_tiny_vl_model(out_dir: str | os.PathLike | None = None, spec: TinyVLSpec = TinyVLSpec()) -> Path:
    """Write config, weights, tokenizer, chat template and image/video processor configs (idempotent)."""
    out = Path(out_dir) if out_dir is not None else default_model_dir() / spec.tag()
    marker = out / "kvreuse_tiny.json"
    if marker.exists() and json.loads(marker.read_text()) == json.loads(json.dumps(asdict(spec))):
        return out
    out.mkdir(parents=True, exist_ok=True)
    import torch
    import transformers as tf

    vocab = vl_vocab(spec.vocab_size)
    ids = {k: vocab[k] for k in ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")}
    text = dict(vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
                num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
                num_key_value_heads=spec.num_kv_heads, max_position_embeddings=spec.max_position,
                initializer_range=spec.init_std, rms_norm_eps=1e-6,
                bos_token_id=vocab["<|endoftext|>"], eos_token_id=vocab["<|im_end|>"],
                pad_token_id=vocab["<|endoftext|>"],
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": list(spec.mrope_section)})
    common_vis = dict(depth=spec.vision_depth, num_heads=spec.vision_heads, in_channels=3, patch_size=PATCH,
                      spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL, initializer_range=spec.init_std)
    tok_ids = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                   vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    if spec.arch == "qwen2_vl":
        text["model_type"] = "qwen2_vl_text"
        vis = dict(common_vis, embed_dim=spec.vision_dim, hidden_size=spec.hidden_size, mlp_ratio=2)
        cfg = tf.Qwen2VLConfig(text_config=text, vision_config=vis, **tok_ids)
        cls = tf.Qwen2VLForConditionalGeneration
    else:
        text["model_type"] = "qwen2_5_vl_text"
        vis = dict(common_vis, hidden_size=spec.vision_dim, intermediate_size=2 * spec.vision_dim,
                   out_hidden_size=spec.hidden_size, window_size=112, fullatt_block_indexes=[0],
                   tokens_per_second=2)
        cfg = tf.Qwen2_5_VLConfig(text_config=text, vision_config=vis, **tok_ids)
        cls = tf.Qwen2_5_VLForConditionalGeneration
    cfg.tie_word_embeddings = False
    torch.manual_seed(spec.seed)
    save_checkpoint(out, cls(cfg), spec.dtype, vocab)
    write_tokenizer(out, vocab, specials=["<|im_start|>", "<|im_end|>"] + VISION_SPECIALS,
                    chat_template=VL_CHAT_TEMPLATE, add_specials=True)
    _write_processors(out, spec.max_pixels)
    marker.write_text(json.dumps(asdict(spec)))
    return out


def _write_processors(out: Path, max_pixels: int = MAX_PIXELS) -> None:
    size = {"shortest_edge": MIN_PIXELS, "longest_edge": max_pixels}
    common = {"do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
              "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
              "do_convert_rgb": True, "min_pixels": MIN_PIXELS, "max_pixels": max_pixels, "size": size,
              "patch_size": PATCH, "temporal_patch_size": TEMPORAL, "merge_size": MERGE}
    (out / "preprocessor_config.json").write_text(json.dumps(
        {**common, "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor"}, indent=1))
    (out / "video_preprocessor_config.json").write_text(json.dumps(
        {**common, "video_processor_type": "Qwen2VLVideoProcessor", "processor_class": "Qwen2VLProcessor"}, indent=1))
    (out / "chat_template.json").write_text(json.dumps({"chat_template": VL_CHAT_TEMPLATE}))  # the processor's


if __name__ == "__main__":
    import sys

    arch = sys.argv[2] if len(sys.argv) > 2 else "qwen2_vl"
    print(build_tiny_vl_model(sys.argv[1] if len(sys.argv) > 1 else None, TinyVLSpec(arch=arch)))
