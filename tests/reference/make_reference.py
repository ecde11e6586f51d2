#!/usr/bin/env python3
"""Reference logits from Hugging Face `transformers`, for tests/parity.rs.

Two directions, both checked by the Rust test within 1e-4:

1. tests/fixtures/hf-tiny-bert: a tiny BertForSequenceClassification created
   and saved here by `transformers` (8 heads, three labels, random weights drawn
   wide enough that every text gets its own logits and the texts do not all
   get one label: a model that ignored its input would fail) with the
   WordPiece tokenizer of the triagem fixture. triagem must serve it.
2. tests/fixtures/tiny-model: a model trained and saved by `triagem train`.
   `transformers` must load it (AutoModelForSequenceClassification,
   AutoTokenizer) and give the same logits and predictions as triagem.

Needs torch and transformers (not in CI; the outputs are committed):
    python3 -m venv venv-ref && venv-ref/bin/pip install torch transformers
    venv-ref/bin/python tests/reference/make_reference.py
"""
import json
import os
import shutil

import torch
from transformers import (AutoModelForSequenceClassification, AutoTokenizer,
                          BertConfig, BertForSequenceClassification)

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "..", "fixtures")
TEXTS = [
    "Quero comprar uma geladeira frost free 220v, vocês têm?",
    "minha geladeira parou de gelar 😡 comprei mês passado",
    "tem airfryer 5l?",
    "O pedido #482913 ainda não chegou, já faz 10 dias e ninguém me responde. Podem verificar por favor?",
    "oi",
    "qual o prazo de entrega pro CEP 04567-000 se eu fechar hoje? e dá pra parcelar em 10x sem juros no cartão? "
    "também queria saber se a instalação está inclusa e se tem garantia estendida de dois anos pra esse modelo",
]


def logits_for(model_dir, max_length):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    batch = tokenizer(TEXTS, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    labels = [model.config.id2label[i] for i in out.logits.argmax(-1).tolist()]
    hidden = [[[round(v, 7) for v in token] for token in text] for text in out.hidden_states[-1].tolist()]
    return {"texts": TEXTS, "max_length": max_length, "input_ids": batch["input_ids"].tolist(),
            "logits": out.logits.tolist(), "predictions": labels, "last_hidden_state": hidden}


def widen_initialisation(model):
    """Weights drawn wide (std 0.3, layer-norm scales around 1), so that the
    tiny random model's output depends visibly on its input."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm.weight" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.3)


def write(path, obj):
    """One top-level key a line, each value compact."""
    lines = [f" {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}" for k, v in obj.items()]
    with open(path, "w", encoding="utf-8") as f:
        f.write("{\n" + ",\n".join(lines) + "\n}\n")


def main():
    triagem_dir = os.path.join(FIXTURES, "tiny-model")
    with open(os.path.join(triagem_dir, "config.json")) as f:
        triagem_cfg = json.load(f)
    with open(os.path.join(triagem_dir, "tokenizer_config.json")) as f:
        max_length = json.load(f)["model_max_length"]

    # 1. Saved by transformers, served by triagem.
    hf_dir = os.path.join(FIXTURES, "hf-tiny-bert")
    os.makedirs(hf_dir, exist_ok=True)
    labels = ["financeiro", "suporte", "venda"]
    config = BertConfig(vocab_size=triagem_cfg["vocab_size"], hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=8, intermediate_size=128, max_position_embeddings=64,
                        hidden_act="gelu", id2label=dict(enumerate(labels)),
                        label2id={l: i for i, l in enumerate(labels)})
    for seed in range(100):
        torch.manual_seed(seed)
        model = BertForSequenceClassification(config).eval()
        widen_initialisation(model)
        model.save_pretrained(hf_dir, safe_serialization=True)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(os.path.join(triagem_dir, name), os.path.join(hf_dir, name))
        reference = logits_for(hf_dir, 64)
        if len(set(reference["predictions"])) >= 2:
            break
    print("hf-tiny-bert: seed", seed, "predictions", reference["predictions"])
    write(os.path.join(hf_dir, "reference.json"), reference)

    # 2. Saved by triagem, loaded by transformers.
    write(os.path.join(triagem_dir, "reference.json"), logits_for(triagem_dir, max_length))
    print("wrote", hf_dir, "and", triagem_dir)


if __name__ == "__main__":
    main()
