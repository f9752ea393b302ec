"""Tiny randomly initialised models with a word-level tokenizer, saved as real Hugging Face directories.

They make exact references (explicit Jacobians, exact Shapley) cheap in tests and are loaded through the
same ``from_pretrained`` code as real models.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

__all__ = ["TINY_ARCHS", "TINY_WORDS", "build_tiny_model"]

TINY_ARCHS = ("llama", "bert", "bert-mlm")

# A small closed vocabulary: sentiment words, function words, the default label words.
TINY_WORDS = tuple(dict.fromkeys(
    """the a an and or but not no very really quite so too this that it is was were be been movie film
    story plot acting actor actors cast script music scene scenes ending end good great excellent
    wonderful amazing fun funny loved love like liked enjoy enjoyed best brilliant beautiful fine nice
    bad terrible awful boring dull worst hate hated poor weak mess waste slow stupid sentiment review
    positive negative neutral i you we they he she of to in on for with as at by from my your our their
    one two time life people way make made see seen watch watched think thought really just also even
    still again never ever all some more most less much many every yes well""".split()
))
_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<s>", "</s>")


def _tokenizer(arch: str):  # -> PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(_SPECIALS + TINY_WORDS + tuple(".,!?:;'\"-()"))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    if arch == "llama":
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
        )
        specials = dict(bos_token="<s>", eos_token="</s>", unk_token="[UNK]", pad_token="[PAD]")
    else:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
        )
        specials = dict(
            cls_token="[CLS]", sep_token="[SEP]", unk_token="[UNK]", pad_token="[PAD]", mask_token="[MASK]"
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, **specials), len(vocab)


def build_tiny_model(arch: str, out_dir: str | Path, *, seed: int = 0, hidden: int = 32, layers: int = 2) -> Path:
    """Create and save a tiny model + tokenizer under ``out_dir`` (safetensors).

    Args:
        arch: ``llama`` (causal LM), ``bert`` (encoder without LM head) or ``bert-mlm`` (masked LM).
        out_dir: directory to write; created if missing.
        seed: torch seed for the random initialisation (same seed → same weights).
        hidden, layers: hidden size and number of transformer blocks.

    Returns:
        ``out_dir`` as a Path.
    """
    from transformers import BertConfig, BertForMaskedLM, BertModel, LlamaConfig, LlamaForCausalLM

    if arch not in TINY_ARCHS:
        raise ValueError(f"tiny model arch {arch!r}: must be one of {list(TINY_ARCHS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer, vocab_size = _tokenizer(arch)
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                  num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=256)
    if arch == "llama":
        cfg = LlamaConfig(**common, num_key_value_heads=2, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                          tie_word_embeddings=False)
        model = LlamaForCausalLM(cfg)
    else:
        cfg = BertConfig(**common, pad_token_id=tokenizer.pad_token_id)
        model = BertForMaskedLM(cfg) if arch == "bert-mlm" else BertModel(cfg, add_pooling_layer=False)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "freeshap_tiny.json").write_text(json.dumps({"arch": arch, "seed": seed, "hidden": hidden, "layers": layers}))
    return out
