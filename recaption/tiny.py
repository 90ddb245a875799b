"""A tiny BLIP captioner built from a config and saved locally (for the demo and tests).

No captioner weights can be downloaded here, so the demo and the tests build one: a
word-level tokenizer over the synthetic world's vocabulary, a BLIP vision encoder and
text decoder of a few layers, random weights (seeded). It is saved with
``save_pretrained`` and loaded back by id through the same auto classes as a hub model.
Its captions are word salad until a captioner is trained for the synthetic world.
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
