"""Tiny captioners built from configs and saved locally (for the demo and tests).

No captioner weights can be downloaded here, so the demo and the tests build them: a
word-level tokenizer, a vision encoder and a text decoder of a few layers, random
weights (seeded), saved with ``save_pretrained`` and loaded back by path through the
same auto classes as a hub model. Two kinds, as on the hub:

- ``save_tiny_chat_vlm``: a LLaVA (CLIP vision tower + Llama decoder) with a chat
  template, the shape of the default captioner (a prompt-following chat VLM such as
  SmolVLM or Qwen2-VL): it reads the prompt and the alt-text hint.
- ``save_tiny_blip``: a BLIP, a prefix-only captioner (no chat template).

Their captions are word salad until a captioner is trained for the synthetic world.
"""

from __future__ import annotations

from pathlib import Path

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]


def world_vocabulary() -> list[str]:
    from pipeline import synthweb

    words = {"a", "an", "the", "at", "on", "and", "of", "in", "with", "background", "picture", "detailed", "image",
             "shows", "one", "two", "three", ",", "."}
    words |= set(synthweb.COLOURS) | set(synthweb.SHAPES) | {s + "s" for s in synthweb.SHAPES} | set(synthweb.SIZES)
    for phrase in list(synthweb.POSITIONS) + list(synthweb.BACKGROUNDS):
        words |= set(phrase.split())
    return sorted(words)


def world_tokenizer():
    """A word-level fast tokenizer over the synthetic world's vocabulary (BERT-style specials)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + world_vocabulary())}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    core.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                   bos_token="[DEC]", model_input_names=["input_ids", "attention_mask"])


def save_tiny_blip(folder: str | Path, seed: int = 0, image_size: int = 32) -> str:
    """Write a tiny BLIP model + processor to ``folder``; return the path to load it by."""
    import torch
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    folder = Path(folder)
    tokenizer = world_tokenizer()
    vocab = tokenizer.get_vocab()
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": image_size, "width": image_size}),
                              tokenizer=tokenizer)
    config = BlipConfig(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": image_size, "patch_size": 8},
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 2, "encoder_hidden_size": 32,
                     "bos_token_id": vocab["[DEC]"], "pad_token_id": vocab["[PAD]"],
                     "sep_token_id": vocab["[SEP]"], "eos_token_id": vocab["[SEP]"],
                     "max_position_embeddings": 128},
    )
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(config)
    model.generation_config.pad_token_id = vocab["[PAD]"]
    model.generation_config.eos_token_id = vocab["[SEP]"]
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder.resolve())


CHAT_SPECIAL = ["<pad>", "<unk>", "<image>", "<|user|>", "<|assistant|>", "<|end|>"]
# role markers, the image placeholder per image, the text parts; generation starts after <|assistant|>
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>"
    "{% if m['content'] is string %} {{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>{% elif c['type'] == 'text' %} {{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|end|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def chat_tokenizer():
    """A lower-cased word-level tokenizer over the synthetic world's words and those of the
    shipped prompt templates (so a rendered prompt with its alt-text hint has no unknown
    word), digits and punctuation one token each, chat markers as special tokens."""
    import re
    import string

    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from recaption.prompts import PROMPTS, load_prompt

    words = set(world_vocabulary()) | set(string.punctuation) | set(string.digits)
    for path in sorted(PROMPTS.glob("*.yaml")):
        t = load_prompt(str(path))
        words |= set(re.findall(r"[^\W\d_]+", f"{t.text} {t.hint} {t.prefix}".lower()))
    vocab = {tok: i for i, tok in enumerate(CHAT_SPECIAL + sorted(words - set(CHAT_SPECIAL)))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.BertPreTokenizer(),
                                                  pre_tokenizers.Digits(individual_digits=True)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", eos_token="<|end|>",
                                  additional_special_tokens=CHAT_SPECIAL[2:],
                                  model_input_names=["input_ids", "attention_mask"])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def save_tiny_chat_vlm(folder: str | Path, seed: int = 0, image_size: int = 32) -> str:
    """Write a tiny LLaVA chat VLM + processor (with a chat template) to ``folder``; return its path."""
    import torch
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    folder = Path(folder)
    tokenizer = chat_tokenizer()
    vocab = tokenizer.get_vocab()
    patch = 8
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=CHAT_TEMPLATE)
    config = LlavaConfig(
        vision_config={"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": image_size,
                       "patch_size": patch, "projection_dim": 32},
        text_config={"model_type": "llama", "vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
                     "max_position_embeddings": 1024, "bos_token_id": vocab["<|user|>"],
                     "eos_token_id": vocab["<|end|>"], "pad_token_id": vocab["<pad>"]},
        image_token_index=vocab["<image>"], vision_feature_layer=-1, vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = vocab["<pad>"]
    model.generation_config.eos_token_id = vocab["<|end|>"]
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder.resolve())
