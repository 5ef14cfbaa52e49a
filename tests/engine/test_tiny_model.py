"""The tiny checkpoint is the real Qwen2.5-VL stack at toy size: real tokenizer ids, real template;
the small one is the same stack at a size where compute shows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

from snark.engine.tiny_model import (
    TINY_MARKER,
    TINY_VERSION,
    is_tiny_checkpoint,
    random_weights_build,
    small_config,
    tiny_checkpoint_version,
    tiny_config,
    write_tiny_model,
)


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
    expected = {
        "<|endoftext|>": 151643,
        "<|im_start|>": 151644,
        "<|im_end|>": 151645,
        "<|vision_start|>": 151652,
        "<|vision_end|>": 151653,
        "<|image_pad|>": 151655,
    }
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


def test_the_small_architecture_has_the_benchmark_sizes_and_108m_parameters():
    config = small_config()
    text, vision = config.text_config, config.vision_config
    assert (text.hidden_size, text.intermediate_size, text.num_hidden_layers) == (512, 1536, 8)
    assert (text.num_attention_heads, text.num_key_value_heads, text.vocab_size) == (8, 2, 151936)
    head_dim = text.hidden_size // text.num_attention_heads
    assert head_dim == 64 and text.rope_parameters["mrope_section"] == [8, 12, 12]
    assert sum(text.rope_parameters["mrope_section"]) == head_dim // 2
    assert (vision.depth, vision.hidden_size, vision.num_heads, vision.intermediate_size) == (4, 256, 4, 1024)
    assert vision.fullatt_block_indexes == [3] and vision.out_hidden_size == 512
    assert config.tie_word_embeddings and text.tie_word_embeddings
    with torch.device("meta"):  # shapes and counts, no memory
        model = Qwen2_5_VLForConditionalGeneration(config)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert shapes["model.language_model.embed_tokens.weight"] == (151936, 512)
    assert shapes["model.language_model.layers.7.self_attn.q_proj.weight"] == (512, 512)
    assert shapes["model.language_model.layers.7.self_attn.k_proj.weight"] == (128, 512)  # 2 KV heads of 64
    assert shapes["model.language_model.layers.7.mlp.gate_proj.weight"] == (1536, 512)
    assert shapes["model.visual.blocks.3.attn.qkv.weight"] == (768, 256)
    assert shapes["model.visual.merger.mlp.2.weight"] == (512, 1024)  # 4 merged patches of 256 -> text hidden
    assert "lm_head.weight" not in shapes  # tied: the output layer is the embedding
    assert sum(p.numel() for p in model.parameters()) == 108_008_704


def test_the_small_models_random_logits_are_finite_and_well_separated():
    # 8 layers at initializer_range 0.5: activations must stay finite, and greedy decoding needs a
    # clear best token at every position (a near-tie could differ between batched and alone).
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(small_config()).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.randint(0, 151643, (1, 48), generator=torch.Generator().manual_seed(1))).logits
    assert torch.isfinite(logits).all()
    best_two = logits[0].topk(2, dim=-1).values
    gaps = best_two[:, 0] - best_two[:, 1]
    assert logits.std() > 5 and gaps.median() > 0.5 and gaps.min() > 1e-3  # float32 noise here is ~1e-5


def test_the_marker_says_which_size_and_only_the_current_toy_counts_as_tiny(tmp_path):
    for name, marker in {"toy": TINY_VERSION, "small": "small:1", "real": None}.items():
        (tmp_path / name).mkdir()
        config = {"model_type": "qwen2_5_vl"} | ({TINY_MARKER: marker} if marker is not None else {})
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    assert random_weights_build(tmp_path / "toy") == ("tiny", TINY_VERSION) and is_tiny_checkpoint(tmp_path / "toy")
    assert random_weights_build(tmp_path / "small") == ("small", 1)
    assert not is_tiny_checkpoint(tmp_path / "small")  # `snark serve --tiny` builds the toy over it
    assert tiny_checkpoint_version(tmp_path / "small") == 1  # random weights all the same: /health says so
    assert random_weights_build(tmp_path / "real") is None and tiny_checkpoint_version(tmp_path / "real") is None
    with pytest.raises(ValueError, match="tiny, small"):
        write_tiny_model(tmp_path / "x", size="huge")
