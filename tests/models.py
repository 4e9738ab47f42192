"""Tiny random models built from configs in code, and batches for them."""

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

VOCAB = 64


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, **overrides,
    )
    return LlamaForCausalLM(config).eval()


def tiny_t5(seed: int = 0) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=VOCAB, d_model=16, d_ff=32, d_kv=4, num_layers=2, num_heads=4, decoder_start_token_id=0,
        pad_token_id=0, dropout_rate=0.1,
    )
    return T5ForConditionalGeneration(config).eval()


def tiny_bert_classifier(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=32, num_labels=3,
    )
    return BertForSequenceClassification(config).eval()


def causal_batch(seed: int, batch: int = 4, length: int = 12) -> dict:
    """Right-padded causal-LM batch: prompt tokens ignored, rows of different lengths."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, VOCAB, (batch, length), generator=g)
    attention_mask = torch.ones_like(input_ids)
    for row in range(batch):
        attention_mask[row, length - row :] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :3] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def seq2seq_batch(seed: int, batch: int = 4, length: int = 10, target: int = 6) -> dict:
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, VOCAB, (batch, length), generator=g)
    labels = torch.randint(1, VOCAB, (batch, target), generator=g)
    labels[0, -2:] = -100
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}



def train_automatically(model, steps: int, runner=None, lr: float = 1e-2):
    """`steps` optimizer steps of AdamW on causal batches 0..steps-1, as any plain loop would run them
    (no `step()` call: automatic mode); `runner` is what is called (e.g. the compiled model).
    Returns the optimizer."""
    runner = runner if runner is not None else model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for step in range(steps):
        runner(**causal_batch(step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return optimizer


def word_tokenizer_and_texts(count: int = 16, words_per_text: int = 8):
    """A word-level tokenizer over 50 words and `count` random texts of them (for TRL's SFTTrainer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(50)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>"] + words)},
                                         unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                        unk_token="<unk>")
    g = torch.Generator().manual_seed(0)
    texts = [" ".join(words[int(i)] for i in torch.randint(0, 50, (words_per_text,), generator=g))
             for _ in range(count)]
    return tokenizer, texts
