"""The tiny checkpoint is the real Qwen2.5-VL stack at toy size: real tokenizer ids, real template."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoProcessor

from snark.engine.tiny_model import TINY_MARKER, TINY_VERSION, is_tiny_checkpoint, tiny_checkpoint_version, tiny_config


def test_checkpoint_files_and_size(tiny_model_dir):
    folder = Path(tiny_model_dir)
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"):
        assert (folder / name).is_file(), name
    assert (folder / "model.safetensors").stat().st_size < 60 * 1024 * 1024
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "qwen2_5_vl" and config[TINY_MARKER] == TINY_VERSION
    assert config["tie_word_embeddings"] is True
    assert json.loads((folder / "generation_config.json").read_text())["do_sample"] is False
    assert is_tiny_checkpoint(folder)


def test_tokenizer_has_qwen2_ids(tiny_model_dir):
    tokenizer = AutoProcessor.from_pretrained(tiny_model_dir).tokenizer
    # Reference ids from the published Qwen2 tokenizer.
    assert tokenizer("Hello world!")["input_ids"] == [9707, 1879, 0]
    assert tokenizer("123")["input_ids"] == [16, 17, 18]  # Qwen2 splits digits one by one
    expected = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
                "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|image_pad|>": 151655}  # fmt: skip
    assert {t: tokenizer.convert_tokens_to_ids(t) for t in expected} == expected
    text = "naïve café 東京 🎉"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_chat_template_is_qwen25_vl(tiny_model_dir):
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    rendered = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_text_head_size_is_one_that_vllm_cpu_attention_accepts():
    text = tiny_config().text_config
    head_dim = text.hidden_size // text.num_attention_heads
    assert head_dim == 32  # vLLM's CPU attention: 32, 64, 80, ... (not 16)
    assert sum(text.rope_parameters["mrope_section"]) == head_dim // 2


def test_an_older_tiny_build_is_not_reused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl", TINY_MARKER: True}))
    assert tiny_checkpoint_version(tmp_path) == 1 and not is_tiny_checkpoint(tmp_path)
