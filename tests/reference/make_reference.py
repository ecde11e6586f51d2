#!/usr/bin/env python3
"""Reference logits from Hugging Face `transformers`, for tests/parity.rs.

Two directions, both checked by the Rust test within 1e-4:

1. tests/fixtures/hf-tiny-bert: a tiny BertForSequenceClassification created
   and saved here by `transformers` (random weights, seed 0, three labels) with
   the WordPiece tokenizer of the triagem fixture. triagem must serve it.
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
        logits = model(**batch).logits
    labels = [model.config.id2label[i] for i in logits.argmax(-1).tolist()]
    return {"texts": TEXTS, "max_length": max_length, "input_ids": batch["input_ids"].tolist(),
            "logits": logits.tolist(), "predictions": labels}


def write(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=1)
        f.write("\n")


def main():
    triagem_dir = os.path.join(FIXTURES, "tiny-model")
    with open(os.path.join(triagem_dir, "config.json")) as f:
        triagem_cfg = json.load(f)
    with open(os.path.join(triagem_dir, "tokenizer_config.json")) as f:
        max_length = json.load(f)["model_max_length"]

    # 1. Saved by transformers, served by triagem.
    hf_dir = os.path.join(FIXTURES, "hf-tiny-bert")
    os.makedirs(hf_dir, exist_ok=True)
    torch.manual_seed(0)
    labels = ["financeiro", "suporte", "venda"]
    config = BertConfig(vocab_size=triagem_cfg["vocab_size"], hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                        hidden_act="gelu", id2label=dict(enumerate(labels)),
                        label2id={l: i for i, l in enumerate(labels)})
    model = BertForSequenceClassification(config).eval()
    model.save_pretrained(hf_dir, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(triagem_dir, name), os.path.join(hf_dir, name))
    write(os.path.join(hf_dir, "reference.json"), logits_for(hf_dir, 64))

    # 2. Saved by triagem, loaded by transformers.
    write(os.path.join(triagem_dir, "reference.json"), logits_for(triagem_dir, max_length))
    print("wrote", hf_dir, "and", triagem_dir)


if __name__ == "__main__":
    main()
